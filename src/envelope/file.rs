//! The hsmseal file: a 1024-byte header (the envelope) followed by a C2SP
//! chunked-encryption payload keyed by a fresh random data key (DEK).
//!
//! The DEK never leaves this module unwrapped except into the payload cipher;
//! it lives in a zeroizing `SecretKey`.
//!
//! Two header formats: v1 (one KWK, `header`) is what `seal` writes; v2
//! (several slots, `slots`) is what `seal_slots` writes. Readers take
//! either ([`AnyHeader`]). In a v2 file every slot holds the same DEK;
//! decryption uses the first slot the configured key store opens, and a
//! slot that fails does not stop it trying the others.

use super::header::{self, Header, HEADER_LEN};
use super::slots::{self, Header2, Slot, SlotKind};
use crate::backend::{KeyBackend, KeyRef, WrappedKey};
use crate::error::{Error, ErrorKind, Result};
use crate::secret::SecretKey;
use crate::stream::{self, StreamOptions};
use std::io::{Read, Write};

/// What a seal or open did, for reports.
#[derive(Debug, Clone)]
pub struct FileReport {
    /// The KWK (v2: the slot's key) that opened or sealed the file.
    pub kwk: KeyRef,
    pub plaintext_bytes: u64,
    /// v2 files: what became of each slot, in order (empty for v1).
    pub slots: Vec<SlotReport>,
}

/// One v2 slot, as a decrypt or verify found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotReport {
    /// [`Slot::describe`].
    pub slot: String,
    /// "ok", "not tried", "not on this token", or why it failed.
    pub status: String,
}

/// A parsed header of either format version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyHeader {
    V1(Header),
    V2(Header2),
}

impl AnyHeader {
    /// Parses a whole header (v1 or v2, told by the version field).
    pub fn parse(h: &[u8]) -> Result<AnyHeader> {
        if is_v2(h) {
            Ok(AnyHeader::V2(Header2::parse(h)?))
        } else {
            Ok(AnyHeader::V1(Header::parse(h)?))
        }
    }

