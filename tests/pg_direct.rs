//! `hsmseal pg` against a real PostgreSQL (issue 11 item 1): each test
//! starts its own server (initdb as the `postgres` user when run as root,
//! in a temp dir, on a free loopback port, password authentication over
//! TCP) and its own SoftHSM2 token. Skipped, with the reason printed, only
//! when no PostgreSQL binaries are installed; CI installs them.

#[path = "support/pg.rs"]
mod pgserver;
mod support;

use pgserver::{count, pg, pg_ok, run_pg, Pg, PASSWORD};
use postgres::Client;
use std::process::{Output, Stdio};
use support::{blind_index, code, stderr, Cli, BIN};

/// The nasty-value table of the issue, with a composite primary key.
const NASTY: &str = r#"
CREATE TABLE public.nasty (
    tenant int NOT NULL,
    id bigint NOT NULL,
    t text,
    j jsonb,
    n numeric,
    ts timestamptz,
    b bytea,
    PRIMARY KEY (tenant, id));
INSERT INTO public.nasty
SELECT g % 7, g,
       CASE g % 16
         WHEN 0 THEN NULL
         WHEN 1 THEN ''
         WHEN 2 THEN E'line\nbreak\r\nand\ttab'
         WHEN 3 THEN E'back\\slash \\N \\. end'
         WHEN 4 THEN '\.'
         WHEN 5 THEN '\N'
         WHEN 6 THEN 'quotes "double" and ''single'''
         WHEN 7 THEN 'emoji 👩‍👩‍👧 rtl مرحبا combining é'
         WHEN 8 THEN CASE WHEN g = 8 THEN repeat('x', 1000000) ELSE 'x' || g END
         WHEN 9 THEN E'\x01\x7f bell'
         WHEN 10 THEN 'hsc1.example.com'
         ELSE 'plain ' || g END,
       CASE WHEN g % 5 = 0 THEN NULL
            WHEN g = 3 THEN jsonb_build_object('big', repeat('y', 100000))
            ELSE jsonb_build_object('k', g, 's', E'a\nb', 'u', '😀') END,
       CASE g % 6 WHEN 0 THEN 'NaN' WHEN 1 THEN NULL WHEN 2 THEN '-12.5e-3' ELSE g * 1.25 END,
       CASE g % 4 WHEN 0 THEN timestamptz '0044-03-15 12:00:00+00 BC' WHEN 1 THEN 'infinity'
            WHEN 2 THEN '-infinity' ELSE timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute' END,
       CASE WHEN g % 9 = 0 THEN NULL WHEN g % 9 = 1 THEN ''::bytea
            WHEN g = 4 THEN convert_to(repeat('z', 1048576), 'UTF8')
            ELSE decode(md5(g::text) || '000a5c0d', 'hex') END
FROM generate_series(1, 2000) g;
CREATE TABLE public.nasty_orig AS SELECT * FROM public.nasty;
"#;

const NCOLS: [&str; 5] = ["t", "j", "n", "ts", "b"];

fn same_as_orig(c: &mut Client, table: &str) {
    let a = count(c, &format!("SELECT count(*) FROM (SELECT * FROM {table} EXCEPT ALL SELECT * FROM public.nasty_orig) x"));
    let b = count(c, &format!("SELECT count(*) FROM (SELECT * FROM public.nasty_orig EXCEPT ALL SELECT * FROM {table}) x"));
    assert_eq!((a, b), (0, 0), "{table} differs from the original");
    for col in NCOLS {
        for pred in ["IS NULL", "::text = ''"] {
            let mut q = |t: &str| count(c, &format!("SELECT count(*) FROM {t} WHERE {col} {pred}"));
            let (x, y) = (q(table), q("public.nasty_orig"));
            assert_eq!(x, y, "{col} {pred}");
        }
    }
}

