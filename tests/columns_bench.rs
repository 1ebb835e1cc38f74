//! Throughput of `columns` on a 1,000,000-row, 6-column CSV with 3 columns
//! encrypted, against the in-memory key backend. Not a timed test: run it on
//! purpose with
//! `cargo test --release --test columns_bench -- --ignored --nocapture`
//! (`COLUMNS_BENCH_ROWS` changes the row count).

use hsmseal::backend::{KeyRef, MemoryBackend};
use hsmseal::columns::{self, ColumnOptions, Format};
use std::io::Cursor;
use std::time::Instant;

/// A realistic users table: names with commas and quotes, emails, national
/// ids, free text with newlines, some NULLs.
fn table(rows: usize) -> Vec<u8> {
    let first = [
        "Anna",
        "Jean-Luc",
        "Zoë",
        "Mary \"Mae\"",
        "李",
        "O'Neil",
        "Ana María",
    ];
    let last = [
        "Smith",
        "Dupont, Jr.",
        "Ångström",
        "García",
        "Nguyen",
        "Müller",
    ];
    let mut out = b"id,name,email,ssn,note,created_at\n".to_vec();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..rows {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let f = first[(x % 7) as usize];
        let l = last[(x >> 8) as usize % 6];
        let name = format!("{f} {l}");
        let name = if name.contains([',', '"']) {
            format!("\"{}\"", name.replace('"', "\"\""))
        } else {
            name
        };
        let note = match x % 5 {
            0 => String::new(),
            1 => "\"called twice,\nleft a message\"".to_string(),
            _ => format!("customer since {}", 2000 + x % 24),
        };
        let line = format!(
            "{i},{name},{}.{}{}@example.com,{:03}-{:02}-{:04},{note},2024-0{}-1{} 12:34:56+00\n",
            f.to_lowercase().replace(['"', ' ', '\''], ""),
            l.to_lowercase().replace([',', ' ', '.'], ""),
            i % 97,
            x % 1000,
            (x >> 10) % 100,
            (x >> 20) % 10000,
            1 + x % 9,
            x % 10
        );
        out.extend_from_slice(line.as_bytes());
    }
    out
}

/// An output buffer whose pages are already faulted in, so the timing is of
/// the pipeline, not of the kernel zeroing fresh pages (a pipe or the page
/// cache has no such cost).
fn warm_vec(n: usize) -> Vec<u8> {
    let mut v = vec![1u8; n];
    v.clear();
    v
}

/// CPU seconds (user + system) this process has used, all threads.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime and stime, in clock ticks (100 per second on Linux).
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[test]
#[ignore]
fn bench_columns_csv() {
    let rows: usize = std::env::var("COLUMNS_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let input = table(rows);
    let b = MemoryBackend::new();
    let k = KeyRef {
        name: "pii".into(),
        version: b.add_version("pii"),
    };
    let o = ColumnOptions {
        format: Format::Csv,
        columns: vec!["email".into(), "ssn".into(), "note".into()],
        row_id: vec!["id".into()],
        context: "app.users".into(),
        ..ColumnOptions::default()
    };
    println!(
        "input: {rows} rows, {:.1} MiB, peak RSS so far {:.0} MiB",
        input.len() as f64 / 1048576.0,
        peak_rss_mib()
    );

    let (copy, mut out) = (input.clone(), warm_vec(input.len()));
    let (t, c) = (Instant::now(), cpu_seconds());
    let s = columns::passthrough(&o, Cursor::new(copy), &mut out).unwrap();
    let (pass, pass_cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
    assert_eq!(out, input);
    drop(out);

    let (copy, mut enc) = (input.clone(), warm_vec(input.len() * 8));
    let (t, c) = (Instant::now(), cpu_seconds());
    let es = columns::encrypt(&b, &k, &o, Cursor::new(copy), &mut enc).unwrap();
    let (te, te_cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);

    let (copy, mut dec) = (enc.clone(), warm_vec(input.len()));
    let (t, c) = (Instant::now(), cpu_seconds());
    let ds = columns::decrypt(&b, &o, Cursor::new(copy), &mut dec).unwrap();
    let (td, td_cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
    assert_eq!(dec, input);

    let cells = es.cells as f64;
    println!(
        "| run | seconds | cells/s | CPU seconds | cells per CPU-second | MB/s in | HSM calls |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| passthrough (no crypto) | {pass:.3} | {:.0} | {pass_cpu:.2} | {:.0} | {:.0} | 0 |",
        s.cells as f64 / pass,
        s.cells as f64 / pass_cpu,
        input.len() as f64 / pass / 1e6
    );
    println!(
        "| encrypt | {te:.3} | {:.0} | {te_cpu:.2} | {:.0} | {:.0} | {} |",
        cells / te,
        cells / te_cpu,
        input.len() as f64 / te / 1e6,
        es.hsm_calls
    );
    println!(
        "| decrypt | {td:.3} | {:.0} | {td_cpu:.2} | {:.0} | {:.0} | {} |",
        ds.cells as f64 / td,
        ds.cells as f64 / td_cpu,
        enc.len() as f64 / td / 1e6,
        ds.hsm_calls
    );
    println!(
        "cells {} nulls {} batches {}; token overhead {:.1} bytes/cell; peak RSS {:.0} MiB (holds input, output and copies)",
        es.cells,
        es.nulls,
        es.batches,
        (enc.len() - input.len()) as f64 / cells,
        peak_rss_mib()
    );
}
