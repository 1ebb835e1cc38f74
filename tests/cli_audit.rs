//! The audit log end to end (issue 5, item 7): the real binary against a
//! SoftHSM2 token of each test's own. A mixed session verifies; every kind
//! of tampering is reported by `audit verify` with its line and kind; a
//! tampered log is never appended to; no PIN or plaintext reaches the log
//! or any output; without the HSM's audit key nothing is called intact.

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use support::{code, stderr, write, Cli};

const LOG: &str = "audit.log";

/// Runs with `--audit-log audit.log` in front.
fn run(c: &Cli, args: &[&str]) -> Output {
    let mut v = vec!["--audit-log", LOG];
    v.extend_from_slice(args);
    c.run(&v)
}

fn ok(c: &Cli, args: &[&str]) -> Output {
    let out = run(c, args);
    assert!(
        out.status.success(),
        "hsmseal {args:?} failed: {}",
        stderr(&out)
    );
    out
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn entries(p: &Path) -> Vec<Value> {
    lines(p)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `audit verify LOG` on `lines` written to a fresh file; returns the output.
fn verify_lines(c: &Cli, name: &str, lines: &[String]) -> Output {
    let mut text = lines.join("\n");
    text.push('\n');
    write(&c.path(name), text.as_bytes());
    c.run(&["audit", "verify", name])
}

/// Asserts that `audit verify` exits 3 naming `line` and `kind`.
fn assert_problem(out: &Output, line: usize, kind: &str) {
    let e = stderr(out);
    assert_eq!(code(out), 3, "{e}");
    assert!(e.contains(&format!("line {line}")), "want line {line}: {e}");
    assert!(e.contains(kind), "want {kind}: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e}");
}

/// Changes the token's user PIN (pkcs11-tool) so the test can look for it.
fn set_pin(c: &mut Cli, new_pin: &str) {
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &c.token.conf)
        .arg("--module")
        .arg(&c.token.module)
        .args(["--token-label", &c.token.label])
        .args(["--login", "--pin", &c.token.pin, "--change-pin"])
        .args(["--new-pin", new_pin])
        .output()
        .expect("run pkcs11-tool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.token.pin = new_pin.to_string();
}

/// Deletes the audit key from the token (pkcs11-tool).
fn delete_audit_key(c: &Cli) {
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &c.token.conf)
        .arg("--module")
        .arg(&c.token.module)
        .args(["--token-label", &c.token.label])
        .args(["--login", "--pin", &c.token.pin])
        .args([
            "--delete-object",
            "--type",
            "secrkey",
            "--label",
            "hsmseal-audit-hmac",
        ])
        .output()
        .expect("run pkcs11-tool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A short session: 6 entries (audit init, key create, encrypt, verify,
/// decrypt, key rotate).
fn short_session() -> Cli {
    let c = Cli::new();
    ok(&c, &["audit", "init"]);
    ok(&c, &["key", "create", "k"]);
    write(&c.path("a.txt"), b"some bytes");
    ok(&c, &["encrypt", "--key", "k", "a.txt"]);
    ok(&c, &["verify", "a.txt.hseal"]);
    ok(&c, &["decrypt", "-o", "a.out", "a.txt.hseal"]);
    ok(&c, &["key", "rotate", "k"]);
    assert_eq!(lines(&c.path(LOG)).len(), 6);
    c
}

#[test]
fn a_mixed_session_verifies_and_logs_no_pin_and_no_plaintext() {
    let mut c = Cli::new();
    let pin = "Pin-7Qz4-unmistakable";
    set_pin(&mut c, pin);
    let secret = "PLAINTEXT-canary-5b1e9c-do-not-log";
    let mut outputs: Vec<Output> = Vec::new();
    fn go(c: &Cli, outputs: &mut Vec<Output>, args: &[&str]) {
        outputs.push(ok(c, args));
    }
    go(&c, &mut outputs, &["audit", "init"]);
    go(&c, &mut outputs, &["key", "create", "backups"]);
    write(&c.path("db.sql"), secret.repeat(100).as_bytes());
    go(&c, &mut outputs, &["encrypt", "--key", "backups", "db.sql"]);
    go(
        &c,
        &mut outputs,
        &["decrypt", "-o", "db.out", "db.sql.hseal"],
    );
    go(&c, &mut outputs, &["verify", "db.sql.hseal"]);
    // A tampered copy fails to decrypt: logged as an error with its code.
    let mut bad = std::fs::read(c.path("db.sql.hseal")).unwrap();
    let n = bad.len();
    bad[n - 20] ^= 1;
    write(&c.path("bad.hseal"), &bad);
    let failed = run(&c, &["decrypt", "-o", "bad.out", "bad.hseal"]);
    assert_eq!(code(&failed), 3, "{}", stderr(&failed));
    outputs.push(failed);
    go(&c, &mut outputs, &["key", "rotate", "backups"]);
    go(&c, &mut outputs, &["rotate", "db.sql.hseal"]);
    let csv = format!("id,ssn\n1,{secret}\n2,\n");
    write(&c.path("users.csv"), csv.as_bytes());
    go(
        &c,
        &mut outputs,
        &[
            "columns",
            "encrypt",
            "--key",
            "backups",
            "--columns",
            "ssn",
            "-i",
            "users.csv",
            "-o",
            "users.enc.csv",
        ],
    );
    go(
        &c,
        &mut outputs,
        &["key", "destroy", "backups", "--version", "1", "--yes"],
    );
    // Not logged: read-only commands.
    go(&c, &mut outputs, &["inspect", "db.sql.hseal"]);
    go(&c, &mut outputs, &["key", "list"]);
    go(&c, &mut outputs, &["config", "show"]);
    // key list ignores the audit objects.
    let keys = support::json_of_type(&ok(&c, &["--json", "key", "list"]).stdout, "key");
    assert!(
        !keys.is_empty() && keys.iter().all(|k| k["name"] == "backups"),
        "{keys:?}"
    );
    let show = ok(&c, &["config", "show"]);
    let show = String::from_utf8_lossy(&show.stdout).into_owned();
    assert!(
        show.lines()
            .any(|l| l.starts_with("audit_log") && l.contains("command-line flag")),
        "{show}"
    );

    let v = ok(&c, &["audit", "verify", LOG]);
    let out = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(
        out.contains("10 entries, chain intact, head matches the HSM"),
        "{out}"
    );
    outputs.push(v);
    let j = ok(&c, &["--json", "audit", "verify"]);
    let j = support::json_one(&j.stdout, "audit");
    assert_eq!(j["intact"], true);
    assert_eq!(j["entries"], 10);

    let e = entries(&c.path(LOG));
    let got: Vec<(&str, &str)> = e
        .iter()
        .map(|e| {
            (
                e["command"].as_str().unwrap(),
                e["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("audit init", "ok"),
            ("key create", "ok"),
            ("encrypt", "ok"),
            ("decrypt", "ok"),
            ("verify", "ok"),
            ("decrypt", "error"),
            ("key rotate", "ok"),
            ("rotate", "ok"),
            ("columns encrypt", "ok"),
            ("key destroy", "ok"),
        ]
    );
    for (i, e) in e.iter().enumerate() {
        assert_eq!(e["seq"], i as u64);
        assert_eq!(e["v"], 1);
        assert!(e["user"].as_str().is_some_and(|u| !u.is_empty()));
    }
    assert_eq!(e[1]["keys"], serde_json::json!(["backups v1"]));
    assert_eq!(e[2]["bytes"], (secret.len() * 100) as u64);
    assert_eq!(e[2]["items"]["ok"], 1);
    assert_eq!(e[2]["hsm_calls"], 1);
    assert_eq!(e[5]["exit_code"], 3);
    // The kind of failure, never the file it happened to (that is on
    // stderr only).
    assert_eq!(e[5]["error"], "authentication failed", "{}", e[5]);
    assert_eq!(e[6]["keys"], serde_json::json!(["backups v2"]));
    assert_eq!(
        e[7]["keys"],
        serde_json::json!(["backups v1", "backups v2"])
    );
    assert_eq!(e[8]["keys"], serde_json::json!(["backups v2"]));
    assert_eq!(e[8]["items"]["ok"], 1);
    assert_eq!(e[8]["items"]["skipped"], 1);
    assert_eq!(e[9]["keys"], serde_json::json!(["backups v1"]));

    // No PIN anywhere; no plaintext in the log.
    let log = std::fs::read_to_string(c.path(LOG)).unwrap();
    assert!(!log.contains(pin));
    assert!(!log.contains(secret));
    assert!(!log.contains("canary"));
    for o in &outputs {
        for s in [&o.stdout, &o.stderr] {
            let s = String::from_utf8_lossy(s);
            assert!(!s.contains(pin), "PIN in output: {s}");
        }
    }
}

#[test]
fn each_kind_of_tampering_is_reported_with_its_line() {
    let c = short_session();
    let orig = lines(&c.path(LOG));
    let ok_out = verify_lines(&c, "copy.log", &orig);
    assert_eq!(code(&ok_out), 0, "{}", stderr(&ok_out));

    // Edit a field.
    let mut t = orig.clone();
    assert!(t[2].contains("\"bytes\":10,"), "{}", t[2]);
    t[2] = t[2].replace("\"bytes\":10,", "\"bytes\":11,");
    assert_problem(&verify_lines(&c, "edit.log", &t), 3, "edited");
    // Edit the command of the first line.
    let mut t = orig.clone();
    t[0] = t[0].replace("audit init", "audit inix");
    assert_problem(&verify_lines(&c, "edit0.log", &t), 1, "edited");
    // Edit the log id of the first line (no head record exists for the new
    // id, but the other lines verify: this token's log, edited).
    let mut t = orig.clone();
    let id = entries(&c.path(LOG))[0]["log"]
        .as_str()
        .unwrap()
        .to_string();
    let forged_id: String = id.chars().rev().collect();
    t[0] = t[0].replace(&id, &forged_id);
    assert_problem(&verify_lines(&c, "edit-id.log", &t), 1, "edited");

    // Delete a middle line, and the first line.
    let mut t = orig.clone();
    t.remove(2);
    assert_problem(&verify_lines(&c, "del.log", &t), 3, "deleted");
    let mut t = orig.clone();
    t.remove(0);
    assert_problem(&verify_lines(&c, "del0.log", &t), 1, "deleted");

    // Insert a copy of another line, in the middle and at the end.
    let mut t = orig.clone();
    t.insert(3, orig[1].clone());
    assert_problem(&verify_lines(&c, "ins.log", &t), 4, "inserted");
    let mut t = orig.clone();
    t.push(orig[1].clone());
    assert_problem(&verify_lines(&c, "ins-end.log", &t), 7, "inserted");
    // Insert a forged line with a made-up MAC that fits the chain by seq.
    let mut t = orig.clone();
    let mac_at = orig[2].find("\"mac\":\"").unwrap() + 7;
    let forged = format!("{}{}\"}}", &orig[2][..mac_at], "ab".repeat(32));
    t.insert(3, forged);
    assert_problem(&verify_lines(&c, "forged.log", &t), 4, "inserted");
    // A forged line appended at the end.
    let mut t = orig.clone();
    let last = orig[5].replace("\"seq\":5", "\"seq\":6");
    let mac_at = last.find("\"mac\":\"").unwrap() + 7;
    t.push(format!("{}{}\"}}", &last[..mac_at], "cd".repeat(32)));
    let out = verify_lines(&c, "forged-end.log", &t);
    assert_problem(&out, 7, "line 7");

    // Swap two lines, in the middle and at the end.
    let mut t = orig.clone();
    t.swap(2, 3);
    assert_problem(&verify_lines(&c, "swap.log", &t), 3, "reordered");
    let mut t = orig.clone();
    t.swap(4, 5);
    assert_problem(&verify_lines(&c, "swap-end.log", &t), 5, "reordered");

    // Truncate: drop the last line, drop two, cut the last line in half.
    let t = orig[..5].to_vec();
    let out = verify_lines(&c, "trunc.log", &t);
    assert_problem(&out, 6, "truncated");
    assert!(
        stderr(&out).contains("1 entry after line 5"),
        "{}",
        stderr(&out)
    );
    let t = orig[..4].to_vec();
    assert_problem(&verify_lines(&c, "trunc2.log", &t), 5, "truncated");
    let mut text = orig.join("\n");
    text.truncate(text.len() - orig[5].len() / 2);
    write(&c.path("half.log"), text.as_bytes());
    let out = c.run(&["audit", "verify", "half.log"]);
    assert_problem(&out, 6, "truncated");
    assert!(stderr(&out).contains("incomplete"), "{}", stderr(&out));
    // Only the newline of the last line gone: the line is complete and
    // authentic (a write cut short just before its last byte leaves this),
    // so nothing is missing; the next append adds the newline.
    write(&c.path("nonl.log"), orig.join("\n").as_bytes());
    let out = c.run(&["audit", "verify", "nonl.log"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("line 6 lacks its final newline"),
        "{}",
        stderr(&out)
    );
    // Emptied.
    write(&c.path("empty.log"), b"");
    assert_problem(&c.run(&["audit", "verify", "empty.log"]), 1, "truncated");

    // --json gives the problem as an object.
    let mut t = orig.clone();
    t.remove(2);
    verify_lines(&c, "j.log", &t);
    let out = c.run(&["--json", "audit", "verify", "j.log"]);
    assert_eq!(code(&out), 3);
    let j = support::json_one(&out.stdout, "audit");
    assert_eq!(j["intact"], false);
    assert_eq!(j["problem"]["kind"], "deleted");
    assert_eq!(j["problem"]["line"], 3);

    // The original still verifies.
    let out = c.run(&["audit", "verify", LOG]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn a_tampered_log_is_never_appended_to_and_no_work_is_done() {
    let c = short_session();
    let log = c.path(LOG);
    let orig = std::fs::read(&log).unwrap();
    write(&c.path("b.txt"), b"more");
    let cases: Vec<(&str, Vec<u8>)> = {
        let text = String::from_utf8(orig.clone()).unwrap();
        let ls: Vec<&str> = text.lines().collect();
        let join = |v: &[&str]| {
            let mut s = v.join("\n");
            s.push('\n');
            s.into_bytes()
        };
        vec![
            ("truncated", join(&ls[..5])),
            ("edited", {
                let edited = ls[5].replace("\"ok\":1", "\"ok\":2");
                join(&[&ls[..5], &[edited.as_str()][..]].concat())
            }),
            ("half line", orig[..orig.len() - 30].to_vec()),
            ("emptied", Vec::new()),
        ]
    };
    for (what, bytes) in cases {
        write(&log, &bytes);
        let out = run(&c, &["encrypt", "--key", "k", "b.txt"]);
        assert_eq!(code(&out), 3, "{what}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("hsmseal audit verify"),
            "{what}: {}",
            stderr(&out)
        );
        assert!(!c.path("b.txt.hseal").exists(), "{what}: work was done");
        assert_eq!(std::fs::read(&log).unwrap(), bytes, "{what}: log changed");
    }
    // A deleted log is refused too (the HSM remembers it).
    std::fs::remove_file(&log).unwrap();
    let out = run(&c, &["encrypt", "--key", "k", "b.txt"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(!log.exists());
    let out = c.run(&["audit", "verify", log.to_str().unwrap()]);
    assert_problem(&out, 1, "missing");

    // Restored, it is appended to again.
    write(&log, &orig);
    ok(&c, &["encrypt", "--key", "k", "b.txt"]);
    assert_eq!(lines(&log).len(), 7);
    ok(&c, &["audit", "verify"]);
    // `audit init` may start a new log where one was deleted, explicitly.
    std::fs::rename(&log, c.path("old.log")).unwrap();
    ok(&c, &["audit", "init"]);
    assert_eq!(lines(&log).len(), 1);
    ok(&c, &["key", "rotate", "k"]);
    ok(&c, &["audit", "verify"]);
    let out = ok(&c, &["audit", "verify", "old.log"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("7 entries"));
}

#[test]
fn without_the_audit_key_nothing_is_called_intact() {
    let c = short_session();
    let log = c.path(LOG);
    // Another token: no audit key there.
    let other = Cli::new();
    let out = other.run(&["audit", "verify", log.to_str().unwrap()]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("hsmseal audit init"),
        "{}",
        stderr(&out)
    );
    // Another token with its own audit key: no MAC verifies and it has no
    // head record for this log, so it is not this token's log (exit 4),
    // not "intact" and not blamed on tampering.
    let out = other.run(&["audit", "init"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = other.run(&["audit", "verify", log.to_str().unwrap()]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("another token"), "{}", stderr(&out));
    // The key deleted from this token.
    delete_audit_key(&c);
    let out = c.run(&["audit", "verify", LOG]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    // And a logged command refuses to run without it.
    let out = run(&c, &["key", "rotate", "k"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    // `audit init` is idempotent and says so.
    let out = ok(&c, &["audit", "init"]);
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(s.contains("created the audit HMAC key"), "{s}");
    let out = ok(&c, &["audit", "init"]);
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(s.contains("already exists"), "{s}");
}

#[test]
fn nothing_is_written_without_a_configured_log() {
    let c = Cli::with_key();
    write(&c.path("a.txt"), b"x");
    c.ok(&["encrypt", "--key", "k", "a.txt"]);
    c.ok(&["key", "rotate", "k"]);
    assert_eq!(c.files(), ["a.txt", "a.txt.hseal"]);
    let out = c.run(&["audit", "verify"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

#[test]
fn audit_log_from_the_environment_and_the_file_is_private() {
    // (Concurrent appends: `several_processes_append_at_once` below, and
    // tests/audit_hsm.rs for threads.)
    let c = Cli::new();
    let env = [("HSMSEAL_AUDIT_LOG", LOG)];
    let out = c.run_with(&["audit", "init"], None, &env);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    c.ok(&["--audit-log", LOG, "key", "create", "k"]);
    write(&c.path("f.txt"), b"f");
    let out = c.run_with(&["encrypt", "--key", "k", "f.txt"], None, &env);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(lines(&c.path(LOG)).len(), 3);
    let show = c.run_with(&["config", "show"], None, &env);
    assert!(String::from_utf8_lossy(&show.stdout).contains("environment HSMSEAL_AUDIT_LOG"));
    let out = c.run_with(&["audit", "verify"], None, &env);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(c.path(LOG)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn an_interrupted_bulk_decrypt_is_logged_with_what_it_had_done() {
    use std::time::{Duration, Instant};
    let c = Cli::new();
    ok(&c, &["audit", "init"]);
    ok(&c, &["key", "create", "k"]);
    for i in 0..400usize {
        let p = c.path(&format!("t/d{}/f{i:03}", i % 4));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write(&p, &support::data(30_000 + i * 50, i as u64));
    }
    ok(
        &c,
        &[
            "-q",
            "encrypt",
            "--key",
            "k",
            "-r",
            "t",
            "--output-dir",
            "sealed",
        ],
    );
    let before = lines(&c.path(LOG)).len();

    // Decrypt the tree and stop it with SIGTERM once 20 outputs exist: files
    // already decrypted are on disk, so the log must record the run.
    let mut interrupted = None;
    for extra_ms in [0u64, 10, 30] {
        let _ = std::fs::remove_dir_all(c.path("plain"));
        let mut cmd = c.cmd();
        cmd.args(["--audit-log", LOG, "--jobs", "2", "decrypt", "-r", "sealed"])
            .args(["--output-dir", "plain"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while walk_files(&c.path("plain")) < 20 && child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the run did not start");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(extra_ms));
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = child.wait().unwrap();
        let last = entries(&c.path(LOG)).pop().unwrap();
        assert_eq!(last["command"], "decrypt");
        if status.code() == Some(143) {
            interrupted = Some(last);
            break;
        }
        assert_eq!(status.code(), Some(0), "{status:?}");
        assert_eq!(last["result"], "ok");
    }
    let last = interrupted.expect("no run was interrupted");
    println!("interrupted entry: {last}");
    assert_eq!(last["result"], "interrupted", "{last}");
    assert_eq!(last["exit_code"], 143);
    assert_eq!(last["error"], "interrupted by SIGTERM");
    // It counts what was done before the signal: every item counted ok has
    // its output on disk (reports are counted in input order, so a few
    // finished outputs may not be counted yet).
    let done = last["items"]["ok"].as_u64().unwrap();
    let on_disk = walk_files(&c.path("plain"));
    assert!(
        done as usize <= on_disk && done < 400,
        "{last}: {on_disk} on disk"
    );
    if done > 0 {
        assert_eq!(last["keys"][0], "k v1", "{last}");
        assert!(last["bytes"].as_u64().unwrap() > 0, "{last}");
    }
    assert!(lines(&c.path(LOG)).len() > before);
    // One entry per run, chain intact, head up to date.
    let out = c.run(&["audit", "verify", LOG]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    ok(&c, &["verify", "sealed/d0/f000.hseal"]);
}

#[test]
fn several_processes_append_at_once() {
    let c = Cli::new();
    ok(&c, &["audit", "init"]);
    ok(&c, &["key", "create", "k"]);
    write(&c.path("a.txt"), b"x");
    ok(&c, &["encrypt", "--key", "k", "a.txt"]);
    let mut exits: Vec<i32> = Vec::new();
    for _round in 0..5 {
        let children: Vec<std::process::Child> = (0..4)
            .map(|_| {
                let mut cmd = c.cmd();
                cmd.args(["--audit-log", LOG, "verify", "a.txt.hseal"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                cmd.spawn().unwrap()
            })
            .collect();
        for mut ch in children {
            exits.push(ch.wait().unwrap().code().unwrap_or(-1));
        }
    }
    // Every run succeeds (the token lock keeps SoftHSM2's logins apart,
    // issue 9 item 7), and every one is in the log, in one intact chain.
    assert!(exits.iter().all(|&e| e == 0), "{exits:?}");
    let succeeded = exits.len();
    let e = entries(&c.path(LOG));
    let logged_ok = e
        .iter()
        .filter(|e| e["command"] == "verify" && e["result"] == "ok")
        .count();
    assert_eq!(logged_ok, succeeded, "{exits:?}");
    let out = ok(&c, &["audit", "verify"]);
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(s.contains(&format!("{} entries", e.len())), "{s}");
}

#[test]
fn no_file_name_reaches_the_log() {
    let c = Cli::new();
    ok(&c, &["audit", "init"]);
    ok(&c, &["key", "create", "k"]);
    let dir = c.path("acme-payroll-2025");
    std::fs::create_dir(&dir).unwrap();
    write(&dir.join("ledger.txt"), b"payroll");
    ok(
        &c,
        &["encrypt", "--key", "k", "acme-payroll-2025/ledger.txt"],
    );
    let mut sealed = std::fs::read(dir.join("ledger.txt.hseal")).unwrap();
    let n = sealed.len();
    sealed[n - 5] ^= 1;
    write(&dir.join("ledger-tampered.hseal"), &sealed);
    write(&dir.join("bad-rows.csv"), b"id,ssn\n1,2,3\n");
    let failing: [&[&str]; 4] = [
        &["encrypt", "--key", "k", "acme-payroll-2025/missing.csv"],
        &[
            "decrypt",
            "-o",
            "acme-payroll-2025/out.txt",
            "acme-payroll-2025/ledger-tampered.hseal",
        ],
        &["verify", "acme-payroll-2025/ledger-tampered.hseal"],
        &[
            "columns",
            "encrypt",
            "--key",
            "k",
            "--columns",
            "ssn",
            "-i",
            "acme-payroll-2025/bad-rows.csv",
            "-o",
            "acme-payroll-2025/enc.csv",
        ],
    ];
    for args in failing {
        let out = run(&c, args);
        assert_ne!(code(&out), 0, "{args:?}");
        // The user still gets the name, on stderr.
        assert!(
            stderr(&out).contains("acme-payroll-2025"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let log = std::fs::read_to_string(c.path(LOG)).unwrap();
    for name in [
        "acme",
        "payroll",
        "missing.csv",
        "ledger",
        "bad-rows",
        "enc.csv",
        "out.txt",
    ] {
        assert!(!log.contains(name), "{name} in the log:\n{log}");
    }
    let work = c.work.path().to_str().unwrap();
    assert!(!log.contains(work), "{log}");
    let e = entries(&c.path(LOG));
    assert_eq!(e.len(), 7);
    let errors: Vec<&str> = e[3..].iter().filter_map(|e| e["error"].as_str()).collect();
    println!("error fields: {errors:?}");
    assert!(!errors.is_empty(), "{e:?}");
    for (entry, args) in e[3..].iter().zip(failing) {
        assert_ne!(entry["result"], "ok", "{args:?}: {entry}");
    }
    ok(&c, &["audit", "verify"]);
}

fn walk_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk_files(&p)
                } else {
                    1
                }
            })
            .sum()
        })
        .unwrap_or(0)
}
