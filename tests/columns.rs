//! Column dumps against the in-memory key backend: byte-exact round trips on
//! fixtures of every format, binding (row, column, context), tampering,
//! HSM call counts, and errors that name row and column.

use hsmseal::backend::{KeyBackend, KeyRef, MemoryBackend};
use hsmseal::columns::{self, ColumnOptions, ColumnStats, Format};
use hsmseal::error::{ErrorKind, Result};
use std::io::Cursor;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/columns");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIX}/{name}")).unwrap()
}

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

fn count_tokens(data: &[u8]) -> usize {
    data.windows(5)
        .filter(|w| w == b"hsc1." || w == b"hsc2.")
        .count()
}

/// Encrypts, checks the selected values became tokens and the rest is
/// untouched, decrypts, checks the bytes are the original ones.
fn round_trip(name: &str, o: &ColumnOptions, expect_cells: u64) {
    let (b, k) = backend();
    let input = fixture(name);
    let (encd, s) = enc(&b, &k, o, &input).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(s.cells, expect_cells, "{name}: cells encrypted");
    assert!(count_tokens(&encd) as u64 >= expect_cells, "{name}");
    assert_ne!(encd, input);
    let (decd, s2) = dec(&b, o, &encd).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(s2.cells, expect_cells);
    assert_eq!(
        String::from_utf8_lossy(&decd),
        String::from_utf8_lossy(&input),
        "{name}: round trip"
    );
    assert_eq!(decd, input, "{name}: round trip bytes");
    // Passthrough (no crypto) is the identity too.
    let mut out = Vec::new();
    columns::passthrough(o, Cursor::new(input.clone()), &mut out).unwrap();
    assert_eq!(out, input, "{name}: passthrough");
}

#[test]
fn csv_written_by_python_round_trips() {
    let o = opts(Format::Csv, &["name", "ssn", "note"]);
    round_trip("python.csv", &o, 15);
}

#[test]
fn csv_quote_all_round_trips() {
    // QUOTE_ALL quotes empty strings too: those are encrypted (not NULL).
    let o = opts(Format::Csv, &["name", "ssn", "note", "score"]);
    round_trip("quote_all.csv", &o, 24);
}

#[test]
fn csv_written_by_postgres_round_trips_with_nulls_left_alone() {
    let mut o = opts(Format::Csv, &["email", "ssn", "note"]);
    o.row_id = vec!["id".into()];
    o.context = "app.users".into();
    let (b, k) = backend();
    let input = fixture("postgres.csv");
    let (encd, s) = enc(&b, &k, &o, &input).unwrap();
    assert_eq!(s.nulls, 3);
    assert_eq!(s.cells, 12);
    assert_eq!(s.rows, 5);
    // NULL stays an unquoted empty field; "" was encrypted.
    let text = String::from_utf8(encd.clone()).unwrap();
    let row2: Vec<&str> = text.lines().nth(2).unwrap().split(',').collect();
    assert_eq!(row2[0], "2");
    assert_eq!(row2[2], "");
    assert!(row2[3].starts_with("hsc2."));
    assert_eq!(row2[4], "");
    round_trip("postgres.csv", &o, 12);
}

#[test]
fn csv_with_bom_mixed_terminators_and_no_final_newline_round_trips() {
    round_trip("bom_mixed.csv", &opts(Format::Csv, &["name", "ssn"]), 5);
    let (b, k) = backend();
    let (encd, _) = enc(
        &b,
        &k,
        &opts(Format::Csv, &["ssn"]),
        &fixture("bom_mixed.csv"),
    )
    .unwrap();
    assert!(encd.starts_with(b"\xEF\xBB\xBF\"id\",name,ssn\r\n1,\"a\"\"b\",hsc2."));
    assert!(!encd.ends_with(b"\n"));
}

#[test]
fn tsv_round_trips() {
    round_trip("python.tsv", &opts(Format::Tsv, &["email", "note"]), 10);
}

#[test]
fn pgcopy_round_trips() {
    let mut o = opts(Format::PgCopy, &["name", "email", "ssn", "note"]);
    o.row_id = vec!["id".into()];
    round_trip("postgres.pgcopy", &o, 21);
}

#[test]
fn pgcopy_without_header_binds_positions() {
    let input = fixture("postgres.pgcopy");
    let body = &input[input.iter().position(|&c| c == b'\n').unwrap() + 1..];
    let mut o = opts(Format::PgCopy, &["4", "2"]);
    o.header = false;
    let (b, k) = backend();
    let (encd, s) = enc(&b, &k, &o, body).unwrap();
    assert_eq!(s.cells, 11);
    assert_eq!(dec(&b, &o, &encd).unwrap().0, body);
    // Position 4 tokens do not open as position 3.
    let mut moved = o.clone();
    moved.columns = vec!["4".into(), "3".into()];
    assert!(dec(&b, &moved, &encd).is_err());
}

