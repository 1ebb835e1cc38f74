#!/usr/bin/env python3
"""The blind-index test vector of docs/FORMAT.md section 6 ("Blind indexes"),
computed from the spec's text with Python's hmac and hashlib only, as an
independent check of src/columns/blind_index.rs (tests/columns_bidx.rs runs
this script and compares). Prints one vector per line: normalisation, bits,
index."""
import hashlib
import hmac


def lp(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def k_col(index_key: bytes, context: str, column: str, norm: int, bits: int) -> bytes:
    column_id = b"\x01" + lp(column.encode())  # a header name
    data = (lp(b"hsmseal/bidx/v1") + lp(context.encode()) + lp(column_id)
            + bytes([norm]) + bits.to_bytes(2, "big"))
    return hmac.new(index_key, data, hashlib.sha256).digest()


def index(index_key, context, column, norm, bits, value: bytes) -> str:
    if norm == 1:  # lower-trim
        value = value.decode("utf-8").strip().lower().encode()
    k = k_col(index_key, context, column, norm, bits)
    return hmac.new(k, value, hashlib.sha256).digest()[: bits // 8].hex()


KEY = bytes(range(0xC0, 0xE0))
for name, norm, bits in [("lower-trim", 1, 64), ("none", 0, 64), ("none", 0, 128)]:
    print(name, bits, index(KEY, "app.users", "email", norm, bits, b" Alice@X.org "))
