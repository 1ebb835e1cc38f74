//! Composite row ids (`--row-id tenant_id,cust_id`, issue 11 item 3): the
//! binding's encoding (docs/FORMAT.md section 6), and that a token only
//! opens in the row whose every id part, in `--row-id` order, is the one it
//! was made in. Against the in-memory key backend (formats, not the HSM).

use hsmseal::backend::{KeyRef, MemoryBackend};
use hsmseal::columns::token::{binding, binding_encoded, binding_prefix, ColumnId};
use hsmseal::columns::{self, encode_row_id, ColumnOptions, Format};
use hsmseal::error::{Error, ErrorKind, Result};
use std::io::Cursor;

fn backend() -> (MemoryBackend, KeyRef) {
    let b = MemoryBackend::new();
    let version = b.add_version("pii");
    let k = KeyRef {
        name: "pii".into(),
        version,
    };
    (b, k)
}

fn opts(format: Format, cols: &[&str], rid: &[&str]) -> ColumnOptions {
    ColumnOptions {
        format,
        columns: cols.iter().map(|s| s.to_string()).collect(),
        row_id: rid.iter().map(|s| s.to_string()).collect(),
        context: "app.customers".into(),
        ..ColumnOptions::default()
    }
}

fn enc(b: &MemoryBackend, k: &KeyRef, o: &ColumnOptions, input: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    columns::encrypt(b, k, o, Cursor::new(input.to_vec()), &mut out)?;
    Ok(out)
}

fn dec(b: &MemoryBackend, o: &ColumnOptions, input: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    columns::decrypt(b, o, Cursor::new(input.to_vec()), &mut out)?;
    Ok(out)
}

