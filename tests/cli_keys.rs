//! Key versions and their lifecycle end to end: the real binary against a
//! SoftHSM2 token of each test's own: rotate, list/info states and creation
//! times, disable/enable, destroy, purge, and what each refuses.

mod support;

use serde_json::Value;
use support::{code, stderr, write, Cli};

/// The one `--json` line of a command's output.
fn json(bytes: &[u8]) -> Value {
    let mut lines = support::json_lines(bytes);
    assert_eq!(lines.len(), 1, "{}", String::from_utf8_lossy(bytes));
    lines.pop().unwrap()
}

/// `key list|info --json`: one `key` line per version, as an array.
fn keys(bytes: &[u8]) -> Value {
    let lines = support::json_lines(bytes);
    assert!(lines.iter().all(|l| l["type"] == "key"), "{lines:?}");
    Value::Array(lines)
}

/// (version, state) of every version of `name`, from `key info --json`.
fn states(c: &Cli, name: &str) -> Vec<(u64, String)> {
    keys(&c.ok(&["--json", "key", "info", name]))
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["version"].as_u64().unwrap(),
                k["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn st(v: &[(u64, &str)]) -> Vec<(u64, String)> {
    v.iter().map(|(n, s)| (*n, s.to_string())).collect()
}

/// The key version an encrypted file is under, from `inspect --json`.
fn file_version(c: &Cli, file: &str) -> u64 {
    support::json_one(&c.ok(&["--json", "inspect", file]), "item")["key_version"]
        .as_u64()
        .unwrap()
}

/// Encrypts a small file `name` under key `k`; returns the .hseal name.
fn seal(c: &Cli, name: &str) -> String {
    write(&c.path(name), name.as_bytes());
    c.ok(&["encrypt", "--key", "k", name]);
    format!("{name}.hseal")
}

fn decrypts(c: &Cli, sealed: &str) -> std::process::Output {
    let out = format!("{sealed}.out");
    let _ = std::fs::remove_file(c.path(&out));
    c.run(&["decrypt", "--force", "-o", &out, sealed])
}

/// Seconds since the epoch of an RFC 3339 time written by hsmseal.
fn unix(rfc3339: &str) -> u64 {
    hsmseal::time::parse_rfc3339(rfc3339).unwrap_or_else(|| panic!("{rfc3339}"))
}

fn now() -> u64 {
    hsmseal::time::now_unix()
}

#[test]
fn rotate_makes_new_encryptions_use_the_new_version_and_old_files_still_decrypt() {
    let c = Cli::with_key();
    let a = seal(&c, "a");
    assert_eq!(file_version(&c, &a), 1);

    let v2 = json(&c.ok(&["--json", "key", "rotate", "k"]));
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["state"], "active");
    assert_eq!(v2["label"], "hsmseal:k:v2");
    let text = String::from_utf8(c.ok(&["key", "rotate", "k"])).unwrap();
    assert!(text.contains("created k v3"), "{text}");
    assert!(text.contains("Files were not changed"), "{text}");

    let b = seal(&c, "b");
    assert_eq!(file_version(&c, &b), 3);
    assert!(decrypts(&c, &a).status.success());
    assert!(decrypts(&c, &b).status.success());
    assert_eq!(std::fs::read(c.path("a.hseal.out")).unwrap(), b"a");

    // list and info agree, with states and creation times from the token.
    let list = keys(&c.ok(&["--json", "key", "list"]));
    let info = keys(&c.ok(&["--json", "key", "info", "k"]));
    assert_eq!(list, info);
    let versions = list.as_array().unwrap();
    assert_eq!(versions.len(), 3);
    for (i, v) in versions.iter().enumerate() {
        assert_eq!(v["name"], "k");
        assert_eq!(v["version"], i as u64 + 1);
        let created = unix(v["created"].as_str().unwrap());
        assert!(created.abs_diff(now()) < 300, "{v}");
        assert_eq!(v["problems"].as_array().unwrap().len(), 0);
        assert_eq!(v["attributes"]["extractable"], false);
    }
    assert_eq!(
        states(&c, "k"),
        st(&[(1, "decrypt-only"), (2, "decrypt-only"), (3, "active")])
    );
    // Versions are created in order, and the times say so.
    let t: Vec<u64> = versions
        .iter()
        .map(|v| unix(v["created"].as_str().unwrap()))
        .collect();
    assert!(t[0] <= t[1] && t[1] <= t[2], "{t:?}");

    let table = String::from_utf8(c.ok(&["key", "list"])).unwrap();
    assert!(table.contains("STATE"), "{table}");
    assert!(table.contains("decrypt-only"), "{table}");
    assert!(table.contains("active"), "{table}");

    // Rotating an unknown key is a key error.
    let out = c.run(&["key", "rotate", "nope"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
}

#[test]
fn disable_makes_the_hsm_refuse_a_version_until_it_is_enabled() {
    let c = Cli::with_key();
    let a = seal(&c, "a");
    c.ok(&["key", "rotate", "k"]);
    let b = seal(&c, "b");

    let out = json(&c.ok(&["--json", "key", "disable", "k", "--version", "1"]));
    assert_eq!(out["action"], "disable");
    assert_eq!(out["changed"], true);
    assert_eq!(out["previous_state"], "decrypt-only");
    assert_eq!(out["state"], "disabled");
    assert_eq!(out["current_version"], 2);
    assert_eq!(states(&c, "k"), st(&[(1, "disabled"), (2, "active")]));
    let info = keys(&c.ok(&["--json", "key", "info", "k"]));
    assert_eq!(info[0]["attributes"]["encrypt"], false);
    assert_eq!(info[0]["attributes"]["decrypt"], false);
    assert_eq!(info[0]["problems"].as_array().unwrap().len(), 0);

    let out = decrypts(&c, &a);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("key k v1 is disabled"), "{e}");
    assert!(e.contains("hsmseal key enable k --version 1"), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(decrypts(&c, &b).status.success());
    let d = seal(&c, "d");
    assert_eq!(file_version(&c, &d), 2);

    // Again: nothing to change, said so.
    let text = String::from_utf8(c.ok(&["key", "disable", "k", "--version", "1"])).unwrap();
    assert!(text.contains("already disabled"), "{text}");

    // Disabling the current version moves new encryptions to the highest
    // enabled one; with none left, encryption fails with a key error.
    c.ok(&["key", "enable", "k", "--version", "1"]);
    c.ok(&["key", "disable", "k", "--version", "2"]);
    assert_eq!(states(&c, "k"), st(&[(1, "active"), (2, "disabled")]));
    let e1 = seal(&c, "e1");
    assert_eq!(file_version(&c, &e1), 1);
    c.ok(&["key", "disable", "k", "--version", "1"]);
    write(&c.path("e2"), b"x");
    let out = c.run(&["encrypt", "--key", "k", "e2"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no enabled version"),
        "{}",
        stderr(&out)
    );
    assert!(!c.path("e2.hseal").exists());

    let out = json(&c.ok(&["--json", "key", "enable", "k", "--version", "1"]));
    assert_eq!(out["state"], "active");
    c.ok(&["key", "enable", "k", "--version", "2"]);
    assert_eq!(states(&c, "k"), st(&[(1, "decrypt-only"), (2, "active")]));
    for f in [&a, &b, &d, &e1] {
        assert!(decrypts(&c, f).status.success(), "{f}");
    }

    // Unknown versions and keys are key errors.
    for args in [
        &["key", "disable", "k", "--version", "9"][..],
        &["key", "enable", "nope", "--version", "1"],
    ] {
        let out = c.run(args);
        assert_eq!(code(&out), 4, "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn destroy_needs_yes_spares_the_current_version_and_shreds_what_was_under_it() {
    let c = Cli::with_key();
    let a = seal(&c, "a");
    c.ok(&["key", "rotate", "k"]);
    let b = seal(&c, "b");
    let before = c.ok(&["--json", "key", "list"]);

    // Without --yes: a usage error saying what would go; nothing changes.
    let out = c.run(&["key", "destroy", "k", "--version", "1"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("without --yes") && e.contains("hsmseal:k:v1"),
        "{e}"
    );
    assert!(e.contains("never be decrypted again"), "{e}");
    // The current version: refused even with --yes unless --force.
    let out = c.run(&["key", "destroy", "k", "--version", "2", "--yes"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("current version"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    // A version that never existed.
    let out = c.run(&["key", "destroy", "k", "--version", "3", "--yes"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert_eq!(
        c.ok(&["--json", "key", "list"]),
        before,
        "HSM objects changed"
    );
    assert!(decrypts(&c, &a).status.success());

    let out = json(&c.ok(&["--json", "key", "destroy", "k", "--version", "1", "--yes"]));
    assert_eq!(out["action"], "destroy");
    assert_eq!(out["changed"], true);
    assert_eq!(out["state"], "destroyed");
    assert_eq!(out["current_version"], 2);
    let out = decrypts(&c, &a);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("key k v1 not found on token"), "{e}");
    assert!(e.contains("destroyed"), "{e}");
    assert!(decrypts(&c, &b).status.success());

    // The destroyed version stays listed, without an object.
    let list = keys(&c.ok(&["--json", "key", "list"]));
    assert_eq!(list[0]["version"], 1);
    assert_eq!(list[0]["state"], "destroyed");
    assert_eq!(list[0]["created"], Value::Null);
    assert_eq!(list[0]["attributes"], Value::Null);
    assert_eq!(list[1]["state"], "active");
    // Idempotent.
    let text =
        String::from_utf8(c.ok(&["key", "destroy", "k", "--version", "1", "--yes"])).unwrap();
    assert!(text.contains("already destroyed"), "{text}");

    // --force destroys the current version; its number is never reused.
    c.ok(&["key", "rotate", "k"]);
    c.ok(&["key", "destroy", "k", "--version", "3", "--yes", "--force"]);
    assert_eq!(
        states(&c, "k"),
        st(&[(1, "destroyed"), (2, "active"), (3, "destroyed")])
    );
    let v = json(&c.ok(&["--json", "key", "rotate", "k"]));
    assert_eq!(v["version"], 4);
    assert!(decrypts(&c, &b).status.success());
}

#[test]
fn purge_destroys_old_non_current_versions_and_dry_run_changes_nothing() {
    let c = Cli::with_key();
    let a = seal(&c, "a");
    c.ok(&["key", "rotate", "k"]);
    let b = seal(&c, "b");
    c.ok(&["key", "rotate", "k"]);
    c.ok(&["key", "disable", "k", "--version", "2"]);
    let d = seal(&c, "d");
    let before = c.ok(&["--json", "key", "list"]);

    // Nothing is an hour old: everything spared, for its reason.
    let r = json(&c.ok(&["--json", "key", "purge", "k", "--older-than", "1h", "--yes"]));
    assert_eq!(r["dry_run"], false);
    assert_eq!(r["current_version"], 3);
    assert_eq!(r["destroyed"].as_array().unwrap().len(), 0);
    let spared = r["spared"].as_array().unwrap();
    assert_eq!(spared.len(), 3);
    assert!(spared[0]["reason"]
        .as_str()
        .unwrap()
        .contains("after the cutoff"));
    assert!(spared[2]["reason"].as_str().unwrap().contains("current"));
    assert!(unix(r["cutoff"].as_str().unwrap()).abs_diff(now() - 3600) < 300);
    assert_eq!(c.ok(&["--json", "key", "list"]), before);

    // A dry run lists every non-current version and changes nothing.
    let r = json(&c.ok(&[
        "--json",
        "key",
        "purge",
        "k",
        "--older-than",
        "0s",
        "--dry-run",
    ]));
    assert_eq!(r["dry_run"], true);
    let versions = |items: &Value| -> Vec<u64> {
        items
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["version"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(versions(&r["destroyed"]), [1, 2]);
    assert_eq!(r["destroyed"][1]["state"], "disabled");
    assert_eq!(versions(&r["spared"]), [3]);
    let text =
        String::from_utf8(c.ok(&["key", "purge", "k", "--older-than", "0s", "--dry-run"])).unwrap();
    assert!(
        text.contains("would destroy") && text.contains("dry run"),
        "{text}"
    );
    assert_eq!(
        c.ok(&["--json", "key", "list"]),
        before,
        "dry run changed the HSM"
    );

    // Without --yes: refused, naming what it would destroy; nothing changes.
    let out = c.run(&["key", "purge", "k", "--older-than", "0s"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("v1, v2"), "{}", stderr(&out));
    assert_eq!(c.ok(&["--json", "key", "list"]), before);

    let r = json(&c.ok(&["--json", "key", "purge", "k", "--older-than", "0s", "--yes"]));
    assert_eq!(versions(&r["destroyed"]), [1, 2]);
    assert_eq!(versions(&r["spared"]), [3]);
    assert_eq!(
        states(&c, "k"),
        st(&[(1, "destroyed"), (2, "destroyed"), (3, "active")])
    );
    for f in [&a, &b] {
        let out = decrypts(&c, f);
        assert_eq!(code(&out), 4, "{f}: {}", stderr(&out));
        assert!(stderr(&out).contains("destroyed"), "{}", stderr(&out));
    }
    assert!(decrypts(&c, &d).status.success());
    let e = seal(&c, "e");
    assert_eq!(file_version(&c, &e), 3);
    // Again: nothing left to purge.
    let r = json(&c.ok(&["--json", "key", "purge", "k", "--older-than", "0s", "--yes"]));
    assert_eq!(r["destroyed"].as_array().unwrap().len(), 0);
}

/// `key rotate --if-older-than DURATION` makes a nightly job idempotent
/// (issue 10): it rotates only a current version created at or before
/// now - DURATION (0s: always old; 1h: a version made by this test never
/// is), or a key with no usable version; it says which and exits 0 either
/// way, and the JSON says `rotated`.
#[test]
fn rotate_if_older_than_rotates_only_an_old_or_unusable_current_version() {
    let c = Cli::with_key();
    let before = c.ok(&["--json", "key", "list"]);
    let r = json(&c.ok(&["--json", "key", "rotate", "k", "--if-older-than", "1h"]));
    assert_eq!(r["rotated"], false, "{r}");
    assert_eq!(r["current_version"], 1);
    assert_eq!(r["previous_version"], 1);
    assert!(
        r["reason"].as_str().unwrap().contains("after the cutoff"),
        "{r}"
    );
    assert!(unix(r["cutoff"].as_str().unwrap()).abs_diff(now() - 3600) < 300);
    assert_eq!(c.ok(&["--json", "key", "list"]), before, "nothing changed");
    let out = String::from_utf8(c.ok(&["key", "rotate", "k", "--if-older-than", "2w"])).unwrap();
    assert!(out.starts_with("not rotated: key k"), "{out}");
    assert!(out.contains("use v1. Nothing changed"), "{out}");

    let r = json(&c.ok(&["--json", "key", "rotate", "k", "--if-older-than", "0s"]));
    assert_eq!(r["rotated"], true, "{r}");
    assert_eq!(
        (
            r["previous_version"].as_u64(),
            r["current_version"].as_u64()
        ),
        (Some(1), Some(2))
    );
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("at or before the cutoff"),
        "{r}"
    );
    assert_eq!(states(&c, "k"), st(&[(1, "decrypt-only"), (2, "active")]));
    // Straight after, the same nightly job does nothing.
    let r = json(&c.ok(&["--json", "key", "rotate", "k", "--if-older-than", "1d"]));
    assert_eq!(
        (r["rotated"].as_bool(), r["current_version"].as_u64()),
        (Some(false), Some(2))
    );

    // No usable version (every one disabled): rotated, however young.
    c.ok(&["key", "disable", "k", "--version", "2"]);
    c.ok(&["key", "disable", "k", "--version", "1"]);
    let out = String::from_utf8(c.ok(&["key", "rotate", "k", "--if-older-than", "400d"])).unwrap();
    assert!(out.starts_with("created k v3"), "{out}");
    assert!(out.contains("no usable version"), "{out}");
    assert_eq!(
        states(&c, "k"),
        st(&[(1, "disabled"), (2, "disabled"), (3, "active")])
    );
    // A key that does not exist: key error; a bad duration: usage error.
    let out = c.run(&["key", "rotate", "nokey", "--if-older-than", "1d"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    for bad in ["1y", "", "-1d"] {
        let arg = format!("--if-older-than={bad}");
        let out = c.run(&["key", "rotate", "k", &arg]);
        assert_eq!(code(&out), 2, "{bad:?}: {}", stderr(&out));
    }
    assert_eq!(states(&c, "k").len(), 3);
}

#[test]
fn bad_durations_and_flags_are_usage_errors_that_change_nothing() {
    let c = Cli::with_key();
    c.ok(&["key", "rotate", "k"]);
    let before = c.ok(&["--json", "key", "list"]);
    for bad in [
        "",
        "10",
        "d",
        "-1d",
        "1.5d",
        "1y",
        "1d12h",
        "12 h",
        "1D",
        "abc",
        "99999999999999999999s",
    ] {
        let arg = format!("--older-than={bad}");
        let out = c.run(&["key", "purge", "k", &arg, "--yes"]);
        assert_eq!(code(&out), 2, "{bad:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("invalid") || stderr(&out).contains("a value is required"),
            "{bad:?}: {}",
            stderr(&out)
        );
    }
    for args in [
        &["key", "purge", "k", "--yes"][..],
        &["key", "disable", "k"],
        &["key", "disable", "k", "--version", "0"],
        &["key", "destroy", "k", "--version", "x", "--yes"],
        &["key", "enable", "k", "--version", "-1"],
        &["key", "disable", "bad name", "--version", "1"],
    ] {
        let out = c.run(args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
    }
    assert_eq!(c.ok(&["--json", "key", "list"]), before);
}

#[test]
fn help_says_what_each_key_command_changes() {
    let c = Cli::new();
    for cmd in ["create", "rotate", "disable", "enable", "destroy", "purge"] {
        let out = c.ok(&["key", cmd, "--help"]);
        let help = String::from_utf8(out).unwrap();
        assert!(help.contains("Changes in the HSM:"), "{cmd}: {help}");
        assert!(help.contains("Changes on disk: none"), "{cmd}: {help}");
    }
    for cmd in ["list", "info"] {
        let help = String::from_utf8(c.ok(&["key", cmd, "--help"])).unwrap();
        assert!(help.contains("Changes nothing"), "{cmd}: {help}");
    }
}
