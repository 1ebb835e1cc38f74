//! `audit verify`: a whole log checked line by line (syntax, chain, MACs in
//! the HSM) and against the HSM head; the first problem is classified
//! (edited, deleted, inserted, reordered, truncated, another key's log) and
//! `audit repair` entries are told apart from tampering.

use super::line::{parse_line, Parsed, MAX_LINE};
use super::log::{absolute, completes_chain, first_line_in_crash_window, REPAIR_COMMAND};
use super::{sha256, AuditBackend, ZERO_HASH};
use crate::error::{Error, Result};
use serde::Serialize;
use std::fs;
use std::path::Path;

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
                        "the log is missing, but the HSM's head record says log {id} there had {}",
                        crate::error::count(head.seq + 1, "entry", "entries")
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
                "the log holds no complete entry, only an incomplete line of {}",
                crate::error::count(torn.len() as u64, "byte", "bytes")
            )
        };
        let had = backend
            .audit_heads_for_path(&abs)?
            .into_iter()
            .next()
            .map(|(id, h)| {
                format!(
                    ", but the HSM's head record says log {id} there had {}",
                    crate::error::count(h.seq + 1, "entry", "entries")
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
        "line {} is an incomplete line of {}, not an entry: an append was cut short (kill, crash or full disk) before its line was complete and before the HSM's head record named it; nothing authenticated is missing, and the next append replaces it with an `{REPAIR_COMMAND}` entry",
        n + 1,
        crate::error::count(len as u64, "byte", "bytes")
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
