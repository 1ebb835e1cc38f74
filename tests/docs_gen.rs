//! `make docs`: the generator writes a completion script per shell and a man
//! page per visible subcommand, and they carry the flags and exit codes that
//! `--help` shows.

use std::path::Path;
use std::process::Command;

fn generate(out: &Path) {
    // `cargo test` builds the examples next to the test binaries
    // (target/PROFILE/examples); running cargo from inside a test would
    // rebuild with the test's environment.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let generator = profile_dir.join("examples").join("gen-docs");
    assert!(generator.exists(), "{} not built", generator.display());
    let out = Command::new(generator)
        .arg(out)
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "gen-docs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn completions_and_man_pages_cover_every_visible_command() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path());
    let read = |p: &str| {
        std::fs::read_to_string(dir.path().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    let bash = read("completions/hsmseal.bash");
    for word in [
        "encrypt",
        "rewrap",
        "rotate",
        "--jobs",
        "--pin-file",
        "--json",
        "purge",
    ] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    let zsh = read("completions/_hsmseal");
    assert!(zsh.starts_with("#compdef hsmseal"), "zsh header");
    assert!(read("completions/hsmseal.fish").contains("__fish_hsmseal"));

    let main = read("man/hsmseal.1");
    assert!(main.contains(".TH hsmseal 1"), "man header");
    assert!(main.contains("Exit codes"), "exit codes in the main page");
    for page in [
        "encrypt",
        "decrypt",
        "verify",
        "inspect",
        "rewrap",
        "doctor",
        "key-create",
        "key-destroy",
        "columns-encrypt",
        "columns-rewrap",
        "config-show",
    ] {
        let text = read(&format!("man/hsmseal-{page}.1"));
        assert!(text.contains(".SH SYNOPSIS"), "{page}: no synopsis");
    }
    // Hidden commands are internal and get no page.
    assert!(!dir
        .path()
        .join("man/hsmseal-columns-passthrough.1")
        .exists());
    // Nothing offers a way to pass the PIN itself.
    assert!(!bash.contains("--pin ") && !bash.contains("--pin="));
}
