//! Several hsmseal processes on one file (issue 9, item 1): writers of an
//! existing hsmseal file take its exclusive lock and read its header under
//! it, so two rotations, a rotation beside `--reencrypt`, `decrypt
//! --in-place` beside a rotation and `encrypt` beside `rotate -r` never lose
//! a file. Each round demands zero loss (the file decrypts to its original)
//! and exit 0 from every process; the rounds all run before the exit-code
//! check so that its message says how many failures were token errors
//! (exit 5, SoftHSM2 beside another process) and how many anything else.
//!
//! Also: a waiting writer says so on stderr (not with --quiet) and then does
//! its work; a killed lock holder blocks nobody; stale temporary files of a
//! killed run are removed by the next run, a live run's never.

mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{code, data, stderr, write, Cli};

fn spawn(c: &Cli, args: &[&str]) -> Child {
    let mut cmd = c.cmd();
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("spawn hsmseal")
}

/// Non-zero exits of a run of rounds, told apart by cause.
#[derive(Default)]
struct Failures {
    processes: usize,
    token: usize,
    other: Vec<String>,
}

impl Failures {
    fn note(&mut self, round: usize, what: &str, o: &Output) {
        self.processes += 1;
        if o.status.success() {
            return;
        }
        if code(o) == 5 {
            self.token += 1;
        } else {
            self.other.push(format!(
                "round {round}: {what}: exit {}: {}",
                code(o),
                stderr(o).trim()
            ));
        }
    }

    /// Every process must have exited 0.
    fn assert_none(&self, rounds: usize) {
        let processes = self.processes;
        assert!(
            self.token == 0 && self.other.is_empty(),
            "{} of {processes} processes in {rounds} rounds failed: {} with a token error (exit 5), {} otherwise{}",
            self.token + self.other.len(),
            self.token,
            self.other.len(),
            self.other
                .iter()
                .take(5)
                .map(|s| format!("\n  {s}"))
                .collect::<String>()
        );
    }
}

/// The file's plaintext, decrypted by a separate process. A token error of
/// this check is counted as a failure, and the check repeated so that a
/// loss is told apart from it (the operations under test are never retried).
fn decrypted(c: &Cli, file: &str, round: usize, f: &mut Failures) -> Vec<u8> {
    for _ in 0..5 {
        let o = c.run(&["decrypt", "-o", "-", file]);
        f.note(round, "decrypt (check)", &o);
        if code(&o) != 5 {
            assert!(
                o.status.success(),
                "round {round}: {file} LOST: it no longer decrypts: {}",
                stderr(&o)
            );
            return o.stdout;
        }
    }
    panic!("round {round}: {file} could not be checked: five token errors in a row");
}

/// (status, from_key, key) of a one-item `--json rotate` run.
fn rotate_report(o: &Output) -> Option<(String, String, String)> {
    let first = String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()?
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&first).ok()?;
    Some((
        v["status"].as_str()?.to_string(),
        v["from_key"].as_str().unwrap_or("").to_string(),
        v["key"].as_str()?.to_string(),
    ))
}

/// The key of the file's active envelope, read from the header directly.
fn active_key(p: &Path) -> String {
    let b = std::fs::read(p).unwrap();
    let envelope = |off: usize| (u64::from_be_bytes(b[off..off + 8].try_into().unwrap()), off);
    let (seq, off) = std::cmp::max(envelope(256), envelope(512));
    assert!(seq > 0, "{}: no envelope", p.display());
    String::from_utf8(b[off + 9..off + 9 + b[off + 8] as usize].to_vec()).unwrap()
}

fn temps_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".hsmseal-tmp-"))
        .collect()
}

