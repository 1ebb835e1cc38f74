//! Bulk-decrypt guardrails (issue 12, item 5): per-key limits from
//! hsmseal.toml `[limits.KEY]` refuse an over-limit `decrypt` before any
//! output exists; `--override-limits` lets it through and the audit entry
//! names the override.

mod support;

use support::{code, data, stderr, write, Cli};

fn setup(limits: &str) -> Cli {
    let c = Cli::with_key();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        write(&c.path(name), &data(10_000, i as u64));
        c.ok(&["encrypt", "--key", "k", name]);
        std::fs::remove_file(c.path(name)).unwrap();
    }
    write(&c.path("hsmseal.toml"), limits.as_bytes());
    c
}

/// The column options of the dump the columns tests seal.
const DUMP_COLS: [&str; 8] = [
    "--format",
    "csv",
    "--columns",
    "ssn",
    "--row-id",
    "id",
    "--context",
    "t",
];

/// Writes u.csv (three SSN cells under key k's context `t`) and returns the
/// `columns encrypt` arguments that seal it into u.enc.
fn seal_dump(c: &Cli) -> Vec<&'static str> {
    write(&c.path("u.csv"), b"id,ssn\n1,x\n2,y\n3,z\n");
    [
        &["columns", "encrypt", "--key", "k"][..],
        &DUMP_COLS,
        &["-i", "u.csv", "-o", "u.enc"],
    ]
    .concat()
}

