//! Fuzz harnesses for hsmseal's parsers: one function per fuzz target
//! (fuzz/fuzz_targets/*.rs are one-line wrappers around them).
//!
//! The same file is compiled into the main package's tests
//! (tests/fuzz_regressions.rs includes it with `#[path]`), which replay every
//! committed crash input (fuzz/regressions/<target>/) and every seed
//! (fuzz/corpus/<target>/) through exactly these checks in `cargo test`.
//!
//! Invariants:
//! - A harness panics only on a finding: hsmseal panicked, or one of the
//!   properties written next to it failed. Bad input must come back as an
//!   `Err` of the kind the format documents, never as a panic.
//! - Only hsmseal's public API and no HSM: [`FixedKeys`] is a `KeyBackend`
//!   whose key-wrapping keys are fixed constants, so committed seeds that
//!   hold real files and tokens keep decrypting across runs and machines.
//! - The properties hold for every random draw hsmseal makes (data keys,
//!   salts, nonces), so a harness gives the same verdict on every run.
//! - Only crates the main package already depends on (see fuzz/Cargo.toml).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use hsmseal::audit::{self, AuditBackend, Head};
use hsmseal::backend::{KeyBackend, KeyRef, WrappedKey, WRAPPED_KEY_LEN, WRAP_IV_LEN};
use hsmseal::columns::{self, token, ColumnOptions, Format};
use hsmseal::envelope::header::{Header, ENVELOPE_LEN, ENVELOPE_OFFSETS, HEADER_LEN};
use hsmseal::envelope::{file, rewrap};
use hsmseal::error::{Error, ErrorKind, Result};
use hsmseal::secret::SecretKey;
use hsmseal::stream::{StreamOptions, CHUNK_SIZE};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

// ---- fixed keys ----

/// The one key name [`FixedKeys`] knows.
pub const KEY_NAME: &str = "fz";

/// Version 1 of [`KEY_NAME`]: what seeds are encrypted under.
pub fn v1() -> KeyRef {
    KeyRef {
        name: KEY_NAME.into(),
        version: 1,
    }
}

/// Version 2 of [`KEY_NAME`]: the current version, which rotation targets.
pub fn v2() -> KeyRef {
    KeyRef {
        name: KEY_NAME.into(),
        version: 2,
    }
}

/// A `KeyBackend` with two fixed KWKs (`fz` v1 and v2, v2 current), made by
/// the same AES-256-GCM construction as the HSM and memory backends. The
/// keys are public constants: for fuzzing only.
#[derive(Default)]
pub struct FixedKeys {
    calls: AtomicU64,
}

impl FixedKeys {
    pub fn new() -> Self {
        Self::default()
    }

    fn cipher(kwk: &KeyRef) -> Result<Aes256Gcm> {
        if kwk.name != KEY_NAME || !(1..=2).contains(&kwk.version) {
            return Err(Error::key(format!("key {kwk} not found")));
        }
        let k = Sha256::digest(format!("hsmseal fuzz kwk {} v{}", kwk.name, kwk.version));
        Ok(Aes256Gcm::new(&k))
    }
}

impl KeyBackend for FixedKeys {
    fn current_version(&self, name: &str) -> Result<u32> {
        if name == KEY_NAME {
            Ok(2)
        } else {
            Err(Error::key(format!("key {name:?} not found")))
        }
    }

    fn wrap(&self, kwk: &KeyRef, key: &SecretKey, aad: &[u8]) -> Result<WrappedKey> {
        // A counter IV: unique per process, which is all a fixed public key
        // needs, and no randomness in the harness itself.
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut iv = [0u8; WRAP_IV_LEN];
        iv[..8].copy_from_slice(&n.to_be_bytes());
        iv[8..].copy_from_slice(&std::process::id().to_be_bytes());
        let ct = Self::cipher(kwk)?
            .encrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: key.expose(),
                    aad,
                },
            )
            .map_err(|_| Error::key("wrap failed"))?;
        let mut ciphertext = [0u8; WRAPPED_KEY_LEN];
        ciphertext.copy_from_slice(&ct);
        Ok(WrappedKey { iv, ciphertext })
    }

    fn unwrap(&self, kwk: &KeyRef, wrapped: &WrappedKey, aad: &[u8]) -> Result<SecretKey> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut pt = Self::cipher(kwk)?
            .decrypt(
                Nonce::from_slice(&wrapped.iv),
                Payload {
                    msg: &wrapped.ciphertext,
                    aad,
                },
            )
            .map_err(|_| Error::integrity("authentication failed unwrapping the data key"))?;
        SecretKey::from_slice(&mut pt)
            .ok_or_else(|| Error::integrity("unwrapped key has the wrong length"))
    }

    /// Only v2 has a key-derivation key (v1 stands for a version made
    /// before token v2): HMAC-SHA256 under a fixed public key.
    fn derive(&self, kwk: &KeyRef, data: &[u8]) -> Result<Option<SecretKey>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Self::cipher(kwk)?;
        if kwk.version != 2 {
            return Ok(None);
        }
        let k = Sha256::digest(format!("hsmseal fuzz kdk {} v{}", kwk.name, kwk.version));
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&k).expect("any key length");
        mac.update(data);
        Ok(Some(SecretKey::from_bytes(
            mac.finalize().into_bytes().into(),
        )))
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// The audit log's HSM part in memory: a fixed HMAC key and a map of heads.
pub struct AuditKeys {
    heads: Mutex<HashMap<String, Head>>,
}