#[test]
fn nasty_table_with_composite_key_round_trips_and_reruns_change_nothing() {
    let Some(db) = Pg::start() else { return };
    let cli = Cli::with_key();
    let mut c = db.client();
    c.batch_execute(NASTY).unwrap();
    let cols = NCOLS.join(",");
    let base = ["--table", "public.nasty", "--columns", &cols];

    // Non-text columns without --alter: refused, named, nothing changed.
    let out = pg(
        &cli,
        &db,
        &["encrypt", base[0], base[1], base[2], base[3], "--key", "k"],
    );
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("column \"j\" of public.nasty is jsonb"),
        "{}",
        stderr(&out)
    );

    // --dry-run writes nothing.
    let mut a = base.to_vec();
    a.extend(["--key", "k", "--alter", "--dry-run"]);
    let mut args = vec!["encrypt"];
    args.extend(&a);
    let s = pg_ok(&cli, &db, &args);
    let cells = 2000 * 5 - count(&mut c, "SELECT sum((t IS NULL)::int + (j IS NULL)::int + (n IS NULL)::int + (ts IS NULL)::int + (b IS NULL)::int) FROM public.nasty");
    assert_eq!(s["changed"], cells);
    same_as_orig(&mut c, "public.nasty");

    let mut args = vec!["encrypt"];
    args.extend(&base);
    args.extend(["--key", "k", "--alter", "--chunk-rows", "97"]);
    let s = pg_ok(&cli, &db, &args);
    assert_eq!(s["changed"], cells);
    assert_eq!(s["rows"], 2000);
    // Every non-NULL value is a token; NULLs stay NULL; the columns are text.
    for col in NCOLS {
        let clear = count(
            &mut c,
            &format!("SELECT count(*) FROM public.nasty WHERE {col} NOT LIKE 'hsc_.%'"),
        );
        assert_eq!(clear, 0, "{col} has clear values");
        let nulls = |t: &str, c: &mut Client| {
            count(c, &format!("SELECT count(*) FROM {t} WHERE {col} IS NULL"))
        };
        assert_eq!(
            nulls("public.nasty", &mut c),
            nulls("public.nasty_orig", &mut c)
        );
    }
    let types = count(&mut c, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'nasty' AND data_type = 'text'");
    assert_eq!(types, 5);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM hsmseal.progress"),
        0,
        "a finished run leaves no cursor"
    );

    // status: per column counts and the key version.
    let out = run_pg(
        &cli,
        true,
        &db.dsn(),
        &["status", "--table", "public.nasty", "--columns", &cols],
        &[("PGPASSWORD", PASSWORD)],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines = support::json_of_type(&out.stdout, "pg_column");
    assert_eq!(lines.len(), 5);
    for l in &lines {
        let col = l["column"].as_str().unwrap();
        let nulls = count(
            &mut c,
            &format!("SELECT count(*) FROM public.nasty_orig WHERE {col} IS NULL"),
        );
        assert_eq!(l["nulls"], nulls);
        assert_eq!(l["clear"], 0);
        assert_eq!(l["tokens"], 2000 - nulls);
        assert_eq!(
            l["keys"],
            serde_json::json!([{"name": "k", "version": 1, "token_version": 2, "tokens": 2000 - nulls}])
        );
    }

    // A re-run changes nothing; verify opens everything.
    let s = pg_ok(&cli, &db, &args);
    assert_eq!(
        (s["changed"].as_i64(), s["unchanged_tokens"].as_i64()),
        (Some(0), Some(cells))
    );
    let mut v = vec!["verify"];
    v.extend(&base);
    let s = pg_ok(&cli, &db, &v);
    assert_eq!(s["cells"], cells);

    // Rotate to a new version, twice: the second changes nothing.
    cli.ok(&["key", "rotate", "k"]);
    let mut r = vec!["rotate"];
    r.extend(&base);
    assert_eq!(pg_ok(&cli, &db, &r)["changed"], cells);
    assert_eq!(pg_ok(&cli, &db, &r)["changed"], 0);

    // Decrypt: the original table back, types included; again: no change.
    let mut d = vec!["decrypt"];
    d.extend(&base);
    assert_eq!(pg_ok(&cli, &db, &d)["changed"], cells);
    same_as_orig(&mut c, "public.nasty");
    assert_eq!(count(&mut c, "SELECT count(*) FROM hsmseal.columns"), 0);
    let s = pg_ok(&cli, &db, &d);
    assert_eq!(
        (s["changed"].as_i64(), s["clear"].as_i64()),
        (Some(0), Some(cells))
    );
    same_as_orig(&mut c, "public.nasty");
}

