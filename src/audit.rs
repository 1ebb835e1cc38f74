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
//!   implementation is in `crate::hsm::audit_key`. `faults` is a test hook,
//!   inert unless its environment variable is set.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Format version in every line's `v`.
pub const VERSION: u32 = 1;
/// `,"mac":"` + 64 hex digits + `"}`: the fixed tail of every line.
const MAC_SUFFIX_LEN: usize = 8 + 64 + 2;
const MAC_PREFIX: &[u8] = b",\"mac\":\"";
/// A line longer than this is not one hsmseal wrote.
const MAX_LINE: usize = 64 * 1024;
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

/// The fields of a line as parsed (the order on disk is fixed by [`signed_part`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Entry {
    v: u32,
    log: String,
    seq: u64,
    time: String,
    user: String,
    host: String,
    pid: u32,
    command: String,
    keys: Vec<String>,
    items: Items,
    bytes: u64,
    hsm_calls: u64,
    seconds: f64,
    result: String,
    exit_code: i32,
    error: Option<String>,
    prev: String,
    mac: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Items {
    ok: u64,
    failed: u64,
    skipped: u64,
}

/// One line, parsed and split into what the MAC covers and the MAC.
#[derive(Debug)]
pub struct Parsed {
    log: String,
    seq: u64,
    prev: [u8; 32],
    signed_len: usize,
    mac: [u8; 32],
    command: String,
    bytes: u64,
    error: Option<String>,
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// Everything of a line that the MAC covers, in the fixed field order.
#[allow(clippy::too_many_arguments)]
fn signed_part(
    log_id: &str,
    seq: u64,
    time: &str,
    user: &str,
    host: &str,
    pid: u32,
    r: &Record,
    prev: &[u8; 32],
) -> String {
    let keys: Vec<String> = r.keys.iter().map(|k| json_str(k)).collect();
    let seconds = if r.seconds.is_finite() && r.seconds >= 0.0 {
        r.seconds
    } else {
        0.0
    };
    format!(
        "{{\"v\":{VERSION},\"log\":{},\"seq\":{seq},\"time\":{},\"user\":{},\"host\":{},\"pid\":{pid},\"command\":{},\"keys\":[{}],\"items\":{{\"ok\":{},\"failed\":{},\"skipped\":{}}},\"bytes\":{},\"hsm_calls\":{},\"seconds\":{seconds:.3},\"result\":{},\"exit_code\":{},\"error\":{},\"prev\":\"{}\"",
        json_str(log_id),
        json_str(time),
        json_str(user),
        json_str(host),
        json_str(&r.command),
        keys.join(","),
        r.ok,
        r.failed,
        r.skipped,
        r.bytes,
        r.hsm_calls,
        json_str(r.result),
        r.exit_code,
        r.error.as_deref().map_or_else(|| "null".to_string(), json_str),
        hex(prev),
    )
}

/// The complete line (without `\n`) for `signed` and its MAC.
fn finish_line(signed: &str, mac: &[u8; 32]) -> String {
    format!("{signed},\"mac\":\"{}\"}}", hex(mac))
}

/// Splits and parses one line (without `\n`); `Err` says why it is not an
/// entry. Checks the syntax only, never the MAC or the chain. (Public for
/// the fuzz target of the line parser.)
pub fn parse_line(line: &[u8]) -> std::result::Result<Parsed, String> {
    if line.len() > MAX_LINE {
        return Err(format!("longer than {MAX_LINE} bytes"));
    }
    if line.len() < MAC_SUFFIX_LEN + 2 {
        return Err("too short".into());
    }
    let signed_len = line.len() - MAC_SUFFIX_LEN;
    let tail = &line[signed_len..];
    if &tail[..MAC_PREFIX.len()] != MAC_PREFIX || &tail[MAC_SUFFIX_LEN - 2..] != b"\"}" {
        return Err("does not end with the \"mac\" field".into());
    }
    let mac = unhex32(&tail[MAC_PREFIX.len()..MAC_PREFIX.len() + 64])
        .ok_or("the mac is not 64 lowercase hex digits")?;
    let e: Entry = serde_json::from_slice(line).map_err(|e| format!("not an audit entry: {e}"))?;
    if e.v != VERSION {
        return Err(format!("unsupported version {}", e.v));
    }
    if e.log.len() != 32 || unhex(e.log.as_bytes()).is_none() {
        return Err("the log id is not 32 lowercase hex digits".into());
    }
    let prev = unhex32(e.prev.as_bytes()).ok_or("prev is not 64 lowercase hex digits")?;
    Ok(Parsed {
        log: e.log,
        seq: e.seq,
        prev,
        signed_len,
        mac,
        command: e.command,
        bytes: e.bytes,
        error: e.error,
    })
}

// ---- the file ----

/// An exclusive or shared `flock` on the whole file, released on close.
fn flock(f: &File, exclusive: bool, path: &Path) -> Result<()> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::io_at("cannot lock audit log", path.display(), &e));
        }
    }
}

/// The last complete line of a log.
enum Last {
    /// The file holds no `\n` at all.
    None,
    /// The last line ending in `\n` (without it).
    Line(Vec<u8>),
    /// Longer than any line hsmseal writes.
    TooLong,
}

/// The end of a log, as read under its lock.
struct End {
    /// The file's length.
    len: u64,
    /// Where the bytes after the last `\n` start (`len` if there are none).
    torn_at: u64,
    /// The bytes after the last `\n`: a line whose write was cut short (a
    /// kill, a crash or a full disk), or something else; empty if the file
    /// ends with `\n`. Longer than `MAX_LINE` if it is no line at all.
    torn: Vec<u8>,
    last: Last,
}

/// Reads the end of a log by seeking from the end (never the whole file):
/// at most two lines' worth, enough for a torn line and the line before it.
fn read_end(f: &mut File, path: &Path) -> Result<End> {
    let io = |e: std::io::Error| Error::io_at("cannot read audit log", path.display(), &e);
    let len = f.seek(SeekFrom::End(0)).map_err(io)?;
    let window = 2 * (MAX_LINE as u64 + 1);
    let want = len.min(window);
    let base = len - want;
    f.seek(SeekFrom::Start(base)).map_err(io)?;
    let mut buf = vec![0u8; want as usize];
    f.read_exact(&mut buf).map_err(io)?;
    let Some(nl) = buf.iter().rposition(|&b| b == b'\n') else {
        // No `\n` at all: one unfinished line from the start (or, past
        // the window, more than a line: `torn` is then over MAX_LINE).
        let last = if base == 0 { Last::None } else { Last::TooLong };
        return Ok(End {
            len,
            torn_at: base,
            torn: buf,
            last,
        });
    };
    let torn = buf[nl + 1..].to_vec();
    let before = &buf[..nl];
    let last = match before.iter().rposition(|&b| b == b'\n') {
        Some(i) => Last::Line(before[i + 1..].to_vec()),
        None if base == 0 => Last::Line(before.to_vec()),
        None => Last::TooLong,
    };
    Ok(End {
        len,
        torn_at: base + nl as u64 + 1,
        torn,
        last,
    })
}

