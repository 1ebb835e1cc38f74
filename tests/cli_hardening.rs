//! Core dumps are off and the process cannot be inspected by other processes
//! of the same user: a core or /proc/PID/environ would hold HSMSEAL_PIN.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hsmseal");

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `cmd` as an unprivileged user when the test runs as root (CI), so
/// the same-user checks below mean something there too.
fn unprivileged(cmd: &mut Command) -> &mut Command {
    if is_root() {
        cmd.uid(65534).gid(65534);
    }
    cmd
}

#[test]
fn no_core_dumps_and_no_same_user_inspection() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    // `decrypt -` waits for its header on stdin before touching any HSM,
    // so the process stays alive as long as stdin is open.
    cmd.args(["decrypt", "-"])
        .current_dir(dir.path())
        .env_clear()
        .env("HSMSEAL_PIN", "pin-that-must-not-leak-4711")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = unprivileged(&mut cmd).spawn().unwrap();
    let pid = child.id();
    // The limit is set first thing in main, before the signal thread is
    // started: once the process has two threads, main is past it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        if status
            .lines()
            .any(|l| l.starts_with("Threads:") && l != "Threads:\t1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hsmseal never started its signal thread"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap()
        .lines()
        .find(|x| x.starts_with("Max core file size"))
        .unwrap()
        .to_string();
    let fields: Vec<&str> = limits.split_whitespace().collect();
    assert_eq!(
        &fields[4..6],
        ["0", "0"],
        "soft and hard core limits: {limits}"
    );

    // A process of the same user cannot read its environment (the PIN).
    let mut cat = Command::new("cat");
    cat.arg(format!("/proc/{pid}/environ"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = unprivileged(&mut cat).output().unwrap();
    let leaked = String::from_utf8_lossy(&out.stdout).contains("pin-that-must-not-leak");
    assert!(
        !out.status.success() && !leaked,
        "same-user process read /proc/{pid}/environ"
    );

    drop(child.stdin.take());
    let status = child.wait().unwrap();
    // Empty input is not an hsmseal file.
    assert_eq!(status.code(), Some(8));
}