#[test]
fn pgcopy_normalises_non_canonical_escapes() {
    let (b, k) = backend();
    let mut o = opts(Format::PgCopy, &["v"]);
    o.row_id = vec![];
    let input = b"k\tv\n1\t\\x41\\102\\q\n2\tx\\\ty\n";
    let (encd, _) = enc(&b, &k, &o, input).unwrap();
    let (decd, _) = dec(&b, &o, &encd).unwrap();
    assert_eq!(decd, b"k\tv\n1\tABq\n2\tx\\ty\n");
}

#[test]
fn jsonl_round_trips_types_order_and_escapes() {
    round_trip(
        "data.jsonl",
        &opts(Format::Jsonl, &["name", "ssn", "tags", "score"]),
        23,
    );
    // Values come back with their JSON types.
    let (b, k) = backend();
    let o = opts(Format::Jsonl, &["ssn", "score"]);
    let (encd, _) = enc(&b, &k, &o, &fixture("data.jsonl")).unwrap();
    let first: serde_json::Value =
        serde_json::from_slice(encd.split(|&c| c == b'\n').next().unwrap()).unwrap();
    assert!(first["ssn"].as_str().unwrap().starts_with("hsc2."));
    assert!(first["score"].as_str().unwrap().starts_with("hsc2."));
    assert_eq!(first["id"], 1);
}

#[test]
fn jsonl_row_id_binds_rows() {
    let (b, k) = backend();
    let mut o = opts(Format::Jsonl, &["ssn"]);
    o.row_id = vec!["id".into()];
    let input = b"{\"id\":1,\"ssn\":\"a\"}\n{\"id\":\"2\",\"ssn\":\"b\"}\n";
    let (encd, _) = enc(&b, &k, &o, input).unwrap();
    assert_eq!(dec(&b, &o, &encd).unwrap().0, input);
    let text = String::from_utf8(encd).unwrap();
    let toks: Vec<&str> = text.split('"').filter(|s| s.starts_with("hsc2.")).collect();
    let swapped = text
        .replace(toks[0], "X")
        .replace(toks[1], toks[0])
        .replace('X', toks[1]);
    let e = dec(&b, &o, swapped.as_bytes()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Integrity);
    assert!(e.message().starts_with("row 1, column \"ssn\""), "{e}");
}

#[test]
fn jsonl_rejects_invalid_utf8_and_unknown_keys() {
    let (b, k) = backend();
    let o = opts(Format::Jsonl, &["ssn"]);
    let e = enc(&b, &k, &o, b"{\"ssn\":\"a\"}\n{\"ssn\":\"\xff\"}\n").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Format);
    assert!(e.message().starts_with("row 2: invalid UTF-8"), "{e}");
    let e = enc(
        &b,
        &k,
        &opts(Format::Jsonl, &["nope"]),
        b"{\"ssn\":\"a\"}\n",
    )
    .unwrap_err();
    assert!(e.message().contains("\"nope\" does not occur"), "{e}");
    let e = enc(&b, &k, &o, b"{\"ssn\":\"a\",\"ssn\":\"b\"}\n").unwrap_err();
    assert!(e.message().starts_with("row 1, column \"ssn\""), "{e}");
    let e = enc(&b, &k, &o, b"{\"ssn\":\"a\"}\n[1]\n").unwrap_err();
    assert!(e.message().starts_with("row 2: not a JSON object"), "{e}");
}

#[test]
fn csv_invalid_utf8_is_carried_as_bytes() {
    let (b, k) = backend();
    let o = opts(Format::Csv, &["b"]);
    let input = b"a,b\n\xff\xfe,\"\xc3\x28\"\n\x80,x\xff\n";
    let (encd, _) = enc(&b, &k, &o, input).unwrap();
    assert_eq!(dec(&b, &o, &encd).unwrap().0, input);
}

