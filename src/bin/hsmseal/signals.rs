//! SIGINT and SIGTERM: stop, remove the temporary files being written, and
//! exit 130 or 143. Outputs already renamed into place are complete and
//! stay; inputs are never written; a file being rewrapped in place is valid at
//! every instant (see docs/FORMAT.md section 5), so stopping anywhere is safe.
//! A file being replaced by `--in-place` loses its original only after the
//! new file is durable and checked, so stopping leaves one or both.
//! Exiting waits for a login or key management call in progress to finish
//! (at most 10 s), so the token's own files are never cut short; no new one
//! starts meanwhile. Before that, a run with an audit log gets its entry,
//! `"result":"interrupted"`, with what it had done so far (at most 10 s).
//!
//! `signal-hook` receives the signals (on a thread, not in a handler); what
//! follows is hsmseal's own because it depends on the token lock, the temp
//! file registry and the audit log, which no signal crate knows about.

use signal_hook::consts::{SIGINT, SIGTERM};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to do for the record before exiting on a signal: the audit log's
/// "interrupted" entry of the run in progress. Whoever holds this lock owns
/// the run's last word: the signal thread (to run the hook), or the main
/// thread while it appends the run's normal entry (the signal thread then
/// waits for it, and finds no hook).
type Hook = Box<dyn FnOnce(i32, &str) + Send>;
static ON_INTERRUPT: Mutex<Option<Hook>> = Mutex::new(None);

/// Ends the data stream of the run, if it has one, before the process exits
/// on a signal or a closed stdout: `commands::columns` registers the writer
/// of its abort marker here (a hook, so this module needs nothing of the
/// commands above it).
static END_STREAM: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Puts the terminal back as it was if the PIN prompt is waiting with its
/// echo off (`tty::restore`, registered by whoever prompts: a hook, as
/// `END_STREAM`).
static RESTORE_TERMINAL: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Registers `f` to run first when the run is stopped (see `RESTORE_TERMINAL`).
pub fn on_stop_restore_terminal(f: fn()) {
    let _ = RESTORE_TERMINAL.set(f);
}

/// Registers `f` to run first when the run is stopped (see `END_STREAM`).
pub fn on_stop_end_stream(f: fn()) {
    let _ = END_STREAM.set(f);
}

/// Longest wait for the main thread's own audit append, or for the hook.
const RECORD_WAIT: Duration = Duration::from_secs(10);

/// Registers `hook(exit_code, why)` to run once if the run is stopped
/// (SIGINT, SIGTERM, or its stdout closed by the reader).
pub fn on_interrupt(hook: impl FnOnce(i32, &str) + Send + 'static) {
    if let Ok(mut h) = ON_INTERRUPT.lock() {
        *h = Some(Box::new(hook));
    }
}

/// Unregisters the hook and runs `f` (the run's normal audit append) while
/// holding its lock, so a signal arriving meanwhile waits for `f` and then
/// exits without a second entry.
pub fn without_interrupt_hook<T>(f: impl FnOnce() -> T) -> T {
    let mut guard = ON_INTERRUPT.lock().unwrap_or_else(|p| p.into_inner());
    guard.take();
    let r = f();
    drop(guard);
    r
}

/// Signal thread: runs the hook, if any, on a thread of its own so a stuck
/// HSM cannot keep the process alive for more than `RECORD_WAIT`.
fn record_interruption(code: i32, why: &'static str) {
    let deadline = Instant::now() + RECORD_WAIT;
    let hook = loop {
        match ON_INTERRUPT.try_lock() {
            Ok(mut g) => break g.take(),
            Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner().take(),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(std::sync::TryLockError::WouldBlock) => return,
        }
    };
    let Some(hook) = hook else { return };
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("hsmseal-interrupt-record".into())
        .spawn(move || {
            hook(code, why);
            let _ = done_tx.send(());
        });
    if spawned.is_ok() {
        let _ = done_rx.recv_timeout(RECORD_WAIT);
    }
}

extern "C" {
    fn _exit(status: std::os::raw::c_int) -> !;
}

/// Ends the process with `code` without running C `atexit` handlers or
/// static destructors (stdout and stderr are flushed first). The PKCS#11
/// session was already closed and the module finalised when the HSM handle
/// was dropped; SoftHSM2's own static destructors, run again by `exit()`,
/// can corrupt the heap at exit together with OpenSSL 3's cleanup (seen
/// once in CI as "malloc_consolidate(): invalid chunk size" and an abort
/// after a run had finished; a known class of SoftHSM2 bugs, e.g.
/// SoftHSMv2 issue 635). Nothing of hsmseal's depends on those handlers.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit(2) only ends the process.
    unsafe { _exit(code) }
}

/// Exit code of a run whose stdout was closed by its reader (`| head`):
/// 128 + SIGPIPE, what a shell reports for a tool killed by SIGPIPE.
pub const STDOUT_CLOSED_EXIT: i32 = 128 + 13;

/// The reader of stdout went away (EPIPE): stop the run as if interrupted,
/// quietly (as Unix tools do), with exit code 141.
pub fn stdout_closed() -> ! {
    stop(
        STDOUT_CLOSED_EXIT,
        "stopped: stdout was closed by its reader",
        false,
    )
}

/// Writing stdout failed for another reason than a closed reader: the
/// run stops with exit code 7 (I/O), never a panic (the error was already
/// reported).
pub fn stdout_failed() -> ! {
    stop(7, "stopped: writing stdout failed", false)
}

/// Stops the run from any thread: removes the temporary files being
/// written, records the interruption in the audit log (if any), waits for a
/// login or key management call in progress, and ends the process with
/// `code`. Outputs already renamed into place are complete and stay.
fn stop(code: i32, why: &'static str, say: bool) -> ! {
    // A prompt stopped by Ctrl-C must not leave the user's terminal mute.
    if let Some(restore) = RESTORE_TERMINAL.get() {
        restore();
    }
    // A `columns` stream on stdout ends with the abort marker, so its
    // reader (a `psql \copy`) fails instead of loading a prefix.
    if let Some(end_stream) = END_STREAM.get() {
        end_stream();
    }
    hsmseal::fs::remove_live_temps_for_exit();
    // The audit entry of the interrupted run (or the wait for the one the
    // main thread is appending).
    record_interruption(code, why);
    // Never exit in the middle of a login or another token write: SoftHSM2
    // rewrites its token.object file at every C_Login, and cutting that
    // short can leave the token unreadable.
    hsmseal::hsm::quiesce(std::time::Duration::from_secs(10));
    if say {
        // Human even under --json with stderr as the JSON stream: this
        // module sits below `report` (which uses it), and the exit code
        // (130/143) already says what happened.
        eprintln!("hsmseal: {why}; temporary files removed");
    }
    // _exit, not exit: exit() would run the C library's atexit handlers and
    // the PKCS#11 module's static destructors while worker threads are
    // still inside the module (seen as a SIGSEGV instead of exit 143 during
    // bulk runs). No stdout flush: a worker streaming to stdout may hold
    // its lock; lines already printed were flushed at their newline.
    // SAFETY: _exit(2) only ends the process.
    unsafe { _exit(code) }
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
                let why = if sig == SIGINT {
                    "interrupted by SIGINT"
                } else {
                    "interrupted by SIGTERM"
                };
                stop(128 + sig, why, true);
            }
        });
}
