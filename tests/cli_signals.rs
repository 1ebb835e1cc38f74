//! SIGINT/SIGTERM in the middle of writing an output: exit 130/143, no
//! temporary file left, nothing under the output name, input untouched.

mod support;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::{stderr, Cli};

fn interrupt_encrypt_midway(signal: &str, want: i32) {
    let c = Cli::with_key();
    let mut cmd = c.cmd();
    cmd.args(["encrypt", "--key", "k", "-o", "out.hseal", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Feed some data but keep stdin open: the run cannot finish by itself.
    stdin.write_all(&vec![7u8; 3 << 20]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let temp_exists = || c.files().iter().any(|n| n.contains(".hsmseal-tmp-"));
    while !temp_exists() {
        assert!(Instant::now() < deadline, "no temporary output appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(out.status.code(), Some(want), "{}", stderr(&out));
    assert!(!temp_exists(), "temporary file left: {:?}", c.files());
    assert!(
        !c.path("out.hseal").exists(),
        "partial output under its final name"
    );
}

#[test]
fn sigterm_removes_the_temporary_output_and_exits_143() {
    interrupt_encrypt_midway("-TERM", 143);
}

#[test]
fn sigint_removes_the_temporary_output_and_exits_130() {
    interrupt_encrypt_midway("-INT", 130);
}
