//! The column token formats: one encrypted cell as a self-contained ASCII
//! string, and the key hierarchy behind it. New tokens are version 2 when
//! the key version has a key-derivation key (KDK), version 1 otherwise;
//! both open.
//!
//! ```text
//! v2: token = "hsc2." base64url-no-pad(body)
//!     body  = u8 n | key name (n) | varint key version | batch salt (12) | varint cell index
//!           | AES-256-GCM(cell key, 0^12, flags || value, AAD = binding) (1 + len + 16)
//!     batch key = HMAC-SHA256(KDK of name/version, in the HSM,
//!                 lp(BATCH_DOMAIN_V2) | lp(name) | u32be version | batch salt)
//!     cell key  = HMAC-SHA256(batch key, CELL_DOMAIN | u32be cell index), on the host
//!     varint = unsigned LEB128, minimal (no trailing 0x00 byte), at most a u32
//! v1: token = "hsc1." base64url-no-pad(body)
//! body   = envelope record
//! envelope (replaceable by rotation, not authenticated by the record):
//!          u8 n | key name (n bytes) | u32be key version | wrap IV (12) | wrapped batch key (48)
//! record = DEK nonce (12) | AES-256-GCM(batch key, DEK nonce, DEK, AAD = binding) (32 + 16)
//!        | AES-256-GCM(DEK, 0^12, flags || value, AAD = empty) (1 + len + 16)
//! ```
//!
//! Invariants:
//! - Every record has its own random DEK, used for exactly one message; that
//!   is why the value may be encrypted under the fixed all-zero nonce.
//! - The binding (format version, context, column, row id) is the AAD of the
//!   DEK layer, so a token moved to another column, context or row fails: its
//!   DEK cannot be recovered, and the value is only readable with that DEK
//!   (binding the value layer again would cost GHASH work and add nothing).
//! - The envelope is outside the binding: a rewrap swaps it alone.
//! - Only canonical base64 is accepted (no padding, no stray trailing bits),
//!   so any single-character change of a token is rejected.
//! - The flags byte (authenticated with the value) records the dump format
//!   the value was decoded from, so a reader of another format can refuse
//!   it rather than write the value with the wrong escaping (issue 9);
//!   tokens from before that record format 0, "unknown".
//!
//! - v2: every cell key is a PRF output of the cell's index within its
//!   batch (0, 1, 2, ... below [`MAX_BATCH_SIZE`]) under a batch key that
//!   is itself a PRF output of the KDK (which never leaves the HSM) and a
//!   random 96-bit batch salt. One batch belongs to one [`Sealer`] (one
//!   worker thread), which hands out its indexes in order and never twice,
//!   so each cell key is used for exactly one message: the fixed all-zero
//!   nonce is safe. The binding is the value layer's AAD. Nothing in a v2
//!   token is outside authentication: the key name, version, batch salt and
//!   cell index select the key, and any change selects another key and
//!   fails. Varints must be minimal, so every key has one encoding and a
//!   token one text.
//! - v2 has no separable envelope: rotation re-encrypts the cell
//!   ([`Rewrapper`] opens it under its binding and seals it again).
//!
//! docs/FORMAT.md (section 6) specifies all of this byte by byte.

use super::format::Format;
use crate::backend::{KeyBackend, KeyRef, WrappedKey, WRAPPED_KEY_LEN, WRAP_IV_LEN};
use crate::error::{Error, Result};
use crate::secret::SecretKey;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use zeroize::Zeroize;

/// Token format version 1, also spelled out in [`PREFIX`]; also the version
/// byte of the binding layout ([`binding_prefix`]), which v2 keeps.
pub const TOKEN_VERSION: u8 = 1;
/// Every version-1 token starts with these five ASCII bytes.
pub const PREFIX: &[u8] = b"hsc1.";
/// Every version-2 token starts with these five ASCII bytes.
pub const PREFIX_V2: &[u8] = b"hsc2.";
/// Length of both prefixes; they differ in byte 3 only.
pub const PREFIX_LEN: usize = 5;

/// Domain separation string of a v2 batch key derivation (HMAC input).
pub const BATCH_DOMAIN_V2: &[u8] = b"hsmseal/columns/batch-key/v2";
/// Domain separation string of a v2 cell key derivation (HMAC input).
pub const CELL_DOMAIN: &[u8] = b"hsmseal/columns/cell-key/v2";
/// Length of a v2 batch salt.
pub const SALT_LEN: usize = 12;
/// Longest unsigned LEB128 encoding of a u32.
const MAX_VARINT_LEN: usize = 5;

/// Appends `v` as unsigned LEB128: 7 bits per byte, least significant
/// first, the high bit set on every byte but the last (1 byte below 128).
pub fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The unsigned LEB128 value at the start of `b` and its length. `None` if
/// it is truncated, longer than 5 bytes, over `u32::MAX`, or not minimal
/// (a last byte of 0 after the first): one value, one encoding, so a token
/// has exactly one text for each key it selects.
pub fn get_varint(b: &[u8]) -> Option<(u32, usize)> {
    let mut v: u64 = 0;
    for (i, &byte) in b.iter().enumerate().take(MAX_VARINT_LEN) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return None;
            }
            return u32::try_from(v).ok().map(|v| (v, i + 1));
        }
    }
    None
}

/// Length of the unsigned LEB128 encoding of `v`.
pub const fn varint_len(v: u32) -> usize {
    match v {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        0x20_0000..=0x0fff_ffff => 4,
        _ => 5,
    }
}

/// True if `value` starts with the prefix of a token of any version.
pub fn has_prefix(value: &[u8]) -> bool {
    value.starts_with(PREFIX) || value.starts_with(PREFIX_V2)
}

/// Domain separation string of the record binding (the AAD of a record).
pub const BINDING_DOMAIN: &[u8] = b"hsmseal/columns/record";
/// Domain separation string of the batch-key wrap AAD (passed to the HSM).
pub const WRAP_DOMAIN: &[u8] = b"hsmseal/columns/batch-key";

/// Flags byte, bit 0: the CSV/TSV field was quoted in the input.
pub const FLAG_QUOTED: u8 = 0x01;
/// Flags byte, bit 1: the value is JSON text (a non-string JSON value, or a
/// string whose escaping differs from the canonical one), not a string.
pub const FLAG_JSON: u8 = 0x02;
/// Flags byte, bits 2-4: the dump format the value was read from
/// ([`format_code`]); 0 in tokens made before formats were bound (issue 9).
/// Inside the value layer, so authenticated like the value itself.
pub const FORMAT_MASK: u8 = 0x1c;
const FORMAT_SHIFT: u32 = 2;
const KNOWN_FLAGS: u8 = FLAG_QUOTED | FLAG_JSON | FORMAT_MASK;

/// The format code a token records in its flags (bits 2-4).
pub fn format_code(f: Format) -> u8 {
    match f {
        Format::Csv => 1,
        Format::Tsv => 2,
        Format::PgCopy => 3,
        Format::Jsonl => 4,
        Format::Parquet => 5,
    }
}

/// The flags bits of a value read from a `f` dump.
pub fn format_flags(f: Format) -> u8 {
    format_code(f) << FORMAT_SHIFT
}

/// The format recorded in `flags`: `None` for tokens made before formats
/// were bound. Only called on flags [`Opener::open`] accepted (code 0-5).
pub fn token_format(flags: u8) -> Option<Format> {
    match (flags & FORMAT_MASK) >> FORMAT_SHIFT {
        1 => Some(Format::Csv),
        2 => Some(Format::Tsv),
        3 => Some(Format::PgCopy),
        4 => Some(Format::Jsonl),
        5 => Some(Format::Parquet),
        _ => None,
    }
}

