//! The KWK backup ceremony (issue 12, item 3) as a restore drill on two real
//! SoftHSM2 tokens, each in its own directory: a file and a v2 column dump
//! sealed on token A decrypt on the recovery token B after `key backup` /
//! `key restore`, and still do after A's key is destroyed. The refusals:
//! a key made without --backup (hsmseal's check, exit 4), a transport key
//! nobody trusted (the token's own `CKR_KEY_NOT_WRAPPABLE`, also shown with
//! a raw `C_WrapKey`), a tampered backup file (exit 3, nothing left on B).
//! Attributes on B are read with `pkcs11-tool --list-objects`.

mod support;

use std::path::Path;
use support::{code, data, stderr, write, Cli};

/// `hsmseal key backup-trust` as A's security officer (PIN in the
/// environment, as documented); audited where the test made a log.
fn trust(a: &Cli, file: &str) -> std::process::Output {
    let so = a.token.so_pin.clone();
    let mut env = vec![("HSMSEAL_SO_PIN", so.as_str())];
    if a.path("audit.log").exists() {
        env.push(("HSMSEAL_AUDIT_LOG", "audit.log"));
    }
    a.run_with(&["key", "backup-trust", file], None, &env)
}

fn copy(from: &Cli, to: &Cli, name: &str) {
    std::fs::copy(from.path(name), to.path(name)).unwrap();
}

/// The lines pkcs11-tool prints for the object labelled `label`.
fn object<'a>(listing: &'a str, label: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = listing.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == format!("label:      {label}"))
        .unwrap_or_else(|| panic!("no object {label} in:\n{listing}"));
    let start = at - 1;
    let end = lines[at..]
        .iter()
        .position(|l| !l.starts_with(' '))
        .map_or(lines.len(), |n| at + n);
    lines[start..end].to_vec()
}

fn field<'a>(obj: &[&'a str], name: &str) -> &'a str {
    obj.iter()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in {obj:?}"))
}

/// The `sha256:HEX` printed after `after`.
fn fingerprint(stdout: &[u8], after: &str) -> String {
    let s = String::from_utf8_lossy(stdout);
    let i = s.find(after).unwrap_or_else(|| panic!("{after} in {s}")) + after.len();
    let rest = s[i..].strip_prefix("sha256:").expect("sha256:");
    let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    assert_eq!(hex.len(), 64, "{s}");
    format!("sha256:{hex}")
}

const COLS: [&str; 8] = [
    "--format",
    "csv",
    "--columns",
    "ssn",
    "--row-id",
    "id",
    "--context",
    "app.users",
];

fn columns(
    c: &Cli,
    op: &str,
    input: &str,
    output: &str,
    key: Option<&str>,
) -> std::process::Output {
    let mut args = vec!["columns", op];
    args.extend(COLS);
    if let Some(k) = key {
        args.extend(["--key", k]);
    }
    args.extend(["-i", input, "-o", output]);
    c.run(&args)
}