#[test]
fn a_token_moved_to_another_row_fails_and_bad_setups_are_refused() {
    let Some(db) = Pg::start() else { return };
    let cli = Cli::with_key();
    let mut c = db.client();
    // (1, 23) and (12, 3): a binding that concatenated the key columns
    // would give both rows the same id.
    c.batch_execute(
        "CREATE TABLE public.acct (a int, b int, secret text, PRIMARY KEY (a, b));
         INSERT INTO public.acct VALUES (1, 23, 'one'), (12, 3, 'two'), (5, 5, 'three');
         CREATE TABLE public.nopk (x int, secret text);
         INSERT INTO public.nopk VALUES (1, 'a');",
    )
    .unwrap();
    let base = ["--table", "public.acct", "--columns", "secret"];
    let mut e = vec!["encrypt"];
    e.extend(&base);
    e.extend(["--key", "k"]);
    assert_eq!(pg_ok(&cli, &db, &e)["changed"], 3);
    c.batch_execute(
        "UPDATE public.acct SET secret = (SELECT secret FROM public.acct WHERE a = 1) WHERE a = 12",
    )
    .unwrap();
    for op in ["verify", "decrypt", "encrypt"] {
        let mut args = vec![op];
        args.extend(&base);
        if op == "encrypt" {
            args.extend(["--key", "k"]);
        }
        let out = pg(&cli, &db, &args);
        assert_eq!(code(&out), 3, "{op}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("row (a, b) = (12, 3), column \"secret\""),
            "{op}: {}",
            stderr(&out)
        );
    }
    // The failed decrypt changed nothing (its chunk rolled back).
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.acct WHERE secret LIKE 'hsc_.%'"
        ),
        3
    );

    // No primary key: --row-id needed, and then a unique index.
    let nopk = [
        "encrypt",
        "--table",
        "public.nopk",
        "--columns",
        "secret",
        "--key",
        "k",
    ];
    let out = pg(&cli, &db, &nopk);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("has no primary key: pass --row-id"),
        "{}",
        stderr(&out)
    );
    let out = pg(&cli, &db, &[&nopk[..], &["--row-id", "x"]].concat());
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("no unique index"), "{}", stderr(&out));
    c.batch_execute("CREATE UNIQUE INDEX ON public.nopk (x)")
        .unwrap();
    let a = [&nopk[..], &["--row-id", "x", "--atomic"]].concat();
    assert_eq!(pg_ok(&cli, &db, &a)["changed"], 1);
    let a = [
        "decrypt",
        "--table",
        "public.nopk",
        "--columns",
        "secret",
        "--row-id",
        "x",
    ];
    assert_eq!(pg_ok(&cli, &db, &a)["changed"], 1);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.nopk WHERE secret = 'a'"
        ),
        1
    );
    // A cursor edited by hand in hsmseal.progress (a NULL element, or not
    // one value per key column) is refused with the fix, not resumed from
    // (and not a panic): exit 8, the value left in clear.
    for bad in ["ARRAY[NULL]::text[]", "ARRAY['1', '2']"] {
        c.batch_execute(&format!(
            "INSERT INTO hsmseal.progress VALUES ('public.nopk', '[\"secret\"]', 'encrypt', {bad}, 5, now(), now())"
        ))
        .unwrap();
        let out = pg(&cli, &db, &[&nopk[..], &["--row-id", "x"]].concat());
        assert_eq!(code(&out), 8, "{bad}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("DELETE FROM hsmseal.progress WHERE table_name = 'public.nopk'"),
            "{}",
            stderr(&out)
        );
        assert_eq!(
            stderr(&out).trim_end().lines().count(),
            1,
            "{}",
            stderr(&out)
        );
        c.batch_execute("DELETE FROM hsmseal.progress").unwrap();
    }
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.nopk WHERE secret = 'a'"
        ),
        1
    );

    // The password: refused in --dsn, never printed; a wrong one fails
    // without echoing it; ~/.pgpass (PGPASSFILE) supplies a right one.
    let dsn = format!(
        "postgresql://postgres:{PASSWORD}@127.0.0.1:{}/postgres",
        db.port
    );
    let status = ["status", "--table", "public.acct", "-c", "secret"];
    let out = run_pg(&cli, false, &dsn, &status, &[]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("--dsn holds a password"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(PASSWORD) && !stderr(&out).contains("postgresql://"));
    let dsn = db.dsn();
    let out = run_pg(
        &cli,
        false,
        &dsn,
        &status,
        &[("PGPASSWORD", "wrong-Pw-123")],
    );
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("postgres@127.0.0.1:{}/postgres", db.port)),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("wrong-Pw-123"));
    let passfile = cli.path("pgpass");
    std::fs::write(
        &passfile,
        format!("127.0.0.1:{}:postgres:postgres:{PASSWORD}\n", db.port),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run_pg(
        &cli,
        false,
        &dsn,
        &status,
        &[("PGPASSFILE", passfile.to_str().unwrap())],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("public.acct.secret: 3 rows, 0 NULL, 0 clear, 3 tokens"),
        "{text}"
    );
}