/// Longest plaintext value that may be encrypted into one token.
pub const MAX_VALUE: usize = 16 << 20;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const DEK_CT_LEN: usize = 32 + TAG_LEN;
/// Bytes of a v1 body besides the key name and the value.
const FIXED_LEN: usize =
    1 + 4 + WRAP_IV_LEN + WRAPPED_KEY_LEN + NONCE_LEN + DEK_CT_LEN + 1 + TAG_LEN;
/// Bytes of the shortest v2 body besides the key name and the value (key
/// version below 128, cell index below 128: one varint byte each).
const FIXED_LEN_V2: usize = 1 + 1 + SALT_LEN + 1 + 1 + TAG_LEN;

/// Default number of cells (selected non-NULL values, not rows) protected
/// by one batch key.
pub const DEFAULT_BATCH_SIZE: u64 = 10_000;
/// Largest `--batch-size`: stays far below the 2^32 random-nonce limit of
/// AES-GCM under one (v1) batch key, and bounds the v2 cell index: a token
/// with an index of `MAX_BATCH_SIZE` or more is malformed (at most 3
/// varint bytes).
pub const MAX_BATCH_SIZE: u64 = 1_000_000;

/// How many unwrapped batch keys decryption keeps (FIFO, zeroized on drop).
pub const BATCH_CACHE_ENTRIES: usize = 4096;

/// Length of the whole v1 token text for a key name of `name_len` bytes and
/// a value of `value_len` bytes.
pub const fn token_len(name_len: usize, value_len: usize) -> usize {
    PREFIX.len() + base64_len(FIXED_LEN + name_len + value_len)
}

/// Length of the whole v2 token text for a key name of `name_len` bytes and
/// a value of `value_len` bytes, under a key version below 128 for one of
/// the first 128 cells of its batch (the shortest; see
/// [`token_len_v2_at`]).
pub const fn token_len_v2(name_len: usize, value_len: usize) -> usize {
    token_len_v2_at(name_len, value_len, 1, 0)
}

/// Length of the whole v2 token text for a key name of `name_len` bytes, a
/// value of `value_len` bytes, key version `version`, cell index `index`.
pub const fn token_len_v2_at(name_len: usize, value_len: usize, version: u32, index: u32) -> usize {
    PREFIX_V2.len()
        + base64_len(
            FIXED_LEN_V2 - 2 + varint_len(version) + varint_len(index) + name_len + value_len,
        )
}

const fn base64_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

/// The shortest token text there is (v2): a one-byte key name, an empty value.
pub const MIN_TOKEN_LEN: usize = token_len_v2(1, 0);

/// True if `value` has the shape of a token: the prefix, then at least as
/// many base64url characters as the shortest token has. This is how
/// `encrypt` recognises a value that already is a token (refused unless
/// `--skip-tokens`) and `decrypt` a value that was encrypted twice. A
/// plaintext such as `hsc1.example.com` (a dot, too short) is not one.
pub fn looks_like_token(value: &[u8]) -> bool {
    let min = if value.starts_with(PREFIX) {
        token_len(1, 0)
    } else if value.starts_with(PREFIX_V2) {
        token_len_v2(1, 0)
    } else {
        return false;
    };
    value.len() >= min
        && value[PREFIX_LEN..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// Largest token text accepted on decrypt.
pub const MAX_TOKEN_LEN: usize =
    5 + (FIXED_LEN + crate::backend::MAX_KEY_NAME_LEN + MAX_VALUE) * 4 / 3 + 4;

/// Which column a binding names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnId {
    /// A header name (CSV/TSV/pgcopy with a header) or a JSON top-level key.
    Name(String),
    /// A 1-based field position (`--no-header`).
    Index(u32),
}

impl std::fmt::Display for ColumnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ColumnId::Name(n) => write!(f, "column {n:?}"),
            ColumnId::Index(i) => write!(f, "column {i}"),
        }
    }
}

/// The constant part of a column's binding: everything but the row id.
pub fn binding_prefix(context: &str, column: &ColumnId) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    put_bytes(&mut b, BINDING_DOMAIN);
    b.push(TOKEN_VERSION);
    put_bytes(&mut b, context.as_bytes());
    match column {
        ColumnId::Name(n) => {
            b.push(1);
            put_bytes(&mut b, n.as_bytes());
        }
        ColumnId::Index(i) => {
            b.push(2);
            b.extend_from_slice(&i.to_be_bytes());
        }
    }
    b
}

/// Completes a binding: `prefix` from [`binding_prefix`], then the row id.
pub fn binding(out: &mut Vec<u8>, prefix: &[u8], row_id: Option<&[u8]>) {
    out.clear();
    out.extend_from_slice(prefix);
    match row_id {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            put_bytes(out, id);
        }
    }
}

