//! What depends on a key version, before it is destroyed: `inspect --deps`
//! finds file envelopes and column tokens (in plain dumps and inside sealed
//! ones), and `key purge --check` / `key destroy --check` refuse to destroy
//! a version that data there still needs, or anything at all when the
//! search is incomplete (issue 9: `key purge` could not know that tokens in
//! a sealed COPY dump still needed the version it destroyed).

mod support;

use serde_json::Value;
use support::{code, stderr, Cli};

/// A token with keys `k` (files) and `pii` (columns), and under `data/`:
/// `a.txt.hseal` (k), `users.csv` (pii tokens) and `dump.csv.hseal` (a
/// column dump sealed under k). Then both keys are rotated to v2 and the two
/// files rewrapped, so k v1 is needed by nothing while pii v1 is still
/// needed by the tokens, including those only visible inside the sealed dump.
fn setup() -> Cli {
    let c = Cli::with_key();
    c.ok(&["key", "create", "pii"]);
    std::fs::create_dir(c.path("data")).unwrap();
    std::fs::write(c.path("a.txt"), b"hello").unwrap();
    c.ok(&["encrypt", "--key", "k", "-o", "data/a.txt.hseal", "a.txt"]);
    let mut csv = String::from("id,ssn\n");
    for i in 0..50 {
        csv.push_str(&format!("{i},{:09}\n", i * 7919));
    }
    std::fs::write(c.path("plain.csv"), &csv).unwrap();
    c.ok(&[
        "columns",
        "encrypt",
        "--key",
        "pii",
        "--columns",
        "ssn",
        "--row-id",
        "id",
        "-i",
        "plain.csv",
        "-o",
        "data/users.csv",
    ]);
    c.ok(&[
        "columns",
        "encrypt",
        "--key",
        "pii",
        "--columns",
        "ssn",
        "-i",
        "plain.csv",
        "-o",
        "dump.csv",
    ]);
    c.ok(&[
        "encrypt",
        "--key",
        "k",
        "-o",
        "data/dump.csv.hseal",
        "dump.csv",
    ]);
    std::fs::remove_file(c.path("dump.csv")).unwrap();
    c.ok(&["key", "rotate", "k"]);
    c.ok(&["key", "rotate", "pii"]);
    c.ok(&["rotate", "-r", "data"]);
    c
}

use support::json_lines;

fn dep<'a>(lines: &'a [Value], key: &str, version: u64) -> Option<&'a Value> {
    lines
        .iter()
        .find(|l| l["type"] == "dependency" && l["key"] == key && l["version"] == version)
}

