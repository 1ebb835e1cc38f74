//! The `hsmseal` binary: parse flags, run the command, turn the outcome into
//! an exit code. All the work is in the library.

mod faults;

use clap::Parser;

fn main() {
    // Before anything reads the PIN or a key: no core dump may hold them.
    hsmseal::hardening::disable_core_dumps();
    let cli = hsmseal::cli::Cli::parse();
    faults::install_from_env();
    hsmseal::signals::install();
    let code = match hsmseal::commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hsmseal: error: {e}");
            e.exit_code()
        }
    };
    // Not std::process::exit: see signals::exit_now.
    hsmseal::signals::exit_now(code);
}