/// Two processes rotate one file at once, to k1 and to k2, 200 times.
/// Before the lock, about 1 round in 8 left both envelopes empty with both
/// processes exiting 0. Now the file always decrypts, and the rotations are
/// serial: one moved it from k0, the other from the first one's key, and the
/// file ends under the key of the one that went second.
#[test]
fn two_rotations_of_one_file_never_lose_it() {
    const ROUNDS: usize = 200;
    let c = Cli::new();
    for k in ["k0", "k1", "k2"] {
        c.ok(&["key", "create", k]);
    }
    let plain = data(50_000, 7);
    write(&c.path("f"), &plain);
    c.ok(&["-q", "encrypt", "--key", "k0", "--in-place", "f"]);
    let f = c.path("f.hseal");
    let mut fails = Failures::default();
    for round in 0..ROUNDS {
        if active_key(&f) != "k0" {
            let o = c.run(&["-q", "rotate", "--key", "k0", "f.hseal"]);
            fails.note(round, "rotate --key k0 (setup)", &o);
            if !o.status.success() {
                continue;
            }
        }
        let a = spawn(&c, &["--json", "rotate", "--key", "k1", "f.hseal"]);
        let b = spawn(&c, &["--json", "rotate", "--key", "k2", "f.hseal"]);
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        assert_eq!(
            decrypted(&c, "f.hseal", round, &mut fails),
            plain,
            "round {round}: wrong plaintext"
        );
        fails.note(round, "rotate --key k1", &a);
        fails.note(round, "rotate --key k2", &b);
        if let (true, true) = (a.status.success(), b.status.success()) {
            let (ra, rb) = (rotate_report(&a).unwrap(), rotate_report(&b).unwrap());
            assert_eq!((ra.0.as_str(), rb.0.as_str()), ("rotated", "rotated"));
            let second = match (ra.1.as_str(), rb.1.as_str()) {
                ("k0", "k1") => &rb,
                ("k2", "k0") => &ra,
                other => panic!("round {round}: not serial: both rotated from {other:?}"),
            };
            assert_eq!(active_key(&f), second.2, "round {round}");
        }
        assert!(temps_in(c.work.path()).is_empty());
    }
    fails.assert_none(ROUNDS);
}

/// `rotate` beside `rotate --reencrypt` of the same file: the re-encryption
/// renames a new file over the path while holding the old one's lock; a
/// rotation that waited must then rotate the new file, not the orphaned
/// old one (which would exit 0 and leave the file under the other key).
#[test]
fn rotation_beside_reencrypt_rotates_the_file_the_path_names() {
    const ROUNDS: usize = 100;
    let c = Cli::new();
    for k in ["k0", "k1", "k2"] {
        c.ok(&["key", "create", k]);
    }
    let plain = data(1 << 20, 8);
    write(&c.path("f"), &plain);
    c.ok(&["-q", "encrypt", "--key", "k0", "--in-place", "f"]);
    let f = c.path("f.hseal");
    let mut fails = Failures::default();
    for round in 0..ROUNDS {
        if active_key(&f) != "k0" {
            let o = c.run(&["-q", "rotate", "--key", "k0", "f.hseal"]);
            fails.note(round, "rotate --key k0 (setup)", &o);
            if !o.status.success() {
                continue;
            }
        }
        // Alternate which one starts first.
        let (a, b) = if round % 2 == 0 {
            let a = spawn(&c, &["--json", "rotate", "--key", "k1", "f.hseal"]);
            let b = spawn(
                &c,
                &["--json", "rotate", "--reencrypt", "--key", "k2", "f.hseal"],
            );
            (a, b)
        } else {
            let b = spawn(
                &c,
                &["--json", "rotate", "--reencrypt", "--key", "k2", "f.hseal"],
            );
            let a = spawn(&c, &["--json", "rotate", "--key", "k1", "f.hseal"]);
            (a, b)
        };
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        assert_eq!(
            decrypted(&c, "f.hseal", round, &mut fails),
            plain,
            "round {round}: wrong plaintext"
        );
        fails.note(round, "rotate --key k1", &a);
        fails.note(round, "rotate --reencrypt --key k2", &b);
        if let (true, true) = (a.status.success(), b.status.success()) {
            let (ra, rb) = (rotate_report(&a).unwrap(), rotate_report(&b).unwrap());
            assert_eq!(rb.0, "reencrypted", "round {round}");
            let second = match (ra.1.as_str(), rb.1.as_str()) {
                ("k0", "k1") => &rb,
                ("k2", "k0") => &ra,
                other => panic!(
                    "round {round}: not serial (a rotation of an orphaned file?): from {other:?}"
                ),
            };
            assert_eq!(active_key(&f), second.2, "round {round}");
        }
        assert!(temps_in(c.work.path()).is_empty());
    }
    fails.assert_none(ROUNDS);
}

