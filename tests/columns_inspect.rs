//! `columns inspect` (issue 11 item 5): per column of a dump, NULLs, clear
//! values, tokens per key name, key version and token format (hsc1/hsc2),
//! and malformed token-looking values, from token headers alone. The
//! counting against the in-memory backend's tokens in every format; the
//! command run with no HSM configured at all (it must not need one): its
//! JSON shape, its exit codes.

use hsmseal::backend::{KeyRef, MemoryBackend};
use hsmseal::columns::inspect::ColumnCounts;
use hsmseal::columns::token::{ColumnId, Sealer};
use hsmseal::columns::{self, ColumnOptions, Format};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::process::Command;

/// A cell of the test dump.
enum V {
    Null,
    Text(String),
}

/// Column `a`: a v1 token (key `old`, made without a KDK), v2 tokens
/// under `pii` v1 and v2, NULL, '', a clear value and a corrupted token;
/// column `b` all clear. Returns the rows and what `a` must count.
fn cells(corrupt: bool) -> (Vec<(u32, V, String)>, ColumnCounts) {
    let be = MemoryBackend::new();
    let old = KeyRef {
        name: "old".into(),
        version: be.add_version_without_kdk("old"),
    };
    let pii1 = KeyRef {
        name: "pii".into(),
        version: be.add_version("pii"),
    };
    let pii2 = KeyRef {
        name: "pii".into(),
        version: be.add_version("pii"),
    };
    let tok = |k: &KeyRef| {
        let mut s = Sealer::new(&be, k, 16).unwrap();
        let mut out = Vec::new();
        s.seal(b"any binding", 0, b"123-45-6789", &mut out).unwrap();
        String::from_utf8(out).unwrap()
    };
    let v1 = tok(&old);
    assert!(v1.starts_with("hsc1."), "a version without a KDK writes v1");
    let a = tok(&pii1);
    assert!(a.starts_with("hsc2."));
    let mut rows = vec![
        (1, V::Text(v1), "x".to_string()),
        (2, V::Text(a.clone()), "y".into()),
        (3, V::Text(tok(&pii2)), "".into()),
        (4, V::Null, "z".into()),
        (5, V::Text(String::new()), "z".into()),
        (6, V::Text("hello, world".into()), "z".into()),
        (7, V::Text(a), "z".into()),
    ];
    let mut want = ColumnCounts {
        rows: 7,
        nulls: 1,
        clear: 2,
        malformed: 0,
        keys: BTreeMap::from([
            (("old".to_string(), old.version, 1), 1),
            (("pii".to_string(), pii1.version, 2), 2),
            (("pii".to_string(), pii2.version, 2), 1),
        ]),
    };
    if corrupt {
        // The prefix, then a header that cannot be base64url.
        rows.push((8, V::Text("hsc2.!!not-base64!!".into()), "z".into()));
        want.rows += 1;
        want.malformed += 1;
    }
    (rows, want)
}