impl AuditKeys {
    const KEY: &'static [u8] = b"hsmseal fuzz audit key";

    pub fn new() -> Self {
        AuditKeys {
            heads: Mutex::new(HashMap::new()),
        }
    }
}

impl Default for AuditKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl AuditBackend for AuditKeys {
    fn check_audit_key(&self) -> Result<()> {
        Ok(())
    }
    fn audit_mac(&self, data: &[u8]) -> Result<[u8; 32]> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(Self::KEY).expect("any key length");
        m.update(data);
        Ok(m.finalize().into_bytes().into())
    }
    fn audit_check_mac(&self, data: &[u8], mac: &[u8; 32]) -> Result<bool> {
        Ok(self.audit_mac(data)? == *mac)
    }
    fn audit_head(&self, log_id: &str) -> Result<Option<Head>> {
        Ok(self.heads.lock().expect("heads").get(log_id).cloned())
    }
    fn set_audit_head(&self, log_id: &str, head: &Head) -> Result<()> {
        self.heads
            .lock()
            .expect("heads")
            .insert(log_id.to_string(), head.clone());
        Ok(())
    }
    fn audit_heads_for_path(&self, path: &str) -> Result<Vec<(String, Head)>> {
        Ok(self
            .heads
            .lock()
            .expect("heads")
            .iter()
            .filter(|(_, h)| h.path == path)
            .map(|(id, h)| (id.clone(), h.clone()))
            .collect())
    }
}

// ---- helpers ----

/// A scratch file path, unique in this process; in /dev/shm when there is
/// one (no disk writes at tens of thousands of runs a second).
struct ScratchFile(PathBuf);

