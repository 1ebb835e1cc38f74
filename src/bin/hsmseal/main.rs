//! The `hsmseal` binary: harden the process, parse flags, run the command,
//! turn the outcome into an exit code. The cryptography, formats and HSM
//! access are in the `hsmseal` library; this crate is its command line.

mod app;
mod bulk;
mod cli;
mod commands;
mod config;
mod faults;
mod hardening;
mod input;
mod outputs;
mod report;
mod select;
mod signals;
mod tty;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};

fn main() {
    // Before anything reads the PIN or a key: no core dump may hold them.
    hardening::disable_core_dumps();
    // A panic the Parquet reader raises on a malformed file is contained
    // and reported as a one-line error (exit 8): no panic message for it.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !hsmseal::columns::parquet::panic_is_contained() {
            hook(info)
        }
    }));
    // An empty HSMSEAL_* variable means "unset" (config::resolve reads them
    // so); clap would parse it as an empty value. Removed here, before any
    // thread exists, so the environment is never changed under a reader.
    for name in env_vars(&cli::Cli::command()) {
        if std::env::var_os(&name).is_some_and(|v| v.is_empty()) {
            std::env::remove_var(&name);
        }
    }
    let matches = cli::Cli::command()
        .try_get_matches()
        .unwrap_or_else(|e| usage_error(e));
    let mut cli = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| usage_error(e));
    flags_only(&mut cli.global, &matches);
    report::set_json(cli.global.json);
    // While this is the only thread: the settings, and SOFTHSM2_CONF set
    // for the PKCS#11 module (see config::set_env_alone). Its error, if
    // any, is raised inside `run`, so a failed `columns` stream still ends
    // with its abort marker.
    let prepared = commands::prepare(&cli);
    faults::install_from_env();
    signals::install();
    let code = match commands::run(cli, prepared) {
        Ok(code) => code,
        Err(e) => {
            report::error(&e);
            e.exit_code()
        }
    };
    // Not std::process::exit: see signals::exit_now.
    signals::exit_now(code);
}

/// Keeps the global settings given as flags and drops those clap took from
/// the environment (its `env` attribute, there for `--help` and for
/// checking the value): `config::resolve` reads the environment itself,
/// after flags and before hsmseal.toml, and records each value's source
/// for `config show`, which `ArgMatches::value_source` tells here.
fn flags_only(g: &mut cli::GlobalArgs, m: &ArgMatches) {
    let from_flag = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    if !from_flag("module") {
        g.module = None;
    }
    if !from_flag("token") {
        g.token = None;
    }
    if !from_flag("pin_file") {
        g.pin_file = None;
    }
    if !from_flag("jobs") {
        g.jobs = None;
    }
    if !from_flag("audit_log") {
        g.audit_log = None;
    }
}

/// Every environment variable an option of `cmd` or of its subcommands
/// reads (clap's `env` attribute).
fn env_vars(cmd: &clap::Command) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_os_string()))
        .collect();
    for sub in cmd.get_subcommands() {
        names.extend(env_vars(sub));
    }
    names
}

/// A command line clap refused (or `--help`, `--version`): clap's own
/// message and exit code (2 for errors), and with `--json` anywhere on the
/// line also the `error` line every failure has in JSON output.
fn usage_error(e: clap::Error) -> ! {
    let json = std::env::args_os().skip(1).any(|a| a == "--json");
    if json && e.exit_code() != 0 {
        report::set_json(true);
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or("invalid command line");
        let first = first.strip_prefix("error: ").unwrap_or(first);
        let message = format!("{first} (see hsmseal --help)");
        report::emit(
            "error",
            &report::ErrorLine {
                kind: "usage".into(),
                exit_code: e.exit_code(),
                message: &message,
            },
        );
    }
    e.exit()
}