#[test]
fn token_text_is_safe_in_csv_and_spreadsheets() {
    let (b, k) = backend();
    let o = opts(Format::Csv, &["name", "email", "ssn", "note", "score"]);
    let (encd, _) = enc(&b, &k, &o, &fixture("python.csv")).unwrap();
    let text = String::from_utf8(encd).unwrap();
    for line in text.lines().skip(1) {
        for f in line.split(',').filter(|f| f.starts_with("hsc2.")) {
            assert!(f
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.'));
            assert!(!f.starts_with(['=', '+', '-', '@', ' ', '\t']));
        }
    }
}

#[test]
fn plaintext_that_looks_like_a_token_is_still_encrypted() {
    let (b, k) = backend();
    let o = opts(Format::Csv, &["v"]);
    let (encd, s) = enc(&b, &k, &o, b"v\nhsc1.AAAA\n").unwrap();
    assert_eq!(s.cells, 1);
    assert_ne!(encd, b"v\nhsc1.AAAA\n");
    assert_eq!(dec(&b, &o, &encd).unwrap().0, b"v\nhsc1.AAAA\n");
}

/// Tokens of a 3-row, 2-column CSV encrypted with a row id and context.
fn bound_dump(b: &MemoryBackend, k: &KeyRef) -> (ColumnOptions, Vec<Vec<String>>) {
    let mut o = opts(Format::Csv, &["ssn", "email"]);
    o.row_id = vec!["id".into()];
    o.context = "app.users".into();
    let input = b"id,ssn,email\n1,111,a@x\n2,222,b@x\n3,333,c@x\n";
    let (encd, _) = enc(b, k, &o, input).unwrap();
    let rows = String::from_utf8(encd)
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    (o, rows)
}

fn join(rows: &[Vec<String>]) -> Vec<u8> {
    rows.iter()
        .map(|r| r.join(",") + "\n")
        .collect::<String>()
        .into_bytes()
}

#[test]
fn tokens_swapped_between_rows_columns_or_contexts_are_rejected() {
    let (b, k) = backend();
    let (o, rows) = bound_dump(&b, &k);
    assert_eq!(
        dec(&b, &o, &join(&rows)).unwrap().0,
        b"id,ssn,email\n1,111,a@x\n2,222,b@x\n3,333,c@x\n"
    );
    // Between rows.
    let mut r = rows.clone();
    let t = r[1][1].clone();
    r[1][1] = r[2][1].clone();
    r[2][1] = t;
    let e = dec(&b, &o, &join(&r)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Integrity);
    assert!(
        e.message()
            .starts_with("row 2, column \"ssn\": token authentication failed"),
        "{e}"
    );
    // Between columns of one row.
    let mut r = rows.clone();
    let t = r[1][1].clone();
    r[1][1] = r[1][2].clone();
    r[1][2] = t;
    assert_eq!(
        dec(&b, &o, &join(&r)).unwrap_err().kind(),
        ErrorKind::Integrity
    );
    // Another row id value.
    let mut r = rows.clone();
    r[1][0] = "9".into();
    assert_eq!(
        dec(&b, &o, &join(&r)).unwrap_err().kind(),
        ErrorKind::Integrity
    );
    // Another context, or none, or no row id.
    for change in [
        |o: &mut ColumnOptions| o.context = "app.admins".into(),
        |o: &mut ColumnOptions| o.context = String::new(),
        |o: &mut ColumnOptions| o.row_id = vec![],
    ] {
        let mut o2 = o.clone();
        change(&mut o2);
        assert_eq!(
            dec(&b, &o2, &join(&rows)).unwrap_err().kind(),
            ErrorKind::Integrity
        );
    }
    // Another key store altogether.
    let (other, _) = backend();
    assert!(dec(&other, &o, &join(&rows)).is_err());
}

#[test]
fn without_row_id_tokens_move_between_rows_of_a_column() {
    // Documented limit: without --row-id a token is bound to context and
    // column only.
    let (b, k) = backend();
    let o = opts(Format::Csv, &["ssn"]);
    let (encd, _) = enc(&b, &k, &o, b"id,ssn\n1,111\n2,222\n").unwrap();
    let text = String::from_utf8(encd).unwrap();
    let l: Vec<&str> = text.lines().collect();
    let t1 = l[1].split(',').nth(1).unwrap();
    let t2 = l[2].split(',').nth(1).unwrap();
    let swapped = format!("{}\n1,{t2}\n2,{t1}\n", l[0]);
    assert_eq!(
        dec(&b, &o, swapped.as_bytes()).unwrap().0,
        b"id,ssn\n1,222\n2,111\n"
    );
}

const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

#[test]
fn every_single_character_change_of_a_token_is_rejected() {
    let (b, k) = backend();
    let o = opts(Format::Csv, &["v"]);
    let (encd, _) = enc(&b, &k, &o, b"v\nsecret\n").unwrap();
    let tok = encd[2..encd.len() - 1].to_vec();
    assert!(tok.starts_with(b"hsc2."));
    let check = |t: &[u8], what: &str| {
        let mut input = b"v\n".to_vec();
        input.extend_from_slice(t);
        input.push(b'\n');
        let r = dec(&b, &o, &input);
        assert!(
            r.is_err(),
            "{what} accepted: {}",
            String::from_utf8_lossy(t)
        );
    };
    let mut n = 0;
    for i in 0..tok.len() {
        // Substitute another character (every one for the prefix, a sample
        // of base64url characters elsewhere to keep the test quick).
        let alphabet: Vec<u8> = if i < 5 {
            B64URL.to_vec()
        } else {
            B64URL
                .iter()
                .copied()
                .filter(|c| (*c as usize + i).is_multiple_of(7))
                .collect()
        };
        for &c in &alphabet {
            if c == tok[i] {
                continue;
            }
            let mut t = tok.clone();
            t[i] = c;
            check(&t, &format!("substitution at {i}"));
            n += 1;
        }
        // Every base64url character at the last position (trailing bits).
        let mut t = tok.clone();
        t.remove(i);
        check(&t, &format!("deletion at {i}"));
        let mut t = tok.clone();
        t.insert(i, b'A');
        check(&t, &format!("insertion at {i}"));
    }
    let last = tok.len() - 1;
    for &c in B64URL {
        if c != tok[last] {
            let mut t = tok.clone();
            t[last] = c;
            check(&t, "substitution of the last character");
        }
    }
    for &c in B64URL {
        let mut t = tok.clone();
        t.push(c);
        check(&t, "appended character");
    }
    assert!(n > tok.len());
}

#[test]
fn hsm_calls_grow_with_batches_not_cells() {
    let (b, k) = backend();
    let mut input = b"id,a,b\n".to_vec();
    for i in 0..50_000 {
        input.extend_from_slice(format!("{i},x{i},y{i}\n").as_bytes());
    }
    let mut o = opts(Format::Csv, &["a", "b"]);
    o.batch_size = 10_000;
    o.jobs = 2;
    let before = b.calls();
    let (encd, s) = enc(&b, &k, &o, &input).unwrap();
    assert_eq!(s.cells, 100_000);
    assert_eq!(s.hsm_calls, b.calls() - before);
    assert_eq!(s.hsm_calls, s.batches);
    // Each worker may close one partial batch.
    assert!((10..=10 + 2).contains(&s.batches), "{}", s.batches);
    let before = b.calls();
    let (decd, s2) = dec(&b, &o, &encd).unwrap();
    assert_eq!(decd, input);
    assert_eq!(s2.hsm_calls, b.calls() - before);
    assert_eq!(s2.hsm_calls, s.batches, "one unwrap per distinct batch");
    assert_eq!(s2.batches, s.batches);
}

/// v2 cell keys are told apart by the cell's index within its batch: with
/// several workers sealing at once, every token of a batch (same header,
/// so same random batch salt) must carry its own index. Parse every token
/// of a parallel run: the indexes of each header are distinct, below the
/// batch size, and the headers (batch salts) of different batches differ.
#[test]
fn parallel_workers_never_give_two_cells_of_a_batch_the_same_index() {
    use hsmseal::columns::token;
    let (b, k) = backend();
    let mut input = b"id,a,b,c\n".to_vec();
    for i in 0..30_000 {
        input.extend_from_slice(format!("{i},x{i},y{i},z{i}\n").as_bytes());
    }
    for jobs in [2, 4] {
        let mut o = opts(Format::Csv, &["a", "b", "c"]);
        o.batch_size = 1_000;
        o.jobs = jobs;
        let (encd, s) = enc(&b, &k, &o, &input).unwrap();
        assert_eq!(s.cells, 90_000);
        let mut by_header = std::collections::HashMap::<Vec<u8>, Vec<u32>>::new();
        let mut body = Vec::new();
        for line in encd
            .split(|&c| c == b'\n')
            .skip(1)
            .filter(|l| !l.is_empty())
        {
            for cell in line.split(|&c| c == b',').skip(1) {
                assert_eq!(token::decode_text(cell, &mut body).unwrap(), 2);
                let (_, at) = token::key_ref_prefix(2, &body).unwrap();
                let hlen = at + token::SALT_LEN;
                let (index, _) = token::get_varint(&body[hlen..]).unwrap();
                by_header
                    .entry(body[..hlen].to_vec())
                    .or_default()
                    .push(index);
            }
        }
        assert_eq!(by_header.len() as u64, s.batches, "one header per batch");
        assert!(by_header.len() >= 90, "{}", by_header.len());
        let mut total = 0;
        for idx in by_header.values_mut() {
            let n = idx.len();
            total += n;
            idx.sort_unstable();
            idx.dedup();
            assert_eq!(idx.len(), n, "an index repeated within a batch");
            assert!(idx.iter().all(|&i| i < 1_000));
        }
        assert_eq!(total, 90_000);
        let (decd, _) = dec(&b, &o, &encd).unwrap();
        assert_eq!(decd, input);
    }
}

#[test]
fn rotate_reencrypts_to_v2_and_rewraps_v1_envelopes_only() {
    let (b, k) = backend();
    let mut o = opts(Format::Csv, &["a"]);
    o.row_id = vec!["id".into()];
    o.batch_size = 100;
    let mut input = b"id,a\n".to_vec();
    for i in 0..1000 {
        input.extend_from_slice(format!("{i},v{i}\n").as_bytes());
    }
    let (encd, s) = enc(&b, &k, &o, &input).unwrap();
    assert!(encd.windows(5).any(|w| w == b"hsc2."));
    let k2 = KeyRef {
        name: "pii".into(),
        version: b.add_version("pii"),
    };
    // v2 has no separable envelope: every token is opened (one derivation
    // per source batch) and sealed again (one per new batch).
    let mut rotated = Vec::new();
    let before = b.calls();
    let rs = columns::rewrap(&b, Some(&k2), &o, Cursor::new(encd.clone()), &mut rotated).unwrap();
    assert_eq!(rs.cells, 1000);
    assert_eq!(b.calls() - before, 2 * s.batches);
    assert_eq!(rs.hsm_calls, 2 * s.batches);
    assert_eq!(rotated.len(), encd.len());
    assert_ne!(rotated, encd);
    assert_eq!(dec(&b, &o, &rotated).unwrap().0, input);
    // Rotating again is a no-op with no HSM call.
    let mut again = Vec::new();
    let rs2 = columns::rewrap(&b, Some(&k2), &o, Cursor::new(rotated.clone()), &mut again).unwrap();
    assert_eq!(again, rotated);
    assert_eq!(rs2.hsm_calls, 0);
    // v1 tokens (a version made before token v2) to another v1 version:
    // the envelope alone is rewrapped, one unwrap and one wrap per batch.
    let old = KeyRef {
        name: "old".into(),
        version: b.add_version_without_kdk("old"),
    };
    let (v1, s1) = enc(&b, &old, &o, &input).unwrap();
    assert!(v1.windows(5).any(|w| w == b"hsc1.") && !v1.windows(5).any(|w| w == b"hsc2."));
    let old2 = KeyRef {
        name: "old".into(),
        version: b.add_version_without_kdk("old"),
    };
    let mut r1 = Vec::new();
    let rs = columns::rewrap(&b, Some(&old2), &o, Cursor::new(v1.clone()), &mut r1).unwrap();
    assert_eq!(rs.hsm_calls, 2 * s1.batches);
    assert_eq!(r1.len(), v1.len());
    assert_eq!(dec(&b, &o, &r1).unwrap().0, input);
    // ... and upgraded to v2 by a rotation to a version with a KDK.
    let mut up = Vec::new();
    columns::rewrap(&b, Some(&k2), &o, Cursor::new(r1), &mut up).unwrap();
    assert!(up.windows(5).any(|w| w == b"hsc2.") && !up.windows(5).any(|w| w == b"hsc1."));
    assert!(up.len() < v1.len() / 2);
    assert_eq!(dec(&b, &o, &up).unwrap().0, input);
}

fn err_msg(r: Result<(Vec<u8>, ColumnStats)>) -> (ErrorKind, String) {
    let e = r.unwrap_err();
    (e.kind(), e.message().to_string())
}

#[test]
fn header_problems_fail_before_any_output() {
    let (b, k) = backend();
    let input = b"id,ssn,ssn2,ssn2\n1,2,3,4\n";
    for (cols, want) in [
        (&["nope"][..], "column \"nope\" is not in the header"),
        (
            &["ssn2"][..],
            "column \"ssn2\" appears 2 times in the header",
        ),
        (&["ssn", "ssn"][..], "column \"ssn\" is selected twice"),
    ] {
        let mut out = Vec::new();
        let r = columns::encrypt(
            &b,
            &k,
            &opts(Format::Csv, cols),
            Cursor::new(input.to_vec()),
            &mut out,
        );
        let e = r.unwrap_err();
        assert!(e.message().starts_with(want), "{e}");
        assert!(out.is_empty(), "output written before the header error");
    }
    let mut o = opts(Format::Csv, &["ssn"]);
    o.row_id = vec!["ssn".into()];
    assert_eq!(err_msg(enc(&b, &k, &o, input)).0, ErrorKind::Usage);
    for (cols, rid) in [(&["1", "01"][..], None), (&["2"][..], Some("02"))] {
        let mut o = opts(Format::Csv, cols);
        o.header = false;
        o.row_id = rid.into_iter().map(str::to_string).collect();
        assert_eq!(
            err_msg(enc(&b, &k, &o, input)).0,
            ErrorKind::Usage,
            "{cols:?}"
        );
    }
    let mut o = opts(Format::Csv, &["5"]);
    o.header = false;
    let mut out = Vec::new();
    let e = columns::encrypt(&b, &k, &o, Cursor::new(input.to_vec()), &mut out).unwrap_err();
    assert!(
        e.message()
            .contains("column 5 selected but the row has only 4 fields"),
        "{e}"
    );
    assert!(out.is_empty());
}

#[test]
fn bad_rows_are_reported_with_row_and_column() {
    let (b, k) = backend();
    let o = opts(Format::Csv, &["b"]);
    let (kind, m) = err_msg(enc(&b, &k, &o, b"a,b\n1,2\n3\n"));
    assert_eq!(
        (kind, m.as_str()),
        (
            ErrorKind::Format,
            "row 3: has 1 field, expected 2 (ragged row)"
        )
    );
    let (_, m) = err_msg(enc(&b, &k, &o, b"a,b\n1,\"2\"x\n"));
    assert_eq!(
        m,
        "row 2: field 2: unexpected character after the closing quote of a quoted field"
    );
    let (_, m) = err_msg(enc(&b, &k, &o, b"a,b\n1,2\n1,\"2\n"));
    assert_eq!(
        m,
        "row 3: field 2: unterminated quoted field at end of input"
    );
    // Decrypt: plaintext where a token is expected, a malformed token.
    let (kind, m) = err_msg(dec(&b, &o, b"a,b\n1,2\n"));
    assert_eq!(kind, ErrorKind::Format);
    assert!(
        m.starts_with("row 2, column \"b\": expected an hsmseal token"),
        "{m}"
    );
    let mut o2 = o.clone();
    o2.allow_plaintext = true;
    let (out, s) = dec(&b, &o2, b"a,b\n1,2\n3,\n").unwrap();
    assert_eq!(
        (out.as_slice(), s.plaintext, s.nulls),
        (&b"a,b\n1,2\n3,\n"[..], 1, 1)
    );
    let (_, m) = err_msg(dec(&b, &o, b"a,b\n1,hsc1.AAAA\n"));
    assert_eq!(
        m,
        "row 2, column \"b\": malformed token: bad key name length"
    );
    let (_, m) = err_msg(dec(&b, &o2, b"a,b\n1,hsc1.!!\n"));
    assert_eq!(m, "row 2, column \"b\": malformed token: invalid base64url");
    // A row id that is NULL.
    let mut o3 = o.clone();
    o3.row_id = vec!["a".into()];
    let (_, m) = err_msg(enc(&b, &k, &o3, b"a,b\n,2\n"));
    assert_eq!(m, "row 2, column \"a\": the --row-id value is NULL");
}

#[test]
fn oversized_fields_are_rejected() {
    let (b, k) = backend();
    let o = opts(Format::Csv, &["b"]);
    let mut input = b"a,b\n1,".to_vec();
    input.resize(input.len() + (16 << 20) + 1, b'x');
    input.extend_from_slice(b"\n");
    let (_, m) = err_msg(enc(&b, &k, &o, &input));
    assert_eq!(
        m,
        "row 2, column \"b\": value of 16777217 bytes is over the 16 MiB limit per field"
    );
    let mut input = b"a,b\n1,".to_vec();
    input.resize(input.len() + (32 << 20) + 1, b'x');
    let (_, m) = err_msg(enc(&b, &k, &o, &input));
    assert!(
        m.starts_with("row 2: field 2: field of 33554433 bytes is over the 32 MiB limit"),
        "{m}"
    );
}

#[test]
fn empty_input_and_header_only() {
    let (b, k) = backend();
    let o = opts(Format::Csv, &["b"]);
    let (out, s) = enc(&b, &k, &o, b"a,b\n").unwrap();
    assert_eq!((out.as_slice(), s.rows), (&b"a,b\n"[..], 0));
    assert!(enc(&b, &k, &o, b"").is_err());
    let mut o2 = opts(Format::PgCopy, &["2"]);
    o2.header = false;
    o2.row_id = vec!["1".into()];
    let (out, s) = enc(&b, &k, &o2, b"").unwrap();
    assert_eq!((out.len(), s.rows), (0, 0));
    assert_eq!(dec(&b, &o2, b"").unwrap().0, b"");
    let (out, _) = enc(&b, &k, &opts(Format::Jsonl, &["x"]), b"").unwrap();
    assert!(out.is_empty());
}

#[test]
fn streams_many_blocks_in_order() {
    let (b, k) = backend();
    let mut input = b"id,v,w\n".to_vec();
    for i in 0..30_000 {
        input.extend_from_slice(format!("{i},\"v,{i}\",w{i}\r\n").as_bytes());
    }
    for jobs in [1, 3] {
        let mut o = opts(Format::Csv, &["v"]);
        o.jobs = jobs;
        o.row_id = vec!["id".into()];
        let (encd, s) = enc(&b, &k, &o, &input).unwrap();
        assert_eq!(s.rows, 30_000);
        let (decd, _) = dec(&b, &o, &encd).unwrap();
        assert_eq!(decd, input);
    }
}

/// A key backend with one fixed, known KWK: for the test vector in
/// docs/FORMAT.md (section 6).
struct FixedKwk;

impl FixedKwk {
    fn cipher() -> aes_gcm::Aes256Gcm {
        use aes_gcm::KeyInit;
        let k: Vec<u8> = (0u8..32).collect();
        aes_gcm::Aes256Gcm::new_from_slice(&k).unwrap()
    }
}

impl KeyBackend for FixedKwk {
    fn current_version(&self, _: &str) -> Result<u32> {
        Ok(1)
    }
    fn wrap(
        &self,
        _: &KeyRef,
        _: &hsmseal::secret::SecretKey,
        _: &[u8],
    ) -> Result<hsmseal::backend::WrappedKey> {
        unimplemented!("the vector is built by hand")
    }
    fn unwrap(
        &self,
        kwk: &KeyRef,
        w: &hsmseal::backend::WrappedKey,
        aad: &[u8],
    ) -> Result<hsmseal::secret::SecretKey> {
        use aes_gcm::aead::{Aead, Payload};
        assert_eq!((kwk.name.as_str(), kwk.version), ("pii", 1));
        let mut pt = Self::cipher()
            .decrypt(
                aes_gcm::Nonce::from_slice(&w.iv),
                Payload {
                    msg: &w.ciphertext,
                    aad,
                },
            )
            .map_err(|_| hsmseal::error::Error::integrity("bad"))?;
        Ok(hsmseal::secret::SecretKey::from_slice(&mut pt).unwrap())
    }
    /// KDK of `pii` v1 = bytes `80 81 … 9f` (the v2 vector).
    fn derive(&self, kwk: &KeyRef, data: &[u8]) -> Result<Option<hsmseal::secret::SecretKey>> {
        use hmac::Mac;
        assert_eq!((kwk.name.as_str(), kwk.version), ("pii", 1));
        let kdk: Vec<u8> = (0x80u8..0xa0).collect();
        let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&kdk).unwrap();
        m.update(data);
        Ok(Some(hsmseal::secret::SecretKey::from_bytes(
            m.finalize().into_bytes().into(),
        )))
    }
    fn calls(&self) -> u64 {
        0
    }
}

