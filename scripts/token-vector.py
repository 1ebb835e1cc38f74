#!/usr/bin/env python3
"""The v2 column-token test vector of docs/FORMAT.md section 6 ("Test
vector"), computed from the spec's text with Python's hmac, hashlib and the
`cryptography` package's AES-GCM: an independent check of
src/columns/token.rs (tests/columns.rs `spec_test_vector_v2` builds the same
string in Rust). Prints the token."""
import base64
import hashlib
import hmac

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def lp(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def varint(v: int) -> bytes:
    out = b""
    while True:
        b, v = v & 0x7F, v >> 7
        if v == 0:
            return out + bytes([b])
        out += bytes([b | 0x80])


kdk, salt, index = bytes(range(0x80, 0xA0)), bytes(range(0xA0, 0xAC)), 300
batch = hmac.new(kdk, lp(b"hsmseal/columns/batch-key/v2") + lp(b"pii")
                 + (1).to_bytes(4, "big") + salt, hashlib.sha256).digest()
cell = hmac.new(batch, b"hsmseal/columns/cell-key/v2" + index.to_bytes(4, "big"),
                hashlib.sha256).digest()
binding = (lp(b"hsmseal/columns/record") + b"\x01" + lp(b"app.users")
           + b"\x01" + lp(b"ssn") + b"\x01" + lp(b"42"))
ct = AESGCM(cell).encrypt(bytes(12), b"\x04" + b"123-45-6789", binding)
body = bytes([3]) + b"pii" + varint(1) + salt + varint(index) + ct
print("hsc2." + base64.urlsafe_b64encode(body).rstrip(b"=").decode())
