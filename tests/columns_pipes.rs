//! `hsmseal columns` in pipelines, the real binary on a SoftHSM2 token of
//! its own (issue 9): a run that fails after its output began ends stdout
//! with the abort marker (so a `psql \copy` reading it fails, see
//! scripts/pg-e2e.sh for that half), whatever stopped it: a damaged token,
//! a NULL row id at the last row, a usage error, SIGTERM at any point of
//! the stream. Under `-o` nothing appears at all; a successful run carries
//! no marker; a closed reader (EPIPE) stops the run quietly.

mod support;

use hsmseal::columns::abort::MARKER;
use std::io::{Read, Write};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use support::{code, stderr, Cli};

const ROWS: usize = 30_000;

fn plain_csv() -> Vec<u8> {
    let mut csv = b"id,name,ssn\n".to_vec();
    for i in 0..ROWS {
        csv.extend_from_slice(format!("{i},\"Doe, J{i}\",{i:09}\n").as_bytes());
    }
    csv
}

const COLS: [&str; 8] = [
    "--columns",
    "name,ssn",
    "--row-id",
    "id",
    "--context",
    "app.users",
    "--format",
    "csv",
];

fn args<'a>(head: &[&'a str]) -> Vec<&'a str> {
    head.iter().copied().chain(COLS).collect()
}

/// Splits a failed run's stdout into what came before the marker; asserts
/// the marker is there, once, right after a record boundary.
fn before_marker(out: &[u8]) -> &[u8] {
    assert!(
        out.ends_with(MARKER),
        "no abort marker at the end: ...{}",
        String::from_utf8_lossy(&out[out.len().saturating_sub(200)..])
    );
    let data = &out[..out.len() - MARKER.len()];
    assert!(
        data.is_empty() || data.ends_with(b"\n"),
        "marker mid-record"
    );
    assert!(
        !data.windows(16).any(|w| w == b"hsmseal: aborted"),
        "marker twice"
    );
    data
}

/// The report's decrypt case: one damaged token at row 20,000 of 30,000.
/// Exit 3, and the stream ends with the marker after whole records that are
/// a prefix of the plaintext, none from the bad row on.
#[test]
fn a_failed_decrypt_to_stdout_ends_with_the_abort_marker() {
    let c = Cli::with_key();
    let plain = plain_csv();
    support::write(&c.path("users.csv"), &plain);
    c.ok(&args(&[
        "columns",
        "encrypt",
        "--key",
        "k",
        "-i",
        "users.csv",
        "-o",
        "users.enc.csv",
    ]));
    let enc = std::fs::read(c.path("users.enc.csv")).unwrap();
    // Success: the exact plaintext, no marker.
    let ok = c.run_with(&args(&["columns", "decrypt"]), Some(&enc), &[]);
    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    assert_eq!(ok.stdout, plain);
    // Damage the ssn token of the data row with id 19998 (row 20,000
    // counting the header line as row 1).
    let text = String::from_utf8(enc).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let line = &mut lines[19_999];
    assert!(line.starts_with("19998,"));
    // In the record part (the last characters), not the batch envelope.
    let at = line.len() - 10;
    let c0 = line.as_bytes()[at];
    line.replace_range(at..at + 1, if c0 == b'A' { "B" } else { "A" });
    let damaged = lines.join("\n") + "\n";
    let bad = c.run_with(
        &args(&["columns", "decrypt"]),
        Some(damaged.as_bytes()),
        &[],
    );
    assert_eq!(code(&bad), 3, "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("row 20000, column \"ssn\": token authentication failed"),
        "{}",
        stderr(&bad)
    );
    let data = before_marker(&bad.stdout);
    assert!(plain.starts_with(data), "not a prefix of the plaintext");
    assert!(!data.windows(6).any(|w| w == b"19998,"));
    // To a file: nothing at all, no temporary left.
    support::write(&c.path("damaged.csv"), damaged.as_bytes());
    let before = c.files();
    let f = c.run(&args(&[
        "columns",
        "decrypt",
        "-i",
        "damaged.csv",
        "-o",
        "out.csv",
    ]));
    assert_eq!(code(&f), 3, "{}", stderr(&f));
    assert_eq!(c.files(), before);
}