/// The test vector of docs/FORMAT.md (section 6), built from the spec with
/// nothing but AES-GCM and base64, must open with the implementation.
/// docs/FORMAT.md's test vectors, built from the spec's text: flags 0 (a
/// token made before formats were bound: decrypts in any format) and flags
/// 0x04 (made from a CSV dump: decrypts as CSV only).
#[test]
fn spec_test_vector() {
    let legacy = spec_token(0);
    assert_eq!(legacy, SPEC_VECTOR);
    let csv = spec_token(0x04);
    assert_eq!(csv, SPEC_VECTOR_CSV);
    let mut o = opts(Format::Csv, &["ssn"]);
    o.row_id = vec!["id".into()];
    o.context = "app.users".into();
    for (token, tsv_ok) in [(&legacy, true), (&csv, false)] {
        let input = format!("id,ssn\n42,{token}\n");
        let mut out = Vec::new();
        columns::decrypt(&FixedKwk, &o, Cursor::new(input.into_bytes()), &mut out).unwrap();
        assert_eq!(out, b"id,ssn\n42,123-45-6789\n");
        let mut t = o.clone();
        t.format = Format::Tsv;
        let input = format!("id\tssn\n42\t{token}\n");
        let mut out = Vec::new();
        let r = columns::decrypt(&FixedKwk, &t, Cursor::new(input.into_bytes()), &mut out);
        assert_eq!(r.is_ok(), tsv_ok, "{r:?}");
    }
}

