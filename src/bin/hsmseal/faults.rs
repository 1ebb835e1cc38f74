//! The audit append's crash-test hook (`hsmseal::audit::faults`), installed
//! only when `HSMSEAL_TEST_AUDIT_FAULTS` is set: tests/cli_audit_faults.rs
//! uses it to kill the process at each step of an append (what `kill -9`
//! or a power cut there would do) and to take the head-replacement path.
//! Values, comma-separated: `kill-after=STEP` (STEP as listed at
//! `hsmseal::audit::append`; `kill-after=torn-write` also writes half of the
//! line first), `replace-head`. Never set in real use.

use hsmseal::audit::faults::{self, FaultHook};

/// The environment variable of the test hook.
pub const ENV: &str = "HSMSEAL_TEST_AUDIT_FAULTS";

struct Spec(String);

impl Spec {
    fn kills_after(&self, step: &str) -> bool {
        self.0
            .split(',')
            .any(|f| f.trim().strip_prefix("kill-after=") == Some(step))
    }
}

impl FaultHook for Spec {
    fn reached(&self, step: &str) {
        if self.kills_after(step) {
            // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught, so
            // nothing after this runs.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }

    fn active(&self, fault: &str) -> bool {
        match fault {
            "torn-write" => self.kills_after("torn-write"),
            other => self.0.split(',').any(|f| f.trim() == other),
        }
    }
}

/// Installs the hook if the environment asks for it.
pub fn install_from_env() {
    if let Some(spec) = std::env::var_os(ENV).and_then(|s| s.into_string().ok()) {
        if !spec.is_empty() {
            faults::install(Spec(spec));
        }
    }
}
