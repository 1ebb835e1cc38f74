//! The file commands end to end: the real binary, a real SoftHSM2 token per
//! test, real files.

mod support;

use std::os::unix::fs::PermissionsExt;
use support::{code, data, stderr, write, Cli};

#[test]
fn round_trips_through_files_for_boundary_sizes() {
    let c = Cli::with_key();
    for (i, len) in [0usize, 1, 16383, 16384, 16385, 3 * 1024 * 1024 + 7]
        .into_iter()
        .enumerate()
    {
        let name = format!("f{i}");
        let plain = data(len, i as u64);
        write(&c.path(&name), &plain);
        c.ok(&["encrypt", "--key", "k", &name]);
        let sealed = std::fs::read(c.path(&format!("{name}.hseal"))).unwrap();
        assert_ne!(sealed, plain);
        c.ok(&["verify", &format!("{name}.hseal")]);
        c.ok(&[
            "decrypt",
            "-o",
            &format!("{name}.out"),
            &format!("{name}.hseal"),
        ]);
        assert_eq!(
            std::fs::read(c.path(&format!("{name}.out"))).unwrap(),
            plain,
            "size {len}"
        );
        let mode = std::fs::metadata(c.path(&format!("{name}.out")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "decrypted files are private");
    }
}

#[test]
fn round_trips_through_stdin_and_stdout() {
    let c = Cli::with_key();
    for len in [0usize, 1, 16383, 16384, 16385, 2 * 1024 * 1024] {
        let plain = data(len, 99);
        let enc = c.run_with(&["encrypt", "--key", "k"], Some(&plain), &[]);
        assert!(enc.status.success(), "{}", stderr(&enc));
        let dec = c.run_with(&["decrypt"], Some(&enc.stdout), &[]);
        assert!(dec.status.success(), "{}", stderr(&dec));
        assert_eq!(dec.stdout, plain, "size {len}");
        let ver = c.run_with(&["verify", "-"], Some(&enc.stdout), &[]);
        assert!(ver.status.success());
        assert!(String::from_utf8_lossy(&ver.stdout).contains("OK"));
    }
}

#[test]
fn random_sizes_round_trip() {
    use proptest::prelude::*;
    let c = Cli::with_key();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 12,
        ..ProptestConfig::default()
    });
    runner
        .run(&(0usize..200_000, any::<u64>()), |(len, seed)| {
            let plain = data(len, seed);
            let enc = c.run_with(&["encrypt", "--key", "k"], Some(&plain), &[]);
            prop_assert!(enc.status.success());
            let dec = c.run_with(&["decrypt"], Some(&enc.stdout), &[]);
            prop_assert!(dec.status.success());
            prop_assert_eq!(dec.stdout, plain);
            Ok(())
        })
        .unwrap();
}

/// Every byte of a small file, one bit each (the bit position cycles), and
/// every truncation: rejected with a non-zero exit, no output file left.
/// (Every single bit of the header and payload is covered in-process by the
/// envelope unit tests; this proves the CLI path end to end.)
#[test]
fn flipped_and_truncated_files_are_rejected_and_leave_no_output() {
    let c = Cli::with_key();
    write(&c.path("p"), &data(20_000, 3)); // two chunks
    c.ok(&["encrypt", "--key", "k", "p"]);
    let sealed = std::fs::read(c.path("p.hseal")).unwrap();
    let before = c.files();
    let check = |bytes: &[u8], what: &str| {
        write(&c.path("bad.hseal"), bytes);
        let out = c.run(&["decrypt", "-o", "bad.out", "bad.hseal"]);
        assert!(!out.status.success(), "{what} accepted");
        assert!(
            [3, 8].contains(&code(&out)),
            "{what}: exit {} {}",
            code(&out),
            stderr(&out)
        );
        assert!(!c.path("bad.out").exists(), "{what}: output left behind");
        let names: Vec<String> = c.files().into_iter().filter(|n| n != "bad.hseal").collect();
        assert_eq!(names, before, "{what}: temp file left behind");
    };
    // Every header byte and the payload's salt and commitment; then every
    // 31st byte of the chunks (the chunk tags are all covered by the last
    // 40 bytes and the chunk boundary around 1080 + 16400).
    let chunk_edge = 1080 + 16400;
    for i in (0..sealed.len()).filter(|i| {
        *i < 1200 || i % 31 == 0 || i.abs_diff(chunk_edge) < 24 || *i >= sealed.len() - 40
    }) {
        let mut b = sealed.clone();
        b[i] ^= 1 << (i % 8);
        check(&b, &format!("bit flip at byte {i}"));
    }
    for n in (0..sealed.len()).filter(|n| {
        *n < 1100 || n % 97 == 0 || n.abs_diff(chunk_edge) < 24 || *n > sealed.len() - 40
    }) {
        check(&sealed[..n], &format!("truncation to {n}"));
    }
    let mut extended = sealed.clone();
    extended.push(0);
    check(&extended, "one trailing byte");
}