/// The v2 vector of docs/FORMAT.md, built from the spec's text alone with
/// HMAC-SHA256 and AES-GCM: it must open with the implementation, bound to
/// its row, and decrypt as CSV only (flags 0x04).
#[test]
fn spec_test_vector_v2() {
    let token = spec_token_v2();
    assert_eq!(token, SPEC_VECTOR_V2);
    assert_eq!(token.len(), 68);
    let mut o = opts(Format::Csv, &["ssn"]);
    o.row_id = vec!["id".into()];
    o.context = "app.users".into();
    let mut out = Vec::new();
    let input = format!("id,ssn\n42,{token}\n");
    columns::decrypt(&FixedKwk, &o, Cursor::new(input.into_bytes()), &mut out).unwrap();
    assert_eq!(out, b"id,ssn\n42,123-45-6789\n");
    let input = format!("id,ssn\n43,{token}\n");
    let e = columns::decrypt(
        &FixedKwk,
        &o,
        Cursor::new(input.into_bytes()),
        &mut Vec::new(),
    );
    assert_eq!(e.unwrap_err().kind(), ErrorKind::Integrity);
    let mut t = o.clone();
    t.format = Format::Tsv;
    let input = format!("id\tssn\n42\t{token}\n");
    assert!(columns::decrypt(
        &FixedKwk,
        &t,
        Cursor::new(input.into_bytes()),
        &mut Vec::new()
    )
    .is_err());
}