/// Completes a binding with a row id already encoded by
/// [`crate::columns::encode_row_id`] (any number of `--row-id` columns):
/// `binding(out, p, None)` equals `binding_encoded(out, p, &[0])`.
pub fn binding_encoded(out: &mut Vec<u8>, prefix: &[u8], row_id: &[u8]) {
    out.clear();
    out.extend_from_slice(prefix);
    out.extend_from_slice(row_id);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Lengths are capped far below 4 GiB (values at 16 MiB), so u32 is exact.
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// The AAD the KWK wrap of a batch key is made with.
pub fn wrap_aad(kwk: &KeyRef) -> Vec<u8> {
    let mut b = Vec::with_capacity(48);
    put_bytes(&mut b, WRAP_DOMAIN);
    b.push(TOKEN_VERSION);
    put_bytes(&mut b, kwk.name.as_bytes());
    b.extend_from_slice(&kwk.version.to_be_bytes());
    b
}

/// Serialises a batch envelope.
fn envelope_bytes(kwk: &KeyRef, wrapped: &WrappedKey) -> Vec<u8> {
    let mut e = Vec::with_capacity(1 + kwk.name.len() + 4 + WRAP_IV_LEN + WRAPPED_KEY_LEN);
    e.push(kwk.name.len() as u8);
    e.extend_from_slice(kwk.name.as_bytes());
    e.extend_from_slice(&kwk.version.to_be_bytes());
    e.extend_from_slice(&wrapped.iv);
    e.extend_from_slice(&wrapped.ciphertext);
    e
}

/// A parsed envelope.
fn parse_envelope(env: &[u8]) -> Result<(KeyRef, WrappedKey)> {
    let n = env[0] as usize;
    let name = std::str::from_utf8(&env[1..1 + n])
        .ok()
        .filter(|s| crate::backend::validate_key_name(s).is_ok())
        .ok_or_else(|| Error::format("malformed token: invalid key name"))?;
    let mut v = [0u8; 4];
    v.copy_from_slice(&env[1 + n..5 + n]);
    let mut iv = [0u8; WRAP_IV_LEN];
    iv.copy_from_slice(&env[5 + n..5 + n + WRAP_IV_LEN]);
    let mut ciphertext = [0u8; WRAPPED_KEY_LEN];
    ciphertext.copy_from_slice(&env[5 + n + WRAP_IV_LEN..]);
    Ok((
        KeyRef {
            name: name.to_string(),
            version: u32::from_be_bytes(v),
        },
        WrappedKey { iv, ciphertext },
    ))
}

/// Length of the v1 envelope at the start of `body`, after checking the
/// body is long enough to hold it and a record.
fn envelope_len(body: &[u8]) -> Result<usize> {
    let n = name_len(body)?;
    if body.len() < FIXED_LEN + n {
        return Err(Error::format("malformed token: too short"));
    }
    Ok(1 + n + 4 + WRAP_IV_LEN + WRAPPED_KEY_LEN)
}

/// Length of the v2 header (key name, version, batch salt) at the start of
/// `body`, after checking the body is long enough to hold a whole token
/// and its varints are well formed (the cell index also below the batch
/// bound).
fn header_len_v2(body: &[u8]) -> Result<usize> {
    let n = name_len(body)?;
    if body.len() < FIXED_LEN_V2 + n {
        return Err(Error::format("malformed token: too short"));
    }
    let (_, vlen) = get_varint(&body[1 + n..])
        .ok_or_else(|| Error::format("malformed token: bad key version"))?;
    let hlen = 1 + n + vlen + SALT_LEN;
    cell_index(body, hlen)?;
    Ok(hlen)
}

/// The cell index after a v2 header of `hlen` bytes and its length,
/// after checking a value layer (flags and tag at least) follows it.
fn cell_index(body: &[u8], hlen: usize) -> Result<(u32, usize)> {
    let (index, ilen) = body
        .get(hlen..)
        .and_then(get_varint)
        .filter(|&(i, _)| u64::from(i) < MAX_BATCH_SIZE)
        .ok_or_else(|| Error::format("malformed token: bad cell index"))?;
    if body.len() < hlen + ilen + 1 + TAG_LEN {
        return Err(Error::format("malformed token: too short"));
    }
    Ok((index, ilen))
}

fn name_len(body: &[u8]) -> Result<usize> {
    let n = *body
        .first()
        .ok_or_else(|| Error::format("malformed token: empty"))? as usize;
    if n == 0 || n > crate::backend::MAX_KEY_NAME_LEN {
        return Err(Error::format("malformed token: bad key name length"));
    }
    Ok(n)
}

/// The key name and version at the start of a body of token format
/// `format` (both begin `u8 n | name`, then the version: `u32be` in v1, a
/// varint in v2); the caller checked the length.
fn parse_key_ref(format: u8, body: &[u8]) -> Result<KeyRef> {
    key_ref_prefix(format, body)
        .map(|(k, _)| k)
        .ok_or_else(|| Error::format("malformed token: invalid key name or version"))
}

/// The key name and version at the start of `body`, a (possibly partial)
/// body of token format `format`, and the bytes they take. `None` if they
/// are malformed or `body` ends before them. Nothing is authenticated:
/// this is what `inspect`, `pg status` and dependency scans read.
pub fn key_ref_prefix(format: u8, body: &[u8]) -> Option<(KeyRef, usize)> {
    let n = *body.first()? as usize;
    if n == 0 || n > crate::backend::MAX_KEY_NAME_LEN {
        return None;
    }
    let name = std::str::from_utf8(body.get(1..1 + n)?)
        .ok()
        .filter(|s| crate::backend::validate_key_name(s).is_ok())?;
    let (version, vlen) = if format == 2 {
        get_varint(body.get(1 + n..)?)?
    } else {
        (
            u32::from_be_bytes(body.get(1 + n..5 + n)?.try_into().ok()?),
            4,
        )
    };
    Some((
        KeyRef {
            name: name.to_string(),
            version,
        },
        1 + n + vlen,
    ))
}

/// The HMAC input whose output under the KDK of `kwk` is the v2 batch key.
pub fn batch_input_v2(kwk: &KeyRef, batch_salt: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(48 + kwk.name.len());
    put_bytes(&mut b, BATCH_DOMAIN_V2);
    put_bytes(&mut b, kwk.name.as_bytes());
    b.extend_from_slice(&kwk.version.to_be_bytes());
    b.extend_from_slice(batch_salt);
    b
}

type HmacSha256 = Hmac<Sha256>;

/// The value cipher of one v2 cell: AES-256-GCM under
/// HMAC-SHA256(batch key, CELL_DOMAIN | u32be cell index). `batch` is the
/// batch key's HMAC state (keyed once per batch, cloned per cell).
fn cell_cipher(batch: &HmacSha256, index: u32) -> Aes256Gcm {
    let mut mac = batch.clone();
    mac.update(CELL_DOMAIN);
    mac.update(&index.to_be_bytes());
    let mut key: [u8; 32] = mac.finalize().into_bytes().into();
    let cipher = Aes256Gcm::new(&key.into());
    key.zeroize();
    cipher
}

/// Decodes the text of a token of either version into `body` (cleared
/// first) and returns its version. Errors (kind Format) if it lacks a
/// prefix, is not canonical base64url, or is too short for its version.
pub fn decode_text(text: &[u8], body: &mut Vec<u8>) -> Result<u8> {
    body.clear();
    let (version, b64) = if let Some(b) = text.strip_prefix(PREFIX_V2) {
        (2, b)
    } else if let Some(b) = text.strip_prefix(PREFIX) {
        (1, b)
    } else {
        return Err(Error::format("not an hsmseal column token"));
    };
    if b64.len() > MAX_TOKEN_LEN {
        return Err(Error::format("malformed token: too long"));
    }
    URL_SAFE_NO_PAD
        .decode_vec(b64, body)
        .map_err(|_| Error::format("malformed token: invalid base64url"))?;
    if version == 2 {
        header_len_v2(body)?;
    } else {
        envelope_len(body)?;
    }
    Ok(version)
}

/// Appends the text of a v1 token with binary `body` to `out`.
pub fn encode_text(body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(PREFIX);
    encode_b64(body, out);
}

/// Appends the text of a token of `version` with binary `body` to `out`.
pub fn encode_text_version(version: u8, body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(if version == 2 { PREFIX_V2 } else { PREFIX });
    encode_b64(body, out);
}

/// Appends base64url (no padding) of `body` to `out`.
fn encode_b64(body: &[u8], out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + base64_len(body.len()), 0);
    let n = URL_SAFE_NO_PAD
        .encode_slice(body, &mut out[at..])
        .expect("buffer sized by base64_len");
    out.truncate(at + n);
}

/// A batch key ready for use.
enum BatchKind {
    /// v1: the batch key's AES-GCM instance (it encrypts the DEKs); boxed,
    /// as it is six times the size of the v2 state.
    V1(Box<Aes256Gcm>),
    /// v2: the batch key's HMAC state (it derives the cell keys).
    V2(HmacSha256),
}

/// A batch key ready for sealing, with the bytes every token of the batch
/// starts with (the v1 envelope, or the v2 header).
struct Batch {
    kind: BatchKind,
    head: Vec<u8>,
    /// The prefix and the base64 text of `head`'s first `3k` bytes: the
    /// same in every token of the batch, so it is encoded once (base64 of a
    /// multiple of 3 bytes does not depend on what follows).
    text_head: Vec<u8>,
}

/// Makes tokens. One per worker thread: it owns a CSPRNG seeded once from the
/// OS and the worker's current batch key. Tokens are v2 when the key version
/// has a KDK, v1 under a version made before token v2 (which has none).
pub struct Sealer<'a> {
    backend: &'a dyn KeyBackend,
    kwk: KeyRef,
    wrap_aad: Vec<u8>,
    rng: ChaCha20Rng,
    batch_size: u64,
    batch: Option<Batch>,
    used: u64,
    body: Vec<u8>,
    /// `Some(false)`: the version has no KDK (v1 tokens); `Some(true)`: it
    /// has one; `None`: not known before the first batch.
    v2: Option<bool>,
    /// Batch keys made (each one HSM call: a v2 derivation or a v1 wrap).
    pub batches: u64,
    /// Calls into the key backend.
    pub hsm_calls: u64,
}

