//! The single place tests get an HSM token from (`support::TestToken`).
//!
//! Every test token is private to the test that made it: its own temp
//! directory, its own `SOFTHSM2_CONF` pointing there, a fresh token in it.
//! Nothing here reads or writes the system's tokens (`/var/lib/softhsm`).
//!
//! Two ways to use a token:
//! - CLI tests run the `hsmseal` binary with [`TestToken::env`], one token
//!   per test (each child process reads its own `SOFTHSM2_CONF`).
//! - In-process tests of `hsmseal::hsm::Hsm` must share one token per test
//!   binary: SoftHSM2 reads `SOFTHSM2_CONF` once, at `C_Initialize`, and a
//!   process initialises a module once. See `tests/hsm.rs`.
//!
//! Tokens come from a [`TokenProvider`], chosen by `HSMSEAL_TEST_TOKENS`
//! (the one seam; README "Tests in containers"):
//! - unset or `host`: [`SoftHsm2Provider`], the host's `softhsm2-util`
//!   (fast; the default);
//! - `containers`: [`super::container::ContainerProvider`] (cargo feature
//!   `containers`): the token is initialised by `softhsm2-util` inside its
//!   own container of the minimal SoftHSM2 image, in a directory
//!   bind-mounted at the same path, and the test opens it with the host's
//!   module. Every test that takes its token from here runs either way.
//!
//! Either way the token directory and its `softhsm2.conf` are laid out by
//! [`token_dir`], so a token made by one provider opens like any other.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A token a test may use as it likes; dropped with its directory.
pub struct TestToken {
    /// Owns the token files; removed when the `TestToken` drops.
    pub dir: tempfile::TempDir,
    /// The `softhsm2.conf` to put in `SOFTHSM2_CONF`.
    pub conf: PathBuf,
    /// The PKCS#11 module to load.
    pub module: PathBuf,
    pub label: String,
    /// User PIN.
    pub pin: String,
    /// Security officer PIN.
    pub so_pin: String,
}

/// Something that can hand out fresh, initialised tokens.
pub trait TokenProvider {
    fn new_token(&self) -> TestToken;
}

/// The PKCS#11 module tests load: `HSMSEAL_TEST_PKCS11_MODULE`, or Debian's
/// SoftHSM2.
pub fn module_path() -> PathBuf {
    std::env::var_os("HSMSEAL_TEST_PKCS11_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"))
}

/// Tokens in a per-test SoftHSM2 directory, made with `softhsm2-util`.
#[derive(Default)]
pub struct SoftHsm2Provider {
    /// Where to put token directories; the system temp dir if `None`.
    pub parent: Option<PathBuf>,
}

/// A fresh token directory (under `parent`, else the system temp dir) with
/// its `softhsm2.conf`, and the [`TestToken`] describing it, whose token is
/// not initialised yet: the provider does that.
pub fn token_dir(parent: Option<&Path>) -> TestToken {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut builder = tempfile::Builder::new();
    builder.prefix("hsmseal-token-");
    let dir = match parent {
        Some(parent) => builder.tempdir_in(parent),
        None => builder.tempdir(),
    }
    .expect("create token temp dir");
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).expect("create token dir");
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\n\
             objectstore.backend = file\n\
             log.level = ERROR\n\
             slots.removable = false\n\
             slots.mechanisms = ALL\n\
             library.reset_on_fork = false\n",
            tokens.display()
        ),
    )
    .expect("write softhsm2.conf");
    TestToken {
        module: module_path(),
        // Unique per process and call, so a mix-up between tokens shows
        // up as "no token labelled ..." rather than silently passing.
        label: format!("hsmseal-test-{}-{n}", std::process::id()),
        pin: "user-pin-1234".to_string(),
        so_pin: "so-pin-5678".to_string(),
        conf,
        dir,
    }
}

impl TokenProvider for SoftHsm2Provider {
    fn new_token(&self) -> TestToken {
        let token = token_dir(self.parent.as_deref());
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &token.conf)
            .arg("--module")
            .arg(&token.module)
            .args(["--init-token", "--free", "--label", &token.label])
            .args(["--pin", &token.pin, "--so-pin", &token.so_pin])
            .output()
            .expect("run softhsm2-util (apt-get install softhsm2)");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        token
    }
}

/// The provider `HSMSEAL_TEST_TOKENS` names, making token directories under
/// `parent`.
pub fn provider(parent: Option<&Path>) -> Box<dyn TokenProvider> {
    let parent = parent.map(Path::to_path_buf);
    match std::env::var("HSMSEAL_TEST_TOKENS").as_deref() {
        Err(std::env::VarError::NotPresent) | Ok("") | Ok("host") => {
            Box::new(SoftHsm2Provider { parent })
        }
        Ok("containers") => containers_provider(parent),
        other => panic!("HSMSEAL_TEST_TOKENS={other:?}: want `host` (the default) or `containers`"),
    }
}

#[cfg(feature = "containers")]
fn containers_provider(parent: Option<PathBuf>) -> Box<dyn TokenProvider> {
    Box::new(super::container::ContainerProvider::new(parent))
}

#[cfg(not(feature = "containers"))]
fn containers_provider(_parent: Option<PathBuf>) -> Box<dyn TokenProvider> {
    panic!(
        "HSMSEAL_TEST_TOKENS=containers needs the tests built with \
         `--features containers` (make test-containers)"
    )
}

// `new` makes a token (runs a tool, writes files): not a `Default`.
#[allow(clippy::new_without_default)]
impl TestToken {
    /// A fresh token from the provider `HSMSEAL_TEST_TOKENS` names, in the
    /// system temp dir.
    pub fn new() -> TestToken {
        provider(None).new_token()
    }

    /// A fresh token whose directory is under `parent`: for a token kept in
    /// a `static`, which is never dropped, so its directory should live
    /// somewhere `cargo clean` removes (`CARGO_TARGET_TMPDIR`).
    pub fn new_in(parent: &Path) -> TestToken {
        provider(Some(parent)).new_token()
    }

    /// Environment for running the `hsmseal` binary against this token.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("SOFTHSM2_CONF".into(), path_string(&self.conf)),
            ("HSMSEAL_PKCS11_MODULE".into(), path_string(&self.module)),
            ("HSMSEAL_TOKEN".into(), self.label.clone()),
            ("HSMSEAL_PIN".into(), self.pin.clone()),
        ]
    }
}

fn path_string(p: &Path) -> String {
    p.to_str().expect("test paths are UTF-8").to_string()
}
