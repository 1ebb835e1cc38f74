//! Several KWKs per file (issue 12 item 2, format v2) end to end on real
//! SoftHSM2 tokens: `encrypt --key a --key b` and `--group`, decrypt with
//! whichever slot's key the token holds, `rotate` rewrapping the reachable
//! slots and keeping the others byte-identical, `inspect --json` listing
//! every slot, and the refusals (no slot on the token, damaged places).

mod support;

use support::{code, data, stderr, write, Cli};

#[test]
fn two_keys_one_file_opens_under_either_and_rotation_keeps_the_other_slot() {
    let c = Cli::new();
    c.ok(&["key", "create", "a"]);
    c.ok(&["key", "create", "b"]);
    let plain = data(100_000, 3);
    write(&c.path("p"), &plain);
    c.ok(&["encrypt", "--key", "a", "--key", "b", "p"]);
    let sealed = std::fs::read(c.path("p.hseal")).unwrap();
    assert_eq!(&sealed[8..10], &[0, 2], "format v2");
    let s = support::slots_json(&c, "p.hseal");
    assert_eq!(s.len(), 2);
    assert_eq!(
        (s[0]["key"].as_str(), s[0]["version"].as_u64()),
        (Some("a"), Some(1))
    );
    assert_eq!(
        (s[1]["key"].as_str(), s[1]["type"].as_str()),
        (Some("b"), Some("aes"))
    );
    let out = c.ok(&["verify", "p.hseal"]);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("slot 1 (aes key b v1): ok"), "{text}");
    c.ok(&["decrypt", "-o", "p.out", "p.hseal"]);
    assert_eq!(std::fs::read(c.path("p.out")).unwrap(), plain);

    // Rotate a: only a's slot changes; b's is byte-identical; the payload too.
    c.ok(&["key", "rotate", "a"]);
    c.ok(&["rotate", "p.hseal"]);
    let after = std::fs::read(c.path("p.hseal")).unwrap();
    let hl = hsmseal::envelope::slots::header_len(2);
    assert_eq!(sealed[hl..], after[hl..], "payload changed");
    assert_eq!(
        support::slot_bytes(&sealed, 1),
        support::slot_bytes(&after, 1),
        "b's slot changed"
    );
    assert_ne!(
        support::slot_bytes(&sealed, 0),
        support::slot_bytes(&after, 0)
    );
    assert_eq!(
        support::slots_json(&c, "p.hseal")[0]["version"].as_u64(),
        Some(2)
    );
    // A second rotate is a no-op.
    c.ok(&["rotate", "p.hseal"]);
    assert_eq!(std::fs::read(c.path("p.hseal")).unwrap(), after);

    // Every version of a destroyed: the file still opens under b alone.
    for v in ["1", "2"] {
        c.ok(&["key", "destroy", "a", "--version", v, "--yes", "--force"]);
    }
    std::fs::remove_file(c.path("p.out")).unwrap();
    c.ok(&["decrypt", "-o", "p.out", "p.hseal"]);
    assert_eq!(std::fs::read(c.path("p.out")).unwrap(), plain);
    let out = c.ok(&["verify", "p.hseal"]);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("slot 0 (aes key a v2): not on this token"),
        "{text}"
    );
    assert!(text.contains("slot 1 (aes key b v1): ok"), "{text}");
}