impl<'a> Sealer<'a> {
    pub fn new(backend: &'a dyn KeyBackend, kwk: &KeyRef, batch_size: u64) -> Result<Self> {
        let rng = ChaCha20Rng::from_rng(rand::rngs::OsRng)
            .map_err(|e| Error::io(format!("cannot seed the random generator: {e}")))?;
        Ok(Sealer {
            backend,
            kwk: kwk.clone(),
            wrap_aad: wrap_aad(kwk),
            rng,
            // The bound is the v2 cell index's too (a token with an index
            // beyond it does not open): enforced here, not only by the CLI.
            batch_size: batch_size.clamp(1, MAX_BATCH_SIZE),
            batch: None,
            used: 0,
            body: Vec::with_capacity(512),
            v2: None,
            batches: 0,
            hsm_calls: 0,
        })
    }

    /// True if the key version has a KDK (the tokens are v2). The first
    /// call asks the backend: a v2 batch made by asking is kept for the
    /// next seal; a version without KDK costs no wrap here.
    pub fn writes_v2(&mut self) -> Result<bool> {
        if self.v2.is_none() {
            self.v2_batch()?;
        }
        Ok(self.v2 == Some(true))
    }

    /// Makes a v2 batch if the version has a KDK (true), else records that
    /// it has none (false). An answer of "no KDK" is no HSM operation (no
    /// object to sign with) and is not counted.
    fn v2_batch(&mut self) -> Result<bool> {
        let mut salt = [0u8; SALT_LEN];
        self.rng.fill_bytes(&mut salt);
        match self
            .backend
            .derive(&self.kwk, &batch_input_v2(&self.kwk, &salt))?
        {
            Some(key) => {
                self.hsm_calls += 1;
                let mut head =
                    Vec::with_capacity(1 + self.kwk.name.len() + MAX_VARINT_LEN + SALT_LEN);
                head.push(self.kwk.name.len() as u8);
                head.extend_from_slice(self.kwk.name.as_bytes());
                put_varint(&mut head, self.kwk.version);
                head.extend_from_slice(&salt);
                let mut text_head = Vec::new();
                encode_text_version(2, &head[..head.len() / 3 * 3], &mut text_head);
                let mac =
                    <HmacSha256 as Mac>::new_from_slice(key.expose()).expect("any key length");
                self.batch = Some(Batch {
                    kind: BatchKind::V2(mac),
                    head,
                    text_head,
                });
                self.v2 = Some(true);
                self.batches += 1;
                self.used = 0;
                Ok(true)
            }
            // The KDK vanished during the run: never fall back silently.
            None if self.v2 == Some(true) => Err(Error::key(format!(
                "the key-derivation key of {} disappeared during the run",
                self.kwk
            ))),
            None => {
                self.v2 = Some(false);
                Ok(false)
            }
        }
    }

    fn new_batch(&mut self) -> Result<()> {
        if self.v2 != Some(false) && self.v2_batch()? {
            return Ok(());
        }
        let key = SecretKey::generate(&mut self.rng);
        self.hsm_calls += 1;
        let wrapped = self.backend.wrap(&self.kwk, &key, &self.wrap_aad)?;
        let envelope = envelope_bytes(&self.kwk, &wrapped);
        let mut text_head = Vec::new();
        encode_text(&envelope[..envelope.len() / 3 * 3], &mut text_head);
        self.batch = Some(Batch {
            kind: BatchKind::V1(Box::new(Aes256Gcm::new(key.expose().into()))),
            head: envelope,
            text_head,
        });
        self.batches += 1;
        self.used = 0;
        Ok(())
    }

    /// Encrypts `value` with `flags` under binding `aad` and appends the
    /// token text to `out`.
    pub fn seal(&mut self, aad: &[u8], flags: u8, value: &[u8], out: &mut Vec<u8>) -> Result<()> {
        if value.len() > MAX_VALUE {
            return Err(Error::format(format!(
                "value of {} bytes is over the {} MiB limit per field",
                value.len(),
                MAX_VALUE >> 20
            )));
        }
        if self.batch.is_none() || self.used >= self.batch_size {
            self.new_batch()?;
        }
        // The cell's index within its batch: `used` counts the cells sealed
        // under this batch by this sealer, and a batch is made by one
        // sealer and never leaves it (a worker thread owns its sealer), so
        // no two cells of a batch get the same index, whatever the number
        // of workers; `batch_size` <= MAX_BATCH_SIZE bounds it.
        let index = self.used as u32;
        self.used += 1;
        let batch = self.batch.as_ref().expect("batch made above");
        // `body` holds the token body from byte 3k of the head on.
        let body = &mut self.body;
        body.clear();
        body.extend_from_slice(&batch.head[batch.head.len() / 3 * 3..]);
        match &batch.kind {
            BatchKind::V2(mac) => {
                put_varint(body, index);
                let at = body.len();
                body.push(flags);
                body.extend_from_slice(value);
                // One message per cell key: the all-zero nonce is never
                // reused under a key.
                let tag = cell_cipher(mac, index)
                    .encrypt_in_place_detached(&Nonce::default(), aad, &mut body[at..])
                    .map_err(|_| Error::format("encryption failed"))?;
                body.extend_from_slice(&tag);
            }
            BatchKind::V1(cipher) => {
                // DEK and its nonce in one draw from the worker's CSPRNG.
                let mut rnd = [0u8; 32 + NONCE_LEN];
                self.rng.fill_bytes(&mut rnd);
                body.extend_from_slice(&rnd[32..]);
                let at = body.len();
                body.extend_from_slice(&rnd[..32]);
                let tag = cipher
                    .encrypt_in_place_detached(Nonce::from_slice(&rnd[32..]), aad, &mut body[at..])
                    .map_err(|_| Error::format("encryption failed"))?;
                body.extend_from_slice(&tag);
                let at = body.len();
                body.push(flags);
                body.extend_from_slice(value);
                let dek = Aes256Gcm::new_from_slice(&rnd[..32]).expect("32-byte key");
                rnd.zeroize();
                // One message per DEK: the all-zero nonce is never reused under a key.
                let tag = dek
                    .encrypt_in_place_detached(&Nonce::default(), b"", &mut body[at..])
                    .map_err(|_| Error::format("encryption failed"))?;
                body.extend_from_slice(&tag);
            }
        }
        out.extend_from_slice(&batch.text_head);
        encode_b64(body, out);
        Ok(())
    }
}

/// A cache entry: filled by the first worker that needs it while the others
/// wait on its lock, so each distinct envelope costs one HSM round.
type CacheEntry<V> = Arc<Mutex<Option<V>>>;

/// Values derived from batch envelopes (an unwrapped batch cipher, or a
/// rewrapped envelope), shared by all workers, keyed by the envelope bytes
/// and bounded to [`BATCH_CACHE_ENTRIES`] (first in, first out). Evicted
/// batch ciphers are zeroized when their last user drops them.
pub struct EnvelopeCache<V> {
    inner: Mutex<CacheInner<V>>,
    calls: std::sync::atomic::AtomicU64,
}

struct CacheInner<V> {
    map: HashMap<Vec<u8>, CacheEntry<V>>,
    order: VecDeque<Vec<u8>>,
}

