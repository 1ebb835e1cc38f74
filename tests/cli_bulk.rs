//! Bulk runs over directory trees: -r, --jobs, --output-dir, --in-place,
//! --include/--exclude, --suffix, --json item lines and summary, and
//! SIGTERM in the middle of a bulk encrypt or rotate.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::{code, data, stderr, write, Cli};

/// Every file under `root`, by path relative to it.
fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn go(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let ft = std::fs::symlink_metadata(&p).unwrap().file_type();
            if ft.is_dir() {
                go(root, &p, out);
            } else if ft.is_file() {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    if root.exists() {
        go(root, root, &mut out);
    }
    out
}

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Item lines and the summary (which must be the last line).
fn items_and_summary(out: &std::process::Output) -> (Vec<serde_json::Value>, serde_json::Value) {
    let mut lines = json_lines(out);
    let summary = lines.pop().expect("a summary line");
    assert_eq!(summary["type"], "summary", "last line is not the summary");
    assert!(lines.iter().all(|l| l["type"] == "item"), "{lines:?}");
    (lines, summary)
}

/// The item lines' statuses agree with the summary's counts.
fn check_counts(items: &[serde_json::Value], summary: &serde_json::Value) {
    let count = |s: &str| items.iter().filter(|l| l["status"] == s).count() as u64;
    assert_eq!(summary["items"].as_u64().unwrap(), items.len() as u64);
    assert_eq!(summary["failed"].as_u64().unwrap(), count("failed"));
    assert_eq!(
        summary["skipped"].as_u64().unwrap(),
        count("skipped") + count("unchanged")
    );
    assert_eq!(
        summary["ok"].as_u64().unwrap()
            + summary["skipped"].as_u64().unwrap()
            + summary["failed"].as_u64().unwrap(),
        items.len() as u64
    );
    let bytes: u64 = items.iter().filter_map(|l| l["bytes"].as_u64()).sum();
    assert_eq!(summary["bytes"].as_u64().unwrap(), bytes);
}

/// 500 files in nested directories, 0 B to 5 MiB (a few big ones).
fn make_big_tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut want = BTreeMap::new();
    for i in 0..500usize {
        let rel = PathBuf::from(format!("d{}/e{}/f{i:03}.bin", i % 7, i % 3));
        let len = match i {
            0 => 0,
            1 => 16384,
            2 => 16383,
            3 => 16385,
            10 => 2 << 20,
            20 => 3 << 20,
            30 => (5 << 20) + 7,
            _ => (i * 7919) % 40_000,
        };
        let bytes = data(len, i as u64);
        let p = root.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write(&p, &bytes);
        want.insert(rel, bytes);
    }
    want
}

#[test]
fn a_tree_of_500_files_round_trips_with_one_and_two_jobs() {
    let c = Cli::with_key();
    let want = make_big_tree(&c.path("src"));
    let mut sealed_names = Vec::new();
    for jobs in ["1", "2"] {
        let enc = format!("enc{jobs}");
        let t = Instant::now();
        let out = c.run(&[
            "--json",
            "--jobs",
            jobs,
            "encrypt",
            "--key",
            "k",
            "-r",
            "src",
            "--output-dir",
            &enc,
        ]);
        eprintln!("encrypt 500 files, jobs {jobs}: {:?}", t.elapsed());
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let (items, summary) = items_and_summary(&out);
        check_counts(&items, &summary);
        assert_eq!(summary["ok"], 500);
        assert_eq!(summary["action"], "encrypt");
        assert!(summary["hsm_calls"].as_u64().unwrap() >= 500);
        // Lines come in input (path) order whatever the number of jobs.
        let paths: Vec<&str> = items.iter().map(|l| l["path"].as_str().unwrap()).collect();
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
        assert!(items.iter().all(|l| l["key"] == "k" && l["version"] == 1));
        let sealed = tree(&c.path(&enc));
        sealed_names.push(sealed.keys().cloned().collect::<Vec<_>>());
        let dec = format!("dec{jobs}");
        let t = Instant::now();
        let out = c.run(&[
            "-q",
            "--jobs",
            jobs,
            "decrypt",
            "-r",
            &enc,
            "--output-dir",
            &dec,
        ]);
        eprintln!("decrypt 500 files, jobs {jobs}: {:?}", t.elapsed());
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(out.stderr.is_empty(), "--quiet: {}", stderr(&out));
        assert_eq!(tree(&c.path(&dec)), want, "jobs {jobs}");
    }
    // Same set of outputs, mirroring the tree with the suffix added.
    assert_eq!(sealed_names[0], sealed_names[1]);
    let expected: Vec<PathBuf> = want
        .keys()
        .map(|p| PathBuf::from(format!("{}.hseal", p.display())))
        .collect();
    assert_eq!(sealed_names[0], expected);
    // The sources are untouched.
    assert_eq!(tree(&c.path("src")), want);
}