/// A table done by `pg encrypt` decrypts from a COPY text dump with
/// `columns decrypt`, and a dump encrypted by `columns encrypt` loads
/// into a table `pg decrypt` opens.
#[test]
fn interoperates_with_the_dump_path() {
    let Some(db) = Pg::start() else { return };
    let cli = Cli::with_key();
    let mut c = db.client();
    c.batch_execute(
        r#"CREATE TABLE public.users (id bigint PRIMARY KEY, email text, note text);
           INSERT INTO public.users SELECT g, CASE WHEN g % 5 = 0 THEN NULL ELSE 'u' || g || '@example.com' END,
                  CASE g % 4 WHEN 0 THEN '' WHEN 1 THEN E'tab\there\nline \\N \\.' ELSE 'é 😀' END
             FROM generate_series(1, 500) g;
           CREATE TABLE public.users2 (LIKE public.users INCLUDING ALL);"#,
    )
    .unwrap();
    let copy_out = |c: &mut Client, t: &str| {
        let mut r = c
            .copy_out(&format!(
                "COPY (SELECT * FROM {t} ORDER BY id) TO STDOUT (FORMAT text, HEADER)"
            ))
            .unwrap();
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut v).unwrap();
        v
    };
    let orig = copy_out(&mut c, "public.users");
    let cols = ["--columns", "email,note"];
    let mut e = vec![
        "encrypt",
        "--table",
        "public.users",
        cols[0],
        cols[1],
        "--key",
        "k",
    ];
    pg_ok(&cli, &db, &e);
    let enc = copy_out(&mut c, "public.users");
    let dec = cli.run_in(
        &[
            "columns",
            "decrypt",
            "--format",
            "pgcopy",
            "--columns",
            "email,note",
            "--row-id",
            "id",
            "--context",
            "public.users",
        ],
        &enc,
    );
    assert_eq!(code(&dec), 0, "{}", stderr(&dec));
    assert!(
        dec.stdout == orig,
        "columns decrypt of a pg encrypt table differs from the original dump"
    );

    // The other way: columns encrypt, COPY FROM into users2, pg decrypt
    // (the context names the table the tokens were made for).
    let enc2 = cli.run_in(
        &[
            "columns",
            "encrypt",
            "--key",
            "k",
            "--format",
            "pgcopy",
            "--columns",
            "email,note",
            "--row-id",
            "id",
            "--context",
            "public.users",
        ],
        &orig,
    );
    assert_eq!(code(&enc2), 0, "{}", stderr(&enc2));
    {
        let mut w = c
            .copy_in("COPY public.users2 FROM STDIN (FORMAT text, HEADER)")
            .unwrap();
        std::io::Write::write_all(&mut w, &enc2.stdout).unwrap();
        w.finish().unwrap();
    }
    e = vec![
        "decrypt",
        "--table",
        "public.users2",
        cols[0],
        cols[1],
        "--context",
        "public.users",
    ];
    assert_eq!(pg_ok(&cli, &db, &e)["changed"], 500 - 100 + 500);
    assert!(copy_out(&mut c, "public.users2") == orig);
}

/// kill -9 at 20 points of `pg encrypt` over 200,000 rows, then a resumed
/// run: every value encrypted exactly once, decrypting to the original;
/// and two runs at once on one table (the advisory lock). One connection.
#[test]
fn killed_runs_resume_and_concurrent_runs_serialise() {
    kill_and_resume(1);
}

/// The same with two key ranges walked at once (`--jobs 2`): each range
/// commits chunk by chunk with its own cursor row, so a kill leaves both
/// ranges resumable, and the resumed runs walk the ranges stored by the
/// first run.
#[test]
fn killed_two_job_runs_resume_and_concurrent_runs_serialise() {
    kill_and_resume(2);
}

