//! The hsmseal v1 file header: 1024 bytes in front of the payload.
//!
//! Layout (all integers big-endian; full specification in docs/FORMAT.md):
//!
//! ```text
//!   0..64     prefix: magic "\x89HSMSEAL", version=1, header_len=1024,
//!             envelope_count=2, envelope_len=256, payload_scheme=1, zeros
//!  64..256    zero
//! 256..512    envelope 0
//! 512..768    envelope 1
//! 768..1024   zero
//! ```
//!
//! An envelope is a sequence number, the KWK's name and version, the GCM IV
//! and the wrapped data key, and a SHA-256 checksum of the envelope; each of
//! the two places for one is either empty (zeros) or holds one. Each sits in
//! its own 512-byte sector, so a rewrap can write a new envelope into the
//! idle place, fsync, then clear the old one: whenever the process dies, at
//! least one complete envelope remains (see FORMAT.md, "Rewrapping"). The
//! reader uses the valid envelope with the highest sequence number.
//!
//! Invariants: every byte of the header is either authenticated by the GCM
//! wrap (prefix, key name, key version, via the AAD; IV and wrapped key by
//! the tag), covered by the envelope checksum (sequence number), or required to
//! be zero. So any change to any header byte is rejected. The checksum only
//! detects accidents (torn writes); security comes from the GCM tag.

use crate::backend::{KeyRef, WrappedKey, MAX_KEY_NAME_LEN, WRAPPED_KEY_LEN, WRAP_IV_LEN};
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};

pub const MAGIC: [u8; 8] = *b"\x89HSMSEAL";
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 1024;
pub const PREFIX_LEN: usize = 64;
pub const ENVELOPE_COUNT: usize = 2;
pub const ENVELOPE_LEN: usize = 256;
/// Byte offset of each envelope in the header.
pub const ENVELOPE_OFFSETS: [usize; ENVELOPE_COUNT] = [256, 512];
/// Payload scheme 1 = C2SP chunked encryption v1, Cobblestone-256.
pub const PAYLOAD_SCHEME_COBBLESTONE_256: u16 = 1;

// Offsets inside an envelope.
const SEQ: usize = 0;
const NAME_LEN: usize = 8;
const NAME: usize = 9;
const VERSION: usize = NAME + MAX_KEY_NAME_LEN; // 73
const IV: usize = VERSION + 4; // 77
const WRAPPED: usize = IV + WRAP_IV_LEN; // 89
const RESERVED: usize = WRAPPED + WRAPPED_KEY_LEN; // 137
const CHECKSUM: usize = 224;

/// Domain separation for the DEK wrap's AAD.
const DEK_AAD_LABEL: &[u8] = b"hsmseal file DEK v1\0";
/// Domain separation for the payload's chunked-encryption context.
const PAYLOAD_CONTEXT_LABEL: &[u8] = b"hsmseal file payload v1\0";

/// One envelope: which KWK wrapped the file's data key, the wrapped key, and
/// the sequence number that says which of two envelopes is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub seq: u64,
    pub kwk: KeyRef,
    pub wrapped: WrappedKey,
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The two envelope places as stored (None = empty).
    pub envelopes: [Option<Envelope>; ENVELOPE_COUNT],
}

/// The fixed 64-byte prefix of every v1 header.
pub fn prefix() -> [u8; PREFIX_LEN] {
    let mut p = [0u8; PREFIX_LEN];
    p[0..8].copy_from_slice(&MAGIC);
    p[8..10].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    p[10..12].copy_from_slice(&(HEADER_LEN as u16).to_be_bytes());
    p[12..14].copy_from_slice(&(ENVELOPE_COUNT as u16).to_be_bytes());
    p[14..16].copy_from_slice(&(ENVELOPE_LEN as u16).to_be_bytes());
    p[16..18].copy_from_slice(&PAYLOAD_SCHEME_COBBLESTONE_256.to_be_bytes());
    p
}

/// AAD for wrapping a file's DEK under `kwk`: binds the wrapped key to the
/// file format version and to the key name and version recorded beside it.
pub fn dek_aad(kwk: &KeyRef) -> Vec<u8> {
    let mut aad = Vec::with_capacity(DEK_AAD_LABEL.len() + PREFIX_LEN + 1 + kwk.name.len() + 4);
    aad.extend_from_slice(DEK_AAD_LABEL);
    aad.extend_from_slice(&prefix());
    aad.push(kwk.name.len() as u8);
    aad.extend_from_slice(kwk.name.as_bytes());
    aad.extend_from_slice(&kwk.version.to_be_bytes());
    aad
}

