//! Column dumps never come out silently wrong (issue 9), against the
//! in-memory key backend: a token read as another dump format than the one
//! it was made from, a value that already is a token given to encrypt, a
//! value that decrypts to a token, a plaintext where a token is expected,
//! the abort marker of a failed run upstream, and a dangling backslash in a
//! COPY dump are all refused, naming row and column; each one's escape
//! hatch is explicit and counted.

use hsmseal::backend::{KeyRef, MemoryBackend};
use hsmseal::columns::token::{binding, binding_prefix, ColumnId, Sealer, FLAG_JSON};
use hsmseal::columns::{self, abort, ColumnOptions, ColumnStats, Format};
use hsmseal::error::{ErrorKind, Result};
use std::io::Cursor;

fn backend() -> (MemoryBackend, KeyRef) {
    let b = MemoryBackend::new();
    let version = b.add_version("pii");
    (
        b,
        KeyRef {
            name: "pii".into(),
            version,
        },
    )
}

fn opts(format: Format, cols: &[&str]) -> ColumnOptions {
    ColumnOptions {
        format,
        columns: cols.iter().map(|s| s.to_string()).collect(),
        jobs: 2,
        ..ColumnOptions::default()
    }
}

fn enc(
    b: &MemoryBackend,
    k: &KeyRef,
    o: &ColumnOptions,
    input: &[u8],
) -> Result<(Vec<u8>, ColumnStats)> {
    let mut out = Vec::new();
    let s = columns::encrypt(b, k, o, Cursor::new(input.to_vec()), &mut out)?;
    Ok((out, s))
}

fn dec(b: &MemoryBackend, o: &ColumnOptions, input: &[u8]) -> Result<(Vec<u8>, ColumnStats)> {
    let mut out = Vec::new();
    let s = columns::decrypt(b, o, Cursor::new(input.to_vec()), &mut out)?;
    Ok((out, s))
}

fn fails(r: Result<(Vec<u8>, ColumnStats)>) -> (ErrorKind, String) {
    let e = r.unwrap_err();
    (e.kind(), e.message().to_string())
}

const FORMATS: [Format; 4] = [Format::Csv, Format::Tsv, Format::PgCopy, Format::Jsonl];

/// A one-row dump `id`, `v` in format `f` holding `v` as written.
fn dump(f: Format, v_raw: &str) -> Vec<u8> {
    match f {
        Format::Csv => format!("id,v\n7,{v_raw}\n"),
        Format::Tsv | Format::PgCopy => format!("id\tv\n7\t{v_raw}\n"),
        Format::Jsonl => format!("{{\"id\":7,\"v\":{v_raw}}}\n"),
        Format::Parquet => unreachable!("not a text dump (tests/columns_parquet.rs)"),
    }
    .into_bytes()
}

/// A value with characters every format escapes differently.
const TRICKY: &str = "line1\nline2\t\"q\" back\\slash, end";

/// `TRICKY` written by each format's writer.
fn tricky_raw(f: Format) -> String {
    match f {
        Format::Csv | Format::Tsv => format!("\"{}\"", TRICKY.replace('"', "\"\"")),
        Format::PgCopy => TRICKY
            .replace('\\', "\\\\")
            .replace('\n', "\\n")
            .replace('\t', "\\t"),
        Format::Jsonl => serde_json::to_string(TRICKY).unwrap(),
        Format::Parquet => unreachable!("not a text dump"),
    }
}

