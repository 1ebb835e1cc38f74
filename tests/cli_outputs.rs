//! What `-o PATH` (and an `--output-dir` output) does with what is already
//! at PATH (issue 9, item 5): a FIFO or character device is written into
//! without --force; `/dev/stdout` is stdout; a symbolic link to a regular
//! file has its target replaced with --force and stays a link; a dangling
//! link, a directory or a link to one is refused; nothing but a regular file
//! is ever replaced.
//!
//! Where a regression could replace a system file (running as root), the
//! test writes to its own copies: a character device made with mknod(2)
//! with /dev/null's numbers, and its own link to /proc/self/fd/1 (what
//! /dev/stdout is). The literal /dev/null and /dev/stdout are used only
//! without --force, where even the old code refused to replace them.

mod support;

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use support::{code, data, stderr, write, Cli};

fn sealed(c: &Cli, name: &str, plain: &[u8]) {
    write(&c.path(name), plain);
    c.ok(&["-q", "encrypt", "--key", "k", name]);
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Reads a FIFO to its end on a thread.
fn drain(p: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    let p = p.to_path_buf();
    std::thread::spawn(move || {
        let mut v = Vec::new();
        std::fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
        v
    })
}

fn is_fifo(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_fifo())
}

#[test]
fn a_fifo_is_written_into_never_replaced() {
    let c = Cli::with_key();
    let plain = data(200_000, 1);
    sealed(&c, "x", &plain);
    let fifo = c.path("fifo");
    mkfifo(&fifo);
    for force in [false, true] {
        let reader = drain(&fifo);
        let mut args = vec!["decrypt", "-o", "fifo", "x.hseal"];
        if force {
            args.insert(1, "--force");
        }
        let o = c.run(&args);
        assert_eq!(code(&o), 0, "force {force}: {}", stderr(&o));
        assert_eq!(reader.join().unwrap(), plain, "force {force}");
        assert!(is_fifo(&fifo), "force {force}: the FIFO was replaced");
    }
    // encrypt into it too; what comes out decrypts.
    let reader = drain(&fifo);
    let o = c.run(&["encrypt", "--key", "k", "-o", "fifo", "x"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    write(&c.path("y.hseal"), &reader.join().unwrap());
    c.ok(&["decrypt", "-o", "y", "y.hseal"]);
    assert_eq!(std::fs::read(c.path("y")).unwrap(), plain);
    assert!(is_fifo(&fifo));
    // A damaged chunk: the FIFO gets only authenticated plaintext (a
    // prefix) and the run fails, as to stdout.
    let mut bad = std::fs::read(c.path("x.hseal")).unwrap();
    let at = 1024 + 56 + 16400 * 7 + 100;
    bad[at] ^= 1;
    write(&c.path("bad.hseal"), &bad);
    let reader = drain(&fifo);
    let o = c.run(&["decrypt", "-o", "fifo", "bad.hseal"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let got = reader.join().unwrap();
    assert!(
        got.len() <= 7 * 16384 && plain.starts_with(&got),
        "unauthenticated output"
    );
    assert!(is_fifo(&fifo));
    assert!(c.files().iter().all(|n| !n.contains(".hsmseal-tmp-")));
}

/// A character device with /dev/null's numbers: made with mknod in the
/// test's directory when allowed (root), else the real /dev/null, which a
/// non-root user cannot replace anyway.
fn null_device(c: &Cli) -> PathBuf {
    let p = c.path("null");
    let cp = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path; makedev is arithmetic.
    let made = unsafe { libc::mknod(cp.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    if made == 0 {
        p
    } else {
        // SAFETY: geteuid cannot fail.
        assert_ne!(unsafe { libc::geteuid() }, 0, "mknod failed as root");
        PathBuf::from("/dev/null")
    }
}

#[test]
fn a_character_device_is_written_into_never_replaced() {
    let c = Cli::with_key();
    let plain = data(50_000, 2);
    sealed(&c, "x", &plain);
    let dev = null_device(&c);
    let rdev = std::fs::metadata(&dev).unwrap().rdev();
    let dev_s = dev.to_str().unwrap();
    for args in [
        vec!["decrypt", "-o", dev_s, "x.hseal"],
        vec!["decrypt", "--force", "-o", dev_s, "x.hseal"],
        vec!["encrypt", "--key", "k", "-o", dev_s, "x"],
        vec!["encrypt", "--key", "k", "--force", "-o", dev_s, "x"],
    ] {
        let o = c.run(&args);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        let m = std::fs::symlink_metadata(&dev).unwrap();
        assert!(m.file_type().is_char_device(), "{args:?}: replaced");
        assert_eq!(m.rdev(), rdev);
    }
    // The real one, without --force (the case the old message sent to
    // --force): written into. Unless something on this machine already
    // replaced it (an older hsmseal with -o /dev/null --force as root did).
    let real = std::fs::symlink_metadata("/dev/null").unwrap();
    if !real.file_type().is_char_device() {
        eprintln!(
            "SKIPPED the /dev/null part: /dev/null here is {:?}, not a device; restore it with: mknod -m 666 /dev/.n c 1 3 && mv /dev/.n /dev/null",
            real.file_type()
        );
        return;
    }
    let o = c.run(&["decrypt", "-o", "/dev/null", "x.hseal"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(std::fs::symlink_metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
}

#[test]
fn dev_stdout_is_stdout() {
    let c = Cli::with_key();
    let plain = data(100_000, 3);
    sealed(&c, "x", &plain);
    // stdout a pipe: the data arrives there, no --force needed, and --json
    // lines keep out of it.
    let o = c.run(&["decrypt", "-o", "/dev/stdout", "x.hseal"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(o.stdout, plain);
    let o = c.run(&["--json", "decrypt", "-o", "/dev/stdout", "x.hseal"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(o.stdout, plain);
    assert!(stderr(&o).contains("\"summary\""), "{}", stderr(&o));
    // The same through our own link to /proc/self/fd/1, with --force.
    std::os::unix::fs::symlink("/proc/self/fd/1", c.path("so")).unwrap();
    let o = c.run(&["decrypt", "--force", "-o", "so", "x.hseal"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(o.stdout, plain);
    assert_eq!(
        std::fs::read_link(c.path("so")).unwrap(),
        PathBuf::from("/proc/self/fd/1")
    );
    // stdout a regular file (`> captured`): written through stdout, not
    // "already exists".
    let captured = c.path("captured");
    let mut cmd = c.cmd();
    cmd.args(["decrypt", "-o", "/dev/stdout", "x.hseal"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&captured).unwrap())
        .stderr(Stdio::piped());
    let o = cmd.output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::read(&captured).unwrap(), plain);
    // A damaged file: only authenticated chunks, exit 3.
    let mut bad = std::fs::read(c.path("x.hseal")).unwrap();
    bad[1024 + 56 + 16400 * 3 + 9] ^= 1;
    write(&c.path("bad.hseal"), &bad);
    let o = c.run(&["decrypt", "-o", "/dev/stdout", "bad.hseal"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(o.stdout.len() <= 3 * 16384 && plain.starts_with(&o.stdout));
}

#[test]
fn a_link_to_a_file_has_its_target_replaced_only_with_force() {
    let c = Cli::with_key();
    let plain = data(30_000, 4);
    sealed(&c, "x", &plain);
    std::fs::create_dir(c.path("real")).unwrap();
    write(&c.path("real/t"), b"old");
    std::os::unix::fs::symlink("real/t", c.path("l")).unwrap();
    let o = c.run(&["decrypt", "-o", "l", "x.hseal"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
    assert_eq!(std::fs::read(c.path("real/t")).unwrap(), b"old");
    let o = c.run(&["decrypt", "--force", "-o", "l", "x.hseal"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        std::fs::read_link(c.path("l")).unwrap(),
        PathBuf::from("real/t")
    );
    assert_eq!(std::fs::read(c.path("real/t")).unwrap(), plain);
    let mode = std::fs::metadata(c.path("real/t"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "plaintext not private");
    let temps = |d: &str| {
        std::fs::read_dir(c.path(d))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".hsmseal-tmp-")
            })
            .count()
    };
    assert_eq!(temps("."), 0);
    assert_eq!(temps("real"), 0);
    // A link to a FIFO: written into.
    mkfifo(&c.path("real/fifo"));
    std::os::unix::fs::symlink("real/fifo", c.path("lf")).unwrap();
    let reader = drain(&c.path("real/fifo"));
    let o = c.run(&["decrypt", "-o", "lf", "x.hseal"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(reader.join().unwrap(), plain);
    assert!(is_fifo(&c.path("real/fifo")));
}

#[test]
fn dangling_links_directories_and_sockets_are_refused() {
    let c = Cli::with_key();
    sealed(&c, "x", b"secret");
    std::os::unix::fs::symlink("nowhere/t", c.path("dangling")).unwrap();
    std::fs::create_dir(c.path("dir")).unwrap();
    std::os::unix::fs::symlink("dir", c.path("ldir")).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(c.path("sock")).unwrap();
    for target in ["dangling", "dir", "ldir", "sock"] {
        for force in [false, true] {
            let mut args = vec!["decrypt", "-o", target, "x.hseal"];
            if force {
                args.insert(1, "--force");
            }
            let o = c.run(&args);
            assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
            assert!(stderr(&o).contains(target), "{}", stderr(&o));
        }
    }
    assert_eq!(
        std::fs::read_link(c.path("dangling")).unwrap(),
        PathBuf::from("nowhere/t")
    );
    assert!(
        !c.path("nowhere").exists(),
        "created through a dangling link"
    );
    assert!(std::fs::symlink_metadata(c.path("ldir"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::symlink_metadata(c.path("sock"))
        .unwrap()
        .file_type()
        .is_socket());
    assert_eq!(std::fs::read_dir(c.path("dir")).unwrap().count(), 0);
}

#[test]
fn output_dir_outputs_follow_the_same_rules() {
    let c = Cli::with_key();
    std::fs::create_dir_all(c.path("t")).unwrap();
    std::fs::create_dir_all(c.path("out")).unwrap();
    let plains: Vec<Vec<u8>> = (0..3).map(|i| data(20_000 + i * 7, i as u64)).collect();
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        sealed(&c, &format!("t/{n}"), &plains[i]);
        std::fs::remove_file(c.path(&format!("t/{n}"))).unwrap();
    }
    mkfifo(&c.path("out/a"));
    std::os::unix::fs::symlink("nowhere", c.path("out/b")).unwrap();
    write(&c.path("out/c"), b"old");
    let reader = drain(&c.path("out/a"));
    let o = c.run(&[
        "--json",
        "decrypt",
        "--force",
        "-r",
        "t",
        "--output-dir",
        "out",
    ]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert_eq!(reader.join().unwrap(), plains[0]);
    assert!(is_fifo(&c.path("out/a")));
    assert_eq!(
        std::fs::read_link(c.path("out/b")).unwrap(),
        PathBuf::from("nowhere")
    );
    assert_eq!(std::fs::read(c.path("out/c")).unwrap(), plains[2]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let status: Vec<&str> = lines[..3]
        .iter()
        .map(|l| l["status"].as_str().unwrap())
        .collect();
    assert_eq!(status, ["ok", "failed", "ok"]);
    assert_eq!(lines[1]["exit_code"], 2);
}

#[test]
fn in_place_needs_a_regular_output_and_a_regular_input() {
    let c = Cli::with_key();
    let plain = data(10_000, 5);
    sealed(&c, "x", &plain);
    std::fs::remove_file(c.path("x")).unwrap();
    // The derived output is a FIFO: refused, the input stays.
    mkfifo(&c.path("x"));
    let before = std::fs::read(c.path("x.hseal")).unwrap();
    let o = c.run(&["decrypt", "--in-place", "--force", "x.hseal"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert_eq!(std::fs::read(c.path("x.hseal")).unwrap(), before);
    assert!(is_fifo(&c.path("x")));
    // The input is a link: refused, link and target stay.
    std::fs::remove_file(c.path("x")).unwrap();
    std::os::unix::fs::symlink("x.hseal", c.path("link.hseal")).unwrap();
    let o = c.run(&["decrypt", "--in-place", "link.hseal"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
    assert!(std::fs::symlink_metadata(c.path("link.hseal"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(c.path("x.hseal")).unwrap(), before);
    assert!(!c.path("link").exists());
}
