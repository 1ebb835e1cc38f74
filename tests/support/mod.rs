//! What the integration tests share: a SoftHSM2 token of their own
//! ([`token`]: each test its own token directory and `SOFTHSM2_CONF`), and
//! the real `hsmseal` binary run against it in a private working directory
//! (so no stray hsmseal.toml is picked up), with its environment cleared of
//! the caller's `HSMSEAL_*` settings.
// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

#[cfg(feature = "containers")]
pub mod container;
pub mod token;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
pub use token::TestToken;

pub const BIN: &str = env!("CARGO_BIN_EXE_hsmseal");

pub struct Cli {
    pub token: TestToken,
    pub work: tempfile::TempDir,
}

impl Cli {
    /// A fresh token and working directory.
    pub fn new() -> Cli {
        Cli {
            token: TestToken::new(),
            work: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A fresh token with key `k` already created.
    pub fn with_key() -> Cli {
        let c = Cli::new();
        c.ok(&["key", "create", "k"]);
        c
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// The binary with this test's token settings and nothing inherited.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        clear_hsmseal_env(&mut c);
        c.current_dir(self.work.path());
        for (k, v) in self.token.env() {
            c.env(k, v);
        }
        c
    }

    pub fn run_with(&self, args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Output {
        let mut c = self.cmd();
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        run_cmd(c, stdin)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, None, &[])
    }

    /// Runs with `stdin` as the standard input.
    pub fn run_in(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.run_with(args, Some(stdin), &[])
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "hsmseal {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Names of files in the working directory.
    pub fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

pub fn clear_hsmseal_env(c: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("HSMSEAL_") || k == "SOFTHSM2_CONF" {
            c.env_remove(k);
        }
    }
}

pub fn run_cmd(mut c: Command, stdin: Option<&[u8]>) -> Output {
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn hsmseal");
    if let Some(data) = stdin {
        let mut s = child.stdin.take().unwrap();
        let data = data.to_vec();
        // Write from a thread so a large input cannot deadlock against stdout.
        let t = std::thread::spawn(move || {
            let _ = s.write_all(&data);
        });
        let out = child.wait_with_output().expect("wait");
        t.join().unwrap();
        out
    } else {
        child.wait_with_output().expect("wait")
    }
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Deterministic pseudo-random bytes.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn write(p: &Path, bytes: &[u8]) {
    std::fs::write(p, bytes).unwrap();
}

/// The `--json` lines of one output stream: every line one JSON object
/// with a `type` (README "JSON output").
pub fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert!(v["type"].is_string(), "a line without a type: {l}");
            v
        })
        .collect()
}

/// The lines of type `ty` in an output stream.
pub fn json_of_type(bytes: &[u8], ty: &str) -> Vec<serde_json::Value> {
    json_lines(bytes)
        .into_iter()
        .filter(|v| v["type"] == ty)
        .collect()
}

/// The one line of type `ty` in an output stream.
pub fn json_one(bytes: &[u8], ty: &str) -> serde_json::Value {
    let mut v = json_of_type(bytes, ty);
    assert_eq!(
        v.len(),
        1,
        "want one {ty} line in: {}",
        String::from_utf8_lossy(bytes)
    );
    v.pop().unwrap()
}

/// `--blind-index SPEC`, `--blind-index-normalize NORM` unless NORM is
/// `none` (the default), `--blind-index-bits BITS` if given: how every
/// test (columns dumps and `pg encrypt`) spells one blind index, so each
/// reads as its scenario.
pub fn blind_index<'a>(spec: &'a str, normalize: &'a str, bits: Option<&'a str>) -> Vec<&'a str> {
    let mut a = vec!["--blind-index", spec];
    if normalize != "none" {
        a.extend(["--blind-index-normalize", normalize]);
    }
    if let Some(b) = bits {
        a.extend(["--blind-index-bits", b]);
    }
    a
}

