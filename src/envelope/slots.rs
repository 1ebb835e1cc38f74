//! The hsmseal v2 file header: one data key (DEK) wrapped several times,
//! once per key-wrapping key or recipient ("slots"), so one file opens
//! under any of them (issue 12).
//!
//! Layout (all integers big-endian; full specification in docs/FORMAT.md
//! section 3.3):
//!
//! ```text
//!   0..64          prefix: magic, version=2, header_len, slot_count n,
//!                  slot_len=768, payload_scheme=1, zeros
//!  64..512         zero
//! 512..512+P       place A  (P = place length, a multiple of 512)
//! 512+P..512+2P    place B
//! ```
//!
//! A place is either empty (all zeros) or holds the whole slot set: a
//! sequence number, the n slots and a SHA-256 checksum of the place. A
//! header-only rewrap writes the new slot set into the idle place, fsyncs,
//! clears the old place, fsyncs. A place spans several sectors, so a crash
//! can leave it torn: the reader uses the valid place with the higher
//! sequence number and ignores an invalid (damaged) place only when the
//! other place is valid.
//!
//! Invariants: every header byte is authenticated by a slot's GCM wrap
//! (prefix and the slot's own fields, through the AAD; IV and wrapped DEK
//! through the tag), covered by the place checksum (sequence number), or
//! required to be zero. The checksum detects torn writes; security comes
//! from the GCM tags and the payload's key commitment (an intact slot of
//! another file unwraps to another DEK, which the commitment refuses).

use crate::backend::WRAP_IV_LEN;
use crate::backend::{validate_key_name, KeyRef, WrappedKey, MAX_KEY_NAME_LEN, WRAPPED_KEY_LEN};
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};

pub use super::header::MAGIC;
use super::header::{PAYLOAD_SCHEME_COBBLESTONE_256, PREFIX_LEN};

pub const FORMAT_VERSION: u16 = 2;
/// Bytes of one slot.
pub const SLOT_LEN: usize = 768;
/// Most slots one file may have.
pub const MAX_SLOTS: usize = 16;
/// Where place A starts (the prefix's sector and the rest of the first
/// 512 bytes stay apart from the places).
pub const PLACES_OFFSET: usize = 512;
/// Bytes of the place header (sequence number and zeros) before the slots.
const PLACE_HEAD: usize = 32;
/// Largest public-key ciphertext a slot holds (RSA-4096).
pub const MAX_TRANSPORT_LEN: usize = 512;
/// The public-key field of a kind-3 slot: an uncompressed P-256 point.
pub const EC_POINT_LEN: usize = 65;

// Offsets inside a slot.
const KIND: usize = 0;
const NAME_LEN: usize = 1;
const NAME: usize = 2;
const VERSION: usize = NAME + MAX_KEY_NAME_LEN; // 66
const HASH: usize = VERSION + 4; // 70
const FINGERPRINT: usize = HASH + 2; // 72
const TRANSPORT_LEN: usize = FINGERPRINT + 32; // 104
const TRANSPORT: usize = TRANSPORT_LEN + 2; // 106
const IV: usize = TRANSPORT + MAX_TRANSPORT_LEN; // 618
const WRAPPED: usize = IV + WRAP_IV_LEN; // 630
const RESERVED: usize = WRAPPED + WRAPPED_KEY_LEN; // 678

/// Domain separation for a slot's DEK wrap.
const DEK_AAD_LABEL: &[u8] = b"hsmseal file DEK v2\0";
/// Domain separation for the payload's chunked-encryption context.
const PAYLOAD_CONTEXT_LABEL: &[u8] = b"hsmseal file payload v2\0";

/// What protects a slot's DEK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// Kind 1: AES-256-GCM under a KWK in the HSM (`C_Encrypt`), as v1.
    Aes,
    /// Kind 2: an RSA-OAEP public key.
    RsaOaep,
    /// Kind 3: an EC-P256 public key (ephemeral-static ECDH, HKDF).
    EcP256,
}

