//! `make docs`: shell completions and man pages generated from the clap
//! definitions in src/bin/hsmseal/cli.rs (included here as they are), so
//! they can never drift from `--help`.
//!
//! Usage: `cargo run --example gen-docs -- OUT_DIR`
//! Writes OUT_DIR/completions/{hsmseal.bash,_hsmseal,hsmseal.fish,_hsmseal.ps1,hsmseal.elv}
//! and OUT_DIR/man/hsmseal.1 plus one page per subcommand
//! (hsmseal-encrypt.1, hsmseal-key-rotate.1, ...).
//!
//! An example rather than a subcommand of the binary: the generators are
//! only needed when packaging, not by every installed copy of hsmseal.

#[path = "../src/bin/hsmseal/cli.rs"]
mod cli;

use clap::CommandFactory;
use clap_complete::Shell;
use std::path::{Path, PathBuf};

fn main() {
    let out = match std::env::args_os().nth(1) {
        Some(d) => PathBuf::from(d),
        None => {
            eprintln!("usage: gen-docs OUT_DIR");
            std::process::exit(2);
        }
    };
    if let Err(e) = generate(&out) {
        eprintln!("gen-docs: {e}");
        std::process::exit(7);
    }
}

fn generate(out: &Path) -> std::io::Result<()> {
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [
        Shell::Bash,
        Shell::Zsh,
        Shell::Fish,
        Shell::PowerShell,
        Shell::Elvish,
    ] {
        let path =
            clap_complete::generate_to(shell, &mut cli::Cli::command(), "hsmseal", &completions)?;
        println!("{}", path.display());
    }
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    // One page for hsmseal and one per (nested) subcommand, named
    // hsmseal-SUB[-SUBSUB].1 as git and cargo do.
    let mut cmd = cli::Cli::command();
    cmd.build();
    write_pages(&cmd, "hsmseal", &man)
}

fn write_pages(cmd: &clap::Command, name: &str, dir: &Path) -> std::io::Result<()> {
    // clap names are &'static str without its "string" feature; this
    // one-shot generator can afford to leak a few names.
    let static_name: &'static str = Box::leak(name.to_string().into_boxed_str());
    let page = cmd.clone().name(static_name);
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    std::fs::write(&path, buf)?;
    println!("{}", path.display());
    for sub in cmd
        .get_subcommands()
        .filter(|s| s.get_name() != "help" && !s.is_hide_set())
    {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}