/// The chunked-encryption context of the payload. It depends only on the
/// format, never on the envelope, so rotation can change the envelope
/// without touching the payload.
pub fn payload_context() -> Vec<u8> {
    let mut c = PAYLOAD_CONTEXT_LABEL.to_vec();
    c.extend_from_slice(&prefix());
    c
}

/// True if `bytes` start with the hsmseal magic (used to skip or recognise
/// already-encrypted files).
pub fn looks_like_hsmseal(bytes: &[u8]) -> bool {
    bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] == MAGIC
}

/// How many leading bytes `damage_evidence` looks at: up to the end of
/// envelope 1.
pub const SNIFF_LEN: usize = ENVELOPE_OFFSETS[1] + ENVELOPE_LEN;

/// For a file that does not start with the magic: evidence, from its first
/// `SNIFF_LEN` bytes (fewer if it is shorter), that it is an hsmseal file
/// whose header was damaged, so that a bulk run reports it instead of
/// passing it over as some other file (issue 9). Evidence is either:
/// - the 18 bytes of magic and layout fields differ from the v1 prefix in
///   at most 2 places (random data does so with probability below 2^-120,
///   and text never: the fields hold 0x89 and zero bytes), or the file is
///   4 to 17 bytes long and all of them are the prefix's (a truncation);
/// - or an envelope place holds an envelope with a correct SHA-256 checksum.
pub fn damage_evidence(head: &[u8]) -> Option<String> {
    const FIELDS: usize = 18;
    let p = prefix();
    let n = head.len().min(FIELDS);
    let differ: Vec<String> = (0..n)
        .filter(|&i| head[i] != p[i])
        .map(|i| i.to_string())
        .collect();
    if n == FIELDS && differ.len() <= 2 {
        return Some(format!(
            "an hsmseal file with a damaged header: byte {} of its first {FIELDS} differ{} from the hsmseal v1 prefix",
            differ.join(" and "),
            if differ.len() == 1 { "s" } else { "" }
        ));
    }
    if (4..FIELDS).contains(&head.len()) && differ.is_empty() {
        return Some(format!("an hsmseal file truncated to {} bytes", head.len()));
    }
    for (i, off) in ENVELOPE_OFFSETS.iter().enumerate() {
        if let Some(bytes) = head.get(*off..*off + ENVELOPE_LEN) {
            if let Ok(Some(_)) = decode_envelope(bytes) {
                return Some(format!(
                    "an hsmseal file with a damaged header: bad magic or layout bytes, but key envelope {i} is intact"
                ));
            }
        }
    }
    None
}

impl Header {
    /// A new header with one envelope, in place 0.
    pub fn new(kwk: KeyRef, wrapped: WrappedKey) -> Header {
        Header {
            envelopes: [
                Some(Envelope {
                    seq: 1,
                    kwk,
                    wrapped,
                }),
                None,
            ],
        }
    }

