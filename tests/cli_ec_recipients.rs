//! EC-P256 recipients (issue 12 item 1, slot kind 3) end to end on real
//! SoftHSM2 tokens: `key create --type ec-p256` (private key checked with
//! pkcs11-tool), `key export-public`, `encrypt --recipient` with no module,
//! token or PIN, decrypt/verify/inspect where the private key is, a file
//! under an AES key on token A and the EC key on token B opening from
//! either, `rotate` on A keeping B's slot byte-identical, and the
//! refusals: every edited slot field, an off-curve or identity ephemeral
//! point, a recipient file with a bad point, a name already taken.

mod support;

use hsmseal::envelope::file::AnyHeader;
use hsmseal::envelope::slots::{self, Header2, Slot};
use support::{code, data, stderr, write, Cli};

/// `file` (a v2 file) with slot `i` of its place in force changed by `edit`
/// and the place's checksum recomputed: what an attacker can write.
fn edited(file: &[u8], i: usize, edit: impl Fn(&mut Slot)) -> Vec<u8> {
    let AnyHeader::V2(h) = AnyHeader::parse(file).unwrap() else {
        panic!("v1")
    };
    let mut e = h.clone();
    let (idx, _) = e.active();
    if let Some(Ok(p)) = &mut e.places[idx] {
        edit(&mut p.slots[i]);
    }
    let mut bytes = e.to_bytes();
    bytes.extend_from_slice(&file[h.len()..]);
    bytes
}

/// The pkcs11-tool description of the private key labelled `label`.
fn private_key_listing(c: &Cli, label: &str) -> String {
    support::object(&support::list_objects(c), "Private Key Object", label)
}

/// A token with an AES key `a`, a token with the EC key `dr`, and `dr`'s
/// recipient file in A's work directory.
fn two_tokens() -> (Cli, Cli, String) {
    let a = Cli::new();
    a.ok(&["key", "create", "a"]);
    let b = Cli::new();
    let out = b.ok(&["key", "create", "dr", "--type", "ec-p256"]);
    let said = String::from_utf8_lossy(&out);
    assert!(
        said.contains("EC P-256") && said.contains("fingerprint sha256:"),
        "{said}"
    );
    let public = b.ok(&["key", "export-public", "dr"]);
    write(&a.path("dr.pub"), &public);
    (a, b, String::from_utf8(public).unwrap())
}

