//! Replays the fuzz corpus in the normal `cargo test`: every committed crash
//! input (fuzz/regressions/<target>/, one file per finding, named after it)
//! and every seed (fuzz/corpus/<target>/) goes through the same harness
//! the fuzz target runs (fuzz/src/lib.rs, included here), so a fixed crash
//! stays fixed without cargo-fuzz, and a format change that invalidates the
//! seeds fails here first (remake them: see fuzz/examples/make_seeds.rs).
//!
//! `make fuzz` runs the targets themselves (libFuzzer, bounded time).

#[path = "../fuzz/src/lib.rs"]
mod harness;

use hsmseal::columns::Format;
use std::path::Path;

/// A harness: panics on a finding.
type Harness = fn(&[u8]);

/// Every fuzz target and its harness.
const TARGETS: &[(&str, Harness)] = &[
    ("header", harness::header),
    ("file_tamper", harness::file_tamper),
    ("token", harness::token),
    ("csv", |d| harness::dump(Format::Csv, d)),
    ("tsv", |d| harness::dump(Format::Tsv, d)),
    ("pgcopy", |d| harness::dump(Format::PgCopy, d)),
    ("jsonl", |d| harness::dump(Format::Jsonl, d)),
    ("audit", harness::audit),
];

/// Runs every file under `fuzz/<dir>/<target>/` through its harness;
/// returns how many there were.
fn replay(dir: &str, target: &str, run: Harness) -> usize {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(dir)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&d) else {
        return 0;
    };
    let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        // A panic names the file, so a failure points at its input.
        let r = std::panic::catch_unwind(|| run(&data));
        assert!(r.is_ok(), "{} failed its harness", f.display());
    }
    files.len()
}

#[test]
fn every_seed_passes_its_harness() {
    for (target, run) in TARGETS {
        let n = replay("corpus", target, *run);
        assert!(n >= 2, "fuzz/corpus/{target} has {n} seeds");
    }
}

#[test]
fn every_crash_found_by_fuzzing_stays_fixed() {
    for (target, run) in TARGETS {
        replay("regressions", target, *run);
    }
}

// ---- the findings, spelled out ----

/// Fuzz target tsv (fuzz/regressions/tsv/cr-at-end-of-unterminated-last-field):
/// a last field ending in CR was always written back quoted, so a dump
/// whose last record has no terminator came back as `"…\r"`, not byte for
/// byte. Only a lone LF after it makes the quotes necessary.
#[test]
fn a_trailing_cr_in_the_last_field_round_trips() {
    use hsmseal::backend::{KeyRef, MemoryBackend};
    use hsmseal::columns::{self, ColumnOptions};
    let b = MemoryBackend::new();
    let k = KeyRef {
        name: "k".into(),
        version: b.add_version("k"),
    };
    for (format, dump) in [
        (Format::Tsv, &b"\r"[..]),
        (Format::Tsv, b"1\tx\r"),
        (Format::Csv, b"1,x\r"),
        (Format::Csv, b"1,x\r\r\n2,y\r\n"),
        (Format::Csv, b"1,\"x\r\"\n"),
    ] {
        let o = ColumnOptions {
            format,
            columns: vec![if dump.len() == 1 { "1" } else { "2" }.into()],
            header: false,
            jobs: 1,
            ..Default::default()
        };
        let mut enc = Vec::new();
        columns::encrypt(&b, &k, &o, std::io::Cursor::new(dump.to_vec()), &mut enc).unwrap();
        let mut dec = Vec::new();
        columns::decrypt(&b, &o, std::io::Cursor::new(enc), &mut dec).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&dec),
            String::from_utf8_lossy(dump),
            "{format:?}"
        );
    }
}

/// Fuzz target header: envelope sequence numbers are covered by the envelope's
/// SHA-256 checksum only (FORMAT.md: it catches torn writes, the GCM tag
/// is the security), so a header edited to seq 2^64-1, checksum
/// recomputed, still opens. Rotating it computed seq + 1: an overflow
/// (a panic with overflow checks; wrapped to the invalid seq 0 without),
/// and the rewrap then cleared the old envelope and left a file with no
/// readable envelope while exiting 0. Now the rotation is refused and the
/// file left as it was.
#[test]
fn rotating_a_header_at_the_last_sequence_number_loses_nothing() {
    use hsmseal::backend::{KeyRef, MemoryBackend};
    use hsmseal::envelope::{file, header::Header, rewrap};
    use hsmseal::error::ErrorKind;
    use hsmseal::stream::StreamOptions;
    let b = MemoryBackend::new();
    let k = KeyRef {
        name: "k".into(),
        version: b.add_version("k"),
    };
    let opts = StreamOptions::default();
    let mut sealed = Vec::new();
    file::seal(&b, &k, &b"the only copy"[..], &mut sealed, &opts).unwrap();
    sealed[256..264].copy_from_slice(&u64::MAX.to_be_bytes());
    harness::fix_envelope_checksums(&mut sealed);
    assert_eq!(Header::parse(&sealed).unwrap().active().1.seq, u64::MAX);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.hseal");
    std::fs::write(&p, &sealed).unwrap();
    b.add_version("k");
    let e = rewrap::rewrap(&b, &p, None, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Integrity, "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), sealed, "the file was changed");
    let mut out = Vec::new();
    file::open(&b, &sealed[..], &mut out, &opts).unwrap();
    assert_eq!(out, b"the only copy");
    // What the message advises works: a fresh header, then rotations again.
    rewrap::reencrypt(&b, &p, None, false, &opts).unwrap();
    let fresh = std::fs::read(&p).unwrap();
    assert_eq!(Header::parse(&fresh).unwrap().active().1.seq, 1);
    let mut out = Vec::new();
    file::open(&b, &fresh[..], &mut out, &opts).unwrap();
    assert_eq!(out, b"the only copy");
}

/// The token seeds include real v2 tokens (compact body, issue 11) that
/// open under the harness keys and seed binding, so the fuzzer starts past
/// authentication in the v2 paths too; `v2-index300` has a two-byte cell
/// index varint.
#[test]
fn v2_token_seeds_open_under_the_harness_keys() {
    use hsmseal::columns::token;
    let keys = harness::FixedKeys::new();
    let cache = token::BatchCache::new();
    let mut o = token::Opener::new(&keys, &cache);
    let mut aad = Vec::new();
    token::binding(
        &mut aad,
        &token::binding_prefix("app.users", &token::ColumnId::Name("ssn".into())),
        Some(b"17"),
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/token");
    for (name, value) in [
        ("v2-ssn", &b"123-45-6789"[..]),
        ("v2-quoted", b"Smith, John"),
        ("v2-json", b"{\"a\":[1,2]}"),
        ("v2-empty", b""),
        ("v2-binary", b"\x00\xff\r\n\t\\N"),
        ("v2-index300", b"x"),
    ] {
        let t = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(token::token_key(&t).unwrap(), (2, harness::v2()), "{name}");
        assert_eq!(o.open(&aad, &t).unwrap().1, value, "{name}");
    }
}
