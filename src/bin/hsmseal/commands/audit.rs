//! `hsmseal audit init|verify`, and the per-run hook that appends one entry
//! to the audit log for every command that touches keys or data (see
//! `hsmseal::audit` and docs/FORMAT.md section 7).

use crate::app::App;
use crate::cli::ColumnsCommand;
use crate::cli::{AuditCommand, Command, KeyCommand, PgCommand};
use hsmseal::audit::{self, Record};
use hsmseal::error::{Error, ErrorKind, Result};
use hsmseal::hsm::audit_key::{AuditKeyStatus, AUDIT_KEY_LABEL};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub fn run(app: &App, cmd: AuditCommand) -> Result<i32> {
    match cmd {
        AuditCommand::Init => init(app),
        AuditCommand::Verify { log } => verify(app, log),
        AuditCommand::Report {
            log,
            since,
            alert_over,
        } => report(app, log, since, alert_over),
    }
}

/// The configured audit log, if any.
pub fn configured_log(app: &App) -> Option<PathBuf> {
    app.settings.audit_log.as_ref().map(|s| s.value.clone())
}

/// The name a run is logged under, or `None` for commands that are not
/// logged (read-only: inspect, doctor, config, key list/info, audit verify;
/// and audit init, which logs itself).
pub fn logged_name(cmd: &Command) -> Option<String> {
    let name = match cmd {
        Command::Encrypt(_) => "encrypt",
        // An override of the decrypt limits is named in the entry itself.
        Command::Decrypt(a) if a.override_limits => "decrypt --override-limits",
        Command::Decrypt(_) => "decrypt",
        Command::Verify(_) => "verify",
        // The names entries had before `rotate` became `rewrap`, kept so
        // that logs read the same across versions (CHANGELOG 0.2).
        Command::Rewrap(_) => "rotate",
        Command::Key(k) => match k {
            KeyCommand::Create { .. } => "key create",
            KeyCommand::Rotate { .. } => "key rotate",
            KeyCommand::Disable { .. } => "key disable",
            KeyCommand::Enable { .. } => "key enable",
            KeyCommand::Destroy { .. } => "key destroy",
            KeyCommand::Purge { .. } => "key purge",
            KeyCommand::BackupTarget { .. } => "key backup-target",
            KeyCommand::BackupTrust { .. } => "key backup-trust",
            KeyCommand::Backup { .. } => "key backup",
            KeyCommand::Restore { .. } => "key restore",
            KeyCommand::List | KeyCommand::Info { .. } | KeyCommand::ExportPublic { .. } => {
                return None
            }
        },
        Command::Columns(c) => match c {
            ColumnsCommand::Encrypt(_) => "columns encrypt",
            ColumnsCommand::Decrypt(a) if a.override_limits => "columns decrypt --override-limits",
            ColumnsCommand::Decrypt(_) => "columns decrypt",
            ColumnsCommand::Rewrap(_) => "columns rotate",
            ColumnsCommand::Passthrough(_) | ColumnsCommand::Inspect(_) => return None,
            ColumnsCommand::Index(_) => "columns index",
        },
        Command::Pg(p) => match p {
            PgCommand::Encrypt(_) => "pg encrypt",
            PgCommand::Decrypt(a) if a.override_limits => "pg decrypt --override-limits",
            PgCommand::Decrypt(_) => "pg decrypt",
            PgCommand::Rotate(_) => "pg rotate",
            PgCommand::Verify(_) => "pg verify",
            PgCommand::Status(_) => return None,
        },
        Command::Init(_)
        | Command::Inspect(_)
        | Command::Doctor
        | Command::Config(_)
        | Command::Audit(_) => return None,
    };
    Some(name.to_string())
}