#[test]
fn an_over_limit_decrypt_is_refused_before_any_output() {
    let c = setup("[limits.k]\nmax_items = 2\n");
    let before = c.files();
    let out = c.run(&["decrypt", "a.hseal", "b.hseal", "c.hseal"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("3 items (max_items = 2)")
            && err.contains("[limits.k]")
            && err.contains("--override-limits"),
        "{err}"
    );
    assert_eq!(c.files(), before, "nothing written");
    // Within the limit: fine.
    c.ok(&["decrypt", "a.hseal", "b.hseal"]);
    assert_eq!(std::fs::read(c.path("a")).unwrap(), data(10_000, 0));

    // Bytes: a file's size is charged before it is opened.
    let c = setup("[limits.k]\nmax_bytes = 15000\n");
    let before = c.files();
    let out = c.run(&["decrypt", "a.hseal", "b.hseal"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("(max_bytes = 15000)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(c.files(), before);
    // A stream's size is unknown before decrypting: refused under a byte limit.
    let sealed = std::fs::read(c.path("a.hseal")).unwrap();
    let out = c.run_in(&["decrypt", "-o", "-", "-"], &sealed);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("standard input"), "{}", stderr(&out));
    // Another key's limits do not apply.
    let c = setup("[limits.other]\nmax_items = 1\n");
    c.ok(&["decrypt", "a.hseal", "b.hseal", "c.hseal"]);
}

#[test]
fn the_override_decrypts_and_is_audit_logged() {
    let c = setup("[limits.k]\nmax_items = 1\n");
    c.ok(&["--audit-log", "audit.log", "audit", "init"]);
    let out = c.run(&["--audit-log", "audit.log", "decrypt", "a.hseal", "b.hseal"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    c.ok(&[
        "--audit-log",
        "audit.log",
        "decrypt",
        "--override-limits",
        "a.hseal",
        "b.hseal",
    ]);
    assert_eq!(std::fs::read(c.path("b")).unwrap(), data(10_000, 1));
    let log = std::fs::read_to_string(c.path("audit.log")).unwrap();
    let last = log.lines().last().unwrap();
    assert!(
        last.contains("\"command\":\"decrypt --override-limits\"")
            && last.contains("\"result\":\"ok\""),
        "{log}"
    );
    // The refused run is logged too, as a plain decrypt that ended in error.
    assert!(log.contains("\"command\":\"decrypt\""), "{log}");
    c.ok(&["--audit-log", "audit.log", "audit", "verify"]);
}

#[test]
fn a_bad_limits_table_is_a_configuration_error() {
    let c = setup("[limits.k]\nmax_files = 1\n");
    let out = c.run(&["decrypt", "a.hseal"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("hsmseal.toml"), "{}", stderr(&out));
}

#[test]
fn audit_report_sums_decrypts_per_user_host_key_and_command() {
    let c = setup("[limits.k]\nmax_items = 1\n");
    let log = ["--audit-log", "audit.log"];
    let run = |args: &[&str]| {
        let mut v = log.to_vec();
        v.extend_from_slice(args);
        c.ok(&v)
    };
    run(&["audit", "init"]);
    run(&["decrypt", "a.hseal"]);
    run(&["decrypt", "--override-limits", "b.hseal", "c.hseal"]);
    run(&seal_dump(&c));
    let cols = DUMP_COLS;
    let mut dec = vec!["columns", "decrypt"];
    dec.extend(cols);
    dec.extend(["-i", "u.enc", "-o", "u.out"]);
    run(&dec);

    let out = run(&["--json", "audit", "report", "--since", "24h"]);
    let rows = support::json_of_type(&out, "audit_report");
    let row = |command: &str| {
        rows.iter()
            .find(|r| r["command"] == command)
            .unwrap_or_else(|| panic!("{command} in {rows:?}"))
            .clone()
    };
    let files = row("decrypt");
    assert_eq!(files["key"], "k");
    assert_eq!(
        (files["runs"].as_u64(), files["items"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(files["overrides"], 1);
    assert!(files["bytes"].as_u64().unwrap() >= 30_000);
    let cells = row("columns decrypt");
    assert_eq!(
        (cells["cells"].as_u64(), cells["items"].as_u64()),
        (Some(3), Some(0))
    );
    // Encrypt runs are not decrypts.
    assert!(
        rows.iter().all(|r| r["command"] != "columns encrypt"),
        "{rows:?}"
    );
    assert_eq!(rows.len(), 2, "{rows:?}");

    // Alerts: 6 items and cells under k.
    let report = |n: &str| {
        c.run(&[
            "--audit-log",
            "audit.log",
            "audit",
            "report",
            "--alert-over",
            n,
        ])
    };
    let out = report("6");
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
    let out = report("5");
    assert_eq!(
        code(&out),
        1,
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("decrypted 6 items and cells (alert over 5)"),
        "{}",
        stderr(&out)
    );

    // A tampered log is not summarised.
    let text = std::fs::read_to_string(c.path("audit.log")).unwrap();
    write(
        &c.path("audit.log"),
        text.replacen("\"decrypt\"", "\"verify\"", 1).as_bytes(),
    );
    let out = report("100");
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("not summarised"), "{}", stderr(&out));
}

#[test]
fn columns_decrypt_counts_cells_before_decrypting_any() {
    let c = setup("");
    c.ok(&seal_dump(&c));
    let cols = DUMP_COLS;
    let dec = |extra: &[&str]| {
        let _ = std::fs::remove_file(c.path("u.out"));
        let mut v = vec!["columns", "decrypt"];
        v.extend(cols);
        v.extend(extra);
        c.run(&v)
    };
    write(&c.path("hsmseal.toml"), b"[limits.k]\nmax_cells = 2\n");
    let out = dec(&["-i", "u.enc", "-o", "u.out"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("3 cells (max_cells = 2)"),
        "{}",
        stderr(&out)
    );
    assert!(!c.path("u.out").exists());
    // From stdin: cannot be counted first.
    let sealed = std::fs::read(c.path("u.enc")).unwrap();
    let mut v = vec!["columns", "decrypt"];
    v.extend(cols);
    let out = c.run_in(&v, &sealed);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    // Nothing released: at most the abort marker a failed run leaves on a
    // stdout dump (FORMAT section 6, "Failed runs").
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.is_empty() || stdout.starts_with("hsmseal: aborted"),
        "{stdout}"
    );
    // The override, and a limit the dump fits in.
    let out = dec(&["-i", "u.enc", "-o", "u.out", "--override-limits"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        std::fs::read(c.path("u.out")).unwrap(),
        b"id,ssn\n1,x\n2,y\n3,z\n"
    );
    write(&c.path("hsmseal.toml"), b"[limits.k]\nmax_cells = 3\n");
    let out = dec(&["-i", "u.enc", "-o", "u.out"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}
