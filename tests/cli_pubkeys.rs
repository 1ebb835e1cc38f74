//! The lifecycle of public-key KWKs (issue 12 item 1), RSA-OAEP and
//! EC-P256 alike, on real SoftHSM2 tokens: versions, `key rotate` (also
//! `--if-older-than`), `rotate` re-sealing a file's slot to the current
//! version, disable and enable (the token's own usage attribute, checked
//! with pkcs11-tool), destroy (crypto-shredding one slot while the file's
//! other slot still opens it), purge with `--check`, `export-public`
//! following the current version, `key list --json` showing the type, one
//! type per name (also when two creates of one name race), and two `key
//! rotate` of one key at once issuing distinct versions.

mod support;

use std::process::Stdio;
use support::{code, stderr, write, Cli};

/// `key list --json` lines of key `name`: (version, state, key_type).
fn listed(c: &Cli, name: &str) -> Vec<(u64, String, String)> {
    let out = c.ok(&["--json", "key", "list"]);
    support::json_of_type(&out, "key")
        .iter()
        .filter(|k| k["name"] == name)
        .map(|k| {
            (
                k["version"].as_u64().unwrap(),
                k["state"].as_str().unwrap().to_string(),
                k["key_type"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn export(c: &Cli, name: &str, version: Option<&str>, file: &str) -> String {
    let mut args = vec!["key", "export-public", name];
    if let Some(v) = version {
        args.extend(["--version", v]);
    }
    let out = c.ok(&args);
    write(&c.path(file), &out);
    String::from_utf8(out).unwrap()
}

/// The `fingerprint:` line of a recipient file.
fn fingerprint(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("fingerprint: "))
        .unwrap_or_else(|| panic!("no fingerprint in {text}"))
        .to_string()
}

/// pkcs11-tool's view of the private key of `dr` version `v` of type `ty`.
fn private_key(c: &Cli, ty: &str, v: u32) -> String {
    let prefix = if ty == "ec-p256" {
        "hsmseal-ec"
    } else {
        "hsmseal-rsa"
    };
    support::object(
        &support::list_objects(c),
        "Private Key Object",
        &format!("{prefix}:dr:v{v}"),
    )
}

#[test]
fn rsa_versions_rotate_disable_destroy_and_purge_as_aes_keys_do() {
    versions_rotate_disable_destroy_and_purge("rsa-oaep", "rsa-oaep-3072", "decrypt");
}

#[test]
fn ec_versions_rotate_disable_destroy_and_purge_as_aes_keys_do() {
    versions_rotate_disable_destroy_and_purge("ec-p256", "ec-p256", "derive");
}

/// The whole lifecycle of a public-key KWK `dr` of type `ty` (listed as
/// `listed_type`), whose private key's one usage pkcs11-tool calls `usage`.
fn versions_rotate_disable_destroy_and_purge(ty: &str, listed_type: &str, usage: &str) {
    let c = Cli::new();
    c.ok(&["key", "create", "dr", "--type", ty]);
    c.ok(&["key", "create", "a"]);
    assert!(export(&c, "dr", None, "dr1.pub").contains("\nversion: 1\n"));
    write(&c.path("p"), b"sealed to dr v1");
    c.ok(&["encrypt", "--recipient", "dr1.pub", "-o", "p1.hseal", "p"]);
    c.ok(&[
        "encrypt",
        "--key",
        "a",
        "--recipient",
        "dr1.pub",
        "-o",
        "both.hseal",
        "p",
    ]);

    // One type per name, both ways; nothing is created.
    let other = if ty == "ec-p256" {
        "rsa-oaep"
    } else {
        "ec-p256"
    };
    let taken = format!("is an {ty} key");
    for (args, want) in [
        (vec!["key", "create", "dr"], taken.as_str()),
        (vec!["key", "create", "dr", "--type", other], taken.as_str()),
        (vec!["key", "create", "a", "--type", ty], "is an aes key"),
        (vec!["key", "create", "dr", "--type", ty], "already exists"),
    ] {
        let out = c.run(&args);
        assert_eq!(code(&out), 4, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        assert_eq!(
            stderr(&out).trim_end().lines().count(),
            1,
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(listed(&c, "a").len(), 1);

    // Rotate: v2 is current, same type and size; export-public follows
    // it, `--version 1` still gives v1's key; the v1 file still opens.
    c.ok(&["key", "rotate", "dr"]);
    assert_eq!(
        listed(&c, "dr"),
        [
            (1, "decrypt-only".into(), listed_type.into()),
            (2, "active".into(), listed_type.into())
        ]
    );
    assert_eq!(listed(&c, "a")[0].2, "aes");
    let v2 = export(&c, "dr", None, "dr2.pub");
    assert!(v2.contains("\nversion: 2\n"), "{v2}");
    let v1 = export(&c, "dr", Some("1"), "dr1b.pub");
    assert!(v1.contains("\nversion: 1\n"), "{v1}");
    assert_ne!(fingerprint(&v2), fingerprint(&v1));
    // The new private key as `key create` makes it.
    let private = private_key(&c, ty, 2);
    assert!(
        private.contains(&format!("Usage:      {usage}\n")),
        "{private}"
    );
    assert!(
        private.contains("Access:     sensitive, always sensitive, never extractable, local"),
        "{private}"
    );
    assert_eq!(
        c.ok(&["decrypt", "-o", "-", "p1.hseal"]),
        b"sealed to dr v1"
    );
    // `rotate` re-seals a slot this token can open to the current version
    // (the token holds its public key), payload untouched; it still opens
    // after v1 is destroyed below.
    std::fs::copy(c.path("p1.hseal"), c.path("r1.hseal")).unwrap();
    let before = std::fs::read(c.path("r1.hseal")).unwrap();
    c.ok(&["rotate", "r1.hseal"]);
    let after = std::fs::read(c.path("r1.hseal")).unwrap();
    let hl = hsmseal::envelope::slots::header_len(1);
    assert_eq!(before[hl..], after[hl..], "payload changed");
    let s = support::json_one(&c.ok(&["--json", "inspect", "r1.hseal"]), "item");
    assert_eq!(s["slots"][0]["version"], 2, "{s}");
    assert_eq!(s["slots"][0]["type"], ty, "{s}");
    assert_eq!(s["slots"][0]["fingerprint"], fingerprint(&v2), "{s}");
    assert_eq!(
        c.ok(&["decrypt", "-o", "-", "r1.hseal"]),
        b"sealed to dr v1"
    );
    c.ok(&["rotate", "r1.hseal"]);
    assert_eq!(
        std::fs::read(c.path("r1.hseal")).unwrap(),
        after,
        "second rotate"
    );
    // A young key is not rotated again by a nightly job.
    let out = c.ok(&["--json", "key", "rotate", "dr", "--if-older-than", "1d"]);
    let r = support::json_one(&out, "key_rotation");
    assert_eq!(
        (r["rotated"].as_bool(), r["current_version"].as_u64()),
        (Some(false), Some(2))
    );

    // Disable v2: its private key's usage is off in the token itself, the
    // re-sealed file is refused, export-public falls back to v1; enable
    // restores all of it.
    c.ok(&["key", "disable", "dr", "--version", "2"]);
    assert_eq!(listed(&c, "dr")[1].1, "disabled");
    let private = private_key(&c, ty, 2);
    assert!(private.contains("Usage:      none\n"), "{private}");
    let out = c.run(&["decrypt", "-o", "r1.out", "r1.hseal"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("is disabled"), "{}", stderr(&out));
    assert!(!c.path("r1.out").exists());
    assert!(export(&c, "dr", None, "x.pub").contains("\nversion: 1\n"));
    c.ok(&["key", "enable", "dr", "--version", "2"]);
    assert!(private_key(&c, ty, 2).contains(&format!("Usage:      {usage}\n")));
    assert_eq!(
        c.ok(&["decrypt", "-o", "-", "r1.hseal"]),
        b"sealed to dr v1"
    );

    // Disable v1: the token refuses it; the file's AES slot still opens
    // the other file; enable restores it.
    c.ok(&["key", "disable", "dr", "--version", "1"]);
    assert_eq!(listed(&c, "dr")[0].1, "disabled");
    let out = c.run(&["decrypt", "-o", "p1.out", "p1.hseal"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("is disabled"), "{}", stderr(&out));
    assert!(!c.path("p1.out").exists());
    assert_eq!(
        c.ok(&["decrypt", "-o", "-", "both.hseal"]),
        b"sealed to dr v1"
    );
    c.ok(&["key", "enable", "dr", "--version", "1"]);
    assert_eq!(
        c.ok(&["decrypt", "-o", "-", "p1.hseal"]),
        b"sealed to dr v1"
    );
    // Disabling every version leaves no current version to export.
    c.ok(&["key", "disable", "dr", "--version", "2"]);
    c.ok(&["key", "disable", "dr", "--version", "1"]);
    let out = c.run(&["key", "export-public", "dr"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no usable version"),
        "{}",
        stderr(&out)
    );
    c.ok(&["key", "enable", "dr", "--version", "1"]);
    c.ok(&["key", "enable", "dr", "--version", "2"]);

    // Destroy: the current version only with --force; nothing without --yes.
    let out = c.run(&["key", "destroy", "dr", "--version", "2", "--yes"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("current version"), "{}", stderr(&out));
    let out = c.run(&["key", "destroy", "dr", "--version", "1"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("without --yes"), "{}", stderr(&out));
    // --check: a file sealed to v1 still needs it.
    std::fs::create_dir(c.path("data")).unwrap();
    std::fs::copy(c.path("p1.hseal"), c.path("data/p1.hseal")).unwrap();
    let out = c.run(&[
        "key",
        "destroy",
        "dr",
        "--version",
        "1",
        "--yes",
        "--check",
        "data",
    ]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refusing to destroy dr v1"),
        "{}",
        stderr(&out)
    );
    assert_eq!(listed(&c, "dr")[0].1, "decrypt-only");
    c.ok(&["key", "destroy", "dr", "--version", "1", "--yes"]);
    assert_eq!(listed(&c, "dr")[0].1, "destroyed");
    // (It can no longer be searched: its only slot is gone.)
    std::fs::remove_file(c.path("data/p1.hseal")).unwrap();
    // Crypto-shredding: v1's slot is gone, the AES slot still opens.
    let out = c.run(&["decrypt", "-o", "p1.out", "p1.hseal"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(!c.path("p1.out").exists());
    assert_eq!(
        c.ok(&["decrypt", "-o", "-", "both.hseal"]),
        b"sealed to dr v1"
    );
    assert_eq!(
        c.ok(&["decrypt", "-o", "-", "r1.hseal"]),
        b"sealed to dr v1"
    );
    let out = c.run(&["key", "export-public", "dr", "--version", "1"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("was destroyed"), "{}", stderr(&out));

    // Purge: v3 current; v2 old enough (cutoff now) but a file needs it.
    c.ok(&["key", "rotate", "dr"]);
    c.ok(&[
        "encrypt",
        "--recipient",
        "dr2.pub",
        "-o",
        "data/p2.hseal",
        "p",
    ]);
    let out = c.run(&["key", "purge", "dr", "--older-than", "0s"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("would destroy v2"),
        "{}",
        stderr(&out)
    );
    let out = c.run(&[
        "key",
        "purge",
        "dr",
        "--older-than",
        "0s",
        "--yes",
        "--check",
        "data",
    ]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert_eq!(listed(&c, "dr")[1].1, "decrypt-only");
    c.ok(&["key", "purge", "dr", "--older-than", "0s", "--yes"]);
    let states: Vec<String> = listed(&c, "dr").into_iter().map(|v| v.1).collect();
    assert_eq!(states, ["destroyed", "destroyed", "active"]);
    // Destroying the newest keeps its number: the next rotate makes v4.
    c.ok(&["key", "destroy", "dr", "--version", "3", "--yes", "--force"]);
    c.ok(&["key", "rotate", "dr"]);
    let numbers: Vec<u64> = listed(&c, "dr").into_iter().map(|v| v.0).collect();
    assert_eq!(numbers, [1, 2, 3, 4]);
    assert!(export(&c, "dr", None, "dr4.pub").contains("\nversion: 4\n"));
}

#[test]
fn doctor_lists_public_key_kwks_with_their_type() {
    let c = Cli::new();
    c.ok(&["key", "create", "dr", "--type", "rsa-oaep"]);
    c.ok(&["key", "create", "de", "--type", "ec-p256"]);
    let out = c.ok(&["--json", "doctor"]);
    let v: serde_json::Value = support::json_lines(&out)
        .into_iter()
        .find(|l| l.get("keys").is_some())
        .expect("doctor report");
    let keys = v["keys"].as_array().unwrap();
    for (name, key_type, label) in [
        ("dr", "rsa-oaep-3072", "hsmseal-rsa:dr:v1"),
        ("de", "ec-p256", "hsmseal-ec:de:v1"),
    ] {
        let k: Vec<_> = keys.iter().filter(|k| k["name"] == name).collect();
        assert_eq!(k.len(), 1, "{keys:?}");
        assert_eq!(k[0]["key_type"], key_type);
        assert_eq!(k[0]["label"], label);
        assert!(k[0]["problems"].as_array().unwrap().is_empty(), "{k:?}");
        assert!(k[0]["created"].is_string(), "{k:?}");
    }
    let text = String::from_utf8(c.ok(&["key", "list"])).unwrap();
    assert!(
        text.contains("rsa-oaep-3072") && text.contains("ec-p256"),
        "{text}"
    );
}

/// Two `key create` of one name at the same instant, of different types
/// (and once of the same type): the exclusive token lock around each
/// create's name check and generation lets exactly one win; the other gets
/// the one-type-per-name refusal (exit 4), and the token holds one key of
/// the winner's type.
#[test]
fn two_creates_of_one_name_at_once_make_one_key_of_one_type() {
    let c = Cli::new();
    let pairs = [
        ("aes", "ec-p256"),
        ("ec-p256", "aes"),
        ("ec-p256", "rsa-oaep"),
        ("rsa-oaep", "ec-p256"),
        ("aes", "rsa-oaep"),
        ("ec-p256", "ec-p256"),
    ];
    for (round, (x, y)) in pairs.into_iter().enumerate() {
        let name = format!("race{round}");
        let outs = at_once(
            &c,
            &[
                &["key", "create", &name, "--type", x],
                &["key", "create", &name, "--type", y],
            ],
        );
        let won: Vec<usize> = (0..2).filter(|i| code(&outs[*i]) == 0).collect();
        assert_eq!(
            won.len(),
            1,
            "round {round} ({x} vs {y}): {} / {}",
            stderr(&outs[0]),
            stderr(&outs[1])
        );
        let (winner, loser) = (won[0], 1 - won[0]);
        let err = stderr(&outs[loser]);
        assert_eq!(code(&outs[loser]), 4, "round {round}: {err}");
        let want = if x == y {
            "already exists".to_string()
        } else {
            format!(
                "is an {} key; a name is used by one key type only",
                [x, y][winner]
            )
        };
        assert!(err.contains(&want), "round {round}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        let keys = listed(&c, &name);
        assert_eq!(keys.len(), 1, "round {round}: {keys:?}");
        assert_eq!(keys[0].0, 1);
        assert!(
            keys[0].2.starts_with([x, y][winner]),
            "round {round}: {keys:?}"
        );
    }
}

/// Runs each of `commands` as its own `hsmseal` process on `c`'s token,
/// all started before any is waited for.
fn at_once(c: &Cli, commands: &[&[&str]]) -> Vec<std::process::Output> {
    let children: Vec<_> = commands
        .iter()
        .map(|args| {
            let mut cmd = c.cmd();
            cmd.args(*args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd.spawn().unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|ch| ch.wait_with_output().unwrap())
        .collect()
}

/// Two `key rotate` of one public key at once (RSA and EC): the exclusive
/// token lock AES rotation takes makes them issue distinct versions.
#[test]
fn two_public_key_rotates_at_once_issue_distinct_versions() {
    let c = Cli::new();
    let rounds = 3;
    for ty in ["rsa-oaep", "ec-p256"] {
        c.ok(&["key", "create", ty, "--type", ty]);
        for round in 0..rounds {
            let rotate: &[&str] = &["key", "rotate", ty];
            for out in at_once(&c, &[rotate, rotate]) {
                assert_eq!(code(&out), 0, "{ty} round {round}: {}", stderr(&out));
            }
        }
        let versions: Vec<u64> = listed(&c, ty).into_iter().map(|v| v.0).collect();
        assert_eq!(versions, (1..=1 + 2 * rounds).collect::<Vec<u64>>(), "{ty}");
        // Each version is a distinct key pair.
        let mut fingerprints = std::collections::BTreeSet::new();
        for v in 1..=1 + 2 * rounds {
            let text = export(&c, ty, Some(&v.to_string()), "x.pub");
            assert!(
                fingerprints.insert(fingerprint(&text)),
                "{ty} v{v} repeats a key pair"
            );
        }
    }
}

/// With an audit log configured, a recipients-only encrypt on a host that
/// cannot reach the token is refused before anything is written, naming
/// the audit_log setting to change (never an unauthenticated entry).
#[test]
fn an_audited_recipient_encrypt_without_the_token_names_the_audit_log_setting() {
    let c = Cli::new();
    c.ok(&["key", "create", "dr", "--type", "rsa-oaep"]);
    export(&c, "dr", None, "dr.pub");
    write(&c.path("p"), b"backup");
    let run = |audit: bool| {
        let mut cmd = std::process::Command::new(support::BIN);
        support::clear_hsmseal_env(&mut cmd);
        cmd.current_dir(c.work.path())
            .env("HSMSEAL_PKCS11_MODULE", "/nonexistent/no-such-pkcs11.so")
            .args(["encrypt", "--recipient", "dr.pub", "-o", "p.hseal", "p"]);
        if audit {
            cmd.env("HSMSEAL_AUDIT_LOG", "audit.log");
        }
        support::run_cmd(cmd, None)
    };
    let out = run(true);
    assert_ne!(code(&out), 0, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("remove that audit_log setting")
            && err.contains("environment HSMSEAL_AUDIT_LOG"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!c.path("p.hseal").exists());
    assert!(!c.path("audit.log").exists());
    // Without the audit log the same host encrypts.
    let out = run(false);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(c.path("p.hseal").exists());
}