/// The report's encrypt case: a NULL row id at the last row. Exit 8 and
/// the marker after everything before it.
#[test]
fn a_failed_encrypt_to_stdout_ends_with_the_abort_marker() {
    let c = Cli::with_key();
    let mut plain = plain_csv();
    plain.extend_from_slice(b",\"No Id\",123456789\n");
    let out = c.run_with(
        &args(&["columns", "encrypt", "--key", "k"]),
        Some(&plain),
        &[],
    );
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "row {}, column \"id\": the --row-id value is NULL",
            ROWS + 2
        )),
        "{}",
        stderr(&out)
    );
    let data = before_marker(&out.stdout);
    assert!(data.starts_with(b"id,name,ssn\n0,hsc2."));
    // The same for every format's reader of its own output: the marker
    // comes after a record boundary even when the input's last record had
    // no terminator (a JSONL key missing from every row fails at the end).
    let jsonl = b"{\"a\":1}\n{\"a\":2}";
    let out = c.run_with(
        &["columns", "encrypt", "--key", "k", "-f", "jsonl", "-c", "b"],
        Some(jsonl),
        &[],
    );
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert_eq!(before_marker(&out.stdout), b"{\"a\":1}\n{\"a\":2}\n");
}

/// Errors before the first byte of data, a usage error included, still end
/// stdout with the marker: a loader reading an empty stream would load
/// nothing and exit 0, and a script would go on (drop the old table...).
#[test]
fn a_run_failing_before_any_output_still_writes_the_marker() {
    let c = Cli::with_key();
    let csv = b"id,ssn\n1,123\n";
    for (args, want, head) in [
        (
            &["columns", "encrypt", "--key", "k", "-c", "ssn"][..],
            2,
            "",
        ),
        (
            &[
                "columns", "encrypt", "--key", "nokey", "-f", "csv", "-c", "ssn",
            ][..],
            4,
            "",
        ),
        (
            &[
                "columns", "encrypt", "--key", "k", "-f", "csv", "-c", "nope",
            ][..],
            2,
            "",
        ),
        // The header went out before the first row failed.
        (
            &["columns", "decrypt", "-f", "csv", "-c", "ssn"][..],
            8,
            "id,ssn\n",
        ),
    ] {
        let out = c.run_with(args, Some(csv), &[]);
        assert_eq!(code(&out), want, "{args:?}: {}", stderr(&out));
        assert_eq!(before_marker(&out.stdout), head.as_bytes(), "{args:?}");
    }
    // A wrong PIN: the run never reaches the token's keys.
    let out = c.run_with(
        &["columns", "encrypt", "--key", "k", "-f", "csv", "-c", "ssn"],
        Some(csv),
        &[("HSMSEAL_PIN", "000000")],
    );
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert_eq!(out.stdout, MARKER);
}

/// SIGTERM while the stream flows, at a different point each round: exit
/// 143, and the output is whole records (each a complete, in-order row)
/// followed by the marker. The writer thread and the signal thread race for
/// stdout here; the stream lock keeps the marker out of a block and any
/// block out after the marker.
#[test]
fn sigterm_mid_stream_ends_with_the_marker_after_whole_records() {
    let c = Cli::with_key();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..24 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Wait for this much output before the signal: from one block to
        // several megabytes.
        let want = 1 + (seed % 6_000_000) as usize;
        let mut cmd = c.cmd();
        cmd.args(args(&[
            "columns",
            "encrypt",
            "--key",
            "k",
            "--batch-size",
            "1000",
        ]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let feeder = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let _ = stdin.write_all(b"id,name,ssn\n");
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut chunk = Vec::with_capacity(64 * 1024);
                    for _ in 0..1000 {
                        chunk.extend_from_slice(format!("{i},\"Doe, J{i}\",{i:09}\n").as_bytes());
                        i += 1;
                    }
                    if stdin.write_all(&chunk).is_err() {
                        break;
                    }
                }
            })
        };
        let seen = Arc::new(AtomicUsize::new(0));
        let mut stdout = child.stdout.take().unwrap();
        let reader = {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    match stdout.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            out.extend_from_slice(&buf[..n]);
                            seen.store(out.len(), Ordering::Relaxed);
                        }
                    }
                }
                out
            })
        };
        while seen.load(Ordering::Relaxed) < want {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        let out = reader.join().unwrap();
        feeder.join().unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(status.code(), Some(143), "round {round}: {err}");
        let data = before_marker(&out);
        let text = std::str::from_utf8(data).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("id,name,ssn"));
        let tok_len = hsmseal::columns::token::token_len_v2(1, 0);
        for (n, l) in lines.enumerate() {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 3, "round {round}: {l}");
            assert_eq!(f[0], n.to_string(), "round {round}");
            assert!(
                f[1].starts_with("hsc2.") && f[1].len() > tok_len,
                "round {round}"
            );
            assert!(
                f[2].starts_with("hsc2.") && f[2].len() > tok_len,
                "round {round}"
            );
        }
        assert!(data.len() + MARKER.len() >= want, "round {round}");
    }
}

