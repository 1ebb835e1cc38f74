//! The file commands (encrypt, verify, decrypt, rewrap) in process, from
//! their command line through the bulk loop, with the in-memory key backend
//! standing in for the HSM (`App::with_backend`): selection, outputs,
//! exit codes and what is left on disk are the point here. The same
//! commands against a real SoftHSM2 token are tests/cli_*.rs.

use crate::app::App;
use crate::cli::{Cli, Command};
use clap::Parser;
use hsmseal::backend::{KeyBackend, MemoryBackend};
use std::path::Path;
use std::sync::Arc;

/// Runs `hsmseal ARGS` (a file command) against `b`; the exit code the
/// process would have.
fn run(b: &Arc<MemoryBackend>, args: &[&str]) -> i32 {
    let cli = Cli::try_parse_from(std::iter::once("hsmseal").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let app = App::with_backend(b.clone() as Arc<dyn KeyBackend>, 2);
    let outcome = match cli.command {
        Command::Encrypt(a) => super::encrypt::run(&app, a),
        Command::Decrypt(a) => super::decrypt::run(&app, a),
        Command::Verify(a) => super::verify::run(&app, a),
        Command::Rewrap(a) => super::rewrap::run(&app, a),
        _ => panic!("not a file command: {args:?}"),
    };
    outcome.unwrap_or_else(|e| e.exit_code())
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Every file under `dir`, relative, sorted (temporaries included: none
/// may be left).
fn tree(dir: &Path) -> Vec<String> {
    walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| !e.file_type().is_dir())
        .map(|e| e.path().strip_prefix(dir).unwrap().display().to_string())
        .collect()
}

/// A tree of three files of different sizes (one of them empty).
fn plain_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let files = vec![
        ("a.txt".to_string(), b"alpha\n".repeat(1000)),
        (
            "sub/b.bin".to_string(),
            (0..70_000u32).map(|i| i as u8).collect(),
        ),
        ("sub/empty".to_string(), Vec::new()),
    ];
    for (name, data) in &files {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    files
}

/// A backend with key `k`, and in a temporary directory the plain tree
/// `p/` sealed into `s/` by `encrypt -r --output-dir` (exit 0 asserted).
struct Sealed {
    b: Arc<MemoryBackend>,
    d: tempfile::TempDir,
    files: Vec<(String, Vec<u8>)>,
}

impl Sealed {
    fn new() -> Sealed {
        let b = Arc::new(MemoryBackend::new());
        b.add_version("k");
        let d = tempfile::tempdir().unwrap();
        let files = plain_tree(&d.path().join("p"));
        let (plain, sealed) = (d.path().join("p"), d.path().join("s"));
        let args = [
            "encrypt",
            "-k",
            "k",
            "-r",
            &s(&plain),
            "--output-dir",
            &s(&sealed),
        ];
        assert_eq!(run(&b, &args), 0);
        Sealed { b, d, files }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.d.path().join(name)
    }
}

#[test]
fn a_tree_round_trips_through_encrypt_verify_decrypt() {
    let t = Sealed::new();
    let (b, files) = (&t.b, &t.files);
    let (plain, sealed, back) = (t.path("p"), t.path("s"), t.path("b"));
    assert_eq!(
        tree(&sealed),
        ["a.txt.hseal", "sub/b.bin.hseal", "sub/empty.hseal"]
    );
    assert_eq!(run(b, &["verify", "-r", &s(&sealed)]), 0);
    assert_eq!(
        run(
            b,
            &["decrypt", "-r", &s(&sealed), "--output-dir", &s(&back)]
        ),
        0
    );
    for (name, data) in files {
        assert_eq!(&std::fs::read(back.join(name)).unwrap(), data, "{name}");
    }
    // The inputs are untouched.
    for (name, data) in files {
        assert_eq!(&std::fs::read(plain.join(name)).unwrap(), data, "{name}");
    }
}

/// A flipped payload byte: verify and decrypt fail with the integrity
/// code (3), decrypt leaves no output and no temporary file, and in a tree
/// the other files are still done while the run exits 1.
#[test]
fn a_tampered_file_is_refused_and_leaves_nothing_behind() {
    let t = Sealed::new();
    let b = &t.b;
    let (sealed, back) = (t.path("s"), t.path("b"));
    let victim = sealed.join("sub/b.bin.hseal");
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&victim, &bytes).unwrap();

    assert_eq!(run(b, &["verify", &s(&victim)]), 3);
    let out = t.path("one.bin");
    assert_eq!(run(b, &["decrypt", &s(&victim), "-o", &s(&out)]), 3);
    assert!(!out.exists());
    assert_eq!(run(b, &["verify", "-r", &s(&sealed)]), 1);
    assert_eq!(
        run(
            b,
            &["decrypt", "-r", &s(&sealed), "--output-dir", &s(&back)]
        ),
        1
    );
    assert_eq!(
        tree(&back),
        ["a.txt", "sub/empty"],
        "no partial b.bin, no temp"
    );
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        bytes,
        "input left as it was"
    );
}

