//! One module per subcommand (and `deps`, the search that `inspect --deps`
//! and `key destroy|purge --check` share), and [`run`], which dispatches a
//! parsed command line to them around the audit log's check and entry.
//! Each turns its parsed arguments into work and returns the process exit
//! code (0 success, 1 some items failed); hard failures come back as
//! `Error`, whose kind picks the exit code. Commands use the layers below
//! them (`bulk`, `outputs`, `select`, `input`, `report`, `app`, `cli`) and
//! the library; nothing below imports a command.

pub mod audit;
pub mod columns;
pub mod config;
pub mod decrypt;
mod deps;
pub mod doctor;
pub mod encrypt;
pub mod init;
pub mod inspect;
pub mod key;
pub mod pg;
pub mod rewrap;
pub mod verify;

#[cfg(test)]
mod tests;

use crate::app::App;
use crate::cli::{Cli, ColumnsCommand, Command};
use crate::config::{self as settings, Overrides};
use hsmseal::error::Result;

/// What must be done before any other thread starts: the settings
/// resolved and `SOFTHSM2_CONF` exported for the PKCS#11 module (the dev
/// token of `hsmseal.toml`, or the one `init --dev` is creating). `None`
/// for `init`, which does not read a configuration.
pub fn prepare(cli: &Cli) -> Result<Option<settings::Settings>> {
    if let Command::Init(args) = &cli.command {
        init::export_softhsm2_conf(args)?;
        return Ok(None);
    }
    let g = &cli.global;
    let overrides = Overrides {
        module: g.module.clone(),
        token: g.token.clone(),
        pin_file: g.pin_file.clone(),
        key: None,
        jobs: g.jobs,
        audit_log: g.audit_log.clone(),
    };
    let resolved = settings::resolve(&overrides)?;
    resolved.export_softhsm2_conf();
    Ok(Some(resolved))
}

/// Runs one parsed command line, with what [`prepare`] made of it.
pub fn run(cli: Cli, prepared: Result<Option<settings::Settings>>) -> Result<i32> {
    // Held to the end: a `columns` run to stdout that fails at any step
    // ends its stream with the abort marker (issue 9).
    let _stdout = columns::guard_stdout(&cli.command);
    // `columns` writes its dump to stdout (or -o): its JSON lines, errors
    // included, always go to stderr, which then carries nothing else.
    // `columns inspect` writes no dump: its report is its stdout.
    if matches!(&cli.command, Command::Columns(c) if !matches!(c, ColumnsCommand::Inspect(_))) {
        crate::report::json_on_stderr();
    }
    let g = &cli.global;
    // Lock waits and stale temporary files removed are announced unless --quiet.
    if !g.quiet {
        hsmseal::notify::set_notifier(|msg| crate::report::diag(format!("hsmseal: {msg}")));
    }
    if let Command::Init(args) = &cli.command {
        // init must not depend on an existing configuration.
        prepared?;
        return init::run(args, g.module.as_deref(), g.json, g.quiet);
    }
    let Some(resolved) = prepared? else {
        unreachable!("prepare resolves settings for every command but init")
    };
    // Shared with the signal thread, which logs an interrupted run.
    let app = std::sync::Arc::new(App::new(resolved, g.json, g.quiet));
    // A command that touches keys or data runs only if its audit entry can
    // be appended afterwards (log intact, audit key present): checked first.
    let logged = audit::logged_name(&cli.command)
        .and_then(|name| audit::configured_log(&app).map(|log| (name, log)));
    if let Some((name, log)) = &logged {
        let hsm = app
            .hsm()
            .map_err(|e| tokenless_audit(&app, &cli.command, e))?;
        hsmseal::audit::check(&*hsm, log)?;
        audit::log_if_interrupted(&app, name, log);
    }
    let outcome = match cli.command {
        Command::Init(_) => unreachable!("handled above"),
        Command::Key(cmd) => key::run(&app, cmd),
        Command::Encrypt(args) => encrypt::run(&app, args),
        Command::Decrypt(args) => decrypt::run(&app, args),
        Command::Verify(args) => verify::run(&app, args),
        Command::Inspect(args) => inspect::run(&app, args),
        Command::Rewrap(args) => rewrap::run(&app, args),
        Command::Doctor => doctor::run(&app),
        Command::Config(cmd) => config::run(&app, cmd),
        Command::Columns(cmd) => columns::run(&app, cmd),
        Command::Audit(cmd) => audit::run(&app, cmd),
        Command::Pg(cmd) => pg::run(&app, cmd),
    };
    match logged {
        Some((name, log)) => audit::after_run(&app, &name, &log, outcome),
        None => outcome,
    }
}

/// A recipients-only `encrypt` needs no token, except for a configured
/// audit log: its entries are MACed by the token's audit key. On a host
/// that cannot reach the token the run is refused, naming the setting to
/// change, rather than logged unauthenticated: an entry anyone could have
/// written is what an audit log must never contain, and an operator who
/// configured one expects every run in it (docs/SECURITY.md, "The audit
/// log"; README, "Deploying: backup hosts without the PIN").
fn tokenless_audit(app: &App, cmd: &Command, e: hsmseal::error::Error) -> hsmseal::error::Error {
    let recipients_only = matches!(cmd, Command::Encrypt(a)
        if a.key.is_empty() && a.group.is_none() && !a.recipient.is_empty());
    match &app.settings.audit_log {
        Some(s) if recipients_only => hsmseal::error::Error::new(
            e.kind(),
            format!(
                "encrypt --recipient needs no token, but the audit log {} (audit_log, set by {}) is signed with the token's audit key, which this host cannot reach ({}); on a backup host without the token remove that audit_log setting (the token's hosts keep the log), or give this host the token",
                s.value.display(),
                s.source,
                e.message()
            ),
        ),
        _ => e,
    }
}