/// What this run did, from `app.stats`, for its audit entry.
fn record(app: &App, command: &str, outcome: &Result<i32>) -> Record {
    let (result, exit_code, error) = match outcome {
        Ok(0) => ("ok", 0, None),
        Ok(code) => ("failed", *code, None),
        // The summary, not the message: messages name files and rows, and
        // an entry never holds a path (docs/FORMAT.md 7.1).
        Err(e) => ("error", e.exit_code(), Some(e.summary())),
    };
    record_as(app, command, result, exit_code, error)
}

fn record_as(
    app: &App,
    command: &str,
    result: &'static str,
    exit_code: i32,
    error: Option<String>,
) -> Record {
    Record {
        command: command.to_string(),
        keys: app.stats.keys().iter().map(|k| k.to_string()).collect(),
        ok: app.stats.ok(),
        failed: app.stats.failed(),
        skipped: app.stats.skipped(),
        bytes: app.stats.bytes(),
        hsm_calls: app.hsm_calls(),
        seconds: app.started.elapsed().as_secs_f64(),
        result,
        exit_code,
        error,
    }
}

/// After a logged command: appends its entry. If that fails, a run that
/// had succeeded ends with `ErrorKind::Unaudited` (exit 9: the work is done
/// but unaudited, and the caller must know — neither "failed, redo it" nor
/// an audited success); a run that had failed (an error, or exit 1 for some
/// failed items) keeps its own exit code, and the audit failure is reported
/// on stderr as a second line.
pub fn after_run(app: &App, command: &str, log: &Path, outcome: Result<i32>) -> Result<i32> {
    let rec = record(app, command, &outcome);
    let appended = crate::signals::without_interrupt_hook(|| {
        app.hsm()
            .and_then(|hsm| audit::append(&*hsm, log, &rec, false))
    });
    match (appended, outcome) {
        (Ok(_), outcome) => outcome,
        (Err(ae), Ok(0)) => Err(Error::new(
            ErrorKind::Unaudited,
            format!("`{command}` completed, but its audit entry was not written: {ae}"),
        )),
        (Err(ae), outcome) => {
            crate::report::diag(format!(
                "hsmseal: error: the audit entry of this failed `{command}` was not written: {ae}"
            ));
            outcome
        }
    }
}

/// Before a logged command: if SIGINT/SIGTERM (or a closed stdout) stops
/// it, the stopping thread appends an entry with `"result":"interrupted"`,
/// its exit code (130, 143, 141),
/// and the counts so far (files already decrypted are on disk: the log must
/// say so). A run killed outright (SIGKILL, power loss) leaves no entry.
pub fn log_if_interrupted(app: &Arc<App>, command: &str, log: &Path) {
    let (app, command, log) = (Arc::clone(app), command.to_string(), log.to_path_buf());
    crate::signals::on_interrupt(move |code, why| {
        let rec = record_as(&app, &command, "interrupted", code, Some(why.to_string()));
        let appended = app
            .hsm()
            .and_then(|hsm| audit::append(&*hsm, &log, &rec, false));
        if let Err(e) = appended {
            crate::report::diag(format!("hsmseal: error: the audit entry of this interrupted `{command}` was not written: {e}"));
        }
    });
}

fn init(app: &App) -> Result<i32> {
    let hsm = app.hsm()?;
    let token = hsm.token_label().to_string();
    let status = hsm.create_audit_key()?;
    let mut seq = None;
    let log = configured_log(app);
    if let Some(log) = &log {
        match status {
            AuditKeyStatus::Created => app.stats.ok.fetch_add(1, Ordering::Relaxed),
            AuditKeyStatus::Exists => app.stats.skipped.fetch_add(1, Ordering::Relaxed),
        };
        let rec = record(app, "audit init", &Ok(0));
        seq = Some(audit::append(&*hsm, log, &rec, true)?);
    }
    if app.json {
        crate::report::emit(
            "audit",
            &serde_json::json!({
                "action": "init",
                "token": token,
                "key": AUDIT_KEY_LABEL,
                "created": status == AuditKeyStatus::Created,
                "log": log,
                "seq": seq,
            }),
        );
        return Ok(0);
    }
    match status {
        AuditKeyStatus::Created => crate::outln!(
            "created the audit HMAC key {AUDIT_KEY_LABEL} on token {token} (never extractable; signs with CKM_SHA256_HMAC only)"
        ),
        AuditKeyStatus::Exists => crate::outln!(
            "the audit HMAC key {AUDIT_KEY_LABEL} already exists on token {token}; nothing changed in the HSM"
        ),
    }
    match (&log, seq) {
        (Some(log), Some(seq)) => crate::outln!("appended entry {seq} to audit log {}", log.display()),
        _ => crate::outln!(
            "no audit log is configured: set --audit-log PATH, HSMSEAL_AUDIT_LOG or audit_log in hsmseal.toml"
        ),
    }
    Ok(0)
}