    /// The envelope in force and its place: the one with the highest
    /// sequence number.
    pub fn active(&self) -> (usize, &Envelope) {
        let mut best: Option<(usize, &Envelope)> = None;
        for (i, s) in self.envelopes.iter().enumerate() {
            if let Some(s) = s {
                if best.is_none_or(|(_, b)| s.seq > b.seq) {
                    best = Some((i, s));
                }
            }
        }
        best.expect("a parsed header has at least one envelope")
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..PREFIX_LEN].copy_from_slice(&prefix());
        for (i, envelope) in self.envelopes.iter().enumerate() {
            if let Some(s) = envelope {
                let off = ENVELOPE_OFFSETS[i];
                h[off..off + ENVELOPE_LEN].copy_from_slice(&encode_envelope(s));
            }
        }
        h
    }

    /// Parses and checks a header. Errors are `ErrorKind::Format` for
    /// something that is not an hsmseal v1 file and `ErrorKind::Integrity`
    /// for a v1 header that was damaged.
    pub fn parse(h: &[u8]) -> Result<Header> {
        if h.len() < MAGIC.len() || h[..MAGIC.len()] != MAGIC {
            return Err(Error::format("not an hsmseal file (bad magic bytes)"));
        }
        if h.len() < PREFIX_LEN {
            return Err(Error::integrity("truncated header"));
        }
        let version = u16::from_be_bytes([h[8], h[9]]);
        if version != FORMAT_VERSION {
            return Err(Error::format(format!(
                "unsupported hsmseal format version {version} (this hsmseal reads version {FORMAT_VERSION}; upgrade hsmseal)"
            )));
        }
        if h[..PREFIX_LEN] != prefix() {
            return Err(Error::integrity(
                "header prefix is damaged (unexpected layout fields or non-zero reserved bytes)",
            ));
        }
        if h.len() < HEADER_LEN {
            return Err(Error::integrity(format!(
                "truncated header ({} of {HEADER_LEN} bytes)",
                h.len()
            )));
        }
        let h = &h[..HEADER_LEN];
        // Everything outside the prefix and the envelopes must be zero.
        let mut reserved_ok = h[PREFIX_LEN..ENVELOPE_OFFSETS[0]].iter().all(|&b| b == 0);
        reserved_ok &= h[ENVELOPE_OFFSETS[1] + ENVELOPE_LEN..]
            .iter()
            .all(|&b| b == 0);
        if !reserved_ok {
            return Err(Error::integrity(
                "header is damaged (non-zero reserved bytes)",
            ));
        }
        let mut envelopes: [Option<Envelope>; ENVELOPE_COUNT] = [None, None];
        for (i, off) in ENVELOPE_OFFSETS.iter().enumerate() {
            envelopes[i] = decode_envelope(&h[*off..*off + ENVELOPE_LEN]).map_err(|m| {
                Error::integrity(format!("header key envelope {i} is damaged: {m}"))
            })?;
        }
        match (&envelopes[0], &envelopes[1]) {
            (None, None) => Err(Error::integrity(
                "header has no key envelope (both places empty)",
            )),
            (Some(a), Some(b)) if a.seq == b.seq => Err(Error::integrity(
                "header is damaged (two envelopes with the same sequence number)",
            )),
            _ => Ok(Header { envelopes }),
        }
    }
}

/// Encodes one envelope, checksum included.
pub fn encode_envelope(s: &Envelope) -> [u8; ENVELOPE_LEN] {
    let mut b = [0u8; ENVELOPE_LEN];
    b[SEQ..SEQ + 8].copy_from_slice(&s.seq.to_be_bytes());
    b[NAME_LEN] = s.kwk.name.len() as u8;
    b[NAME..NAME + s.kwk.name.len()].copy_from_slice(s.kwk.name.as_bytes());
    b[VERSION..VERSION + 4].copy_from_slice(&s.kwk.version.to_be_bytes());
    b[IV..IV + WRAP_IV_LEN].copy_from_slice(&s.wrapped.iv);
    b[WRAPPED..WRAPPED + WRAPPED_KEY_LEN].copy_from_slice(&s.wrapped.ciphertext);
    let sum = Sha256::digest(&b[..CHECKSUM]);
    b[CHECKSUM..].copy_from_slice(&sum);
    b
}

