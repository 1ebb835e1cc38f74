//! Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/:
//! real files, tokens, dumps (tests/fixtures/columns) and audit logs, made
//! with the harness's fixed keys so the fuzzer starts from inputs that get
//! past authentication. The corpus is committed; this program documents
//! how it was made and remakes it after a format change:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example make_seeds
//! ```
//!
//! Files, tokens and encrypted dumps hold fresh random data keys, so each
//! run writes different bytes with the same meaning.

use hsmseal::audit;
use hsmseal::columns::{self, token, ColumnOptions, Format};
use hsmseal::envelope::{file, rewrap};
use hsmseal::stream::StreamOptions;
use hsmseal_fuzz::{column_options, v1, v2, AuditKeys, FixedKeys};
use std::fs;
use std::path::{Path, PathBuf};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join("corpus");
    let fixtures = root.join("../tests/fixtures/columns");
    let keys = FixedKeys::new();
    header_and_file(&keys, &corpus);
    tokens(&keys, &corpus);
    dumps(&keys, &corpus, &fixtures);
    audit_logs(&corpus);
}

fn put(corpus: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = corpus.join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(bytes);
    v
}

fn sealed(keys: &FixedKeys, plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let opts = StreamOptions {
        threads: 1,
        progress: None,
    };
    file::seal(keys, &v1(), plain, &mut out, &opts).unwrap();
    out
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hsmseal-seeds-{}-{name}", std::process::id()))
}

fn header_and_file(keys: &FixedKeys, corpus: &Path) {
    let small = sealed(keys, b"hello, world\n");
    let empty = sealed(keys, b"");
    let two_chunks = sealed(keys, &vec![0x5a; 16384 + 7]);
    // A file rewrapped once: envelope 1 active (seq 2, v2), envelope 0 cleared.
    let p = scratch("rotated");
    fs::write(&p, &small).unwrap();
    rewrap::rewrap(keys, &p, None, false).unwrap();
    let rotated = fs::read(&p).unwrap();
    fs::remove_file(&p).unwrap();
    // Both envelopes present: a rewrap that died between its two writes.
    let mut both = rotated.clone();
    both[256..512].copy_from_slice(&small[256..512]);
    for (mode, name, bytes) in [
        (0u8, "small", &small),
        (1, "small-fix-checksums", &small),
        (2, "small-rotate", &small),
        (3, "small-fix-rotate", &small),
        (4, "small-threads", &small),
        (2, "empty-rotate", &empty),
        (6, "two-chunks-rotate", &two_chunks),
        (2, "rotated-rotate", &rotated),
        (3, "both-envelopes-rotate", &both),
    ] {
        put(corpus, "header", name, &with_mode(mode, bytes));
    }
    put(corpus, "header", "truncated", &with_mode(0, &small[..600]));
    put(
        corpus,
        "header",
        "foreign",
        b"\x00PK\x03\x04 not an hsmseal file",
    );

    // file_tamper: u16 length, u8 threads, then 9-byte edits.
    let edit = |op: u8, pos: u32, arg: u32| {
        let mut e = vec![op];
        e.extend_from_slice(&pos.to_be_bytes());
        e.extend_from_slice(&arg.to_be_bytes());
        e
    };
    let case = |len: u16, threads: u8, edits: &[Vec<u8>]| {
        let mut v = len.to_be_bytes().to_vec();
        v.push(threads);
        for e in edits {
            v.extend_from_slice(e);
        }
        v
    };
    let cases: [(&str, Vec<u8>); 9] = [
        ("empty", case(0, 0, &[])),
        ("small", case(13, 0, &[])),
        ("two-chunks", case(16384 + 7, 1, &[])),
        ("three-chunks-threads", case(40000, 2, &[])),
        ("flip-payload", case(100, 0, &[edit(0, 1100, 3)])),
        (
            "truncate-at-chunk",
            case(16384 + 7, 0, &[edit(1, 1024 + 56 + 16400, 0)]),
        ),
        (
            "move-chunk",
            case(40000, 1, &[edit(4, 1024 + 56, 1024 + 56 + 16400)]),
        ),
        ("copy-envelope", case(10, 0, &[edit(5, 0, 0)])),
        ("seq-with-checksum", case(10, 0, &[edit(6, 256 + 7, 9)])),
    ];
    for (name, bytes) in cases {
        put(corpus, "file_tamper", name, &bytes);
    }
}

