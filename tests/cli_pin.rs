//! The PIN: there is no way to pass it as an argument, and it appears in no
//! output, error or file hsmseal writes — whatever the command, success or
//! failure, human or `--json` output.

/// The binary's clap definitions, to walk every flag of every command.
#[path = "../src/bin/hsmseal/cli.rs"]
mod cli;
mod support;

use clap::CommandFactory;
use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use support::{code, stderr, write, Cli};

/// Every flag of every (sub)command, as `cmd sub --flag`.
fn all_flags() -> Vec<(String, clap::Arg)> {
    fn walk(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Arg)>) {
        for a in cmd.get_arguments() {
            out.push((path.clone(), a.clone()));
        }
        for s in cmd.get_subcommands() {
            walk(s, format!("{path} {}", s.get_name()), out);
        }
    }
    let mut out = Vec::new();
    walk(&cli::Cli::command(), "hsmseal".into(), &mut out);
    out
}

#[test]
fn no_argument_of_any_command_takes_a_pin() {
    let flags = all_flags();
    assert!(flags.len() > 50, "the walk found too few flags");
    let mut pin_file_seen = false;
    for (cmd, a) in &flags {
        let long = a.get_long().unwrap_or("").to_ascii_lowercase();
        let id = a.get_id().as_str().to_ascii_lowercase();
        if long == "pin-file" {
            // Takes a path, never the PIN itself.
            pin_file_seen = true;
            continue;
        }
        if long == "so-pin-file" && cmd == "hsmseal key backup-trust" {
            // The security officer's PIN file (`key backup-trust`): a path too.
            continue;
        }
        for name in [&long, &id] {
            assert!(
                !name.contains("pin") && !name.contains("password") && !name.contains("secret"),
                "{cmd}: argument {name:?} looks like it takes a secret"
            );
        }
    }
    assert!(pin_file_seen, "--pin-file exists");
}