/// One group of `audit report`: decrypt runs of one user, host, key and
/// command in the window.
#[derive(serde::Serialize, Default, Clone)]
struct ReportRow {
    user: String,
    host: String,
    key: String,
    command: String,
    runs: u64,
    /// Files (decrypt) decrypted.
    items: u64,
    /// Column cells (columns decrypt, pg decrypt) decrypted.
    cells: u64,
    bytes: u64,
    /// Runs that used --override-limits.
    overrides: u64,
}

/// The commands `audit report` counts, and whether their `ok` counts are
/// cells (columns, pg) or items (files).
fn decrypt_kind(command: &str) -> Option<bool> {
    match command {
        "decrypt" | "decrypt --override-limits" => Some(false),
        "columns decrypt"
        | "columns decrypt --override-limits"
        | "pg decrypt"
        | "pg decrypt --override-limits" => Some(true),
        _ => None,
    }
}

/// `audit report`: verify the log (an unverified log is not summarised),
/// then sum the decrypt runs since `now - since`.
fn report(app: &App, log: Option<PathBuf>, since: u64, alert_over: Option<u64>) -> Result<i32> {
    let path = log.or_else(|| configured_log(app)).ok_or_else(|| {
        Error::usage(
            "no audit log given: pass LOG, or configure one with --audit-log, HSMSEAL_AUDIT_LOG or audit_log in hsmseal.toml",
        )
    })?;
    let hsm = app.hsm()?;
    let checked = audit::verify(&*hsm, &path)?;
    if let Some(p) = &checked.problem {
        return Err(Error::integrity(format!(
            "audit log {}: line {}: {} [{}]; not summarised (run `hsmseal audit verify`)",
            path.display(),
            p.line,
            p.message,
            p.kind
        )));
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io_at("cannot read", path.display(), &e))?;
    let now = hsmseal::time::now_unix();
    let cutoff = now.saturating_sub(since);
    let mut rows: std::collections::BTreeMap<(String, String, String, String), ReportRow> =
        Default::default();
    let mut totals: std::collections::BTreeMap<(String, String), u64> = Default::default();
    // Only the lines `verify` found intact (a torn last line is not).
    for line in text.lines().take(checked.entries) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        let Some(cells) = decrypt_kind(&s("command")) else {
            continue;
        };
        let Some(t) = hsmseal::time::parse_rfc3339(&s("time")) else {
            continue;
        };
        if t < cutoff {
            continue;
        }
        let ok = v["items"]["ok"].as_u64().unwrap_or(0);
        let bytes = v["bytes"].as_u64().unwrap_or(0);
        let command = s("command");
        let plain = command.trim_end_matches(" --override-limits").to_string();
        let keys: Vec<String> = v["keys"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|k| k.as_str())
                    // "name vN": the report is per key name.
                    .map(|k| k.split(' ').next().unwrap_or(k).to_string())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect()
            })
            .unwrap_or_default();
        // Alerts: per user and host, every key and command together, each
        // run once (column decrypt entries do not name their keys: they
        // count under "-" in the rows).
        *totals.entry((s("user"), s("host"))).or_default() += ok;
        let keys = if keys.is_empty() {
            vec!["-".to_string()]
        } else {
            keys
        };
        for key in keys {
            let id = (s("user"), s("host"), key.clone(), plain.clone());
            let r = rows.entry(id).or_insert_with(|| ReportRow {
                user: s("user"),
                host: s("host"),
                key,
                command: plain.clone(),
                ..ReportRow::default()
            });
            r.runs += 1;
            if cells {
                r.cells += ok;
            } else {
                r.items += ok;
            }
            r.bytes += bytes;
            if command != plain {
                r.overrides += 1;
            }
        }
    }
    let alerts: Vec<String> = match alert_over {
        Some(n) => totals
            .iter()
            .filter(|(_, t)| **t > n)
            .map(|((u, h), t)| format!("{u}@{h} decrypted {t} items and cells (alert over {n})"))
            .collect(),
        None => Vec::new(),
    };
    let since_text = hsmseal::time::rfc3339(cutoff);
    if app.json {
        for r in rows.values() {
            crate::report::emit("audit_report", r);
        }
        crate::report::emit(
            "audit_report_summary",
            &serde_json::json!({"log": path.display().to_string(), "since": since_text, "entries": checked.entries, "groups": rows.len(), "alerts": alerts}),
        );
    } else {
        crate::outln!(
            "decrypted since {since_text} ({}, verified):",
            path.display()
        );
        if rows.is_empty() {
            crate::outln!("  nothing");
        } else {
            crate::outln!(
                "  {:<12} {:<16} {:<16} {:<16} {:>5} {:>10} {:>10} {:>14} {:>9}",
                "USER",
                "HOST",
                "KEY",
                "COMMAND",
                "RUNS",
                "ITEMS",
                "CELLS",
                "BYTES",
                "OVERRIDES"
            );
            for r in rows.values() {
                crate::outln!(
                    "  {:<12} {:<16} {:<16} {:<16} {:>5} {:>10} {:>10} {:>14} {:>9}",
                    r.user,
                    r.host,
                    r.key,
                    r.command,
                    r.runs,
                    r.items,
                    r.cells,
                    r.bytes,
                    r.overrides
                );
            }
        }
    }
    for a in &alerts {
        eprintln!("hsmseal: alert: {a}");
    }
    Ok(if alerts.is_empty() { 0 } else { 1 })
}