fn spec_token_v2() -> String {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use base64::Engine;
    use hmac::Mac;
    let lp = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    };
    let hmac = |k: &[u8], m: &[u8]| {
        let mut h = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(k).unwrap();
        h.update(m);
        h.finalize().into_bytes().to_vec()
    };
    let kdk: Vec<u8> = (0x80u8..0xa0).collect();
    let batch_salt: Vec<u8> = (0xa0u8..0xac).collect();
    // Cell index 300: a two-byte varint in the body (0xac 0x02).
    let index: u32 = 300;
    let mut input = Vec::new();
    lp(&mut input, b"hsmseal/columns/batch-key/v2");
    lp(&mut input, b"pii");
    input.extend_from_slice(&1u32.to_be_bytes());
    input.extend_from_slice(&batch_salt);
    let batch_key = hmac(&kdk, &input);
    let mut cell_in = b"hsmseal/columns/cell-key/v2".to_vec();
    cell_in.extend_from_slice(&index.to_be_bytes());
    let cell_key = hmac(&batch_key, &cell_in);
    let mut binding = Vec::new();
    lp(&mut binding, b"hsmseal/columns/record");
    binding.push(1);
    lp(&mut binding, b"app.users");
    binding.push(1);
    lp(&mut binding, b"ssn");
    binding.push(1);
    lp(&mut binding, b"42");
    let mut pt = vec![0x04];
    pt.extend_from_slice(b"123-45-6789");
    let ct = aes_gcm::Aes256Gcm::new_from_slice(&cell_key)
        .unwrap()
        .encrypt(
            &aes_gcm::Nonce::default(),
            Payload {
                msg: &pt,
                aad: &binding,
            },
        )
        .unwrap();
    let mut body = vec![3u8];
    body.extend_from_slice(b"pii");
    body.push(1); // key version 1, a one-byte varint
    body.extend_from_slice(&batch_salt);
    body.extend_from_slice(&[0xac, 0x02]); // 300 = 0b10_0101100: 0x80 | 0x2c, then 0x02
    body.extend_from_slice(&ct);
    assert_eq!(body.len(), 33 + 3 + 11);
    let token = format!(
        "hsc2.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&body)
    );
    println!("{token}");
    token
}

