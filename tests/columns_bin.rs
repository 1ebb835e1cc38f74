//! The `hsmseal columns` binary against a real SoftHSM2 token of its own:
//! streaming stdin to stdout, the JSON summary on stderr (HSM calls equal
//! batches), exit codes, and no output before a header error.

mod support;

use std::process::Output;
use support::{stderr as err, Cli};

/// The `summary` line: the last of the JSON lines, which are all stderr
/// carries with --json (stdout is the dump).
fn summary(o: &Output) -> serde_json::Value {
    let lines = support::json_lines(&o.stderr);
    let last = lines.last().cloned().unwrap_or_default();
    assert_eq!(last["type"], "summary", "{}", err(o));
    last
}

#[test]
fn columns_round_trip_through_a_softhsm2_token() {
    let e = Cli::new();
    let k = e.run_in(&["key", "create", "k"], b"");
    assert!(k.status.success(), "{}", err(&k));
    let mut csv = b"id,name,ssn\n".to_vec();
    for i in 0..25_000 {
        csv.extend_from_slice(format!("{i},\"Doe, J{i}\",{i:09}\r\n").as_bytes());
    }
    let enc = e.run_in(
        &[
            "--json",
            "columns",
            "encrypt",
            "--key",
            "k",
            "--format",
            "csv",
            "--columns",
            "name,ssn",
            "--row-id",
            "id",
            "--context",
            "app.users",
            "--batch-size",
            "5000",
        ],
        &csv,
    );
    assert_eq!(enc.status.code(), Some(0), "{}", err(&enc));
    let s = summary(&enc);
    assert_eq!(s["cells"], 50_000);
    assert_eq!(s["hsm_calls"], s["batches"]);
    assert!(s["batches"].as_u64().unwrap() <= 10 + 16);
    let dec = e.run_in(
        &[
            "--json",
            "columns",
            "decrypt",
            "--format",
            "csv",
            "--columns",
            "name,ssn",
            "--row-id",
            "id",
            "--context",
            "app.users",
        ],
        &enc.stdout,
    );
    assert_eq!(dec.status.code(), Some(0), "{}", err(&dec));
    assert_eq!(dec.stdout, csv);
    let s = summary(&dec);
    assert_eq!(s["hsm_calls"], s["batches"]);

    // Wrong context: authentication fails (exit 3), naming row and column.
    let bad = e.run_in(
        &[
            "columns",
            "decrypt",
            "-f",
            "csv",
            "--columns",
            "name,ssn",
            "--row-id",
            "id",
        ],
        &enc.stdout,
    );
    assert_eq!(bad.status.code(), Some(3), "{}", err(&bad));
    assert!(
        err(&bad).contains("row 2, column \"name\""),
        "{}",
        err(&bad)
    );
    // Plaintext where a token is expected: a format error (exit 8).
    let plain = e.run_in(
        &["columns", "decrypt", "-f", "csv", "--columns", "ssn"],
        b"ssn\n123\n",
    );
    assert_eq!(plain.status.code(), Some(8), "{}", err(&plain));
    // A column missing from the header: usage error (exit 2), no output.
    let miss = e.run_in(
        &[
            "columns",
            "encrypt",
            "-f",
            "csv",
            "--key",
            "k",
            "--columns",
            "nope",
        ],
        &csv,
    );
    assert_eq!(miss.status.code(), Some(2), "{}", err(&miss));
    // Nothing but the abort marker, so a loader reading it fails too.
    assert_eq!(miss.stdout, hsmseal::columns::abort::MARKER);

    // --stats --json: stderr is the JSON stream and holds nothing else:
    // not the --stats line, not the note a human run prints (cells copied
    // as plaintext): the summary counts them.
    let args = [
        "--json",
        "columns",
        "decrypt",
        "-f",
        "csv",
        "--columns",
        "ssn",
        "--allow-plaintext",
        "--stats",
    ];
    let mixed = e.run_in(&args, b"ssn\n123\n");
    assert_eq!(mixed.status.code(), Some(0), "{}", err(&mixed));
    assert_eq!(mixed.stdout, b"ssn\n123\n");
    let lines = support::json_lines(&mixed.stderr);
    let types: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["summary"], "{}", err(&mixed));
    assert_eq!(lines[0]["plaintext"], 1);
    // Without --json: the human --stats line and the note, no JSON.
    let human = e.run_in(&args[1..], b"ssn\n123\n");
    assert!(
        err(&human).contains("columns decrypt: 1 row,"),
        "{}",
        err(&human)
    );
    assert!(
        err(&human).contains("--allow-plaintext: 1"),
        "{}",
        err(&human)
    );
    assert!(!err(&human).contains('{'), "{}", err(&human));
    // A failure with --json: an `error` line on stderr, no human line.
    let failed = e.run_in(
        &["--json", "columns", "decrypt", "-f", "csv", "-c", "ssn"],
        b"ssn\n123\n",
    );
    assert_eq!(failed.status.code(), Some(8), "{}", err(&failed));
    let lines = support::json_lines(&failed.stderr);
    assert_eq!(lines.len(), 1, "{}", err(&failed));
    assert_eq!(lines[0]["type"], "error");
    assert_eq!(lines[0]["kind"], "format");
    assert_eq!(lines[0]["exit_code"], 8);
}