#[test]
fn pin_flags_and_values_on_the_command_line_are_refused() {
    let c = Cli::with_key();
    write(&c.path("p"), b"x");
    for args in [
        &["--pin", "user-pin-1234", "encrypt", "--key", "k", "p"][..],
        &["--pin=user-pin-1234", "encrypt", "--key", "k", "p"],
        &["encrypt", "--pin", "user-pin-1234", "--key", "k", "p"],
        &["--user-pin", "user-pin-1234", "key", "list"],
    ] {
        let out = c.run(args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        // clap quotes unexpected arguments; the value itself must not be echoed.
        assert!(!stderr(&out).contains("user-pin-1234"), "{args:?}: echoed");
    }
    // A stray positional value is refused too (clap quotes what it did not
    // expect, as any Unix tool would: it is the user's own command line).
    let out = c.run(&["key", "list", "user-pin-1234"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

/// Runs and returns the output after checking the PIN appears nowhere in it.
fn run_clean(c: &Cli, args: &[&str], env: &[(&str, &str)], pins: &[&str]) -> Output {
    let out = c.run_with(args, None, env);
    for stream in [&out.stdout, &out.stderr] {
        let text = String::from_utf8_lossy(stream);
        for pin in pins {
            assert!(
                !text.contains(pin),
                "hsmseal {args:?} printed the PIN: {text}"
            );
        }
    }
    out
}

#[test]
fn the_pin_appears_in_no_output_error_or_file() {
    let c = Cli::new();
    let pin = c.token.pin.clone();
    let pins = [pin.as_str()];
    let csv = "id,name\n1,alice\n2,bob\n";
    write(&c.path("plain.txt"), b"some plaintext");
    write(&c.path("dump.csv"), csv.as_bytes());
    let pin_file = c.path("pin");
    write(&pin_file, format!("{pin}\n").as_bytes());
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let wrong_file = c.path("wrong-pin");
    write(&wrong_file, b"wrong-pin-5678\n");
    std::fs::set_permissions(&wrong_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let session: &[&[&str]] = &[
        &["key", "create", "k"],
        &["key", "rotate", "k"],
        &["key", "list"],
        &["key", "info", "k"],
        &["encrypt", "--key", "k", "plain.txt"],
        &["verify", "plain.txt.hseal"],
        &["inspect", "plain.txt.hseal"],
        &["rotate", "plain.txt.hseal"],
        &["decrypt", "-o", "back.txt", "plain.txt.hseal"],
        &[
            "columns",
            "encrypt",
            "--format",
            "csv",
            "--key",
            "k",
            "--columns",
            "name",
            "-o",
            "dump.enc.csv",
            "-i",
            "dump.csv",
        ],
        &[
            "columns",
            "decrypt",
            "--format",
            "csv",
            "--columns",
            "name",
            "-o",
            "dump.back.csv",
            "-i",
            "dump.enc.csv",
        ],
        &["doctor"],
        &["config", "show"],
    ];
    for json in [false, true] {
        for args in session {
            if json && args[0] == "key" && args[1] == "create" {
                continue; // exists already
            }
            let mut a: Vec<&str> = Vec::new();
            if json {
                a.push("--json");
            }
            a.extend_from_slice(args);
            // Outputs from the first pass would be refused; --force where it exists.
            if json && matches!(args[0], "encrypt" | "decrypt" | "columns") {
                a.push("--force");
            }
            let out = run_clean(&c, &a, &[], &pins);
            assert!(out.status.success(), "{a:?}: {}", stderr(&out));
        }
    }
    assert_eq!(
        std::fs::read(c.path("back.txt")).unwrap(),
        b"some plaintext"
    );

    // The PIN from a file: same commands, no PIN in the environment.
    let pf = pin_file.to_str().unwrap();
    let out = run_clean(
        &c,
        &["--pin-file", pf, "verify", "plain.txt.hseal"],
        &[("HSMSEAL_PIN", "")],
        &pins,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_clean(
        &c,
        &["--pin-file", pf, "config", "show"],
        &[("HSMSEAL_PIN", "")],
        &pins,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("redacted"));

    // Failures: a wrong PIN from the environment and from a file, a wrong key,
    // tampered data. Neither the right nor the wrong PIN is echoed.
    let both = [pin.as_str(), "wrong-pin-5678"];
    let out = run_clean(
        &c,
        &["verify", "plain.txt.hseal"],
        &[("HSMSEAL_PIN", "wrong-pin-5678")],
        &both,
    );
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    let out = run_clean(
        &c,
        &[
            "--pin-file",
            wrong_file.to_str().unwrap(),
            "--json",
            "verify",
            "plain.txt.hseal",
        ],
        &[("HSMSEAL_PIN", "")],
        &both,
    );
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    let out = run_clean(
        &c,
        &["encrypt", "--key", "nosuch", "-o", "x", "plain.txt"],
        &[],
        &both,
    );
    assert_eq!(code(&out), 4);
    let mut bytes = std::fs::read(c.path("plain.txt.hseal")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    write(&c.path("bad.hseal"), &bytes);
    let out = run_clean(
        &c,
        &["--json", "decrypt", "-o", "bad.out", "bad.hseal"],
        &[],
        &both,
    );
    assert_eq!(code(&out), 3);

    // No file hsmseal wrote in the working directory holds the PIN (the PIN
    // files themselves excepted).
    for entry in walk(c.work.path()) {
        if entry == pin_file || entry == wrong_file {
            continue;
        }
        let bytes = std::fs::read(&entry).unwrap();
        for p in both {
            assert!(
                !bytes.windows(p.len()).any(|w| w == p.as_bytes()),
                "{} contains a PIN",
                entry.display()
            );
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A pseudo-terminal pair: (master, slave).
fn openpty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty fills in two new descriptors, which we then own.
    let rc = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both are open descriptors owned by nobody else.
    unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) }
}

/// `key list` with no PIN but a terminal: its prompt on the terminal.
fn prompting(c: &Cli, slave: &std::fs::File) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = c.cmd();
    cmd.env_remove("HSMSEAL_PIN").args(["key", "list"]);
    let tty = || std::process::Stdio::from(slave.try_clone().unwrap());
    cmd.stdin(tty()).stdout(tty()).stderr(tty());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // A session of its own with the pty as controlling terminal,
            // so its /dev/tty is the pty.
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("spawn hsmseal on a pty")
}

/// Reads the terminal's output until it holds `want`.
fn read_until(master: &mut std::fs::File, seen: &mut String, want: &str) {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    while !seen.contains(want) {
        let n = master.read(&mut buf).expect("read the pty");
        assert!(n > 0, "terminal closed before {want:?}: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

fn echo_on(tty: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data; tty is an open terminal.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut t) }, 0);
    t.c_lflag & libc::ECHO != 0
}

/// The prompt reads the PIN with echo off, and the terminal's echo is back
/// afterwards: after a login, and when SIGINT stops the waiting prompt
/// (a terminal left mute is what a new user meets first).
#[test]
fn the_terminal_prompt_hides_the_pin_and_always_restores_echo() {
    use std::io::Write;
    let c = Cli::with_key();
    let pin = c.token.pin.clone();

    let (mut master, slave) = openpty();
    assert!(echo_on(&slave));
    let mut child = prompting(&c, &slave);
    let mut seen = String::new();
    read_until(&mut master, &mut seen, "PIN for token");
    master.write_all(format!("{pin}\n").as_bytes()).unwrap();
    read_until(&mut master, &mut seen, "active");
    assert!(child.wait().unwrap().success(), "{seen}");
    assert!(!seen.contains(&pin), "PIN echoed: {seen}");
    assert!(echo_on(&slave), "echo left off after the prompt");

    let (mut master, slave) = openpty();
    let mut child = prompting(&c, &slave);
    let mut seen = String::new();
    read_until(&mut master, &mut seen, "PIN for token");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(echo_on(&slave), "echo left off after SIGINT at the prompt");
}
