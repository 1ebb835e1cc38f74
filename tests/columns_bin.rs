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
        err(&human).contains("columns decrypt: 1 rows"),
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