/// The absolute path a head records for `path` (which may not exist yet).
fn absolute(path: &Path) -> Result<String> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = fs::canonicalize(parent)
        .map_err(|e| Error::io_at("cannot resolve", parent.display(), &e))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::usage(format!("audit log {} is not a file path", path.display())))?;
    Ok(dir.join(name).to_string_lossy().into_owned())
}

fn tampered(path: &Path, what: &str) -> Error {
    Error::integrity(format!(
        "audit log {}: {what}; nothing was appended. Run `hsmseal audit verify {}`",
        path.display(),
        path.display()
    ))
}

/// Whether `torn` (bytes after the last `\n`) is a complete, authentic
/// entry that lacks only its `\n` and carries on the chain after `last`:
/// what a write cut short just before its final byte leaves. Such a line
/// is completed, never removed.
fn completes_chain(backend: &dyn AuditBackend, last: Option<&[u8]>, torn: &[u8]) -> Result<bool> {
    let Ok(t) = parse_line(torn) else {
        return Ok(false);
    };
    let chains = match last {
        None => t.seq == 0 && t.prev == ZERO_HASH,
        Some(l) => match parse_line(l) {
            Ok(p) => p.log == t.log && p.seq.checked_add(1) == Some(t.seq) && t.prev == sha256(l),
            Err(_) => false,
        },
    };
    Ok(chains && backend.audit_check_mac(&torn[..t.signed_len], &t.mac)?)
}

/// Whether `line` (parsed as `p`), the only line of a log whose id has no
/// head record, is that log's authentic first line in the crash window: a
/// run killed after writing a new log's first line and before creating its
/// head. Not if a head record of another log names this path (unless a new
/// log may start here): the file would then have replaced that log.
fn first_line_in_crash_window(
    backend: &dyn AuditBackend,
    line: &[u8],
    p: &Parsed,
    abs: &str,
    new_log_ok: bool,
) -> Result<bool> {
    Ok(p.seq == 0
        && p.prev == ZERO_HASH
        && (new_log_ok || backend.audit_heads_for_path(abs)?.is_empty())
        && backend.audit_check_mac(&line[..p.signed_len], &p.mac)?)
}

/// What the next append must do to the end of the file before its line.
enum Fix {
    None,
    /// The last line is complete and authentic but lacks its `\n`: add it.
    Complete,
    /// The file ends with an incomplete line (a write cut short by a kill,
    /// a crash or a full disk, whose line the HSM head never named): it is
    /// replaced by an `audit repair` entry recording its length and hash.
    Remove(Vec<u8>),
}

/// Where and how the next entries go; made under the log's lock.
struct Plan {
    log_id: String,
    /// seq and prev of the next line written (a repair entry or the run's).
    seq: u64,
    prev: [u8; 32],
    new_log: bool,
    fix: Fix,
    /// The head, one entry behind the last line (the crash window), as it
    /// must be before anything is written: brought up to date first, so it
    /// is never two lines behind whatever happens next.
    catch_up: Option<Head>,
    /// The file's length and where its torn tail (if any) starts.
    len: u64,
    torn_at: u64,
}

/// Checks the end of the log against the HSM head and says what the next
/// append does. `new_log_ok`: a log with no complete line may start afresh
/// even where the token remembers an older log at this path (`audit init`).
///
/// A torn tail (bytes after the last `\n`) is accepted for removal only if
/// it is at most one line long, is not a complete authentic line that
/// carries on the chain (that one is completed instead), and the complete
/// lines before it match the head: the HSM never named it, so removing it
/// removes nothing that was ever part of the authenticated log. Cutting an
/// authenticated line short leaves the head past the last complete line,
/// which is refused as truncation.
fn plan(
    backend: &dyn AuditBackend,
    end: End,
    path: &Path,
    abs: &str,
    new_log_ok: bool,
) -> Result<Plan> {
    let End {
        len,
        torn_at,
        torn,
        mut last,
    } = end;
    let mut fix = Fix::None;
    if !torn.is_empty() {
        if torn.len() > MAX_LINE {
            return Err(tampered(
                path,
                &format!("it ends with more than {MAX_LINE} bytes without a newline, which no interrupted append leaves"),
            ));
        }
        let before = match &last {
            Last::Line(l) => Some(l.as_slice()),
            Last::None => None,
            Last::TooLong => {
                return Err(tampered(
                    path,
                    "its last complete line is longer than any line hsmseal writes",
                ))
            }
        };
        if completes_chain(backend, before, &torn)? {
            last = Last::Line(torn);
            fix = Fix::Complete;
        } else {
            fix = Fix::Remove(torn);
        }
    }
    let torn_note = if matches!(fix, Fix::Remove(_)) {
        " (and it ends with an incomplete line)"
    } else {
        ""
    };
    let line = match last {
        Last::None => {
            if !new_log_ok {
                if let Some((id, head)) = backend.audit_heads_for_path(abs)?.into_iter().next() {
                    return Err(tampered(
                        path,
                        &format!(
                            "the log is missing or holds no complete entry{torn_note}, but the HSM's head record says log {id} there had {} entries (it was deleted or truncated). `hsmseal audit init` starts a new log once you have investigated",
                            head.seq + 1
                        ),
                    ));
                }
            }
            return Ok(Plan {
                log_id: new_log_id(),
                seq: 0,
                prev: ZERO_HASH,
                new_log: true,
                fix,
                catch_up: None,
                len,
                torn_at,
            });
        }
        Last::TooLong => {
            return Err(tampered(
                path,
                "its last line is longer than any line hsmseal writes",
            ))
        }
        Last::Line(l) => l,
    };
    let p = parse_line(&line).map_err(|why| {
        tampered(
            path,
            &format!("its last complete line is not a valid entry ({why}){torn_note}"),
        )
    })?;
    let hash = sha256(&line);
    let Some(head) = backend.audit_head(&p.log)? else {
        if first_line_in_crash_window(backend, &line, &p, abs, new_log_ok)? {
            // A new log's first line, written, its head never created (a
            // kill in between): create it before anything else.
            return Ok(Plan {
                log_id: p.log,
                seq: 1,
                prev: hash,
                new_log: true,
                fix,
                catch_up: Some(Head {
                    seq: 0,
                    hash,
                    path: abs.to_string(),
                }),
                len,
                torn_at,
            });
        }
        return Err(tampered(
            path,
            &format!("the HSM holds no head record for log {}", p.log),
        ));
    };
    let catch_up = if head.seq == p.seq && head.hash == hash {
        None
    } else if head.seq.checked_add(1) == Some(p.seq)
        && head.hash == p.prev
        // The crash window: the line was written, the head not yet updated.
        // Accept it only if the line is authentic and chains onto the head.
        && backend.audit_check_mac(&line[..p.signed_len], &p.mac)?
    {
        Some(Head {
            seq: p.seq,
            hash,
            path: abs.to_string(),
        })
    } else if head.seq > p.seq && !torn_note.is_empty() {
        return Err(tampered(
            path,
            &format!(
                "it ends with an incomplete line, and the HSM's head record (seq {}) is past its last complete line (seq {}): an authenticated entry was cut short or cut off (truncated)",
                head.seq, p.seq
            ),
        ));
    } else {
        return Err(tampered(
            path,
            &format!(
                "its last line (seq {}) does not match the HSM's head record (seq {}): the log was edited or truncated{torn_note}",
                p.seq, head.seq
            ),
        ));
    };
    Ok(Plan {
        log_id: p.log,
        seq: p.seq + 1,
        prev: hash,
        new_log: false,
        fix,
        catch_up,
        len,
        torn_at,
    })
}