/// `--batch-size` counts cells (selected non-NULL values), not rows: 100
/// rows with two encrypted cells each (and a third selected column that is
/// always NULL) at `--batch-size 10` make 20 batch keys of exactly 10 tokens
/// each, one HSM call apiece. Counting rows would make 10 batches of 20.
#[test]
fn batch_size_counts_cells_not_rows() {
    let e = Cli::with_key();
    let mut csv = b"id,a,b,n\n".to_vec();
    for i in 0..100 {
        csv.extend_from_slice(format!("{i},a{i},b{i},\n").as_bytes());
    }
    let enc = e.run_in(
        &[
            "--json",
            "--jobs",
            "1",
            "columns",
            "encrypt",
            "--key",
            "k",
            "-f",
            "csv",
            "-c",
            "a,b,n",
            "--batch-size",
            "10",
        ],
        &csv,
    );
    assert_eq!(enc.status.code(), Some(0), "{}", err(&enc));
    let s = summary(&enc);
    assert_eq!(s["rows"], 100);
    assert_eq!(s["cells"], 200);
    assert_eq!(s["nulls"], 100);
    assert_eq!(s["batches"], 20);
    assert_eq!(s["hsm_calls"], 20);
    // Tokens of one batch share their v2 header, the token text's first 25
    // characters ("hsc2." and the base64 of the 15-byte header for key
    // "k": name, version, batch salt): 20 headers, each in exactly 10 tokens.
    let text = String::from_utf8(enc.stdout).unwrap();
    let mut per_batch = std::collections::BTreeMap::<String, usize>::new();
    for line in text.lines().skip(1) {
        for cell in line.split(',').skip(1).take(2) {
            assert!(cell.starts_with("hsc2."), "{line}");
            *per_batch.entry(cell[..25].to_string()).or_default() += 1;
        }
    }
    assert_eq!(per_batch.len(), 20, "{per_batch:?}");
    assert!(per_batch.values().all(|&n| n == 10), "{per_batch:?}");
    // Out of range: a usage error before any HSM work.
    for bad in ["0", "1000001"] {
        let o = e.run_in(
            &[
                "columns",
                "encrypt",
                "--key",
                "k",
                "-f",
                "csv",
                "-c",
                "a",
                "--batch-size",
                bad,
            ],
            &csv,
        );
        assert_eq!(o.status.code(), Some(2), "{}", err(&o));
        assert!(err(&o).contains("--batch-size"), "{}", err(&o));
    }
}