const SPEC_VECTOR_V2: &str = "hsc2.A3BpaQGgoaKjpKWmp6ipqqusAtbc95i_I6_JLMZIXSsWLUrZssECamQpnNvx7xY";

fn spec_token(flags: u8) -> String {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use base64::Engine;
    let lp = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    };
    let batch_key: Vec<u8> = (0x20u8..0x40).collect();
    let dek: Vec<u8> = (0x40u8..0x60).collect();
    let wrap_iv: Vec<u8> = (0x60u8..0x6c).collect();
    let dek_nonce: Vec<u8> = (0x70u8..0x7c).collect();
    // Wrap AAD.
    let mut wrap_aad = Vec::new();
    lp(&mut wrap_aad, b"hsmseal/columns/batch-key");
    wrap_aad.push(1);
    lp(&mut wrap_aad, b"pii");
    wrap_aad.extend_from_slice(&1u32.to_be_bytes());
    // Binding.
    let mut binding = Vec::new();
    lp(&mut binding, b"hsmseal/columns/record");
    binding.push(1);
    lp(&mut binding, b"app.users");
    binding.push(1);
    lp(&mut binding, b"ssn");
    binding.push(1);
    lp(&mut binding, b"42");
    let wrapped = FixedKwk::cipher()
        .encrypt(
            aes_gcm::Nonce::from_slice(&wrap_iv),
            Payload {
                msg: &batch_key,
                aad: &wrap_aad,
            },
        )
        .unwrap();
    let enc_dek = aes_gcm::Aes256Gcm::new_from_slice(&batch_key)
        .unwrap()
        .encrypt(
            aes_gcm::Nonce::from_slice(&dek_nonce),
            Payload {
                msg: &dek,
                aad: &binding,
            },
        )
        .unwrap();
    let mut pt = vec![flags];
    pt.extend_from_slice(b"123-45-6789");
    let enc_value = aes_gcm::Aes256Gcm::new_from_slice(&dek)
        .unwrap()
        .encrypt(&aes_gcm::Nonce::default(), &pt[..])
        .unwrap();
    let mut body = vec![3u8];
    body.extend_from_slice(b"pii");
    body.extend_from_slice(&1u32.to_be_bytes());
    body.extend_from_slice(&wrap_iv);
    body.extend_from_slice(&wrapped);
    body.extend_from_slice(&dek_nonce);
    body.extend_from_slice(&enc_dek);
    body.extend_from_slice(&enc_value);
    assert_eq!(body.len(), 142 + 3 + 11);
    let token = format!(
        "hsc1.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&body)
    );
    println!("{token}");
    token
}

