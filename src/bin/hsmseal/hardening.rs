//! Process hardening done before anything else runs.
//!
//! The PIN may sit in this process's environment (`HSMSEAL_PIN`) from the
//! first instruction, and data keys and plaintext pass through its memory.
//! A core dump would write all of that to disk, readable by whoever can read
//! the dump directory (seen: under `ulimit -c unlimited`, a SIGABRT core
//! held the PIN). So, first thing in `main`:
//! - `RLIMIT_CORE` soft and hard limits are set to 0: no core file, and no
//!   child of ours can raise it again;
//! - `PR_SET_DUMPABLE` is cleared: no core even through a `core_pattern`
//!   pipe, and other processes of the same user can no longer `ptrace` us or
//!   read `/proc/PID/mem` and `/proc/PID/environ`.
//!
//! Both are best effort: a failure is ignored (the kernel only refuses them
//! in sandboxes that already forbid dumps), and neither changes behaviour
//! otherwise. The process can still open its own `/proc/self/fd/N` (so
//! `-o /dev/stdout` keeps working): the kernel always lets a task inspect
//! itself.

/// Disables core dumps and ptrace-style inspection for this process.
pub fn disable_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls with valid arguments; they only change
    // this process's own limits and flags.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}