/// Before a command runs: fails if the log could not be appended to
/// (tampered, no audit key), so no work is done without an audit trail. A
/// torn tail the next append will repair does not stop it.
pub fn check(backend: &dyn AuditBackend, path: &Path) -> Result<()> {
    backend.check_audit_key()?;
    let abs = absolute(path)?;
    // The shared lock is held until the head has been compared too: an
    // append in between (line written, head moved) would otherwise look
    // like a head ahead of the log, i.e. truncation.
    let mut file = match File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io_at("cannot open audit log", path.display(), &e)),
    };
    let end = match &mut file {
        Some(f) => {
            flock(f, false, path)?;
            read_end(f, path)?
        }
        None => End {
            len: 0,
            torn_at: 0,
            torn: Vec::new(),
            last: Last::None,
        },
    };
    let checked = plan(backend, end, path, &abs, false).map(|_| ());
    drop(file);
    checked
}

/// The complete line (without `\n`) of entry `seq` for `record`, MAC from
/// the HSM. A run that used so many key versions that the line would pass
/// `MAX_LINE` lists as many as fit and then `+N more`.
fn entry_line(
    backend: &dyn AuditBackend,
    log_id: &str,
    seq: u64,
    prev: &[u8; 32],
    record: &Record,
) -> Result<String> {
    let (time, user, host) = (
        crate::hsm::keys::rfc3339(crate::hsm::keys::now_unix()),
        os_user(),
        host_name(),
    );
    let build = |r: &Record| {
        signed_part(
            log_id,
            seq,
            &time,
            &user,
            &host,
            std::process::id(),
            r,
            prev,
        )
    };
    let mut signed = build(record);
    let mut keep = record.keys.len();
    while signed.len() + MAC_SUFFIX_LEN > MAX_LINE && keep > 0 {
        keep /= 2;
        let mut r = record.clone();
        r.keys.truncate(keep);
        r.keys.push(format!("+{} more", record.keys.len() - keep));
        signed = build(&r);
    }
    let mac = backend.audit_mac(signed.as_bytes())?;
    Ok(finish_line(&signed, &mac))
}

/// The `audit repair` entry that replaces a torn tail.
fn repair_record(torn: &[u8]) -> Record {
    Record {
        command: REPAIR_COMMAND.to_string(),
        bytes: torn.len() as u64,
        result: "repaired",
        error: Some(format!(
            "removed an incomplete line of {} bytes (SHA-256 {}) left by an interrupted append (kill, crash or full disk); the HSM's head record never named it",
            torn.len(),
            hex(&sha256(torn))
        )),
        ..Default::default()
    }
}

/// `command` of the entry that records the removal of a torn tail.
pub const REPAIR_COMMAND: &str = "audit repair";

fn write_error(path: &Path, e: &std::io::Error) -> Error {
    Error::io_at("cannot write audit log", path.display(), e)
}

