//! The hsmseal file: a 1024-byte header (the envelope) followed by a C2SP
//! chunked-encryption payload keyed by a fresh random data key (DEK).
//!
//! The DEK never leaves this module unwrapped except into the payload cipher;
//! it lives in a zeroizing `SecretKey`.

use super::header::{self, Header, HEADER_LEN};
use crate::backend::{KeyBackend, KeyRef};
use crate::error::{Error, Result};
use crate::secret::SecretKey;
use crate::stream::{self, StreamOptions};
use std::io::{Read, Write};

/// What a seal or open did, for reports.
#[derive(Debug, Clone)]
pub struct FileReport {
    pub kwk: KeyRef,
    pub plaintext_bytes: u64,
}

/// Encrypts `input` to `output` under the KWK `kwk`: header, then payload.
pub fn seal<R: Read, W: Write>(
    backend: &dyn KeyBackend,
    kwk: &KeyRef,
    input: R,
    mut output: W,
    opts: &StreamOptions,
) -> Result<FileReport> {
    let dek = SecretKey::random();
    let wrapped = backend.wrap(kwk, &dek, &header::dek_aad(kwk))?;
    let header = Header::new(kwk.clone(), wrapped);
    output
        .write_all(&header.to_bytes())
        .map_err(|e| Error::io(format!("writing output: {e}")))?;
    let n = stream::encrypt(&dek, &header::payload_context(), input, output, opts)?;
    Ok(FileReport {
        kwk: kwk.clone(),
        plaintext_bytes: n,
    })
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub fn read_up_to(input: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    stream::read_full(input, buf).map_err(|e| Error::io(format!("reading input: {e}")))
}

/// Reads exactly the header (or as much as there is) from `input`.
pub fn read_header<R: Read>(input: &mut R) -> Result<(Header, [u8; HEADER_LEN])> {
    let mut buf = [0u8; HEADER_LEN];
    let got = read_up_to(input, &mut buf)?;
    let header = Header::parse(&buf[..got])?;
    Ok((header, buf))
}

/// Unwraps the DEK from the header's active envelope.
pub fn unwrap_dek(backend: &dyn KeyBackend, header: &Header) -> Result<(SecretKey, KeyRef)> {
    let (_, envelope) = header.active();
    let kwk = &envelope.kwk;
    let dek = backend.unwrap(kwk, &envelope.wrapped, &header::dek_aad(kwk))?;
    Ok((dek, kwk.clone()))
}

/// Decrypts a whole hsmseal file. Only authenticated chunks reach `output`;
/// the first failure stops with an `Integrity` error.
pub fn open<R: Read, W: Write>(
    backend: &dyn KeyBackend,
    mut input: R,
    output: W,
    opts: &StreamOptions,
) -> Result<FileReport> {
    let (header, _) = read_header(&mut input)?;
    open_payload(backend, &header, input, output, opts)
}

/// Decrypts the payload that follows an already parsed header (so callers
/// can reject a file that is not hsmseal before asking for a PIN).
pub fn open_payload<R: Read, W: Write>(
    backend: &dyn KeyBackend,
    header: &Header,
    input: R,
    output: W,
    opts: &StreamOptions,
) -> Result<FileReport> {
    let (dek, kwk) = unwrap_dek(backend, header)?;
    let n = stream::decrypt(&dek, &header::payload_context(), input, output, opts)?;
    Ok(FileReport {
        kwk,
        plaintext_bytes: n,
    })
}

/// Authenticates a whole hsmseal file, writing nothing.
pub fn verify<R: Read>(
    backend: &dyn KeyBackend,
    mut input: R,
    opts: &StreamOptions,
) -> Result<FileReport> {
    let (header, _) = read_header(&mut input)?;
    verify_payload(backend, &header, input, opts)
}

/// Authenticates the payload that follows an already parsed header.
pub fn verify_payload<R: Read>(
    backend: &dyn KeyBackend,
    header: &Header,
    input: R,
    opts: &StreamOptions,
) -> Result<FileReport> {
    let (dek, kwk) = unwrap_dek(backend, header)?;
    let n = stream::verify(&dek, &header::payload_context(), input, opts)?;
    Ok(FileReport {
        kwk,
        plaintext_bytes: n,
    })
}

/// Total file size for a plaintext of `len` bytes.
pub fn sealed_len(len: u64) -> u64 {
    HEADER_LEN as u64 + stream::ciphertext_len(len)
}

/// Plaintext size implied by a file size, or None if that size is impossible.
pub fn plaintext_len(file_len: u64) -> Option<u64> {
    file_len
        .checked_sub(HEADER_LEN as u64)
        .and_then(stream::plaintext_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::error::ErrorKind;

    fn opts() -> StreamOptions<'static> {
        StreamOptions {
            threads: 2,
            progress: None,
        }
    }

    fn setup() -> (MemoryBackend, KeyRef) {
        let b = MemoryBackend::new();
        b.add_version("k");
        (
            b,
            KeyRef {
                name: "k".into(),
                version: 1,
            },
        )
    }

    #[test]
    fn round_trip_sizes() {
        let (b, k) = setup();
        for len in [0usize, 1, 16383, 16384, 16385, 100_000] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut ct = Vec::new();
            seal(&b, &k, &pt[..], &mut ct, &opts()).unwrap();
            assert_eq!(ct.len() as u64, sealed_len(len as u64));
            assert_eq!(plaintext_len(ct.len() as u64), Some(len as u64));
            let mut out = Vec::new();
            let r = open(&b, &ct[..], &mut out, &opts()).unwrap();
            assert_eq!(out, pt);
            assert_eq!(r.plaintext_bytes, len as u64);
            verify(&b, &ct[..], &opts()).unwrap();
        }
    }

    #[test]
    fn every_bit_flip_and_truncation_of_a_small_file_is_rejected() {
        let (b, k) = setup();
        let pt = [0x5au8; 40];
        let mut ct = Vec::new();
        seal(&b, &k, &pt[..], &mut ct, &opts()).unwrap();
        for i in 0..ct.len() * 8 {
            let mut c = ct.clone();
            c[i / 8] ^= 1 << (i % 8);
            let mut out = Vec::new();
            assert!(
                open(&b, &c[..], &mut out, &opts()).is_err(),
                "bit {i} accepted"
            );
            assert!(out.is_empty(), "bit {i}: plaintext released");
        }
        for n in 0..ct.len() {
            let mut out = Vec::new();
            assert!(
                open(&b, &ct[..n], &mut out, &opts()).is_err(),
                "length {n} accepted"
            );
        }
    }

    #[test]
    fn envelope_swapped_between_files_is_rejected() {
        let (b, k) = setup();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        seal(&b, &k, &b"first file"[..], &mut x, &opts()).unwrap();
        seal(&b, &k, &b"other file"[..], &mut y, &opts()).unwrap();
        let mut spliced = x[..HEADER_LEN].to_vec();
        spliced.extend_from_slice(&y[HEADER_LEN..]);
        let e = open(&b, &spliced[..], &mut Vec::new(), &opts()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Integrity);
    }
}