#[test]
fn restore_drill_file_and_v2_dump_open_on_b_even_after_a_destroys_the_key() {
    let a = Cli::new();
    let b = Cli::new();
    a.ok(&["--audit-log", "audit.log", "audit", "init"]);
    b.ok(&["--audit-log", "audit.log", "audit", "init"]);
    a.ok(&["key", "create", "pii", "--backup"]);
    a.ok(&["key", "create", "plain"]);
    let list = String::from_utf8(a.ok(&["key", "list"])).unwrap();
    assert!(list.contains("ok (backup-capable)"), "{list}");

    // Data sealed on A: a file and a dump with v2 column tokens.
    let plain = data(50_000, 7);
    write(&a.path("db.sql"), &plain);
    a.ok(&["encrypt", "--key", "pii", "db.sql"]);
    let csv = b"id,ssn\n1,123-45-6789\n2,987-65-4321\n";
    write(&a.path("users.csv"), csv);
    let out = columns(&a, "encrypt", "users.csv", "users.enc.csv", Some("pii"));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let sealed = std::fs::read_to_string(a.path("users.enc.csv")).unwrap();
    assert!(sealed.contains("hsc2."), "{sealed}");

    // B makes the transport key; its public half goes to A.
    let out = b.ok(&[
        "--audit-log",
        "audit.log",
        "key",
        "backup-target",
        "dr1",
        "-o",
        "dr1.pub",
    ]);
    let transport_fp = fingerprint(&out, "fingerprint ");
    copy(&b, &a, "dr1.pub");

    // Not trusted yet: no transport key on A at all.
    let out = a.run(&["key", "backup", "pii", "--to", "dr1.pub", "-o", "pii.bk"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`hsmseal key backup-trust FILE`"),
        "{}",
        stderr(&out)
    );
    assert!(!a.path("pii.bk").exists());

    // The SO step: no PIN, a wrong PIN, then the right one (idempotent).
    let out = a.run(&["key", "backup-trust", "dr1.pub"]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(stderr(&out).contains("HSMSEAL_SO_PIN"), "{}", stderr(&out));
    let out = a.run_with(
        &["key", "backup-trust", "dr1.pub"],
        None,
        &[("HSMSEAL_SO_PIN", "wrong-so-pin")],
    );
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    let out = trust(&a, "dr1.pub");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&transport_fp),
        "the SO sees the fingerprint B printed"
    );
    let out = trust(&a, "dr1.pub");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing changed"));

    // A key made without --backup: refused with the way out, nothing written.
    let out = a.run(&[
        "key", "backup", "plain", "--to", "dr1.pub", "-o", "plain.bk",
    ]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("key plain v1 is not backup-capable")
            && stderr(&out).contains("--backup"),
        "{}",
        stderr(&out)
    );
    assert!(!a.path("plain.bk").exists());

    let out = a.ok(&[
        "--audit-log",
        "audit.log",
        "key",
        "backup",
        "pii",
        "--to",
        "dr1.pub",
        "-o",
        "pii.bk",
    ]);
    let backup_fp = fingerprint(&out, "backup fingerprint ");
    let text = std::fs::read_to_string(a.path("pii.bk")).unwrap();
    assert!(
        text.starts_with("hsmseal-kwk-backup v1\nkey: pii\nversion: 1\n"),
        "{text}"
    );
    assert!(
        text.contains("label: hsmseal-kdk:pii:v1\n"),
        "the KDK travels too"
    );
    copy(&a, &b, "pii.bk");

    // Tampered copies fail to restore and leave nothing on B.
    let wrapped_line = text.lines().find(|l| l.starts_with("wrapped: ")).unwrap();
    let mut flipped = wrapped_line.as_bytes().to_vec();
    let i = flipped.len() / 2;
    flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
    let check_line = text.lines().find(|l| l.starts_with("kdk-check: ")).unwrap();
    let other_check = format!("kdk-check: {}=", "A".repeat(43));
    for (name, bad, exit) in [
        (
            "wrapped.bk",
            text.replace(wrapped_line, std::str::from_utf8(&flipped).unwrap()),
            3,
        ),
        ("check.bk", text.replace(check_line, &other_check), 3),
        // A label swapped to another version: refused before any unwrap.
        (
            "version.bk",
            text.replace("version: 1\n", "version: 2\n"),
            8,
        ),
        ("cut.bk", text[..text.len() / 2].to_string(), 8),
    ] {
        write(&b.path(name), bad.as_bytes());
        let out = b.run(&["key", "restore", name]);
        assert_eq!(code(&out), exit, "{name}: {}", stderr(&out));
        let listing = support::list_objects(&b);
        assert!(!listing.contains("hsmseal:pii"), "{name} left:\n{listing}");
        assert!(
            !listing.contains("hsmseal-kdk:pii"),
            "{name} left:\n{listing}"
        );
    }

    // The restore: same fingerprint as on A; a second one is refused.
    let out = b.ok(&["--audit-log", "audit.log", "key", "restore", "pii.bk"]);
    assert_eq!(fingerprint(&out, "backup fingerprint "), backup_fp);
    let out = b.run(&["key", "restore", "pii.bk"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let list = String::from_utf8(b.ok(&["key", "list"])).unwrap();
    assert!(list.contains("ok (restored from a backup)"), "{list}");
    // doctor checks the KDKs too (hmac_keys): a backup-capable KDK on A and
    // a restored one on B pass the same relaxed rule as their KWKs.
    for (side, cli) in [("A", &a), ("B", &b)] {
        let out = cli.run(&["--json", "doctor"]);
        assert_eq!(code(&out), 0, "doctor on {side}: {}", stderr(&out));
        let d = support::json_one(&out.stdout, "doctor");
        assert!(
            d["hmac_keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"] == "kdk" && k["key"] == "pii"),
            "{d}"
        );
        assert_eq!(
            d["problems"].as_array().unwrap().len(),
            0,
            "doctor on {side}: {d}"
        );
    }

    // Attributes on B, as another PKCS#11 client sees them.
    let listing = support::list_objects(&b);
    let kwk = object(&listing, "hsmseal:pii:v1");
    assert!(kwk[0].starts_with("Secret Key Object; AES"), "{kwk:?}");
    assert_eq!(field(&kwk, "Usage"), "encrypt, decrypt", "{kwk:?}");
    // Sensitive, not extractable; not "always sensitive"/"local": unwrapped.
    assert_eq!(field(&kwk, "Access"), "sensitive", "{kwk:?}");
    let kdk = object(&listing, "hsmseal-kdk:pii:v1");
    assert_eq!(field(&kdk, "Access"), "sensitive", "{kdk:?}");
    let tk = object(&listing, "hsmseal-transport:dr1");
    assert!(tk[0].starts_with("Private Key Object; RSA"), "{tk:?}");
    assert_eq!(field(&tk, "Usage"), "unwrap", "{tk:?}");
    assert_eq!(
        field(&tk, "Access"),
        "sensitive, always sensitive, never extractable, local",
        "{tk:?}"
    );
    // On A, the trusted copy of the public key only wraps.
    let on_a = support::list_objects(&a);
    let pubkey = object(&on_a, "hsmseal-transport:dr1");
    assert!(
        pubkey[0].starts_with("Public Key Object; RSA 3072"),
        "{pubkey:?}"
    );
    assert_eq!(field(&pubkey, "Usage"), "wrap", "{pubkey:?}");

    let decrypt_on_b = || {
        let _ = std::fs::remove_file(b.path("db.out"));
        let _ = std::fs::remove_file(b.path("users.out.csv"));
        b.ok(&["decrypt", "-o", "db.out", "db.sql.hseal"]);
        assert_eq!(std::fs::read(b.path("db.out")).unwrap(), plain);
        let out = columns(&b, "decrypt", "users.enc.csv", "users.out.csv", None);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(std::fs::read(b.path("users.out.csv")).unwrap(), csv);
    };
    copy(&a, &b, "db.sql.hseal");
    copy(&a, &b, "users.enc.csv");
    decrypt_on_b();

    // A loses the key: A cannot open its data any more, B still can.
    a.ok(&[
        "key",
        "destroy",
        "pii",
        "--version",
        "1",
        "--yes",
        "--force",
    ]);
    let out = a.run(&["decrypt", "-o", "db.out", "db.sql.hseal"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    decrypt_on_b();

    // Both sides logged their steps.
    let log_a = std::fs::read_to_string(a.path("audit.log")).unwrap();
    let log_b = std::fs::read_to_string(b.path("audit.log")).unwrap();
    assert!(
        log_a.contains("\"command\":\"key backup\",\"keys\":[\"pii v1\"]")
            && log_a.contains("\"command\":\"key backup-trust\""),
        "{log_a}"
    );
    assert!(
        log_b.contains("\"key restore\"") && log_b.contains("\"key backup-target\""),
        "{log_b}"
    );
}

#[test]
fn rotation_keeps_backup_capability_and_restore_can_keep_it() {
    let a = Cli::new();
    let b = Cli::new();
    a.ok(&["key", "create", "k", "--backup"]);
    a.ok(&["key", "rotate", "k"]);
    a.ok(&["key", "create", "p"]);
    a.ok(&["key", "rotate", "p", "--backup"]);
    let list = String::from_utf8(a.ok(&["key", "list"])).unwrap();
    let status = |name: &str, v: &str| {
        list.lines()
            .find(|l| l.split_whitespace().take(2).collect::<Vec<_>>() == [name, v])
            .unwrap_or_else(|| panic!("{name} {v} in {list}"))
            .to_string()
    };
    assert!(status("k", "2").ends_with("ok (backup-capable)"), "{list}");
    assert!(status("p", "1").ends_with("ok"), "{list}");
    assert!(status("p", "2").ends_with("ok (backup-capable)"), "{list}");

    b.ok(&["key", "backup-target", "dr", "-o", "dr.pub"]);
    copy(&b, &a, "dr.pub");
    assert_eq!(code(&trust(&a, "dr.pub")), 0);
    // Default version: the current one (v2).
    let out = a.ok(&[
        "--json", "key", "backup", "k", "--to", "dr.pub", "-o", "k.bk",
    ]);
    let j = support::json_one(&out, "key_backup");
    assert_eq!(
        (j["key"].as_str(), j["version"].as_u64()),
        (Some("k"), Some(2))
    );
    assert!(j["fingerprint"].as_str().unwrap().starts_with("sha256:"));
    assert!(std::fs::read_to_string(a.path("k.bk"))
        .unwrap()
        .contains("version: 2\n"));
    copy(&a, &b, "k.bk");
    let out = b.ok(&["--json", "key", "restore", "k.bk", "--backup"]);
    let r = support::json_one(&out, "key_restore");
    assert_eq!(r["fingerprint"], j["fingerprint"]);
    assert_eq!(r["backup_capable"], true);
    assert_eq!(r["current_version"], 2);
    let list = String::from_utf8(b.ok(&["key", "list"])).unwrap();
    assert!(
        list.contains("ok (restored from a backup, backup-capable)"),
        "{list}"
    );
    // B has v2 only; v1 shows as destroyed there, and a rotation on B
    // continues the numbering (and keeps the property).
    assert!(list.contains("destroyed"), "{list}");
    b.ok(&["key", "rotate", "k"]);
    let list = String::from_utf8(b.ok(&["key", "list"])).unwrap();
    assert!(
        list.lines()
            .any(|l| l.contains(" 3 ") && l.ends_with("ok (backup-capable)")),
        "{list}"
    );
}

/// The token itself refuses to wrap a CKA_WRAP_WITH_TRUSTED key under a
/// key that is not CKA_TRUSTED, and refuses a user who tries to mark one
/// trusted: checked with raw PKCS#11 calls and through hsmseal.
#[test]
fn an_untrusted_transport_key_is_refused_by_the_token_itself() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::error::{Error as CkError, RvError};
    use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
    use cryptoki::mechanism::{Mechanism, MechanismType};
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    use hsmseal::hsm::backup::TransportKey;

    let a = Cli::new();
    let b = Cli::new();
    a.ok(&["key", "create", "k", "--backup"]);
    b.ok(&["key", "backup-target", "dr", "-o", "dr.pub"]);
    let tk = TransportKey::parse(
        &std::fs::read_to_string(b.path("dr.pub")).unwrap(),
        "dr.pub",
    )
    .unwrap();
    copy(&b, &a, "dr.pub");

    // This is the only test of this binary that opens a token in-process
    // (SoftHSM2 reads SOFTHSM2_CONF once, at C_Initialize); the others run
    // the binary with their own environment.
    std::env::set_var("SOFTHSM2_CONF", &a.token.conf);
    let ctx = Pkcs11::new(Path::new(&a.token.module)).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim() == a.token.label)
        .unwrap();
    let s = ctx.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::from(a.token.pin.as_str())))
        .unwrap();
    let public = |trusted: bool| {
        let mut t = vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Modulus(tk.modulus.clone()),
            Attribute::PublicExponent(tk.exponent.clone()),
            Attribute::Wrap(true),
            Attribute::Label(tk.label().into_bytes()),
        ];
        if trusted {
            t.push(Attribute::Trusted(true));
        }
        t
    };
    // A user cannot make a trusted key: only the SO can.
    match s.create_object(&public(true)) {
        Err(CkError::Pkcs11(RvError::AttributeReadOnly, _)) => {}
        other => panic!("a user set CKA_TRUSTED: {other:?}"),
    }
    // An untrusted copy of the transport key, made by the user.
    let untrusted = s.create_object(&public(false)).unwrap();
    let kwk = s
        .find_objects(&[Attribute::Label(b"hsmseal:k:v1".to_vec())])
        .unwrap()[0];
    let oaep = Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    ));
    match s.wrap_key(&oaep, untrusted, kwk) {
        Err(CkError::Pkcs11(RvError::KeyNotWrappable, _)) => {}
        other => {
            panic!("the token wrapped a wrap-with-trusted key under an untrusted key: {other:?}")
        }
    }
    s.logout().unwrap();
    drop(s);

    // hsmseal finds the copy (same label and key) and reports the token's
    // refusal.
    let out = a.run(&["key", "backup", "k", "--to", "dr.pub", "-o", "k.bk"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("CKR_KEY_NOT_WRAPPABLE"), "{err}");
    assert!(err.contains("not trusted"), "{err}");
    assert!(!a.path("k.bk").exists());
    // And the SO will not trust over an object that is not the trusted key.
    let out = trust(&a, "dr.pub");
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("untrusted copy"), "{}", stderr(&out));
}

