//! Tokens initialised inside containers (cargo feature `containers`;
//! `HSMSEAL_TEST_TOKENS=containers` routes every [`super::TestToken`] here).
//!
//! Invariants:
//! - Each token comes from its own container of the minimal SoftHSM2 image
//!   (`containers/build-image.sh`: Debian minbase + softhsm2 + p11-kit),
//!   started through the Docker-compatible API at `DOCKER_HOST` (podman's
//!   socket, started by `scripts/test-containers.sh`).
//! - The container has no network and sees only the token directory,
//!   bind-mounted at the same path, so the `softhsm2.conf` written on the host
//!   names the same token directory in both.
//! - The container's `softhsm2-util` initialises the token; the container
//!   is removed and the test then opens the token with the host's module. (A PKCS#11 module is
//!   loaded into the test process; p11-kit 0.24's RPC cannot carry AES-GCM or
//!   AES key wrap parameters, so the module is not remoted.)
//! - The container is removed before `new_token` returns, and a failed start
//!   removes it too (testcontainers drops it), so no test leaves one behind,
//!   even for tokens kept in a `static`.

use super::token::{token_dir, TestToken, TokenProvider};
use std::path::PathBuf;
use testcontainers::core::{Mount, WaitFor};
use testcontainers::runners::SyncRunner;
use testcontainers::{GenericImage, ImageExt};

/// The image `containers/build-image.sh` builds, unless
/// `HSMSEAL_TEST_IMAGE` names another (`name:tag`).
pub fn image_name() -> (String, String) {
    let full = std::env::var("HSMSEAL_TEST_IMAGE")
        .unwrap_or_else(|_| "localhost/hsmseal-softhsm2:test".to_string());
    match full.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name.to_string(), tag.to_string()),
        _ => (full, "latest".to_string()),
    }
}

/// The label on every container the tests start, so the script can check
/// that none is left behind (`podman ps -a --filter label=hsmseal.test`).
pub const LABEL: (&str, &str) = ("hsmseal.test", "1");

/// What the container prints after the script, with the script's exit code.
const DONE: &str = "hsmseal-container-done rc=";

/// Runs `script` (bash, with `args` as `$1...`) in a fresh container of the
/// test image with `mounts` (host path, container path) bind-mounted and no
/// network; waits for the script to finish and removes the container.
/// Returns (exit code, stdout, stderr).
///
/// The container reports the exit code on stdout and stays up until it is
/// removed, rather than exiting: podman 4.3's Docker API reports a state
/// (`stopped`) that testcontainers' client cannot parse, so the state of an
/// exited container cannot be inspected. Its PID 1 ends on SIGTERM (a PID 1
/// without a handler ignores it), so removing it does not wait out a stop
/// timeout.
pub fn run_in_container(
    script: &str,
    args: &[&str],
    mounts: &[(&str, &str)],
    env: &[(&str, &str)],
) -> (i64, String, String) {
    let (name, tag) = image_name();
    let wrapper = format!(
        "(\n{script}\n) </dev/null\nrc=$?\necho \"{DONE}$rc\"\n\
         trap 'exit 0' TERM\nsleep infinity &\nwait"
    );
    let mut cmd = vec!["bash".to_string(), "-c".into(), wrapper, "sh".into()];
    cmd.extend(args.iter().map(|a| a.to_string()));
    let mut req = GenericImage::new(name.as_str(), tag.as_str())
        .with_wait_for(WaitFor::message_on_stdout(DONE))
        .with_cmd(cmd)
        .with_label(LABEL.0, LABEL.1)
        // `.with_network("none")` would try to create a network named
        // "none"; the host config's network mode is what turns it off.
        .with_host_config_modifier(|hc| hc.network_mode = Some("none".into()));
    for (host, inside) in mounts {
        req = req.with_mount(Mount::bind_mount(*host, *inside));
    }
    for (k, v) in env {
        req = req.with_env_var(*k, *v);
    }
    let container = req.start().unwrap_or_else(|e| {
        panic!(
            "start a container of {name}:{tag} (is DOCKER_HOST set and the image built? \
             run `make test-containers`): {e}"
        )
    });
    let stdout =
        String::from_utf8_lossy(&container.stdout_to_vec().expect("container stdout")).into_owned();
    let stderr =
        String::from_utf8_lossy(&container.stderr_to_vec().expect("container stderr")).into_owned();
    container.rm().expect("remove the container");
    let at = stdout
        .rfind(DONE)
        .unwrap_or_else(|| panic!("no exit code in the container's output: {stdout}{stderr}"));
    let code = stdout[at + DONE.len()..]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad exit code line in the container's output: {stdout}"));
    (code, stdout[..at].to_string(), stderr)
}

/// Tokens initialised by the container image's own `softhsm2-util`.
pub struct ContainerProvider {
    /// Where to put token directories; the system temp dir if `None`.
    parent: Option<PathBuf>,
}

impl ContainerProvider {
    pub fn new(parent: Option<PathBuf>) -> ContainerProvider {
        ContainerProvider { parent }
    }
}

impl TokenProvider for ContainerProvider {
    fn new_token(&self) -> TestToken {
        let token = token_dir(self.parent.as_deref());
        let dir = token.dir.path().to_str().expect("UTF-8 temp path");
        let conf = token.conf.to_str().expect("UTF-8 temp path");
        // The PINs go in as arguments, not spliced into the script.
        let (code, stdout, stderr) = run_in_container(
            r#"exec softhsm2-util --init-token --free --label "$1" --pin "$2" --so-pin "$3""#,
            &[&token.label, &token.pin, &token.so_pin],
            &[(dir, dir)],
            &[("SOFTHSM2_CONF", conf)],
        );
        assert_eq!(
            code, 0,
            "softhsm2-util --init-token in the container failed: {stdout}{stderr}"
        );
        token
    }
}