impl ScratchFile {
    fn new(tag: &str) -> ScratchFile {
        static N: AtomicU64 = AtomicU64::new(0);
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let n = N.fetch_add(1, Ordering::Relaxed);
        ScratchFile(dir.join(format!("hsmseal-fuzz-{}-{tag}-{n}", std::process::id())))
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn stream_opts(threads: usize) -> StreamOptions<'static> {
    StreamOptions {
        threads,
        progress: None,
    }
}

/// Asserts an error has one of the kinds a parser may return for bad input.
#[track_caller]
fn assert_kind(e: &Error, allowed: &[ErrorKind]) {
    assert!(
        allowed.contains(&e.kind()),
        "unexpected error kind {:?}: {e}",
        e.kind()
    );
}

/// Recomputes the SHA-256 checksum of each non-empty header envelope in
/// `file` (the last 32 bytes of an envelope cover the 224 before them), so
/// mutated envelopes reach the envelope decoder instead of stopping at the
/// checksum.
pub fn fix_envelope_checksums(file: &mut [u8]) {
    if file.len() < HEADER_LEN {
        return;
    }
    for off in ENVELOPE_OFFSETS {
        let envelope = &mut file[off..off + ENVELOPE_LEN];
        if envelope.iter().any(|&b| b != 0) {
            let sum = Sha256::digest(&envelope[..ENVELOPE_LEN - 32]);
            envelope[ENVELOPE_LEN - 32..].copy_from_slice(&sum);
        }
    }
}

// ---- envelope header and file read path ----

/// Target `header`. Byte 0 is a mode, the rest is a file:
/// bit 0 recomputes envelope checksums, bit 1 rotates the file in place, bit 2
/// decrypts with two threads.
///
/// Properties: a header that parses re-encodes to the same 1024 bytes;
/// `open` and `verify` agree; a failed open released only whole
/// authenticated chunks; a rotation that succeeds leaves a file that opens
/// exactly as before (plaintext, or the same failure), and one that fails
/// leaves it byte for byte as it was.
pub fn header(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 != 0 {
        fix_envelope_checksums(&mut bytes);
    }
    match Header::parse(&bytes) {
        Ok(h) => {
            assert_eq!(h.to_bytes()[..], bytes[..HEADER_LEN], "re-encoded header");
            let _ = h.active();
        }
        Err(e) => assert_kind(&e, &[ErrorKind::Format, ErrorKind::Integrity]),
    }
    let keys = FixedKeys::new();
    let opts = stream_opts(if mode & 4 != 0 { 2 } else { 1 });
    let before = open_file(&keys, &bytes, &opts);
    if mode & 2 == 0 {
        return;
    }
    let f = ScratchFile::new("header");
    std::fs::write(&f.0, &bytes).expect("writing scratch file");
    match rewrap::rewrap(&keys, &f.0, None, false) {
        Ok(outcome) => {
            let after = std::fs::read(&f.0).expect("reading scratch file");
            assert_eq!(after.len(), bytes.len(), "rotation changed the length");
            assert!(
                after[HEADER_LEN..] == bytes[HEADER_LEN..],
                "payload changed"
            );
            let reopened = open_file(&keys, &after, &opts);
            assert!(
                reopened == before,
                "rotation ({outcome:?}) changed what opens: {:?}, {} bytes -> {:?}, {} bytes",
                before.0,
                before.1.len(),
                reopened.0,
                reopened.1.len()
            );
            let h = Header::parse(&after).expect("rotated header parses");
            assert_eq!(h.active().1.kwk, v2(), "rotated to the current version");
            // Rotating again has nothing to do.
            let again = rewrap::rewrap(&keys, &f.0, None, false).expect("second rotation");
            assert!(matches!(again, rewrap::Outcome::Unchanged(_)), "{again:?}");
        }
        Err(e) => {
            assert_kind(
                &e,
                &[ErrorKind::Format, ErrorKind::Integrity, ErrorKind::Key],
            );
            let after = std::fs::read(&f.0).expect("reading scratch file");
            assert!(after == bytes, "a failed rotation changed the file");
        }
    }
}

/// What opening a file gave: the plaintext, or the error kind and the
/// bytes released before it.
type Opened = (std::result::Result<(), ErrorKind>, Vec<u8>);

/// Opens `bytes` as an hsmseal file; checks `verify` agrees and that a
/// failure released only whole chunks.
fn open_file(keys: &FixedKeys, bytes: &[u8], opts: &StreamOptions) -> Opened {
    let mut out = Vec::new();
    let opened = file::open(keys, bytes, &mut out, opts);
    let verified = file::verify(keys, bytes, opts);
    match opened {
        Ok(r) => {
            let v = verified.expect("open succeeded but verify failed");
            assert_eq!(r.plaintext_bytes, out.len() as u64);
            assert_eq!(v.plaintext_bytes, out.len() as u64);
            assert_eq!(
                file::plaintext_len(bytes.len() as u64),
                Some(r.plaintext_bytes)
            );
            assert_eq!(r.kwk, v.kwk);
            (Ok(()), out)
        }
        Err(e) => {
            let v = verified.expect_err("verify succeeded but open failed");
            assert_eq!(e.kind(), v.kind(), "open: {e}; verify: {v}");
            assert_kind(
                &e,
                &[ErrorKind::Format, ErrorKind::Integrity, ErrorKind::Key],
            );
            assert_eq!(out.len() % CHUNK_SIZE, 0, "released a partial chunk");
            (Err(e.kind()), out)
        }
    }
}

/// Target `file_tamper`: seals a plaintext under `fz` v1, edits the sealed
/// bytes as the input says, and opens the result.
///
/// Input: `u16 length` (taken modulo three chunks and a bit), `u8 threads`,
/// then 9-byte edits: `op`, `u32 position`, `u32 argument` (see the match
/// below). Properties: the unedited file opens to the plaintext; any file
/// that differs from it is rejected by both `open` and `verify`, and what
/// `open` released before stopping is a whole-chunk prefix of the plaintext.
pub fn file_tamper(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let len = u16::from_be_bytes([data[0], data[1]]) as usize % (3 * CHUNK_SIZE + 64);
    let threads = (data[2] % 3) as usize + 1;
    // Every 16-byte block differs, so a moved block is a different block.
    let plain: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[i % 4])
        .collect();
    let keys = FixedKeys::new();
    let opts = stream_opts(threads);
    let mut sealed = Vec::new();
    file::seal(&keys, &v1(), &plain[..], &mut sealed, &opts).expect("sealing");
    let mut f = sealed.clone();
    for e in data[3..].chunks_exact(9) {
        let pos = u32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize;
        let arg = u32::from_be_bytes([e[5], e[6], e[7], e[8]]) as usize;
        let at = |n: usize| if n == 0 { 0 } else { pos % n };
        match e[0] % 8 {
            0 => {
                let i = at(f.len());
                if let Some(b) = f.get_mut(i) {
                    *b ^= 1 << (arg % 8);
                }
            }
            1 => f.truncate(at(f.len() + 1)),
            2 => f.insert(at(f.len() + 1), arg as u8),
            3 => {
                let i = at(f.len());
                let j = (i + arg % 64 + 1).min(f.len());
                f.drain(i..j);
            }
            4 => {
                // Move a chunk-sized block elsewhere (reordered chunks).
                let i = at(f.len());
                let j = (i + CHUNK_SIZE + 16).min(f.len());
                let block: Vec<u8> = f.drain(i..j).collect();
                let k = if f.is_empty() { 0 } else { arg % (f.len() + 1) };
                f.splice(k..k, block);
            }
            5 => {
                // Copy envelope 0 over envelope 1 (or back), checksum and all.
                if f.len() >= HEADER_LEN {
                    let (a, b) = (ENVELOPE_OFFSETS[arg % 2], ENVELOPE_OFFSETS[1 - arg % 2]);
                    let envelope = f[a..a + ENVELOPE_LEN].to_vec();
                    f[b..b + ENVELOPE_LEN].copy_from_slice(&envelope);
                }
            }
            6 => {
                // Overwrite a byte, then make the envelope checksums right again.
                let i = at(f.len());
                if let Some(b) = f.get_mut(i) {
                    *b = arg as u8;
                }
                fix_envelope_checksums(&mut f);
            }
            _ => f.extend_from_slice(&arg.to_be_bytes()[..arg % 5]),
        }
    }
    match open_file(&keys, &f, &opts) {
        (Ok(()), out) => {
            assert!(out == plain, "wrong plaintext");
            // Envelope sequence numbers are covered by the envelope checksum only
            // (they detect torn writes; FORMAT.md): an edit there with the
            // checksum recomputed may be accepted. Everything that says
            // which data key and which payload must be as sealed.
            let (h, s) = (Header::parse(&f).unwrap(), Header::parse(&sealed).unwrap());
            let (a, b) = (h.active().1, s.active().1);
            assert!(
                a.kwk == b.kwk && a.wrapped == b.wrapped && f[HEADER_LEN..] == sealed[HEADER_LEN..],
                "an edited file was accepted"
            );
        }
        (Err(kind), out) => {
            assert!(f != sealed, "the unedited file was rejected: {kind:?}");
            assert!(
                plain.starts_with(&out),
                "released bytes that are not the plaintext"
            );
        }
    }
}

