//! Blind indexes end to end, through the real binary and a SoftHSM2 token
//! of each test's own: `columns encrypt --blind-index` writes into the
//! companion column exactly what `columns index` prints for the plaintext
//! (read from stdin); the parameters that must separate indexes do;
//! rotation keeps them, destroying the key ends them; concurrent first uses
//! make one index key; the refusals (docs/FORMAT.md section 6, "Blind
//! indexes").

#[path = "support/pg.rs"]
mod pg;
mod support;

use std::collections::{HashMap, HashSet};
use support::{blind_index, code, stderr as err, Cli};

/// `columns encrypt -f FORMAT -k k -c COLUMNS`, then `rest` (row id,
/// context, blind indexes…).
fn encrypt<'a>(format: &'a str, columns: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["columns", "encrypt", "-f", format, "-k", "k", "-c", columns];
    a.extend_from_slice(rest);
    a
}

/// `columns index` of `value` (stdin), as printed (without the newline).
fn index(e: &Cli, args: &[&str], value: &[u8]) -> String {
    let mut a = vec!["columns", "index"];
    a.extend_from_slice(args);
    let o = e.run_in(&a, value);
    assert_eq!(code(&o), 0, "{}", err(&o));
    let s = String::from_utf8(o.stdout).unwrap();
    s.strip_suffix('\n').expect("one line").to_string()
}

fn email_index(e: &Cli, value: &[u8]) -> String {
    index(
        e,
        &["-k", "k", "--column", "email", "--context", "app.users"],
        value,
    )
}