impl SlotKind {
    pub fn code(self) -> u8 {
        match self {
            SlotKind::Aes => 1,
            SlotKind::RsaOaep => 2,
            SlotKind::EcP256 => 3,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SlotKind::Aes => "aes",
            SlotKind::RsaOaep => "rsa-oaep",
            SlotKind::EcP256 => "ec-p256",
        }
    }
}

/// The OAEP hash of a public-key slot (the MGF1 hash is the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OaepHash {
    Sha1,
    Sha256,
}

impl OaepHash {
    pub fn code(self) -> u8 {
        match self {
            OaepHash::Sha1 => 1,
            OaepHash::Sha256 => 2,
        }
    }
    pub fn from_code(c: u8) -> Option<OaepHash> {
        match c {
            1 => Some(OaepHash::Sha1),
            2 => Some(OaepHash::Sha256),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            OaepHash::Sha1 => "sha1",
            OaepHash::Sha256 => "sha256",
        }
    }
}

/// One wrapped copy of the file's DEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub kind: SlotKind,
    pub kwk: KeyRef,
    /// Public-key slots: the OAEP hash and SHA-256 of the key's SPKI DER.
    pub oaep: Option<OaepHash>,
    pub fingerprint: [u8; 32],
    /// Public-key slots: RSA-OAEP ciphertext of the 32-byte slot key
    /// (kind 2), or the ephemeral P-256 point, uncompressed (kind 3).
    pub transport: Vec<u8>,
    /// The DEK under AES-256-GCM: by the KWK in the HSM (kind 1) or by the
    /// slot key (kind 2), with [`dek_aad`].
    pub wrapped: WrappedKey,
}

impl Slot {
    /// An AES-KWK slot.
    pub fn aes(kwk: KeyRef, wrapped: WrappedKey) -> Slot {
        Slot {
            kind: SlotKind::Aes,
            kwk,
            oaep: None,
            fingerprint: [0; 32],
            transport: Vec::new(),
            wrapped,
        }
    }

    /// Slot bytes 0..TRANSPORT plus the transport ciphertext: everything
    /// the AAD binds (all but the IV and the wrapped key).
    fn bound_fields(&self) -> Vec<u8> {
        let b = encode_slot(self);
        let mut v = b[..TRANSPORT].to_vec();
        v.extend_from_slice(&self.transport);
        v
    }