// ---- column tokens ----

/// The binding seeds' tokens were made with.
fn seed_binding() -> Vec<u8> {
    binding_for(
        "app.users",
        token::ColumnId::Name("ssn".into()),
        Some(b"17"),
    )
}

fn binding_for(context: &str, col: token::ColumnId, row: Option<&[u8]>) -> Vec<u8> {
    let mut aad = Vec::new();
    token::binding(&mut aad, &token::binding_prefix(context, &col), row);
    aad
}

/// Target `token`. The input is taken twice: as token text (bound to
/// context `app.users`, column `ssn`, row `17`, like the seeds), and as a
/// value to seal.
///
/// Properties: text that decodes re-encodes to itself (canonical base64);
/// a token that opens opens under no other binding, and after rewrapping to
/// v2 opens to the same flags and value, a second rewrap changing nothing;
/// any value seals to a token of the documented length that opens to it.
pub fn token(data: &[u8]) {
    let keys = FixedKeys::new();
    let mut body = Vec::new();
    if let Ok(version) = token::decode_text(data, &mut body) {
        let mut text = Vec::new();
        token::encode_text_version(version, &body, &mut text);
        assert!(text == data, "decoded text does not re-encode to itself");
    }
    let aad = seed_binding();
    let cache = token::BatchCache::new();
    let mut o = token::Opener::new(&keys, &cache);
    let opened = o.open(&aad, data).map(|(f, v)| (f, v.to_vec()));
    let rc = token::RewrapCache::new();
    let target = v2();
    let mut rw = token::Rewrapper::new(&keys, Some(&target), &rc);
    let mut rewrapped = Vec::new();
    let r = rw.rewrap(&aad, data, &mut rewrapped);
    match &opened {
        Ok((flags, value)) => {
            for other in [
                binding_for(
                    "app.users",
                    token::ColumnId::Name("ssn".into()),
                    Some(b"18"),
                ),
                binding_for("app.users", token::ColumnId::Name("ssn".into()), None),
                binding_for(
                    "app.users",
                    token::ColumnId::Name("email".into()),
                    Some(b"17"),
                ),
                binding_for("app.user", token::ColumnId::Name("ssn".into()), Some(b"17")),
                binding_for("app.users", token::ColumnId::Index(4), Some(b"17")),
            ] {
                assert!(
                    o.open(&other, data).is_err(),
                    "opened under another binding"
                );
            }
            r.as_ref().expect("a token that opens rewraps");
            let (f2, v2_) = o.open(&aad, &rewrapped).expect("rewrapped token opens");
            assert_eq!((f2, v2_), (*flags, &value[..]), "rewrap changed the value");
            let mut again = Vec::new();
            let changed = rw
                .rewrap(&aad, &rewrapped, &mut again)
                .expect("second rewrap");
            assert!(
                !changed && again == rewrapped,
                "second rewrap changed the token"
            );
        }
        Err(e) => assert_kind(
            e,
            &[ErrorKind::Format, ErrorKind::Integrity, ErrorKind::Key],
        ),
    }
    if let Ok(true) = r {
        // The target (fz v2) has a KDK: a changed token is a v2 token under it.
        let (version, k) = token::token_key(&rewrapped).expect("rewrap output decodes");
        assert!(
            version == 2 && k == v2(),
            "rewrap output is not v2 under fz v2"
        );
    }
    // The input as a value.
    let flags = data.first().map_or(0, |b| b & 3);
    let kwk = v1();
    let mut s = token::Sealer::new(&keys, &kwk, 1 + data.len() as u64 % 3).expect("sealer");
    let mut tok = Vec::new();
    s.seal(&aad, flags, data, &mut tok)
        .expect("sealing a value");
    assert_eq!(tok.len(), token::token_len(KEY_NAME.len(), data.len()));
    let (f, v) = o.open(&aad, &tok).expect("a fresh token opens");
    assert_eq!(
        (f, v),
        (flags, data),
        "sealed value does not open to itself"
    );
    // Under fz v2 (which has a KDK) the same value seals to a v2 token.
    let kwk = v2();
    let mut s = token::Sealer::new(&keys, &kwk, 1 + data.len() as u64 % 3).expect("sealer");
    let mut tok = Vec::new();
    s.seal(&aad, flags, data, &mut tok)
        .expect("sealing a value");
    assert_eq!(tok.len(), token::token_len_v2(KEY_NAME.len(), data.len()));
    let (f, v) = o.open(&aad, &tok).expect("a fresh v2 token opens");
    assert_eq!(
        (f, v),
        (flags, data),
        "sealed v2 value does not open to itself"
    );
}