#[test]
fn an_ec_recipient_encrypts_without_the_token_and_opens_only_where_the_private_key_is() {
    let (a, b, text) = two_tokens();
    assert!(
        text.starts_with(
            "hsmseal-recipient v1\nname: dr\nversion: 1\nalgorithm: ec-p256\npublic-key: "
        ) && !text.contains("oaep-hash"),
        "{text}"
    );
    // `--version 1` names the same key; the JSON of create names the type.
    assert_eq!(
        b.ok(&["key", "export-public", "dr", "--version", "1"]),
        text.as_bytes()
    );
    let out = b.ok(&["--json", "key", "create", "dr2", "--type", "ec-p256"]);
    assert_eq!(support::json_one(&out, "key")["key_type"], "ec-p256");

    // The private key: sensitive, never extractable, derive only.
    let private = private_key_listing(&b, "hsmseal-ec:dr:v1");
    assert!(private.contains("Usage:      derive\n"), "{private}");
    assert!(
        private.contains("Access:     sensitive, always sensitive, never extractable, local"),
        "{private}"
    );

    // Recipient only, no module, no token, no PIN: works, and opens only
    // on B.
    let plain = data(70_000, 5);
    support::sealed_without_token_opens_only_on(&a, &b, &plain, "slot 0 (ec-p256 key dr v1");
    // Another EC key of the same name on another token: not this slot.
    let c = Cli::new();
    c.ok(&["key", "create", "dr", "--type", "ec-p256"]);
    std::fs::copy(a.path("r.hseal"), c.path("r.hseal")).unwrap();
    let out = c.run(&["decrypt", "-o", "r.out", "r.hseal"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(!c.path("r.out").exists());

    // An AES key on A and the recipient on B: either token alone opens it;
    // key rotate + rotate on A keeps B's slot byte-identical.
    let (s, _, after) =
        support::aes_and_recipient_slots_open_from_either_token(&a, &b, &plain, "ec-p256");
    assert!(s[1].get("oaep_hash").is_none(), "{s:?}");
    let fp = text
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint: "))
        .unwrap();
    assert_eq!(s[1]["fingerprint"], fp);
    // rotate on B (no AES key there) leaves the file alone.
    b.ok(&["rotate", "p2.hseal"]);
    assert_eq!(std::fs::read(b.path("p2.hseal")).unwrap(), after);

    // A file with only the EC slot (r.hseal) opens on B, and each edited
    // slot field (checksum recomputed) is refused there, nothing released.
    let only = std::fs::read(b.path("r.hseal")).unwrap();
    let other_point = {
        // A valid point of another key: the slot fails authentication.
        let h = Header2::parse(&after).unwrap();
        let mut p = h.active().1.slots[1].transport.clone();
        let AnyHeader::V2(r) = AnyHeader::parse(&only).unwrap() else {
            panic!()
        };
        if r.active().1.slots[0].transport == p {
            p[1] ^= 1;
        }
        p
    };
    type Edit = Box<dyn Fn(&mut Slot)>;
    let edits: Vec<(&str, i32, Edit)> = vec![
        ("version", 4, Box::new(|s| s.kwk.version = 2)),
        ("name", 4, Box::new(|s| s.kwk.name = "dx".into())),
        ("fingerprint", 4, Box::new(|s| s.fingerprint[0] ^= 1)),
        (
            "point",
            3,
            Box::new(move |s| s.transport = other_point.clone()),
        ),
        ("wrapped", 3, Box::new(|s| s.wrapped.ciphertext[0] ^= 1)),
        ("iv", 3, Box::new(|s| s.wrapped.iv[0] ^= 1)),
        ("off-curve point", 3, Box::new(|s| s.transport[64] ^= 1)),
        ("identity point", 3, Box::new(|s| s.transport = vec![0])),
        (
            "compressed point",
            3,
            Box::new(|s| s.transport.truncate(33)),
        ),
    ];
    for (what, want, edit) in edits {
        write(&b.path("e.hseal"), &edited(&only, 0, edit));
        let out = b.run(&["decrypt", "-o", "e.out", "e.hseal"]);
        assert_eq!(code(&out), want, "{what}: {}", stderr(&out));
        assert!(!b.path("e.out").exists(), "{what}");
        if what == "off-curve point" {
            assert!(
                stderr(&out)
                    .contains("ephemeral key of the key slot of dr v1 is not a point on P-256"),
                "{what}: {}",
                stderr(&out)
            );
        }
        let out = b.run(&["verify", "e.hseal"]);
        assert_eq!(code(&out), want, "verify {what}: {}", stderr(&out));
    }
}

#[test]
fn bad_recipient_files_and_taken_names_are_refused() {
    let (a, b, text) = two_tokens();
    write(&a.path("p"), b"x");
    let key_line = text
        .lines()
        .find(|l| l.starts_with("public-key: "))
        .unwrap();
    let fp_line = text
        .lines()
        .find(|l| l.starts_with("fingerprint: "))
        .unwrap();
    // The point moved off the curve, the fingerprint made to match it.
    let spki = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut der = b64
            .decode(key_line.trim_start_matches("public-key: "))
            .unwrap();
        let last = der.len() - 1;
        der[last] ^= 1;
        (
            b64.encode(&der),
            slots::hex(&hsmseal::envelope::recipient::fingerprint_of(&der)),
        )
    };
    let off_curve = text
        .replace(key_line, &format!("public-key: {}", spki.0))
        .replace(fp_line, &format!("fingerprint: sha256:{}", spki.1));
    for (name, edited, want) in [
        ("curve.pub", off_curve, "point on the curve"),
        (
            "fp.pub",
            text.replace(fp_line, &fp_line.replace("sha256:", "sha256:00")),
            "fingerprint",
        ),
        (
            "oaep.pub",
            text.replace("algorithm: ec-p256", "algorithm: ec-p256\noaep-hash: sha1"),
            "oaep-hash",
        ),
    ] {
        write(&a.path(name), edited.as_bytes());
        let out = a.run(&["encrypt", "--recipient", name, "-o", "x.hseal", "p"]);
        assert_eq!(code(&out), 8, "{name}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("is not a valid hsmseal recipient file") && err.contains(want),
            "{name}: {err}"
        );
        assert!(!a.path("x.hseal").exists());
    }
    // A name taken by another type is refused for every type; the same
    // type is told to rotate.
    for (ty, on, want) in [
        ("ec-p256", &b, "already exists"),
        (
            "rsa-oaep",
            &b,
            "is an ec-p256 key; a name is used by one key type only",
        ),
        (
            "aes",
            &b,
            "is an ec-p256 key; a name is used by one key type only",
        ),
        (
            "ec-p256",
            &a,
            "is an aes key; a name is used by one key type only",
        ),
    ] {
        let name = if std::ptr::eq(on, &a) { "a" } else { "dr" };
        let out = on.run(&["key", "create", name, "--type", ty]);
        assert_eq!(code(&out), 4, "{ty} {name}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{ty} {name}: {}", stderr(&out));
    }
    // --backup is for AES keys only; an unknown key exports nothing.
    let out = b.run(&["key", "create", "e2", "--type", "ec-p256", "--backup"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = b.run(&["key", "export-public", "nope"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
}

/// Each worker derives on its own pooled session and destroys its session
/// object; several workers and two processes at once all open their files
/// (docs/SECURITY.md, "ECDH derives").
#[test]
fn ec_slots_open_from_several_workers_and_processes_at_once() {
    let b = Cli::new();
    b.ok(&["key", "create", "dr", "--type", "ec-p256"]);
    write(&b.path("dr.pub"), &b.ok(&["key", "export-public", "dr"]));
    std::fs::create_dir(b.path("tree")).unwrap();
    let n = 24;
    for i in 0..n {
        write(&b.path(&format!("tree/f{i}")), &data(3000 + i, i as u64));
    }
    b.ok(&[
        "encrypt",
        "--recipient",
        "dr.pub",
        "-r",
        "tree",
        "--output-dir",
        "enc",
    ]);
    let spawn = |out: &str| {
        let mut c = b.cmd();
        c.args(["--jobs", "4", "decrypt", "-r", "enc", "--output-dir", out])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().expect("spawn hsmseal")
    };
    let (x, y) = (spawn("dec1"), spawn("dec2"));
    for (child, dir) in [(x, "dec1"), (y, "dec2")] {
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), 0, "{dir}: {}", stderr(&out));
        for i in 0..n {
            let got = std::fs::read(b.path(&format!("{dir}/f{i}"))).unwrap();
            assert_eq!(got, data(3000 + i, i as u64), "{dir}/f{i}");
        }
    }
}

/// After `key rotate`, a slot opens only with the version whose public key
/// has the slot's fingerprint: v1 never opens a slot naming v2's
/// fingerprint, v2 never one naming v1's, whatever version number the slot
/// claims (checksum recomputed, as an attacker would).
#[test]
fn a_slot_naming_another_versions_fingerprint_is_not_opened() {
    use hsmseal::envelope::any_recipient::AnyRecipient;
    let b = Cli::new();
    b.ok(&["key", "create", "dr", "--type", "ec-p256"]);
    let v1 = String::from_utf8(b.ok(&["key", "export-public", "dr"])).unwrap();
    write(&b.path("dr1.pub"), v1.as_bytes());
    b.ok(&["key", "rotate", "dr"]);
    let v2 = String::from_utf8(b.ok(&["key", "export-public", "dr"])).unwrap();
    let fp1 = AnyRecipient::parse(&v1, "v1").unwrap().fingerprint();
    let fp2 = AnyRecipient::parse(&v2, "v2").unwrap().fingerprint();
    assert_ne!(fp1, fp2);
    write(&b.path("p"), b"sealed to v1");
    b.ok(&["encrypt", "--recipient", "dr1.pub", "-o", "f1.hseal", "p"]);
    let f1 = std::fs::read(b.path("f1.hseal")).unwrap();
    assert_eq!(b.ok(&["decrypt", "-o", "-", "f1.hseal"]), b"sealed to v1");
    type Edit = Box<dyn Fn(&mut Slot)>;
    let edits: Vec<(&str, i32, Edit)> = vec![
        (
            "v1 naming v2's fingerprint",
            4,
            Box::new(move |s| s.fingerprint = fp2),
        ),
        (
            "v2 naming v1's fingerprint",
            4,
            Box::new(|s| s.kwk.version = 2),
        ),
        (
            // The token's v2 does the derive; the slot was sealed to v1.
            "v2 and its fingerprint",
            3,
            Box::new(move |s| {
                s.kwk.version = 2;
                s.fingerprint = fp2;
            }),
        ),
    ];
    for (what, want, edit) in edits {
        write(&b.path("e.hseal"), &edited(&f1, 0, edit));
        let out = b.run(&["decrypt", "-o", "e.out", "e.hseal"]);
        assert_eq!(code(&out), want, "{what}: {}", stderr(&out));
        assert!(!b.path("e.out").exists(), "{what}");
        if want == 4 {
            assert!(
                stderr(&out).contains("not on this token"),
                "{what}: {}",
                stderr(&out)
            );
        }
    }
}
