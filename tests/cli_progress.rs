//! The progress bar: drawn on stderr when stderr is a terminal (here a
//! pseudo-terminal from util-linux `script`), never with `--quiet`, and
//! never when stderr is not a terminal (pipes, files, CI logs).

mod support;

use std::process::{Command, Stdio};
use support::{clear_hsmseal_env, write, Cli, BIN};

/// Runs hsmseal with `args` on a pseudo-terminal; returns what the terminal
/// showed (stdout and stderr together).
fn on_a_terminal(c: &Cli, args: &[&str]) -> String {
    let mut line = BIN.to_string();
    for a in args {
        line.push(' ');
        line.push_str(a);
    }
    let mut cmd = Command::new("script");
    clear_hsmseal_env(&mut cmd);
    for (k, v) in c.token.env() {
        cmd.env(k, v);
    }
    cmd.current_dir(c.work.path())
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::null());
    let out = cmd
        .output()
        .expect("util-linux `script` (Debian's essential bsdutils package)");
    assert!(
        out.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn progress_only_on_a_terminal_and_never_with_quiet() {
    let c = Cli::with_key();
    std::fs::create_dir(c.path("t")).unwrap();
    for i in 0..200 {
        write(&c.path(&format!("t/f{i:03}")), &vec![b'x'; 20_000]);
    }
    let shown = on_a_terminal(&c, &["--jobs", "2", "encrypt", "--key", "k", "-r", "t"]);
    // The bar's message and byte counter (the template in src/bin/hsmseal/bulk.rs).
    assert!(shown.contains("/200 items"), "no progress bar: {shown}");
    assert!(shown.contains("ETA") && shown.contains("MiB"), "{shown}");

    let shown = on_a_terminal(&c, &["-q", "decrypt", "-r", "t", "--output-dir", "p"]);
    assert!(
        !shown.contains("items") && !shown.contains("ETA"),
        "{shown}"
    );

    // Not a terminal: plain lines only.
    let out = c.run(&["verify", "-r", "t"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("ETA") && !err.contains('\r'), "{err}");
}
