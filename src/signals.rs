//! SIGINT and SIGTERM: stop, remove the temporary files being written, and
//! exit 130 or 143. Outputs already renamed into place are complete and
//! stay; inputs are never written; a file being rotated in place is valid at
//! every instant (see docs/FORMAT.md section 5), so stopping anywhere is safe.
//! A file being replaced by `--in-place` loses its original only after the
//! new file is durable and checked, so stopping leaves one or both.
//! Exiting waits for a login or key management call in progress to finish
//! (at most 10 s), so the token's own files are never cut short; no new one
//! starts meanwhile.

use signal_hook::consts::{SIGINT, SIGTERM};

extern "C" {
    fn _exit(status: std::os::raw::c_int) -> !;
}

/// Starts the signal-watching thread. If the handler cannot be installed the
/// default behaviour (immediate exit) remains, which still never leaves a
/// partial output under its final name.
pub fn install() {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("hsmseal-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                crate::output::remove_live_temps_for_exit();
                // Never exit in the middle of a login or another token write:
                // SoftHSM2 rewrites its token.object file at every C_Login,
                // and cutting that short can leave the token unreadable.
                crate::hsm::quiesce(std::time::Duration::from_secs(10));
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                eprintln!("hsmseal: interrupted by {name}; temporary files removed");
                // _exit, not exit: exit() would run the C library's atexit
                // handlers and the PKCS#11 module's static destructors while
                // worker threads are still inside the module (seen as a
                // SIGSEGV instead of exit 143 during bulk runs).
                // No stdout flush: a worker streaming to stdout holds its
                // lock; lines already printed were flushed at their newline.
                // SAFETY: _exit(2) is async-signal-safe and only ends the process.
                unsafe { _exit(128 + sig) }
            }
        });
}