/// `fsync` of the directory holding a new log, so its name is durable.
fn sync_dir(abs: &str) {
    if let Some(dir) = Path::new(abs).parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Appends one entry for `record`; returns its seq. `new_log_ok`: see
/// [`plan`].
///
/// Every step leaves a log the next append accepts, whatever kills the
/// process after it (the `kill_point` names, tested in
/// tests/cli_audit_faults.rs):
/// `locked`, `checked` — nothing written yet;
/// `completed` — a line that lacked only its `\n` got it;
/// `head-caught-up` — a head one behind was brought up to the last line;
/// `repair-written`, `repair-synced` — a torn tail replaced by an `audit
/// repair` entry (the head one behind it: the crash window), possibly
/// followed by the rest of the torn bytes (torn again, repaired again);
/// `repair-head` — the head names the repair entry;
/// `torn-write` — half of this run's line written (a torn tail);
/// `written`, `synced` — the line is there, the head one behind;
/// `head-created` (replacement only) — two head records, the higher counts;
/// `head-set` — done.
/// A write that fails (`ENOSPC`) is undone under the lock: the file is cut
/// back to its old length, so no torn line is left behind; if even that
/// fails, the torn tail is repaired by the next append.
pub fn append(
    backend: &dyn AuditBackend,
    path: &Path,
    record: &Record,
    new_log_ok: bool,
) -> Result<u64> {
    backend.check_audit_key()?;
    let abs = absolute(path)?;
    // Not O_APPEND: every write goes at an offset read under the lock, so a
    // torn tail can be overwritten in place and a failed write cut off.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io_at("cannot open audit log", path.display(), &e))?;
    flock(&f, true, path)?;
    faults::kill_point("locked");
    let end = read_end(&mut f, path)?;
    let mut plan = plan(backend, end, path, &abs, new_log_ok)?;
    faults::kill_point("checked");
    let mut end = plan.len;
    if let Fix::Complete = plan.fix {
        f.write_all_at(b"\n", end)
            .and_then(|_| f.sync_data())
            .map_err(|e| write_error(path, &e))?;
        end += 1;
        faults::kill_point("completed");
    }
    if let Some(head) = plan.catch_up.take() {
        backend.set_audit_head(&plan.log_id, &head)?;
        faults::kill_point("head-caught-up");
    }
    if let Fix::Remove(torn) = &plan.fix {
        let line = entry_line(
            backend,
            &plan.log_id,
            plan.seq,
            &plan.prev,
            &repair_record(torn),
        )?;
        let mut bytes = line.clone().into_bytes();
        bytes.push(b'\n');
        if let Err(e) = f.write_all_at(&bytes, plan.torn_at) {
            // Put the torn bytes back where they were (that space is still
            // allocated), so the next repair records what the crash left.
            let _ = f
                .write_all_at(torn, plan.torn_at)
                .and_then(|_| f.set_len(end))
                .and_then(|_| f.sync_data());
            return Err(write_error(path, &e));
        }
        faults::kill_point("repair-written");
        let new_end = plan.torn_at + bytes.len() as u64;
        if end > new_end {
            f.set_len(new_end).map_err(|e| write_error(path, &e))?;
        }
        f.sync_data().map_err(|e| write_error(path, &e))?;
        faults::kill_point("repair-synced");
        if plan.new_log {
            sync_dir(&abs);
            plan.new_log = false;
        }
        let hash = sha256(line.as_bytes());
        backend.set_audit_head(
            &plan.log_id,
            &Head {
                seq: plan.seq,
                hash,
                path: abs.clone(),
            },
        )?;
        faults::kill_point("repair-head");
        plan.seq += 1;
        plan.prev = hash;
        end = new_end;
    }
    let line = entry_line(backend, &plan.log_id, plan.seq, &plan.prev, record)?;
    let mut bytes = line.clone().into_bytes();
    bytes.push(b'\n');
    let undo = |f: &File, e: std::io::Error| {
        // Nothing names this line yet: cut it off so no torn line stays.
        let _ = f.set_len(end).and_then(|_| f.sync_data());
        Error::io(format!(
            "cannot write this run's entry to audit log {}: {e}; the log was cut back to where it ended before the entry, and takes the next one once the cause is fixed",
            path.display()
        ))
    };
    if faults::active("torn-write") {
        let _ = f.write_all_at(&bytes[..bytes.len() / 2], end);
        faults::kill_point("torn-write");
    }
    f.write_all_at(&bytes, end).map_err(|e| undo(&f, e))?;
    faults::kill_point("written");
    f.sync_data().map_err(|e| undo(&f, e))?;
    faults::kill_point("synced");
    if plan.new_log {
        sync_dir(&abs);
    }
    backend.set_audit_head(
        &plan.log_id,
        &Head {
            seq: plan.seq,
            hash: sha256(line.as_bytes()),
            path: abs,
        },
    )?;
    faults::kill_point("head-set");
    Ok(plan.seq)
}

/// Fault injection for the tests of the append's crash safety: a test hook,
/// compiled in but inert unless `HSMSEAL_TEST_AUDIT_FAULTS` is set (never
/// in real use). It only ever kills its own process at a step of an append
/// (what `kill -9` or a power cut there would do) or takes the
/// head-replacement path a token that refuses `C_SetAttributeValue` takes;
/// it weakens no check. Values, comma-separated: `kill-after=STEP` (STEP as
/// listed at [`append`]), `replace-head`.
pub mod faults {
    use std::sync::OnceLock;

    /// The environment variable of the test hook.
    pub const ENV: &str = "HSMSEAL_TEST_AUDIT_FAULTS";

    fn spec() -> &'static str {
        static SPEC: OnceLock<String> = OnceLock::new();
        SPEC.get_or_init(|| std::env::var(ENV).unwrap_or_default())
    }

    /// Whether the hook asks to kill the process after `step`.
    pub fn active(step: &str) -> bool {
        spec()
            .split(',')
            .any(|f| f.trim().strip_prefix("kill-after=") == Some(step))
    }

    /// SIGKILLs this process if the hook names `step`.
    pub fn kill_point(step: &str) {
        if active(step) {
            // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught, so
            // nothing after this runs.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }

    /// Whether head records are to be replaced rather than updated.
    pub fn replace_head() -> bool {
        spec().split(',').any(|f| f.trim() == "replace-head")
    }
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

// ---- verification ----

/// What `audit verify` found wrong first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// A line's MAC does not verify (or it is not a valid entry).
    Edited,
    /// Entries are missing from the middle (a seq gap).
    Deleted,
    /// A line that does not belong: a copy, a forgery, or one past the head.
    Inserted,
    /// Authentic lines out of order.
    Reordered,
    /// Lines cut off the end, or the last line cut short.
    Truncated,
    /// The HSM has no head record for this log.
    NoHead,
}

impl std::fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProblemKind::Edited => "edited",
            ProblemKind::Deleted => "deleted",
            ProblemKind::Inserted => "inserted",
            ProblemKind::Reordered => "reordered",
            ProblemKind::Truncated => "truncated",
            ProblemKind::NoHead => "no head",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// 1-based line number in the file.
    pub line: usize,
    pub kind: ProblemKind,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub log: String,
    pub log_id: Option<String>,
    /// Lines checked and found intact (all of them when there is no problem).
    pub entries: usize,
    pub head_seq: Option<u64>,
    pub intact: bool,
    pub problem: Option<Problem>,
    /// Something worth knowing that is not tampering: the crash window, a
    /// torn last line the next append repairs.
    pub note: Option<String>,
    /// The `audit repair` entries among the intact lines.
    pub repairs: Vec<Repair>,
}

/// An `audit repair` entry: an earlier append was cut short and the next
/// one removed its incomplete line (docs/FORMAT.md 7.5).
#[derive(Debug, Clone, Serialize)]
pub struct Repair {
    /// 1-based line number of the repair entry.
    pub line: usize,
    /// Length of the incomplete line that was removed.
    pub bytes: u64,
    /// The entry's description (length and SHA-256 of what was removed).
    pub detail: String,
}

fn problem(line: usize, kind: ProblemKind, message: String) -> Option<Problem> {
    Some(Problem {
        line,
        kind,
        message,
    })
}

/// Checks a whole log: every line parses, one log id, seq 0, 1, 2, ...,
/// each `prev` is the hash of the line before, every MAC verifies in the
/// HSM, and the last line matches the HSM head. Reports the first problem.
/// Errors (not problems) are for what prevents checking: no audit key (key
/// error), an unreadable file, a token failure.
pub fn verify(backend: &dyn AuditBackend, path: &Path) -> Result<VerifyReport> {
    backend.check_audit_key()?;
    let mut report = VerifyReport {
        log: path.display().to_string(),
        log_id: None,
        entries: 0,
        head_seq: None,
        intact: false,
        problem: None,
        note: None,
        repairs: Vec::new(),
    };
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let abs = absolute(path)?;
            if let Some((id, head)) = backend.audit_heads_for_path(&abs)?.into_iter().next() {
                report.problem = problem(
                    1,
                    ProblemKind::Truncated,
                    format!(
                        "the log is missing, but the HSM's head record says log {id} there had {} entries",
                        head.seq + 1
                    ),
                );
                return Ok(report);
            }
            return Err(Error::io_at("cannot read audit log", path.display(), &e));
        }
        Err(e) => return Err(Error::io_at("cannot read audit log", path.display(), &e)),
    };
    let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    // After the final `\n` comes an empty piece; anything else is a line
    // whose write was cut short (or bytes that are no line at all).
    let mut torn: &[u8] = lines.pop().unwrap_or_default();
    let mut notes: Vec<String> = Vec::new();
    if !torn.is_empty()
        && torn.len() <= MAX_LINE
        && completes_chain(backend, lines.last().copied(), torn)?
    {
        lines.push(torn);
        torn = &[];
        notes.push(format!(
            "line {} lacks its final newline (its write was cut short just before it); the next append adds it",
            lines.len()
        ));
    }
    if lines.is_empty() {
        let abs = absolute(path)?;
        let what = if torn.is_empty() {
            "the log is empty".to_string()
        } else {
            format!(
                "the log holds no complete entry, only an incomplete line of {} bytes",
                torn.len()
            )
        };
        let had = backend
            .audit_heads_for_path(&abs)?
            .into_iter()
            .next()
            .map(|(id, h)| {
                format!(
                    ", but the HSM's head record says log {id} there had {} entries",
                    h.seq + 1
                )
            })
            .unwrap_or_else(|| {
                if torn.is_empty() {
                    " (every log starts with one entry)".to_string()
                } else {
                    " (an interrupted first append leaves this; the next logged command starts a new log)".to_string()
                }
            });
        report.problem = problem(1, ProblemKind::Truncated, format!("{what}{had}"));
        return Ok(report);
    }
    let parsed: Vec<std::result::Result<Parsed, String>> =
        lines.iter().map(|l| parse_line(l)).collect();
    let n = lines.len();
    let mut expected_prev = ZERO_HASH;
    let mut log_id: Option<String> = None;
    for i in 0..n {
        let no = i + 1;
        let p = match &parsed[i] {
            Ok(p) => p,
            Err(why) => {
                report.problem = problem(
                    no,
                    ProblemKind::Edited,
                    format!("not a valid audit entry ({why}): edited"),
                );
                return Ok(report);
            }
        };
        let mac_ok = backend.audit_check_mac(&lines[i][..p.signed_len], &p.mac)?;
        if i == 0 && !mac_ok {
            wrong_key(backend, &lines, &parsed, &p.log)?;
        }
        let same_log = log_id.as_deref().is_none_or(|id| id == p.log);
        let chain_ok = same_log && p.seq == i as u64 && p.prev == expected_prev;
        if mac_ok && chain_ok {
            if log_id.is_none() {
                log_id = Some(p.log.clone());
                report.log_id = log_id.clone();
            }
            expected_prev = sha256(lines[i]);
            report.entries = no;
            if p.command == REPAIR_COMMAND {
                report.repairs.push(Repair {
                    line: no,
                    bytes: p.bytes,
                    detail: p.error.clone().unwrap_or_default(),
                });
            }
            continue;
        }
        let (kind, why) = classify(
            backend,
            &lines,
            &parsed,
            i,
            mac_ok,
            chain_ok,
            &expected_prev,
            log_id.as_deref(),
        )?;
        report.problem = problem(no, kind, why);
        return Ok(report);
    }
    // Every line is intact; now the end must match the HSM head.
    let id = log_id.expect("at least one intact line");
    let last = parsed[n - 1].as_ref().expect("intact");
    let Some(head) = backend.audit_head(&id)? else {
        if n == 1
            && torn.len() <= MAX_LINE
            && first_line_in_crash_window(backend, lines[0], last, &absolute(path)?, false)?
        {
            notes.push("the log's first entry was written but the run was killed before creating its HSM head record; the next append creates it".to_string());
            if !torn.is_empty() {
                notes.push(torn_note(n, torn.len()));
            }
            report.intact = true;
            report.note = Some(notes.join("; "));
            return Ok(report);
        }
        report.problem = problem(
            n,
            ProblemKind::NoHead,
            format!("the HSM holds no head record for log {id} (deleted from the token, or this log belongs to another token)"),
        );
        return Ok(report);
    };
    report.head_seq = Some(head.seq);
    let last_hash = sha256(lines[n - 1]);
    if head.seq == last.seq {
        if head.hash != last_hash {
            report.problem = problem(
                n,
                ProblemKind::Edited,
                format!(
                    "seq {} is not the entry the HSM's head record holds: edited",
                    last.seq
                ),
            );
            return Ok(report);
        }
    } else if head.seq > last.seq && !torn.is_empty() {
        report.problem = problem(
            n + 1,
            ProblemKind::Truncated,
            format!(
                "line {} is incomplete, and the HSM's head record is at seq {} while the last complete line is seq {}: the log was cut in the middle of an authenticated entry (truncated)",
                n + 1,
                head.seq,
                last.seq
            ),
        );
        return Ok(report);
    } else if head.seq > last.seq {
        let cut = head.seq - last.seq;
        report.problem = problem(
            n + 1,
            ProblemKind::Truncated,
            format!(
                "the log ends at line {n} (seq {}) but the HSM's head record is at seq {}: {cut} entr{} after line {n} {} cut off (truncated)",
                last.seq,
                head.seq,
                if cut == 1 { "y" } else { "ies" },
                if cut == 1 { "was" } else { "were" },
            ),
        );
        return Ok(report);
    } else if head.seq.checked_add(1) == Some(last.seq) && head.hash == last.prev {
        notes.push(format!(
            "the HSM's head record is one entry behind (a run was interrupted between writing line {n} and updating the head); the next append updates it"
        ));
    } else {
        let first_extra = (head.seq + 2) as usize;
        report.problem = problem(
            first_extra.min(n),
            ProblemKind::Inserted,
            format!(
                "entries after the HSM's head record (seq {}) were added without updating it: inserted",
                head.seq
            ),
        );
        return Ok(report);
    }
    if torn.len() > MAX_LINE {
        report.problem = problem(
            n + 1,
            ProblemKind::Inserted,
            format!("more than {MAX_LINE} bytes without a newline after the last entry: not an entry, and more than an interrupted append leaves (inserted)"),
        );
        return Ok(report);
    }
    if !torn.is_empty() {
        notes.push(torn_note(n, torn.len()));
    }
    report.intact = true;
    report.note = (!notes.is_empty()).then(|| notes.join("; "));
    Ok(report)
}

