#!/usr/bin/env python3
"""Recomputes the EC-P256 slot test vector of docs/FORMAT.md section 3.3
("Test vector, kind 3") from the spec alone, with Python `cryptography`
(an independent implementation: no hsmseal code is used). The Rust unit
test envelope::ec_recipient::tests::documented_vector checks the same
numbers. Prints `name: hex` lines; exits 1 if any differs from the spec.

    python3 scripts/ec-slot-vector.py
"""
import hashlib
import struct
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

WANT = {
    "spki": "3059301306072a8648ce3d020106082a8648ce3d03010703420004661cb5b9fdc31acd7f7c91cf16c95d8291b7d9ecb28d94d03adaa70bf4c92e2f34a8327c9f8eac60229d00ba732af5fe396fcdeb51405dae5265df4575b3800b",
    "fingerprint": "ee49fb6c8189de98fa0352b5284ebc992b72348871d9c8ac85a094134f46f9b0",
    "ephemeral point E": "0469f0d466fc0207e157d4dfb3c25c99da31f5be8300d4eee4ed72fa9cfb6282eb0bdcd6a23d50f6d420e35c4f95436ef907f3864e69061a22736e07e9f26e604d",
    "Z": "262f40b2c9ec9ed57aa85de64d6763eb959d84ec208f5d8e5864914d76e677ab",
    "slot key K": "b593e77bdfe0db872bcbfe0c42bf86ef1d11d7c58714a444d241c9935451abc1",
    "wrapped DEK": "a78d4da7249d62cad0963c796c452d10a4c6803f43331acfada94c5daceb159cb915edbd200458a1547e5968443e66d3",
}


def scalar(label):
    return ec.derive_private_key(
        int.from_bytes(hashlib.sha256(label).digest(), "big"), ec.SECP256R1()
    )


d = scalar(b"hsmseal ec-p256 test recipient")
e = scalar(b"hsmseal ec-p256 test ephemeral")
spki = d.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
fp = hashlib.sha256(spki).digest()
E = e.public_key().public_bytes(
    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
)
Z = e.exchange(ec.ECDH(), d.public_key())
K = HKDF(
    algorithm=hashes.SHA256(),
    length=32,
    salt=E + fp,
    info=b"hsmseal ec-p256 slot key v1\x00",
).derive(Z)

# AAD of slot 0 of a 1-slot file (section 3.3, "Slot wrap").
n = 1
place = ((32 + 768 * n + 32 + 511) // 512) * 512
prefix = (
    bytes.fromhex("8948534d5345414c")
    + struct.pack(">HHHHH", 2, 512 + 2 * place, n, 768, 1)
    + bytes(46)
)
name = b"dr"
slot_head = (
    bytes([3, len(name)])
    + name.ljust(64, b"\0")
    + struct.pack(">I", 1)
    + bytes([0, 0])
    + fp
    + struct.pack(">H", len(E))
)
assert len(slot_head) == 106
aad = b"hsmseal file DEK v2\x00" + prefix + slot_head + E
wrapped = AESGCM(K).encrypt(bytes([0x22] * 12), bytes([0x11] * 32), aad)

got = {
    "spki": spki,
    "fingerprint": fp,
    "ephemeral point E": E,
    "Z": Z,
    "slot key K": K,
    "wrapped DEK": wrapped,
}
bad = 0
for k, v in got.items():
    ok = v.hex() == WANT[k]
    bad += not ok
    print(f"{k}: {v.hex()}{'' if ok else '   <-- differs from docs/FORMAT.md'}")
sys.exit(1 if bad else 0)