/// Splits a simple CSV (no quoted commas in these tests) into rows.
fn rows(csv: &[u8]) -> Vec<Vec<String>> {
    String::from_utf8(csv.to_vec())
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[test]
fn csv_round_trip_every_index_is_what_columns_index_prints() {
    let e = Cli::with_key();
    let emails = [
        "alice@x.org",
        "bob@x.org",
        "alice@x.org",
        "",
        "carol@y.org",
        "bob@x.org",
    ];
    let mut csv = b"id,email,email_bidx,note\n".to_vec();
    for (i, m) in emails.iter().enumerate() {
        // '' is a value ("" quoted); row 7 has a NULL email.
        let m = if m.is_empty() {
            "\"\"".into()
        } else {
            m.to_string()
        };
        csv.extend_from_slice(format!("{i},{m},old{i},n{i}\n").as_bytes());
    }
    csv.extend_from_slice(b"6,,old6,n6\n");
    let args = [
        encrypt(
            "csv",
            "email",
            &["--row-id", "id", "--context", "app.users"],
        ),
        blind_index("email", "none", None),
    ]
    .concat();
    let enc = e.run_in(&args, &csv);
    assert_eq!(code(&enc), 0, "{}", err(&enc));
    let r = rows(&enc.stdout);
    assert_eq!(r[0], ["id", "email", "email_bidx", "note"]);
    let mut by_value: HashMap<&str, String> = HashMap::new();
    for (i, m) in emails.iter().enumerate() {
        let row = &r[i + 1];
        assert!(row[1].starts_with("hsc2."), "{row:?}");
        assert_eq!(row[3], format!("n{i}"));
        let want = email_index(&e, m.as_bytes());
        assert_eq!(row[2], want, "row {i}");
        assert_eq!(want.len(), 16);
        // Equal plaintexts, equal index; different, different.
        if let Some(prev) = by_value.insert(m, want.clone()) {
            assert_eq!(prev, want);
        }
    }
    let distinct: HashSet<&String> = by_value.values().collect();
    assert_eq!(distinct.len(), by_value.len());
    // NULL stays NULL (empty, unquoted) in the target too.
    assert_eq!(r[7], ["6", "", "", "n6"]);
    // A trailing newline on stdin is not part of the value; --raw keeps it.
    assert_eq!(email_index(&e, b"alice@x.org\r\n"), by_value["alice@x.org"]);
    assert_ne!(
        index(
            &e,
            &[
                "-k",
                "k",
                "--column",
                "email",
                "--context",
                "app.users",
                "--raw"
            ],
            b"alice@x.org\n"
        ),
        by_value["alice@x.org"]
    );
    // Decrypt leaves the index column as it is.
    let dec = e.run_in(
        &[
            "columns",
            "decrypt",
            "-f",
            "csv",
            "-c",
            "email",
            "--row-id",
            "id",
            "--context",
            "app.users",
        ],
        &enc.stdout,
    );
    assert_eq!(code(&dec), 0, "{}", err(&dec));
    let d = rows(&dec.stdout);
    for (i, m) in emails.iter().enumerate() {
        let m = if m.is_empty() { "\"\"" } else { m };
        assert_eq!(d[i + 1][1], m);
        assert_eq!(d[i + 1][2], r[i + 1][2]);
    }
    // Re-running over the result with --skip-tokens: tokens are left
    // alone, and so are their indexes (no plaintext to hash).
    let mut again = args.to_vec();
    again.push("--skip-tokens");
    let o = e.run_in(&again, &enc.stdout);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert_eq!(o.stdout, enc.stdout);
}

#[test]
fn pgcopy_without_header_by_position_and_nulls() {
    let e = Cli::with_key();
    let dump = b"1\tAlice@X.org\t\\N\n2\t\\N\told\n3\t alice@x.org \tx\n4\tbob\\tx\t\n\\.\n";
    let enc = e.run_in(
        &[
            encrypt(
                "pgcopy",
                "2",
                &["--no-header", "--row-id", "1", "--context", "t"],
            ),
            blind_index("2=3", "lower-trim", Some("128")),
        ]
        .concat(),
        dump,
    );
    assert_eq!(code(&enc), 0, "{}", err(&enc));
    let text = String::from_utf8(enc.stdout).unwrap();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    let idx = |v: &[u8]| {
        index(
            &e,
            &[
                "-k",
                "k",
                "--column",
                "@2",
                "--context",
                "t",
                "--bits",
                "128",
                "--normalize",
                "lower-trim",
            ],
            v,
        )
    };
    let alice = idx(b"alice@x.org");
    assert_eq!(alice.len(), 32);
    // lower-trim: " alice@x.org " and "Alice@X.org" are one value.
    assert_eq!(lines[0][2], alice);
    assert_eq!(lines[2][2], alice);
    // NULL source: NULL index.
    assert_eq!(lines[1], ["2", "\\N", "\\N"]);
    // The COPY escape is decoded before hashing: bob<TAB>x.
    assert_eq!(lines[3][2], idx(b"bob\tx"));
    assert_eq!(lines[4], ["\\."]);
}

#[test]
fn every_parameter_gives_an_unrelated_index_and_rotation_keeps_them() {
    let e = Cli::with_key();
    e.ok(&["key", "create", "k2"]);
    let v = b"alice@x.org";
    let base = index(&e, &["-k", "k", "--column", "email", "--context", "c"], v);
    let others = [
        index(&e, &["-k", "k", "--column", "email", "--context", "d"], v),
        index(&e, &["-k", "k", "--column", "mail", "--context", "c"], v),
        index(&e, &["-k", "k", "--column", "@2", "--context", "c"], v),
        index(&e, &["-k", "k2", "--column", "email", "--context", "c"], v),
        index(
            &e,
            &[
                "-k",
                "k",
                "--column",
                "email",
                "--context",
                "c",
                "--bits",
                "72",
            ],
            v,
        ),
        index(
            &e,
            &[
                "-k",
                "k",
                "--column",
                "email",
                "--context",
                "c",
                "--normalize",
                "lower-trim",
            ],
            v,
        ),
    ];
    for o in &others {
        assert_ne!(&base[..], &o[..16.min(o.len())], "{o}");
    }
    let lt = |v: &[u8]| {
        index(
            &e,
            &["-k", "k", "-c", "email", "--normalize", "lower-trim"],
            v,
        )
    };
    let none = |v: &[u8]| index(&e, &["-k", "k", "-c", "email"], v);
    assert_eq!(lt(b" Alice@X.org "), lt(b"alice@x.org"));
    assert_ne!(none(b" Alice@X.org "), none(b"alice@x.org"));

    // Rotation (and purging the old version) keeps every value.
    e.ok(&["key", "rotate", "k"]);
    assert_eq!(
        index(&e, &["-k", "k", "--column", "email", "--context", "c"], v),
        base
    );
    e.ok(&["key", "destroy", "k", "--version", "1", "--yes"]);
    assert_eq!(
        index(&e, &["-k", "k", "--column", "email", "--context", "c"], v),
        base
    );
    // Destroying the key (its last version) destroys its index key: no
    // lookup is possible any more (exit 4), and no new key appears.
    e.ok(&["key", "destroy", "k", "--version", "2", "--force", "--yes"]);
    for _ in 0..2 {
        let o = e.run_in(
            &[
                "columns",
                "index",
                "-k",
                "k",
                "--column",
                "email",
                "--context",
                "c",
            ],
            v,
        );
        assert_eq!(code(&o), 4, "{}", err(&o));
        assert!(o.stdout.is_empty());
    }
    // The other key is untouched.
    index(&e, &["-k", "k2", "--column", "email", "--context", "c"], v);
}

#[test]
fn concurrent_first_uses_make_one_index_key() {
    let e = Cli::new();
    for round in 0..4 {
        let key = format!("c{round}");
        e.ok(&["key", "create", &key]);
        let children: Vec<_> = (0..4)
            .map(|_| {
                let mut c = e.cmd();
                c.args(["columns", "index", "-k", &key, "--column", "email"]);
                c.stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
                let mut child = c.spawn().unwrap();
                use std::io::Write;
                child.stdin.take().unwrap().write_all(b"v").unwrap();
                child
            })
            .collect();
        let outs: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        for o in &outs {
            assert_eq!(code(o), 0, "round {round}: {}", err(o));
        }
        // One object: every process computed with the same key, and a later
        // use finds exactly one (two objects with the label are refused).
        let first = &outs[0].stdout;
        assert!(outs.iter().all(|o| &o.stdout == first), "round {round}");
        let again = e.run_in(&["columns", "index", "-k", &key, "--column", "email"], b"v");
        assert_eq!(code(&again), 0, "{}", err(&again));
        assert_eq!(&again.stdout, first);
    }
}

#[test]
fn refusals_are_usage_or_format_errors_naming_the_fix() {
    let e = Cli::with_key();
    let csv = b"id,email,other\n1,a@x.org,z\n";
    let enc = |extra: &[&str]| {
        e.run_in(
            &[encrypt("csv", "email", &["--row-id", "id"]), extra.to_vec()].concat(),
            csv,
        )
    };
    // TARGET missing from the dump: exit 2 naming it, nothing written.
    let o = enc(&blind_index("email", "none", None));
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(
        err(&o).contains("\"email_bidx\" is not in the header"),
        "{}",
        err(&o)
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("a@x.org"));
    // COL not encrypted.
    let o = enc(&blind_index("other=other", "none", None));
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(
        err(&o).contains("not one of the encrypted --columns"),
        "{}",
        err(&o)
    );
    // The target is the encrypted column itself, or the row id.
    for t in ["email=email", "email=id"] {
        let o = enc(&blind_index(t, "none", None));
        assert_eq!(code(&o), 2, "{t}: {}", err(&o));
    }
    // Bad bits.
    for bits in ["8", "60", "264"] {
        let o = enc(&blind_index("email=other", "none", Some(bits)));
        assert_eq!(code(&o), 2, "{bits}: {}", err(&o));
        assert!(
            err(&o).contains("multiple of 8 from 16 to 256"),
            "{}",
            err(&o)
        );
        let o = e.run_in(
            &["columns", "index", "-k", "k", "-c", "email", "--bits", bits],
            b"v",
        );
        assert_eq!(code(&o), 2, "{bits}: {}", err(&o));
    }
    // The value can never be given on the command line.
    let o = e.run(&["columns", "index", "-k", "k", "-c", "email", "a@x.org"]);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(!err(&o).contains("a@x.org") || err(&o).contains("unexpected argument"));
    let o = e.run(&[
        "columns", "index", "-k", "k", "-c", "email", "--value", "a@x.org",
    ]);
    assert_eq!(code(&o), 2, "{}", err(&o));
    // Not UTF-8 under lower-trim: a format error naming the row and column.
    let o = e.run_in(
        &[
            encrypt("csv", "email", &[]),
            blind_index("email=other", "lower-trim", None),
        ]
        .concat(),
        b"id,email,other\n1,a\xff,z\n",
    );
    assert_eq!(code(&o), 8, "{}", err(&o));
    assert!(err(&o).contains("row 2"), "{}", err(&o));
    assert!(err(&o).contains("not UTF-8"), "{}", err(&o));
    let o = e.run_in(
        &[
            "columns",
            "index",
            "-k",
            "k",
            "-c",
            "email",
            "--normalize",
            "lower-trim",
        ],
        b"a\xff",
    );
    assert_eq!(code(&o), 8, "{}", err(&o));
    // `none` indexes any bytes.
    let o = e.run_in(&["columns", "index", "-k", "k", "-c", "email"], b"a\xff");
    assert_eq!(code(&o), 0, "{}", err(&o));
    // An unknown key: exit 4.
    let o = e.run_in(&["columns", "index", "-k", "nope", "-c", "email"], b"v");
    assert_eq!(code(&o), 4, "{}", err(&o));
}

/// The spec's test vector (docs/FORMAT.md section 6) as computed by an
/// independent script with Python's hmac and hashlib only; the library's
/// unit test `spec_test_vector` checks the same values.
#[test]
fn spec_vector_matches_python() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bidx-vector.py");
    let o = std::process::Command::new("python3")
        .arg(script)
        .output()
        .expect("python3 runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8(o.stdout).unwrap(),
        "lower-trim 64 cd8479761da46488\nnone 64 29b11ffd035face9\nnone 128 26ff93d9767936b7bc6ec6a5e79c5386\n"
    );
    let spec =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMAT.md")).unwrap();
    for v in [
        "cd8479761da46488",
        "29b11ffd035face9",
        "26ff93d9767936b7bc6ec6a5e79c5386",
    ] {
        assert!(spec.contains(v), "FORMAT.md lacks {v}");
    }
}