fn torn_note(n: usize, len: usize) -> String {
    format!(
        "line {} is an incomplete line of {len} bytes, not an entry: an append was cut short (kill, crash or full disk) before its line was complete and before the HSM's head record named it; nothing authenticated is missing, and the next append replaces it with an `{REPAIR_COMMAND}` entry",
        n + 1
    )
}

/// A log written under another token's audit key: the token has no head
/// record for its id and not one of its lines' MACs verifies. That is a key
/// error (exit 4), not tampering: this token cannot judge the log. (A line
/// that verifies, or a head record, means this is our log and a failing
/// first line was edited.)
fn wrong_key(
    backend: &dyn AuditBackend,
    lines: &[&[u8]],
    parsed: &[std::result::Result<Parsed, String>],
    log_id: &str,
) -> Result<()> {
    if backend.audit_head(log_id)?.is_some() {
        return Ok(());
    }
    for (line, p) in lines.iter().zip(parsed).skip(1) {
        if let Ok(p) = p {
            if backend.audit_check_mac(&line[..p.signed_len], &p.mac)? {
                return Ok(());
            }
        }
    }
    Err(Error::key(format!(
        "no entry of log {log_id} verifies under this token's audit key and the token holds no head record for it: the log was written with another token (select it with --token)"
    )))
}