const SPEC_VECTOR_CSV: &str = "hsc1.A3BpaQAAAAFgYWJjZGVmZ2hpamvK-rl2n2WlSFQ_0wBeoO9sFkS7urBRBO6bmLpXQM_JN_ERz4q_3sXBRkL40Uya-etwcXJzdHV2d3h5enspPyAok-2BGWBSagskv05cOBqS_F1NNqiZuDsTiDLHQoiX2IHonE0OBUR33ZDKlhleBQJLuVznhu68oMoyHZPnVianHpeAR0BO440h";
const SPEC_VECTOR: &str = "hsc1.A3BpaQAAAAFgYWJjZGVmZ2hpamvK-rl2n2WlSFQ_0wBeoO9sFkS7urBRBO6bmLpXQM_JN_ERz4q_3sXBRkL40Uya-etwcXJzdHV2d3h5enspPyAok-2BGWBSagskv05cOBqS_F1NNqiZuDsTiDLHQoiX2IHonE0OBUR33ZDKlhlaBQJLuVznhu68oMrhfe-JNjnnOBkefHMxwPIo";

#[test]
fn the_first_error_in_input_order_is_reported() {
    let (b, k) = backend();
    let mut input = b"id,v\n".to_vec();
    for i in 0..20_000 {
        if i == 15_000 {
            input.extend_from_slice(b"ragged\n");
        } else {
            input.extend_from_slice(format!("{i},v{i}\n").as_bytes());
        }
    }
    input.extend_from_slice(b"1,\"unterminated\n");
    for jobs in [1, 2, 3] {
        for _ in 0..3 {
            let mut o = opts(Format::Csv, &["v"]);
            o.jobs = jobs;
            let mut out = Vec::new();
            let e = columns::encrypt(&b, &k, &o, Cursor::new(input.clone()), &mut out).unwrap_err();
            assert_eq!(
                e.message(),
                "row 15002: has 1 field, expected 2 (ragged row)"
            );
            // Nothing from the bad row on was written.
            assert!(count_tokens(&out) <= 15_000);
        }
    }
}