#[test]
fn one_bad_item_is_reported_and_the_rest_is_done() {
    let c = Cli::with_key();
    std::fs::create_dir_all(c.path("t/sub")).unwrap();
    let mut want = BTreeMap::new();
    for i in 0..20 {
        let rel = format!("{}f{i}", if i % 2 == 0 { "sub/" } else { "" });
        let bytes = data(1000 + i * 300, i as u64);
        write(&c.path(&format!("t/{rel}")), &bytes);
        want.insert(PathBuf::from(rel), bytes);
    }
    std::os::unix::fs::symlink(c.path("nowhere"), c.path("t/sub/dangling")).unwrap();
    let out = c.run(&["--json", "--jobs", "2", "encrypt", "--key", "k", "-r", "t"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let (items, summary) = items_and_summary(&out);
    check_counts(&items, &summary);
    assert_eq!(
        (summary["ok"].as_u64(), summary["failed"].as_u64()),
        (Some(20), Some(1))
    );
    let bad: Vec<_> = items.iter().filter(|l| l["status"] == "failed").collect();
    assert!(bad[0]["path"].as_str().unwrap().ends_with("dangling"));
    assert_eq!(bad[0]["exit_code"], 7);
    assert!(stderr(&out).contains("dangling"), "{}", stderr(&out));
    // A broken symlink named directly fails the same way.
    let out = c.run(&["encrypt", "--key", "k", "t/sub/dangling"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));

    // Tamper one ciphertext: decrypt and verify report it, do the rest.
    let victim = c.path("t/f3.hseal");
    let mut b = std::fs::read(&victim).unwrap();
    let n = b.len() - 20;
    b[n] ^= 1;
    write(&victim, &b);
    let out = c.run(&["--json", "decrypt", "-r", "t", "--output-dir", "plain"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let (items, summary) = items_and_summary(&out);
    check_counts(&items, &summary);
    // Only hsmseal files are taken under -r, and the broken link is reported again.
    assert_eq!(items.len(), 21);
    assert_eq!(summary["failed"], 2);
    let failed: Vec<_> = items.iter().filter(|l| l["status"] == "failed").collect();
    assert_eq!(failed[0]["exit_code"], 3);
    assert!(failed[0]["path"].as_str().unwrap().ends_with("f3.hseal"));
    assert!(failed[1]["path"].as_str().unwrap().ends_with("dangling"));
    let got = tree(&c.path("plain"));
    let mut expect = want.clone();
    expect.remove(Path::new("f3"));
    assert_eq!(got, expect);
    let out = c.run(&["--json", "verify", "-r", "t"]);
    assert_eq!(code(&out), 1);
    let (items, summary) = items_and_summary(&out);
    check_counts(&items, &summary);
    assert_eq!(
        (summary["ok"].as_u64(), summary["failed"].as_u64()),
        (Some(19), Some(2))
    );
    // Human mode: one error line for the bad item and a count.
    let out = c.run(&["verify", "-r", "t", "--exclude", "dangling"]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("1 of 20 items failed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn in_place_replaces_originals_only_after_success() {
    let c = Cli::with_key();
    std::fs::create_dir_all(c.path("t/a/b")).unwrap();
    let mut want = BTreeMap::new();
    for (i, rel) in ["x", "a/y", "a/b/z", "a/b/w"].iter().enumerate() {
        let bytes = data(5000 * i + 10, i as u64);
        write(&c.path(&format!("t/{rel}")), &bytes);
        want.insert(PathBuf::from(rel), bytes);
    }
    // An existing output makes one item fail: its original must stay.
    write(&c.path("t/a/y.hseal"), b"precious");
    let out = c.run(&[
        "--json",
        "encrypt",
        "--key",
        "k",
        "--in-place",
        "-r",
        "t",
        "--exclude",
        "*.hseal",
    ]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let (items, summary) = items_and_summary(&out);
    check_counts(&items, &summary);
    assert_eq!(
        (summary["items"].as_u64(), summary["failed"].as_u64()),
        (Some(4), Some(1))
    );
    let now = tree(&c.path("t"));
    assert_eq!(now.get(Path::new("a/y")), want.get(Path::new("a/y")));
    assert_eq!(now[Path::new("a/y.hseal")], b"precious");
    for rel in ["x", "a/b/z", "a/b/w"] {
        assert!(!now.contains_key(Path::new(rel)), "{rel} not removed");
        assert!(now.contains_key(&PathBuf::from(format!("{rel}.hseal"))));
    }
    assert!(!now.keys().any(|k| k.to_string_lossy().contains("tmp")));
    // Decrypt in place, with one tampered file: it keeps its ciphertext.
    std::fs::remove_file(c.path("t/a/y.hseal")).unwrap();
    let mut b = std::fs::read(c.path("t/a/b/w.hseal")).unwrap();
    let n = b.len() - 5;
    b[n] ^= 0x80;
    write(&c.path("t/a/b/w.hseal"), &b);
    let out = c.run(&["decrypt", "--in-place", "-r", "t"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let now = tree(&c.path("t"));
    let names: Vec<String> = now.keys().map(|k| k.display().to_string()).collect();
    assert_eq!(names, ["a/b/w.hseal", "a/b/z", "a/y", "x"]);
    assert_eq!(now[Path::new("x")], want[Path::new("x")]);
    assert_eq!(now[Path::new("a/b/z")], want[Path::new("a/b/z")]);
    assert_eq!(now[Path::new("a/b/w.hseal")], b);
    // Conflicting flags are usage errors.
    let out = c.run(&["encrypt", "--key", "k", "--in-place", "-o", "o", "x"]);
    assert_eq!(code(&out), 2);
    let out = c.run(&[
        "encrypt",
        "--key",
        "k",
        "--in-place",
        "--output-dir",
        "o",
        "t/x",
    ]);
    assert_eq!(code(&out), 2);
}

#[test]
fn include_exclude_suffix_and_already_encrypted_files() {
    let c = Cli::with_key();
    for rel in [
        "a.sql",
        "b.log",
        "sub/c.sql",
        "sub/cache/d.sql",
        "sub/e.txt",
    ] {
        let p = c.path(&format!("t/{rel}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write(&p, rel.as_bytes());
    }
    let out = c.run(&[
        "--json",
        "encrypt",
        "--key",
        "k",
        "-r",
        "t",
        "--include",
        "*.sql",
        "--include",
        "sub/*.txt",
        "--exclude",
        "sub/cache/**",
        "--suffix",
        ".enc",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (items, summary) = items_and_summary(&out);
    check_counts(&items, &summary);
    let outputs: Vec<&str> = items
        .iter()
        .map(|l| l["output"].as_str().unwrap())
        .collect();
    assert_eq!(
        outputs,
        ["t/a.sql.enc", "t/sub/c.sql.enc", "t/sub/e.txt.enc"]
    );
    // Everything now: the .enc files are skipped as already encrypted.
    let out = c.run(&["--json", "encrypt", "--key", "k", "-r", "t"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (items, summary) = items_and_summary(&out);
    check_counts(&items, &summary);
    assert_eq!(
        (summary["ok"].as_u64(), summary["skipped"].as_u64()),
        (Some(5), Some(3))
    );
    for l in items.iter().filter(|l| l["status"] == "skipped") {
        assert!(l["path"].as_str().unwrap().ends_with(".enc"));
        assert!(l["reason"].as_str().unwrap().contains("already encrypted"));
    }
    assert!(!c.path("t/a.sql.enc.hseal").exists());
    // Decrypt the .enc files (by their suffix) into another tree.
    let out = c.run(&[
        "--json",
        "decrypt",
        "-r",
        "t",
        "--include",
        "*.enc",
        "--suffix",
        ".enc",
        "--output-dir",
        "back",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let got: Vec<String> = tree(&c.path("back"))
        .into_iter()
        .map(|(k, v)| format!("{}={}", k.display(), String::from_utf8(v).unwrap()))
        .collect();
    assert_eq!(
        got,
        ["a.sql=a.sql", "sub/c.sql=sub/c.sql", "sub/e.txt=sub/e.txt"]
    );
    // An hsmseal file without the suffix: a clear per-item failure.
    let out = c.run(&[
        "decrypt",
        "-r",
        "t",
        "--include",
        "*.hseal",
        "--suffix",
        ".enc",
    ]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("no .enc suffix"), "{}", stderr(&out));
    // Filters without -r are a usage error.
    let out = c.run(&["encrypt", "--key", "k", "--include", "*.sql", "t/a.sql"]);
    assert_eq!(code(&out), 2);
}

#[test]
fn brace_globs_select_and_a_pathological_pattern_finishes() {
    let c = Cli::with_key();
    let many_a = "a".repeat(40);
    let one_a = format!("{}a", "b".repeat(39));
    for rel in ["x.txt", "y.log", "z.csv", "d/w.log", &many_a, &one_a] {
        let p = c.path(&format!("t/{rel}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write(&p, rel.as_bytes());
    }
    // `*a` fourteen times: the backtracking matcher this replaced tried
    // about C(54, 14) = 1e13 placements on the 40-character names (hours);
    // no timing threshold, the run only has to finish.
    let pathological = "*a".repeat(14);
    let out = c.run(&[
        "--json",
        "encrypt",
        "--key",
        "k",
        "-r",
        "t",
        "--include",
        "*.{txt,log}",
        "--include",
        &pathological,
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (items, summary) = items_and_summary(&out);
    check_counts(&items, &summary);
    let outputs: Vec<&str> = items
        .iter()
        .map(|l| l["output"].as_str().unwrap())
        .collect();
    // In path order; z.csv and the one-`a` name are not taken.
    let want_many = format!("t/{many_a}.hseal");
    assert_eq!(
        outputs,
        [
            want_many.as_str(),
            "t/d/w.log.hseal",
            "t/x.txt.hseal",
            "t/y.log.hseal"
        ]
    );
    // An invalid pattern: one usage line naming it, exit 2, nothing done.
    for bad in ["*.{txt,log", "[z-a]", "x[é]"] {
        let out = c.run(&["verify", "-r", "t", "--exclude", bad]);
        assert_eq!(code(&out), 2, "{bad:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(&format!("--exclude {bad:?}")), "{err}");
    }
}

/// Spawns `args`, waits until `started` says work is under way plus
/// `extra`, sends SIGTERM, and returns the exit status.
fn term_midway(
    c: &Cli,
    args: &[&str],
    started: impl Fn() -> bool,
    extra: Duration,
) -> std::process::ExitStatus {
    let mut cmd = c.cmd();
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started() {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the run did not start");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(extra);
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    child.wait().unwrap()
}

fn no_temps(root: &Path) {
    let temps: Vec<PathBuf> = tree(root)
        .into_keys()
        .filter(|k| k.to_string_lossy().contains(".hsmseal-tmp-"))
        .collect();
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
}

#[test]
fn sigterm_during_a_bulk_encrypt_leaves_valid_outputs_and_intact_inputs() {
    let c = Cli::with_key();
    let mut want = BTreeMap::new();
    for i in 0..300usize {
        let rel = PathBuf::from(format!("d{}/f{i:03}", i % 5));
        let bytes = data(20_000 + i * 100, i as u64);
        let p = c.path("t").join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write(&p, &bytes);
        want.insert(rel, bytes);
    }
    let sealed_count = || {
        tree(&c.path("t"))
            .keys()
            .filter(|k| k.extension().is_some_and(|e| e == "hseal"))
            .count()
    };
    let mut interrupted = 0;
    for (run, extra_ms) in [0u64, 5, 20, 50, 100].iter().enumerate() {
        let status = term_midway(
            &c,
            &[
                "--jobs",
                "2",
                "encrypt",
                "--key",
                "k",
                "-r",
                "t",
                "--output-dir",
                "out",
            ],
            // Some output exists: the login is over, work is under way.
            || c.path("out").exists(),
            Duration::from_millis(*extra_ms),
        );
        if status.code() == Some(143) {
            interrupted += 1;
        } else {
            assert_eq!(status.code(), Some(0), "run {run}: {status:?}");
        }
        no_temps(&c.path("out"));
        no_temps(&c.path("t"));
        assert_eq!(tree(&c.path("t")), want, "inputs changed");
        assert_eq!(sealed_count(), 0);
        // Every finished output decrypts to its input.
        if c.path("out").exists() {
            // An interrupted run may have made directories but no output
            // yet: an empty tree is expected here.
            let out = c.run(&[
                "-q",
                "decrypt",
                "-r",
                "out",
                "--allow-empty",
                "--output-dir",
                "back",
            ]);
            assert_eq!(code(&out), 0, "run {run}: {}", stderr(&out));
            let back = tree(&c.path("back"));
            for (rel, bytes) in &back {
                assert_eq!(want.get(rel), Some(bytes), "run {run}: {}", rel.display());
            }
            let _ = std::fs::remove_dir_all(c.path("back"));
            std::fs::remove_dir_all(c.path("out")).unwrap();
        }
    }
    assert!(
        interrupted >= 3,
        "only {interrupted} of 5 runs were interrupted"
    );
}

#[test]
fn sigterm_during_a_bulk_rotate_leaves_every_file_decryptable() {
    let c = Cli::with_key();
    c.ok(&["key", "create", "b"]);
    let mut want = BTreeMap::new();
    for i in 0..300usize {
        let rel = format!("d{}/f{i:03}", i % 4);
        let bytes = data(3000 + i * 11, i as u64);
        let p = c.path(&format!("t/{rel}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write(&p, &bytes);
        want.insert(PathBuf::from(format!("{rel}.hseal")), bytes);
    }
    c.ok(&["-q", "encrypt", "--key", "k", "--in-place", "-r", "t"]);
    // SIGTERM at random points, including during login: our handler waits
    // for a login in progress to finish, so the token is never restored here.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut interrupted = 0;
    for run in 0..8 {
        let target = if run % 2 == 0 { "b" } else { "k" };
        let extra = Duration::from_millis(rng.gen_range(0..150));
        let status = term_midway(
            &c,
            &["--jobs", "2", "rotate", "--key", target, "-r", "t"],
            || true,
            extra,
        );
        match status.code() {
            Some(143) => interrupted += 1,
            Some(0) => {}
            // Killed before the handler was installed (process start-up).
            None => {}
            other => panic!("run {run}: exit {other:?}"),
        }
        no_temps(&c.path("t"));
        let out = c.run(&["-q", "verify", "-r", "t"]);
        assert_eq!(
            code(&out),
            0,
            "run {run} (after {extra:?}): {}",
            stderr(&out)
        );
    }
    assert!(
        interrupted >= 2,
        "only {interrupted} of 8 runs were interrupted"
    );
    c.ok(&["-q", "decrypt", "-r", "t", "--output-dir", "back"]);
    let back: BTreeMap<PathBuf, Vec<u8>> = tree(&c.path("back"))
        .into_iter()
        .map(|(k, v)| (PathBuf::from(format!("{}.hseal", k.display())), v))
        .collect();
    assert_eq!(back, want);
}

#[test]
fn json_reports_go_to_stderr_when_the_data_goes_to_stdout() {
    let c = Cli::with_key();
    let plain = data(100_000, 9);
    let out = c.run_with(&["--json", "encrypt", "--key", "k"], Some(&plain), &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    write(&c.path("s.hseal"), &out.stdout);
    let lines: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["type"], "item");
    assert_eq!(lines[0]["status"], "ok");
    assert_eq!(lines[1]["type"], "summary");
    assert_eq!(lines[1]["ok"], 1);
    let out = c.run(&["--json", "decrypt", "-o", "-", "s.hseal"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(out.stdout, plain);
    assert!(stderr(&out).contains("\"type\":\"summary\""));
    // A failure: stderr is the JSON stream, so it carries JSON lines only,
    // the error among them; stdout (the data) nothing.
    write(&c.path("bad.hseal"), b"not an hsmseal file at all");
    let out = c.run(&["--json", "decrypt", "-o", "-", "bad.hseal"]);
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let lines: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let types: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["item", "summary", "error"], "{lines:?}");
    assert_eq!(lines[0]["status"], "failed");
    assert_eq!(lines[2]["kind"], "format");
    assert_eq!(lines[2]["exit_code"], 8);
}

/// A tree with two good hsmseal files and damaged ones: first byte flipped
/// (also without the suffix), header truncated (magic intact), file cut to
/// 5 bytes, a zero-length `.hseal`, and a plaintext file. Before issue 9,
/// the damaged files without the magic were not items at all: `verify -r`
/// exited 0, `decrypt -r` restored 2 of 3 with exit 0, and `rotate -r`
/// skipped them so that `key purge` could destroy their only key version.
fn damaged_tree(c: &Cli) -> Vec<Vec<u8>> {
    std::fs::create_dir_all(c.path("t/sub")).unwrap();
    let plains: Vec<Vec<u8>> = (0..6)
        .map(|i| data(30_000 + i * 11, 40 + i as u64))
        .collect();
    let names = [
        "good1",
        "sub/good2",
        "flipped",
        "sub/flipped-raw",
        "cut",
        "short",
    ];
    for (n, p) in names.iter().zip(&plains) {
        write(&c.path(&format!("t/{n}")), p);
        c.ok(&[
            "-q",
            "encrypt",
            "--key",
            "k",
            "--in-place",
            &format!("t/{n}"),
        ]);
    }
    let edit = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let p = c.path(name);
        let mut b = std::fs::read(&p).unwrap();
        f(&mut b);
        write(&p, &b);
    };
    edit("t/flipped.hseal", &|b| b[0] ^= 0x01);
    std::fs::rename(
        c.path("t/sub/flipped-raw.hseal"),
        c.path("t/sub/flipped.bin"),
    )
    .unwrap();
    edit("t/sub/flipped.bin", &|b| b[0] ^= 0x80);
    edit("t/cut.hseal", &|b| b.truncate(500));
    edit("t/short.hseal", &|b| b.truncate(5));
    write(&c.path("t/sub/empty.hseal"), b"");
    write(&c.path("t/notes.txt"), b"just some text");
    plains
}

/// (path, status, exit_code) of each item line, by path.
fn outcomes(o: &std::process::Output) -> BTreeMap<String, (String, i64)> {
    let (items, _) = items_and_summary(o);
    items
        .iter()
        .map(|l| {
            (
                l["path"].as_str().unwrap().to_string(),
                (
                    l["status"].as_str().unwrap().to_string(),
                    l["exit_code"].as_i64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

#[test]
fn damaged_hsmseal_files_under_r_are_failed_items_not_passed_over() {
    let c = Cli::with_key();
    c.ok(&["key", "create", "b"]);
    let plains = damaged_tree(&c);
    let before = tree(&c.path("t"));
    let damaged = [
        ("t/cut.hseal", 3),
        ("t/flipped.hseal", 3),
        ("t/short.hseal", 3),
        ("t/sub/empty.hseal", 8),
        ("t/sub/flipped.bin", 3),
    ];
    let check = |o: &std::process::Output, ok: &str, what: &str| {
        assert_eq!(code(o), 1, "{what}: {}", stderr(o));
        let got = outcomes(o);
        for (p, want) in damaged {
            assert_eq!(
                got.get(p),
                Some(&("failed".to_string(), want)),
                "{what}: {p}"
            );
            assert!(
                stderr(o).contains(p),
                "{what}: {p} not named: {}",
                stderr(o)
            );
        }
        for p in ["t/good1.hseal", "t/sub/good2.hseal"] {
            assert_eq!(got[p].0, ok, "{what}: {p}");
        }
        assert_eq!(got.len(), 7, "{what}: the text file is no item");
        let (_, summary) = items_and_summary(o);
        assert_eq!(summary["other_files"], 1, "{what}");
    };
    let o = c.run(&["--json", "verify", "-r", "t"]);
    check(&o, "ok", "verify");
    assert!(stderr(&o).contains("byte 0 of"), "{}", stderr(&o));
    let o = c.run(&["--json", "decrypt", "-r", "t", "--output-dir", "back"]);
    check(&o, "ok", "decrypt");
    assert_eq!(std::fs::read(c.path("back/good1")).unwrap(), plains[0]);
    assert_eq!(std::fs::read(c.path("back/sub/good2")).unwrap(), plains[1]);
    let o = c.run(&["--json", "rotate", "--key", "b", "-r", "t"]);
    check(&o, "rotated", "rotate");
    // The damaged files are byte-identical; the good ones moved to b.
    let after = tree(&c.path("t"));
    for (p, _) in damaged {
        let rel = Path::new(p).strip_prefix("t").unwrap();
        assert_eq!(after[rel], before[rel], "{p} changed");
    }
    // inspect -r (what `key purge --check` and operators rely on) lists them.
    let o = c.run(&["--json", "inspect", "-r", "t"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let v = support::json_one(&o.stdout, "summary");
    let failed = support::json_of_type(&o.stdout, "item");
    assert!(failed.iter().all(|d| d["status"] == "failed"), "{failed:?}");
    let listed: Vec<&str> = failed.iter().map(|d| d["path"].as_str().unwrap()).collect();
    assert_eq!(v["damaged"], failed.len());
    for (p, _) in damaged {
        assert!(listed.contains(&p), "inspect: {p} not listed: {listed:?}");
    }
    assert_eq!(v["other_files"], 1);
    // So does the dependency search behind `key purge --check`, also for
    // the damaged file without the suffix.
    let o = c.run(&["inspect", "--deps", "--headers-only", "t"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    for (p, _) in damaged {
        assert!(
            stderr(&o).contains(p),
            "inspect --deps: {p}: {}",
            stderr(&o)
        );
    }
    // encrypt -r does not wrap a damaged file in a new layer either (they
    // would then hide from rotate -r); it encrypts the text file and skips
    // the hsmseal files.
    let o = c.run(&["--json", "encrypt", "--key", "k", "-r", "t"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let got = outcomes(&o);
    for (p, _) in damaged {
        // One with the magic intact is an hsmseal file, skipped as such.
        let want = if p == "t/cut.hseal" {
            "skipped"
        } else {
            "failed"
        };
        assert_eq!(got[p].0, want, "encrypt: {p}");
    }
    assert_eq!(got["t/notes.txt"].0, "ok");
    assert_eq!(got["t/good1.hseal"].0, "skipped");
    assert!(!c.path("t/flipped.hseal.hseal").exists());
    // The one repairable byte, repaired: everything verifies again.
    let p = c.path("t/flipped.hseal");
    let mut b = std::fs::read(&p).unwrap();
    b[0] ^= 0x01;
    write(&p, &b);
    let o = c.run(&["verify", "t/flipped.hseal"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn an_empty_or_unmatched_directory_fails_unless_allowed() {
    let c = Cli::with_key();
    std::fs::create_dir_all(c.path("empty")).unwrap();
    std::fs::create_dir_all(c.path("plain")).unwrap();
    std::fs::create_dir_all(c.path("full")).unwrap();
    write(&c.path("plain/a.txt"), b"text");
    write(&c.path("full/x"), b"secret");
    c.ok(&["-q", "encrypt", "--key", "k", "full/x"]);
    let runs: [&[&str]; 5] = [
        &["verify"],
        &["decrypt", "--output-dir", "out"],
        &["rotate"],
        &["inspect"],
        &["encrypt", "--key", "k", "--output-dir", "out"],
    ];
    for cmd in runs {
        let run = |dirs: &[&str], allow: bool| {
            let mut args: Vec<&str> = cmd.to_vec();
            for d in dirs {
                args.extend(["-r", d]);
            }
            if allow {
                args.push("--allow-empty");
            }
            c.run(&args)
        };
        let o = run(&["empty"], false);
        assert_eq!(code(&o), 2, "{cmd:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("-r empty"), "{cmd:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--allow-empty"), "{}", stderr(&o));
        // One empty directory among others is enough to stop before any work.
        let o = run(&["full", "empty"], false);
        assert_eq!(code(&o), 2, "{cmd:?}: {}", stderr(&o));
        let o = run(&["empty"], true);
        assert_eq!(code(&o), 0, "{cmd:?}: {}", stderr(&o));
        if cmd[0] != "encrypt" {
            // Files, but none of them hsmseal files.
            let o = run(&["plain"], false);
            assert_eq!(code(&o), 2, "{cmd:?}: {}", stderr(&o));
            let o = run(&["plain"], true);
            assert_eq!(code(&o), 0, "{cmd:?}: {}", stderr(&o));
        }
        // Everything excluded is empty too.
        let mut args: Vec<&str> = cmd.to_vec();
        args.extend(["-r", "full", "--exclude", "*"]);
        let o = c.run(&args);
        assert_eq!(code(&o), 2, "{cmd:?} --exclude '*': {}", stderr(&o));
    }
    assert!(!c.path("out").exists() || tree(&c.path("out")).is_empty());
}

/// An error that is the same for every item (the HSM cannot be opened: a
/// wrong PIN, no such token, no module) stops a bulk run once, with its own
/// exit code: never one error per file and exit 1 (issue 10).
#[test]
fn a_run_wide_hsm_error_stops_every_bulk_command_once_with_its_own_code() {
    let c = Cli::with_key();
    let dir = c.path("d");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..4 {
        write(&dir.join(format!("f{i}")), &data(100 + i, i as u64));
    }
    c.ok(&["encrypt", "--key", "k", "-r", "d"]);
    // Plaintext to encrypt in a tree of its own.
    let plain = c.path("p");
    std::fs::create_dir(&plain).unwrap();
    for i in 0..4 {
        write(&plain.join(format!("g{i}")), &data(50 + i, 9 + i as u64));
    }
    let wrong_pin = [("HSMSEAL_PIN", "000000-wrong")];
    let no_token = [("HSMSEAL_TOKEN", "no-such-token")];
    let no_module = [("HSMSEAL_PKCS11_MODULE", "/nonexistent/libpkcs11.so")];
    type Env<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Env, i32, &str); 3] = [
        (&wrong_pin, 6, "wrong PIN"),
        (&no_token, 5, "no-such-token"),
        (&no_module, 5, "/nonexistent/libpkcs11.so"),
    ];
    let commands: [&[&str]; 6] = [
        &["decrypt", "-r", "d", "--output-dir", "out"],
        &["verify", "-r", "d"],
        &["encrypt", "--key", "k", "-r", "p", "--output-dir", "enc"],
        &["rewrap", "-r", "d"],
        &["inspect", "--deps", "d"],
        &["--jobs", "3", "verify", "-r", "d"],
    ];
    for (env, want, says) in cases {
        for args in commands {
            for json in [false, true] {
                let mut a: Vec<&str> = if json { vec!["--json"] } else { vec![] };
                a.extend_from_slice(args);
                let out = c.run_with(&a, None, env);
                let err = stderr(&out);
                assert_eq!(code(&out), want, "{a:?} {env:?}: {err}");
                assert_eq!(
                    err.matches(says).count(),
                    1,
                    "{a:?} {env:?}: said once: {err}"
                );
                assert!(
                    // The items' paths (not bare "f0": a token serial in the
                    // error is hex and may hold it).
                    !err.contains("d/f") && !err.contains("p/g"),
                    "{a:?}: per file: {err}"
                );
                assert!(!err.contains("items failed"), "{a:?}: {err}");
                // No item is reported as failed on stdout either.
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(!stdout.contains("\"failed\""), "{a:?}: {stdout}");
                assert!(
                    !stdout.contains("d/f") && !stdout.contains("p/g"),
                    "{a:?}: {stdout}"
                );
            }
        }
    }
    // Nothing was written, and the right PIN still works (never locked).
    assert!(!c.path("out").exists() || tree(&c.path("out")).is_empty());
    assert!(!c.path("enc").exists() || tree(&c.path("enc")).is_empty());
    c.ok(&["verify", "-r", "d"]);
}