impl<V: Clone> Default for EnvelopeCache<V> {
    fn default() -> Self {
        EnvelopeCache {
            inner: Mutex::new(CacheInner {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            calls: Default::default(),
        }
    }
}

impl<V: Clone> EnvelopeCache<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// HSM calls made to fill this cache.
    pub fn hsm_calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The value for `envelope`, made by `init` (counted as `calls` HSM
    /// calls) the first time.
    fn get(&self, envelope: &[u8], calls: u64, init: impl FnOnce() -> Result<V>) -> Result<V> {
        let entry = {
            let mut inner = self.inner.lock().expect("envelope cache lock");
            if let Some(s) = inner.map.get(envelope) {
                s.clone()
            } else {
                if inner.order.len() >= BATCH_CACHE_ENTRIES {
                    if let Some(old) = inner.order.pop_front() {
                        inner.map.remove(&old);
                    }
                }
                let s = CacheEntry::default();
                inner.map.insert(envelope.to_vec(), s.clone());
                inner.order.push_back(envelope.to_vec());
                s
            }
        };
        let mut guard = entry.lock().expect("envelope cache entry lock");
        if let Some(v) = guard.as_ref() {
            return Ok(v.clone());
        }
        self.calls
            .fetch_add(calls, std::sync::atomic::Ordering::Relaxed);
        let v = init()?;
        *guard = Some(v.clone());
        Ok(v)
    }
}

/// A batch key for opening: the v1 batch cipher or the v2 HMAC state.
pub struct OpenKey(BatchKind);

/// Batch keys for decryption, keyed by the v1 envelope or the v2 header.
/// The two never collide: both start with the name length n, and a v1
/// envelope is n + 65 bytes long, a v2 header n + 14 to n + 18.
pub type BatchCache = EnvelopeCache<Arc<OpenKey>>;
/// What the workers of one `columns rewrap` run share: the new envelope
/// by old envelope (v1 to a version without KDK: one unwrap and one wrap
/// per distinct batch), the batch keys of the tokens it re-encrypts, and,
/// when each token goes to its own key, the current version of each key name.
#[derive(Default)]
pub struct RewrapCache {
    envelopes: EnvelopeCache<Arc<Vec<u8>>>,
    /// Batch keys of the tokens opened to be re-encrypted.
    opened: BatchCache,
    /// HSM calls of the workers' sealers (re-encrypted tokens).
    sealed: std::sync::atomic::AtomicU64,
    /// Looked up once per run under this lock, so every token of one key
    /// ends under one version even if the key is rotated during the run.
    current: Mutex<std::collections::BTreeMap<String, u32>>,
}

impl RewrapCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// HSM calls made to rewrap envelopes and re-encrypt tokens (version
    /// look-ups are not counted, as in [`KeyBackend::calls`]).
    pub fn hsm_calls(&self) -> u64 {
        self.envelopes.hsm_calls()
            + self.opened.hsm_calls()
            + self.sealed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The current version of `name`, the same for the whole run.
    fn current(&self, backend: &dyn KeyBackend, name: &str) -> Result<KeyRef> {
        let mut m = self.current.lock().expect("current versions lock");
        let version = match m.get(name) {
            Some(&v) => v,
            None => {
                let v = backend.current_version(name)?;
                m.insert(name.to_string(), v);
                v
            }
        };
        Ok(KeyRef {
            name: name.to_string(),
            version,
        })
    }

    /// The key versions tokens were taken to when each went to its own
    /// key (empty with a given target): every token the run wrote is under
    /// one of them.
    pub fn targets(&self) -> Vec<KeyRef> {
        let m = self.current.lock().expect("current versions lock");
        m.iter()
            .map(|(name, &version)| KeyRef {
                name: name.clone(),
                version,
            })
            .collect()
    }
}

/// Opens tokens of both versions. One per worker thread; remembers the last
/// batch it used so consecutive tokens of one batch skip the shared cache.
pub struct Opener<'a> {
    backend: &'a dyn KeyBackend,
    cache: &'a BatchCache,
    last: Option<(Vec<u8>, Arc<OpenKey>)>,
    body: Vec<u8>,
    /// Where the last opened value lies in `body`.
    value: std::ops::Range<usize>,
}

impl<'a> Opener<'a> {
    pub fn new(backend: &'a dyn KeyBackend, cache: &'a BatchCache) -> Self {
        Opener {
            backend,
            cache,
            last: None,
            body: Vec::with_capacity(512),
            value: 0..0,
        }
    }

    /// The value of the last token [`Opener::open`] opened successfully
    /// (empty before the first, and after a failed one).
    pub fn last_value(&self) -> &[u8] {
        &self.body[self.value.clone()]
    }

    /// Authenticates and decrypts the token `text` under binding `aad`.
    /// Returns the flags and the plaintext value (valid until the next call).
    pub fn open(&mut self, aad: &[u8], text: &[u8]) -> Result<(u8, &[u8])> {
        self.value = 0..0;
        let version = decode_text(text, &mut self.body)?;
        let hlen = if version == 2 {
            header_len_v2(&self.body)?
        } else {
            envelope_len(&self.body)?
        };
        let hit = matches!(&self.last, Some((e, _)) if e[..] == self.body[..hlen]);
        if !hit {
            let head = &self.body[..hlen];
            let backend = self.backend;
            let c = self.cache.get(head, 1, || {
                if version == 2 {
                    let kwk = parse_key_ref(2, head)?;
                    let key = backend
                        .derive(&kwk, &batch_input_v2(&kwk, &head[hlen - SALT_LEN..]))?
                        .ok_or_else(|| {
                            Error::key(format!(
                                "a version-2 token is under {kwk}, which has no key-derivation key on this token (destroyed, or {kwk} was made before token v2): it cannot be opened"
                            ))
                        })?;
                    let mac = <HmacSha256 as Mac>::new_from_slice(key.expose()).expect("any key length");
                    Ok(Arc::new(OpenKey(BatchKind::V2(mac))))
                } else {
                    let (kwk, wrapped) = parse_envelope(head)?;
                    let key = backend.unwrap(&kwk, &wrapped, &wrap_aad(&kwk))?;
                    Ok(Arc::new(OpenKey(BatchKind::V1(Box::new(
                        Aes256Gcm::new(key.expose().into()),
                    )))))
                }
            })?;
            self.last = Some((head.to_vec(), c));
        }
        let batch = &self.last.as_ref().expect("set above").1;
        let body = &mut self.body;
        let start = match &batch.0 {
            BatchKind::V2(mac) => {
                let (index, ilen) = cell_index(body, hlen)?;
                let cipher = cell_cipher(mac, index);
                let value_ct = &mut body[hlen + ilen..];
                let (pt, tag) = value_ct.split_at_mut(value_ct.len() - TAG_LEN);
                cipher
                    .decrypt_in_place_detached(&Nonce::default(), aad, pt, Tag::from_slice(tag))
                    .map_err(|_| auth_failed())?;
                hlen + ilen
            }
            BatchKind::V1(batch) => {
                let (nonce, rest) = body[hlen..].split_at_mut(NONCE_LEN);
                let (dek_ct, value_ct) = rest.split_at_mut(DEK_CT_LEN);
                let (dek, dek_tag) = dek_ct.split_at_mut(32);
                batch
                    .decrypt_in_place_detached(
                        Nonce::from_slice(nonce),
                        aad,
                        dek,
                        Tag::from_slice(dek_tag),
                    )
                    .map_err(|_| auth_failed())?;
                let cipher = Aes256Gcm::new_from_slice(dek).expect("32-byte key");
                dek.zeroize();
                let (pt, tag) = value_ct.split_at_mut(value_ct.len() - TAG_LEN);
                cipher
                    .decrypt_in_place_detached(&Nonce::default(), b"", pt, Tag::from_slice(tag))
                    .map_err(|_| auth_failed())?;
                hlen + NONCE_LEN + DEK_CT_LEN
            }
        };
        let flags = self.body[start];
        // Format codes 5-7 are unassigned: unknown, like unknown bits.
        if flags & !KNOWN_FLAGS != 0 || (flags & FORMAT_MASK) >> FORMAT_SHIFT > 5 {
            return Err(Error::format("token has unknown flags"));
        }
        let end = self.body.len() - TAG_LEN;
        self.value = start + 1..end;
        Ok((flags, &self.body[self.value.clone()]))
    }
}

/// The token version and key version of token `text` (nothing
/// authenticated).
pub fn token_key(text: &[u8]) -> Result<(u8, KeyRef)> {
    let mut body = Vec::new();
    let v = decode_text(text, &mut body)?;
    Ok((v, parse_key_ref(v, &body)?))
}

/// A rewrapped envelope, or `None` for one already under its target.
type Replacement = Option<Arc<Vec<u8>>>;

/// Moves tokens to a new KWK version (`columns rewrap`): to the given
/// target, or (`None`) each token to its own key's current version. One per
/// worker, sharing a [`RewrapCache`].
///
/// - A target version with a KDK gets v2 tokens: a v1 token (upgrade) or a
///   v2 token under another version is opened under its binding and sealed
///   again (v2 has no separable envelope); a v2 token already under the
///   target is copied as it is.
/// - A target version without a KDK (made before token v2) keeps v1: a v1
///   token's envelope alone is rewrapped (one unwrap and one wrap per
///   distinct batch, records copied), and a v2 token is re-encrypted as v1.
pub struct Rewrapper<'a> {
    backend: &'a dyn KeyBackend,
    target: Option<&'a KeyRef>,
    cache: &'a RewrapCache,
    /// The last v1 envelope seen and its replacement (`None`: already under
    /// its target, copied as it is).
    last: Option<(Vec<u8>, Replacement)>,
    body: Vec<u8>,
    opener: Opener<'a>,
    /// One sealer per target version met so far.
    sealers: Vec<Sealer<'a>>,
    batch_size: u64,
}

