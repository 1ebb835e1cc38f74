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
            KeyCommand::List | KeyCommand::Info { .. } => return None,
        },
        Command::Columns(c) => match c {
            ColumnsCommand::Encrypt(_) => "columns encrypt",
            ColumnsCommand::Decrypt(_) => "columns decrypt",
            ColumnsCommand::Rewrap(_) => "columns rotate",
            ColumnsCommand::Passthrough(_) => return None,
        },
        Command::Pg(p) => match p {
            PgCommand::Encrypt(_) => "pg encrypt",
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
