//! The `columns` subcommands in process, from their command line to
//! `execute_with_stats`, with the in-memory key backend standing in for the
//! HSM (the HSM is not the point here; tests/columns_pipes.rs runs the
//! binary against SoftHSM2): files in and out, atomic output (nothing under
//! the final name on failure), format from the file extension, error kinds.

use super::execute_with_stats;
use crate::cli::ColumnsCommand;
use clap::Parser;
use hsmseal::backend::MemoryBackend;
use hsmseal::error::{ErrorKind, Result};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: ColumnsCommand,
}

/// Parses `columns ARGS` and runs it against `b`, as `columns::run` does
/// once it has the backend and the key name (default key: `pii`).
fn run(b: &MemoryBackend, args: &[&str]) -> Result<i32> {
    let cmd = Cli::try_parse_from(std::iter::once("columns").chain(args.iter().copied()))
        .unwrap()
        .cmd;
    let key = match &cmd {
        ColumnsCommand::Encrypt(a) => Some(a.key.clone().unwrap_or_else(|| "pii".into())),
        ColumnsCommand::Rewrap(a) => a.key.clone(),
        _ => None,
    };
    if let Some(k) = &key {
        hsmseal::backend::validate_key_name(k)?;
    }
    execute_with_stats(Some(b), key, false, 2, cmd).map(|_| 0)
}

#[test]
fn encrypt_and_decrypt_files_by_extension() {
    let b = MemoryBackend::new();
    b.add_version("pii");
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("users.tsv");
    std::fs::write(&input, "id\tssn\n1\t\"a\tb\"\n2\t\n").unwrap();
    let enc = d.path().join("users.enc.tsv");
    let dec = d.path().join("users.dec.tsv");
    let p = |x: &std::path::Path| x.to_str().unwrap().to_string();
    let code = run(
        &b,
        &[
            "encrypt",
            "--columns",
            "ssn",
            "--row-id",
            "id",
            "--context",
            "t",
            "-i",
            &p(&input),
            "-o",
            &p(&enc),
        ],
    )
    .unwrap();
    assert_eq!(code, 0);
    let text = std::fs::read_to_string(&enc).unwrap();
    assert!(text.starts_with("id\tssn\n1\thsc2."), "{text}");
    assert!(text.ends_with("\n2\t\n"), "NULL kept: {text}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&enc).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Refuses to overwrite without --force.
    let e = run(
        &b,
        &["encrypt", "-c", "ssn", "-i", &p(&input), "-o", &p(&enc)],
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage);
    // Wrong context: integrity error, and no output file left behind.
    let e = run(
        &b,
        &[
            "decrypt",
            "-c",
            "ssn",
            "--row-id",
            "id",
            "-i",
            &p(&enc),
            "-o",
            &p(&dec),
        ],
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Integrity);
    assert!(e.message().contains("row 2, column \"ssn\""), "{e}");
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        2,
        "temp or output left"
    );
    run(
        &b,
        &[
            "decrypt",
            "-c",
            "ssn",
            "--row-id",
            "id",
            "--context",
            "t",
            "-i",
            &p(&enc),
            "-o",
            &p(&dec),
        ],
    )
    .unwrap();
    assert_eq!(std::fs::read(&dec).unwrap(), std::fs::read(&input).unwrap());
    // Rotation to a new key version keeps the file decryptable.
    b.add_version("pii");
    let rot = d.path().join("users.rot.tsv");
    // v2 rotation re-encrypts each cell, so it needs the cell's binding.
    run(
        &b,
        &[
            "rewrap",
            "-c",
            "ssn",
            "--row-id",
            "id",
            "--context",
            "t",
            "-i",
            &p(&enc),
            "-o",
            &p(&rot),
        ],
    )
    .unwrap();
    assert_ne!(std::fs::read(&rot).unwrap(), std::fs::read(&enc).unwrap());
    run(
        &b,
        &[
            "decrypt",
            "-c",
            "ssn",
            "--row-id",
            "id",
            "--context",
            "t",
            "-i",
            &p(&rot),
            "-o",
            &p(&dec),
            "--force",
        ],
    )
    .unwrap();
    assert_eq!(std::fs::read(&dec).unwrap(), std::fs::read(&input).unwrap());
}