impl<'a> Rewrapper<'a> {
    pub fn new(
        backend: &'a dyn KeyBackend,
        target: Option<&'a KeyRef>,
        cache: &'a RewrapCache,
    ) -> Self {
        Self::with_batch_size(backend, target, cache, DEFAULT_BATCH_SIZE)
    }

    /// [`Self::new`] with the cells per batch key of re-encrypted tokens.
    pub fn with_batch_size(
        backend: &'a dyn KeyBackend,
        target: Option<&'a KeyRef>,
        cache: &'a RewrapCache,
        batch_size: u64,
    ) -> Self {
        Rewrapper {
            backend,
            target,
            cache,
            last: None,
            body: Vec::with_capacity(512),
            opener: Opener::new(backend, &cache.opened),
            sealers: Vec::new(),
            batch_size,
        }
    }

    /// The sealer for `target` and whether it writes v2 tokens.
    fn sealer(&mut self, target: &KeyRef) -> Result<(usize, bool)> {
        let i = match self.sealers.iter().position(|s| s.kwk == *target) {
            Some(i) => i,
            None => {
                self.sealers
                    .push(Sealer::new(self.backend, target, self.batch_size)?);
                self.sealers.len() - 1
            }
        };
        let s = &mut self.sealers[i];
        let before = s.hsm_calls;
        let v2 = s.writes_v2();
        self.cache
            .sealed
            .fetch_add(s.hsm_calls - before, std::sync::atomic::Ordering::Relaxed);
        Ok((i, v2?))
    }

    /// Appends to `out` token `text` (bound to `aad`) moved to the target
    /// version, and returns whether it changed. A token already in its
    /// final form is copied as it is, with no HSM call. A re-encrypted
    /// token is authenticated by opening it; a v1 envelope rewrap
    /// authenticates the batch key only (the records are copied), so
    /// `decrypt` remains the check.
    pub fn rewrap(&mut self, aad: &[u8], text: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        let version = decode_text(text, &mut self.body)?;
        let kwk = parse_key_ref(version, &self.body)?;
        let target = match self.target {
            Some(t) => t.clone(),
            None => self.cache.current(self.backend, &kwk.name)?,
        };
        // A v2 token under its target is final (its version has a KDK):
        // copied with no HSM call, so a second rotation costs nothing.
        if version == 2 && kwk == target {
            out.extend_from_slice(text);
            return Ok(false);
        }
        let (i, v2) = self.sealer(&target)?;
        if version == 2 || v2 {
            let (flags, _) = self.opener.open(aad, text)?;
            let s = &mut self.sealers[i];
            let before = s.hsm_calls;
            let r = s.seal(aad, flags, self.opener.last_value(), out);
            self.cache
                .sealed
                .fetch_add(s.hsm_calls - before, std::sync::atomic::Ordering::Relaxed);
            r?;
            return Ok(true);
        }
        self.rewrap_envelope(&target, text, out)
    }

    /// A v1 token to a v1 target: the envelope alone is rewrapped.
    fn rewrap_envelope(&mut self, target: &KeyRef, text: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        let elen = envelope_len(&self.body)?;
        let env = &self.body[..elen];
        let hit = matches!(&self.last, Some((e, _)) if e[..] == env[..]);
        if !hit {
            let (kwk, wrapped) = parse_envelope(env)?;
            let new = if kwk == *target {
                None
            } else {
                let backend = self.backend;
                Some(self.cache.envelopes.get(env, 2, || {
                    let key = backend.unwrap(&kwk, &wrapped, &wrap_aad(&kwk))?;
                    let new = backend.wrap(target, &key, &wrap_aad(target))?;
                    Ok(Arc::new(envelope_bytes(target, &new)))
                })?)
            };
            self.last = Some((env.to_vec(), new));
        }
        let Some(new) = &self.last.as_ref().expect("set above").1 else {
            out.extend_from_slice(text);
            return Ok(false);
        };
        let mut nbody = Vec::with_capacity(self.body.len() + 64);
        nbody.extend_from_slice(new);
        nbody.extend_from_slice(&self.body[elen..]);
        encode_text(&nbody, out);
        Ok(true)
    }
}