/// `decrypt --in-place` beside a rotation of the same file: the plaintext
/// always ends up complete and the sealed file removed. The rotation exits
/// 0, or, when the decryption had already removed the file, reports that it
/// is gone (exit 7) rather than "rotating" something that is not there.
#[test]
fn decrypt_in_place_beside_a_rotation_loses_nothing() {
    const ROUNDS: usize = 100;
    let c = Cli::new();
    for k in ["k0", "k1"] {
        c.ok(&["key", "create", k]);
    }
    let plain = data(300_000, 9);
    let mut fails = Failures::default();
    let mut gone = 0;
    for round in 0..ROUNDS {
        write(&c.path("f"), &plain);
        let o = c.run(&["-q", "encrypt", "--key", "k0", "--in-place", "f"]);
        fails.note(round, "encrypt --in-place (setup)", &o);
        if !o.status.success() {
            continue;
        }
        let a = spawn(&c, &["-q", "decrypt", "--in-place", "f.hseal"]);
        let b = spawn(&c, &["-q", "rotate", "--key", "k1", "f.hseal"]);
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        fails.note(round, "decrypt --in-place", &a);
        if a.status.success() {
            assert_eq!(std::fs::read(c.path("f")).unwrap(), plain, "round {round}");
            assert!(!c.path("f.hseal").exists(), "round {round}");
        } else {
            // The sealed file must still be whole.
            assert_eq!(decrypted(&c, "f.hseal", round, &mut fails), plain);
            let _ = std::fs::remove_file(c.path("f"));
            std::fs::remove_file(c.path("f.hseal")).unwrap();
        }
        if code(&b) == 7 && stderr(&b).contains("no such file") {
            gone += 1;
        } else {
            fails.note(round, "rotate", &b);
        }
        assert!(temps_in(c.work.path()).is_empty());
        std::fs::remove_file(c.path("f")).ok();
    }
    eprintln!("{gone} of {ROUNDS} rotations found the file already decrypted and removed");
    fails.assert_none(ROUNDS);
}

/// `encrypt --in-place` of new files inside a tree while `rotate -r` runs on
/// that tree: every hsmseal file in the tree decrypts to its original
/// afterwards, and both runs exit 0 (a file that became sealed during the
/// walk is rotated or not, a plaintext removed during it is no item).
#[test]
fn encrypt_beside_rotate_r_of_the_same_tree() {
    const ROUNDS: usize = 20;
    let c = Cli::new();
    for k in ["k0", "k1", "k2"] {
        c.ok(&["key", "create", k]);
    }
    let mut originals: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    std::fs::create_dir_all(c.path("t/old")).unwrap();
    for i in 0..40 {
        let rel = format!("t/old/f{i:02}");
        let bytes = data(2_000 + i * 300, i as u64);
        write(&c.path(&rel), &bytes);
        originals.push((c.path(&format!("{rel}.hseal")), bytes));
    }
    c.ok(&["-q", "encrypt", "--key", "k0", "--in-place", "-r", "t/old"]);
    let mut fails = Failures::default();
    for round in 0..ROUNDS {
        let dir = format!("t/new{round:02}");
        std::fs::create_dir_all(c.path(&dir)).unwrap();
        let mut names = Vec::new();
        for i in 0..10 {
            let rel = format!("{dir}/p{i}");
            let bytes = data(5_000 + i * 1000, (round * 100 + i) as u64);
            write(&c.path(&rel), &bytes);
            originals.push((c.path(&format!("{rel}.hseal")), bytes));
            names.push(rel);
        }
        let target = if round % 2 == 0 { "k1" } else { "k2" };
        let r = spawn(&c, &["-q", "rotate", "--key", target, "-r", "t"]);
        let mut args = vec!["-q", "encrypt", "--key", "k0", "--in-place"];
        args.extend(names.iter().map(String::as_str));
        let e = spawn(&c, &args);
        let (r, e) = (r.wait_with_output().unwrap(), e.wait_with_output().unwrap());
        fails.note(round, "rotate -r t", &r);
        fails.note(round, "encrypt --in-place", &e);
        // Every sealed file there is decrypts to its original.
        let o = c.run(&["-q", "decrypt", "-r", "t", "--output-dir", "back"]);
        fails.note(round, "decrypt -r (check)", &o);
        if o.status.success() {
            for (sealed, bytes) in &originals {
                if !sealed.exists() {
                    continue; // its encrypt failed (reported above)
                }
                let rel = sealed.strip_prefix(c.path("t")).unwrap();
                let rel = rel.to_string_lossy();
                let back = c.path("back").join(rel.trim_end_matches(".hseal"));
                assert_eq!(
                    &std::fs::read(&back).unwrap(),
                    bytes,
                    "round {round}: {}",
                    sealed.display()
                );
            }
        }
        std::fs::remove_dir_all(c.path("back")).ok();
        for d in ["t/old".to_string(), dir] {
            assert!(
                temps_in(&c.path(&d)).is_empty(),
                "round {round}: temps in {d}"
            );
        }
    }
    fails.assert_none(ROUNDS);
}