fn lines(b: &[u8]) -> Vec<String> {
    String::from_utf8(b.to_vec())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn auth_failure(r: Result<Vec<u8>>, what: &str) -> Error {
    let e = r.expect_err(what);
    assert_eq!(e.kind(), ErrorKind::Integrity, "{what}: {e}");
    e
}

#[test]
fn encoding_is_the_specified_one_and_one_column_is_unchanged() {
    let mut out = Vec::new();
    encode_row_id(&mut out, &[]);
    assert_eq!(out, [0]);
    encode_row_id(&mut out, &[b"42"]);
    assert_eq!(out, [1, 0, 0, 0, 2, b'4', b'2']);
    encode_row_id(&mut out, &[b"t1", b""]);
    assert_eq!(out, [2, 2, 0, 0, 0, 2, b't', b'1', 0, 0, 0, 0]);
    // One column encodes exactly as version 1 did, so older tokens open.
    let pre = binding_prefix("ctx", &ColumnId::Name("ssn".into()));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    binding(&mut a, &pre, Some(b"42"));
    encode_row_id(&mut out, &[b"42"]);
    binding_encoded(&mut b, &pre, &out);
    assert_eq!(a, b);
    binding(&mut a, &pre, None);
    encode_row_id(&mut out, &[]);
    binding_encoded(&mut b, &pre, &out);
    assert_eq!(a, b);
    // Length prefixes keep ("ab","c") apart from ("a","bc"), and one
    // column "abc" apart from any split of it.
    let mut c = Vec::new();
    encode_row_id(&mut out, &[b"ab", b"c"]);
    encode_row_id(&mut c, &[b"a", b"bc"]);
    assert_ne!(out, c);
    encode_row_id(&mut c, &[b"abc"]);
    assert_ne!(out, c);
}

const CSV: &[u8] = b"tenant_id,cust_id,ssn,name\nt1,c1,111-11-1111,Ann\nt1,c2,222-22-2222,Bob\nt2,c1,333-33-3333,Cy\nab,c,444,D\na,bc,555,E\n";

#[test]
fn composite_row_id_round_trips_in_every_format() {
    let (b, k) = backend();
    let o = opts(Format::Csv, &["ssn", "name"], &["tenant_id", "cust_id"]);
    let e = enc(&b, &k, &o, CSV).unwrap();
    assert_eq!(
        e.windows(5).filter(|w| w == b"hsc2.").count(),
        10,
        "v2 tokens"
    );
    assert_eq!(dec(&b, &o, &e).unwrap(), CSV);

    let tsv = String::from_utf8(CSV.to_vec()).unwrap().replace(',', "\t");
    let o = opts(Format::Tsv, &["ssn"], &["tenant_id", "cust_id"]);
    let e = enc(&b, &k, &o, tsv.as_bytes()).unwrap();
    assert_eq!(dec(&b, &o, &e).unwrap(), tsv.as_bytes());

    let copy = b"t1\t7\tx\\ty\nt1\t8\t\\N\n";
    let o = opts(Format::PgCopy, &["3"], &["1", "2"]);
    let o = ColumnOptions { header: false, ..o };
    let e = enc(&b, &k, &o, copy).unwrap();
    assert_eq!(dec(&b, &o, &e).unwrap(), copy);

    let jl = b"{\"t\":\"t1\",\"c\":7,\"v\":\"x\"}\n{\"c\":8,\"v\":[1],\"t\":\"t1\"}\n";
    let o = opts(Format::Jsonl, &["v"], &["t", "c"]);
    let e = enc(&b, &k, &o, jl).unwrap();
    assert_eq!(dec(&b, &o, &e).unwrap(), jl);
}

/// Replaces the `ssn` token of row `to` (1-based data rows) by row
/// `from`'s.
fn move_token(encd: &[u8], from: usize, to: usize) -> Vec<u8> {
    let mut l = lines(encd);
    let tok = l[from].split(',').nth(2).unwrap().to_string();
    let mut f: Vec<String> = l[to].split(',').map(str::to_string).collect();
    f[2] = tok;
    l[to] = f.join(",");
    (l.join("\n") + "\n").into_bytes()
}

#[test]
fn a_token_only_opens_in_its_own_composite_row() {
    let (b, k) = backend();
    let o = opts(Format::Csv, &["ssn"], &["tenant_id", "cust_id"]);
    let e = enc(&b, &k, &o, CSV).unwrap();
    // First part equal, second differs: (t1,c1) -> (t1,c2).
    let err = auth_failure(dec(&b, &o, &move_token(&e, 1, 2)), "first part equal");
    let msg = err.to_string();
    assert!(msg.contains("row 3") && msg.contains("\"ssn\""), "{msg}");
    // Second part equal, first differs: (t1,c1) -> (t2,c1).
    auth_failure(dec(&b, &o, &move_token(&e, 1, 3)), "second part equal");
    // Concatenations equal: ("ab","c") -> ("a","bc").
    auth_failure(dec(&b, &o, &move_token(&e, 4, 5)), "same concatenation");
    // The two parts' values swapped in the row.
    let swapped = String::from_utf8(e.clone())
        .unwrap()
        .replacen("\nt1,c1,", "\nc1,t1,", 1);
    auth_failure(dec(&b, &o, swapped.as_bytes()), "parts swapped");
    // Order matters: the same columns named the other way round.
    let rev = opts(Format::Csv, &["ssn"], &["cust_id", "tenant_id"]);
    auth_failure(dec(&b, &rev, &e), "--row-id order reversed");
    // One part only, or none: not the same binding.
    auth_failure(
        dec(&b, &opts(Format::Csv, &["ssn"], &["tenant_id"]), &e),
        "one part",
    );
    auth_failure(dec(&b, &opts(Format::Csv, &["ssn"], &[]), &e), "no row id");
    // The right row still opens.
    assert_eq!(dec(&b, &o, &e).unwrap(), CSV);
}

#[test]
fn a_null_or_missing_part_names_row_and_column() {
    let (b, k) = backend();
    let o = ColumnOptions {
        header: false,
        ..opts(Format::PgCopy, &["3"], &["1", "2"])
    };
    let e = enc(&b, &k, &o, b"t1\t1\tx\nt1\t\\N\ty\n").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Format);
    let m = e.to_string();
    assert!(
        m.contains("row 2") && m.contains("column 2") && m.contains("NULL"),
        "{m}"
    );

    let o = opts(Format::Jsonl, &["v"], &["t", "c"]);
    let e = enc(
        &b,
        &k,
        &o,
        b"{\"t\":\"a\",\"c\":1,\"v\":\"x\"}\n{\"t\":\"a\",\"v\":\"y\"}\n",
    )
    .unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("row 2") && m.contains("\"c\"") && m.contains("missing"),
        "{m}"
    );
    let e = enc(&b, &k, &o, b"{\"t\":\"a\",\"c\":null,\"v\":\"x\"}\n").unwrap_err();
    assert!(e.to_string().contains("\"c\""), "{e}");
}