/// Decodes one envelope place: `Ok(None)` for an all-zero (empty) one.
fn decode_envelope(b: &[u8]) -> std::result::Result<Option<Envelope>, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let sum = Sha256::digest(&b[..CHECKSUM]);
    if sum.as_slice() != &b[CHECKSUM..ENVELOPE_LEN] {
        return Err("checksum mismatch".into());
    }
    let seq = u64::from_be_bytes(b[SEQ..SEQ + 8].try_into().expect("8 bytes"));
    let name_len = b[NAME_LEN] as usize;
    if seq == 0 || name_len == 0 || name_len > MAX_KEY_NAME_LEN {
        return Err("bad sequence number or key name length".into());
    }
    if b[NAME + name_len..VERSION].iter().any(|&x| x != 0)
        || b[RESERVED..CHECKSUM].iter().any(|&x| x != 0)
    {
        return Err("non-zero padding".into());
    }
    let name = std::str::from_utf8(&b[NAME..NAME + name_len])
        .map_err(|_| "key name is not UTF-8".to_string())?;
    crate::backend::validate_key_name(name).map_err(|_| "invalid key name".to_string())?;
    let version = u32::from_be_bytes(b[VERSION..VERSION + 4].try_into().expect("4 bytes"));
    if version == 0 {
        return Err("key version 0".into());
    }
    let mut iv = [0u8; WRAP_IV_LEN];
    iv.copy_from_slice(&b[IV..IV + WRAP_IV_LEN]);
    let mut ciphertext = [0u8; WRAPPED_KEY_LEN];
    ciphertext.copy_from_slice(&b[WRAPPED..WRAPPED + WRAPPED_KEY_LEN]);
    Ok(Some(Envelope {
        seq,
        kwk: KeyRef {
            name: name.to_string(),
            version,
        },
        wrapped: WrappedKey { iv, ciphertext },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header::new(
            KeyRef {
                name: "backups".into(),
                version: 3,
            },
            WrappedKey {
                iv: [1; 12],
                ciphertext: [2; 48],
            },
        )
    }

    #[test]
    fn round_trip_and_layout() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(&b[..8], b"\x89HSMSEAL");
        assert_eq!(&b[8..10], &[0, 1]);
        assert_eq!(u16::from_be_bytes([b[10], b[11]]), 1024);
        assert_eq!(Header::parse(&b).unwrap(), h);
        assert_eq!(b[256 + 8], 7); // name length
        assert_eq!(&b[256 + 9..256 + 16], b"backups");
        assert_eq!(&b[256 + 73..256 + 77], &3u32.to_be_bytes());
        assert!(b[512..].iter().all(|&x| x == 0));
    }

    #[test]
    fn every_bit_flip_is_rejected_without_hsm() {
        let b = sample().to_bytes();
        for i in 0..HEADER_LEN * 8 {
            let mut c = b;
            c[i / 8] ^= 1 << (i % 8);
            // Bits of the IV and wrapped key are caught by the GCM tag, not
            // the parser; everything else must fail here.
            let in_wrap = (256 + IV..256 + RESERVED).contains(&(i / 8));
            if !in_wrap {
                assert!(Header::parse(&c).is_err(), "bit {i} accepted");
            }
        }
    }

    #[test]
    fn highest_sequence_wins_and_equal_sequences_are_rejected() {
        let mut h = sample();
        let newer = Envelope {
            seq: 2,
            kwk: KeyRef {
                name: "backups".into(),
                version: 4,
            },
            wrapped: WrappedKey {
                iv: [3; 12],
                ciphertext: [4; 48],
            },
        };
        h.envelopes[1] = Some(newer.clone());
        let p = Header::parse(&h.to_bytes()).unwrap();
        assert_eq!(p.active(), (1, &newer));
        h.envelopes[1].as_mut().unwrap().seq = 1;
        assert!(Header::parse(&h.to_bytes()).is_err());
    }

    #[test]
    fn damage_evidence_finds_damaged_headers_and_nothing_else() {
        let b = sample().to_bytes();
        let mut one = b;
        one[0] ^= 0x01;
        assert!(damage_evidence(&one[..SNIFF_LEN])
            .unwrap()
            .contains("byte 0 of"));
        let mut two = b;
        two[3] = b'x';
        two[12] = 9;
        assert!(damage_evidence(&two).unwrap().contains("byte 3 and 12"));
        // The whole prefix gone, envelope 0 intact.
        let mut wiped = b;
        wiped[..64].fill(0);
        assert!(damage_evidence(&wiped).unwrap().contains("envelope 0"));
        // A truncation inside the magic.
        assert!(damage_evidence(&b[..5]).unwrap().contains("truncated to 5"));
        // Three wrong bytes and no envelope: no evidence.
        let mut three = b;
        three[..3].copy_from_slice(b"abc");
        assert!(damage_evidence(&three[..256]).is_none());
        // Other files.
        for other in [
            &b""[..],
            b"\x89HS",
            b"hello world, this is text",
            b"xHSMSEAL and more text after it",
            &[0u8; 1024][..],
            &[0xffu8; 768][..],
        ] {
            assert!(damage_evidence(other).is_none(), "{other:?}");
        }
    }

    #[test]
    fn truncations_and_foreign_files_are_rejected() {
        let b = sample().to_bytes();
        for n in 0..HEADER_LEN {
            assert!(Header::parse(&b[..n]).is_err(), "length {n}");
        }
        assert_eq!(
            Header::parse(b"hello world").unwrap_err().kind(),
            crate::error::ErrorKind::Format
        );
    }
}
