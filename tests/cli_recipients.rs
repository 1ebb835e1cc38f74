//! Several KWKs per file (issue 12 item 2, format v2) end to end on real
//! SoftHSM2 tokens: `encrypt --key a --key b` and `--group`, decrypt with
//! whichever slot's key the token holds, `rotate` rewrapping the reachable
//! slots and keeping the others byte-identical, `inspect --json` listing
//! every slot, and the refusals (no slot on the token, damaged places).

mod support;

use support::{code, data, stderr, write, Cli};

fn slots(c: &Cli, file: &str) -> Vec<serde_json::Value> {
    let out = c.ok(&["--json", "inspect", file]);
    let v = support::json_one(&out, "item");
    v["slots"].as_array().unwrap().clone()
}

/// Bytes of slot `i` in the place in force of a 2-slot v2 file.
fn slot_bytes(file: &[u8], i: usize) -> Vec<u8> {
    let n = 2;
    let h = hsmseal::envelope::slots::Header2::parse(file).unwrap();
    let (place, _) = h.active();
    let off = hsmseal::envelope::slots::place_offset(n, place) + 32 + i * 768;
    file[off..off + 768].to_vec()
}

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
    let s = slots(&c, "p.hseal");
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
        slot_bytes(&sealed, 1),
        slot_bytes(&after, 1),
        "b's slot changed"
    );
    assert_ne!(slot_bytes(&sealed, 0), slot_bytes(&after, 0));
    assert_eq!(slots(&c, "p.hseal")[0]["version"].as_u64(), Some(2));
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
    let s = slots(&c, "p.hseal");
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
