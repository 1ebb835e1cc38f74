//! The audit log under faults (issue 9, item 4), end to end with the real
//! binary and a SoftHSM2 token of each test's own:
//! - `kill -9` at every step of an append (the test hook
//!   `HSMSEAL_TEST_AUDIT_FAULTS=kill-after=STEP` makes the process SIGKILL
//!   itself there), alone and in the combinations that reach the repair
//!   steps: `audit verify` then succeeds, the next append succeeds, and the
//!   log verifies with every entry that was written;
//! - a full disk (`ENOSPC` on a small tmpfs; needs root to mount, skipped
//!   with a message otherwise): the run says its work was done but not
//!   audited (exit 9), the log is left byte for byte as it was, and once
//!   space is freed the next run is logged;
//! - two head records for one log, as the old create-then-destroy path left
//!   them (made by hand with pkcs11-tool's C_CreateObject): the higher seq
//!   counts, truncation is still caught, the next append leaves one.

mod support;

use serde_json::Value;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::{code, stderr, write, Cli};

const LOG: &str = "audit.log";
const FAULTS: &str = "HSMSEAL_TEST_AUDIT_FAULTS";

/// `hsmseal --audit-log LOG ARGS`, with the fault hook set to `faults`.
fn logged(c: &Cli, log: &str, args: &[&str], faults: Option<&str>) -> Output {
    let mut v = vec!["--audit-log", log];
    v.extend_from_slice(args);
    match faults {
        Some(f) => c.run_with(&v, None, &[(FAULTS, f)]),
        None => c.run(&v),
    }
}

fn ok(c: &Cli, args: &[&str]) -> Output {
    let out = logged(c, LOG, args, None);
    assert!(
        out.status.success(),
        "hsmseal {args:?} failed: {}",
        stderr(&out)
    );
    out
}

fn killed(o: &Output) -> bool {
    o.status.signal() == Some(libc::SIGKILL)
}