/// Holds an exclusive flock on `p` from this (test) process.
fn hold_lock(p: &Path) -> File {
    let f = File::open(p).unwrap();
    // SAFETY: flock on a descriptor the test owns.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

/// Collects a child's stderr on a thread.
fn stderr_of(child: &mut Child) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stderr.take().unwrap();
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    buf
}

fn wait_for_text(child: &mut Child, buf: &Arc<Mutex<String>>, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !buf.lock().unwrap().contains(text) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited without waiting: {}",
            buf.lock().unwrap()
        );
        assert!(Instant::now() < deadline, "no {text:?} on stderr");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A writer (rotate) and a reader (verify) of a file whose lock another
/// process holds wait for it, say so on stderr, change nothing meanwhile,
/// and do their work once it is released; with --quiet the wait is silent.
#[test]
fn a_waiting_writer_or_reader_says_so_and_then_does_its_work() {
    let c = Cli::with_key();
    c.ok(&["key", "create", "b"]);
    let plain = data(40_000, 3);
    write(&c.path("f"), &plain);
    c.ok(&["-q", "encrypt", "--key", "k", "f"]);
    let f = c.path("f.hseal");
    let before = std::fs::read(&f).unwrap();

    let held = hold_lock(&f);
    let mut child = spawn(&c, &["rotate", "--key", "b", "f.hseal"]);
    let err = stderr_of(&mut child);
    wait_for_text(&mut child, &err, "waiting for");
    assert!(err.lock().unwrap().contains("f.hseal"));
    assert_eq!(std::fs::read(&f).unwrap(), before, "written while locked");
    drop(held);
    let status = child.wait().unwrap();
    assert!(status.success(), "{}", err.lock().unwrap());
    assert_eq!(active_key(&f), "b");

    let held = hold_lock(&f);
    let mut child = spawn(&c, &["verify", "f.hseal"]);
    let err = stderr_of(&mut child);
    wait_for_text(&mut child, &err, "waiting for");
    drop(held);
    assert!(child.wait().unwrap().success(), "{}", err.lock().unwrap());

    // --quiet: the same wait, nothing said. (Released after 2 s; if the run
    // had not reached the lock by then, there was nothing to say either.)
    let held = hold_lock(&f);
    let child = spawn(&c, &["-q", "rotate", "--key", "k", "f.hseal"]);
    std::thread::sleep(Duration::from_secs(2));
    drop(held);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "", "--quiet printed something");
    assert_eq!(active_key(&f), "k");
    let o = c.run(&["decrypt", "-o", "-", "f.hseal"]);
    assert_eq!(o.stdout, plain);
}

/// Every file under `dir` with its bytes, to restore a token after a kill.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

