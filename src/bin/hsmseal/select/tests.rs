//! The README "Bulk runs" selection rules, one test each, run in-process on
//! real temporary trees (the HSM is not the point here: the one sealed file
//! needed is sealed under a `MemoryBackend` key). The command-line tests in
//! tests/cli_bulk.rs keep the exit codes and the JSON reports.

use super::*;
use hsmseal::error::ErrorKind;
use hsmseal::fs::TEMP_MARKER;
use hsmseal::{KeyBackend, KeyRef, MemoryBackend, StreamOptions};
use std::path::Path;

/// A temporary tree built from `(relative path, contents)` pairs.
fn tree(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (rel, data) in files {
        let p = d.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    d
}

fn args(roots: &[&Path], include: &[&str], exclude: &[&str]) -> SelectArgs {
    SelectArgs {
        recursive: roots.iter().map(|r| r.to_path_buf()).collect(),
        include: include.iter().map(|s| s.to_string()).collect(),
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
        suffix: SUFFIX.into(),
        allow_empty: false,
    }
}

/// The `rel` of every item, `/`-separated.
fn rels(s: &Selection) -> Vec<String> {
    s.items
        .iter()
        .map(|i| i.rel.to_string_lossy().into_owned())
        .collect()
}

/// The files of one `-r` tree that `--include`/`--exclude` take
/// (`--allow-empty`: none is an answer here).
fn taken(root: &Path, include: &[&str], exclude: &[&str]) -> Vec<String> {
    let mut sel = args(&[root], include, exclude);
    sel.allow_empty = true;
    rels(&select(&[], &sel, Want::AnyFile, false).unwrap())
}

fn usage_error(r: Result<Selection>) -> String {
    let e = r.err().expect("a usage error");
    assert_eq!(e.kind(), ErrorKind::Usage, "{}", e.message());
    e.message().to_string()
}

/// A real hsmseal file (sealed under an in-memory key).
fn sealed(plain: &[u8]) -> Vec<u8> {
    let keys = MemoryBackend::new();
    keys.add_version("k");
    let kwk = KeyRef {
        name: "k".into(),
        version: keys.current_version("k").unwrap(),
    };
    let mut out = Vec::new();
    hsmseal::envelope::file::seal(&keys, &kwk, plain, &mut out, &StreamOptions::default()).unwrap();
    out
}

#[test]
fn named_inputs_first_then_each_tree_in_path_order() {
    let t1 = tree(&[
        ("a.txt", b"1"),
        ("a/x", b"2"),
        ("a-b", b"3"),
        ("B", b"4"),
        ("a/c/d", b"5"),
    ]);
    let t2 = tree(&[("z", b"6")]);
    let named = t2.path().join("z");
    let sel = args(&[t1.path(), t2.path()], &["*.none"], &[]);
    // The named file is taken whatever the filters say; it comes first,
    // with its file name as `rel`.
    let mut sel_all = sel.clone();
    sel_all.include.clear();
    let s = select(std::slice::from_ref(&named), &sel_all, Want::AnyFile, false).unwrap();
    assert_eq!(
        rels(&s),
        ["z", "B", "a/c/d", "a/x", "a-b", "a.txt", "z"],
        "named, then t1 by path (component by component, bytewise), then t2"
    );
    assert_eq!(s.items[0].path(), Some(named.as_path()));
    assert_eq!(s.items[2].path(), Some(t1.path().join("a/c/d").as_path()));
    assert_eq!(s.items[0].len, Some(1));
    assert!(s.items.iter().all(|i| i.verdict.is_none()));
    let mut allow = sel;
    allow.allow_empty = true;
    let s = select(std::slice::from_ref(&named), &allow, Want::AnyFile, false).unwrap();
    assert_eq!(rels(&s), ["z"], "filters apply under -r only");
}

#[test]
fn links_under_r_are_reported_not_followed() {
    let t = tree(&[("real/f", b"x"), ("elsewhere/g", b"y")]);
    let r = t.path();
    std::os::unix::fs::symlink(r.join("real/f"), r.join("live")).unwrap();
    std::os::unix::fs::symlink(r.join("nowhere"), r.join("broken")).unwrap();
    std::os::unix::fs::symlink(r.join("elsewhere"), r.join("dirlink")).unwrap();
    std::os::unix::fs::symlink(r, r.join("real/loop")).unwrap();
    let s = select(&[], &args(&[r], &[], &[]), Want::AnyFile, false).unwrap();
    let got: Vec<(String, &str)> = s
        .items
        .iter()
        .map(|i| {
            let v = match &i.verdict {
                None => "take",
                Some(Verdict::Skip(_)) => "skip",
                Some(Verdict::Fail(_)) => "fail",
            };
            (i.rel.to_string_lossy().into_owned(), v)
        })
        .collect();
    let want = [
        ("broken", "fail"),
        ("dirlink", "skip"),
        ("elsewhere/g", "take"),
        ("live", "skip"),
        ("real/f", "take"),
        ("real/loop", "skip"),
    ];
    let want: Vec<(String, &str)> = want.iter().map(|(p, v)| (p.to_string(), *v)).collect();
    assert_eq!(
        got, want,
        "no dirlink/g, no real/loop/...: links not followed"
    );
    // A link named on the command line is an input like any file (opening
    // it follows it).
    let s = select(
        &[r.join("live")],
        &args(&[], &[], &[]),
        Want::AnyFile,
        false,
    )
    .unwrap();
    assert!(s.items[0].verdict.is_none());
    // The -r directory itself must be a directory, not a link to one.
    std::os::unix::fs::symlink(r.join("real"), r.join("rootlink")).unwrap();
    let link = r.join("rootlink");
    let msg = usage_error(select(&[], &args(&[&link], &[], &[]), Want::AnyFile, false));
    assert!(msg.contains("is not a directory"), "{msg}");
}

#[test]
fn name_patterns_match_the_file_name_path_patterns_the_relative_path() {
    let t = tree(&[
        ("a.log", b""),
        ("logs/b.log", b""),
        ("logs/2024/c.log", b""),
        ("logs/2024/01/d.gz", b""),
        ("x/logs/e.log", b""),
    ]);
    let r = t.path();
    assert_eq!(
        taken(r, &["*.log"], &[]),
        ["a.log", "logs/2024/c.log", "logs/b.log", "x/logs/e.log"],
        "no '/': the name, at any depth"
    );
    assert_eq!(
        taken(r, &["logs/*.log"], &[]),
        ["logs/b.log"],
        "with '/': the path from the -r directory; * stops at /"
    );
    assert_eq!(taken(r, &["logs/?/*"], &[]), Vec::<String>::new());
    assert_eq!(taken(r, &["logs/????/?.log"], &[]), ["logs/2024/c.log"]);
    assert_eq!(
        taken(r, &["logs/**/*.log"], &[]),
        ["logs/2024/c.log", "logs/b.log"],
        "** crosses /, and **/ matches no directory"
    );
    assert_eq!(
        taken(r, &["**/logs/*.log"], &[]),
        ["logs/b.log", "x/logs/e.log"]
    );
    assert_eq!(
        taken(r, &["logs/**"], &[]),
        ["logs/2024/01/d.gz", "logs/2024/c.log", "logs/b.log"]
    );
    assert_eq!(
        taken(r, &["[a-c].log"], &[]),
        ["a.log", "logs/2024/c.log", "logs/b.log"]
    );
    assert_eq!(taken(r, &["[!a-c].log"], &[]), ["x/logs/e.log"]);
    assert_eq!(
        taken(r, &["*.{gz,nothing}", "{a,e}.log"], &[]),
        ["a.log", "logs/2024/01/d.gz", "x/logs/e.log"],
        "braces, and several includes: any of them"
    );
}

#[test]
fn exclude_wins_over_include() {
    let t = tree(&[
        ("keep/a.sql", b""),
        ("keep/cache/b.sql", b""),
        ("c.sql", b""),
        ("d.tmp", b""),
    ]);
    let r = t.path();
    assert_eq!(
        taken(r, &["*.sql"], &["keep/cache/**"]),
        ["c.sql", "keep/a.sql"]
    );
    assert_eq!(taken(r, &[], &["*.sql"]), ["d.tmp"], "exclude alone");
    assert!(
        taken(r, &["c.sql"], &["c.*"]).is_empty(),
        "both match: excluded"
    );
}

#[test]
fn hsmseal_temp_files_are_never_items() {
    let t = tree(&[
        ("a", b"1"),
        (&format!(".a{TEMP_MARKER}123-00ff"), b"half"),
        (&format!("d{TEMP_MARKER}9/inside"), b"2"),
    ]);
    assert_eq!(taken(t.path(), &[], &[]), ["a"]);
}

#[test]
fn sealed_runs_take_hsmseal_files_fail_damaged_ones_and_count_others() {
    let good = sealed(b"data");
    let mut flipped = good.clone();
    flipped[1] ^= 0x20; // "HSMSEAL" -> "hSMSEAL": a damaged header
    let t = tree(&[
        ("a.bin", &good),         // magic, any name: taken
        ("b.txt", b"plain text"), // other
        ("c.hseal", b"not sealed, but named so"),
        ("d", &flipped),
        ("e.hseal", b""),
        ("f.csv", b"x,y\n"), // other
    ]);
    let r = t.path();
    let s = select(&[], &args(&[r], &[], &[]), Want::Sealed, false).unwrap();
    assert_eq!(s.other_files, 2);
    let got: Vec<(String, Option<ErrorKind>)> = s
        .items
        .iter()
        .map(|i| {
            let kind = match &i.verdict {
                None => None,
                Some(Verdict::Fail(e)) => Some(e.kind()),
                Some(Verdict::Skip(why)) => panic!("skip: {why}"),
            };
            (i.rel.to_string_lossy().into_owned(), kind)
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a.bin".to_string(), None),
            ("c.hseal".to_string(), Some(ErrorKind::Format)),
            ("d".to_string(), Some(ErrorKind::Integrity)),
            ("e.hseal".to_string(), Some(ErrorKind::Format)),
        ]
    );
    // --suffix changes which names say "hsmseal file".
    let mut other_suffix = args(&[r], &[], &[]);
    other_suffix.suffix = ".csv".into();
    let s = select(&[], &other_suffix, Want::Sealed, false).unwrap();
    assert_eq!(rels(&s), ["a.bin", "d", "f.csv"]);
    assert_eq!(s.other_files, 3);
    // encrypt takes every file; it decides about hsmseal files itself.
    let s = select(&[], &args(&[r], &[], &[]), Want::AnyFile, false).unwrap();
    assert_eq!(s.items.len(), 6);
    assert!(s.items.iter().all(|i| i.verdict.is_none()));
}

#[test]
fn a_tree_with_nothing_to_do_is_an_error_unless_allowed() {
    let empty = tempfile::tempdir().unwrap();
    let only_other = tree(&[("notes.txt", b"hello")]);
    let only_link = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(only_other.path(), only_link.path().join("l")).unwrap();
    let cases: [(&Path, &[&str], Want, &str); 4] = [
        (empty.path(), &[], Want::AnyFile, "no files found"),
        (
            only_other.path(),
            &[],
            Want::Sealed,
            "no hsmseal files (only 1 other file)",
        ),
        (only_other.path(), &["*"], Want::AnyFile, "no files found"),
        (only_link.path(), &[], Want::AnyFile, "no files found"),
    ];
    for (root, exclude, want, says) in cases {
        let sel = args(&[root], &[], exclude);
        let msg = usage_error(select(&[], &sel, want, false));
        assert!(msg.contains(says), "{msg}");
        assert!(msg.contains("--allow-empty"), "{msg}");
        let mut allowed = sel;
        allowed.allow_empty = true;
        let s = select(&[], &allowed, want, false).unwrap();
        assert!(s.items.iter().all(|i| i.verdict.is_some()), "{root:?}");
    }
    // One empty tree among full ones still stops the run.
    let full = tree(&[("f", b"1")]);
    let sel = args(&[full.path(), empty.path()], &[], &[]);
    usage_error(select(&[], &sel, Want::AnyFile, false));
}

#[test]
fn misuse_is_a_usage_error() {
    let t = tree(&[("f", b"1")]);
    let f = t.path().join("f");
    // Filters need -r.
    let msg = usage_error(select(
        std::slice::from_ref(&f),
        &args(&[], &["*"], &[]),
        Want::AnyFile,
        false,
    ));
    assert!(msg.contains("name a directory with -r"), "{msg}");
    // -r takes a directory.
    let msg = usage_error(select(&[], &args(&[&f], &[], &[]), Want::AnyFile, false));
    assert!(msg.contains("not a directory"), "{msg}");
    // stdin only alone; with no input at all, stdin where allowed.
    let dash = PathBuf::from("-");
    let two = [dash.clone(), f.clone()];
    usage_error(select(&two, &args(&[], &[], &[]), Want::AnyFile, true));
    usage_error(select(
        std::slice::from_ref(&dash),
        &args(&[t.path()], &[], &[]),
        Want::AnyFile,
        true,
    ));
    let s = select(&[], &args(&[], &[], &[]), Want::AnyFile, true).unwrap();
    assert!(matches!(
        s.items[..],
        [Item {
            input: Input::Stdin,
            ..
        }]
    ));
    // An invalid pattern names itself.
    let msg = usage_error(select(
        &[],
        &args(&[t.path()], &["*.{a,b"], &[]),
        Want::AnyFile,
        false,
    ));
    assert!(msg.contains("--include \"*.{a,b\""), "{msg}");
}