// ---- column dumps ----

/// Column options from the first line of a columns input (the rest is the
/// dump), space-separated: `c=a,b` columns (default `1`), `r=ID` row id,
/// `x=CTX` context, `n` no header, `b=N` batch size, `j=N` jobs (1 or 2),
/// `p` allow plaintext. Unknown words are ignored.
pub fn column_options(format: Format, line: &[u8]) -> ColumnOptions {
    let mut o = ColumnOptions {
        format,
        columns: vec!["1".into()],
        jobs: 1,
        ..Default::default()
    };
    for w in String::from_utf8_lossy(line).split(' ') {
        let (k, v) = w.split_once('=').unwrap_or((w, ""));
        match k {
            "c" => o.columns = v.split(',').map(String::from).collect(),
            "r" => o.row_id = vec![v.to_string()],
            "x" => o.context = v.to_string(),
            "n" => o.header = false,
            "b" => o.batch_size = v.parse().unwrap_or(o.batch_size),
            "j" => o.jobs = if v == "2" { 2 } else { 1 },
            "p" => o.allow_plaintext = true,
            _ => {}
        }
    }
    o
}

type Run = std::result::Result<(Vec<u8>, columns::ColumnStats), Error>;

fn run_columns(
    f: impl FnOnce(std::io::Cursor<Vec<u8>>, &mut Vec<u8>) -> Result<columns::ColumnStats>,
    input: &[u8],
) -> Run {
    let mut out = Vec::new();
    f(std::io::Cursor::new(input.to_vec()), &mut out).map(|s| (out, s))
}

const DUMP_ERRORS: &[ErrorKind] = &[
    ErrorKind::Format,
    ErrorKind::Usage,
    ErrorKind::Integrity,
    ErrorKind::Key,
];