    /// "aes backups v3" / "rsa-oaep dr v1 (sha256:ab12…)", for messages.
    pub fn describe(&self) -> String {
        match self.kind {
            SlotKind::Aes => format!("aes key {}", self.kwk),
            SlotKind::RsaOaep => format!(
                "rsa-oaep key {} (fingerprint sha256:{})",
                self.kwk,
                hex(&self.fingerprint[..8])
            ),
            SlotKind::EcP256 => format!(
                "ec-p256 key {} (fingerprint sha256:{})",
                self.kwk,
                hex(&self.fingerprint[..8])
            ),
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One place's content: the slot set in force and its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub seq: u64,
    pub slots: Vec<Slot>,
}

/// A parsed v2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header2 {
    pub slot_count: usize,
    /// Places A and B as found: `None` empty, `Some(Err)` damaged.
    pub places: [Option<std::result::Result<Place, String>>; 2],
}

/// Length of one place for `n` slots.
pub fn place_len(n: usize) -> usize {
    (PLACE_HEAD + n * SLOT_LEN + 32).div_ceil(512) * 512
}

/// Header length for `n` slots.
pub fn header_len(n: usize) -> usize {
    PLACES_OFFSET + 2 * place_len(n)
}

/// Byte offset of place `i` (0 = A, 1 = B).
pub fn place_offset(n: usize, i: usize) -> usize {
    PLACES_OFFSET + i * place_len(n)
}

/// The 64-byte prefix of a v2 header with `n` slots.
pub fn prefix(n: usize) -> [u8; PREFIX_LEN] {
    let mut p = [0u8; PREFIX_LEN];
    p[0..8].copy_from_slice(&MAGIC);
    p[8..10].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    p[10..12].copy_from_slice(&(header_len(n) as u16).to_be_bytes());
    p[12..14].copy_from_slice(&(n as u16).to_be_bytes());
    p[14..16].copy_from_slice(&(SLOT_LEN as u16).to_be_bytes());
    p[16..18].copy_from_slice(&PAYLOAD_SCHEME_COBBLESTONE_256.to_be_bytes());
    p
}

/// AAD of a slot's DEK wrap: the file's prefix (format, slot count) and
/// every slot field but the IV and the wrapped key (kind, key name,
/// version, OAEP hash, fingerprint, public-key ciphertext).
pub fn dek_aad(n: usize, slot: &Slot) -> Vec<u8> {
    let mut aad = DEK_AAD_LABEL.to_vec();
    aad.extend_from_slice(&prefix(n));
    aad.extend_from_slice(&slot.bound_fields());
    aad
}

/// The payload's chunked-encryption context: the prefix, never a slot, so
/// slots can be rewritten without touching the payload.
pub fn payload_context(n: usize) -> Vec<u8> {
    let mut c = PAYLOAD_CONTEXT_LABEL.to_vec();
    c.extend_from_slice(&prefix(n));
    c
}

/// The slot count and header length a v2 prefix announces, checked.
/// `Err` is a `Format` or `Integrity` error as for [`Header2::parse`].
pub fn parse_prefix(h: &[u8]) -> Result<usize> {
    if h.len() < PREFIX_LEN {
        return Err(Error::integrity("truncated header"));
    }
    let n = u16::from_be_bytes([h[12], h[13]]) as usize;
    if !(1..=MAX_SLOTS).contains(&n) || h[..PREFIX_LEN] != prefix(n) {
        return Err(Error::integrity(
            "header prefix is damaged (unexpected layout fields or non-zero reserved bytes)",
        ));
    }
    Ok(n)
}

impl Header2 {
    /// A new header: the slots in place A with sequence 1, place B empty.
    pub fn new(slots: Vec<Slot>) -> Header2 {
        Header2 {
            slot_count: slots.len(),
            places: [Some(Ok(Place { seq: 1, slots })), None],
        }
    }

