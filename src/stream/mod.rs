//! The file payload format: C2SP chunked encryption v1 instantiated as
//! "Cobblestone-256" (AES-256-GCM, HKDF-SHA-512, 16 KiB chunks; see
//! <https://c2sp.org/chunked-encryption>), streamed in constant memory and
//! spread over worker threads. A payload is `salt(24) || commitment(32) ||
//! chunks`; the key, base nonce and commitment come from one HKDF-Expand of
//! the file's data key with the salt and the caller's context, so a wrong key
//! or context is caught by the commitment before any chunk is touched. Each
//! chunk is sealed with nonce = base nonce XOR its counter, and the final
//! chunk is always shorter than a full one (possibly empty), which is what
//! makes truncation at a chunk boundary detectable. Invariants: decryption
//! releases plaintext only for chunks that authenticated, strictly in order,
//! and stops for good at the first failure; memory use is a fixed number of
//! ~1 MiB batch buffers whatever the stream length; every derived secret is
//! wiped when the stream ends.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use rand::RngCore;

use crate::error::{Error, Result};
use crate::secret::SecretKey;

mod engine;
mod kdf;
mod params;

use params::ENC_CHUNK_LEN;
pub use params::{CHUNK_SIZE, COMMITMENT_LEN, PAYLOAD_HEADER_LEN, SALT_LEN, TAG_LEN};

pub use engine::read_full;
use engine::{Batch, ChunkCipher, BATCH_BYTES, BATCH_PLAIN};

/// Chunk counters must stay below 2^38 (the spec's limit; 4 PiB of data).
const MAX_CHUNKS: u64 = 1 << 38;

/// How a stream is processed.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamOptions<'a> {
    /// Threads the stream may use, the calling thread included: it reads
    /// and writes, and `threads - 1` workers do the crypto. 0 and 1 both
    /// mean one sequential thread.
    pub threads: usize,
    /// Plaintext bytes processed so far are added here as the stream goes.
    pub progress: Option<&'a AtomicU64>,
}

fn read_err(e: io::Error) -> Error {
    Error::io(format!("reading input: {e}"))
}

fn write_err(e: io::Error) -> Error {
    Error::io(format!("writing output: {e}"))
}

/// A processed batch goes out in one `write_all` (~1 MiB). Output files
/// sit behind `fs::AtomicFile`, whose writer sends whole pages straight
/// from this buffer at page-aligned offsets; pipes and devices sit behind a
/// `BufWriter` that large writes bypass. Either way the batch is not copied
/// again on its way to the kernel. (Cutting it into 64 KiB pieces, as
/// before, made every piece land at an odd offset in the file behind the
/// header and cost an extra small write per batch.)
fn write_batch(output: &mut dyn Write, data: &[u8]) -> Result<()> {
    output.write_all(data).map_err(write_err)
}

