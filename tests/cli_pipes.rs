//! A reader that closes stdout early (`hsmseal ... | head`): the run stops
//! quietly with exit code 141 (128 + SIGPIPE, as for any Unix tool killed by
//! SIGPIPE), never a panic, no temporary file left, and with an audit log
//! the run is recorded as interrupted.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use support::{data, write, Cli};

/// Spawns `args`, reads `take` (a line, or some bytes) from its stdout, closes
/// the pipe, and returns (exit code, stderr).
fn close_early(c: &Cli, args: &[&str], line: bool) -> (Option<i32>, String) {
    let mut cmd = c.cmd();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        let mut out = BufReader::new(child.stdout.take().unwrap());
        if line {
            let mut first = String::new();
            out.read_line(&mut first).unwrap();
            assert!(first.starts_with('{'), "{first}");
        } else {
            let mut buf = [0u8; 10];
            out.read_exact(&mut buf).unwrap();
        }
        // `out` dropped here: the read end of the pipe is closed.
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.wait().unwrap().code(), err)
}

#[test]
fn a_closed_stdout_stops_the_run_quietly_with_141() {
    let c = Cli::with_key();
    std::fs::create_dir(c.path("t")).unwrap();
    for i in 0..400 {
        write(
            &c.path(&format!("t/f{i:03}")),
            format!("file {i}").as_bytes(),
        );
    }
    c.ok(&["-q", "encrypt", "--key", "k", "-r", "t"]);
    // JSON lines to a reader that wants one.
    let (code, err) = close_early(&c, &["--json", "--jobs", "2", "verify", "-r", "t"], true);
    assert_eq!(code, Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // Decrypted data to a reader that wants 10 bytes.
    write(&c.path("big"), &data(8 << 20, 1));
    c.ok(&["-q", "encrypt", "--key", "k", "-o", "big.hseal", "big"]);
    let (code, err) = close_early(&c, &["decrypt", "-o", "-", "big.hseal"], false);
    assert_eq!(code, Some(141), "{err}");
    assert!(
        err.is_empty(),
        "a closed pipe is not an error to report: {err}"
    );

    // A bulk decrypt to files, with JSON lines to a reader that leaves: no
    // temporary file remains, the audit log records the run as interrupted.
    c.ok(&["--audit-log", "audit.log", "audit", "init"]);
    let (code, err) = close_early(
        &c,
        &[
            "--audit-log",
            "audit.log",
            "--json",
            "decrypt",
            "-r",
            "t",
            "--output-dir",
            "plain",
        ],
        true,
    );
    assert_eq!(code, Some(141), "{err}");
    let temps = walk(&c.path("plain"))
        .into_iter()
        .filter(|p| p.contains(".hsmseal-tmp-"))
        .count();
    assert_eq!(temps, 0, "temporary files left");
    let log = std::fs::read_to_string(c.path("audit.log")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["command"], "decrypt");
    assert_eq!(last["result"], "interrupted");
    assert_eq!(last["exit_code"], 141);
    c.ok(&["audit", "verify", "audit.log"]);
}

#[test]
fn other_stdout_failures_are_an_io_error_not_a_panic() {
    let c = Cli::with_key();
    write(&c.path("a"), b"x");
    c.ok(&["-q", "encrypt", "--key", "k", "a"]);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = c
        .cmd()
        .args(["verify", "a.hseal"])
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(
        err.contains("writing stdout") && !err.contains("panicked"),
        "{err}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}