#[test]
fn a_token_with_none_of_the_keys_refuses_listing_the_slots_and_releases_nothing() {
    let a = Cli::new();
    a.ok(&["key", "create", "x"]);
    a.ok(&["key", "create", "y"]);
    write(&a.path("p"), b"secret");
    a.ok(&["encrypt", "--key", "x", "--key", "y", "p"]);
    let b = Cli::with_key();
    std::fs::copy(a.path("p.hseal"), b.path("p.hseal")).unwrap();
    let out = b.run(&["decrypt", "-o", "p.out", "p.hseal"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("no key slot of this file opens with the configured token")
            && err.contains("slot 0 (aes key x v1): not on this token")
            && err.contains("slot 1 (aes key y v1): not on this token"),
        "{err}"
    );
    assert!(!b.path("p.out").exists());
    // Both places damaged: an integrity error (exit 3), nothing released.
    let mut bytes = std::fs::read(a.path("p.hseal")).unwrap();
    let (pa, pb) = (
        hsmseal::envelope::slots::place_offset(2, 0),
        hsmseal::envelope::slots::place_offset(2, 1),
    );
    bytes[pa + 40] ^= 1;
    bytes[pb + 40] = 1;
    write(&a.path("bad.hseal"), &bytes);
    let out = a.run(&["decrypt", "-o", "bad.out", "bad.hseal"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no valid slot place"),
        "{}",
        stderr(&out)
    );
    assert!(!a.path("bad.out").exists());
    // Truncated inside the header: refused.
    write(&a.path("short.hseal"), &bytes[..1500]);
    let out = a.run(&["decrypt", "-o", "short.out", "short.hseal"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(!a.path("short.out").exists());
}

#[test]
fn groups_from_the_config_file_and_their_refusals() {
    let c = Cli::new();
    c.ok(&["key", "create", "a"]);
    c.ok(&["key", "create", "b"]);
    write(
        &c.path("hsmseal.toml"),
        b"[groups.backups]\nkeys = [\"a\", \"b\"]\n\n[groups.empty]\nkeys = []\n",
    );
    let cfg = [("HSMSEAL_CONFIG", "hsmseal.toml")];
    write(&c.path("p"), b"grouped");
    let out = c.run_with(&["encrypt", "--group", "backups", "p"], None, &cfg);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let s = support::slots_json(&c, "p.hseal");
    let names: Vec<_> = s.iter().map(|x| x["key"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b"]);
    let out = c.run_with(&["decrypt", "-o", "-", "p.hseal"], None, &cfg);
    assert_eq!(out.stdout, b"grouped");
    // A group and one of its keys again; an unknown group; an empty one.
    write(&c.path("q"), b"q");
    for (args, want) in [
        (
            vec!["encrypt", "--group", "backups", "--key", "a", "q"],
            "given twice",
        ),
        (vec!["encrypt", "--group", "nope", "q"], "no group \"nope\""),
        (vec!["encrypt", "--group", "empty", "q"], "has no keys"),
    ] {
        let out = c.run_with(&args, None, &cfg);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        assert!(!c.path("q.hseal").exists());
    }
    // One key without a group still writes format v1.
    c.ok(&["encrypt", "--key", "a", "q"]);
    assert_eq!(&std::fs::read(c.path("q.hseal")).unwrap()[8..10], &[0, 1]);
}

#[test]
fn a_recipient_encrypts_without_the_token_and_opens_only_where_the_private_key_is() {
    let a = Cli::new();
    a.ok(&["key", "create", "a"]);
    let b = Cli::new();
    let out = b.ok(&["key", "create", "dr", "--type", "rsa-oaep"]);
    assert!(
        String::from_utf8_lossy(&out).contains("OAEP sha1"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let public = b.ok(&["key", "export-public", "dr"]);
    let text = String::from_utf8(public.clone()).unwrap();
    assert!(text.starts_with("hsmseal-recipient v1\nname: dr\nversion: 1\nalgorithm: rsa-oaep-3072\noaep-hash: sha1\n"), "{text}");
    write(&a.path("dr.pub"), &public);

    // The private key: sensitive, never extractable, decrypt only.
    let listing = support::list_objects(&b);
    let private = support::object(&listing, "Private Key Object", "hsmseal-rsa:dr:v1");
    assert!(private.contains("Usage:      decrypt\n"), "{private}");
    assert!(
        private.contains("Access:     sensitive, always sensitive, never extractable, local"),
        "{private}"
    );

    // Recipient only, no module, no token, no PIN: works, and opens only
    // on B.
    let plain = data(50_000, 9);
    support::sealed_without_token_opens_only_on(&a, &b, &plain, "slot 0 (rsa-oaep key dr v1");

    // An AES key on A and the recipient on B: either token alone opens it;
    // key rotate + rotate on A keeps B's slot byte-identical.
    let (s, _, after) =
        support::aes_and_recipient_slots_open_from_either_token(&a, &b, &plain, "rsa-oaep");
    assert_eq!(s[1]["oaep_hash"], "sha1");
    assert!(s[1]["fingerprint"].as_str().unwrap().starts_with("sha256:"));

    // Each field of the recipient slot edited (checksum recomputed): B
    // refuses, nothing released.
    let hsmseal::envelope::file::AnyHeader::V2(h) =
        hsmseal::envelope::file::AnyHeader::parse(&after).unwrap()
    else {
        panic!("v1")
    };
    type Edit = fn(&mut hsmseal::envelope::slots::Slot);
    let edits: [(&str, Edit); 6] = [
        ("version", |s| s.kwk.version = 2),
        ("name", |s| s.kwk.name = "dx".into()),
        ("hash", |s| {
            s.oaep = Some(hsmseal::envelope::slots::OaepHash::Sha256)
        }),
        ("fingerprint", |s| s.fingerprint[0] ^= 1),
        ("ciphertext", |s| s.transport[10] ^= 1),
        ("wrapped", |s| s.wrapped.ciphertext[0] ^= 1),
    ];
    for (what, edit) in edits {
        let mut e = h.clone();
        let (idx, _) = e.active();
        if let Some(Ok(p)) = &mut e.places[idx] {
            edit(&mut p.slots[1]);
        }
        let mut bytes = e.to_bytes();
        bytes.extend_from_slice(&after[h.len()..]);
        write(&b.path("e.hseal"), &bytes);
        let out = b.run(&["decrypt", "-o", "e.out", "e.hseal"]);
        assert!(matches!(code(&out), 3 | 4), "{what}: {}", stderr(&out));
        assert!(!b.path("e.out").exists(), "{what}");
    }

    // A group with a key and a recipient (path relative to hsmseal.toml).
    std::fs::create_dir(a.path("etc")).unwrap();
    std::fs::copy(a.path("dr.pub"), a.path("etc/dr.pub")).unwrap();
    write(
        &a.path("etc/hsmseal.toml"),
        b"[groups.backups]\nkeys = [\"a\"]\nrecipients = [\"dr.pub\"]\n",
    );
    let out = a.run_with(
        &["encrypt", "--group", "backups", "-o", "g.hseal", "p"],
        None,
        &[("HSMSEAL_CONFIG", "etc/hsmseal.toml")],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let s = support::slots_json(&a, "g.hseal");
    assert_eq!(
        (s[0]["type"].as_str(), s[1]["type"].as_str()),
        (Some("aes"), Some("rsa-oaep"))
    );
    std::fs::copy(a.path("g.hseal"), b.path("g.hseal")).unwrap();
    b.ok(&["decrypt", "-o", "g.out", "g.hseal"]);
    assert_eq!(std::fs::read(b.path("g.out")).unwrap(), plain);

    // Recipient files with a bad fingerprint or an unknown algorithm.
    let fp_line = text
        .lines()
        .find(|l| l.starts_with("fingerprint: "))
        .unwrap();
    let mut bad_fp = fp_line.to_string();
    bad_fp.pop();
    bad_fp.push(if fp_line.ends_with('0') { '1' } else { '0' });
    for (name, edited) in [
        ("fp.pub", text.replace(fp_line, &bad_fp)),
        ("alg.pub", text.replace("rsa-oaep-3072", "ec-p256")),
    ] {
        write(&a.path(name), edited.as_bytes());
        let out = a.run(&["encrypt", "--recipient", name, "-o", "x.hseal", "p"]);
        assert_eq!(code(&out), 8, "{name}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("is not a valid hsmseal recipient file"),
            "{}",
            stderr(&out)
        );
        assert!(!a.path("x.hseal").exists());
    }
}