#[test]
fn tampered_stdout_decrypt_releases_only_authenticated_chunks() {
    let c = Cli::with_key();
    let plain = data(5 * 16384 + 100, 5);
    let enc = c.run_with(&["encrypt", "--key", "k"], Some(&plain), &[]);
    let mut sealed = enc.stdout;
    let last = sealed.len() - 20; // inside the final chunk
    sealed[last] ^= 0x80;
    let dec = c.run_with(&["decrypt"], Some(&sealed), &[]);
    assert_eq!(code(&dec), 3, "{}", stderr(&dec));
    assert!(dec.stdout.len() < plain.len());
    assert_eq!(
        &plain[..dec.stdout.len()],
        &dec.stdout[..],
        "released bytes are a prefix"
    );
    assert_eq!(
        dec.stdout.len() % 16384,
        0,
        "only whole authenticated chunks"
    );
    assert!(stderr(&dec).contains("authentic"), "{}", stderr(&dec));
}

#[test]
fn header_envelope_tampering_is_caught_by_the_hsm_tag() {
    use sha2::{Digest, Sha256};
    let c = Cli::with_key();
    c.ok(&["key", "create", "other"]);
    write(&c.path("p"), b"secret payload");
    c.ok(&["encrypt", "--key", "k", "p"]);
    let sealed = std::fs::read(c.path("p.hseal")).unwrap();
    let reseal = |f: &dyn Fn(&mut [u8])| {
        let mut b = sealed.clone();
        f(&mut b[256..512]);
        let sum = Sha256::digest(&b[256..256 + 224]);
        b[256 + 224..512].copy_from_slice(&sum);
        b
    };
    // A forger who recomputes the checksum: wrapped key, IV, key version,
    // key name changed. Each must fail authentication (or name a missing key).
    let cases: Vec<(&str, Vec<u8>, i32)> = vec![
        ("wrapped key", reseal(&|s| s[100] ^= 1), 3),
        ("tag", reseal(&|s| s[136] ^= 1), 3),
        ("iv", reseal(&|s| s[77] ^= 1), 3),
        (
            "name swapped to another existing key",
            reseal(&|s| {
                s[8] = 5;
                s[9..14].copy_from_slice(b"other");
            }),
            3,
        ),
        ("version", reseal(&|s| s[76] = 2), 4),
    ];
    for (what, bytes, want) in cases {
        write(&c.path("t.hseal"), &bytes);
        let out = c.run(&["decrypt", "-o", "t.out", "t.hseal"]);
        assert_eq!(code(&out), want, "{what}: {}", stderr(&out));
        assert!(!c.path("t.out").exists());
    }
}

