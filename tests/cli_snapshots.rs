//! The command line's interface as a user meets it, compared to committed
//! snapshots under tests/snapshots/: every (sub)command's `--help` and
//! `-h`, and a table of representative failures, one or more per exit code,
//! with their stderr line(s), exit code and, for a few, the `--json` lines.
//! A changed message is then a reviewed diff, never an accident.
//!
//! To accept the current output after a deliberate change:
//!
//! ```sh
//! HSMSEAL_BLESS=1 cargo test --release --locked --test cli_snapshots
//! git diff tests/snapshots/
//! ```
//!
//! Hand-written (60 lines) rather than insta or trycmd: the two files
//! needed here are plain text a reviewer reads in `git diff`, and no new
//! dependency (with its own review format and tooling) is worth that.
//!
//! Normalised before comparing: this test's working directory (`[WORK]`),
//! its token's directory and label (`[TOKENDIR]`, `[TOKEN]`), and the
//! `seconds` of JSON summaries. Help is rendered without a terminal, so
//! clap does not wrap it: the snapshots do not depend on the screen.

/// The binary's clap definitions, to list every subcommand.
#[path = "../src/bin/hsmseal/cli.rs"]
mod cli;
mod support;

use clap::CommandFactory;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::{code, write, Cli};

fn snapshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots")
}

fn blessing() -> bool {
    std::env::var_os("HSMSEAL_BLESS").is_some_and(|v| v == "1")
}

/// Compares `actual` with the snapshot `name` (or writes it when
/// blessing); returns a description of the difference.
fn compare(name: &str, actual: &str) -> Option<String> {
    let path = snapshot_dir().join(name);
    if blessing() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return None;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    if want == actual {
        return None;
    }
    let first = want
        .lines()
        .zip(actual.lines())
        .position(|(a, b)| a != b)
        .unwrap_or(want.lines().count().min(actual.lines().count()));
    Some(format!(
        "{name}: differs from line {}:\n  snapshot: {:?}\n  now:      {:?}",
        first + 1,
        want.lines().nth(first).unwrap_or("<end>"),
        actual.lines().nth(first).unwrap_or("<end>"),
    ))
}