fn auth_failed() -> Error {
    Error::integrity(
        "token authentication failed: it was modified, or moved from another row, column or context",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    fn setup() -> (MemoryBackend, KeyRef) {
        let b = MemoryBackend::new();
        let v = b.add_version("pii");
        (
            b,
            KeyRef {
                name: "pii".into(),
                version: v,
            },
        )
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let (b, k) = setup();
        let mut s = Sealer::new(&b, &k, 10).unwrap();
        let pre = binding_prefix("app.users", &ColumnId::Name("ssn".into()));
        let mut aad = Vec::new();
        binding(&mut aad, &pre, Some(b"17"));
        let mut tok = Vec::new();
        s.seal(&aad, FLAG_QUOTED, b"123-45-6789", &mut tok).unwrap();
        assert!(tok.starts_with(PREFIX_V2));
        assert_eq!(tok.len(), token_len_v2(3, 11));
        let cache = BatchCache::new();
        let mut o = Opener::new(&b, &cache);
        let (f, v) = o.open(&aad, &tok).unwrap();
        assert_eq!((f, v), (FLAG_QUOTED, &b"123-45-6789"[..]));
        let mut other = Vec::new();
        binding(&mut other, &pre, Some(b"18"));
        assert!(o.open(&other, &tok).is_err());
        binding(&mut other, &pre, None);
        assert!(o.open(&other, &tok).is_err());
    }

    /// Exhaustive: every substitution by another base64url character, every
    /// deletion and every insertion, at every position of a token.
    #[test]
    fn every_single_character_change_is_rejected() {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let (b, k) = setup();
        let mut s = Sealer::new(&b, &k, 10).unwrap();
        let pre = binding_prefix("ctx", &ColumnId::Name("c".into()));
        let mut aad = Vec::new();
        binding(&mut aad, &pre, Some(b"1"));
        let mut tok = Vec::new();
        s.seal(&aad, 0, b"value", &mut tok).unwrap();
        let cache = BatchCache::new();
        let mut o = Opener::new(&b, &cache);
        assert!(o.open(&aad, &tok).is_ok());
        let mut tried = 0;
        for i in 0..=tok.len() {
            for &c in ALPHABET.iter().chain(b".") {
                if i < tok.len() && c != tok[i] {
                    let mut t = tok.clone();
                    t[i] = c;
                    assert!(o.open(&aad, &t).is_err(), "substitution {i} {}", c as char);
                    tried += 1;
                }
                let mut t = tok.clone();
                t.insert(i, c);
                assert!(o.open(&aad, &t).is_err(), "insertion {i} {}", c as char);
            }
            if i < tok.len() {
                let mut t = tok.clone();
                t.remove(i);
                assert!(o.open(&aad, &t).is_err(), "deletion {i}");
            }
        }
        assert!(tried > 60 * tok.len());
    }

    fn aad_for(ctx: &str, col: &str, row: Option<&[u8]>) -> Vec<u8> {
        let mut aad = Vec::new();
        binding(
            &mut aad,
            &binding_prefix(ctx, &ColumnId::Name(col.into())),
            row,
        );
        aad
    }

    fn seal_one(b: &MemoryBackend, k: &KeyRef, aad: &[u8], v: &[u8]) -> Vec<u8> {
        let mut s = Sealer::new(b, k, 10).unwrap();
        let mut tok = Vec::new();
        s.seal(aad, 0, v, &mut tok).unwrap();
        tok
    }

    /// FORMAT.md section 6: 11-byte SSN under "pii" is 67 characters in v2
    /// (56 of overhead), 213 in v1.
    #[test]
    fn v2_is_compact_and_v1_is_what_a_version_without_kdk_writes() {
        let b = MemoryBackend::new();
        let old = KeyRef {
            name: "pii".into(),
            version: b.add_version_without_kdk("pii"),
        };
        let new = KeyRef {
            name: "pii".into(),
            version: b.add_version("pii"),
        };
        let aad = aad_for("app.users", "ssn", Some(b"17"));
        let t1 = seal_one(&b, &old, &aad, b"123-45-6789");
        let t2 = seal_one(&b, &new, &aad, b"123-45-6789");
        assert!(t1.starts_with(PREFIX) && t2.starts_with(PREFIX_V2));
        assert_eq!((t1.len(), t2.len()), (213, 67));
        assert_eq!((token_len(3, 11), token_len_v2(3, 11)), (213, 67));
        assert!(looks_like_token(&t1) && looks_like_token(&t2));
        let cache = BatchCache::new();
        let mut o = Opener::new(&b, &cache);
        assert_eq!(o.open(&aad, &t1).unwrap().1, b"123-45-6789");
        assert_eq!(o.open(&aad, &t2).unwrap().1, b"123-45-6789");
        assert_eq!(token_key(&t2).unwrap(), (2, new.clone()));
        assert_eq!(token_key(&t1).unwrap(), (1, old));
    }

    /// A v2 token moved to another row, column or context, or with its
    /// header pointing at another key or version (re-encoded canonically,
    /// so only the cryptography can refuse it), does not open.
    #[test]
    fn v2_swaps_between_rows_columns_contexts_keys_and_versions_fail() {
        let b = MemoryBackend::new();
        let k1 = KeyRef {
            name: "pii".into(),
            version: b.add_version("pii"),
        };
        b.add_version("pii");
        b.add_version("pix");
        let aad = aad_for("app.users", "ssn", Some(b"17"));
        let tok = seal_one(&b, &k1, &aad, b"v");
        let cache = BatchCache::new();
        let mut o = Opener::new(&b, &cache);
        assert!(o.open(&aad, &tok).is_ok());
        for other in [
            aad_for("app.users", "ssn", Some(b"18")),
            aad_for("app.users", "ssn", None),
            aad_for("app.users", "email", Some(b"17")),
            aad_for("app.user", "ssn", Some(b"17")),
        ] {
            let e = o.open(&other, &tok).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Integrity);
        }
        let mut body = Vec::new();
        decode_text(&tok, &mut body).unwrap();
        let mut to_v2 = body.clone();
        to_v2[4] = 2; // version 1 -> 2 (a one-byte varint at byte 4)
        let mut to_pix = body.clone();
        to_pix[3] = b'x';
        // A v2 body under the v1 prefix is refused too (too short for v1).
        for (what, b2, version) in [("version", to_v2, 2), ("name", to_pix, 2), ("v1", body, 1)] {
            let mut t = Vec::new();
            encode_text_version(version, &b2, &mut t);
            assert!(o.open(&aad, &t).is_err(), "{what}");
        }
    }

    #[test]
    fn varints_are_minimal_leb128_within_u32() {
        for v in [0, 1, 127, 128, 300, 16_383, 16_384, 999_999, u32::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
            b.push(0x55); // what follows is not read
            assert_eq!(get_varint(&b), Some((v, varint_len(v))), "{v}");
        }
        assert_eq!(get_varint(&[0x7f]), Some((127, 1)));
        assert_eq!(get_varint(&[0x80, 0x01]), Some((128, 2)));
        for bad in [
            &[][..],
            &[0x80],                         // truncated
            &[0x81, 0x00],                   // non-minimal 1
            &[0x80, 0x80, 0x00],             // non-minimal 0
            &[0xff, 0xff, 0xff, 0xff, 0x10], // 2^32
            &[0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
        ] {
            assert_eq!(get_varint(bad), None, "{bad:02x?}");
        }
    }

    /// A v2 token body, its header length and where its cell index is.
    fn v2_parts(tok: &[u8]) -> (Vec<u8>, usize) {
        let mut body = Vec::new();
        assert_eq!(decode_text(tok, &mut body).unwrap(), 2);
        let n = body[0] as usize;
        let (_, vlen) = get_varint(&body[1 + n..]).unwrap();
        (body, 1 + n + vlen + SALT_LEN)
    }

    /// Seals `count` cells in batches of `batch`; returns the tokens.
    fn seal_many(
        b: &MemoryBackend,
        k: &KeyRef,
        aad: &[u8],
        batch: u64,
        count: usize,
    ) -> Vec<Vec<u8>> {
        let mut s = Sealer::new(b, k, batch).unwrap();
        (0..count)
            .map(|i| {
                let mut t = Vec::new();
                s.seal(aad, 0, format!("v{i}").as_bytes(), &mut t).unwrap();
                t
            })
            .collect()
    }

    /// The cell index counts 0, 1, 2 ... within a batch under one shared
    /// header (batch salt), and starts again at 0 under a new batch salt;
    /// indexes of 128 and more take two varint bytes.
    #[test]
    fn v2_cells_of_a_batch_share_the_header_and_count_up() {
        let (b, k) = setup();
        let aad = aad_for("c", "x", None);
        let toks = seal_many(&b, &k, &aad, 200, 400);
        let mut seen = std::collections::BTreeMap::<Vec<u8>, Vec<u32>>::new();
        for t in &toks {
            let (body, hlen) = v2_parts(t);
            let (i, ilen) = get_varint(&body[hlen..]).unwrap();
            assert_eq!(ilen, varint_len(i));
            seen.entry(body[..hlen].to_vec()).or_default().push(i);
        }
        assert_eq!(seen.len(), 2);
        for idx in seen.values() {
            assert_eq!(*idx, (0..200).collect::<Vec<u32>>());
        }
        assert_eq!(toks[0].len(), token_len_v2_at(3, 2, 1, 0));
        assert_eq!(toks[150].len(), token_len_v2_at(3, 4, 1, 150));
        let cache = BatchCache::new();
        let mut o = Opener::new(&b, &cache);
        assert_eq!(o.open(&aad, &toks[150]).unwrap().1, b"v150");
    }

    /// Edits a v2 token can get after sealing, each re-encoded as canonical
    /// base64 so only the parser or the cryptography can refuse it: another
    /// cell index, another version varint, non-minimal varints, an index
    /// at or over the batch bound, a truncated body. None opens.
    #[test]
    fn v2_edited_index_version_varints_and_truncation_are_rejected() {
        let (b, k) = setup();
        let aad = aad_for("c", "x", Some(b"1"));
        let toks = seal_many(&b, &k, &aad, 1000, 200);
        let cache = BatchCache::new();
        let mut o = Opener::new(&b, &cache);
        let (body, hlen) = v2_parts(&toks[5]);
        let vat = 1 + body[0] as usize;
        assert_eq!(&body[vat..vat + 1], &[1]);
        assert_eq!(body[hlen], 5);
        let with = |at: usize, len: usize, new: &[u8]| {
            let mut x = body[..at].to_vec();
            x.extend_from_slice(new);
            x.extend_from_slice(&body[at + len..]);
            let mut t = Vec::new();
            encode_text_version(2, &x, &mut t);
            t
        };
        let mut big = Vec::new();
        put_varint(&mut big, MAX_BATCH_SIZE as u32);
        let cases: Vec<(&str, Vec<u8>, crate::error::ErrorKind)> = vec![
            (
                "index 5 -> 6",
                with(hlen, 1, &[6]),
                crate::error::ErrorKind::Integrity,
            ),
            (
                "index 5 -> 133",
                with(hlen, 1, &[0x85, 0x01]),
                crate::error::ErrorKind::Integrity,
            ),
            (
                "index non-minimal",
                with(hlen, 1, &[0x85, 0x00]),
                crate::error::ErrorKind::Format,
            ),
            (
                "index at the bound",
                with(hlen, 1, &big),
                crate::error::ErrorKind::Format,
            ),
            (
                "version 1 -> 2",
                with(vat, 1, &[2]),
                crate::error::ErrorKind::Key,
            ),
            (
                "version non-minimal",
                with(vat, 1, &[0x81, 0x00]),
                crate::error::ErrorKind::Format,
            ),
            (
                "version over u32",
                with(vat, 1, &[0x81, 0x80, 0x80, 0x80, 0x10]),
                crate::error::ErrorKind::Format,
            ),
        ];
        for (what, t, kind) in cases {
            let e = o.open(&aad, &t).unwrap_err();
            assert_eq!(e.kind(), kind, "{what}: {e}");
        }
        // An unterminated index swallows the flags byte's ciphertext: a
        // bad varint or another key, refused either way.
        assert!(o.open(&aad, &with(hlen, 1, &[0x85])).is_err());
        // Truncated anywhere: too short or failing authentication, never opened.
        for len in 0..body.len() {
            let mut t = Vec::new();
            encode_text_version(2, &body[..len], &mut t);
            assert!(o.open(&aad, &t).is_err(), "truncated to {len}");
        }
        // The unedited token still opens (the cases above did not poison
        // the batch cache).
        assert_eq!(o.open(&aad, &toks[5]).unwrap().1, b"v5");
    }

    #[test]
    fn v2_under_a_destroyed_kdk_or_a_missing_version_fails_with_a_key_error() {
        let (b, k) = setup();
        let aad = aad_for("c", "x", None);
        let tok = seal_one(&b, &k, &aad, b"secret");
        b.remove_kdk(&k);
        let cache = BatchCache::new();
        let e = Opener::new(&b, &cache).open(&aad, &tok).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Key, "{e}");
        let other = MemoryBackend::new();
        let e = Opener::new(&other, &cache).open(&aad, &tok).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Key, "{e}");
    }

    #[test]
    fn every_single_character_change_of_a_v1_token_is_rejected() {
        let b = MemoryBackend::new();
        let k = KeyRef {
            name: "pii".into(),
            version: b.add_version_without_kdk("pii"),
        };
        let aad = aad_for("ctx", "c", Some(b"1"));
        let tok = seal_one(&b, &k, &aad, b"value");
        assert!(tok.starts_with(PREFIX));
        let cache = BatchCache::new();
        let mut o = Opener::new(&b, &cache);
        assert!(o.open(&aad, &tok).is_ok());
        for i in 0..tok.len() {
            for c in [b'A', b'z', b'0', b'_'] {
                if c != tok[i] {
                    let mut t = tok.clone();
                    t[i] = c;
                    assert!(o.open(&aad, &t).is_err(), "substitution {i}");
                }
            }
            let mut t = tok.clone();
            t.remove(i);
            assert!(o.open(&aad, &t).is_err(), "deletion {i}");
        }
    }

    #[test]
    fn rewrap_upgrades_v1_moves_v2_and_then_changes_nothing() {
        let b = MemoryBackend::new();
        let k1 = KeyRef {
            name: "pii".into(),
            version: b.add_version_without_kdk("pii"),
        };
        let aad = aad_for("", "c", None);
        let t1 = seal_one(&b, &k1, &aad, b"x");
        let k2 = KeyRef {
            name: "pii".into(),
            version: b.add_version("pii"),
        };
        let t2 = seal_one(&b, &k2, &aad, b"y");
        let k3 = KeyRef {
            name: "pii".into(),
            version: b.add_version("pii"),
        };
        let rc = RewrapCache::new();
        let cache = BatchCache::new();
        let mut o = Opener::new(&b, &cache);
        for target in [Some(&k3), None] {
            let mut r = Rewrapper::new(&b, target, &rc);
            for (t, v) in [(&t1, &b"x"[..]), (&t2, &b"y"[..])] {
                let mut out = Vec::new();
                assert!(r.rewrap(&aad, t, &mut out).unwrap());
                assert_eq!(token_key(&out).unwrap(), (2, k3.clone()));
                assert_eq!(o.open(&aad, &out).unwrap().1, v);
                let mut again = Vec::new();
                assert!(!r.rewrap(&aad, &out, &mut again).unwrap());
                assert_eq!(again, out);
                // Re-encryption opens the token: a wrong binding fails.
                let wrong = aad_for("", "d", None);
                assert!(r.rewrap(&wrong, t, &mut Vec::new()).is_err());
            }
        }
        // A v1 target (no KDK): a v1 token's envelope alone is rewrapped,
        // a v2 token is re-encrypted as v1.
        let k0 = KeyRef {
            name: "old".into(),
            version: b.add_version_without_kdk("old"),
        };
        let mut r = Rewrapper::new(&b, Some(&k0), &rc);
        for (t, v) in [(&t1, &b"x"[..]), (&t2, &b"y"[..])] {
            let mut out = Vec::new();
            assert!(r.rewrap(&aad, t, &mut out).unwrap());
            assert_eq!(token_key(&out).unwrap(), (1, k0.clone()));
            assert_eq!(o.open(&aad, &out).unwrap().1, v);
        }
        let mut out = Vec::new();
        r.rewrap(&aad, &t1, &mut out).unwrap();
        let (mut a, mut c) = (Vec::new(), Vec::new());
        decode_text(&t1, &mut a).unwrap();
        decode_text(&out, &mut c).unwrap();
        let record = |x: &[u8]| x[1 + x[0] as usize + 4 + 12 + 48..].to_vec();
        assert_eq!(record(&a), record(&c), "envelope rewrap keeps the record");
    }
}
