//! Several hsmseal processes on one SoftHSM2 token at once (issue 9, items
//! 2 and 7): zero failures, unique key versions, every output decrypting to
//! its input; and the token lock they share (place, permissions, waiting,
//! refusing a planted link, exiting on a signal while waiting).
//!
//! Before the token lock, 4 parallel encrypts failed 16 of 200 runs here
//! (`C_GetTokenInfo` `CKR_GENERAL_ERROR`, "no token labelled"), the pipeline
//! 9 of 50, and two `key rotate` at once left duplicated labels (see
//! scripts/stress-token.sh). No test here measures time: a deadline only
//! turns a hang into a failure message.

mod support;

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::{code, data, stderr, write, Cli};

/// Starts `args` with the test's token settings; stdout and stderr piped.
fn spawn(c: &Cli, args: &[&str]) -> Child {
    let mut cmd = c.cmd();
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("spawn hsmseal")
}

/// Waits for every child and asserts each exited 0.
fn all_ok(children: Vec<(String, Child)>) -> Vec<Output> {
    children
        .into_iter()
        .map(|(what, child)| {
            let out = child.wait_with_output().unwrap();
            assert_eq!(code(&out), 0, "{what}: {}", stderr(&out));
            out
        })
        .collect()
}

/// `key list --json` as (version, label, problems) for key `name`.
fn versions(c: &Cli, name: &str) -> Vec<(u64, String, Vec<String>)> {
    let out = c.ok(&["--json", "key", "list"]);
    support::json_of_type(&out, "key")
        .iter()
        .filter(|k| k["name"] == name)
        .map(|k| {
            (
                k["version"].as_u64().unwrap(),
                k["label"].as_str().unwrap().to_string(),
                k["problems"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// Two nightly `key rotate --if-older-than` jobs at once make one new
/// version, never two: the age check and the creation happen under one
/// exclusive token lock. Each round disables the current version, so both
/// jobs see a key with no usable version; the one that runs second must
/// see the version the first made (young: not rotated).
#[test]
fn two_conditional_rotates_at_once_make_one_version() {
    let c = Cli::with_key();
    let rounds = 10;
    for round in 1..=rounds {
        c.ok(&["key", "disable", "k", "--version", &round.to_string()]);
        let outs = all_ok(vec![
            (
                format!("round {round}: a"),
                spawn(
                    &c,
                    &["--json", "key", "rotate", "k", "--if-older-than", "1d"],
                ),
            ),
            (
                format!("round {round}: b"),
                spawn(
                    &c,
                    &["--json", "key", "rotate", "k", "--if-older-than", "1d"],
                ),
            ),
        ]);
        let rotated: Vec<bool> = outs
            .iter()
            .map(|o| {
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                assert_eq!(v["current_version"], round + 1, "round {round}: {v}");
                v["rotated"].as_bool().unwrap()
            })
            .collect();
        assert_eq!(
            rotated.iter().filter(|r| **r).count(),
            1,
            "round {round}: {rotated:?}"
        );
    }
    let numbers: Vec<u64> = versions(&c, "k").iter().map(|(v, _, _)| *v).collect();
    assert_eq!(numbers, (1..=rounds + 1).collect::<Vec<u64>>());
}

#[test]
fn two_key_rotates_at_once_issue_unique_usable_versions() {
    let c = Cli::with_key();
    let rounds = 20;
    for round in 0..rounds {
        all_ok(vec![
            (
                format!("round {round}: rotate a"),
                spawn(&c, &["key", "rotate", "k"]),
            ),
            (
                format!("round {round}: rotate b"),
                spawn(&c, &["key", "rotate", "k"]),
            ),
        ]);
    }
    // v1 from Cli::with_key, then two new versions per round, each once.
    let listed = versions(&c, "k");
    let numbers: Vec<u64> = listed.iter().map(|(v, _, _)| *v).collect();
    let want: Vec<u64> = (1..=1 + 2 * rounds).collect();
    assert_eq!(numbers, want, "{listed:?}");
    for (v, label, problems) in &listed {
        assert_eq!(label, &format!("hsmseal:k:v{v}"));
        assert!(problems.is_empty(), "v{v}: {problems:?}");
    }
    // Every version wraps and unwraps: newest first, encrypt under the
    // current version, then disable it so the next one down is current.
    let top = 1 + 2 * rounds;
    for v in (1..=top).rev() {
        let input = c.path(&format!("in{v}"));
        write(&input, &data(100, v));
        let out = c.run(&["--json", "encrypt", "--key", "k", &format!("in{v}")]);
        assert_eq!(code(&out), 0, "v{v}: {}", stderr(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("\"version\":{v}")),
            "v{v}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        if v > 1 {
            c.ok(&["key", "disable", "k", "--version", &v.to_string()]);
        }
    }
    for v in 2..=top {
        c.ok(&["key", "enable", "k", "--version", &v.to_string()]);
    }
    for v in 1..=top {
        let out = c.ok(&["decrypt", "-o", "-", &format!("in{v}.hseal")]);
        assert_eq!(out, data(100, v), "v{v}");
    }
}

#[test]
fn four_parallel_encrypts_for_200_rounds_all_decrypt() {
    let c = Cli::with_key();
    std::fs::create_dir(c.path("plain")).unwrap();
    std::fs::create_dir(c.path("sealed")).unwrap();
    let rounds = 200;
    for round in 0..rounds {
        let mut children = Vec::new();
        for j in 0..4u64 {
            let name = format!("r{round}-{j}");
            write(
                &c.path(&format!("plain/{name}")),
                &data(64 + j as usize, round * 4 + j),
            );
            children.push((
                format!("round {round} encrypt {j}"),
                spawn(
                    &c,
                    &[
                        "-q",
                        "encrypt",
                        "--key",
                        "k",
                        "-o",
                        &format!("sealed/{name}.hseal"),
                        &format!("plain/{name}"),
                    ],
                ),
            ));
        }
        all_ok(children);
    }
    // One run decrypts all 800 and each matches its input.
    c.ok(&["-q", "decrypt", "-r", "sealed", "--output-dir", "restored"]);
    let mut n = 0;
    for e in std::fs::read_dir(c.path("plain")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        let restored = std::fs::read(c.path(&format!("restored/{name}"))).unwrap();
        assert_eq!(
            restored,
            std::fs::read(c.path(&format!("plain/{name}"))).unwrap(),
            "{name}"
        );
        n += 1;
    }
    assert_eq!(n, 4 * rounds);
}

#[test]
fn decrypt_to_stdout_into_columns_decrypt_500_runs() {
    let c = Cli::new();
    c.ok(&["key", "create", "pii"]);
    c.ok(&["key", "create", "files"]);
    let plain = b"id,ssn,name\n1,111-22-3333,Alice\n2,444-55-6666,Bob\n";
    write(&c.path("plain.csv"), plain);
    c.ok(&[
        "columns",
        "encrypt",
        "--key",
        "pii",
        "--columns",
        "ssn",
        "-i",
        "plain.csv",
        "-o",
        "enc.csv",
    ]);
    c.ok(&["encrypt", "--key", "files", "enc.csv"]);
    for run in 0..500 {
        let mut first = c.cmd();
        first
            .args(["-q", "decrypt", "-o", "-", "enc.csv.hseal"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut first = first.spawn().unwrap();
        let pipe = first.stdout.take().unwrap();
        let mut second = c.cmd();
        second
            .args([
                "-q",
                "columns",
                "decrypt",
                "--format",
                "csv",
                "--columns",
                "ssn",
            ])
            .stdin(Stdio::from(pipe))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let second = second.spawn().unwrap();
        let a = first.wait_with_output().unwrap();
        let b = second.wait_with_output().unwrap();
        assert_eq!(code(&a), 0, "run {run}: decrypt: {}", stderr(&a));
        assert_eq!(code(&b), 0, "run {run}: columns decrypt: {}", stderr(&b));
        assert_eq!(b.stdout, plain, "run {run}");
    }
}

#[test]
fn key_list_encrypt_and_rotate_r_side_by_side() {
    let c = Cli::with_key();
    std::fs::create_dir(c.path("tree")).unwrap();
    for i in 0..20u64 {
        write(&c.path(&format!("tree/f{i}")), &data(200, i));
    }
    c.ok(&["-q", "encrypt", "--key", "k", "-r", "tree", "--in-place"]);
    for round in 0..30u64 {
        // A new current version each round, so `rotate -r` has work to do.
        c.ok(&["-q", "key", "rotate", "k"]);
        write(&c.path(&format!("side{round}")), &data(300, 1000 + round));
        all_ok(vec![
            (
                format!("round {round}: key list"),
                spawn(&c, &["key", "list"]),
            ),
            (
                format!("round {round}: encrypt"),
                spawn(
                    &c,
                    &["-q", "encrypt", "--key", "k", &format!("side{round}")],
                ),
            ),
            (
                format!("round {round}: rotate -r"),
                spawn(&c, &["-q", "rotate", "-r", "tree"]),
            ),
        ]);
    }
    // Every tree file was rewrapped to the last version and still decrypts.
    let out = c.ok(&["--json", "inspect", "tree/f0.hseal"]);
    assert!(
        String::from_utf8_lossy(&out).contains("\"key_version\":31"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    for i in 0..20u64 {
        let out = c.ok(&["decrypt", "-o", "-", &format!("tree/f{i}.hseal")]);
        assert_eq!(out, data(200, i), "f{i}");
    }
    for round in 0..30u64 {
        let out = c.ok(&["decrypt", "-o", "-", &format!("side{round}.hseal")]);
        assert_eq!(out, data(300, 1000 + round), "side{round}");
    }
    assert_eq!(versions(&c, "k").len(), 31);
}

// ---- the lock itself ----

/// Where hsmseal puts the lock for a SoftHSM2 token directory.
fn softhsm2_lock_path(c: &Cli) -> PathBuf {
    std::fs::canonicalize(c.token.dir.path().join("tokens"))
        .unwrap()
        .join(".hsmseal.lock")
}

/// Holds an exclusive `flock` on `path` the way another hsmseal process
/// would, until dropped (closing the file releases it).
struct Holder {
    _file: File,
}

impl Holder {
    fn new(path: &Path) -> Holder {
        let f = File::open(path).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        Holder { _file: f }
    }
}

/// Waits until `/proc/locks` shows process `pid` blocked on the file with
/// inode `ino` (a line `N: -> FLOCK ... PID MAJ:MIN:INO ...`).
fn wait_until_blocked(pid: u32, ino: u64, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let locks = std::fs::read_to_string("/proc/locks").unwrap();
        let blocked = locks.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"->")
                && f.get(5) == Some(&pid.to_string().as_str())
                && f.get(6).and_then(|d| d.rsplit(':').next()) == Some(&ino.to_string())
        });
        if blocked {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("process {pid} ended ({status}) without waiting for the token lock");
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} never waited for the token lock:\n{locks}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_lock_lives_in_the_token_directory_readable_by_its_users() {
    let c = Cli::with_key();
    let p = softhsm2_lock_path(&c);
    let m = std::fs::symlink_metadata(&p).expect("lock file in the token directory");
    assert!(m.file_type().is_file());
    assert_eq!(m.permissions().mode() & 0o7777, 0o644);
    assert_eq!(m.len(), 0, "the lock file holds nothing");
    // SoftHSM2 still sees exactly the one token (the file is not a token).
    c.ok(&["doctor"]);
}

#[test]
fn a_process_waits_while_another_holds_the_lock_then_succeeds() {
    let c = Cli::with_key();
    let p = softhsm2_lock_path(&c);
    let ino = std::fs::metadata(&p).unwrap().ino();
    let holder = Holder::new(&p);
    let mut child = spawn(&c, &["key", "rotate", "k"]);
    wait_until_blocked(child.id(), ino, &mut child);
    assert!(child.try_wait().unwrap().is_none());
    drop(holder);
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(versions(&c, "k").len(), 2);
}

#[test]
fn sigterm_while_waiting_for_the_lock_exits_143_and_changes_nothing() {
    let c = Cli::with_key();
    let p = softhsm2_lock_path(&c);
    let ino = std::fs::metadata(&p).unwrap().ino();
    let holder = Holder::new(&p);
    let mut child = spawn(&c, &["key", "rotate", "k"]);
    wait_until_blocked(child.id(), ino, &mut child);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 143, "{}", stderr(&out));
    drop(holder);
    assert_eq!(versions(&c, "k").len(), 1);
}

#[test]
fn a_link_or_fifo_in_place_of_the_lock_file_is_refused() {
    let c = Cli::with_key();
    let p = softhsm2_lock_path(&c);
    let target = c.path("elsewhere");
    std::fs::remove_file(&p).unwrap();
    std::os::unix::fs::symlink(&target, &p).unwrap();
    let out = c.run(&["key", "list"]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("is a symbolic link"), "{e}");
    assert!(e.contains(&p.display().to_string()), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(!target.exists(), "the link was followed");

    std::fs::remove_file(&p).unwrap();
    let status = Command::new("mkfifo").arg(&p).status().unwrap();
    assert!(status.success());
    assert!(std::fs::metadata(&p).unwrap().file_type().is_fifo());
    // Refused at once, not stuck opening the FIFO.
    let out = c.run(&["key", "list"]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not a regular file"),
        "{}",
        stderr(&out)
    );

    // Removed, it is made again and everything works.
    std::fs::remove_file(&p).unwrap();
    c.ok(&["key", "list"]);
    assert!(std::fs::symlink_metadata(&p).unwrap().file_type().is_file());
}

#[test]
fn other_modules_lock_in_the_lock_directory_per_module_and_token() {
    let c = Cli::with_key();
    // The same SoftHSM2 library under another file name is "another module"
    // (hsmseal goes by the module's file name).
    let module_dir = tempfile::tempdir().unwrap();
    let module = module_dir.path().join("libvendor-pkcs11.so");
    std::fs::copy(&c.token.module, &module).unwrap();
    let module = module.to_str().unwrap();

    let lock_dir = tempfile::tempdir().unwrap();
    let out = c.run_with(
        &["key", "list"],
        None,
        &[
            ("HSMSEAL_PKCS11_MODULE", module),
            ("HSMSEAL_LOCK_DIR", lock_dir.path().to_str().unwrap()),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let names: Vec<String> = std::fs::read_dir(lock_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(
        names[0].starts_with("pkcs11-libvendor-pkcs11.so-") && names[0].ends_with(".lock"),
        "{names:?}"
    );

    // Without HSMSEAL_LOCK_DIR: a private directory under XDG_RUNTIME_DIR.
    let runtime = tempfile::tempdir().unwrap();
    let out = c.run_with(
        &["key", "list"],
        None,
        &[
            ("HSMSEAL_PKCS11_MODULE", module),
            ("XDG_RUNTIME_DIR", runtime.path().to_str().unwrap()),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let dir = runtime.path().join("hsmseal");
    let m = std::fs::symlink_metadata(&dir).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

    // A lock directory open to others is refused, naming the fix.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = c.run_with(
        &["key", "list"],
        None,
        &[
            ("HSMSEAL_PKCS11_MODULE", module),
            ("XDG_RUNTIME_DIR", runtime.path().to_str().unwrap()),
        ],
    );
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("HSMSEAL_LOCK_DIR"),
        "{}",
        stderr(&out)
    );
    // A HSMSEAL_LOCK_DIR that does not exist is a usage error.
    let out = c.run_with(
        &["key", "list"],
        None,
        &[
            ("HSMSEAL_PKCS11_MODULE", module),
            ("HSMSEAL_LOCK_DIR", "/nonexistent/hsmseal-locks"),
        ],
    );
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("HSMSEAL_LOCK_DIR /nonexistent/hsmseal-locks"),
        "{}",
        stderr(&out)
    );
}