#[test]
fn outputs_are_never_clobbered_and_inputs_never_destroyed() {
    let c = Cli::with_key();
    write(&c.path("p"), b"plain");
    write(&c.path("p.hseal"), b"precious");
    let out = c.run(&["encrypt", "--key", "k", "p"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("--force"));
    assert_eq!(std::fs::read(c.path("p.hseal")).unwrap(), b"precious");
    // Output equal to input, also through a symlink.
    let out = c.run(&["encrypt", "--key", "k", "-o", "p", "p"]);
    assert_eq!(code(&out), 2);
    std::os::unix::fs::symlink(c.path("p"), c.path("alias")).unwrap();
    let out = c.run(&["encrypt", "--key", "k", "-o", "alias", "p"]);
    assert_eq!(code(&out), 2);
    assert_eq!(std::fs::read(c.path("p")).unwrap(), b"plain");
    c.ok(&["encrypt", "--key", "k", "--force", "p"]);
    assert_ne!(std::fs::read(c.path("p.hseal")).unwrap(), b"precious");
    assert_eq!(std::fs::read(c.path("p")).unwrap(), b"plain");
}

#[test]
fn bulk_run_reports_each_failure_and_finishes_the_rest() {
    let c = Cli::with_key();
    for n in ["a", "b", "c"] {
        write(&c.path(n), n.as_bytes());
    }
    let out = c.run(&["--json", "encrypt", "--key", "k", "a", "missing", "c"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(c.path("a.hseal").exists() && c.path("c.hseal").exists());
    assert!(stderr(&out).contains("missing"), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // One line per item in input order, then the summary.
    assert_eq!(lines.len(), 4);
    assert_eq!(lines.iter().filter(|l| l["status"] == "ok").count(), 2);
    assert_eq!(lines[1]["status"], "failed");
    assert_eq!(lines[1]["exit_code"], 7);
    assert_eq!(lines[3]["items"], 3);
    assert_eq!(lines[3]["ok"], 2);
    assert_eq!(lines[3]["failed"], 1);
    // An already-encrypted input is skipped, not double-encrypted.
    let out = c.run(&["--json", "encrypt", "--key", "k", "a.hseal"]);
    assert_eq!(code(&out), 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("skipped"));
    assert!(!c.path("a.hseal.hseal").exists());
}

#[test]
fn inspect_shows_key_and_sizes_without_the_hsm() {
    let c = Cli::with_key();
    write(&c.path("p"), &data(20_000, 1));
    c.ok(&["encrypt", "--key", "k", "p"]);
    // No PIN, no token: inspect still works.
    let out = c.run_with(
        &["--json", "inspect", "p.hseal"],
        None,
        &[("HSMSEAL_TOKEN", "nonexistent"), ("HSMSEAL_PIN", "")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v = support::json_one(&out.stdout, "item");
    assert_eq!(v["key"], "k");
    assert_eq!(v["key_version"], 1);
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["plaintext_bytes"], 20_000);
    assert_eq!(v["authenticated"], false);
    let text = String::from_utf8(c.ok(&["inspect", "p.hseal"])).unwrap();
    assert!(text.contains("k v1"), "{text}");
    write(&c.path("junk"), b"not an hsmseal file at all");
    let out = c.run(&["inspect", "junk"]);
    assert_eq!(code(&out), 8);
}

#[test]
fn key_pin_and_token_errors_have_their_own_exit_codes() {
    let c = Cli::with_key();
    write(&c.path("p"), b"x");
    // Unknown key name.
    let out = c.run(&["encrypt", "--key", "nosuch", "p"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("nosuch"));
    // Missing key: a file sealed on another token whose key does not exist here.
    let other = Cli::new();
    other.ok(&["key", "create", "elsewhere"]);
    write(&other.path("q"), b"y");
    other.ok(&["encrypt", "--key", "elsewhere", "q"]);
    std::fs::copy(other.path("q.hseal"), c.path("q.hseal")).unwrap();
    let out = c.run(&["decrypt", "-o", "q", "q.hseal"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("elsewhere"));
    // Wrong token label.
    let out = c.run(&["--token", "no-such-token", "encrypt", "--key", "k", "p"]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    // Wrong PIN: refused once, and the token is not locked afterwards.
    let out = c.run_with(
        &["encrypt", "--key", "k", "-o", "p2", "p"],
        None,
        &[("HSMSEAL_PIN", "000000-wrong")],
    );
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("000000-wrong"),
        "PIN echoed in an error"
    );
    c.ok(&["encrypt", "--key", "k", "-o", "p3", "p"]);
    // Missing PIN (no terminal): a PIN error that says where a PIN can come from.
    let out = c.run_with(
        &["encrypt", "--key", "k", "-o", "p4", "p"],
        None,
        &[("HSMSEAL_PIN", "")],
    );
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(stderr(&out).contains("HSMSEAL_PIN"));
    // Missing module.
    let out = c.run(&[
        "--module",
        "/nonexistent/libpkcs11.so",
        "encrypt",
        "--key",
        "k",
        "-o",
        "p5",
        "p",
    ]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
}

#[test]
fn pin_file_flag_works_and_no_flag_takes_a_pin_value() {
    let c = Cli::with_key();
    write(&c.path("p"), b"x");
    let pinfile = c.path("pin");
    write(&pinfile, format!("{}\n", c.token.pin).as_bytes());
    std::fs::set_permissions(&pinfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = c.run_with(
        &["--pin-file", "pin", "encrypt", "--key", "k", "p"],
        None,
        &[("HSMSEAL_PIN", "")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c.run(&["--pin", "1234", "encrypt", "--key", "k", "p"]);
    assert_eq!(code(&out), 2, "a --pin flag must not exist");
}

#[test]
fn init_dev_then_the_full_cycle_as_a_new_user() {
    use support::{clear_hsmseal_env, run_cmd, BIN};
    let work = tempfile::tempdir().unwrap();
    let run = |args: &[&str], stdin: Option<&[u8]>| {
        let mut c = std::process::Command::new(BIN);
        clear_hsmseal_env(&mut c);
        c.current_dir(work.path()).args(args);
        run_cmd(c, stdin)
    };
    let ok = |args: &[&str]| {
        let o = run(args, None);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        o
    };
    let o = ok(&["init", "--dev"]);
    assert!(
        stderr(&o).to_lowercase().contains("software token"),
        "{}",
        stderr(&o)
    );
    let mode = std::fs::metadata(work.path().join(".hsmseal/user-pin"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    ok(&["key", "create", "backups"]);
    let plain = data(100_000, 11);
    std::fs::write(work.path().join("backup.sql"), &plain).unwrap();
    ok(&["encrypt", "--key", "backups", "backup.sql"]);
    let inspect = String::from_utf8(ok(&["inspect", "backup.sql.hseal"]).stdout).unwrap();
    assert!(inspect.contains("backups v1"));
    ok(&["verify", "backup.sql.hseal"]);
    std::fs::remove_file(work.path().join("backup.sql")).unwrap();
    ok(&["decrypt", "backup.sql.hseal"]);
    assert_eq!(
        std::fs::read(work.path().join("backup.sql")).unwrap(),
        plain
    );
    // A second init in the same place is refused rather than clobbering,
    // and does not suggest --force, which would not help (a token is there).
    for args in [&["init", "--dev"][..], &["init", "--dev", "--force"]] {
        let again = run(args, None);
        assert_eq!(code(&again), 2, "{}", stderr(&again));
        assert!(
            stderr(&again).contains("already holds a dev token"),
            "{}",
            stderr(&again)
        );
    }
    // --module is honoured by init (it was ignored): a wrong one is named.
    let other = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(BIN);
    clear_hsmseal_env(&mut cmd);
    cmd.current_dir(other.path()).args([
        "init",
        "--dev",
        "--module",
        "/nonexistent/libsofthsm2.so",
    ]);
    let o = run_cmd(cmd, None);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/libsofthsm2.so"),
        "{}",
        stderr(&o)
    );
    let doctor = run(&["doctor"], None);
    assert!(doctor.status.success(), "{}", stderr(&doctor));
}

/// Counts agree with their nouns in what a person reads: a one-byte file
/// is "1 byte" in "1 chunk", not "1 bytes" in "1 chunks" (issue 10).
#[test]
fn one_of_a_thing_is_singular_in_human_messages() {
    let c = Cli::with_key();
    write(&c.path("one"), b"x");
    c.ok(&["encrypt", "--key", "k", "one"]);
    let inspect = String::from_utf8(c.ok(&["inspect", "one.hseal"])).unwrap();
    assert!(
        inspect.contains("(1 byte of plaintext in 1 chunk)"),
        "{inspect}"
    );
    let verify = String::from_utf8(c.ok(&["verify", "one.hseal"])).unwrap();
    assert!(verify.contains("OK (1 byte, key k v1)"), "{verify}");
    std::fs::create_dir(c.path("d")).unwrap();
    std::fs::rename(c.path("one.hseal"), c.path("d/one.hseal")).unwrap();
    let tree = String::from_utf8(c.ok(&["inspect", "-r", "d"])).unwrap();
    assert!(
        tree.contains("1 hsmseal file (0 other files skipped)"),
        "{tree}"
    );
    let deps = String::from_utf8(c.ok(&["inspect", "--deps", "d"])).unwrap();
    assert!(
        deps.contains("1 file searched, 1 of them an hsmseal file"),
        "{deps}"
    );
    for text in [&inspect, &verify, &tree, &deps] {
        for wrong in ["1 chunks", "1 bytes", "1 files", "1 hsmseal files"] {
            let bad = text.starts_with(wrong)
                || [" ", "(", "\n"]
                    .iter()
                    .any(|b| text.contains(&format!("{b}{wrong}")));
            assert!(!bad, "{wrong:?} in {text}");
        }
    }
}

/// Outputs bigger than a few write-back ranges (`fs::durable` starts
/// write-back every 8 MiB, before the final fsync): a round trip through
/// files, `--in-place` both ways, and a decrypt that fails in its last
/// chunk, after 20 MiB of plaintext went to the temporary file and its
/// write-back was started, leaves no output and no temporary file.
#[test]
fn large_outputs_appear_whole_or_not_at_all() {
    let c = Cli::with_key();
    let plain = data(20 * 1024 * 1024 + 12345, 7);
    write(&c.path("big"), &plain);
    c.ok(&["encrypt", "--key", "k", "-o", "big.hseal", "big"]);
    c.ok(&["decrypt", "-o", "big.out", "big.hseal"]);
    assert!(std::fs::read(c.path("big.out")).unwrap() == plain);

    c.ok(&["encrypt", "--key", "k", "--in-place", "big.out"]);
    assert!(!c.path("big.out").exists());
    c.ok(&["decrypt", "--in-place", "big.out.hseal"]);
    assert!(!c.path("big.out.hseal").exists());
    assert!(std::fs::read(c.path("big.out")).unwrap() == plain);
    std::fs::remove_file(c.path("big.out")).unwrap();

    let mut sealed = std::fs::read(c.path("big.hseal")).unwrap();
    let at = sealed.len() - 100;
    sealed[at] ^= 0x20;
    write(&c.path("bad.hseal"), &sealed);
    let before = c.files();
    let out = c.run(&["decrypt", "-o", "bad.out", "bad.hseal"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("authentication failed"),
        "{}",
        stderr(&out)
    );
    assert!(!c.path("bad.out").exists(), "output left behind");
    assert_eq!(c.files(), before, "temporary file left behind");
}