fn render(fmt: Format, rows: &[(u32, V, String)]) -> Vec<u8> {
    let mut s = match fmt {
        Format::Csv => "id,a,b\n".to_string(),
        Format::PgCopy => "id\ta\tb\n".to_string(),
        _ => String::new(),
    };
    for (id, a, b) in rows {
        let line = match (fmt, a) {
            (Format::Csv, V::Null) => format!("{id},,{b}"),
            (Format::Csv, V::Text(t)) => format!("{id},\"{t}\",{b}"),
            (Format::PgCopy, V::Null) => format!("{id}\t\\N\t{b}"),
            (Format::PgCopy, V::Text(t)) => format!("{id}\t{t}\t{b}"),
            (_, V::Null) => format!(r#"{{"id":{id},"a":null,"b":"{b}"}}"#),
            (_, V::Text(t)) => format!(r#"{{"id":{id},"a":"{t}","b":"{b}"}}"#),
        };
        s.push_str(&line);
        s.push('\n');
    }
    s.into_bytes()
}

fn opts(fmt: Format) -> ColumnOptions {
    ColumnOptions {
        format: fmt,
        columns: vec!["b".into(), "a".into()],
        ..ColumnOptions::default()
    }
}

#[test]
fn counts_clear_v1_v2_null_empty_and_corrupted_in_every_format() {
    let (rows, want) = cells(true);
    for fmt in [Format::Csv, Format::PgCopy, Format::Jsonl] {
        let dump = render(fmt, &rows);
        let stats = columns::inspect(&opts(fmt), Cursor::new(dump)).unwrap();
        let got: BTreeMap<String, ColumnCounts> = stats
            .inspect
            .iter()
            .map(|(id, c)| {
                let ColumnId::Name(n) = id else {
                    panic!("named columns")
                };
                (n.clone(), c.clone())
            })
            .collect();
        assert_eq!(got.len(), 2, "{fmt:?}: both columns listed");
        assert_eq!(got["a"], want, "{fmt:?}: column a");
        let b = &got["b"];
        // CSV reads an unquoted empty field as NULL (row 3's b).
        let b_nulls = u64::from(fmt == Format::Csv);
        assert_eq!(
            (b.rows, b.nulls, b.clear, b.tokens(), b.malformed),
            (8, b_nulls, 8 - b_nulls, 0, 0),
            "{fmt:?}: column b"
        );
    }
}

#[test]
fn an_empty_dump_lists_its_columns_with_zero_counts() {
    let stats = columns::inspect(&opts(Format::Csv), Cursor::new(b"id,a,b\n".to_vec())).unwrap();
    assert_eq!(stats.inspect.len(), 2);
    assert!(stats
        .inspect
        .iter()
        .all(|(_, c)| *c == ColumnCounts::default()));
}

/// Runs the binary with an empty environment: no configuration, no
/// PKCS#11 module, no token, no PIN. Returns (exit code, stdout, stderr).
fn run(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hsmseal"))
        .env_clear()
        .env("HOME", dir)
        .env("PATH", "/usr/bin:/bin")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn the_command_needs_no_hsm_prints_the_pg_status_shape_and_exits_per_readme() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, want) = cells(true);
    std::fs::write(dir.path().join("bad.copy"), render(Format::PgCopy, &rows)).unwrap();
    let (good_rows, _) = cells(false);
    std::fs::write(
        dir.path().join("good.copy"),
        render(Format::PgCopy, &good_rows),
    )
    .unwrap();

    // JSON: one `column` line per column, the fields of `pg status`.
    let (code, out, err) = run(
        dir.path(),
        &["--json", "columns", "inspect", "-c", "a", "good.copy"],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["type"] == "column")
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    let j = &lines[0];
    assert_eq!(j["column"], "a");
    assert_eq!(j["input"], "good.copy");
    assert_eq!(
        (
            &j["rows"],
            &j["nulls"],
            &j["clear"],
            &j["tokens"],
            &j["malformed"]
        ),
        (
            &serde_json::json!(7),
            &serde_json::json!(1),
            &serde_json::json!(2),
            &serde_json::json!(4),
            &serde_json::json!(0)
        )
    );
    let keys: Vec<(String, u64, u64, u64)> = j["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap().to_string(),
                k["version"].as_u64().unwrap(),
                k["token_version"].as_u64().unwrap(),
                k["tokens"].as_u64().unwrap(),
            )
        })
        .collect();
    let want_keys: Vec<(String, u64, u64, u64)> = want
        .keys
        .iter()
        .map(|((n, v, f), c)| (n.clone(), u64::from(*v), u64::from(*f), *c))
        .collect();
    assert_eq!(keys, want_keys);

    // A malformed token is counted and said; exit 1 (README: the rest was done).
    let (code, out, err) = run(dir.path(), &["columns", "inspect", "-c", "a,b", "bad.copy"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("bad.copy: column \"a\": 8 rows, 1 NULL, 2 clear, 4 tokens [old v1 (token v1): 1, pii v1 (token v2): 2, pii v2 (token v2): 1], 1 malformed"),
        "{out}"
    );
    assert!(
        out.contains("column \"b\": 8 rows, 0 NULL, 8 clear, 0 tokens"),
        "{out}"
    );
    assert!(err.contains("1 token-looking values do not parse"), "{err}");

    // Not valid in its format: exit 8 naming the row; a missing column: 2.
    std::fs::write(dir.path().join("broken.csv"), "a,b\n\"open,1\n").unwrap();
    let (code, _, err) = run(dir.path(), &["columns", "inspect", "-c", "a", "broken.csv"]);
    assert_eq!(code, 8, "{err}");
    assert!(err.contains("broken.csv") && err.contains("row"), "{err}");
    let (code, _, err) = run(
        dir.path(),
        &["columns", "inspect", "-c", "nope", "good.copy"],
    );
    assert_eq!(code, 2, "{err}");
    // stdin needs --format, as for the other columns commands.
    let (code, _, err) = run(dir.path(), &["columns", "inspect", "-c", "a"]);
    assert_eq!(code, 2, "{err}");
}