fn kill_and_resume(jobs: u32) {
    let Some(db) = Pg::start() else { return };
    let cli = Cli::with_key();
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE public.big (id bigint PRIMARY KEY, a text, b text);
         INSERT INTO public.big SELECT g, 'a' || g, CASE WHEN g % 3 = 0 THEN NULL ELSE md5(g::text) END
           FROM generate_series(1, 200000) g;
         CREATE TABLE public.big_orig AS SELECT * FROM public.big;",
    )
    .unwrap();
    let dsn = db.dsn();
    let jobs_s = jobs.to_string();
    let args = [
        "pg",
        "encrypt",
        "--dsn",
        &dsn,
        "--table",
        "public.big",
        "--columns",
        "a,b",
        "--key",
        "k",
        "--chunk-rows",
        "500",
        "--jobs",
        &jobs_s,
    ];
    // Deterministic "random" delays (xorshift), 150-600 ms: long enough to
    // log in and get going, short enough not to finish.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut killed_mid_run = 0;
    let mut progress = Vec::new();
    for _ in 0..20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut cmd = cli.cmd();
        cmd.args(args)
            .env("PGPASSWORD", PASSWORD)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(150 + x % 450));
        if child.try_wait().unwrap().is_none() {
            killed_mid_run += 1;
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        let enc = count(
            &mut c,
            "SELECT count(*) FROM public.big WHERE a LIKE 'hsc_.%'",
        );
        progress.push(enc);
    }
    eprintln!(
        "killed {killed_mid_run} of 20 runs mid-run; encrypted rows after each: {progress:?}"
    );
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {progress:?}"
    );
    // The cursors (one per key range, stored before the first chunk)
    // exist until the walk ends.
    let last = *progress.last().unwrap();
    if last > 0 && last < 200000 {
        assert_eq!(
            count(
                &mut c,
                "SELECT count(*) FROM hsmseal.progress WHERE op = 'encrypt'"
            ),
            i64::from(jobs)
        );
        if jobs > 1 {
            // Both ranges made progress: they are walked at once.
            assert_eq!(
                count(
                    &mut c,
                    "SELECT count(*) FROM hsmseal.progress WHERE op = 'encrypt' AND rows_done > 0"
                ),
                i64::from(jobs)
            );
        }
    }
    // Two runs at once: one waits for the other's advisory lock.
    let spawn = || {
        let mut cmd = cli.cmd();
        cmd.args(args)
            .arg("--json")
            .env("PGPASSWORD", PASSWORD)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    };
    let (p1, p2) = (spawn(), spawn());
    let (o1, o2) = (
        p1.wait_with_output().unwrap(),
        p2.wait_with_output().unwrap(),
    );
    assert_eq!(
        (code(&o1), code(&o2)),
        (0, 0),
        "{} {}",
        stderr(&o1),
        stderr(&o2)
    );
    let changed = |o: &Output| -> i64 {
        let l = String::from_utf8_lossy(&o.stderr)
            .lines()
            .chain(String::from_utf8_lossy(&o.stdout).lines())
            .filter(|l| l.contains("\"summary\""))
            .map(|l| l.to_string())
            .collect::<Vec<_>>();
        let v: serde_json::Value = serde_json::from_str(&l[0]).unwrap();
        v["changed"].as_i64().unwrap()
    };
    let total_cells = 200000
        + count(
            &mut c,
            "SELECT count(*) FROM public.big_orig WHERE b IS NOT NULL",
        );
    let (c1, c2) = (changed(&o1), changed(&o2));
    assert!(c1 == 0 || c2 == 0, "both runs changed cells: {c1} {c2}");
    // Fully encrypted, once: every token opens, and decrypts to the original.
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.big WHERE a NOT LIKE 'hsc_.%' OR b NOT LIKE 'hsc_.%'"
        ),
        0
    );
    let v = pg_ok(
        &cli,
        &db,
        &["verify", "--table", "public.big", "--columns", "a,b"],
    );
    assert_eq!(v["cells"], total_cells);
    let d = pg_ok(
        &cli,
        &db,
        &[
            "decrypt",
            "--table",
            "public.big",
            "--columns",
            "a,b",
            "--chunk-rows",
            "5000",
        ],
    );
    assert_eq!(
        d["changed"], total_cells,
        "a value was encrypted twice, or lost"
    );
    let diff = count(&mut c, "SELECT count(*) FROM (SELECT * FROM public.big EXCEPT ALL SELECT * FROM public.big_orig) x")
        + count(&mut c, "SELECT count(*) FROM (SELECT * FROM public.big_orig EXCEPT ALL SELECT * FROM public.big) x");
    assert_eq!(diff, 0);
    let _ = BIN;
}

