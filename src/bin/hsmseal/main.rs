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

use clap::Parser;

fn main() {
    // Before anything reads the PIN or a key: no core dump may hold them.
    hardening::disable_core_dumps();
    let cli = cli::Cli::parse();
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
            eprintln!("hsmseal: error: {e}");
            e.exit_code()
        }
    };
    // Not std::process::exit: see signals::exit_now.
    signals::exit_now(code);
}
