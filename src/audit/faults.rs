//! Fault injection for the tests of the append's crash safety: the steps
//! of [`super::append`] (listed there) are named, and a program may install
//! a [`FaultHook`] that is told each one as it is reached. Inert unless one
//! is installed, which only the `hsmseal` binary does, and only when its
//! test environment variable asks for it (never in real use).
//!
//! Invariant: a hook can only do to an append what a crash can (end the
//! process at a step, as `kill -9` or a power cut there would; tear the
//! line being written) or take the head-replacement path that a token
//! refusing `C_SetAttributeValue` takes. It weakens no check. The library
//! itself never ends the process.

use std::sync::OnceLock;

/// What a test wants to happen during an append.
pub trait FaultHook: Send + Sync {
    /// `step` of an append was reached (its effects are on disk or in the
    /// HSM); the hook may end the process here.
    fn reached(&self, step: &str);
    /// Whether `fault` is asked for: `torn-write` (write half of this run's
    /// line, then reach step `torn-write`) or `replace-head` (create a new
    /// head record and destroy the old one instead of updating it).
    fn active(&self, fault: &str) -> bool;
}

static HOOK: OnceLock<Box<dyn FaultHook>> = OnceLock::new();

/// Installs `hook` for the rest of the process; false if one already was.
pub fn install(hook: impl FaultHook + 'static) -> bool {
    HOOK.set(Box::new(hook)).is_ok()
}

/// Tells the hook, if any, that `step` was reached.
pub(crate) fn after(step: &str) {
    if let Some(h) = HOOK.get() {
        h.reached(step);
    }
}

/// Whether the hook, if any, asks for `fault`.
pub(crate) fn active(fault: &str) -> bool {
    HOOK.get().is_some_and(|h| h.active(fault))
}

/// Whether head records are to be replaced rather than updated.
pub(crate) fn replace_head() -> bool {
    active("replace-head")
}