/// The token in the `v` field of a one-row dump.
fn token_of(f: Format, encd: &[u8]) -> String {
    let text = String::from_utf8(encd.to_vec()).unwrap();
    let line = text
        .lines()
        .nth(if f == Format::Jsonl { 0 } else { 1 })
        .unwrap();
    let at = line.find("hsc2.").unwrap();
    line[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .collect()
}

/// Tokens made from each format and read as each other one: refused unless
/// `--token-format` names the format they were made from; then the value
/// comes out written the way the reading format writes it, never with the
/// first format's escaping.
#[test]
fn a_token_read_as_another_format_is_refused_unless_named() {
    let (b, k) = backend();
    for made in FORMATS {
        let o = opts(made, &["v"]);
        let (encd, _) = enc(&b, &k, &o, &dump(made, &tricky_raw(made))).unwrap();
        let tok = token_of(made, &encd);
        for read in FORMATS {
            let quoted_tok = if read == Format::Jsonl {
                format!("\"{tok}\"")
            } else {
                tok.clone()
            };
            let input = dump(read, &quoted_tok);
            let o = opts(read, &["v"]);
            if read == made {
                let (out, _) = dec(&b, &o, &input).unwrap();
                assert_eq!(out, dump(read, &tricky_raw(read)), "{made:?}");
                continue;
            }
            let (kind, m) = fails(dec(&b, &o, &input));
            assert_eq!(kind, ErrorKind::Format, "{made:?} read as {read:?}: {m}");
            assert!(
                m.starts_with(&format!(
                    "row {}, column \"v\": the token was made from a {} dump but this dump is read as {}",
                    if read == Format::Jsonl { 1 } else { 2 },
                    made.name(),
                    read.name()
                )),
                "{m}"
            );
            assert!(
                m.contains(&format!("--token-format {}", made.name())),
                "{m}"
            );
            // Naming another format is not enough.
            let mut wrong = o.clone();
            wrong.token_formats = FORMATS
                .iter()
                .copied()
                .filter(|f| *f != made && *f != read)
                .collect();
            assert_eq!(fails(dec(&b, &wrong, &input)).0, ErrorKind::Format);
            // Named: the value, escaped for the reading format.
            let mut ok = o.clone();
            ok.token_formats = vec![made];
            let (out, s) = dec(&b, &ok, &input).unwrap();
            let want = if read == Format::Jsonl {
                dump(read, &tricky_raw(read))
            } else if matches!(read, Format::Csv | Format::Tsv)
                && matches!(made, Format::Csv | Format::Tsv)
            {
                // Quoted in the input: quoted again (the QUOTED flag).
                dump(read, &tricky_raw(read))
            } else {
                let mut v = Vec::new();
                match read {
                    Format::PgCopy => columns::pgcopy::encode(TRICKY.as_bytes(), &mut v),
                    f => columns::csv::write_field(
                        &mut v,
                        TRICKY.as_bytes(),
                        false,
                        if f == Format::Csv { b',' } else { b'\t' },
                        true,
                    ),
                }
                dump(read, &String::from_utf8(v).unwrap())
            };
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&want),
                "{made:?} read as {read:?}"
            );
            assert_eq!(s.cells, 1);
        }
    }
}

/// The report's case: a COPY text dump encrypted as TSV, decrypted as
/// pgcopy, came back double-escaped with exit 0.
#[test]
fn tsv_tokens_decrypted_as_pgcopy_are_not_double_escaped() {
    let (b, k) = backend();
    let mut o = opts(Format::Tsv, &["2"]);
    o.header = false;
    let (encd, _) = enc(&b, &k, &o, b"1\tline1\\nline2\n").unwrap();
    let mut o2 = o.clone();
    o2.format = Format::PgCopy;
    let (kind, m) = fails(dec(&b, &o2, &encd));
    assert_eq!(kind, ErrorKind::Format);
    assert!(m.contains("made from a tsv dump"), "{m}");
    assert_eq!(dec(&b, &o, &encd).unwrap().0, b"1\tline1\\nline2\n");
}