    /// Header length in bytes (the payload starts here).
    pub fn len(&self) -> usize {
        match self {
            AnyHeader::V1(_) => HEADER_LEN,
            AnyHeader::V2(h) => h.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn format_version(&self) -> u16 {
        match self {
            AnyHeader::V1(_) => header::FORMAT_VERSION,
            AnyHeader::V2(_) => slots::FORMAT_VERSION,
        }
    }

    pub fn payload_context(&self) -> Vec<u8> {
        match self {
            AnyHeader::V1(_) => header::payload_context(),
            AnyHeader::V2(h) => slots::payload_context(h.slot_count),
        }
    }

    /// The slots in force (v1: its active envelope as one AES slot).
    pub fn slots(&self) -> Vec<Slot> {
        match self {
            AnyHeader::V1(h) => {
                let e = h.active().1;
                vec![Slot::aes(e.kwk.clone(), e.wrapped.clone())]
            }
            AnyHeader::V2(h) => h.active().1.slots.clone(),
        }
    }

    /// The key versions the file is under, one per slot.
    pub fn keys(&self) -> Vec<KeyRef> {
        self.slots().into_iter().map(|s| s.kwk).collect()
    }
}

/// True if `h` (at least 10 bytes) carries the magic and format version 2.
pub fn is_v2(h: &[u8]) -> bool {
    header::looks_like_hsmseal(h)
        && h.len() >= 10
        && u16::from_be_bytes([h[8], h[9]]) == slots::FORMAT_VERSION
}

/// Where a v2 slot's DEK goes: an AES KWK in the key store, or a
/// recipient's public key (sealed on the host, no key store needed).
pub enum Target {
    Kwk(KeyRef),
    Recipient(super::any_recipient::AnyRecipient),
}

impl Target {
    pub fn key(&self) -> KeyRef {
        match self {
            Target::Kwk(k) => k.clone(),
            Target::Recipient(r) => r.key_ref(),
        }
    }
}

/// The v2 header for `dek`, one slot per target, in order. `backend` is
/// used only for `Target::Kwk` (a recipients-only seal never touches it).
pub fn make_slots(
    backend: Option<&dyn KeyBackend>,
    targets: &[Target],
    dek: &SecretKey,
) -> Result<Header2> {
    let n = targets.len();
    if n == 0 || n > slots::MAX_SLOTS {
        return Err(Error::usage(format!(
            "a file has 1 to {} key slots ({n} keys and recipients given)",
            slots::MAX_SLOTS
        )));
    }
    let mut out = Vec::with_capacity(n);
    for t in targets {
        let slot = match t {
            Target::Kwk(k) => {
                let b = backend.ok_or_else(|| {
                    Error::usage(format!("key {k} needs the token, which is not open"))
                })?;
                let mut s = Slot::aes(
                    k.clone(),
                    WrappedKey {
                        iv: [0; 12],
                        ciphertext: [0; 48],
                    },
                );
                s.wrapped = b.wrap(k, dek, &slots::dek_aad(n, &s))?;
                s
            }
            Target::Recipient(r) => r.seal_slot(n, dek)?,
        };
        out.push(slot);
    }
    let mut seen = std::collections::BTreeSet::new();
    for s in &out {
        if !seen.insert((s.kwk.name.clone(), s.kind.code())) {
            return Err(Error::usage(format!(
                "key {} is given twice; each key or recipient gets one slot",
                s.kwk.name
            )));
        }
    }
    Ok(Header2::new(out))
}

/// Encrypts `input` to `output` as a v2 file with one slot per target.
pub fn seal_slots<R: Read, W: Write>(
    backend: Option<&dyn KeyBackend>,
    targets: &[Target],
    input: R,
    mut output: W,
    opts: &StreamOptions,
) -> Result<FileReport> {
    let dek = SecretKey::random();
    let h = make_slots(backend, targets, &dek)?;
    output
        .write_all(&h.to_bytes())
        .map_err(|e| Error::io(format!("writing output: {e}")))?;
    let n = stream::encrypt(
        &dek,
        &slots::payload_context(h.slot_count),
        input,
        output,
        opts,
    )?;
    Ok(FileReport {
        kwk: targets[0].key(),
        plaintext_bytes: n,
        slots: Vec::new(),
    })
}

/// Unwraps one v2 slot's DEK.
pub fn unwrap_slot(backend: &dyn KeyBackend, n: usize, slot: &Slot) -> Result<SecretKey> {
    let aad = slots::dek_aad(n, slot);
    match slot.kind {
        SlotKind::Aes => backend.unwrap(&slot.kwk, &slot.wrapped, &aad),
        SlotKind::RsaOaep => {
            let k = backend.rsa_decrypt(
                &slot.kwk,
                &slot.fingerprint,
                slot.oaep == Some(slots::OaepHash::Sha256),
                &slot.transport,
            )?;
            super::recipient::gcm_unwrap(&k, &slot.wrapped, &aad)
        }
        SlotKind::EcP256 => {
            let z = backend.ecdh_derive(&slot.kwk, &slot.fingerprint, &slot.transport)?;
            super::ec_recipient::open_slot(&z, n, slot)
        }
    }
}

/// The DEK of a v2 header: each slot in turn, skipping those whose key
/// the store lacks, until one opens. `reports` gets every slot's fate.
/// With `all`, every reachable slot is unwrapped (verify) and each must
/// give the same DEK.
fn unwrap_v2(
    backend: &dyn KeyBackend,
    h: &Header2,
    all: bool,
) -> Result<(SecretKey, KeyRef, Vec<SlotReport>)> {
    let place = h.active().1;
    let mut reports: Vec<SlotReport> = place
        .slots
        .iter()
        .map(|s| SlotReport {
            slot: s.describe(),
            status: "not tried".into(),
        })
        .collect();
    let mut found: Option<(SecretKey, KeyRef)> = None;
    let mut worst = ErrorKind::Key;
    for (i, s) in place.slots.iter().enumerate() {
        if found.is_some() && !all {
            break;
        }
        let here = match s.kind {
            SlotKind::Aes => backend.has_version(&s.kwk)?,
            SlotKind::RsaOaep => backend.has_private_key(&s.kwk, &s.fingerprint)?,
            SlotKind::EcP256 => backend.has_ec_private_key(&s.kwk, &s.fingerprint)?,
        };
        if !here {
            reports[i].status = "not on this token".into();
            continue;
        }
        match unwrap_slot(backend, h.slot_count, s) {
            Ok(dek) => match &found {
                None => {
                    reports[i].status = "ok".into();
                    found = Some((dek, s.kwk.clone()));
                }
                Some((first, _)) if first.expose() == dek.expose() => {
                    reports[i].status = "ok".into();
                }
                Some(_) => {
                    reports[i].status =
                        "failed: it holds another data key than the slot that opened the file"
                            .into();
                    worst = ErrorKind::Integrity;
                }
            },
            Err(e) => {
                if e.kind() == ErrorKind::Integrity {
                    worst = ErrorKind::Integrity;
                } else if worst != ErrorKind::Integrity && e.kind() != ErrorKind::Key {
                    worst = e.kind();
                }
                reports[i].status = format!("failed: {}", e.message());
            }
        }
    }
    let listing = || {
        reports
            .iter()
            .enumerate()
            .map(|(i, r)| format!("slot {i} ({}): {}", r.slot, r.status))
            .collect::<Vec<_>>()
            .join("; ")
    };
    match found {
        Some((dek, k)) => {
            if all && reports.iter().any(|r| r.status.starts_with("failed")) {
                return Err(Error::new(
                    worst,
                    format!("a key slot is damaged: {}", listing()),
                ));
            }
            Ok((dek, k, reports))
        }
        None => Err(Error::new(
            worst,
            format!(
                "no key slot of this file opens with the configured token: {}",
                listing()
            ),
        )),
    }
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
        slots: Vec::new(),
    })
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub fn read_up_to(input: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    stream::read_full(input, buf).map_err(|e| Error::io(format!("reading input: {e}")))
}

/// Reads exactly the header (or as much as there is) from `input`: 1024
/// bytes, and for a v2 header the rest its prefix announces.
pub fn read_header<R: Read>(input: &mut R) -> Result<(AnyHeader, Vec<u8>)> {
    let mut buf = vec![0u8; HEADER_LEN];
    let got = read_up_to(input, &mut buf)?;
    buf.truncate(got);
    if is_v2(&buf) {
        let n = slots::parse_prefix(&buf)?;
        let len = slots::header_len(n);
        buf.resize(len, 0);
        let more = read_up_to(input, &mut buf[got.min(len)..])?;
        buf.truncate(got + more);
    }
    let header = AnyHeader::parse(&buf)?;
    Ok((header, buf))
}

/// Unwraps the DEK: v1 from the header's active envelope, v2 from the
/// first slot the key store opens.
pub fn unwrap_dek(backend: &dyn KeyBackend, header: &AnyHeader) -> Result<(SecretKey, KeyRef)> {
    match header {
        AnyHeader::V1(h) => {
            let (_, envelope) = h.active();
            let kwk = &envelope.kwk;
            let dek = backend.unwrap(kwk, &envelope.wrapped, &header::dek_aad(kwk))?;
            Ok((dek, kwk.clone()))
        }
        AnyHeader::V2(h) => unwrap_v2(backend, h, false).map(|(d, k, _)| (d, k)),
    }
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
    header: &AnyHeader,
    input: R,
    output: W,
    opts: &StreamOptions,
) -> Result<FileReport> {
    let (dek, kwk) = unwrap_dek(backend, header)?;
    let n = stream::decrypt(&dek, &header.payload_context(), input, output, opts)?;
    Ok(FileReport {
        kwk,
        plaintext_bytes: n,
        slots: Vec::new(),
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
///
/// v2: every slot whose key is in the store is unwrapped and must hold the
/// same DEK (a damaged slot fails verify even though decrypt, using
/// another slot, would succeed); slots under other tokens' keys are
/// reported "not on this token".
pub fn verify_payload<R: Read>(
    backend: &dyn KeyBackend,
    header: &AnyHeader,
    input: R,
    opts: &StreamOptions,
) -> Result<FileReport> {
    let (dek, kwk, slots) = match header {
        AnyHeader::V1(_) => {
            let (d, k) = unwrap_dek(backend, header)?;
            (d, k, Vec::new())
        }
        AnyHeader::V2(h) => unwrap_v2(backend, h, true)?,
    };
    let n = stream::verify(&dek, &header.payload_context(), input, opts)?;
    Ok(FileReport {
        kwk,
        plaintext_bytes: n,
        slots,
    })
}

/// Total file size for a plaintext of `len` bytes (v1 header).
pub fn sealed_len(len: u64) -> u64 {
    HEADER_LEN as u64 + stream::ciphertext_len(len)
}

/// Plaintext size implied by a file size and its header, or None if that
/// size is impossible.
pub fn plaintext_len_after(header: &AnyHeader, file_len: u64) -> Option<u64> {
    file_len
        .checked_sub(header.len() as u64)
        .and_then(stream::plaintext_len)
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

    fn two_keys() -> (MemoryBackend, Vec<Target>) {
        let b = MemoryBackend::new();
        b.add_version("a");
        b.add_version("b");
        let t = ["a", "b"]
            .iter()
            .map(|n| {
                Target::Kwk(KeyRef {
                    name: n.to_string(),
                    version: 1,
                })
            })
            .collect();
        (b, t)
    }

    #[test]
    fn v2_opens_under_either_key_alone() {
        let (b, t) = two_keys();
        let mut ct = Vec::new();
        seal_slots(Some(&b), &t, &b"multi"[..], &mut ct, &opts()).unwrap();
        let mut out = Vec::new();
        let r = open(&b, &ct[..], &mut out, &opts()).unwrap();
        assert_eq!((out.as_slice(), r.kwk.name.as_str()), (&b"multi"[..], "a"));
        // A store with "b" only (a different "a" would be another key):
        // slot 0 is skipped, slot 1 opens.
        let only_b = MemoryBackend::new();
        only_b.add_version("b");
        let e = open(&only_b, &ct[..], &mut Vec::new(), &opts()).unwrap_err();
        // only_b's "b" is new key material: slot 1 fails authentication.
        assert_eq!(e.kind(), ErrorKind::Integrity);
        assert!(
            e.message()
                .contains("slot 0 (aes key a v1): not on this token"),
            "{}",
            e.message()
        );
        // A store with none of the keys: a Key error listing the slots.
        let none = MemoryBackend::new();
        let e = open(&none, &ct[..], &mut Vec::new(), &opts()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Key);
        assert!(e
            .message()
            .contains("slot 1 (aes key b v1): not on this token"));
        let r = verify(&b, &ct[..], &opts()).unwrap();
        assert_eq!(r.slots.len(), 2);
        assert!(r.slots.iter().all(|s| s.status == "ok"));
    }

    #[test]
    fn v2_damaged_slot_other_slot_still_opens_but_verify_fails() {
        let (b, t) = two_keys();
        let mut ct = Vec::new();
        seal_slots(Some(&b), &t, &b"payload"[..], &mut ct, &opts()).unwrap();
        let AnyHeader::V2(mut h) = AnyHeader::parse(&ct).unwrap() else {
            panic!("v1")
        };
        // Slot 0's wrapped key edited, checksum recomputed (a deliberate
        // edit, not a torn write).
        if let Some(Ok(p)) = &mut h.places[0] {
            p.slots[0].wrapped.ciphertext[0] ^= 1;
        }
        let mut edited = h.to_bytes();
        edited.extend_from_slice(&ct[h.len()..]);
        let mut out = Vec::new();
        open(&b, &edited[..], &mut out, &opts()).unwrap();
        assert_eq!(out, b"payload");
        let e = verify(&b, &edited[..], &opts()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Integrity);
        assert!(e.message().contains("slot 0"), "{}", e.message());
    }

    #[test]
    fn v2_slots_swapped_or_moved_between_files_are_rejected() {
        let (b, t) = two_keys();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        seal_slots(Some(&b), &t, &b"first"[..], &mut x, &opts()).unwrap();
        seal_slots(Some(&b), &t, &b"other"[..], &mut y, &opts()).unwrap();
        let hl = slots::header_len(2);
        // y's header on x's payload.
        let mut spliced = y[..hl].to_vec();
        spliced.extend_from_slice(&x[hl..]);
        let mut out = Vec::new();
        assert_eq!(
            open(&b, &spliced[..], &mut out, &opts())
                .unwrap_err()
                .kind(),
            ErrorKind::Integrity
        );
        assert!(out.is_empty());
        // One slot of y moved into x (checksum recomputed).
        let (AnyHeader::V2(mut hx), AnyHeader::V2(hy)) =
            (AnyHeader::parse(&x).unwrap(), AnyHeader::parse(&y).unwrap())
        else {
            panic!("v1")
        };
        if let Some(Ok(p)) = &mut hx.places[0] {
            p.slots[0] = hy.active().1.slots[0].clone();
        }
        let mut moved = hx.to_bytes();
        moved.extend_from_slice(&x[hl..]);
        let mut out = Vec::new();
        assert!(open(&b, &moved[..], &mut out, &opts()).is_err());
        assert!(out.is_empty());
        // Slots swapped within the file: each slot's AAD names its key, so
        // slot 0 now claims key b with a's wrap: refused.
        let AnyHeader::V2(mut hs) = AnyHeader::parse(&x).unwrap() else {
            panic!("v1")
        };
        if let Some(Ok(p)) = &mut hs.places[0] {
            let (w0, w1) = (p.slots[0].wrapped.clone(), p.slots[1].wrapped.clone());
            p.slots[0].wrapped = w1;
            p.slots[1].wrapped = w0;
        }
        let mut swapped = hs.to_bytes();
        swapped.extend_from_slice(&x[hl..]);
        assert!(open(&b, &swapped[..], &mut Vec::new(), &opts()).is_err());
        // Every truncation of the header is refused.
        for n in (0..hl).step_by(61) {
            assert!(open(&b, &x[..n], &mut Vec::new(), &opts()).is_err(), "{n}");
        }
    }

    #[test]
    fn one_key_still_writes_v1() {
        let (b, _) = two_keys();
        let mut ct = Vec::new();
        let k = KeyRef {
            name: "a".into(),
            version: 1,
        };
        seal(&b, &k, &b"x"[..], &mut ct, &opts()).unwrap();
        assert_eq!(&ct[8..10], &[0, 1]);
        assert!(matches!(AnyHeader::parse(&ct).unwrap(), AnyHeader::V1(_)));
    }
}