#[test]
fn usage_errors() {
    let b = MemoryBackend::new();
    b.add_version("pii");
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("x.csv");
    std::fs::write(&f, "a,b\n1,2\n").unwrap();
    let f = f.to_str().unwrap();
    for args in [
        &["encrypt", "-c", "b", "-i", f, "-o", f][..],
        &["encrypt", "-c", "b", "--batch-size", "0", "-i", f][..],
        &["encrypt", "-c", "b", "--key", "bad name", "-i", f][..],
        &["encrypt", "-c", "x", "--no-header", "-i", f][..],
    ] {
        let e = run(&b, args).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{args:?}: {e}");
    }
    assert!(
        Cli::try_parse_from(["columns", "encrypt"]).is_err(),
        "--columns is required"
    );
    // --format and --token-format are closed sets: clap refuses others
    // (naming the choices) before any work.
    for args in [
        &["columns", "encrypt", "-c", "b", "--format", "xml", "-i", f][..],
        &[
            "columns",
            "decrypt",
            "-c",
            "b",
            "--token-format",
            "csv,xml",
            "-i",
            f,
        ],
    ] {
        let e = Cli::try_parse_from(args).err().expect("refused");
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue, "{args:?}");
        assert!(e.to_string().contains("csv, tsv, jsonl, pgcopy"), "{e}");
    }
    let ok = Cli::try_parse_from(["columns", "encrypt", "-c", "b", "-f", "NDJSON"]);
    assert!(ok.is_ok(), "aliases and any case are accepted");
    let e = run(&b, &["encrypt", "-c", "b", "--key", "nokey", "-i", f]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key);
}

/// The format is never guessed (issue 9): stdin needs --format (a COPY text
/// dump read as the old default, CSV, stayed partly in clear); a file name
/// without a known extension too; an output named for another format than
/// the input is refused (hsmseal does not convert). Each is a usage error
/// naming the choices, before any key or output file is touched.
#[test]
fn the_format_is_never_guessed() {
    let b = MemoryBackend::new();
    b.add_version("pii");
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    std::fs::write(p("dump.txt"), "1\tAlice, Smith\n").unwrap();
    std::fs::write(p("users.csv"), "id,name\n1,\"Alice, Smith\"\n").unwrap();
    let (txt, csv, tsv) = (p("dump.txt"), p("users.csv"), p("users.tsv"));
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["encrypt", "--no-header", "-c", "2"],
            "the dump comes from stdin, which has no file name to tell its format by: pass --format csv, tsv, jsonl, pgcopy or parquet",
        ),
        (
            vec!["decrypt", "--no-header", "-c", "2", "-i", "-"],
            "the dump comes from stdin",
        ),
        (
            vec!["encrypt", "-c", "2", "-i", &txt],
            "dump.txt from its name: pass --format csv, tsv, jsonl, pgcopy or parquet",
        ),
        (
            vec!["encrypt", "-c", "name", "-i", &csv, "-o", &tsv],
            "users.csv is a csv dump by its name but the output",
        ),
    ];
    for (args, want) in cases {
        let e = run(&b, &args).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{args:?}: {e}");
        assert!(e.message().contains(want), "{args:?}: {e}");
    }
    assert!(!d.path().join("users.tsv").exists());
    // Named explicitly, the same inputs work; --format beats the name.
    let out = p("dump.enc.copy");
    let code = run(
        &b,
        &[
            "encrypt",
            "--no-header",
            "-c",
            "2",
            "-f",
            "pgcopy",
            "-i",
            &p("dump.txt"),
            "-o",
            &out,
        ],
    )
    .unwrap();
    assert_eq!(code, 0);
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.starts_with("1\thsc2.") && !text.contains("Smith"),
        "{text}"
    );
    run(
        &b,
        &[
            "encrypt",
            "-c",
            "name",
            "-i",
            &p("users.csv"),
            "-o",
            &p("users.enc.csv"),
        ],
    )
    .unwrap();
}