#[test]
fn bad_row_id_lists_are_usage_errors() {
    let (b, k) = backend();
    for (cols, rid, want) in [
        (&["ssn"][..], &["tenant_id", "tenant_id"][..], "twice"),
        (
            &["ssn"][..],
            &["tenant_id", "ssn"][..],
            "cannot also be encrypted",
        ),
        (&["ssn"][..], &["tenant_id", ""][..], "empty"),
        (
            &["ssn"][..],
            &["tenant_id", "nope"][..],
            "not in the header",
        ),
    ] {
        let e = enc(&b, &k, &opts(Format::Csv, cols, rid), CSV).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{rid:?}: {e}");
        assert!(e.to_string().contains(want), "{rid:?}: {e}");
    }
    // Positions that name the same field twice ("1" and "01").
    let o = ColumnOptions {
        header: false,
        ..opts(Format::Csv, &["3"], &["1", "01"])
    };
    let e = enc(&b, &k, &o, b"a,b,c\n").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    let many: Vec<String> = (0..256).map(|i| format!("c{i}")).collect();
    let o = ColumnOptions {
        row_id: many,
        ..opts(Format::Csv, &["ssn"], &[])
    };
    let e = enc(&b, &k, &o, CSV).unwrap_err();
    assert!(e.to_string().contains("at most 255"), "{e}");
}

/// Issue 11: tokens made from a headerless dump are bound to positions;
/// `@N` selects (and binds) by position with a header present, so the same
/// table exported with a header decrypts. The other way (tokens bound to
/// names, a headerless dump) needs the header put back; a position does not
/// open a name-bound token.
#[test]
fn position_binding_with_a_header_via_at() {
    let (b, k) = backend();
    let headerless = b"1,111\n2,222\n";
    let with_header = b"id,ssn\n1,111\n2,222\n";
    let pos = |cols: &[&str], rid: &[&str], header: bool| ColumnOptions {
        header,
        ..opts(Format::Csv, cols, rid)
    };
    let e = enc(&b, &k, &pos(&["2"], &["1"], false), headerless).unwrap();
    let mut e_h = b"id,ssn\n".to_vec();
    e_h.extend_from_slice(&e);
    // By name: bound to positions, so it fails.
    auth_failure(dec(&b, &pos(&["ssn"], &["id"], true), &e_h), "by name");
    // By position with the header present: opens.
    assert_eq!(
        dec(&b, &pos(&["@2"], &["@1"], true), &e_h).unwrap(),
        with_header
    );
    // Mixing: the row id by name, the column by position; the row id's
    // binding is its value, so either spelling works for it.
    assert_eq!(
        dec(&b, &pos(&["@2"], &["id"], true), &e_h).unwrap(),
        with_header
    );
    // `@2` under --no-header is the same as 2.
    assert_eq!(
        dec(&b, &pos(&["@2"], &["1"], false), &e).unwrap(),
        headerless
    );
    // Name-bound tokens do not open by position.
    let e2 = enc(&b, &k, &pos(&["ssn"], &["id"], true), with_header).unwrap();
    auth_failure(
        dec(&b, &pos(&["@2"], &["id"], true), &e2),
        "name-bound by @2",
    );
    // Bad positions.
    for (c, want) in [
        ("@0", "1-based"),
        ("@x", "1-based"),
        ("@3", "only 2 fields"),
    ] {
        let r = dec(&b, &pos(&[c], &[], true), &e_h);
        let err = r.expect_err(c);
        assert_eq!(err.kind(), ErrorKind::Usage, "{c}: {err}");
        assert!(err.to_string().contains(want), "{c}: {err}");
    }
    // The same field by name and by position.
    let err = dec(&b, &pos(&["ssn", "@2"], &[], true), &e_h).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
}