    pub fn len(&self) -> usize {
        header_len(self.slot_count)
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The place in force and its index: the valid one with the higher
    /// sequence number.
    pub fn active(&self) -> (usize, &Place) {
        let mut best: Option<(usize, &Place)> = None;
        for (i, p) in self.places.iter().enumerate() {
            if let Some(Ok(p)) = p {
                if best.is_none_or(|(_, b)| p.seq > b.seq) {
                    best = Some((i, p));
                }
            }
        }
        best.expect("a parsed v2 header has a valid place")
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.slot_count;
        let mut h = vec![0u8; header_len(n)];
        h[..PREFIX_LEN].copy_from_slice(&prefix(n));
        for (i, p) in self.places.iter().enumerate() {
            if let Some(Ok(p)) = p {
                let off = place_offset(n, i);
                h[off..off + place_len(n)].copy_from_slice(&encode_place(n, p));
            }
        }
        h
    }

    /// Parses and checks a v2 header (`h` starts with the magic and
    /// version 2). `Integrity` errors for a damaged or truncated one.
    pub fn parse(h: &[u8]) -> Result<Header2> {
        let n = parse_prefix(h)?;
        let len = header_len(n);
        if h.len() < len {
            return Err(Error::integrity(format!(
                "truncated header ({} of {len} bytes)",
                h.len()
            )));
        }
        if h[PREFIX_LEN..PLACES_OFFSET].iter().any(|&b| b != 0) {
            return Err(Error::integrity(
                "header is damaged (non-zero reserved bytes)",
            ));
        }
        let mut places = [None, None];
        for (i, place) in places.iter_mut().enumerate() {
            let off = place_offset(n, i);
            *place = decode_place(n, &h[off..off + place_len(n)]);
        }
        match (&places[0], &places[1]) {
            (Some(Ok(a)), Some(Ok(b))) if a.seq == b.seq => Err(Error::integrity(
                "header is damaged (two slot places with the same sequence number)",
            )),
            (Some(Ok(_)), _) | (_, Some(Ok(_))) => Ok(Header2 {
                slot_count: n,
                places,
            }),
            (a, b) => {
                let why = |p: &Option<std::result::Result<Place, String>>| match p {
                    None => "empty".to_string(),
                    Some(Err(e)) => format!("damaged ({e})"),
                    Some(Ok(_)) => unreachable!(),
                };
                Err(Error::integrity(format!(
                    "header has no valid slot place (place A {}, place B {})",
                    why(a),
                    why(b)
                )))
            }
        }
    }
}

/// Encodes a place: sequence number, slots, checksum.
pub fn encode_place(n: usize, p: &Place) -> Vec<u8> {
    let len = place_len(n);
    let mut b = vec![0u8; len];
    b[..8].copy_from_slice(&p.seq.to_be_bytes());
    for (i, s) in p.slots.iter().enumerate() {
        let off = PLACE_HEAD + i * SLOT_LEN;
        b[off..off + SLOT_LEN].copy_from_slice(&encode_slot(s));
    }
    let sum = Sha256::digest(&b[..len - 32]);
    b[len - 32..].copy_from_slice(&sum);
    b
}

fn decode_place(n: usize, b: &[u8]) -> Option<std::result::Result<Place, String>> {
    if b.iter().all(|&x| x == 0) {
        return None;
    }
    let len = b.len();
    let sum = Sha256::digest(&b[..len - 32]);
    if sum.as_slice() != &b[len - 32..] {
        return Some(Err("checksum mismatch".into()));
    }
    Some((|| {
        let seq = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
        if seq == 0 {
            return Err("sequence number 0".to_string());
        }
        let slots_end = PLACE_HEAD + n * SLOT_LEN;
        if b[8..PLACE_HEAD].iter().any(|&x| x != 0)
            || b[slots_end..len - 32].iter().any(|&x| x != 0)
        {
            return Err("non-zero padding".into());
        }
        let mut slots = Vec::with_capacity(n);
        for i in 0..n {
            let off = PLACE_HEAD + i * SLOT_LEN;
            slots.push(decode_slot(&b[off..off + SLOT_LEN]).map_err(|e| format!("slot {i}: {e}"))?);
        }
        Ok(Place { seq, slots })
    })())
}

pub fn encode_slot(s: &Slot) -> [u8; SLOT_LEN] {
    let mut b = [0u8; SLOT_LEN];
    b[KIND] = s.kind.code();
    b[NAME_LEN] = s.kwk.name.len() as u8;
    b[NAME..NAME + s.kwk.name.len()].copy_from_slice(s.kwk.name.as_bytes());
    b[VERSION..VERSION + 4].copy_from_slice(&s.kwk.version.to_be_bytes());
    b[HASH] = s.oaep.map_or(0, OaepHash::code);
    b[FINGERPRINT..FINGERPRINT + 32].copy_from_slice(&s.fingerprint);
    b[TRANSPORT_LEN..TRANSPORT_LEN + 2].copy_from_slice(&(s.transport.len() as u16).to_be_bytes());
    b[TRANSPORT..TRANSPORT + s.transport.len()].copy_from_slice(&s.transport);
    b[IV..IV + WRAP_IV_LEN].copy_from_slice(&s.wrapped.iv);
    b[WRAPPED..WRAPPED + WRAPPED_KEY_LEN].copy_from_slice(&s.wrapped.ciphertext);
    b
}

fn decode_slot(b: &[u8]) -> std::result::Result<Slot, String> {
    let kind = match b[KIND] {
        1 => SlotKind::Aes,
        2 => SlotKind::RsaOaep,
        3 => SlotKind::EcP256,
        k => return Err(format!("unknown slot kind {k}")),
    };
    let name_len = b[NAME_LEN] as usize;
    if name_len == 0 || name_len > MAX_KEY_NAME_LEN {
        return Err("bad key name length".into());
    }
    let name = std::str::from_utf8(&b[NAME..NAME + name_len])
        .map_err(|_| "key name is not UTF-8".to_string())?;
    validate_key_name(name).map_err(|_| "invalid key name".to_string())?;
    let version = u32::from_be_bytes(b[VERSION..VERSION + 4].try_into().expect("4 bytes"));
    if version == 0 {
        return Err("key version 0".into());
    }
    let tlen = u16::from_be_bytes([b[TRANSPORT_LEN], b[TRANSPORT_LEN + 1]]) as usize;
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(&b[FINGERPRINT..FINGERPRINT + 32]);
    let oaep = match kind {
        SlotKind::Aes => {
            if b[HASH] != 0 || fingerprint != [0; 32] || tlen != 0 {
                return Err("an aes slot with public-key fields".into());
            }
            None
        }
        SlotKind::RsaOaep => {
            let h = OaepHash::from_code(b[HASH]).ok_or("unknown OAEP hash")?;
            if !(256..=MAX_TRANSPORT_LEN).contains(&tlen) {
                return Err("bad public-key ciphertext length".into());
            }
            Some(h)
        }
        // The point's curve check is at unwrap time (a bad point fails
        // that slot only, as a bad RSA ciphertext does); here its form.
        SlotKind::EcP256 => {
            if b[HASH] != 0 || tlen != EC_POINT_LEN || b[TRANSPORT] != 0x04 {
                return Err("an ec-p256 slot with a bad hash or point field".into());
            }
            None
        }
    };
    if b[HASH + 1] != 0
        || b[NAME + name_len..VERSION].iter().any(|&x| x != 0)
        || b[TRANSPORT + tlen..IV].iter().any(|&x| x != 0)
        || b[RESERVED..].iter().any(|&x| x != 0)
    {
        return Err("non-zero padding".into());
    }
    let mut iv = [0u8; WRAP_IV_LEN];
    iv.copy_from_slice(&b[IV..IV + WRAP_IV_LEN]);
    let mut ciphertext = [0u8; WRAPPED_KEY_LEN];
    ciphertext.copy_from_slice(&b[WRAPPED..WRAPPED + WRAPPED_KEY_LEN]);
    Ok(Slot {
        kind,
        kwk: KeyRef {
            name: name.to_string(),
            version,
        },
        oaep,
        fingerprint,
        transport: b[TRANSPORT..TRANSPORT + tlen].to_vec(),
        wrapped: WrappedKey { iv, ciphertext },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str, v: u32, fill: u8) -> Slot {
        Slot::aes(
            KeyRef {
                name: name.into(),
                version: v,
            },
            WrappedKey {
                iv: [fill; 12],
                ciphertext: [fill + 1; 48],
            },
        )
    }

    fn rsa_slot() -> Slot {
        Slot {
            kind: SlotKind::RsaOaep,
            kwk: KeyRef {
                name: "dr".into(),
                version: 2,
            },
            oaep: Some(OaepHash::Sha1),
            fingerprint: [9; 32],
            transport: vec![7; 384],
            wrapped: WrappedKey {
                iv: [5; 12],
                ciphertext: [6; 48],
            },
        }
    }

    fn sample() -> Header2 {
        Header2::new(vec![slot("a", 1, 1), slot("b", 3, 3), rsa_slot()])
    }

    #[test]
    fn layout_and_round_trip() {
        assert_eq!(place_len(1), 1024);
        assert_eq!(place_len(2), 2048);
        assert_eq!(header_len(1), 2560);
        assert_eq!(header_len(MAX_SLOTS), 512 + 2 * 12800);
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(b.len(), header_len(3));
        assert_eq!(&b[8..10], &[0, 2]);
        assert_eq!(&b[12..14], &[0, 3]);
        let a = place_offset(3, 0);
        assert_eq!(b[a + 32], 1); // slot 0 kind
        assert_eq!(b[a + 32 + SLOT_LEN * 2], 2); // slot 2 kind
        assert_eq!(&b[a + 32 + 2..a + 32 + 3], b"a");
        assert_eq!(Header2::parse(&b).unwrap(), h);
        assert!(b[place_offset(3, 1)..].iter().all(|&x| x == 0));
    }

    #[test]
    fn every_bit_flip_is_rejected_except_in_the_idle_place() {
        let b = Header2::new(vec![slot("a", 1, 1)]).to_bytes();
        let idle = place_offset(1, 1)..header_len(1);
        for i in 0..b.len() * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            if idle.contains(&(i / 8)) {
                // A damaged idle place is what a torn write leaves: ignored
                // beside the valid place A.
                let p = Header2::parse(&c).unwrap();
                assert_eq!(p.active().0, 0);
                assert!(matches!(p.places[1], Some(Err(_))));
            } else {
                assert!(Header2::parse(&c).is_err(), "bit {i} accepted");
            }
        }
    }

    #[test]
    fn torn_places_are_ignored_only_beside_a_valid_one() {
        let n = 3;
        let h = sample();
        let old = h.to_bytes();
        // Crash while writing the new place B: B torn (half written).
        let mut newer = h.clone();
        newer.places[1] = Some(Ok(Place {
            seq: 2,
            slots: vec![slot("a", 2, 4), slot("b", 3, 3), rsa_slot()],
        }));
        let both = newer.to_bytes();
        let (pb, pl) = (place_offset(n, 1), place_len(n));
        let mut torn = old.clone();
        torn[pb..pb + pl / 2].copy_from_slice(&both[pb..pb + pl / 2]);
        let p = Header2::parse(&torn).unwrap();
        assert_eq!(p.active().1.seq, 1);
        assert!(matches!(p.places[1], Some(Err(_))));
        // Both valid: the higher sequence wins.
        assert_eq!(
            Header2::parse(&both).unwrap().active(),
            (1, newer.places[1].as_ref().unwrap().as_ref().unwrap())
        );
        // Crash while clearing place A: A half zeroed.
        let pa = place_offset(n, 0);
        let mut clearing = both.clone();
        clearing[pa..pa + pl / 2].fill(0);
        let p = Header2::parse(&clearing).unwrap();
        assert_eq!(p.active().0, 1);
        // Both places damaged: refused; one damaged, the other empty: refused.
        let mut bad = clearing.clone();
        bad[pb + 40] ^= 1;
        let e = Header2::parse(&bad).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Integrity);
        assert!(
            e.message().contains("no valid slot place"),
            "{}",
            e.message()
        );
        let mut lone = old.clone();
        lone[pa + 40] ^= 1;
        assert!(Header2::parse(&lone).is_err());
        // Equal sequence numbers: refused.
        let mut same = newer.clone();
        if let Some(Ok(p)) = &mut same.places[1] {
            p.seq = 1;
        }
        assert!(Header2::parse(&same.to_bytes()).is_err());
    }