fn entries(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `audit verify --json` must exit 0; returns the report (and stderr).
fn verify_ok(c: &Cli, log: &str, what: &str) -> Value {
    let out = c.run(&["--json", "audit", "verify", log]);
    assert_eq!(
        code(&out),
        0,
        "{what}: audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["intact"], true, "{what}: {j}");
    j
}

fn pkcs11_tool(c: &Cli) -> Command {
    let mut cmd = Command::new("pkcs11-tool");
    cmd.env("SOFTHSM2_CONF", &c.token.conf)
        .arg("--module")
        .arg(&c.token.module)
        .args(["--token-label", &c.token.label])
        .args(["--login", "--pin", &c.token.pin]);
    cmd
}

fn run_tool(mut cmd: Command) -> String {
    let out = cmd.output().expect("run pkcs11-tool");
    assert!(
        out.status.success(),
        "pkcs11-tool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Labels of the token's audit head records (one per record).
fn head_records(c: &Cli) -> Vec<String> {
    let mut cmd = pkcs11_tool(c);
    cmd.args(["--list-objects", "--type", "data"]);
    run_tool(cmd)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let label = l.strip_prefix("label:")?.trim().trim_matches('\'');
            label
                .starts_with("hsmseal-audit-head:")
                .then(|| label.to_string())
        })
        .collect()
}

/// A session with a log of 3 entries (audit init, key create, encrypt) and
/// a sealed file whose `verify` is the logged command the faults hit.
fn session() -> Cli {
    let c = Cli::new();
    ok(&c, &["audit", "init"]);
    ok(&c, &["key", "create", "k"]);
    write(&c.path("a.txt"), b"audited bytes");
    ok(&c, &["encrypt", "--key", "k", "a.txt"]);
    c
}

/// One step of a scenario.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// A logged run killed at this hook value; `true` if its own entry is
    /// in the log afterwards (killed after writing it).
    Kill(&'static str, bool),
    /// A logged run with this hook value that is not killed.
    Run(&'static str),
    /// The log's last `\n` removed by hand: a line whose write was cut
    /// short just before its final byte.
    DropNewline,
    /// Bytes that are no line, without `\n`, appended by hand (a torn tail
    /// longer than the repair entry that replaces it).
    Junk(usize),
}

use Step::*;

#[test]
fn kill_9_at_every_step_of_an_append_leaves_a_log_that_verifies_and_appends() {
    // (name, steps, audit repair entries expected at the end)
    let scenarios: Vec<(&str, Vec<Step>, usize)> = vec![
        ("locked", vec![Kill("kill-after=locked", false)], 0),
        ("checked", vec![Kill("kill-after=checked", false)], 0),
        ("torn-write", vec![Kill("kill-after=torn-write", false)], 1),
        ("written", vec![Kill("kill-after=written", true)], 0),
        ("synced", vec![Kill("kill-after=synced", true)], 0),
        ("head-set", vec![Kill("kill-after=head-set", true)], 0),
        (
            "head-created",
            vec![Kill("replace-head,kill-after=head-created", true)],
            0,
        ),
        (
            "replace-head, twice",
            vec![Run("replace-head"), Run("replace-head")],
            0,
        ),
        (
            "synced, twice (the head must never fall two behind)",
            vec![
                Kill("kill-after=synced", true),
                Kill("kill-after=synced", true),
            ],
            0,
        ),
        (
            "head-caught-up",
            vec![
                Kill("kill-after=synced", true),
                Kill("kill-after=head-caught-up", false),
            ],
            0,
        ),
        (
            "completed",
            vec![
                Kill("kill-after=synced", true),
                DropNewline,
                Kill("kill-after=completed", false),
            ],
            0,
        ),
        (
            "a line without its newline, completed by a normal run",
            vec![Kill("kill-after=synced", true), DropNewline],
            0,
        ),
        (
            "repair-written",
            vec![
                Kill("kill-after=torn-write", false),
                Kill("kill-after=repair-written", false),
            ],
            1,
        ),
        (
            "repair-synced",
            vec![
                Kill("kill-after=torn-write", false),
                Kill("kill-after=repair-synced", false),
            ],
            1,
        ),
        (
            "repair-head",
            vec![
                Kill("kill-after=torn-write", false),
                Kill("kill-after=repair-head", false),
            ],
            1,
        ),
        (
            "repair-written over a long torn tail (its rest is torn again)",
            vec![Junk(3000), Kill("kill-after=repair-written", false)],
            2,
        ),
        (
            "torn-write in the crash window",
            vec![
                Kill("kill-after=written", true),
                Kill("kill-after=torn-write", false),
            ],
            1,
        ),
        (
            "torn-write, twice",
            vec![
                Kill("kill-after=torn-write", false),
                Kill("kill-after=torn-write", false),
            ],
            2,
        ),
    ];
    for (name, steps, repairs) in scenarios {
        let c = session();
        let log = c.path(LOG);
        let mut expected = entries(&log).len();
        for (i, step) in steps.iter().enumerate() {
            let what = format!("{name}, step {i} {step:?}");
            match *step {
                Kill(faults, has_entry) => {
                    let out = logged(&c, LOG, &["verify", "a.txt.hseal"], Some(faults));
                    assert!(killed(&out), "{what}: not killed: {}", stderr(&out));
                    if has_entry {
                        expected += 1;
                    }
                }
                Run(faults) => {
                    let out = logged(&c, LOG, &["verify", "a.txt.hseal"], Some(faults));
                    assert_eq!(code(&out), 0, "{what}: {}", stderr(&out));
                    expected += 1;
                }
                DropNewline => {
                    let mut b = std::fs::read(&log).unwrap();
                    assert_eq!(b.pop(), Some(b'\n'));
                    write(&log, &b);
                }
                Junk(n) => {
                    let mut b = std::fs::read(&log).unwrap();
                    b.extend(std::iter::repeat_n(b'#', n));
                    write(&log, &b);
                }
            }
            // Whatever the kill left, `audit verify` calls it intact (with
            // a note for a torn tail or a head one behind).
            verify_ok(&c, LOG, &what);
        }
        // The next append works and the log verifies, every entry there.
        ok(&c, &["key", "rotate", "k"]);
        expected += 1;
        let j = verify_ok(&c, LOG, name);
        assert!(j["note"].is_null(), "{name}: {j}");
        let all = entries(&log);
        let repair_lines: Vec<&Value> = all
            .iter()
            .filter(|e| e["command"] == "audit repair")
            .collect();
        assert_eq!(repair_lines.len(), repairs, "{name}: {all:?}");
        assert_eq!(j["repairs"].as_array().unwrap().len(), repairs, "{name}");
        assert_eq!(all.len() - repairs, expected, "{name}: {all:?}");
        assert_eq!(j["entries"], all.len() as u64, "{name}");
        assert_eq!(all.last().unwrap()["command"], "key rotate", "{name}");
        for e in &repair_lines {
            assert_eq!(e["result"], "repaired", "{name}");
            assert!(e["bytes"].as_u64().unwrap() > 0, "{name}: {e}");
        }
        let text = std::fs::read(&log).unwrap();
        assert_eq!(text.last(), Some(&b'\n'), "{name}");
        assert!(!text.windows(2).any(|w| w == b"##"), "{name}: junk left");
        // Exactly one head record: a duplicate left by a kill is gone.
        assert_eq!(head_records(&c).len(), 1, "{name}");
    }
}

#[test]
fn the_first_append_of_a_log_killed_midway_is_started_again() {
    let c = Cli::new();
    // Killed writing the first line: the file holds only a torn line.
    let out = logged(&c, LOG, &["audit", "init"], Some("kill-after=torn-write"));
    assert!(killed(&out), "{}", stderr(&out));
    let torn = std::fs::read(c.path(LOG)).unwrap();
    assert!(!torn.is_empty() && !torn.contains(&b'\n'));
    // Not a log yet: verify says so, naming the cause.
    let out = c.run(&["audit", "verify", LOG]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("interrupted first append"),
        "{}",
        stderr(&out)
    );
    // The next logged command starts the log, recording the repair first.
    ok(&c, &["key", "create", "k"]);
    let j = verify_ok(&c, LOG, "after the first append");
    assert_eq!(j["entries"], 2);
    let all = entries(&c.path(LOG));
    assert_eq!(all[0]["command"], "audit repair");
    assert_eq!(all[0]["bytes"], torn.len() as u64);
    assert_eq!(all[1]["command"], "key create");
}

#[test]
fn the_first_line_of_a_log_written_but_its_head_never_created() {
    for step in ["kill-after=written", "kill-after=synced"] {
        let c = Cli::new();
        let out = logged(&c, LOG, &["audit", "init"], Some(step));
        assert!(killed(&out), "{step}: {}", stderr(&out));
        assert!(head_records(&c).is_empty(), "{step}");
        let j = verify_ok(&c, LOG, step);
        assert_eq!(j["entries"], 1);
        assert!(
            j["note"]
                .as_str()
                .unwrap()
                .contains("before creating its HSM head record"),
            "{j}"
        );
        ok(&c, &["key", "create", "k"]);
        let j = verify_ok(&c, LOG, step);
        assert_eq!(j["entries"], 2);
        assert!(j["note"].is_null(), "{j}");
        assert_eq!(head_records(&c).len(), 1, "{step}");
    }
    // Not where another log's head names the path: that file replaced the
    // log that was there, and only `audit init` may start one there.
    let c = session();
    std::fs::rename(c.path(LOG), c.path("old.log")).unwrap();
    let out = logged(&c, LOG, &["audit", "init"], Some("kill-after=synced"));
    assert!(killed(&out), "{}", stderr(&out));
    let out = logged(&c, LOG, &["verify", "a.txt.hseal"], None);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    ok(&c, &["audit", "init"]);
    let j = verify_ok(&c, LOG, "rotated");
    assert_eq!(j["entries"], 2);
}

/// The head record's value, `v1 <seq> <hash> <path>`.
fn head_value(c: &Cli, label: &str) -> String {
    let mut cmd = pkcs11_tool(c);
    cmd.args(["--read-object", "--type", "data", "--label", label]);
    run_tool(cmd)
}

/// Creates a head record by hand (C_CreateObject through pkcs11-tool), as
/// the old create-then-destroy path left one behind.
fn create_head_record(c: &Cli, label: &str, value: &str) {
    let f = c.path("head-value.bin");
    write(&f, value.as_bytes());
    let mut cmd = pkcs11_tool(c);
    cmd.args(["--write-object"])
        .arg(&f)
        .args(["--type", "data", "--label", label])
        .args(["--application-label", "hsmseal-audit", "--private"]);
    run_tool(cmd);
    std::fs::remove_file(&f).unwrap();
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hsmseal::audit::hex(&sha2::Sha256::digest(b))
}

#[test]
fn two_head_records_the_higher_counts_and_the_next_append_leaves_one() {
    let c = session();
    let log = c.path(LOG);
    let labels = head_records(&c);
    assert_eq!(labels.len(), 1, "{labels:?}");
    let label = labels[0].clone();
    let value = head_value(&c, &label);
    let parts: Vec<&str> = value.splitn(4, ' ').collect();
    assert_eq!(parts[..2], ["v1", "2"], "{value}");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(parts[2], sha256_hex(lines[2].as_bytes()));
    // The stale record a kill between create and destroy left: one behind.
    let stale = format!("v1 1 {} {}", sha256_hex(lines[1].as_bytes()), parts[3]);
    create_head_record(&c, &label, &stale);
    assert_eq!(head_records(&c).len(), 2);
    let j = verify_ok(&c, LOG, "two records");
    assert_eq!(j["head_seq"], 2);
    // The stale record does not hide a cut: without the last line, the
    // log matches the stale record, but the higher one counts.
    let cut = format!("{}\n{}\n", lines[0], lines[1]);
    write(&c.path("cut.log"), cut.as_bytes());
    let out = c.run(&["audit", "verify", "cut.log"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
    // The next append works and leaves exactly one record, at its seq.
    ok(&c, &["verify", "a.txt.hseal"]);
    assert_eq!(head_records(&c), std::slice::from_ref(&label));
    assert!(head_value(&c, &label).starts_with("v1 3 "));
    let j = verify_ok(&c, LOG, "after the append");
    assert_eq!(j["entries"], 4);

    // Two records at the same seq that disagree: hsmseal will not guess.
    let bogus = format!("v1 3 {} {}", "0".repeat(64), parts[3]);
    create_head_record(&c, &label, &bogus);
    let before = std::fs::read(&log).unwrap();
    let out = c.run(&["audit", "verify", LOG]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("different line hashes"),
        "{}",
        stderr(&out)
    );
    let out = logged(&c, LOG, &["verify", "a.txt.hseal"], None);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert_eq!(std::fs::read(&log).unwrap(), before);
}

/// A tmpfs mounted for one test, unmounted when dropped (also on a panic).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (after saying why) where this process may not mount.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIPPED: mounting a tmpfs needs root (CI runs as root)");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("tmpfs")
            .arg(dir)
            .output()
            .expect("run mount");
        if !out.status.success() {
            println!(
                "SKIPPED: cannot mount a tmpfs here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Writes into `dir/filler` until the file system is full.
fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0x55u8; 4096];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
    // Even one more byte does not fit anywhere.
    let e = std::fs::write(dir.join("one-more"), b"x");
    assert!(
        e.as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::ENOSPC))
            || std::fs::metadata(dir.join("one-more")).is_ok_and(|m| m.len() == 0),
        "{e:?}"
    );
}

#[test]
fn a_full_disk_is_done_but_not_audited_and_the_log_stays_appendable() {
    let c = Cli::new();
    let mnt = c.path("small");
    let Some(_tmpfs) = Tmpfs::mount(&mnt, "256k") else {
        return;
    };
    let log = mnt.join("audit.log");
    let log_s = log.to_str().unwrap().to_string();
    let run = |args: &[&str]| logged(&c, &log_s, args, None);
    let must = |args: &[&str]| {
        let out = run(args);
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
    };
    must(&["audit", "init"]);
    must(&["key", "create", "k"]);
    write(&c.path("a.txt"), b"bytes");
    must(&["encrypt", "--key", "k", "a.txt"]);
    // Make the next line straddle a page of the tmpfs: the start of it
    // fits in the log's last page, the rest needs a page there is none of,
    // so the write stops part way (what a full disk does to a line).
    let page = 4096u64;
    // (Lines of one command differ by a few bytes at most, so the room left
    // in the page moves by a near-constant step and lands in the window
    // within a few pages: 200 runs are far more than needed.)
    for _ in 0..200 {
        let room = page - std::fs::metadata(&log).unwrap().len() % page;
        if room > 0 && room < 200 {
            break;
        }
        must(&["verify", "a.txt.hseal"]);
    }
    let room = page - std::fs::metadata(&log).unwrap().len() % page;
    assert!(room > 0 && room < 200, "room {room}");
    fill(&mnt);
    let before = std::fs::read(&log).unwrap();
    let n = entries(&log).len();

    // The work is done (the key exists), the entry is not: exit 9, saying
    // so and why; the part of the line that was written is cut off again.
    let out = run(&["key", "create", "k2"]);
    let e = stderr(&out);
    assert_eq!(code(&out), 9, "{e}");
    assert!(
        e.contains("`key create` completed, but its audit entry was not written"),
        "{e}"
    );
    assert!(e.contains("No space left on device"), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert_eq!(std::fs::read(&log).unwrap(), before, "a torn line was left");
    let listed = c.ok(&["--json", "key", "list"]);
    assert!(String::from_utf8_lossy(&listed).contains("\"k2\""));
    let j = verify_ok(&c, &log_s, "full disk");
    assert_eq!(j["entries"], n as u64);
    assert!(j["note"].is_null(), "{j}");
    // A run that fails on its own keeps its exit code; the audit failure is
    // a second line.
    let out = run(&["verify", "missing.hseal"]);
    let e = stderr(&out);
    assert_ne!(code(&out), 9, "{e}");
    assert_ne!(code(&out), 0, "{e}");
    assert!(e.contains("audit entry of this failed `verify`"), "{e}");
    assert_eq!(std::fs::read(&log).unwrap(), before);

    // Space freed: the next run is logged and the log verifies.
    std::fs::remove_file(mnt.join("filler")).unwrap();
    let _ = std::fs::remove_file(mnt.join("one-more"));
    must(&["key", "rotate", "k2"]);
    let j = verify_ok(&c, &log_s, "space freed");
    assert_eq!(j["entries"], n as u64 + 1);
    let last = entries(&log).pop().unwrap();
    assert_eq!(last["command"], "key rotate");
    assert_eq!(last["result"], "ok");
}