fn add_progress(opts: &StreamOptions, n: usize) {
    if let Some(p) = opts.progress {
        p.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Fails unless chunk counters `0..next_chunk` all stay below 2^38.
fn check_chunk_count(next_chunk: u64) -> Result<()> {
    if next_chunk > MAX_CHUNKS {
        return Err(Error::usage(
            "input too large: a stream holds at most 2^38 chunks (4 PiB)",
        ));
    }
    Ok(())
}

/// Encrypts `input` under `key` and `context`, writing
/// `salt || commitment || chunks` to `output`; returns the plaintext length.
pub fn encrypt<R: Read, W: Write>(
    key: &SecretKey,
    context: &[u8],
    input: R,
    output: W,
    opts: &StreamOptions,
) -> Result<u64> {
    let mut salt = [0u8; SALT_LEN];
    rand::rngs::OsRng
        .try_fill_bytes(&mut salt)
        .map_err(|e| Error::io(format!("reading the system random number generator: {e}")))?;
    encrypt_with_salt(key, context, &salt, input, output, opts)
}

/// [`encrypt`] with a caller-chosen salt, for test vectors. A salt must never
/// repeat under one key: use [`encrypt`] for real data.
pub fn encrypt_with_salt<R: Read, W: Write>(
    key: &SecretKey,
    context: &[u8],
    salt: &[u8; SALT_LEN],
    mut input: R,
    mut output: W,
    opts: &StreamOptions,
) -> Result<u64> {
    seal_stream(key.expose(), context, salt, &mut input, &mut output, opts)
}

fn seal_stream(
    key: &[u8; 32],
    context: &[u8],
    salt: &[u8; SALT_LEN],
    input: &mut dyn Read,
    output: &mut dyn Write,
    opts: &StreamOptions,
) -> Result<u64> {
    let derived = kdf::derive(key, salt, context);
    let cipher = ChunkCipher::new(&derived);
    let mut header = [0u8; PAYLOAD_HEADER_LEN];
    header[..SALT_LEN].copy_from_slice(salt);
    header[SALT_LEN..].copy_from_slice(derived.commitment());
    drop(derived);
    output.write_all(&header).map_err(write_err)?;

    let mut next_chunk = 0u64;
    let mut read = |b: &mut Batch| -> Result<bool> {
        let n = engine::read_chunk_places(input, &mut b.buf).map_err(read_err)?;
        b.first_chunk = next_chunk;
        // A batch that is not filled holds the final, short chunk (possibly
        // empty); a full batch is followed by at least that final chunk.
        let last = n < BATCH_PLAIN;
        (b.n_chunks, b.tail_len) = if last {
            (n / CHUNK_SIZE + 1, n % CHUNK_SIZE)
        } else {
            (n / CHUNK_SIZE, CHUNK_SIZE)
        };
        b.touch(b.sealed_len());
        next_chunk += b.n_chunks as u64;
        check_chunk_count(next_chunk)?;
        Ok(last)
    };
    let crypt = |b: &mut Batch| cipher.seal(b);
    let mut total = 0u64;
    let mut write = |b: &mut Batch| -> Result<()> {
        write_batch(output, &b.buf[..b.sealed_len()])?;
        total += b.plain_len() as u64;
        add_progress(opts, b.plain_len());
        Ok(())
    };
    engine::run(opts.threads, &mut read, &crypt, &mut write)?;
    output.flush().map_err(write_err)?;
    Ok(total)
}

/// Decrypts a payload made by [`encrypt`], writing plaintext to `output` only
/// for chunks that authenticated, in order. The first failure ends the
/// stream with an `ErrorKind::Integrity` error; returns the plaintext length.
pub fn decrypt<R: Read, W: Write>(
    key: &SecretKey,
    context: &[u8],
    mut input: R,
    mut output: W,
    opts: &StreamOptions,
) -> Result<u64> {
    open_stream(key.expose(), context, &mut input, &mut output, opts)
}

/// Authenticates a whole payload and writes nothing; returns the plaintext
/// length.
pub fn verify<R: Read>(
    key: &SecretKey,
    context: &[u8],
    mut input: R,
    opts: &StreamOptions,
) -> Result<u64> {
    open_stream(key.expose(), context, &mut input, &mut io::sink(), opts)
}

/// [`decrypt`] with a raw input key, for test vectors: a key that is not 32
/// bytes is refused with `ErrorKind::Usage`.
pub fn decrypt_with_key_bytes<R: Read, W: Write>(
    key: &[u8],
    context: &[u8],
    mut input: R,
    mut output: W,
    opts: &StreamOptions,
) -> Result<u64> {
    let key: &[u8; 32] = key.try_into().map_err(|_| {
        Error::usage(format!(
            "invalid key size: {} bytes, Cobblestone-256 needs 32",
            key.len()
        ))
    })?;
    open_stream(key, context, &mut input, &mut output, opts)
}

fn auth_failed(chunk: u64, final_chunk: bool) -> Error {
    let offset = PAYLOAD_HEADER_LEN as u64 + chunk * ENC_CHUNK_LEN as u64;
    if final_chunk {
        Error::integrity(format!(
            "authentication failed at chunk {chunk} (payload offset {offset}), the final chunk: \
             the data was modified, truncated, followed by trailing data or encrypted under another key"
        ))
    } else {
        Error::integrity(format!(
            "authentication failed at chunk {chunk} (payload offset {offset}): \
             the data was modified, reordered or encrypted under another key"
        ))
    }
}

/// Reads the payload's salt and commitment, derives the stream's key and
/// checks the commitment: before any chunk, so a wrong key or context never
/// even reaches the AEAD (key commitment).
fn open_payload_header(
    key: &[u8; 32],
    context: &[u8],
    input: &mut dyn Read,
) -> Result<ChunkCipher> {
    let mut header = [0u8; PAYLOAD_HEADER_LEN];
    let n = read_full(input, &mut header).map_err(read_err)?;
    if n < PAYLOAD_HEADER_LEN {
        return Err(Error::integrity(format!(
            "truncated: the payload is {}, shorter than its {PAYLOAD_HEADER_LEN}-byte header",
            crate::error::count(n as u64, "byte", "bytes")
        )));
    }
    let salt: &[u8; SALT_LEN] = header[..SALT_LEN].try_into().expect("fixed length");
    let commitment: &[u8; COMMITMENT_LEN] = header[SALT_LEN..].try_into().expect("fixed length");
    let derived = kdf::derive(key, salt, context);
    if !kdf::ct_eq(derived.commitment(), commitment) {
        return Err(Error::integrity(
            "key commitment mismatch: wrong key or context, or a modified header",
        ));
    }
    Ok(ChunkCipher::new(&derived))
}

fn open_stream(
    key: &[u8; 32],
    context: &[u8],
    input: &mut dyn Read,
    output: &mut dyn Write,
    opts: &StreamOptions,
) -> Result<u64> {
    let cipher = open_payload_header(key, context, input)?;

    let mut next_chunk = 0u64;
    let mut read = |b: &mut Batch| -> Result<bool> {
        let n = read_full(input, &mut b.buf).map_err(read_err)?;
        b.touch(n);
        b.first_chunk = next_chunk;
        b.trailer = None;
        if n == BATCH_BYTES {
            (b.n_chunks, b.tail_len) = (n / ENC_CHUNK_LEN, ENC_CHUNK_LEN);
            next_chunk += b.n_chunks as u64;
            check_chunk_count(next_chunk).map_err(|_| too_long())?;
            return Ok(false);
        }
        // The input ended in this batch: whatever is left after the full
        // chunks is the final chunk, which must hold at least a tag and be
        // shorter than a full chunk.
        let (full, rem) = (n / ENC_CHUNK_LEN, n % ENC_CHUNK_LEN);
        if rem >= TAG_LEN {
            (b.n_chunks, b.tail_len) = (full + 1, rem);
        } else {
            (b.n_chunks, b.tail_len) = (full, ENC_CHUNK_LEN);
            b.trailer = Some(Error::integrity(if rem > 0 {
                format!(
                    "truncated: the final chunk has {}, fewer than its {TAG_LEN}-byte tag",
                    crate::error::count(rem as u64, "byte", "bytes")
                )
            } else if next_chunk + full as u64 == 0 {
                "truncated: no chunks after the header".to_string()
            } else {
                "truncated: the payload ends with a full-size chunk; its short final chunk is missing"
                    .to_string()
            }));
        }
        next_chunk += b.n_chunks as u64;
        check_chunk_count(next_chunk).map_err(|_| too_long())?;
        Ok(true)
    };
    let crypt = |b: &mut Batch| cipher.open(b);
    let mut total = 0u64;
    let mut write = |b: &mut Batch| -> Result<()> {
        let good = b.authenticated;
        if good > 0 {
            let last_len = if good == b.n_chunks {
                b.tail_len - TAG_LEN
            } else {
                CHUNK_SIZE
            };
            // `open` left the authenticated plaintext contiguous.
            let n = (good - 1) * CHUNK_SIZE + last_len;
            write_batch(output, &b.buf[..n])?;
            total += n as u64;
            add_progress(opts, n);
        }
        if good < b.n_chunks {
            let is_final = good + 1 == b.n_chunks && b.tail_len < ENC_CHUNK_LEN;
            return Err(auth_failed(b.first_chunk + good as u64, is_final));
        }
        match b.trailer.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    };
    engine::run(opts.threads, &mut read, &crypt, &mut write)?;
    output.flush().map_err(write_err)?;
    Ok(total)
}

/// Authenticates a payload's key and length without reading its body:
/// checks the key commitment, then decrypts the final chunk at the position
/// the payload length implies (the C2SP random-access length check). A wrong
/// key, a truncation or an extension is caught; a modified middle chunk is
/// not (that takes `verify`). Reads at most 56 + 16400 bytes whatever the
/// payload size, which is what lets rotation cost the same for any file.
///
/// `input` is positioned at the payload's first byte; `payload_len` is its
/// full length. Returns the plaintext length.
pub fn authenticate_key_and_length<R: Read + io::Seek>(
    key: &SecretKey,
    context: &[u8],
    input: &mut R,
    payload_len: u64,
) -> Result<u64> {
    let start = input.stream_position().map_err(read_err)?;
    let plain_len = plaintext_len(payload_len).ok_or_else(|| {
        Error::integrity(format!(
            "truncated or extended: {} is not a possible payload length",
            crate::error::count(payload_len, "byte", "bytes")
        ))
    })?;
    let cipher = open_payload_header(key.expose(), context, input)?;
    let last = plain_len / CHUNK_SIZE as u64;
    let offset = PAYLOAD_HEADER_LEN as u64 + last * ENC_CHUNK_LEN as u64;
    let len = (payload_len - offset) as usize;
    input
        .seek(io::SeekFrom::Start(start + offset))
        .map_err(read_err)?;
    let mut chunk = zeroize::Zeroizing::new(vec![0u8; len]);
    if read_full(input, &mut chunk).map_err(read_err)? < len {
        return Err(Error::integrity(
            "truncated: the file shrank while being read",
        ));
    }
    match cipher.open_one(last, &mut chunk) {
        Some(_) => Ok(plain_len),
        None => Err(auth_failed(last, true)),
    }
}

fn too_long() -> Error {
    Error::integrity("invalid payload: more than 2^38 chunks")
}

/// Exact payload size for a plaintext of `plaintext_len` bytes (saturating
/// at `u64::MAX` for lengths no stream can have).
pub fn ciphertext_len(plaintext_len: u64) -> u64 {
    let (full, rem) = (
        plaintext_len / CHUNK_SIZE as u64,
        plaintext_len % CHUNK_SIZE as u64,
    );
    full.saturating_mul(ENC_CHUNK_LEN as u64)
        .saturating_add(PAYLOAD_HEADER_LEN as u64 + rem + TAG_LEN as u64)
}

/// Plaintext size of a payload of `ciphertext_len` bytes, or `None` if no
/// valid payload has that size (truncated or extended).
pub fn plaintext_len(ciphertext_len: u64) -> Option<u64> {
    let body = ciphertext_len.checked_sub(PAYLOAD_HEADER_LEN as u64)?;
    let (full, rem) = (body / ENC_CHUNK_LEN as u64, body % ENC_CHUNK_LEN as u64);
    if rem < TAG_LEN as u64 || full + 1 > MAX_CHUNKS {
        return None;
    }
    Some(full * CHUNK_SIZE as u64 + rem - TAG_LEN as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(len: usize) -> (SecretKey, Vec<u8>) {
        let key = SecretKey::from_bytes([9; 32]);
        let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let mut ct = Vec::new();
        let opts = StreamOptions {
            threads: 1,
            progress: None,
        };
        encrypt(&key, b"ctx", &pt[..], &mut ct, &opts).unwrap();
        (key, ct)
    }

    #[test]
    fn length_check_accepts_valid_payloads() {
        for len in [0usize, 1, 16383, 16384, 16385, 40_000] {
            let (key, ct) = sealed(len);
            let mut c = io::Cursor::new(&ct);
            let n = authenticate_key_and_length(&key, b"ctx", &mut c, ct.len() as u64).unwrap();
            assert_eq!(n, len as u64);
        }
    }

    #[test]
    fn length_check_rejects_truncation_extension_wrong_key_and_final_chunk_damage() {
        let (key, ct) = sealed(40_000);
        let check = |bytes: &[u8], key: &SecretKey, ctx: &[u8]| {
            let mut c = io::Cursor::new(bytes);
            authenticate_key_and_length(key, ctx, &mut c, bytes.len() as u64).is_err()
        };
        for n in 0..ct.len() {
            assert!(check(&ct[..n], &key, b"ctx"), "truncation to {n} accepted");
        }
        let mut ext = ct.clone();
        ext.extend_from_slice(&[0; 16]);
        assert!(check(&ext, &key, b"ctx"));
        assert!(check(&ct, &SecretKey::from_bytes([8; 32]), b"ctx"));
        assert!(check(&ct, &key, b"other"));
        for i in (ct.len() - 100)..ct.len() {
            let mut b = ct.clone();
            b[i] ^= 1;
            assert!(check(&b, &key, b"ctx"), "final-chunk flip at {i} accepted");
        }
        for i in 0..PAYLOAD_HEADER_LEN {
            let mut b = ct.clone();
            b[i] ^= 0x10;
            assert!(check(&b, &key, b"ctx"), "header flip at {i} accepted");
        }
    }

    #[test]
    fn chunk_limit_is_2_pow_38() {
        assert!(check_chunk_count(MAX_CHUNKS).is_ok());
        let e = check_chunk_count(MAX_CHUNKS + 1).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Usage);
    }

    #[test]
    fn lengths_at_chunk_boundaries() {
        assert_eq!(ciphertext_len(0), 72);
        assert_eq!(ciphertext_len(16384), 56 + 16400 + 16);
        assert_eq!(plaintext_len(56 + 16400), None);
        assert_eq!(plaintext_len(56 + 16400 + 15), None);
        assert_eq!(plaintext_len(71), None);
        assert_eq!(plaintext_len(0), None);
        for n in [0u64, 1, 16383, 16384, 16385, 1 << 30, (1 << 40) + 7] {
            assert_eq!(plaintext_len(ciphertext_len(n)), Some(n));
        }
        assert_eq!(ciphertext_len(u64::MAX), u64::MAX);
        assert_eq!(plaintext_len(u64::MAX), None);
    }
}