    #[test]
    fn truncations_are_rejected() {
        let b = sample().to_bytes();
        for n in (0..b.len()).step_by(7) {
            assert!(Header2::parse(&b[..n]).is_err(), "length {n}");
        }
    }

    #[test]
    fn aad_binds_every_slot_field() {
        let base = rsa_slot();
        let aad = dek_aad(3, &base);
        let mut variants = Vec::new();
        let mut s = base.clone();
        s.kwk.name = "dx".into();
        variants.push(s);
        let mut s = base.clone();
        s.kwk.version = 3;
        variants.push(s);
        let mut s = base.clone();
        s.oaep = Some(OaepHash::Sha256);
        variants.push(s);
        let mut s = base.clone();
        s.fingerprint[31] ^= 1;
        variants.push(s);
        let mut s = base.clone();
        s.transport[0] ^= 1;
        variants.push(s);
        let mut s = base.clone();
        s.kind = SlotKind::Aes;
        variants.push(s);
        for v in variants {
            assert_ne!(dek_aad(3, &v), aad, "{v:?}");
        }
        assert_ne!(dek_aad(2, &base), aad);
        // IV and wrapped key are not in the AAD (the tag covers them).
        let mut s = base.clone();
        s.wrapped.iv[0] ^= 1;
        assert_eq!(dek_aad(3, &s), aad);
    }
}