/// Seals `value` with `flags` as a token for column `v` (context "", no row
/// id), the way a run before format binding (flags without format bits)
/// or a hand-made one would.
fn seal(b: &MemoryBackend, k: &KeyRef, flags: u8, value: &[u8]) -> String {
    let mut s = Sealer::new(b, k, 10).unwrap();
    let mut aad = Vec::new();
    binding(
        &mut aad,
        &binding_prefix("", &ColumnId::Name("v".into())),
        None,
    );
    let mut out = Vec::new();
    s.seal(&aad, flags, value, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// Tokens made before formats were bound record none: they decrypt in any
/// format, as they always did. A format code no version assigns is refused.
#[test]
fn tokens_without_a_format_decrypt_in_any_format_and_unknown_codes_fail() {
    let (b, k) = backend();
    let legacy = seal(&b, &k, 0, b"a\tb");
    for f in FORMATS {
        let t = if f == Format::Jsonl {
            format!("\"{legacy}\"")
        } else {
            legacy.clone()
        };
        let (out, _) = dec(&b, &opts(f, &["v"]), &dump(f, &t)).unwrap();
        let want = match f {
            Format::Csv => "a\tb",
            Format::Tsv => "\"a\tb\"",
            Format::PgCopy => "a\\tb",
            Format::Jsonl => "\"a\\tb\"",
            Format::Parquet => unreachable!("not a text dump"),
        };
        assert_eq!(out, dump(f, want), "{f:?}");
    }
    // Code 5 is parquet now (refused in a CSV dump as another format);
    // 6 and 7 stay unknown.
    for code in 6u8..8 {
        let t = seal(&b, &k, code << 2, b"x");
        let (kind, m) = fails(dec(&b, &opts(Format::Csv, &["v"]), &dump(Format::Csv, &t)));
        assert_eq!(
            (kind, m.as_str()),
            (
                ErrorKind::Format,
                "row 2, column \"v\": token has unknown flags"
            )
        );
    }
}

/// A JSONL string kept as JSON text (non-canonical escapes) is written as
/// its characters into a table format, never as JSON escapes.
#[test]
fn json_strings_moved_into_a_table_format_are_unescaped() {
    let (b, k) = backend();
    let o = opts(Format::Jsonl, &["v"]);
    let (encd, _) = enc(&b, &k, &o, b"{\"v\":\"caf\\u00e9\",\"n\":1}\n").unwrap();
    let tok = token_of(Format::Jsonl, &encd);
    let mut o2 = opts(Format::Csv, &["v"]);
    o2.token_formats = vec![Format::Jsonl];
    let (out, _) = dec(&b, &o2, &dump(Format::Csv, &tok)).unwrap();
    assert_eq!(out, "id,v\n7,café\n".as_bytes());
    // A number stays its JSON text.
    let t = seal(&b, &k, FLAG_JSON, b"12.50");
    let (out, _) = dec(&b, &opts(Format::PgCopy, &["v"]), &dump(Format::PgCopy, &t)).unwrap();
    assert_eq!(out, b"id\tv\n7\t12.50\n");
}

/// A half-migrated dump: some values already are tokens. Encrypt refuses it
/// (naming row and column) instead of encrypting them twice; with
/// --skip-tokens they pass through byte for byte and are counted.
#[test]
fn encrypt_refuses_values_that_already_are_tokens() {
    let (b, k) = backend();
    for f in FORMATS {
        let o = opts(f, &["v"]);
        let rows: Vec<String> = (0..40).map(|i| format!("value {i}")).collect();
        let raw = |v: &str| {
            if f == Format::Jsonl {
                format!("\"{v}\"")
            } else {
                v.to_string()
            }
        };
        let mk = |vals: &[String]| -> Vec<u8> {
            let mut d = Vec::new();
            for (i, v) in vals.iter().enumerate() {
                match f {
                    Format::Csv => {
                        if i == 0 {
                            d.extend_from_slice(b"id,v\n");
                        }
                        d.extend_from_slice(format!("{i},{}\n", raw(v)).as_bytes());
                    }
                    Format::Tsv | Format::PgCopy => {
                        if i == 0 {
                            d.extend_from_slice(b"id\tv\n");
                        }
                        d.extend_from_slice(format!("{i}\t{}\n", raw(v)).as_bytes());
                    }
                    Format::Jsonl => {
                        d.extend_from_slice(format!("{{\"id\":{i},\"v\":{}}}\n", raw(v)).as_bytes())
                    }
                    Format::Parquet => unreachable!("not a text dump"),
                }
            }
            d
        };
        let plain = mk(&rows);
        let (full, _) = enc(&b, &k, &o, &plain).unwrap();
        // Rows 0..25 encrypted (a run stopped there), the rest plaintext.
        let text = String::from_utf8(full.clone()).unwrap();
        let plain_text = String::from_utf8(plain.clone()).unwrap();
        let skip = usize::from(f != Format::Jsonl);
        let half: String = text
            .lines()
            .take(25 + skip)
            .chain(plain_text.lines().skip(25 + skip))
            .map(|l| format!("{l}\n"))
            .collect();
        let (kind, m) = fails(enc(&b, &k, &o, half.as_bytes()));
        assert_eq!(kind, ErrorKind::Format, "{f:?}");
        assert!(
            m.starts_with(&format!(
                "row {}, column \"v\": the value already is an hsmseal token",
                1 + skip
            )),
            "{f:?}: {m}"
        );
        assert!(m.contains("--skip-tokens"), "{m}");
        let mut o2 = o.clone();
        o2.skip_tokens = true;
        let (out, s) = enc(&b, &k, &o2, half.as_bytes()).unwrap();
        assert_eq!((s.tokens_skipped, s.cells), (25, 15), "{f:?}");
        let out_text = String::from_utf8(out.clone()).unwrap();
        for (a, b) in out_text.lines().zip(half.lines()).take(25 + skip) {
            assert_eq!(a, b, "{f:?}: a token was changed");
        }
        // One decrypt gives the whole table back, no token left.
        let (back, s) = dec(&b, &o, &out).unwrap();
        assert_eq!(back, plain, "{f:?}");
        assert_eq!((s.cells, s.nested), (40, 0));
    }
    // Plaintexts that merely start like a token are encrypted.
    let o = opts(Format::Csv, &["v"]);
    for v in [
        "hsc1.example.com",
        "hsc1.AAAA",
        "hsc1.",
        "hsc2.example.com",
        "hsc2.AAAA",
        "hsc2.",
    ] {
        let input = format!("id,v\n1,{v}\n");
        let (encd, s) = enc(&b, &k, &o, input.as_bytes()).unwrap();
        assert_eq!(s.cells, 1, "{v}");
        assert_eq!(dec(&b, &o, &encd).unwrap().0, input.as_bytes());
    }
}

/// A cell encrypted twice (a run before encrypt refused tokens) decrypts to
/// a token: an error, not a `hsc1…` string with exit 0; --nested opens
/// every layer and counts the cells.
#[test]
fn a_value_that_decrypts_to_a_token_is_refused_unless_nested() {
    let (b, k) = backend();
    let inner = seal(&b, &k, 0, b"secret");
    let outer = seal(&b, &k, 0, inner.as_bytes());
    let triple = seal(&b, &k, 0, outer.as_bytes());
    let o = opts(Format::Csv, &["v"]);
    for t in [&outer, &triple] {
        let (kind, m) = fails(dec(&b, &o, &dump(Format::Csv, t)));
        assert_eq!(kind, ErrorKind::Format);
        assert!(
            m.starts_with("row 2, column \"v\": the value decrypts to another hsmseal token"),
            "{m}"
        );
        assert!(m.contains("--nested"), "{m}");
    }
    let mut n = o.clone();
    n.nested = true;
    let (out, s) = dec(&b, &n, &dump(Format::Csv, &triple)).unwrap();
    assert_eq!(
        (out, s.nested, s.cells),
        (dump(Format::Csv, "secret"), 2, 1)
    );
    // An inner layer bound elsewhere (another column) still fails.
    let mut s2 = Sealer::new(&b, &k, 10).unwrap();
    let mut aad = Vec::new();
    binding(
        &mut aad,
        &binding_prefix("", &ColumnId::Name("other".into())),
        None,
    );
    let mut elsewhere = Vec::new();
    s2.seal(&aad, 0, b"x", &mut elsewhere).unwrap();
    let outer2 = seal(&b, &k, 0, &elsewhere);
    let (kind, m) = fails(dec(&b, &n, &dump(Format::Csv, &outer2)));
    assert_eq!(kind, ErrorKind::Integrity);
    assert!(m.contains("inner token (layer 2)"), "{m}");
}

/// Decrypt meets a selected value that is not a token: an error naming row
/// and column; with --allow-plaintext it is copied and counted. A damaged
/// token (it has the prefix) is never taken for a plaintext.
#[test]
fn a_plaintext_cell_on_decrypt_is_an_error_or_counted() {
    let (b, k) = backend();
    let o = opts(Format::Csv, &["v"]);
    let input = b"id,v\n1,hello\n2,\n";
    let (kind, m) = fails(dec(&b, &o, input));
    assert_eq!(kind, ErrorKind::Format);
    assert!(
        m.starts_with("row 2, column \"v\": expected an hsmseal token but found a plaintext"),
        "{m}"
    );
    let mut ap = o.clone();
    ap.allow_plaintext = true;
    let (out, s) = dec(&b, &ap, input).unwrap();
    assert_eq!((out.as_slice(), s.plaintext, s.cells), (&input[..], 1, 0));
    let mut tok = seal(&b, &k, 0, b"secret");
    tok.truncate(tok.len() - 3);
    for opts in [&o, &ap] {
        assert!(dec(&b, opts, &dump(Format::Csv, &tok)).is_err());
    }
}

/// The abort marker of a failed run upstream is refused wherever it
/// appears: as the first line (taken for the header), after data, or its
/// second line alone; in every format. Encrypting it into a token would
/// hide the failure from the final loader.
#[test]
fn input_holding_the_abort_marker_is_refused() {
    let (b, k) = backend();
    for f in FORMATS {
        let head = dump(f, "1");
        let mut cases = vec![(abort::MARKER.to_vec(), 1u64)];
        let mut after = head.clone();
        after.extend_from_slice(abort::MARKER);
        cases.push((after, if f == Format::Jsonl { 2 } else { 3 }));
        let mut second = head.clone();
        second.extend_from_slice(&abort::MARKER[abort::LINE.len() + 1..]);
        cases.push((second, if f == Format::Jsonl { 2 } else { 3 }));
        for (input, row) in cases {
            let mut o = opts(f, &["v"]);
            o.skip_tokens = true;
            o.allow_plaintext = true;
            for r in [enc(&b, &k, &o, &input), dec(&b, &o, &input)] {
                let (kind, m) = fails(r);
                assert_eq!(kind, ErrorKind::Format, "{f:?}: {m}");
                assert!(
                    m.starts_with(&format!(
                        "row {row}: this input ends with the marker \"hsmseal: aborted\""
                    )),
                    "{f:?}: {m}"
                );
            }
        }
    }
    // Same with --no-header: the marker is never data.
    let mut o = opts(Format::PgCopy, &["1"]);
    o.header = false;
    let (_, m) = fails(enc(&b, &k, &o, abort::MARKER));
    assert!(
        m.starts_with("row 1: this input ends with the marker"),
        "{m}"
    );
}

/// A backslash that is the last byte of a COPY dump escapes nothing: a
/// format error naming the row, not a value written back as `\\`.
#[test]
fn a_dangling_backslash_in_pgcopy_is_an_error() {
    let (b, k) = backend();
    let o = opts(Format::PgCopy, &["v"]);
    let mut ap = o.clone();
    ap.allow_plaintext = true;
    for input in [
        &b"id\tv\n1\tabc\\"[..],
        b"id\tv\n1\tok\n2\tabc\\",
        b"id\tv\n1\tok\n2\\",
    ] {
        let rows = input.iter().filter(|&&c| c == b'\n').count() + 1;
        for r in [enc(&b, &k, &o, input), dec(&b, &ap, input)] {
            let (kind, m) = fails(r);
            assert_eq!(kind, ErrorKind::Format);
            assert!(m.starts_with(&format!("row {rows}: field ")), "{m}");
            assert!(
                m.contains("a backslash at the end of the input escapes nothing"),
                "{m}"
            );
        }
    }
    // Escaping the final LF, or a backslash, is data.
    let (encd, _) = enc(&b, &k, &o, b"id\tv\n1\ta\\\\\n2\tb\\\n").unwrap();
    assert_eq!(dec(&b, &o, &encd).unwrap().0, b"id\tv\n1\ta\\\\\n2\tb\\n");
}
