//! The audit log: one JSON line per run of a command that touches keys or
//! data, hash-chained, each line authenticated by an HMAC computed in the
//! HSM, and the last line anchored by a *head* record in the HSM so that
//! cutting lines off the end is detected (docs/FORMAT.md section 7).
//!
//! Line `seq` (0, 1, 2, ...) is, byte for byte:
//!
//! ```text
//! {"v":1,"log":"<id>","seq":N,...,"prev":"<hex>","mac":"<hex>"}\n
//! ```
//!
//! - `prev` is the lowercase hex SHA-256 of the previous line's bytes (without
//!   its `\n`), 64 zeros for seq 0;
//! - `mac` is the lowercase hex HMAC-SHA256, computed by the HSM, of every
//!   byte of the line before `,"mac":"` — which is always the last 74 bytes
//!   before the `\n`, so verification works on the raw bytes and never on a
//!   re-serialisation.
//!
//! Invariants:
//! - A line never holds a secret, a plaintext value or a path: only counts,
//!   key names and versions, and for a failed run the error's
//!   path-free summary (`crate::error::Error::summary`).
//! - Appending happens under an exclusive `flock` on the log, after checking
//!   that the log's end matches the HSM head. The head is updated only after
//!   the line is written and fsynced, so it is at most one line behind (the
//!   crash window, accepted by the next append and by `audit verify`); an
//!   append that finds it behind brings it up to date before writing, so it
//!   never falls two behind.
//! - No torn line survives an append: a failed write is cut off again under
//!   the lock, and a torn tail left by a kill, a crash or a full disk is
//!   replaced by an `audit repair` entry at the next append. Only bytes the
//!   head never named are removed (a complete authentic line lacking its
//!   `\n` is completed instead), so repair cannot delete an authenticated
//!   entry; cutting one short is refused as truncation.
//! - Several head records for one log: the highest seq counts
//!   ([`current_head`]); the next append leaves one.
//! - The HSM part (key, MAC, head) is behind [`AuditBackend`]; the PKCS#11
//!   implementation is in `crate::hsm::audit_key`. [`faults`] is a test
//!   hook, inert unless a program installs one (the library never stops
//!   the process itself).
//!
//! Files: this one holds the backend trait, [`Head`], [`Record`] and small
//! helpers; `line` the line format ([`parse_line`]), `log` the file (lock,
//! end, plan, repair, [`append`], [`check`]), `verify` the check of a whole
//! log ([`verify`]), [`faults`] the crash-test hook.

pub mod faults;
mod line;
mod log;
#[cfg(test)]
mod tests;
mod verify;

pub use line::{parse_line, Parsed, VERSION};
pub use log::{append, check, REPAIR_COMMAND};
pub use verify::{verify, Problem, ProblemKind, Repair, VerifyReport};

use crate::error::Result;
use sha2::{Digest, Sha256};

/// `prev` of the first line: the hash of nothing.
const ZERO_HASH: [u8; 32] = [0; 32];

/// The HSM's part: the HMAC key and the head records.
pub trait AuditBackend {
    /// Fails (key error) unless the audit key exists and its attributes are sound.
    fn check_audit_key(&self) -> Result<()>;
    /// HMAC-SHA256 of `data` under the audit key.
    fn audit_mac(&self, data: &[u8]) -> Result<[u8; 32]>;
    /// Whether `mac` is the HMAC-SHA256 of `data` under the audit key.
    fn audit_check_mac(&self, data: &[u8], mac: &[u8; 32]) -> Result<bool>;
    /// The head record of log `log_id`, if the token has one.
    fn audit_head(&self, log_id: &str) -> Result<Option<Head>>;
    /// Creates or replaces the head record of log `log_id`.
    fn set_audit_head(&self, log_id: &str, head: &Head) -> Result<()>;
    /// (log id, head) of every head record that names `path`.
    fn audit_heads_for_path(&self, path: &str) -> Result<Vec<(String, Head)>>;
}

/// What the HSM remembers of a log: its last entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    /// SHA-256 of the last line (without `\n`).
    pub hash: [u8; 32],
    /// Absolute path the log was last appended at.
    pub path: String,
}

impl Head {
    /// `v1 <seq> <hash hex> <path>`, ASCII except the path (UTF-8).
    pub fn encode(&self) -> Vec<u8> {
        format!("v1 {} {} {}", self.seq, hex(&self.hash), self.path).into_bytes()
    }
    pub fn decode(v: &[u8]) -> Option<Head> {
        let s = std::str::from_utf8(v).ok()?;
        let mut it = s.splitn(4, ' ');
        if it.next()? != "v1" {
            return None;
        }
        let seq = it.next()?;
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let seq = seq.parse().ok()?;
        let hash = unhex32(it.next()?.as_bytes())?;
        let path = it.next().unwrap_or("").to_string();
        Some(Head { seq, hash, path })
    }
}

/// What one run did, as the audit line reports it.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// `encrypt`, `key destroy`, `columns encrypt`, ...
    pub command: String,
    /// Key versions used, `name vN`.
    pub keys: Vec<String>,
    pub ok: u64,
    pub failed: u64,
    pub skipped: u64,
    pub bytes: u64,
    pub hsm_calls: u64,
    pub seconds: f64,
    /// `ok`, `failed` (some items failed), `error` (the run failed),
    /// `interrupted`, or `repaired` (an `audit repair` entry).
    pub result: &'static str,
    pub exit_code: i32,
    pub error: Option<String>,
}

/// Which of several head records of one log counts: the one with the
/// highest seq. Heads only move forward, and a record is only created by
/// someone holding the token's PIN, so a lower one is stale — left by a
/// replacement killed between creating the new record and destroying the
/// old. Not "the one that matches the log": with a stale record present,
/// cutting the last line off would then go unnoticed. Two records at the
/// same seq that disagree are refused (`Err` says why).
pub fn current_head(heads: Vec<Head>) -> std::result::Result<Option<Head>, String> {
    let Some(top) = heads.iter().map(|h| h.seq).max() else {
        return Ok(None);
    };
    let mut at_top = heads.into_iter().filter(|h| h.seq == top);
    let first = at_top.next().expect("the max exists");
    if at_top.any(|h| h.hash != first.hash) {
        return Err(format!(
            "several head records hold seq {top} with different line hashes"
        ));
    }
    Ok(Some(first))
}

// ---- small helpers ----

pub(super) fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

pub(super) fn new_log_id() -> String {
    let mut id = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
    hex(&id)
}

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

/// Lowercase hex only, so each value has exactly one spelling.
pub(super) fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let v = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.chunks(2)
        .map(|p| Some(v(p[0])? << 4 | v(p[1])?))
        .collect()
}

pub(super) fn unhex32(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    unhex(s)?.try_into().ok()
}

/// The effective OS user's name (`uid:N` if it has none).
pub fn os_user() -> String {
    // SAFETY: geteuid cannot fail; getpwuid_r writes into the buffers we
    // pass and sets `result` to null or to `pwd`.
    unsafe {
        let uid = libc::geteuid();
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc == 0 && !result.is_null() && !pwd.pw_name.is_null() {
            return std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned();
        }
        format!("uid:{uid}")
    }
}

/// The host name (`unknown` if it cannot be read).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