/// A file sealed under one backend's key does not open under another key
/// of the same name and version (another token): refused, nothing written.
#[test]
fn a_file_under_another_key_is_refused() {
    let (ours, theirs) = (
        Arc::new(MemoryBackend::new()),
        Arc::new(MemoryBackend::new()),
    );
    ours.add_version("k");
    theirs.add_version("k");
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("f");
    std::fs::write(&input, b"secret").unwrap();
    assert_eq!(run(&ours, &["encrypt", "-k", "k", &s(&input)]), 0);
    let sealed = d.path().join("f.hseal");
    let out = d.path().join("f.out");
    let code = run(&theirs, &["decrypt", &s(&sealed), "-o", &s(&out)]);
    assert!(code == 3 || code == 4, "exit {code}");
    assert!(!out.exists());
    // A key name the backend does not have at all: the key code (4).
    let other = Arc::new(MemoryBackend::new());
    other.add_version("x");
    assert_eq!(run(&other, &["verify", &s(&sealed)]), 4);
}

/// rewrap moves files to the key's current version without touching the
/// payload; a second rewrap changes nothing; the data still decrypts.
#[test]
fn rewrap_moves_files_to_the_current_version_once() {
    let b = &Arc::new(MemoryBackend::new());
    b.add_version("k");
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("f");
    let data = b"payload ".repeat(5000);
    std::fs::write(&input, &data).unwrap();
    assert_eq!(run(b, &["encrypt", "-k", "k", &s(&input)]), 0);
    let sealed = d.path().join("f.hseal");
    let before = std::fs::read(&sealed).unwrap();
    assert_eq!(b.add_version("k"), 2);
    assert_eq!(run(b, &["rewrap", &s(&sealed)]), 0);
    let after = std::fs::read(&sealed).unwrap();
    assert_ne!(before[..1024], after[..1024], "header rewritten");
    assert_eq!(before[1024..], after[1024..], "payload untouched");
    assert_eq!(run(b, &["rewrap", &s(&sealed)]), 0);
    assert_eq!(std::fs::read(&sealed).unwrap(), after, "already current");
    let out = d.path().join("f.out");
    assert_eq!(run(b, &["decrypt", &s(&sealed), "-o", &s(&out)]), 0);
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

/// An existing output is never replaced without --force (usage, exit 2),
/// and is left as it was.
#[test]
fn an_existing_output_needs_force() {
    let b = &Arc::new(MemoryBackend::new());
    b.add_version("k");
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("f");
    std::fs::write(&input, b"new").unwrap();
    let sealed = d.path().join("f.hseal");
    std::fs::write(&sealed, b"someone else's file").unwrap();
    assert_eq!(run(b, &["encrypt", "-k", "k", &s(&input)]), 2);
    assert_eq!(std::fs::read(&sealed).unwrap(), b"someone else's file");
    assert_eq!(run(b, &["encrypt", "-k", "k", "--force", &s(&input)]), 0);
    assert_eq!(run(b, &["verify", &s(&sealed)]), 0);
}