fn versions_of(c: &Cli, name: &str) -> Vec<(u64, String)> {
    let out = c.ok(&["key", "info", name, "--json"]);
    support::json_of_type(&out, "key")
        .iter()
        .map(|x| {
            (
                x["version"].as_u64().unwrap(),
                x["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn deps_find_envelopes_and_tokens_in_plain_and_sealed_dumps() {
    let c = setup();
    let lines = json_lines(&c.ok(&["inspect", "--deps", "data", "--json"]));
    let k2 = dep(&lines, "k", 2).expect("k v2 listed");
    assert_eq!(
        (k2["files"].as_u64(), k2["tokens"].as_u64()),
        (Some(2), Some(0))
    );
    assert!(
        dep(&lines, "k", 1).is_none(),
        "k v1 still listed: {lines:?}"
    );
    // 50 tokens in the plain dump, 50 more inside the sealed one.
    let p1 = dep(&lines, "pii", 1).expect("pii v1 listed");
    assert_eq!(p1["tokens"].as_u64(), Some(100), "{p1}");
    let paths: Vec<&str> = p1["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(paths, ["data/dump.csv.hseal", "data/users.csv"]);
    let summary = lines.last().unwrap();
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["complete"], true);
    assert_eq!(summary["hsmseal_files"], 2);

    // Headers only: no HSM, and the sealed dump's tokens stay invisible.
    let lines = json_lines(&c.ok(&["inspect", "--deps", "--headers-only", "data", "--json"]));
    assert_eq!(dep(&lines, "pii", 1).unwrap()["tokens"].as_u64(), Some(50));
    // Human form names the versions and what needs them.
    let text = String::from_utf8(c.ok(&["inspect", "--deps", "data"])).unwrap();
    assert!(
        text.contains("pii") && text.contains("data/users.csv"),
        "{text}"
    );
}

#[test]
fn purge_check_spares_needed_versions_and_exits_1() {
    let c = setup();
    // Without --check, retention would destroy both v1s.
    let dry = String::from_utf8(c.ok(&["key", "purge", "pii", "--older-than", "0s", "--dry-run"]))
        .unwrap();
    assert!(dry.contains("would destroy") && dry.contains("v1"), "{dry}");

    let o = c.run(&[
        "key",
        "purge",
        "pii",
        "--older-than",
        "0s",
        "--check",
        "data",
        "--yes",
    ]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("spared pii v1"), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("still needed by"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        versions_of(&c, "pii").iter().all(|(_, s)| s != "destroyed"),
        "a needed version was destroyed"
    );
    // The dumps still decrypt.
    c.ok(&["verify", "data/dump.csv.hseal"]);
    c.ok(&[
        "columns",
        "decrypt",
        "--columns",
        "ssn",
        "--row-id",
        "id",
        "-i",
        "data/users.csv",
        "-o",
        "back.csv",
    ]);
    assert_eq!(
        std::fs::read(c.path("back.csv")).unwrap(),
        std::fs::read(c.path("plain.csv")).unwrap()
    );

    // k v1 is needed by nothing under data/: purged, exit 0.
    c.ok(&[
        "key",
        "purge",
        "k",
        "--older-than",
        "0s",
        "--check",
        "data",
        "--yes",
    ]);
    let k = versions_of(&c, "k");
    assert!(k.contains(&(1, "destroyed".into())), "{k:?}");

    // key destroy --check refuses a needed version, even with --yes.
    let o = c.run(&[
        "key",
        "destroy",
        "pii",
        "--version",
        "1",
        "--yes",
        "--check",
        "data",
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("still needed by"), "{}", stderr(&o));

    // Once the data has moved off pii v1, the same purge destroys it.
    std::fs::remove_file(c.path("data/users.csv")).unwrap();
    std::fs::remove_file(c.path("data/dump.csv.hseal")).unwrap();
    c.ok(&[
        "key",
        "purge",
        "pii",
        "--older-than",
        "0s",
        "--check",
        "data",
        "--yes",
    ]);
    assert!(versions_of(&c, "pii").contains(&(1, "destroyed".into())));
}

#[test]
fn an_incomplete_search_destroys_nothing() {
    let c = setup();
    // One damaged file: its first byte flipped, so nothing says which key
    // version it needs.
    let p = c.path("data/a.txt.hseal");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&p, &bytes).unwrap();
    let o = c.run(&["inspect", "--deps", "data"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("data/a.txt.hseal"), "{}", stderr(&o));
    let o = c.run(&[
        "key",
        "purge",
        "k",
        "--older-than",
        "0s",
        "--check",
        "data",
        "--yes",
    ]);
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("nothing was destroyed"),
        "{}",
        stderr(&o)
    );
    assert!(versions_of(&c, "k").iter().all(|(_, s)| s != "destroyed"));

    // A sealed file whose payload does not authenticate: also incomplete.
    bytes[0] ^= 0x20;
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&p, &bytes).unwrap();
    let o = c.run(&[
        "key",
        "purge",
        "k",
        "--older-than",
        "0s",
        "--check",
        "data",
        "--yes",
    ]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(versions_of(&c, "k").iter().all(|(_, s)| s != "destroyed"));

    // An empty (say, unmounted) directory is no evidence of anything.
    std::fs::create_dir(c.path("empty")).unwrap();
    let o = c.run(&[
        "key",
        "purge",
        "k",
        "--older-than",
        "0s",
        "--check",
        "empty",
        "--yes",
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("no files found"), "{}", stderr(&o));
    assert!(versions_of(&c, "k").iter().all(|(_, s)| s != "destroyed"));
}