/// The command line of issue 10: `columns decrypt --columns ssn
/// users.enc.csv -o users.csv`, the input positional as in every other
/// data command, against a real token; several inputs are exit 2 before
/// any PIN or HSM work (a wrong PIN would otherwise be exit 6).
#[test]
fn columns_take_a_positional_input() {
    let e = Cli::with_key();
    let (plain, enc, dec) = (
        e.path("users.csv"),
        e.path("users.enc.csv"),
        e.path("users.dec.csv"),
    );
    std::fs::write(&plain, "id,ssn\n1,123-45-6789\n2,\n").unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let o = e.run(&[
        "columns",
        "encrypt",
        "--key",
        "k",
        "--columns",
        "ssn",
        &s(&plain),
        "-o",
        &s(&enc),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let text = std::fs::read_to_string(&enc).unwrap();
    assert!(
        text.starts_with("id,ssn\n1,hsc2.") && !text.contains("6789"),
        "{text}"
    );
    let o = e.run(&[
        "columns",
        "decrypt",
        "--columns",
        "ssn",
        &s(&enc),
        "-o",
        &s(&dec),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(std::fs::read(&dec).unwrap(), std::fs::read(&plain).unwrap());
    let o = e.run_with(
        &[
            "columns",
            "decrypt",
            "--format",
            "csv",
            "--columns",
            "ssn",
            &s(&enc),
            &s(&plain),
            "-o",
            &s(&e.path("x.csv")),
        ],
        None,
        &[("HSMSEAL_PIN", "wrong-pin")],
    );
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(
        err(&o).contains("one dump per run, got 2 inputs"),
        "{}",
        err(&o)
    );
    assert!(!e.path("x.csv").exists());
    // The same with one input reaches the HSM: the wrong PIN is exit 6.
    let o = e.run_with(
        &[
            "columns",
            "decrypt",
            "--format",
            "csv",
            "--columns",
            "ssn",
            &s(&enc),
            "-o",
            &s(&e.path("x.csv")),
        ],
        None,
        &[("HSMSEAL_PIN", "wrong-pin")],
    );
    assert_eq!(o.status.code(), Some(6), "{}", err(&o));
}

/// `columns rewrap` without --key takes each token to the current version
/// of its own key, like file `rewrap` (issue 10): a dump with column a
/// under key k and column b under key b, both keys rotated, ends with a
/// under k v2 and b under b v2 (decrypts with both v1 disabled), and the
/// configured default key (HSMSEAL_KEY) plays no part. Again: no HSM call.
/// With --key b every token moves to b.
#[test]
fn columns_rewrap_defaults_to_each_tokens_own_key() {
    let e = Cli::with_key();
    e.ok(&["key", "create", "b"]);
    let mut csv = b"id,a,b\n".to_vec();
    for i in 0..50 {
        csv.extend_from_slice(format!("{i},a{i},b{i}\n").as_bytes());
    }
    let enc = |stdin: &[u8], key: &str, col: &str| {
        let o = e.run_in(
            // One worker: one batch key per column, whatever the blocks.
            &[
                "-j", "1", "columns", "encrypt", "-f", "csv", "--key", key, "-c", col,
            ],
            stdin,
        );
        assert_eq!(o.status.code(), Some(0), "{}", err(&o));
        o.stdout
    };
    let both = enc(&enc(&csv, "k", "a"), "b", "b");
    e.ok(&["key", "rotate", "k"]);
    e.ok(&["key", "rotate", "b"]);
    let rewrap = |stdin: &[u8], extra: &[&str]| {
        let mut args = vec!["--json", "--jobs", "2", "columns", "rewrap", "-f", "csv"];
        args.extend_from_slice(&["-c", "a,b"]);
        args.extend_from_slice(extra);
        let o = e.run_with(&args, Some(stdin), &[("HSMSEAL_KEY", "k")]);
        assert_eq!(o.status.code(), Some(0), "{}", err(&o));
        let s = summary(&o);
        (o.stdout, s)
    };
    let (own, s) = rewrap(&both, &[]);
    assert_eq!(s["cells"], 100);
    assert_eq!(s["batches"], 2, "{s}");
    assert_eq!(s["hsm_calls"], 4, "{s}");
    assert_eq!(s["key"], serde_json::Value::Null);
    assert_eq!(
        s["keys"],
        serde_json::json!([{"name": "b", "version": 2}, {"name": "k", "version": 2}])
    );
    let (again, s) = rewrap(&own, &[]);
    assert_eq!(again, own);
    assert_eq!(s["hsm_calls"], 0, "{s}");
    // Each token went to its own key: with version 1 of both disabled,
    // a decrypts and b decrypts.
    let (moved, s) = rewrap(&both, &["--key", "b"]);
    assert_eq!(s["keys"], serde_json::json!([{"name": "b", "version": 2}]));
    e.ok(&["key", "disable", "k", "--version", "1"]);
    e.ok(&["key", "disable", "b", "--version", "1"]);
    for dump in [&own, &moved] {
        let o = e.run_in(&["columns", "decrypt", "-f", "csv", "-c", "a,b"], dump);
        assert_eq!(o.status.code(), Some(0), "{}", err(&o));
        assert_eq!(o.stdout, csv);
    }
    // With k's v2 disabled too: the dump moved to b still decrypts (--key b
    // moved column a), the own-key one does not (column a is under k v2),
    // and an own-key rewrap of the original has no version of k to go to.
    e.ok(&["key", "disable", "k", "--version", "2"]);
    let o = e.run_in(&["columns", "decrypt", "-f", "csv", "-c", "a,b"], &moved);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let o = e.run_in(&["columns", "decrypt", "-f", "csv", "-c", "a,b"], &own);
    assert_eq!(o.status.code(), Some(4), "{}", err(&o));
    let o = e.run_in(&["columns", "rewrap", "-f", "csv", "-c", "a,b"], &both);
    assert_eq!(o.status.code(), Some(4), "{}", err(&o));
}
