//! Property test: random tables (random bytes including quotes, delimiters,
//! CR, LF, backslashes, invalid UTF-8 and NULLs) written as CSV, TSV,
//! pgcopy and JSONL round-trip byte for byte through encrypt and decrypt.

use hsmseal::backend::{KeyRef, MemoryBackend};
use hsmseal::columns::{self, ColumnOptions, Format};
use proptest::prelude::*;
use std::io::Cursor;
use std::sync::OnceLock;

fn backend() -> &'static (MemoryBackend, KeyRef) {
    static B: OnceLock<(MemoryBackend, KeyRef)> = OnceLock::new();
    B.get_or_init(|| {
        let b = MemoryBackend::new();
        let version = b.add_version("pii");
        (
            b,
            KeyRef {
                name: "pii".into(),
                version,
            },
        )
    })
}

fn value() -> impl Strategy<Value = Option<Vec<u8>>> {
    let byte = prop_oneof![
        Just(b','),
        Just(b'"'),
        Just(b'\n'),
        Just(b'\r'),
        Just(b'\t'),
        Just(b'\\'),
        Just(b' '),
        b'a'..=b'z',
        any::<u8>(),
    ];
    prop::option::weighted(0.85, prop::collection::vec(byte, 0..10))
}

/// (column count, rows, selected columns, quote everything, CRLF, final newline)
type Table = (
    usize,
    Vec<Vec<Option<Vec<u8>>>>,
    Vec<usize>,
    bool,
    bool,
    bool,
);