/// kill -9 of `rotate --reencrypt` at random instants: the file decrypts to
/// its original after every kill (old file or new one, never a mix), the
/// dead holder's lock blocks nobody (the next rotation runs at once), and
/// the temporary file it left is removed by the next run writing into the
/// directory.
#[test]
fn a_killed_reencrypt_leaves_the_file_whole_and_blocks_nobody() {
    use rand::{Rng, SeedableRng};
    let c = Cli::new();
    for k in ["a", "b"] {
        c.ok(&["key", "create", k]);
    }
    std::fs::create_dir(c.path("d")).unwrap();
    let plain = data(6 << 20, 11);
    write(&c.path("d/f"), &plain);
    c.ok(&["-q", "encrypt", "--key", "a", "--in-place", "d/f"]);
    let t0 = Instant::now();
    c.ok(&["-q", "rotate", "--reencrypt", "d/f.hseal"]);
    let full = t0.elapsed();
    // Re-encryption changes no token object; a client killed during its
    // login can damage SoftHSM2's token file (it rewrites it at every
    // login), which is not what this test is about: restore it.
    let token = snapshot(c.token.dir.path());
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x10c4);
    let mut swept = 0;
    for run in 0..30 {
        let target = if run % 2 == 0 { "b" } else { "a" };
        let mut child = c.cmd();
        child
            .args(["-q", "rotate", "--reencrypt", "--key", target, "d/f.hseal"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = child.spawn().unwrap();
        std::thread::sleep(full.mul_f64(rng.gen_range(0.0..1.2)));
        let _ = child.kill();
        child.wait().unwrap();
        for (p, bytes) in &token {
            std::fs::write(p, bytes).unwrap();
        }
        let left = temps_in(&c.path("d"));
        // The lock died with the process: this runs without waiting, and
        // its sweep removes what the killed run left.
        let o = c.run(&["rotate", "--key", target, "d/f.hseal"]);
        assert!(o.status.success(), "run {run}: {}", stderr(&o));
        assert!(!stderr(&o).contains("waiting for"), "run {run}: waited");
        let o = c.run(&["decrypt", "-o", "d/out", "d/f.hseal"]);
        assert!(o.status.success(), "run {run}: {}", stderr(&o));
        assert_eq!(std::fs::read(c.path("d/out")).unwrap(), plain, "run {run}");
        std::fs::remove_file(c.path("d/out")).unwrap();
        if !left.is_empty() {
            swept += 1;
            assert!(
                stderr(&o).contains("left by a run that was killed"),
                "run {run}: {}",
                stderr(&o)
            );
        }
        assert!(temps_in(&c.path("d")).is_empty(), "run {run}: not swept");
    }
    assert!(swept > 0, "no kill landed while a temporary file existed");
}

/// A dead process's pid: one that has just exited.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// A SIGKILLed decrypt leaves a hidden temporary file with a plaintext
/// prefix; the next run writing into that directory removes it. A live
/// run's temporary file is never removed (the second run finishes beside
/// it, the first one then completes), nor one whose lock someone holds,
/// nor anything that is not ours: another user's, a link, a directory, or
/// a name not in our pattern.
#[test]
fn stale_temporary_files_are_removed_and_live_ones_never() {
    let c = Cli::with_key();
    std::fs::create_dir(c.path("d")).unwrap();
    let plain = data(8 << 20, 12);
    write(&c.path("p"), &plain);
    c.ok(&["-q", "encrypt", "--key", "k", "-o", "p.hseal", "p"]);
    let sealed = std::fs::read(c.path("p.hseal")).unwrap();
    write(&c.path("small"), b"small");
    c.ok(&["-q", "encrypt", "--key", "k", "small"]);

    // A decrypt from stdin into d/out, fed half its input, and its temp.
    let half = |c: &Cli| {
        let mut cmd = c.cmd();
        cmd.args(["decrypt", "-o", "d/out", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&sealed[..sealed.len() / 2]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let temp = loop {
            let t = temps_in(&c.path("d"));
            if let Some(name) = t.first() {
                let p = c.path("d").join(name);
                if std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) > 0 {
                    break p;
                }
            }
            assert!(Instant::now() < deadline, "no temporary output appeared");
            std::thread::sleep(Duration::from_millis(10));
        };
        (child, stdin, temp)
    };

    // Killed: the temp holds a plaintext prefix and stays...
    let (mut child, stdin, temp) = half(&c);
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    let left = std::fs::read(&temp).unwrap();
    assert!(
        !left.is_empty() && plain.starts_with(&left),
        "not a plaintext prefix"
    );
    // ...until the next run writing into d.
    let o = c.run(&["decrypt", "-o", "d/other", "small.hseal"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!temp.exists(), "stale temporary file not removed");
    assert!(
        stderr(&o).contains("left by a run that was killed"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_file(c.path("d/other")).unwrap();

    // Alive: untouched by another run, and it completes afterwards.
    let (child, mut stdin, temp) = half(&c);
    let o = c.run(&["decrypt", "-o", "d/other", "small.hseal"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(temp.exists(), "a live run's temporary file was removed");
    stdin.write_all(&sealed[sealed.len() / 2..]).unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(c.path("d/out")).unwrap(), plain);
    assert!(temps_in(&c.path("d")).is_empty());

    // Names of a dead writer that must stay: locked by someone (a writer
    // in another pid namespace), a link, a directory, a foreign pattern,
    // and (as root) another user's file.
    let pid = dead_pid();
    let name = |tag: &str| {
        c.path("d")
            .join(format!(".{tag}.hsmseal-tmp-{pid}-0123456789abcdef"))
    };
    write(&name("locked"), b"x");
    let held = hold_lock(&name("locked"));
    std::os::unix::fs::symlink(c.path("p"), name("link")).unwrap();
    std::fs::create_dir(name("dir")).unwrap();
    let foreign = c.path("d").join(".x.hsmseal-tmp-notours");
    write(&foreign, b"x");
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        write(&name("nobody"), b"x");
        std::os::unix::fs::chown(name("nobody"), Some(65534), Some(65534)).unwrap();
    }
    write(&name("stale"), b"x");
    let o = c.run(&["decrypt", "--force", "-o", "d/other", "small.hseal"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!name("stale").exists(), "stale temporary file not removed");
    for kept in ["locked", "link", "dir"] {
        assert!(name(kept).symlink_metadata().is_ok(), "{kept} removed");
    }
    assert!(foreign.exists());
    if root {
        assert!(name("nobody").exists(), "another user's file removed");
    }
    // Released: the next run removes it.
    drop(held);
    let o = c.run(&["decrypt", "--force", "-o", "d/other", "small.hseal"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!name("locked").exists(), "released stale file not removed");
}

/// kill -9 of `decrypt --in-place` at random instants (it holds the
/// original's lock while it compares and removes): afterwards the data is
/// whole (the sealed original still decrypts, or the plaintext is complete
/// and the original gone), and a re-run with --force finishes the job
/// without waiting for the dead run's lock.
#[test]
fn a_killed_in_place_decrypt_loses_nothing_and_blocks_nobody() {
    use rand::{Rng, SeedableRng};
    let c = Cli::with_key();
    let plain = data(4 << 20, 13);
    write(&c.path("f"), &plain);
    c.ok(&["-q", "encrypt", "--key", "k", "--in-place", "f"]);
    let sealed = std::fs::read(c.path("f.hseal")).unwrap();
    let t0 = Instant::now();
    c.ok(&["-q", "decrypt", "--in-place", "f.hseal"]);
    let full = t0.elapsed();
    let token = snapshot(c.token.dir.path());
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x1a9e);
    let mut both = 0;
    for run in 0..25 {
        std::fs::remove_file(c.path("f")).ok();
        write(&c.path("f.hseal"), &sealed);
        let mut child = c.cmd();
        child
            .args(["-q", "decrypt", "--in-place", "f.hseal"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = child.spawn().unwrap();
        std::thread::sleep(full.mul_f64(rng.gen_range(0.0..1.2)));
        let _ = child.kill();
        child.wait().unwrap();
        for (p, bytes) in &token {
            std::fs::write(p, bytes).unwrap();
        }
        if c.path("f.hseal").exists() {
            assert_eq!(
                std::fs::read(c.path("f.hseal")).unwrap(),
                sealed,
                "run {run}"
            );
            if c.path("f").exists() {
                both += 1;
                assert_eq!(std::fs::read(c.path("f")).unwrap(), plain, "run {run}");
            }
            let o = c.run(&["decrypt", "--in-place", "--force", "f.hseal"]);
            assert!(o.status.success(), "run {run}: {}", stderr(&o));
            assert!(!stderr(&o).contains("waiting for"), "run {run}: waited");
        }
        assert_eq!(std::fs::read(c.path("f")).unwrap(), plain, "run {run}");
        assert!(!c.path("f.hseal").exists(), "run {run}");
        assert!(temps_in(c.work.path()).is_empty(), "run {run}: temps left");
    }
    eprintln!("{both} of 25 kills left both files");
}