/// `pkcs11-tool --list-objects` on `c`'s token, logged in (the
/// attribute checks of tests/cli_backup.rs and tests/cli_recipients.rs).
pub fn list_objects(c: &Cli) -> String {
    let out = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &c.token.conf)
        .arg("--module")
        .arg(&c.token.module)
        .args([
            "--token-label",
            &c.token.label,
            "--login",
            "--pin",
            &c.token.pin,
        ])
        .arg("--list-objects")
        .output()
        .expect("run pkcs11-tool (apt-get install opensc)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The block of a `pkcs11-tool --list-objects` listing ([`list_objects`])
/// of class `class` (e.g. "Private Key Object") labelled `label`.
pub fn object(listing: &str, class: &str, label: &str) -> String {
    let blocks: Vec<String> = listing.split('\n').fold(Vec::<String>::new(), |mut v, l| {
        if !l.starts_with(' ') {
            v.push(String::new());
        }
        if let Some(b) = v.last_mut() {
            b.push_str(l);
            b.push('\n');
        }
        v
    });
    blocks
        .into_iter()
        .find(|b| b.starts_with(class) && b.contains(&format!("label:      {label}\n")))
        .unwrap_or_else(|| panic!("no {class} {label} in:\n{listing}"))
}

/// A backup host's encrypt: `plain` (written to `p` in `a`'s directory)
/// sealed to the recipient file `dr.pub` there as `r.hseal`, with no
/// PKCS#11 module, token or PIN. Then: `a` cannot open it (exit 4, the
/// slot report naming `slot0`, e.g. "slot 0 (ec-p256 key dr v1") and
/// writes nothing; `b`, holding the private key, opens it.
pub fn sealed_without_token_opens_only_on(a: &Cli, b: &Cli, plain: &[u8], slot0: &str) {
    write(&a.path("p"), plain);
    let mut cmd = Command::new(BIN);
    clear_hsmseal_env(&mut cmd);
    cmd.current_dir(a.work.path())
        .env("HSMSEAL_PKCS11_MODULE", "/nonexistent/no-such-pkcs11.so")
        .args(["encrypt", "--recipient", "dr.pub", "-o", "r.hseal", "p"]);
    let out = run_cmd(cmd, None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = a.run(&["decrypt", "-o", "r.out", "r.hseal"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains(slot0), "{}", stderr(&out));
    assert!(!a.path("r.out").exists());
    std::fs::copy(a.path("r.hseal"), b.path("r.hseal")).unwrap();
    b.ok(&["decrypt", "-o", "r.out", "r.hseal"]);
    assert_eq!(std::fs::read(b.path("r.out")).unwrap(), plain);
}

/// `inspect --json`'s `slots` of `file` in `c`'s directory.
pub fn slots_json(c: &Cli, file: &str) -> Vec<serde_json::Value> {
    let out = c.ok(&["--json", "inspect", file]);
    json_one(&out, "item")["slots"].as_array().unwrap().clone()
}

/// Bytes of slot `i` in the place in force of a 2-slot v2 file.
pub fn slot_bytes(file: &[u8], i: usize) -> Vec<u8> {
    use hsmseal::envelope::slots;
    let h = slots::Header2::parse(file).unwrap();
    let off = slots::place_offset(2, h.active().0) + 32 + i * slots::SLOT_LEN;
    file[off..off + slots::SLOT_LEN].to_vec()
}

/// `a`'s `p` (holding `plain`) sealed on `a` to its AES key `a` and to the
/// recipient file `dr.pub` (key `dr` of type `ty` on `b`) as `p.hseal`:
/// either token alone opens it, and `verify` on `b` reports the AES slot
/// as not on this token and the `ty` slot as ok. Then `key rotate a` and
/// `rotate` on A change the AES slot only (B's slot byte-identical) and B
/// still opens the result (as `p2.hseal`). Returns the slots as inspect
/// shows them and the file before and after the rotate.
pub fn aes_and_recipient_slots_open_from_either_token(
    a: &Cli,
    b: &Cli,
    plain: &[u8],
    ty: &str,
) -> (Vec<serde_json::Value>, Vec<u8>, Vec<u8>) {
    a.ok(&["encrypt", "--key", "a", "--recipient", "dr.pub", "p"]);
    let sealed = std::fs::read(a.path("p.hseal")).unwrap();
    let slots = slots_json(a, "p.hseal");
    assert_eq!(slots[1]["type"], ty, "{slots:?}");
    a.ok(&["decrypt", "-o", "p.out", "p.hseal"]);
    assert_eq!(std::fs::read(a.path("p.out")).unwrap(), plain);
    std::fs::copy(a.path("p.hseal"), b.path("p.hseal")).unwrap();
    b.ok(&["decrypt", "-o", "p.out", "p.hseal"]);
    assert_eq!(std::fs::read(b.path("p.out")).unwrap(), plain);
    let out = b.ok(&["verify", "p.hseal"]);
    let t = String::from_utf8_lossy(&out);
    assert!(
        t.contains("slot 0 (aes key a v1): not on this token")
            && t.contains(&format!("slot 1 ({ty} key dr v1 (fingerprint sha256:"))
            && t.contains("): ok"),
        "{t}"
    );
    a.ok(&["key", "rotate", "a"]);
    a.ok(&["rotate", "p.hseal"]);
    let after = std::fs::read(a.path("p.hseal")).unwrap();
    assert_eq!(
        slot_bytes(&sealed, 1),
        slot_bytes(&after, 1),
        "{ty} slot changed"
    );
    assert_ne!(slot_bytes(&sealed, 0), slot_bytes(&after, 0));
    std::fs::copy(a.path("p.hseal"), b.path("p2.hseal")).unwrap();
    b.ok(&["decrypt", "-o", "p2.out", "p2.hseal"]);
    assert_eq!(std::fs::read(b.path("p2.out")).unwrap(), plain);
    (slots, sealed, after)
}