/// Targets `csv`, `tsv`, `pgcopy` and `jsonl`: the format's record scanner,
/// then the whole columns pipeline (options from the first line, see
/// [`column_options`]).
///
/// Properties: scanner spans are in bounds and in order, and a record
/// parses the same whether the buffer ends inside or after it (what the
/// reader relies on at its 4 MiB refills, which fuzz inputs never reach);
/// decoding inverts encoding; encrypting fails exactly when a plain pass
/// over the dump (`passthrough`) fails, and otherwise decrypting gives
/// byte for byte what `passthrough` gives, before and after rotation to v2.
/// Decrypting and rotating the raw dump never panic.
pub fn dump(format: Format, data: &[u8]) {
    let (line, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    scanner(format, rest);
    let opts = column_options(format, line);
    let keys = FixedKeys::new();
    let pass = run_columns(|i, o| columns::passthrough(&opts, i, o), rest);
    let enc = run_columns(|i, o| columns::encrypt(&keys, &v1(), &opts, i, o), rest);
    let bad_batch = opts.batch_size == 0 || opts.batch_size > columns::MAX_BATCH_SIZE;
    match (&pass, &enc) {
        (_, Err(b)) if bad_batch => assert_eq!(b.kind(), ErrorKind::Usage, "{b}"),
        (Ok((p, ps)), Ok((e, es))) => {
            assert_eq!(ps.rows, es.rows);
            let mut dopts = opts.clone();
            dopts.allow_plaintext = false;
            let (d, ds) = run_columns(|i, o| columns::decrypt(&keys, &dopts, i, o), e)
                .unwrap_or_else(|err| panic!("decrypting what encrypt wrote: {err}"));
            assert!(d == *p, "decrypt(encrypt(x)) != passthrough(x)");
            // pgcopy normalises non-canonical escapes (documented); the
            // other formats give back every byte.
            if format != Format::PgCopy {
                assert!(d == rest, "decrypt(encrypt(x)) != x");
            }
            assert_eq!((ds.rows, ds.cells), (es.rows, es.cells));
            let (r, rs) = run_columns(|i, o| columns::rewrap(&keys, Some(&v2()), &dopts, i, o), e)
                .unwrap_or_else(|err| panic!("rotating what encrypt wrote: {err}"));
            assert_eq!(rs.cells, es.cells);
            let (d2, _) = run_columns(|i, o| columns::decrypt(&keys, &dopts, i, o), &r)
                .unwrap_or_else(|err| panic!("decrypting what rotate wrote: {err}"));
            assert!(d2 == *p, "decrypt(rotate(encrypt(x))) != passthrough(x)");
        }
        (Err(a), Err(b)) => {
            assert_kind(a, DUMP_ERRORS);
            assert_eq!(a.kind(), b.kind(), "passthrough: {a}; encrypt: {b}");
        }
        // Encrypt may refuse a value that already is a token of either
        // version (issue 9: no silent double encryption), which a plain pass
        // copies. The plain pass's output is searched too: it has the
        // values unescaped (`\hsc2.` in pgcopy is the value `hsc2.`).
        (Ok((p, _)), Err(b)) if has_token_prefix(rest) || has_token_prefix(p) => {
            assert_kind(b, DUMP_ERRORS)
        }
        (Ok(_), Err(b)) => panic!("encrypt failed where passthrough did not: {b}"),
        (Err(a), Ok(_)) => panic!("passthrough failed where encrypt did not: {a}"),
    }
    if let Err(e) = run_columns(|i, o| columns::decrypt(&keys, &opts, i, o), rest) {
        assert_kind(&e, DUMP_ERRORS);
    }
    if let Err(e) = run_columns(
        |i, o| columns::rewrap(&keys, Some(&v2()), &opts, i, o),
        rest,
    ) {
        assert_kind(&e, DUMP_ERRORS);
    }
}

fn has_token_prefix(buf: &[u8]) -> bool {
    contains(buf, token::PREFIX) || contains(buf, token::PREFIX_V2)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The scanner-level properties of [`dump`].
fn scanner(format: Format, buf: &[u8]) {
    match format {
        // Parquet is read by the parquet crate, not by a record scanner.
        Format::Parquet => {}
        Format::Csv | Format::Tsv => {
            let delim = if format == Format::Csv { b',' } else { b'\t' };
            records(buf, |b, eof, f| {
                columns::csv::parse_record(b, eof, delim, f)
            });
            // A field written by `write_field` reads back as that value.
            let mut out = Vec::new();
            columns::csv::write_field(&mut out, buf, false, delim, true);
            out.push(b'\n');
            let mut spans = Vec::new();
            let r = columns::csv::parse_record(&out, true, delim, |_, s, e, q| {
                spans.push((s, e, q));
                Ok(())
            });
            assert_eq!(r.ok().flatten(), Some((out.len(), 1)), "written field");
            let (s, e, q) = spans[0];
            let mut scratch = Vec::new();
            assert!(columns::csv::unquote(&out[s..e], q, &mut scratch) == buf);
        }
        Format::PgCopy => {
            records(buf, |b, eof, f| columns::pgcopy::parse_record(b, eof, f));
            let mut out = Vec::new();
            columns::pgcopy::encode(buf, &mut out);
            let mut scratch = Vec::new();
            assert!(
                columns::pgcopy::decode(&out, &mut scratch) == buf,
                "decode(encode(v))"
            );
            assert!(!out.contains(&b'\t') && !out.contains(&b'\n'));
            let _ = columns::pgcopy::decode(buf, &mut scratch);
        }
        Format::Jsonl => {
            let mut members = Vec::new();
            for line in buf.split(|&b| b == b'\n') {
                let utf8 = std::str::from_utf8(line).is_ok();
                if columns::jsonl::parse_object(line, &mut members).is_err() {
                    continue;
                }
                let mut last = 0;
                for m in &members {
                    assert!(last <= m.key.0 && m.key.0 + 2 <= m.key.1 && m.key.1 <= m.value.0);
                    assert!(m.value.0 < m.value.1 && m.value.1 <= line.len());
                    last = m.value.1;
                    let key = &line[m.key.0..m.key.1];
                    assert!(key[0] == b'"' && key[key.len() - 1] == b'"');
                    let raw = &line[m.value.0..m.value.1];
                    if !utf8 {
                        continue;
                    }
                    let mut scratch = Vec::new();
                    // Canonical strings are decoded, and written back
                    // canonically they are the same bytes.
                    match columns::jsonl::plain(raw, &mut scratch) {
                        Ok(columns::jsonl::Plain::Str(v)) => {
                            let v = v.to_vec();
                            let mut w = Vec::new();
                            columns::jsonl::write_value(&mut w, &v, false).expect("UTF-8");
                            assert!(w == raw, "canonical string not written back as it was");
                        }
                        Ok(columns::jsonl::Plain::Json(v)) => assert!(v == raw),
                        Ok(columns::jsonl::Plain::Null) => assert!(raw == b"null"),
                        Err(e) => assert_kind(&e, &[ErrorKind::Format]),
                    }
                }
            }
        }
    }
}

type Fields = Vec<(usize, usize, usize, bool)>;

/// Walks `buf` record by record with `parse` (eof), checking spans, and
/// that every prefix of a record's remaining input (eof false) gives either
/// "need more" or the same record.
fn records(
    buf: &[u8],
    parse: impl Fn(
        &[u8],
        bool,
        &mut dyn FnMut(usize, usize, usize, bool) -> Result<()>,
    ) -> Result<Option<(usize, usize)>>,
) {
    let run = |b: &[u8], eof: bool| -> Result<Option<(usize, usize, Fields)>> {
        let mut fields = Fields::new();
        let r = parse(b, eof, &mut |i, s, e, q| {
            fields.push((i, s, e, q));
            Ok(())
        })?;
        Ok(r.map(|(n, k)| (n, k, fields)))
    };
    let mut p = 0;
    let mut count = 0;
    while p < buf.len() && count < 64 {
        count += 1;
        let rest = &buf[p..];
        let full = run(rest, true);
        let (n, k, fields) = match &full {
            Ok(Some(x)) => x.clone(),
            Ok(None) => panic!("no record at end of input"),
            Err(_) => {
                // An error at eof must not become a record when more input
                // is announced: the parser either waits or fails.
                if let Ok(Some(_)) = run(rest, false) {
                    panic!("record without eof, error with eof");
                }
                return;
            }
        };
        assert!(n >= 1 && n <= rest.len(), "consumed {n} of {}", rest.len());
        assert_eq!(k, fields.len(), "field count");
        let mut last = 0;
        for (j, &(i, s, e, _)) in fields.iter().enumerate() {
            assert_eq!(i, j, "field index");
            assert!(
                last <= s && s <= e && e <= n,
                "span {s}..{e} after {last}, record {n}"
            );
            last = e;
        }
        // Prefixes: a few dozen cut points spread over the record and one
        // byte past it.
        let step = (n / 24).max(1);
        let cuts = (1..=n.min(rest.len())).step_by(step).chain([n, n + 1]);
        for s in cuts.filter(|&s| s <= rest.len()) {
            match run(&rest[..s], false) {
                Ok(None) => {}
                Ok(Some((n2, k2, f2))) => {
                    assert_eq!((n2, k2, &f2), (n, k, &fields), "record changed at cut {s}");
                }
                Err(e) => panic!("cut at {s} of a valid record is an error: {e}"),
            }
        }
        if n < rest.len() {
            let r = run(rest, false).expect("complete record, more input");
            assert_eq!(r, Some((n, k, fields)), "record depends on eof");
        }
        p += n;
    }
}

// ---- audit log ----

/// Target `audit`. Byte 0 chooses the HSM head record, the rest is the log:
/// bits 0-5 = 0 means no head, k means the head is at line k (modulo the
/// line count) if that line is authentic: its log id and seq, its hash;
/// bits 6-7 move the head's seq by 0, +1, -1, or give it another line's
/// hash.
///
/// Properties: `verify` never fails on a readable log except with a key
/// error (log of another key); a problem is on a line that exists (or one
/// past the end); `intact` means no problem and every line counted; an
/// intact log takes an append, and stays intact with the new entry last.
/// Head records decode and re-encode to themselves.
pub fn audit(data: &[u8]) {
    let Some((&mode, log)) = data.split_first() else {
        return;
    };
    if let Some(h) = Head::decode(log) {
        assert_eq!(Head::decode(&h.encode()), Some(h), "head record round trip");
    }
    let keys = AuditKeys::new();
    let f = ScratchFile::new("audit");
    std::fs::write(&f.0, log).expect("writing scratch log");
    let abs = std::fs::canonicalize(&f.0)
        .expect("scratch path")
        .to_string_lossy()
        .into_owned();
    let lines: Vec<&[u8]> = log.split(|&b| b == b'\n').collect();
    let complete = &lines[..lines.len() - 1];
    let k = (mode & 0x3f) as usize;
    if k > 0 && !complete.is_empty() {
        let i = (k - 1) % complete.len();
        // Only a line hsmseal wrote (its MAC verifies) can have become a
        // head record: heads are written by appends alone.
        let line = complete[i];
        let authentic = line.len() > 74
            && line.ends_with(b"\"}")
            && keys
                .audit_mac(&line[..line.len() - 74])
                .is_ok_and(|m| line[line.len() - 66..line.len() - 2] == *audit::hex(&m).as_bytes());
        let parsed = serde_json::from_slice::<serde_json::Value>(line).ok();
        if let Some((id, seq)) = parsed
            .as_ref()
            .filter(|_| authentic)
            .and_then(|v| Some((v["log"].as_str()?, v["seq"].as_u64()?)))
        {
            let mut head = Head {
                seq,
                hash: Sha256::digest(line).into(),
                path: abs.clone(),
            };
            match mode >> 6 {
                // One ahead: the log lost its last line. One behind: the
                // crash window between writing a line and the head.
                1 => head.seq = head.seq.saturating_add(1),
                2 => head.seq = head.seq.saturating_sub(1),
                3 => head.hash = Sha256::digest(complete[(i + 1) % complete.len()]).into(),
                _ => {}
            }
            keys.set_audit_head(id, &head).expect("memory");
        }
    }
    let report = match audit::verify(&keys, &f.0) {
        Ok(r) => r,
        Err(e) => {
            assert_kind(&e, &[ErrorKind::Key]);
            return;
        }
    };
    assert_eq!(report.intact, report.problem.is_none());
    if let Some(p) = &report.problem {
        assert!(
            p.line >= 1 && p.line <= lines.len() + 1,
            "problem at line {}",
            p.line
        );
    }
    if !report.intact {
        // Must not panic, whatever it decides.
        let _ = audit::check(&keys, &f.0);
        return;
    }
    // Every complete line is an entry (a torn last line is not one, should
    // a later version judge it repairable rather than a problem).
    assert_eq!(report.entries, complete.len());
    audit::check(&keys, &f.0).expect("check of an intact log");
    let rec = audit::Record {
        command: "fuzz".into(),
        result: "ok",
        ..Default::default()
    };
    let seq = audit::append(&keys, &f.0, &rec, false).expect("append to an intact log");
    // A repair, if any, may be logged before the entry itself.
    assert!(seq >= complete.len() as u64, "appended seq {seq}");
    let after = audit::verify(&keys, &f.0).expect("verify after append");
    assert!(
        after.intact,
        "append broke an intact log: {:?}",
        after.problem
    );
    assert_eq!(after.entries as u64, seq + 1);
}