/// `columns` takes its input dump as a positional INPUT like every other
/// data command; `-i FILE` is the same (its earlier spelling) and "-" is
/// stdin. Both at once is a clap error; several inputs are a usage error
/// naming them, and nothing is written (they are never concatenated: each
/// dump has its own header).
#[test]
fn the_input_is_positional_and_one_per_run() {
    let b = MemoryBackend::new();
    b.add_version("pii");
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    std::fs::write(p("users.csv"), "id,ssn\n1,123\n2,\n").unwrap();
    std::fs::write(p("more.csv"), "id,ssn\n3,456\n").unwrap();
    run(
        &b,
        &["encrypt", "-c", "ssn", &p("users.csv"), "-o", &p("a.csv")],
    )
    .unwrap();
    run(
        &b,
        &["decrypt", "-c", "ssn", &p("a.csv"), "-o", &p("a.dec.csv")],
    )
    .unwrap();
    assert_eq!(
        std::fs::read(p("a.dec.csv")).unwrap(),
        std::fs::read(p("users.csv")).unwrap()
    );
    // -i is the same input; the positional one names the format too.
    run(
        &b,
        &[
            "decrypt",
            "-c",
            "ssn",
            "-i",
            &p("a.csv"),
            "-o",
            &p("b.dec.csv"),
        ],
    )
    .unwrap();
    assert_eq!(
        std::fs::read(p("b.dec.csv")).unwrap(),
        std::fs::read(p("users.csv")).unwrap()
    );
    // Both spellings at once: refused by the parser.
    assert!(Cli::try_parse_from([
        "columns",
        "decrypt",
        "-c",
        "ssn",
        "-i",
        &p("a.csv"),
        &p("a.csv")
    ])
    .is_err());
    // Several inputs, with or without --format: a usage error naming them;
    // no output appears.
    for extra in [&[][..], &["--format", "csv"][..]] {
        let mut args = vec!["encrypt", "-c", "ssn"];
        args.extend_from_slice(extra);
        let (u, m, o) = (p("users.csv"), p("more.csv"), p("both.csv"));
        args.extend_from_slice(&[&u, &m, "-o", &o]);
        let e = run(&b, &args).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
        let msg = e.to_string();
        assert!(msg.contains("one dump per run, got 2 inputs"), "{msg}");
        assert!(msg.contains("more.csv"), "{msg}");
        assert!(!d.path().join("both.csv").exists());
    }
}

/// `--columns`/`--row-id` lists: CSV-style quoting for names with commas.
#[test]
fn name_lists_split_csv_style() {
    let n = |args: &[&str]| {
        let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        super::names("--columns", &v)
    };
    assert_eq!(n(&["a,b"]).unwrap(), ["a", "b"]);
    assert_eq!(n(&[" a , b "]).unwrap(), ["a", "b"]);
    assert_eq!(n(&["a", "b,c"]).unwrap(), ["a", "b", "c"]);
    assert_eq!(n(&["\"a,b\",c"]).unwrap(), ["a,b", "c"]);
    assert_eq!(n(&["c, \"a,b\" "]).unwrap(), ["c", "a,b"]);
    assert_eq!(n(&["\"say \"\"hi\"\"\""]).unwrap(), ["say \"hi\""]);
    assert_eq!(n(&["\" padded \""]).unwrap(), [" padded "]);
    assert_eq!(n(&["x\"y"]).unwrap(), ["x\"y"]);
    assert_eq!(n(&["a,"]).unwrap(), ["a", ""]);
    for bad in ["\"a,b", "\"a\"b,c", "\"a\"\""] {
        let e = n(&[bad]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{bad}");
        assert!(e.to_string().contains("--columns"), "{e}");
    }
}

/// `--row-id a,b` (a composite key) and a column whose name has a comma,
/// from the command line to the decrypted file.
#[test]
fn composite_row_id_and_quoted_names_from_the_command_line() {
    let b = MemoryBackend::new();
    b.add_version("pii");
    let d = tempfile::tempdir().unwrap();
    let p = |x: &std::path::Path| x.to_str().unwrap().to_string();
    let input = d.path().join("t.csv");
    let plain = "\"tenant,id\",cust,\"ssn,full\",note\nt1,c1,111,x\nt1,c2,222,y\n";
    std::fs::write(&input, plain).unwrap();
    let enc = d.path().join("t.enc.csv");
    let dec = d.path().join("t.dec.csv");
    let rid = "\"tenant,id\",cust";
    run(
        &b,
        &[
            "encrypt",
            "-c",
            "\"ssn,full\"",
            "-c",
            "note",
            "--row-id",
            rid,
            "-i",
            &p(&input),
            "-o",
            &p(&enc),
        ],
    )
    .unwrap();
    let text = std::fs::read_to_string(&enc).unwrap();
    assert_eq!(text.matches("hsc2.").count(), 4, "{text}");
    // The same columns in the other order: another binding.
    let e = run(
        &b,
        &[
            "decrypt",
            "-c",
            "\"ssn,full\",note",
            "--row-id",
            "cust,\"tenant,id\"",
            "-i",
            &p(&enc),
            "-o",
            &p(&dec),
        ],
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Integrity, "{e}");
    run(
        &b,
        &[
            "decrypt",
            "-c",
            "\"ssn,full\",note",
            "--row-id",
            rid,
            "-i",
            &p(&enc),
            "-o",
            &p(&dec),
        ],
    )
    .unwrap();
    assert_eq!(std::fs::read_to_string(&dec).unwrap(), plain);
    // Unquoted, the comma splits the name: not in the header.
    let e = run(
        &b,
        &[
            "encrypt",
            "-c",
            "ssn,full",
            "-i",
            &p(&input),
            "-o",
            &p(&enc),
            "--force",
        ],
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
}