/// `pg encrypt --blind-index` (issue 11 item 4 in direct mode): the index
/// goes into the companion column in the same UPDATE as the token; a lookup
/// with `columns index` (value on stdin, context SCHEMA.TABLE) finds exactly
/// the right row, a near miss none; a re-run changes nothing; a missing
/// target is exit 2 without --alter and added as text with it.
#[test]
fn blind_index_lookup_finds_exactly_the_row_and_reruns_keep_it() {
    let Some(db) = Pg::start() else { return };
    let cli = Cli::with_key();
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE public.users (id bigint PRIMARY KEY, email text, name text);
         INSERT INTO public.users SELECT g, 'user' || g || '@example.com', 'N' || g FROM generate_series(1, 500) g;
         INSERT INTO public.users VALUES (1000, NULL, 'no mail'), (1001, ' Alice@Example.COM ', 'alice');",
    )
    .unwrap();
    let walk = [
        "encrypt",
        "--table",
        "public.users",
        "--columns",
        "email,name",
        "--key",
        "k",
        "--chunk-rows",
        "100",
    ];
    let enc = [&walk[..], &blind_index("email", "lower-trim", None)].concat();
    // No email_bidx column and no --alter: exit 2 naming it, nothing changed.
    let out = pg(&cli, &db, &enc);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("email_bidx"), "{}", stderr(&out));
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.users WHERE email LIKE 'hsc%'"
        ),
        0
    );
    // An index not on an encrypted column: exit 2.
    let out = pg(
        &cli,
        &db,
        &[&walk[..], &blind_index("id", "none", None)].concat(),
    );
    assert_eq!(code(&out), 2, "{}", stderr(&out));

    let mut with_alter = enc.to_vec();
    with_alter.push("--alter");
    assert_eq!(pg_ok(&cli, &db, &with_alter)["changed"], 2 * 501 + 1);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.users WHERE email_bidx ~ '^[0-9a-f]{16}$'"
        ),
        501,
        "one 64-bit hex index per non-NULL email"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.users WHERE email_bidx IS NULL"
        ),
        1
    );

    let lookup = |value: &str| -> String {
        let out = cli.run_in(
            &[
                "columns",
                "index",
                "--key",
                "k",
                "--column",
                "email",
                "--context",
                "public.users",
                "--normalize",
                "lower-trim",
            ],
            value.as_bytes(),
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        String::from_utf8(out.stdout)
            .unwrap()
            .trim_end()
            .to_string()
    };
    let ids = |c: &mut Client, bidx: &str| -> Vec<i64> {
        c.query(
            "SELECT id FROM public.users WHERE email_bidx = $1 ORDER BY id",
            &[&bidx],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert_eq!(ids(&mut c, &lookup("user42@example.com\n")), vec![42]);
    assert_eq!(
        ids(&mut c, &lookup("alice@example.com")),
        vec![1001],
        "normalised"
    );
    assert!(
        ids(&mut c, &lookup("user42@example.co")).is_empty(),
        "a near miss"
    );
    assert_eq!(
        ids(&mut c, &lookup(" USER4@example.com")),
        vec![4],
        "lower-trim"
    );

    // A re-run (tokens are left as they are) changes neither token nor index.
    let snapshot = |c: &mut Client| -> Vec<(i64, Option<String>, Option<String>)> {
        c.query(
            "SELECT id, email, email_bidx FROM public.users ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    };
    let before = snapshot(&mut c);
    let s = pg_ok(&cli, &db, &with_alter);
    assert_eq!(
        (s["changed"].as_u64(), s["unchanged_tokens"].as_u64()),
        (Some(0), Some(1003))
    );
    assert_eq!(snapshot(&mut c), before);
    // A new row is encrypted and indexed by the next run; the rest kept.
    c.batch_execute("INSERT INTO public.users VALUES (2000, 'new@example.com', 'new')")
        .unwrap();
    assert_eq!(pg_ok(&cli, &db, &with_alter)["changed"], 2);
    assert_eq!(ids(&mut c, &lookup("new@example.com")), vec![2000]);
    // Decrypt leaves the index column alone; the values come back.
    pg_ok(
        &cli,
        &db,
        &[
            "decrypt",
            "--table",
            "public.users",
            "--columns",
            "email,name",
        ],
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.users WHERE id = 42 AND email = 'user42@example.com'"
        ),
        1
    );
}

/// The decrypt limits of hsmseal.toml (issue 12 item 5) hold for `pg
/// decrypt`: the table's tokens are counted and charged before any value
/// is decrypted, so an over-limit run changes nothing (exit 2); a table
/// within the limit decrypts; `--override-limits` goes through and the
/// audit entry names the override.
#[test]
fn pg_decrypt_limits_are_charged_before_anything_is_decrypted() {
    let Some(db) = Pg::start() else { return };
    let cli = Cli::with_key();
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE public.lim (id int PRIMARY KEY, s text);
         INSERT INTO public.lim SELECT g, 'v' || g FROM generate_series(1, 50) g;",
    )
    .unwrap();
    let enc = [
        "encrypt",
        "--table",
        "public.lim",
        "--columns",
        "s",
        "--key",
        "k",
    ];
    let dec = ["decrypt", "--table", "public.lim", "--columns", "s"];
    let tokens = |c: &mut Client| count(c, "SELECT count(*) FROM public.lim WHERE s LIKE 'hsc%'");
    pg_ok(&cli, &db, &enc);
    assert_eq!(tokens(&mut c), 50);

    std::fs::write(cli.path("hsmseal.toml"), "[limits.k]\nmax_cells = 49\n").unwrap();
    let out = pg(&cli, &db, &dec);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("[limits.k]"), "{}", stderr(&out));
    assert_eq!(tokens(&mut c), 50, "an over-limit run decrypts nothing");

    std::fs::write(cli.path("hsmseal.toml"), "[limits.k]\nmax_cells = 50\n").unwrap();
    pg_ok(&cli, &db, &dec);
    assert_eq!(tokens(&mut c), 0);

    pg_ok(&cli, &db, &enc);
    std::fs::write(cli.path("hsmseal.toml"), "[limits.k]\nmax_cells = 1\n").unwrap();
    cli.ok(&["--audit-log", "audit.log", "audit", "init"]);
    let dsn = db.dsn();
    let over = [
        &["--audit-log", "audit.log", "pg", "decrypt", "--dsn", &dsn][..],
        &dec[1..],
        &["--override-limits"],
    ]
    .concat();
    let out = cli.run_with(&over, None, &[("PGPASSWORD", PASSWORD)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(tokens(&mut c), 0);
    let log = std::fs::read_to_string(cli.path("audit.log")).unwrap();
    assert!(
        log.lines()
            .last()
            .unwrap()
            .contains("\"command\":\"pg decrypt --override-limits\""),
        "{log}"
    );
}

/// Key versions of two LEB128 bytes (issue 11's gap: `pg status` decodes
/// the v2 header's varint version in SQL, `columns inspect` in Rust, and
/// both were only run on 1-byte versions). Column `a` is sealed under v127
/// (`7f`, the last 1-byte varint), column `b` under v128 (`80 01`, the
/// first 2-byte one); both readers must count each column under its own
/// version, and nothing as malformed.
#[test]
fn status_and_inspect_count_tokens_of_two_byte_key_versions() {
    let Some(db) = Pg::start() else { return };
    let cli = Cli::with_key();
    // The only way to version 127 is 126 rotations (a third of a second
    // each on SoftHSM2): no shortcut that a real token would not take.
    for _ in 0..126 {
        cli.ok(&["key", "rotate", "k"]);
    }
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE public.v (id int PRIMARY KEY, a text, b text);
         INSERT INTO public.v SELECT g, CASE WHEN g % 10 = 0 THEN NULL ELSE 'a' || g END,
                CASE WHEN g % 7 = 0 THEN NULL ELSE 'b' || g END
           FROM generate_series(1, 300) g;",
    )
    .unwrap();
    let enc = |col: &str| {
        let s = pg_ok(
            &cli,
            &db,
            &["encrypt", "--table", "public.v", "-c", col, "--key", "k"],
        );
        assert_eq!(s["keys"][0]["version"], if col == "a" { 127 } else { 128 });
    };
    enc("a");
    cli.ok(&["key", "rotate", "k"]);
    enc("b");
    let (a_tokens, b_tokens) = (300 - 30, 300 - 42);
    let expect = |col: &str| {
        let (v, n) = if col == "a" {
            (127, a_tokens)
        } else {
            (128, b_tokens)
        };
        serde_json::json!([{"name": "k", "version": v, "token_version": 2, "tokens": n}])
    };

    let out = run_pg(
        &cli,
        true,
        &db.dsn(),
        &["status", "--table", "public.v", "-c", "a,b"],
        &[("PGPASSWORD", PASSWORD)],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines = support::json_of_type(&out.stdout, "pg_column");
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let col = l["column"].as_str().unwrap();
        assert_eq!(l["malformed"], 0, "{l}");
        assert_eq!(l["keys"], expect(col), "pg status, column {col}");
    }

    // The same table as a COPY text dump through `columns inspect`.
    let mut dump = Vec::new();
    let mut r = c
        .copy_out("COPY public.v TO STDOUT (FORMAT text, HEADER)")
        .unwrap();
    std::io::Read::read_to_end(&mut r, &mut dump).unwrap();
    drop(r);
    let out = cli.run_in(
        &[
            "--json", "columns", "inspect", "--format", "pgcopy", "-c", "a,b",
        ],
        &dump,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines = support::json_of_type(&out.stdout, "column");
    assert_eq!(lines.len(), 2, "{}", String::from_utf8_lossy(&out.stdout));
    for l in &lines {
        let col = l["column"].as_str().unwrap();
        assert_eq!(l["malformed"], 0, "{l}");
        assert_eq!(l["keys"], expect(col), "columns inspect, column {col}");
    }

    // And the tokens open: a v128 token is not misread as another version.
    let s = pg_ok(&cli, &db, &["verify", "--table", "public.v", "-c", "a,b"]);
    assert_eq!(s["cells"], a_tokens + b_tokens);
}

/// A token-shaped value whose key name is not UTF-8 (or is UTF-8 but not a
/// valid key name): `pg status` counts it as malformed and exits 0, as
/// `columns inspect` does for the same text, instead of failing the whole
/// count (the server's convert_from() refused the name, exit 7).
#[test]
fn status_counts_a_token_with_a_non_utf8_key_name_as_malformed_as_inspect_does() {
    use base64::Engine as _;
    let Some(db) = Pg::start() else { return };
    let cli = Cli::with_key();
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE public.m (id int PRIMARY KEY, a text);
         INSERT INTO public.m SELECT g, CASE WHEN g = 10 THEN NULL ELSE 'v' || g END
           FROM generate_series(1, 10) g;",
    )
    .unwrap();
    pg_ok(
        &cli,
        &db,
        &["encrypt", "--table", "public.m", "-c", "a", "--key", "k"],
    );
    // Real tokens of rows 1 and 2, their one-byte key name "k" replaced:
    // 0xff (not UTF-8) and a space (UTF-8, not a key name). Everything else
    // keeps the shape of a token.
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    for (id, byte) in [(1, 0xffu8), (2, b' ')] {
        let tok: String = c
            .query_one("SELECT a FROM public.m WHERE id = $1", &[&id])
            .unwrap()
            .get(0);
        let (prefix, body) = tok.split_at(5);
        let mut body = b64.decode(body).unwrap();
        assert_eq!(&body[..2], &[1, b'k'], "a token under key k");
        body[1] = byte;
        let bad = format!("{prefix}{}", b64.encode(&body));
        c.execute("UPDATE public.m SET a = $1 WHERE id = $2", &[&bad, &id])
            .unwrap();
    }
    let out = run_pg(
        &cli,
        true,
        &db.dsn(),
        &["status", "--table", "public.m", "-c", "a"],
        &[("PGPASSWORD", PASSWORD)],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let st = support::json_one(&out.stdout, "pg_column");
    assert_eq!(
        (
            &st["rows"],
            &st["nulls"],
            &st["clear"],
            &st["tokens"],
            &st["malformed"]
        ),
        (&10.into(), &1.into(), &0.into(), &7.into(), &2.into()),
        "{st}"
    );
    assert_eq!(st["keys"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(st["keys"][0]["name"], "k", "{st}");
    // The line form says it too.
    let out = pg(&cli, &db, &["status", "--table", "public.m", "-c", "a"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(", 2 malformed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The same table as a COPY text dump through `columns inspect`.
    let mut dump = Vec::new();
    let mut r = c
        .copy_out("COPY public.m TO STDOUT (FORMAT text, HEADER)")
        .unwrap();
    std::io::Read::read_to_end(&mut r, &mut dump).unwrap();
    drop(r);
    let out = cli.run_in(
        &[
            "--json", "columns", "inspect", "--format", "pgcopy", "-c", "a",
        ],
        &dump,
    );
    // inspect warns with exit 1 about malformed values in a dump (its
    // documented code); pg status reports them and exits 0.
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("2 token-looking values do not parse"),
        "{}",
        stderr(&out)
    );
    let ins = support::json_one(&out.stdout, "column");
    for f in ["rows", "nulls", "clear", "tokens", "malformed", "keys"] {
        assert_eq!(st[f], ins[f], "pg status and columns inspect differ on {f}");
    }
}

/// A database whose hsmseal.progress has the schema from before key ranges
/// (no part, parts, hi_key, done; last_key NOT NULL) and holds a cursor of
/// an interrupted run: the next run adds the columns once and resumes from
/// that cursor, as one open-ended range (rows at or before it are left
/// alone), and removes the cursor at the end.
#[test]
fn progress_of_the_old_schema_is_migrated_and_resumed() {
    let Some(db) = Pg::start() else { return };
    let cli = Cli::with_key();
    let mut c = db.client();
    c.batch_execute(
        r#"CREATE TABLE public.o (id int PRIMARY KEY, a text);
         INSERT INTO public.o SELECT g, 'v' || g FROM generate_series(1, 100) g;
         CREATE SCHEMA hsmseal;
         CREATE TABLE hsmseal.progress (
             table_name text NOT NULL, columns text NOT NULL, op text NOT NULL,
             last_key text[] NOT NULL, rows_done bigint NOT NULL,
             started timestamptz NOT NULL, updated timestamptz NOT NULL,
             PRIMARY KEY (table_name, columns, op));
         INSERT INTO hsmseal.progress VALUES ('public.o', '["a"]', 'encrypt', ARRAY['40'], 40, now(), now());"#,
    )
    .unwrap();
    let s = pg_ok(
        &cli,
        &db,
        &[
            "encrypt", "--table", "public.o", "-c", "a", "--key", "k", "--jobs", "2",
        ],
    );
    assert_eq!(s["resumed_after_rows"], 40, "{s}");
    assert_eq!(s["changed"], 60, "{s}");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.o WHERE id <= 40 AND a NOT LIKE 'hsc_.%'"
        ),
        40,
        "rows before the cursor were walked again"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM hsmseal.progress"), 0);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM information_schema.columns
              WHERE table_schema = 'hsmseal' AND table_name = 'progress'
                AND column_name IN ('part', 'parts', 'hi_key', 'done')"
        ),
        4
    );
    // The next run (no cursor) splits the table into two ranges and
    // encrypts the rest.
    let s = pg_ok(
        &cli,
        &db,
        &[
            "encrypt", "--table", "public.o", "-c", "a", "--key", "k", "--jobs", "2",
        ],
    );
    assert_eq!(
        (&s["changed"], &s["unchanged_tokens"]),
        (&40.into(), &60.into()),
        "{s}"
    );
    assert_eq!(s["chunks"], 2, "one chunk per range: {s}");
}