/// Why line `i` (whose MAC or chain failed) is wrong; see FORMAT.md 7.6.
#[allow(clippy::too_many_arguments)]
fn classify(
    backend: &dyn AuditBackend,
    lines: &[&[u8]],
    parsed: &[std::result::Result<Parsed, String>],
    i: usize,
    mac_ok: bool,
    chain_ok: bool,
    expected_prev: &[u8; 32],
    log_id: Option<&str>,
) -> Result<(ProblemKind, String)> {
    let p = parsed[i].as_ref().expect("parsed");
    let expected = i as u64;
    if !mac_ok && chain_ok {
        return Ok((
            ProblemKind::Edited,
            "its MAC does not verify in the HSM: edited".into(),
        ));
    }
    let same_log = |q: &Parsed| log_id.is_none_or(|id| id == q.log);
    if mac_ok && same_log(p) && p.seq > expected {
        let later = parsed[i + 1..]
            .iter()
            .any(|q| q.as_ref().is_ok_and(|q| q.seq == expected && same_log(q)));
        return Ok(if later {
            (
                ProblemKind::Reordered,
                format!("seq {} where seq {expected} was expected, and seq {expected} comes later: reordered", p.seq),
            )
        } else {
            (
                ProblemKind::Deleted,
                format!(
                    "seq {} where seq {expected} was expected: {} entr{} deleted before it",
                    p.seq,
                    p.seq - expected,
                    if p.seq - expected == 1 {
                        "y was"
                    } else {
                        "ies were"
                    }
                ),
            )
        });
    }
    // Does the next line carry on the chain as if this one were not there?
    if let Some(Ok(q)) = parsed.get(i + 1) {
        if same_log(q)
            && q.seq == expected
            && q.prev == *expected_prev
            && backend.audit_check_mac(&lines[i + 1][..q.signed_len], &q.mac)?
        {
            let what = if !mac_ok {
                "its MAC does not verify (a forged line)"
            } else if !same_log(p) {
                "it belongs to another log"
            } else {
                "it is a copy of an earlier entry"
            };
            return Ok((
                ProblemKind::Inserted,
                format!("{what}, and the next line continues the chain without it: inserted"),
            ));
        }
    }
    if mac_ok && same_log(p) && p.seq < expected {
        let copy = lines[..i].iter().any(|l| *l == lines[i]);
        return Ok(if copy {
            (
                ProblemKind::Inserted,
                format!("a copy of the entry with seq {}: inserted", p.seq),
            )
        } else {
            (
                ProblemKind::Reordered,
                format!("seq {} where seq {expected} was expected: reordered", p.seq),
            )
        });
    }
    if mac_ok && !same_log(p) {
        return Ok((
            ProblemKind::Inserted,
            format!("it belongs to another log ({}): inserted", p.log),
        ));
    }
    if mac_ok {
        return Ok((
            ProblemKind::Edited,
            "its prev hash does not match the line before it: the line before was edited".into(),
        ));
    }
    Ok((
        ProblemKind::Edited,
        "its MAC does not verify in the HSM and it does not fit the chain: edited or forged".into(),
    ))
}

// ---- small helpers ----

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn new_log_id() -> String {
    let mut id = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
    hex(&id)
}

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
fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
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