#[test]
fn key_list_and_doctor_show_kdks_and_index_keys_with_their_checks() {
    let e = Cli::with_key();
    let list = String::from_utf8(e.ok(&["key", "list"])).unwrap();
    assert!(list.contains("hsmseal-kdk:k:v1"), "{list}");
    assert!(!list.contains("hsmseal-bidx:k"), "{list}");
    index(&e, &["-k", "k", "-c", "email"], b"v");
    e.ok(&["key", "rotate", "k"]);
    e.ok(&["key", "disable", "k", "--version", "1"]);
    let list = String::from_utf8(e.ok(&["key", "list"])).unwrap();
    for l in ["hsmseal-kdk:k:v1", "hsmseal-kdk:k:v2", "hsmseal-bidx:k"] {
        let line = list.lines().find(|x| x.starts_with(l)).expect(l);
        // A disabled version's KDK does not sign: that is its expected
        // state, not a problem.
        assert!(line.ends_with("  ok"), "{line}");
    }
    // `key list --json` stays one `key` line per version.
    let json = e.ok(&["--json", "key", "list"]);
    assert!(support::json_lines(&json)
        .iter()
        .all(|l| l["type"] == "key"));
    let doctor = e.run(&["--json", "doctor"]);
    assert_eq!(code(&doctor), 0, "{}", err(&doctor));
    let d = support::json_one(&doctor.stdout, "doctor");
    let hmac = d["hmac_keys"].as_array().unwrap();
    assert_eq!(hmac.len(), 3);
    assert!(hmac
        .iter()
        .any(|o| o["kind"] == "blind_index" && o["key"] == "k"));
    assert_eq!(d["problems"].as_array().unwrap().len(), 0, "{d}");
    let human = String::from_utf8(e.ok(&["doctor"])).unwrap();
    assert!(human.contains("hmac keys:"), "{human}");
    assert!(human.contains("blind-index key of k"), "{human}");
}