fn fail_on(mismatches: Vec<String>) {
    assert!(
        mismatches.is_empty(),
        "{} snapshot(s) differ (after a deliberate change: HSMSEAL_BLESS=1 cargo test --release --locked --test cli_snapshots, then review git diff tests/snapshots/):\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

/// Every visible command path: [], ["encrypt"], ["key", "create"], ...
fn command_paths() -> Vec<Vec<String>> {
    fn walk(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<Vec<String>>) {
        out.push(path.clone());
        for s in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let mut p = path.clone();
            p.push(s.get_name().to_string());
            walk(s, p, out);
        }
    }
    let mut out = Vec::new();
    walk(&cli::Cli::command(), Vec::new(), &mut out);
    out
}

#[test]
fn every_help_text_matches_its_snapshot() {
    let paths = command_paths();
    assert!(paths.len() > 20, "the walk found too few commands");
    let mut mismatches = Vec::new();
    let mut expected = std::collections::BTreeSet::new();
    for path in &paths {
        // `help` is clap's own; its text is the parent's list.
        if path.last().is_some_and(|p| p == "help") {
            continue;
        }
        for (flag, kind) in [("--help", "long"), ("-h", "short")] {
            let mut c = Command::new(support::BIN);
            support::clear_hsmseal_env(&mut c);
            // Set, to prove --help never shows an environment value.
            c.env("HSMSEAL_PIN", "pin-in-env-1234")
                .env("HSMSEAL_TOKEN", "token-in-env");
            c.args(path).arg(flag);
            let out = support::run_cmd(c, None);
            assert_eq!(code(&out), 0, "{path:?} {flag}");
            let text = String::from_utf8(out.stdout).unwrap();
            assert!(
                !text.contains("pin-in-env-1234") && !text.contains("token-in-env"),
                "{path:?} {flag} shows an environment value"
            );
            // The structure the issue asks for, checked here as well as
            // in the snapshot, so blessing cannot lose it.
            assert!(text.contains("\nGlobal options:\n"), "{path:?} {flag}");
            assert!(text.contains("[env: HSMSEAL_PIN_FILE]"), "{path:?} {flag}");
            if !path.is_empty() {
                assert!(
                    text.contains("\nExamples:\n"),
                    "{path:?} {flag}: no examples"
                );
            }
            let name = format!(
                "help/{}.{kind}.txt",
                std::iter::once("hsmseal")
                    .chain(path.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join("-")
            );
            expected.insert(name.clone());
            mismatches.extend(compare(&name, &text));
        }
    }
    // A snapshot no command produces any more is stale.
    let dir = snapshot_dir().join("help");
    for e in std::fs::read_dir(&dir).into_iter().flatten() {
        let e = e.unwrap();
        let name = format!("help/{}", e.file_name().to_string_lossy());
        if !expected.contains(&name) {
            if blessing() {
                std::fs::remove_file(e.path()).unwrap();
            } else {
                mismatches.push(format!("{name}: no command has this help any more"));
            }
        }
    }
    fail_on(mismatches);
}

/// The test's paths and token, replaced by placeholders.
struct Normalise {
    pairs: Vec<(String, &'static str)>,
}

impl Normalise {
    fn new(c: &Cli) -> Normalise {
        let mut pairs = Vec::new();
        for (p, name) in [
            (c.work.path(), "[WORK]"),
            (c.token.dir.path(), "[TOKENDIR]"),
        ] {
            if let Ok(real) = p.canonicalize() {
                pairs.push((real.display().to_string(), name));
            }
            pairs.push((p.display().to_string(), name));
        }
        pairs.push((c.token.label.clone(), "[TOKEN]"));
        // Longest first, so a path is not half replaced by a prefix.
        pairs.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        Normalise { pairs }
    }

    fn apply(&self, s: &str) -> String {
        let mut s = s.to_string();
        for (from, to) in &self.pairs {
            s = s.replace(from.as_str(), to);
        }
        // Timings in JSON summaries.
        let mut out = String::new();
        for line in s.lines() {
            let mut l = line.to_string();
            // A token's serial and slot id (pkcs11: URIs in token errors)
            // differ with every test token.
            for attr in ["serial=", "slot-id="] {
                let mut from = 0;
                while let Some(i) = l[from..].find(attr).map(|i| i + from + attr.len()) {
                    let end = l[i..]
                        .find(|c: char| !c.is_ascii_alphanumeric())
                        .map_or(l.len(), |e| i + e);
                    l.replace_range(i..end, "[ID]");
                    from = i + 4;
                }
            }
            // ... and in the human summary of a bulk run.
            if let (Some(i), Some(j)) = (l.find(" MiB in "), l.find(" MiB/s)")) {
                l = format!("{} MiB in [T] s ([R]{}", &l[..i], &l[j..]);
            }
            if let Some(i) = l.find("\"seconds\":") {
                let rest = &l[i + 10..];
                let end = rest.find([',', '}']).unwrap_or(rest.len());
                l = format!("{}\"seconds\":0{}", &l[..i], &rest[end..]);
            }
            out.push_str(&l);
            out.push('\n');
        }
        out
    }
}

/// A failure of the table: title, arguments, extra environment, expected
/// exit code.
type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, i32);

#[test]
fn error_messages_and_exit_codes_match_their_snapshot() {
    let c = Cli::with_key();
    write(&c.path("a.txt"), b"hello, world\n");
    write(&c.path("plain.txt"), b"just some text, not sealed\n");
    c.ok(&["encrypt", "-k", "k", "a.txt"]);
    // Payload byte flipped: fails authentication.
    let mut sealed = std::fs::read(c.path("a.txt.hseal")).unwrap();
    sealed[1024 + 20] ^= 1;
    write(&c.path("damaged.hseal"), &sealed);
    // Cut short.
    let sealed = std::fs::read(c.path("a.txt.hseal")).unwrap();
    write(&c.path("short.hseal"), &sealed[..600]);
    // Under a version that is then disabled.
    write(&c.path("b.txt"), b"b\n");
    c.ok(&["key", "create", "k2"]);
    c.ok(&["encrypt", "-k", "k2", "b.txt"]);
    c.ok(&["key", "disable", "k2", "--version", "1"]);
    std::fs::create_dir(c.path("empty")).unwrap();
    write(&c.path("users.txt"), b"id,ssn\n1,123\n");

    let cases: Vec<Case> = vec![
        // 2: usage
        (
            "unknown flag",
            vec!["encrypt", "--bogus", "a.txt"],
            vec![],
            2,
        ),
        ("missing subcommand", vec!["key"], vec![], 2),
        (
            "bad duration",
            vec!["key", "purge", "k", "--older-than", "1y", "--yes"],
            vec![],
            2,
        ),
        (
            "bad --format value",
            vec!["columns", "encrypt", "-c", "ssn", "--format", "xml"],
            vec![],
            2,
        ),
        (
            "bad HSMSEAL_JOBS",
            vec!["config", "show"],
            vec![("HSMSEAL_JOBS", "many")],
            2,
        ),
        ("no key given", vec!["encrypt", "a.txt"], vec![], 2),
        (
            "refused overwrite",
            vec!["encrypt", "-k", "k", "a.txt"],
            vec![],
            2,
        ),
        (
            "empty -r directory",
            vec!["verify", "-r", "empty"],
            vec![],
            2,
        ),
        (
            "columns encrypt --recipient",
            vec!["columns", "encrypt", "-c", "ssn", "--recipient", "dr.pub"],
            vec![],
            2,
        ),
        (
            "columns encrypt --group",
            vec!["columns", "encrypt", "-c", "ssn", "--group", "backups"],
            vec![],
            2,
        ),
        (
            "dump format from stdin",
            vec!["columns", "encrypt", "-k", "k", "-c", "ssn"],
            vec![],
            2,
        ),
        (
            "dump format from a name",
            vec![
                "columns",
                "encrypt",
                "-k",
                "k",
                "-c",
                "ssn",
                "-i",
                "users.txt",
            ],
            vec![],
            2,
        ),
        ("bad key name", vec!["key", "create", "bad name"], vec![], 2),
        (
            "destroying the current version",
            vec!["key", "destroy", "k", "--version", "1"],
            vec![],
            2,
        ),
        ("no audit log", vec!["audit", "verify"], vec![], 2),
        // 3: authentication
        (
            "damaged file",
            vec!["decrypt", "-o", "out.txt", "damaged.hseal"],
            vec![],
            3,
        ),
        (
            "damaged file, verify",
            vec!["verify", "damaged.hseal"],
            vec![],
            3,
        ),
        // 4: key
        (
            "unknown key",
            vec!["encrypt", "-k", "nokey", "plain.txt"],
            vec![],
            4,
        ),
        (
            "disabled key version",
            vec!["decrypt", "-o", "-", "b.txt.hseal"],
            vec![],
            4,
        ),
        (
            "unknown key version",
            vec!["key", "enable", "k", "--version", "9"],
            vec![],
            4,
        ),
        // 5: token
        (
            "missing token",
            vec!["key", "list"],
            vec![("HSMSEAL_TOKEN", "no-such-token")],
            5,
        ),
        (
            "missing module",
            vec!["key", "list"],
            vec![("HSMSEAL_PKCS11_MODULE", "/nonexistent/libpkcs11.so")],
            5,
        ),
        // 6: PIN
        (
            "wrong PIN",
            vec!["key", "list"],
            vec![("HSMSEAL_PIN", "wrong-pin")],
            6,
        ),
        (
            "missing PIN file",
            vec!["key", "list"],
            vec![("HSMSEAL_PIN", ""), ("HSMSEAL_PIN_FILE", "nopin")],
            6,
        ),
        // 7: I/O
        (
            "missing file",
            vec!["encrypt", "-k", "k", "missing.txt"],
            vec![],
            7,
        ),
        // 8: format
        (
            "not an hsmseal file",
            vec!["decrypt", "-o", "out.txt", "plain.txt"],
            vec![],
            8,
        ),
        (
            "no output name for a file without the suffix",
            vec!["decrypt", "plain.txt"],
            vec![],
            2,
        ),
        (
            "truncated header",
            vec!["inspect", "short.hseal"],
            vec![],
            3,
        ),
        (
            "plaintext where a token belongs",
            vec![
                "columns",
                "decrypt",
                "-f",
                "csv",
                "-c",
                "ssn",
                "-i",
                "users.txt",
                "-o",
                "-",
            ],
            vec![],
            8,
        ),
        // 1: some items failed
        (
            "one of two items failed",
            vec!["-j", "2", "verify", "a.txt.hseal", "damaged.hseal"],
            vec![],
            1,
        ),
        // The same failures with --json: an error line (stdout, or stderr
        // when the data goes to stdout).
        (
            "json: unknown flag",
            vec!["--json", "encrypt", "--bogus"],
            vec![],
            2,
        ),
        (
            "json: bad key name",
            vec!["--json", "key", "create", "bad name"],
            vec![],
            2,
        ),
        (
            "json: wrong PIN",
            vec!["--json", "key", "list"],
            vec![("HSMSEAL_PIN", "wrong-pin")],
            6,
        ),
        (
            "json: damaged file",
            vec!["--json", "verify", "damaged.hseal"],
            vec![],
            3,
        ),
        (
            "json: damaged file to stdout",
            vec!["--json", "decrypt", "-o", "-", "damaged.hseal"],
            vec![],
            3,
        ),
        (
            "json: one of two items failed",
            vec![
                "--json",
                "-j",
                "2",
                "verify",
                "a.txt.hseal",
                "damaged.hseal",
            ],
            vec![],
            1,
        ),
        (
            "json: columns",
            vec![
                "--json",
                "columns",
                "decrypt",
                "-f",
                "csv",
                "-c",
                "ssn",
                "-i",
                "users.txt",
                "-o",
                "-",
            ],
            vec![],
            8,
        ),
    ];
    let norm = Normalise::new(&c);
    let mut doc = String::from(
        "# Representative failures: exit code, stderr and (with --json) stdout.\n\
         # Bless after a deliberate change: HSMSEAL_BLESS=1 cargo test --release --locked --test cli_snapshots\n",
    );
    let mut wrong_codes = Vec::new();
    for (title, args, env, want) in &cases {
        let out = c.run_with(args, None, env);
        let got = code(&out);
        if got != *want {
            wrong_codes.push(format!("{title}: exit {got}, want {want}"));
        }
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            !stdout.contains(&c.token.pin) && !stderr.contains(&c.token.pin),
            "{title}: the PIN in the output"
        );
        doc.push_str(&format!("\n## {title}\n$ hsmseal {}\n", args.join(" ")));
        for (k, v) in env {
            doc.push_str(&format!("  with {k}={v:?}\n"));
        }
        doc.push_str(&format!("exit {got}\n"));
        // Data on stdout is the command's, not its report; only --json
        // lines are snapshotted.
        let json_on_stdout = args.contains(&"--json") && stdout.starts_with('{');
        if json_on_stdout {
            doc.push_str("stdout:\n");
            doc.push_str(&norm.apply(&stdout));
        }
        doc.push_str("stderr:\n");
        doc.push_str(&norm.apply(&stderr));
        if args.contains(&"--json") {
            // Every --json failure says so in an error line, except a bulk
            // run with failed items (exit 1: its summary counts them).
            let stream = if json_on_stdout {
                &out.stdout
            } else {
                &out.stderr
            };
            let errors = support::json_of_type(stream, "error");
            if *want == 1 {
                assert!(errors.is_empty(), "{title}");
            } else {
                assert_eq!(errors.len(), 1, "{title}: {stdout}{stderr}");
                assert_eq!(errors[0]["exit_code"], *want, "{title}");
            }
        } else if *want != 1 && *want != 2 {
            // Our own errors are one line (clap's usage errors have a tip).
            assert_eq!(stderr.lines().count(), 1, "{title}: {stderr}");
            assert!(stderr.starts_with("hsmseal: error: "), "{title}: {stderr}");
        }
    }
    assert!(wrong_codes.is_empty(), "{}", wrong_codes.join("\n"));
    fail_on(compare("errors.txt", &doc).into_iter().collect());
}