#[test]
fn bad_transport_and_backup_files_are_named_format_errors() {
    let c = Cli::with_key();
    write(&c.path("junk.pub"), b"not a key\n");
    let out = c.run(&["key", "backup", "k", "--to", "junk.pub", "-o", "k.bk"]);
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("junk.pub is not a valid hsmseal transport key file"),
        "{}",
        stderr(&out)
    );
    write(&c.path("junk.bk"), b"hsmseal-kwk-backup v1\nkey: k\n");
    let out = c.run(&["key", "restore", "junk.bk"]);
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert!(stderr(&out).contains("junk.bk is not a valid hsmseal key backup file"));
    let out = c.run(&["key", "restore", "missing.bk"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
}

/// Restore writes B's token under its exclusive lock, from its check that
/// the version is absent to its last check: two restores of one file at
/// once make one copy and one "already exists" (exit 4), never two objects
/// with one label.
#[test]
fn concurrent_restores_of_one_backup_make_one_copy() {
    let a = Cli::new();
    let b = Cli::new();
    a.ok(&["key", "create", "k", "--backup"]);
    b.ok(&["key", "backup-target", "dr", "-o", "dr.pub"]);
    copy(&b, &a, "dr.pub");
    assert_eq!(code(&trust(&a, "dr.pub")), 0);
    a.ok(&["key", "backup", "k", "--to", "dr.pub", "-o", "k.bk"]);
    copy(&a, &b, "k.bk");
    for round in 0..3 {
        if round > 0 {
            b.ok(&["key", "destroy", "k", "--version", "1", "--yes", "--force"]);
        }
        let children: Vec<_> = (0..3)
            .map(|_| {
                let mut c = b.cmd();
                c.args(["key", "restore", "k.bk"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
                c.spawn().unwrap()
            })
            .collect();
        let codes: Vec<i32> = children
            .into_iter()
            .map(|c| code(&c.wait_with_output().unwrap()))
            .collect();
        let mut sorted = codes.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 4, 4], "round {round}: {codes:?}");
        let listing = support::list_objects(&b);
        assert_eq!(
            listing.matches("label:      hsmseal:k:v1\n").count(),
            1,
            "{listing}"
        );
        assert_eq!(
            listing.matches("label:      hsmseal-kdk:k:v1\n").count(),
            1,
            "{listing}"
        );
    }
}