fn tokens(keys: &FixedKeys, corpus: &Path) {
    let mut aad = Vec::new();
    token::binding(
        &mut aad,
        &token::binding_prefix("app.users", &token::ColumnId::Name("ssn".into())),
        Some(b"17"),
    );
    let v1 = v1();
    let mut s = token::Sealer::new(keys, &v1, 10).unwrap();
    for (name, flags, value) in [
        ("ssn", 0u8, &b"123-45-6789"[..]),
        ("quoted", token::FLAG_QUOTED, b"Smith, John"),
        ("json", token::FLAG_JSON, b"{\"a\":[1,2]}"),
        ("empty", 0, b""),
        ("binary", 0, b"\x00\xff\r\n\t\\N"),
    ] {
        let mut t = Vec::new();
        s.seal(&aad, flags, value, &mut t).unwrap();
        put(corpus, "token", name, &t);
    }
    // The same values as v2 tokens (v2 is the version with a KDK in the
    // harness keys), past 128 cells for a two-byte cell index varint.
    let mut s = token::Sealer::new(keys, &v2(), 1000).unwrap();
    for (name, flags, value) in [
        ("v2-ssn", 0u8, &b"123-45-6789"[..]),
        ("v2-quoted", token::FLAG_QUOTED, b"Smith, John"),
        ("v2-json", token::FLAG_JSON, b"{\"a\":[1,2]}"),
        ("v2-empty", 0, b""),
        ("v2-binary", 0, b"\x00\xff\r\n\t\\N"),
    ] {
        let mut t = Vec::new();
        s.seal(&aad, flags, value, &mut t).unwrap();
        put(corpus, "token", name, &t);
    }
    for _ in 5..300 {
        s.seal(&aad, 0, b"x", &mut Vec::new()).unwrap();
    }
    let mut t = Vec::new();
    s.seal(&aad, 0, b"x", &mut t).unwrap();
    put(corpus, "token", "v2-index300", &t);
    put(corpus, "token", "fake", b"hsc1.AAAA");
    put(corpus, "token", "v2-fake", b"hsc2.AAAA");
    put(corpus, "token", "plain", b"123-45-6789");
}

fn dumps(keys: &FixedKeys, corpus: &Path, fixtures: &Path) {
    let table = "c=ssn,email r=id x=app.users";
    let seeds: [(&str, Format, &str, &str); 12] = [
        ("csv", Format::Csv, "postgres.csv", table),
        ("csv", Format::Csv, "python.csv", "c=name,note r=id j=2 b=2"),
        ("csv", Format::Csv, "quote_all.csv", table),
        ("csv", Format::Csv, "bom_mixed.csv", "c=name,ssn r=id"),
        ("csv", Format::Csv, "postgres.csv", "n c=2,4"),
        ("tsv", Format::Tsv, "python.tsv", table),
        ("tsv", Format::Tsv, "python.tsv", "n c=1,5 x=t"),
        ("pgcopy", Format::PgCopy, "postgres.pgcopy", table),
        (
            "pgcopy",
            Format::PgCopy,
            "postgres.pgcopy",
            "c=note,name j=2 b=1",
        ),
        ("jsonl", Format::Jsonl, "data.jsonl", "c=ssn,name,tags r=id"),
        ("jsonl", Format::Jsonl, "data.jsonl", "c=score x=app.users"),
        ("jsonl", Format::Jsonl, "data.jsonl", "c=name p"),
    ];
    for (i, (target, format, fixture, opts)) in seeds.into_iter().enumerate() {
        let dump = fs::read(fixtures.join(fixture)).unwrap();
        let mut plain = format!("{opts}\n").into_bytes();
        plain.extend_from_slice(&dump);
        put(corpus, target, &format!("{i:02}-{fixture}"), &plain);
        // The same dump encrypted under the fixed keys, for the decrypt and
        // rotate paths.
        let o: ColumnOptions = column_options(format, opts.as_bytes());
        let mut enc = format!("{opts}\n").into_bytes();
        columns::encrypt(keys, &v1(), &o, std::io::Cursor::new(dump), &mut enc).unwrap();
        put(corpus, target, &format!("{i:02}-{fixture}.enc"), &enc);
    }
}

fn audit_logs(corpus: &Path) {
    let keys = AuditKeys::new();
    let p = scratch("audit.log");
    let _ = fs::remove_file(&p);
    for (i, command) in ["key create", "encrypt", "columns encrypt"]
        .iter()
        .enumerate()
    {
        let rec = audit::Record {
            command: command.to_string(),
            keys: vec!["fz v1".into()],
            ok: i as u64 + 1,
            failed: (i == 2) as u64,
            bytes: 1000 * i as u64,
            hsm_calls: 2,
            seconds: 0.25,
            result: if i == 2 { "failed" } else { "ok" },
            exit_code: if i == 2 { 1 } else { 0 },
            error: (i == 2).then(|| "row 3, column \"ssn\": authentication failed".into()),
            ..Default::default()
        };
        audit::append(&keys, &p, &rec, false).unwrap();
    }
    let log = fs::read(&p).unwrap();
    fs::remove_file(&p).unwrap();
    let first_line = log.iter().position(|&b| b == b'\n').unwrap() + 1;
    for (mode, name, bytes) in [
        (3u8, "intact", &log[..]),
        (1, "intact-one", &log[..first_line]),
        (0, "no-head", &log[..]),
        (0x43, "head-ahead", &log[..]),
        (0x82, "head-behind", &log[..]),
        (0xc3, "head-hash", &log[..]),
        (2, "truncated-line", &log[..log.len() - 10]),
    ] {
        put(corpus, "audit", name, &with_mode(mode, bytes));
    }
    put(
        corpus,
        "audit",
        "head-record",
        &with_mode(
            0,
            format!("v1 3 {} /var/log/hsmseal/audit.log", "ab".repeat(32)).as_bytes(),
        ),
    );
}