fn table() -> impl Strategy<Value = Table> {
    (1usize..5).prop_flat_map(|ncols| {
        (
            Just(ncols),
            prop::collection::vec(prop::collection::vec(value(), ncols), 0..12),
            prop::sample::subsequence((0..ncols).collect::<Vec<_>>(), 1..=ncols),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
    })
}

/// Writes a field as a CSV writer would. A CR is written bare (as Python's
/// csv module with `lineterminator="\n"` and some spreadsheets do) except
/// where it would read back as part of the terminator: at the end of a
/// record's last field before a lone LF (`cr_ends_record`). So bare CRs
/// inside fields, at the end of a field before a delimiter, before CRLF and
/// at the end of the input (no final newline) are all covered.
fn csv_field(
    out: &mut Vec<u8>,
    v: &Option<Vec<u8>>,
    delim: u8,
    quote_all: bool,
    cr_ends_record: bool,
) {
    let Some(v) = v else { return };
    let needs = quote_all
        || v.is_empty()
        || v[0] == b'"'
        || v.iter().any(|&c| c == delim || c == b'"' || c == b'\n')
        || (cr_ends_record && v.last() == Some(&b'\r'));
    if !needs {
        out.extend_from_slice(v);
        return;
    }
    out.push(b'"');
    for &c in v {
        if c == b'"' {
            out.push(b'"');
        }
        out.push(c);
    }
    out.push(b'"');
}

fn write_csv(t: &Table, delim: u8) -> Vec<u8> {
    let (ncols, rows, _, quote_all, crlf, final_nl) = t;
    let nl: &[u8] = if *crlf { b"\r\n" } else { b"\n" };
    let mut out = Vec::new();
    let header: Vec<Option<Vec<u8>>> = (0..*ncols)
        .map(|i| Some(format!("c{i}").into_bytes()))
        .collect();
    let nrec = rows.len() + 1;
    for (i, r) in std::iter::once(&header).chain(rows.iter()).enumerate() {
        if i > 0 {
            out.extend_from_slice(nl);
        }
        // A lone LF follows this record.
        let lf_follows = !*crlf && (i + 1 < nrec || *final_nl);
        for (j, v) in r.iter().enumerate() {
            if j > 0 {
                out.push(delim);
            }
            csv_field(
                &mut out,
                v,
                delim,
                *quote_all,
                lf_follows && j + 1 == r.len(),
            );
        }
    }
    if *final_nl {
        out.extend_from_slice(nl);
    }
    out
}

fn write_pgcopy(t: &Table) -> Vec<u8> {
    let (ncols, rows, ..) = t;
    let mut out: Vec<u8> = (0..*ncols)
        .map(|i| format!("c{i}"))
        .collect::<Vec<_>>()
        .join("\t")
        .into_bytes();
    out.push(b'\n');
    for r in rows {
        for (j, v) in r.iter().enumerate() {
            if j > 0 {
                out.push(b'\t');
            }
            match v {
                None => out.extend_from_slice(b"\\N"),
                Some(v) => {
                    for &c in v {
                        match c {
                            b'\\' => out.extend_from_slice(b"\\\\"),
                            b'\n' => out.extend_from_slice(b"\\n"),
                            b'\r' => out.extend_from_slice(b"\\r"),
                            b'\t' => out.extend_from_slice(b"\\t"),
                            8 => out.extend_from_slice(b"\\b"),
                            11 => out.extend_from_slice(b"\\v"),
                            12 => out.extend_from_slice(b"\\f"),
                            c => out.push(c),
                        }
                    }
                }
            }
        }
        out.push(b'\n');
    }
    out
}

fn write_jsonl(t: &Table) -> Vec<u8> {
    let (_, rows, ..) = t;
    let mut out = Vec::new();
    for r in rows {
        let mut m = serde_json::Map::new();
        for (j, v) in r.iter().enumerate() {
            let val = match v {
                None => serde_json::Value::Null,
                // Alternate types so strings, numbers, arrays and objects occur.
                Some(v) => match v.len() % 4 {
                    0 => serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
                    1 => serde_json::json!(v.len() as f64 * 1.5 - 3.0),
                    2 => serde_json::json!([String::from_utf8_lossy(v), v.len(), true]),
                    _ => serde_json::json!({"k": String::from_utf8_lossy(v), "n": null}),
                },
            };
            m.insert(format!("c{j}"), val);
        }
        out.extend_from_slice(serde_json::to_string(&m).unwrap().as_bytes());
        out.push(b'\n');
    }
    out
}

fn check(format: Format, input: &[u8], cols: &[usize]) -> Result<(), TestCaseError> {
    let (b, k) = backend();
    let o = ColumnOptions {
        format,
        columns: cols.iter().map(|c| format!("c{c}")).collect(),
        context: "prop".into(),
        batch_size: 7,
        jobs: 2,
        ..ColumnOptions::default()
    };
    let mut enc = Vec::new();
    let r = columns::encrypt(b, k, &o, Cursor::new(input.to_vec()), &mut enc);
    if format == Format::Jsonl {
        // A key that occurs in no row (no rows at all is fine) is an error.
        if let Err(e) = &r {
            prop_assert!(e.message().contains("does not occur"), "{e}");
            return Ok(());
        }
    }
    r.map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut dec = Vec::new();
    columns::decrypt(b, &o, Cursor::new(enc), &mut dec)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(
        String::from_utf8_lossy(&dec),
        String::from_utf8_lossy(input)
    );
    prop_assert_eq!(dec, input);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn csv_round_trips(t in table()) {
        check(Format::Csv, &write_csv(&t, b','), &t.2)?;
    }

    #[test]
    fn tsv_round_trips(t in table()) {
        check(Format::Tsv, &write_csv(&t, b'\t'), &t.2)?;
    }

    #[test]
    fn pgcopy_round_trips(t in table()) {
        check(Format::PgCopy, &write_pgcopy(&t), &t.2)?;
    }

    #[test]
    fn jsonl_round_trips(t in table()) {
        check(Format::Jsonl, &write_jsonl(&t), &t.2)?;
    }
}

fn garbage() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        Just(b','),
        Just(b'"'),
        Just(b'\n'),
        Just(b'\r'),
        Just(b'\t'),
        Just(b'\\'),
        Just(b'{'),
        Just(b'}'),
        Just(b'['),
        Just(b':'),
        Just(b'N'),
        b'a'..=b'c',
        any::<u8>(),
    ];
    prop::collection::vec(byte, 0..200)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary input never panics: every outcome is output or an error.
    #[test]
    fn garbage_never_panics(input in garbage(), header in any::<bool>(), f in 0usize..4) {
        let (b, k) = backend();
        let format = [Format::Csv, Format::Tsv, Format::PgCopy, Format::Jsonl][f];
        let o = ColumnOptions {
            format,
            columns: if header || format == Format::Jsonl { vec!["a".into()] } else { vec!["2".into()] },
            header: header || format == Format::Jsonl,
            row_id: vec![],
            allow_plaintext: true,
            ..ColumnOptions::default()
        };
        let mut out = Vec::new();
        let _ = columns::encrypt(b, k, &o, Cursor::new(input.clone()), &mut out);
        let mut out = Vec::new();
        let _ = columns::decrypt(b, &o, Cursor::new(input), &mut out);
    }
}

/// Issue 11: an unquoted last field ending in CR at the end of the input
/// (no final newline) must come back bare, byte for byte, in CSV and TSV;
/// and the other places a bare CR can stand.
#[test]
fn a_bare_cr_comes_back_bare() {
    for input in [
        &b"c0\nx\r"[..],
        b"c0\n\r",
        b"c0,c1\n1,x\r",
        b"c0,c1\n1,x\r\n2,y\r",
        b"c0,c1\n1,x\r\r\n",
        b"c0,c1\nx\r,y\n",
        b"c0,c1\na\rb,y\n",
        b"c0,c1\n\"x\r\",y\r",
        b"c0,c1\nx,\"y\r\"\n",
    ] {
        for (f, d) in [(Format::Csv, b','), (Format::Tsv, b'\t')] {
            let input: Vec<u8> = input
                .iter()
                .map(|&c| if c == b',' { d } else { c })
                .collect();
            let ncols = if input.starts_with(b"c0\n") { 1 } else { 2 };
            let cols: Vec<usize> = (0..ncols).collect();
            check(f, &input, &cols)
                .unwrap_or_else(|e| panic!("{f:?} {:?}: {e}", String::from_utf8_lossy(&input)));
        }
    }
}
