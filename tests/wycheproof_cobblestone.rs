//! All Wycheproof vectors for C2SP chunked encryption with AES-256-GCM
//! ("Cobblestone-256"), run through the streaming API with one and with two
//! threads (payloads under one ~1 MiB batch take the single-thread path
//! either way; the two 4 MiB counter-rollover vectors go through the worker
//! pipeline). Valid vectors must decrypt to the recorded message and
//! re-encrypt to the exact ciphertext; invalid ones must fail with the right
//! error kind and release no plaintext beyond the authenticated prefix.

use std::io::Read;

use flate2::read::ZlibDecoder;
use hsmseal::error::ErrorKind;
use hsmseal::secret::SecretKey;
use hsmseal::stream::{self, StreamOptions, SALT_LEN};
use sha2::{Digest, Sha512};
use wycheproof::chunked_encryption::{ChunkedEncryptionAead, TestFlag, TestName, TestSet};
use wycheproof::{HashFunction, TestResult};

/// The vectors store the ciphertext zlib-compressed.
fn inflate(compressed: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ZlibDecoder::new(compressed)
        .read_to_end(&mut out)
        .expect("vector ciphertext is valid zlib");
    out
}

#[test]
fn cobblestone256_all_vectors() {
    let set = TestSet::load(TestName::Cobblestone256).expect("vectors load");
    let (mut total, mut valid, mut invalid) = (0, 0, 0);
    for group in &set.test_groups {
        assert_eq!(group.aead, ChunkedEncryptionAead::Aes256Gcm);
        assert_eq!(group.hash, HashFunction::Sha2_512);
        for t in &group.tests {
            total += 1;
            let ct = inflate(&t.ct);
            let id = format!("tcId {} ({})", t.tc_id, t.comment);
            for threads in [1, 2] {
                let opts = StreamOptions {
                    threads,
                    progress: None,
                };
                let id = format!("{id}, threads={threads}");
                match t.result {
                    TestResult::Valid => check_valid(t, &ct, &opts, &id),
                    TestResult::Invalid => check_invalid(t, &ct, &opts, &id),
                    TestResult::Acceptable => panic!("{id}: no acceptable vectors expected"),
                }
            }
            match t.result {
                TestResult::Valid => valid += 1,
                _ => invalid += 1,
            }
        }
    }
    assert_eq!(total, 35, "number of Cobblestone-256 vectors");
    assert_eq!(set.number_of_tests, 35);
    assert_eq!((valid, invalid), (10, 25));
}

fn check_valid(
    t: &wycheproof::chunked_encryption::Test,
    ct: &[u8],
    opts: &StreamOptions,
    id: &str,
) {
    let len = t.msg_length.expect("valid vectors have msgLength");
    let sha = t.msg_sha512.as_ref().expect("valid vectors have msgSha512");

    let mut pt = Vec::new();
    let n = stream::decrypt_with_key_bytes(&t.key, &t.ctx, ct, &mut pt, opts)
        .unwrap_or_else(|e| panic!("{id}: valid vector rejected: {e}"));
    assert_eq!(n, len as u64, "{id}: returned length");
    assert_eq!(pt.len(), len, "{id}: plaintext length");
    assert_eq!(Sha512::digest(&pt)[..], sha[..], "{id}: plaintext hash");
    assert_eq!(
        stream::plaintext_len(ct.len() as u64),
        Some(len as u64),
        "{id}"
    );
    assert_eq!(stream::ciphertext_len(len as u64), ct.len() as u64, "{id}");

    let key = SecretKey::from_bytes(t.key[..].try_into().expect("32-byte key"));
    let n = stream::verify(&key, &t.ctx, ct, opts).unwrap_or_else(|e| panic!("{id}: verify: {e}"));
    assert_eq!(n, len as u64, "{id}: verify");
    let mut pt2 = Vec::new();
    stream::decrypt(&key, &t.ctx, ct, &mut pt2, opts).unwrap_or_else(|e| panic!("{id}: {e}"));
    assert!(pt2 == pt, "{id}: decrypt with SecretKey");

    // Encryption is deterministic given the salt: it must reproduce the
    // vector byte for byte (derivation, nonces, chunking, final chunk).
    let salt: [u8; SALT_LEN] = ct[..SALT_LEN].try_into().unwrap();
    let mut again = Vec::new();
    let n = stream::encrypt_with_salt(&key, &t.ctx, &salt, &pt[..], &mut again, opts)
        .unwrap_or_else(|e| panic!("{id}: encrypt: {e}"));
    assert_eq!(n, len as u64, "{id}");
    assert!(again == ct, "{id}: re-encryption differs from the vector");
}

fn check_invalid(
    t: &wycheproof::chunked_encryption::Test,
    ct: &[u8],
    opts: &StreamOptions,
    id: &str,
) {
    let mut out = Vec::new();
    let err = match stream::decrypt_with_key_bytes(&t.key, &t.ctx, ct, &mut out, opts) {
        Ok(n) => panic!("{id}: invalid vector accepted ({n} bytes)"),
        Err(e) => e,
    };
    let flags = &t.flags;
    let expected = if flags.contains(&TestFlag::InvalidKeySize) {
        ErrorKind::Usage
    } else {
        ErrorKind::Integrity
    };
    assert_eq!(err.kind(), expected, "{id}: {err}");
    assert!(!err.to_string().contains('\n'), "{id}: one-line error");

    if flags.contains(&TestFlag::PartialPlaintext) {
        // This implementation releases exactly the chunks that
        // authenticated before the failure: the longest valid prefix.
        let len = t.msg_length.expect("partial vectors have msgLength");
        let sha = t
            .msg_sha512
            .as_ref()
            .expect("partial vectors have msgSha512");
        assert_eq!(out.len(), len, "{id}: released prefix length");
        assert_eq!(
            Sha512::digest(&out)[..],
            sha[..],
            "{id}: released prefix hash"
        );
    } else {
        assert!(out.is_empty(), "{id}: released {} bytes", out.len());
    }
    if flags.contains(&TestFlag::HeaderFailure) {
        assert!(out.is_empty(), "{id}: header failures release nothing");
    }
    if flags.contains(&TestFlag::WrongKey) || flags.contains(&TestFlag::WrongContext) {
        assert!(err.message().contains("commitment"), "{id}: {err}");
    }

    // verify() must reject the same vectors (it needs a 32-byte key).
    if let Ok(k) = <[u8; 32]>::try_from(&t.key[..]) {
        let key = SecretKey::from_bytes(k);
        let e = stream::verify(&key, &t.ctx, ct, opts).expect_err(id);
        assert_eq!(e.kind(), ErrorKind::Integrity, "{id}: verify: {e}");
    }
}