fn verify(app: &App, log: Option<PathBuf>) -> Result<i32> {
    let path = log.or_else(|| configured_log(app)).ok_or_else(|| {
        Error::usage(
            "no audit log given: pass LOG, or configure one with --audit-log, HSMSEAL_AUDIT_LOG or audit_log in hsmseal.toml",
        )
    })?;
    let hsm = app.hsm()?;
    let report = audit::verify(&*hsm, &path)?;
    if app.json {
        crate::report::emit("audit", &report);
    }
    if let Some(p) = &report.problem {
        let intact = match p.line {
            0 | 1 => String::new(),
            2 => "; line 1 is intact".to_string(),
            n => format!("; lines 1-{} are intact", n - 1),
        };
        return Err(Error::integrity(format!(
            "audit log {}: line {}: {} [{}{intact}]",
            path.display(),
            p.line,
            p.message,
            p.kind,
        )));
    }
    if !app.json {
        crate::outln!(
            "{}: {}, chain intact, head matches the HSM",
            path.display(),
            hsmseal::error::count(report.entries as u64, "entry", "entries")
        );
    }
    for r in &report.repairs {
        app.info(format!(
            "hsmseal: note: line {} is an `{}` entry, not tampering: {}",
            r.line,
            audit::REPAIR_COMMAND,
            r.detail
        ));
    }
    if let Some(n) = &report.note {
        app.info(format!("hsmseal: note: {n}"));
    }
    Ok(0)
}