/// A reader that goes away (`| head`): exit 141, quietly, no marker to
/// write anywhere.
#[test]
fn a_closed_reader_stops_the_run_quietly() {
    let c = Cli::with_key();
    let plain = plain_csv();
    let mut cmd = c.cmd();
    cmd.args(args(&["columns", "encrypt", "--key", "k"]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&plain);
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 100];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert_eq!(out.status.code(), Some(141), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    assert!(first.starts_with(b"id,name,ssn\n0,hsc2."));
}

/// `-o` that is written into rather than replaced (issue 9 item 5): a FIFO
/// gets whole records and then the abort marker when the run fails, like
/// stdout, and the plain dump when it succeeds; `-o /dev/null` needs no
/// `--force` and stays a device; `-o /dev/stdout` is stdout, marker included.
#[test]
fn a_fifo_or_device_output_is_a_stream_with_the_abort_marker() {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let c = Cli::with_key();
    let plain = plain_csv();
    support::write(&c.path("users.csv"), &plain);
    c.ok(&args(&[
        "columns",
        "encrypt",
        "--key",
        "k",
        "-i",
        "users.csv",
        "-o",
        "users.enc.csv",
    ]));
    let enc = std::fs::read_to_string(c.path("users.enc.csv")).unwrap();
    let mut lines: Vec<String> = enc.lines().map(str::to_string).collect();
    let at = lines[20_000].len() - 10;
    let c0 = lines[20_000].as_bytes()[at];
    lines[20_000].replace_range(at..at + 1, if c0 == b'A' { "B" } else { "A" });
    support::write(&c.path("damaged.csv"), (lines.join("\n") + "\n").as_bytes());

    let fifo = c.path("fifo");
    let run_into_fifo = |input: &str| {
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        let out = c.run(&args(&["columns", "decrypt", "-i", input, "-o", "fifo"]));
        // If hsmseal never opened the FIFO, open and close it here so the
        // reader sees end-of-file and the test fails instead of hanging.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo);
        let got = reader.join().unwrap();
        assert!(
            std::fs::symlink_metadata(&fifo)
                .unwrap()
                .file_type()
                .is_fifo(),
            "the FIFO was replaced"
        );
        std::fs::remove_file(&fifo).unwrap();
        (out, got)
    };
    let (out, got) = run_into_fifo("users.enc.csv");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(got, plain);
    let (out, got) = run_into_fifo("damaged.csv");
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let data = before_marker(&got);
    assert!(plain.starts_with(data), "not a prefix of the plaintext");

    // /dev/null: written into without --force, and still a device.
    let out = c.run(&args(&[
        "columns",
        "decrypt",
        "-i",
        "users.enc.csv",
        "-o",
        "/dev/null",
    ]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());

    // /dev/stdout with stdout a pipe: the marker reaches it too.
    let out = c.run(&args(&[
        "columns",
        "decrypt",
        "-i",
        "damaged.csv",
        "-o",
        "/dev/stdout",
    ]));
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(plain.starts_with(before_marker(&out.stdout)));
}