/// The lookup, against a real PostgreSQL: a table dumped with an
/// empty `email_bidx` column, encrypted with `--blind-index`, loaded back;
/// `WHERE email_bidx = <columns index of the query>` finds exactly the
/// right rows (case and blanks folded by lower-trim), and decrypting them
/// gives the value looked for.
#[test]
fn a_lookup_in_postgresql_finds_exactly_the_right_rows() {
    use std::io::{Read, Write};
    let Some(db) = pg::Pg::start() else { return };
    let e = Cli::with_key();
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, email text);
         INSERT INTO users VALUES (1, 'alice@x.org'), (2, 'bob@x.org'),
           (3, ' Alice@X.org'), (4, NULL), (5, ''), (6, 'alicex.org');
         CREATE TABLE users_enc (id int PRIMARY KEY, email text, email_bidx text);",
    )
    .unwrap();
    let mut dump = Vec::new();
    c.copy_out("COPY (SELECT id, email, NULL::text AS email_bidx FROM users ORDER BY id) TO STDOUT (FORMAT csv, HEADER)")
        .unwrap()
        .read_to_end(&mut dump)
        .unwrap();
    let enc = e.run_in(
        &[
            encrypt(
                "csv",
                "email",
                &["--row-id", "id", "--context", "public.users"],
            ),
            blind_index("email", "lower-trim", None),
        ]
        .concat(),
        &dump,
    );
    assert_eq!(code(&enc), 0, "{}", err(&enc));
    let mut w = c
        .copy_in("COPY users_enc FROM STDIN (FORMAT csv, HEADER)")
        .unwrap();
    w.write_all(&enc.stdout).unwrap();
    w.finish().unwrap();
    let lookup = |c: &mut postgres::Client, value: &[u8]| -> Vec<i32> {
        let bidx = index(
            &e,
            &[
                "-k",
                "k",
                "--column",
                "email",
                "--context",
                "public.users",
                "--normalize",
                "lower-trim",
            ],
            value,
        );
        c.query(
            "SELECT id FROM users_enc WHERE email_bidx = $1 ORDER BY id",
            &[&bidx],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert_eq!(lookup(&mut c, b"ALICE@x.org \n"), [1, 3]);
    assert_eq!(lookup(&mut c, b"bob@x.org"), [2]);
    assert_eq!(lookup(&mut c, b""), [5]);
    assert!(lookup(&mut c, b"carol@x.org").is_empty());
    let nulls: i64 = c
        .query_one(
            "SELECT count(*) FROM users_enc WHERE email_bidx IS NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(nulls, 1);
    let tokens: i64 = c
        .query_one(
            "SELECT count(*) FROM users_enc WHERE email LIKE 'hsc2.%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(tokens, 5);
    // The rows found decrypt to the value looked for.
    let mut out = Vec::new();
    c.copy_out("COPY (SELECT id, email FROM users_enc WHERE id IN (1, 3) ORDER BY id) TO STDOUT (FORMAT csv, HEADER)")
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    let dec = e.run_in(
        &[
            "columns",
            "decrypt",
            "-f",
            "csv",
            "-c",
            "email",
            "--row-id",
            "id",
            "--context",
            "public.users",
        ],
        &out,
    );
    assert_eq!(code(&dec), 0, "{}", err(&dec));
    assert_eq!(dec.stdout, b"id,email\n1,alice@x.org\n3, Alice@X.org\n");
}

#[test]
fn jsonl_strings_numbers_nulls_and_missing_targets() {
    let e = Cli::with_key();
    let dump = b"{\"id\":1,\"email\":\"a@x.org\",\"email_bidx\":null}\n\
{\"email_bidx\":\"old\",\"id\":2,\"email\":\"a\\u0040x.org\"}\n\
{\"id\":3,\"email\":null,\"email_bidx\":\"old\"}\n\
{\"id\":4,\"email\":42,\"email_bidx\":0}\n";
    let args = [
        encrypt("jsonl", "email", &["--row-id", "id"]),
        blind_index("email", "none", None),
    ]
    .concat();
    let enc = e.run_in(&args, dump);
    assert_eq!(code(&enc), 0, "{}", err(&enc));
    let lines: Vec<serde_json::Value> = enc
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let a = email_index_ctx(&e, b"a@x.org");
    // The decoded string is indexed: an escaped spelling is the same value.
    assert_eq!(lines[0]["email_bidx"], a.as_str());
    assert_eq!(lines[1]["email_bidx"], a.as_str());
    assert_eq!(lines[2]["email_bidx"], serde_json::Value::Null);
    // A number is indexed by its JSON text.
    assert_eq!(lines[3]["email_bidx"], email_index_ctx(&e, b"42").as_str());
    // A missing target key: a format error naming it and the row.
    let o = e.run_in(&args, b"{\"id\":1,\"email\":\"a\"}\n");
    assert_eq!(code(&o), 8, "{}", err(&o));
    assert!(err(&o).contains("email_bidx"), "{}", err(&o));
}

fn email_index_ctx(e: &Cli, v: &[u8]) -> String {
    index(e, &["-k", "k", "--column", "email"], v)
}