fn unhex32(s: &[u8]) -> Option<[u8; 32]> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// The HSM's part in memory: an HMAC key and a map of heads.
    struct Memory {
        key: [u8; 32],
        heads: Mutex<HashMap<String, Head>>,
    }

    impl Memory {
        fn new(key: u8) -> Memory {
            Memory {
                key: [key; 32],
                heads: Mutex::new(HashMap::new()),
            }
        }
    }

    impl AuditBackend for Memory {
        fn check_audit_key(&self) -> Result<()> {
            Ok(())
        }
        fn audit_mac(&self, data: &[u8]) -> Result<[u8; 32]> {
            let mut m = Hmac::<Sha256>::new_from_slice(&self.key).unwrap();
            m.update(data);
            Ok(m.finalize().into_bytes().into())
        }
        fn audit_check_mac(&self, data: &[u8], mac: &[u8; 32]) -> Result<bool> {
            Ok(self.audit_mac(data)? == *mac)
        }
        fn audit_head(&self, log_id: &str) -> Result<Option<Head>> {
            Ok(self.heads.lock().unwrap().get(log_id).cloned())
        }
        fn set_audit_head(&self, log_id: &str, head: &Head) -> Result<()> {
            self.heads
                .lock()
                .unwrap()
                .insert(log_id.to_string(), head.clone());
            Ok(())
        }
        fn audit_heads_for_path(&self, path: &str) -> Result<Vec<(String, Head)>> {
            Ok(self
                .heads
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, h)| h.path == path)
                .map(|(id, h)| (id.clone(), h.clone()))
                .collect())
        }
    }

    fn rec(command: &str) -> Record {
        Record {
            command: command.into(),
            keys: vec!["k v1".into(), "weird \"name\"\n v2".into()],
            ok: 2,
            bytes: 10,
            result: "ok",
            error: Some("a.hseal: authentication failed\nsecond line".into()),
            ..Default::default()
        }
    }

    fn log_of(n: usize) -> (Memory, tempfile::TempDir, std::path::PathBuf) {
        let m = Memory::new(7);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        for i in 0..n {
            assert_eq!(
                append(&m, &p, &rec(&format!("c{i}")), false).unwrap(),
                i as u64
            );
        }
        (m, dir, p)
    }

    fn problem_of(m: &Memory, p: &Path) -> Option<(usize, ProblemKind)> {
        let r = verify(m, p).unwrap();
        assert_eq!(r.intact, r.problem.is_none());
        r.problem.map(|p| (p.line, p.kind))
    }

    fn rewrite(p: &Path, f: impl FnOnce(&mut Vec<String>)) {
        let mut l: Vec<String> = fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        f(&mut l);
        let mut t = l.join("\n");
        t.push('\n');
        fs::write(p, t).unwrap();
    }

    #[test]
    fn lines_have_the_fixed_layout_and_the_mac_covers_everything_before_it() {
        let (m, _d, p) = log_of(2);
        let text = fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("{\"v\":1,\"log\":\""), "{}", lines[0]);
        assert!(lines[0].contains(&format!("\"prev\":\"{}\"", "0".repeat(64))));
        let at = lines[1].find(",\"mac\":\"").unwrap();
        assert_eq!(at, lines[1].len() - MAC_SUFFIX_LEN);
        let mac = m.audit_mac(&lines[1].as_bytes()[..at]).unwrap();
        assert!(lines[1].ends_with(&format!("\"mac\":\"{}\"}}", hex(&mac))));
        assert!(lines[1].contains(&format!(
            "\"prev\":\"{}\"",
            hex(&sha256(lines[0].as_bytes()))
        )));
        // Newlines in values are escaped: one entry, one line.
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["keys"][1], "weird \"name\"\n v2");
        let order: Vec<&str> = [
            "v",
            "log",
            "seq",
            "time",
            "user",
            "host",
            "pid",
            "command",
            "keys",
            "items",
            "bytes",
            "hsm_calls",
            "seconds",
            "result",
            "exit_code",
            "error",
            "prev",
            "mac",
        ]
        .to_vec();
        let mut pos = 0;
        for f in order {
            let i = lines[1][pos..]
                .find(&format!("\"{f}\":"))
                .unwrap_or_else(|| panic!("{f} out of order"));
            pos += i;
        }
        assert_eq!(problem_of(&m, &p), None);
    }

    #[test]
    fn tampering_is_classified() {
        type Edit = fn(&mut Vec<String>);
        let cases: [(Edit, usize, ProblemKind); 9] = [
            (
                |l| l[2] = l[2].replace("\"bytes\":10", "\"bytes\":12"),
                3,
                ProblemKind::Edited,
            ),
            (
                |l| l[0] = l[0].replace("\"c0\"", "\"cX\""),
                1,
                ProblemKind::Edited,
            ),
            (|l| drop(l.remove(2)), 3, ProblemKind::Deleted),
            (|l| drop(l.drain(1..3)), 2, ProblemKind::Deleted),
            (|l| l.insert(3, l[1].clone()), 4, ProblemKind::Inserted),
            (|l| l.push(l[0].clone()), 6, ProblemKind::Inserted),
            (|l| l.swap(1, 2), 2, ProblemKind::Reordered),
            (|l| drop(l.pop()), 5, ProblemKind::Truncated),
            (|l| l[3] = "garbage".into(), 4, ProblemKind::Edited),
        ];
        for (i, (edit, line, kind)) in cases.into_iter().enumerate() {
            let (m, _d, p) = log_of(5);
            rewrite(&p, edit);
            assert_eq!(problem_of(&m, &p), Some((line, kind)), "case {i}");
            // Appending checks only the end of the log against the head
            // (a full check would cost an HSM call per line): a log whose
            // end changed is refused, a change in the middle is left to
            // `audit verify`.
            if line < 5 {
                continue;
            }
            let before = fs::read(&p).unwrap();
            let e = append(&m, &p, &rec("x"), false).unwrap_err();
            assert_eq!(
                e.kind(),
                crate::error::ErrorKind::Integrity,
                "case {i}: {e}"
            );
            assert!(e.message().contains("hsmseal audit verify"), "{e}");
            assert_eq!(fs::read(&p).unwrap(), before);
        }
    }

    #[test]
    fn a_line_cut_short_and_a_log_from_another_key() {
        let (m, _d, p) = log_of(3);
        let text = fs::read(&p).unwrap();
        fs::write(&p, &text[..text.len() - 10]).unwrap();
        assert_eq!(problem_of(&m, &p), Some((3, ProblemKind::Truncated)));
        fs::write(&p, &text).unwrap();
        let other = Memory::new(8);
        *other.heads.lock().unwrap() = m.heads.lock().unwrap().clone();
        assert_eq!(problem_of(&other, &p), Some((1, ProblemKind::Edited)));
        // The head gone: not intact either.
        m.heads.lock().unwrap().clear();
        assert_eq!(problem_of(&m, &p), Some((3, ProblemKind::NoHead)));
    }

    #[test]
    fn the_crash_window_between_line_and_head_is_accepted_once() {
        let (m, _d, p) = log_of(3);
        let id = m.heads.lock().unwrap().keys().next().unwrap().clone();
        // As if the run that wrote line 3 died before updating the head.
        let lines: Vec<String> = fs::read_to_string(&p)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        let behind = Head {
            seq: 1,
            hash: sha256(lines[1].as_bytes()),
            path: absolute(&p).unwrap(),
        };
        m.set_audit_head(&id, &behind).unwrap();
        let r = verify(&m, &p).unwrap();
        assert!(r.intact && r.note.is_some(), "{r:?}");
        // The next append accepts it and brings the head up to date.
        assert_eq!(append(&m, &p, &rec("after"), false).unwrap(), 3);
        let r = verify(&m, &p).unwrap();
        assert!(r.intact && r.note.is_none(), "{r:?}");
        // Two behind is not a crash: refused.
        let two_behind = Head { seq: 1, ..behind };
        m.set_audit_head(&id, &two_behind).unwrap();
        assert_eq!(problem_of(&m, &p), Some((3, ProblemKind::Inserted)));
        assert!(append(&m, &p, &rec("x"), false).is_err());
    }

    #[test]
    fn a_deleted_log_is_not_silently_restarted() {
        let (m, _d, p) = log_of(2);
        fs::remove_file(&p).unwrap();
        assert_eq!(problem_of(&m, &p), Some((1, ProblemKind::Truncated)));
        assert!(check(&m, &p).is_err());
        assert!(append(&m, &p, &rec("x"), false).is_err());
        // `audit init` (new_log_ok) starts a new log with a new id.
        assert_eq!(append(&m, &p, &rec("audit init"), true).unwrap(), 0);
        assert_eq!(problem_of(&m, &p), None);
        assert_eq!(m.heads.lock().unwrap().len(), 2);
    }

    #[test]
    fn concurrent_appends_are_serialised_by_the_lock() {
        let (m, _d, p) = log_of(1);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (m, p) = (&m, &p);
                s.spawn(move || {
                    for i in 0..10 {
                        append(m, p, &rec(&format!("t{t}-{i}")), false).unwrap();
                    }
                });
            }
        });
        let r = verify(&m, &p).unwrap();
        assert!(r.intact, "{r:?}");
        assert_eq!(r.entries, 41);
    }

    #[test]
    fn heads_round_trip() {
        let h = Head {
            seq: 42,
            hash: [0xab; 32],
            path: "/var/log/with space/audit.log".into(),
        };
        assert_eq!(Head::decode(&h.encode()), Some(h.clone()));
        assert_eq!(Head::decode(b"v2 1 00"), None);
        assert_eq!(Head::decode(b"v1 -1 00"), None);
    }

    fn log_id_of(m: &Memory) -> String {
        m.heads.lock().unwrap().keys().next().unwrap().clone()
    }

    fn append_bytes(p: &Path, b: &[u8]) {
        let mut f = OpenOptions::new().append(true).open(p).unwrap();
        std::io::Write::write_all(&mut f, b).unwrap();
    }

    /// Line `i` (0-based) of the log, without its `\n`.
    fn line_of(p: &Path, i: usize) -> Vec<u8> {
        fs::read(p)
            .unwrap()
            .split(|&b| b == b'\n')
            .nth(i)
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_torn_tail_is_repaired_by_the_next_append_and_the_repair_is_logged() {
        let (m, _d, p) = log_of(3);
        let before = fs::read(&p).unwrap();
        // What a write cut short by a kill or a full disk leaves: the start
        // of the next line, no `\n`, the head still naming line 3.
        let torn = b"{\"v\":1,\"log\":\"0123456789abcdef\",\"seq\":3,\"ti";
        append_bytes(&p, torn);
        let r = verify(&m, &p).unwrap();
        assert!(r.intact && r.entries == 3, "{r:?}");
        let note = r.note.unwrap();
        assert!(
            note.contains("line 4 is an incomplete line of 43 bytes"),
            "{note}"
        );
        check(&m, &p).unwrap();
        assert_eq!(append(&m, &p, &rec("next"), false).unwrap(), 4);
        let after = fs::read(&p).unwrap();
        assert!(after.starts_with(&before) && after.ends_with(b"\n"));
        assert!(!after.windows(torn.len()).any(|w| w == torn));
        let r = verify(&m, &p).unwrap();
        assert!(r.intact && r.note.is_none() && r.entries == 5, "{r:?}");
        assert_eq!(r.repairs.len(), 1);
        assert_eq!((r.repairs[0].line, r.repairs[0].bytes), (4, 43));
        assert!(
            r.repairs[0].detail.contains(&hex(&sha256(torn))),
            "{:?}",
            r.repairs[0]
        );
        let v: serde_json::Value = serde_json::from_slice(&line_of(&p, 3)).unwrap();
        assert_eq!(v["command"], REPAIR_COMMAND);
        assert_eq!(v["result"], "repaired");
        assert_eq!(v["seq"], 3);
        // The head names the run's own line.
        let id = log_id_of(&m);
        assert_eq!(m.heads.lock().unwrap()[&id].seq, 4);
    }

    #[test]
    fn a_torn_tail_after_the_crash_window_and_junk_are_repaired_too() {
        // Head one behind (a run killed after its fsync), then a torn tail.
        let (m, _d, p) = log_of(3);
        let id = log_id_of(&m);
        let behind = Head {
            seq: 1,
            hash: sha256(&line_of(&p, 1)),
            path: absolute(&p).unwrap(),
        };
        m.set_audit_head(&id, &behind).unwrap();
        append_bytes(&p, b"junk that is not a line");
        let r = verify(&m, &p).unwrap();
        assert!(r.intact, "{r:?}");
        let note = r.note.unwrap();
        assert!(
            note.contains("one entry behind") && note.contains("incomplete"),
            "{note}"
        );
        assert_eq!(append(&m, &p, &rec("next"), false).unwrap(), 4);
        let r = verify(&m, &p).unwrap();
        assert!(r.intact && r.note.is_none() && r.entries == 5, "{r:?}");
        assert_eq!(r.repairs.len(), 1);
    }

    #[test]
    fn a_line_missing_only_its_newline_is_completed_not_removed() {
        let (m, _d, p) = log_of(3);
        let id = log_id_of(&m);
        let full = fs::read(&p).unwrap();
        // Cut short just before the `\n`, in the crash window (head behind)
        // and after the head was set: both times the line is kept.
        for behind in [true, false] {
            fs::write(&p, &full[..full.len() - 1]).unwrap();
            if behind {
                let h = Head {
                    seq: 1,
                    hash: sha256(&line_of(&p, 1)),
                    path: absolute(&p).unwrap(),
                };
                m.set_audit_head(&id, &h).unwrap();
            }
            let r = verify(&m, &p).unwrap();
            assert!(r.intact && r.entries == 3, "{r:?}");
            assert!(r.note.unwrap().contains("lacks its final newline"));
            check(&m, &p).unwrap();
            assert_eq!(append(&m, &p, &rec("next"), false).unwrap(), 3);
            let r = verify(&m, &p).unwrap();
            assert!(r.intact && r.note.is_none() && r.entries == 4, "{r:?}");
            assert!(r.repairs.is_empty());
            assert!(fs::read(&p).unwrap().starts_with(&full));
            fs::write(&p, &full).unwrap();
            let h = Head {
                seq: 2,
                hash: sha256(&line_of(&p, 2)),
                path: absolute(&p).unwrap(),
            };
            m.set_audit_head(&id, &h).unwrap();
        }
    }

    #[test]
    fn repair_cannot_delete_an_authenticated_line() {
        let (m, _d, p) = log_of(3);
        let full = fs::read(&p).unwrap();
        let last_len = line_of(&p, 2).len();
        // The last line, which the head names, cut short by any amount:
        // that is truncation, never a torn tail to remove.
        for cut in [2, 10, last_len / 2, last_len] {
            fs::write(&p, &full[..full.len() - cut]).unwrap();
            assert_eq!(
                problem_of(&m, &p),
                Some((3, ProblemKind::Truncated)),
                "cut {cut}"
            );
            let e = check(&m, &p).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Integrity, "{e}");
            let e = append(&m, &p, &rec("x"), false).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Integrity, "{e}");
            assert_eq!(fs::read(&p).unwrap(), &full[..full.len() - cut]);
        }
        // An authenticated earlier line appended without its `\n`: it does
        // not carry on the chain, so it is junk to the repair, which records
        // its hash; nothing before it changes.
        fs::write(&p, &full).unwrap();
        let copy = line_of(&p, 1);
        append_bytes(&p, &copy);
        append(&m, &p, &rec("x"), false).unwrap();
        let r = verify(&m, &p).unwrap();
        assert!(r.intact && r.entries == 5, "{r:?}");
        assert!(r.repairs[0].detail.contains(&hex(&sha256(&copy))));
        assert!(fs::read(&p).unwrap().starts_with(&full));
        // More than a line without a `\n` is no torn line.
        let (m, _d, p) = log_of(3);
        append_bytes(&p, &vec![b'x'; MAX_LINE + 1]);
        assert_eq!(problem_of(&m, &p), Some((4, ProblemKind::Inserted)));
        assert!(check(&m, &p).is_err());
        assert!(append(&m, &p, &rec("x"), false).is_err());
    }

    #[test]
    fn the_current_head_is_the_highest() {
        let h = |seq, b| Head {
            seq,
            hash: [b; 32],
            path: "/l".into(),
        };
        assert_eq!(current_head(vec![]), Ok(None));
        assert_eq!(current_head(vec![h(4, 1), h(5, 2)]), Ok(Some(h(5, 2))));
        assert_eq!(current_head(vec![h(5, 2), h(4, 1)]), Ok(Some(h(5, 2))));
        assert_eq!(current_head(vec![h(5, 2), h(5, 2)]), Ok(Some(h(5, 2))));
        assert!(current_head(vec![h(5, 2), h(5, 3), h(1, 1)]).is_err());
    }

    #[test]
    fn a_run_with_too_many_keys_still_gets_one_line() {
        let (m, _d, p) = log_of(1);
        let mut r = rec("many");
        r.keys = (0..10_000).map(|i| format!("key-{i:05} v1")).collect();
        append(&m, &p, &r, false).unwrap();
        let line = line_of(&p, 1);
        assert!(line.len() <= MAX_LINE, "{}", line.len());
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let keys = v["keys"].as_array().unwrap();
        let kept = keys.len() - 1;
        assert!(kept > 100, "{kept}");
        assert_eq!(keys[kept], format!("+{} more", 10_000 - kept));
        assert_eq!(problem_of(&m, &p), None);
    }
}
