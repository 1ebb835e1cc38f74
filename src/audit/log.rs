//! The log file: appending one entry under an exclusive `flock`, after
//! checking the file's end against the HSM head (and repairing a torn tail
//! left by a kill, a crash or a full disk), and the check a command runs
//! before it starts. See the invariants in `crate::audit`.

use super::line::{finish_line, parse_line, signed_part, Parsed, MAC_SUFFIX_LEN, MAX_LINE};
use super::{
    faults, hex, host_name, new_log_id, os_user, sha256, AuditBackend, Head, Record, ZERO_HASH,
};
use crate::error::{Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

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
pub(super) fn absolute(path: &Path) -> Result<String> {
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
pub(super) fn completes_chain(
    backend: &dyn AuditBackend,
    last: Option<&[u8]>,
    torn: &[u8],
) -> Result<bool> {
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
pub(super) fn first_line_in_crash_window(
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
                            "the log is missing or holds no complete entry{torn_note}, but the HSM's head record says log {id} there had {} (it was deleted or truncated). `hsmseal audit init` starts a new log once you have investigated",
                            crate::error::count(head.seq + 1, "entry", "entries")
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
        crate::time::rfc3339(crate::time::now_unix()),
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
            "removed an incomplete line of {} (SHA-256 {}) left by an interrupted append (kill, crash or full disk); the HSM's head record never named it",
            crate::error::count(torn.len() as u64, "byte", "bytes"),
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
/// `plan`.
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
    faults::after("locked");
    let end = read_end(&mut f, path)?;
    let mut plan = plan(backend, end, path, &abs, new_log_ok)?;
    faults::after("checked");
    let mut end = plan.len;
    if let Fix::Complete = plan.fix {
        f.write_all_at(b"\n", end)
            .and_then(|_| f.sync_data())
            .map_err(|e| write_error(path, &e))?;
        end += 1;
        faults::after("completed");
    }
    if let Some(head) = plan.catch_up.take() {
        backend.set_audit_head(&plan.log_id, &head)?;
        faults::after("head-caught-up");
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
        faults::after("repair-written");
        let new_end = plan.torn_at + bytes.len() as u64;
        if end > new_end {
            f.set_len(new_end).map_err(|e| write_error(path, &e))?;
        }
        f.sync_data().map_err(|e| write_error(path, &e))?;
        faults::after("repair-synced");
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
        faults::after("repair-head");
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
        faults::after("torn-write");
    }
    f.write_all_at(&bytes, end).map_err(|e| undo(&f, e))?;
    faults::after("written");
    f.sync_data().map_err(|e| undo(&f, e))?;
    faults::after("synced");
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
    faults::after("head-set");
    Ok(plan.seq)
}
