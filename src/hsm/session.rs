//! Sessions, and the right to touch the token's storage: the process-wide
//! `MANAGEMENT` lock and the token lock between processes ([`TokenGuard`]),
//! the marker [`quiesce`] waits for before a signal exit, the admin
//! session's guard ([`Admin`]), the pool of wrap/unwrap sessions
//! ([`PooledSession`]), and the bounded retry of SoftHSM2's transient store
//! errors. The invariants these keep are stated in `crate::hsm`.

use super::lock::{Held, Mode, TokenLock};
use crate::error::{Error, Result};
use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::Session;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Idle sessions kept for reuse; more than the number of worker threads
/// would only hold token resources.
pub(super) const MAX_POOLED_SESSIONS: usize = 64;

/// Locks a mutex, recovering from poisoning: the protected values (sessions,
/// a handle cache) stay consistent even if a holder panicked.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serialises object management (initialisation, token lookup, login,
/// search, attribute reads, generation) across every `Hsm` in the process,
/// and makes its thread the only user of the process's token lock file (a
/// `flock` belongs to the open file, which the process's threads share).
/// SoftHSM2's file object store also misreads, within one process, an
/// object that another session is creating: seen here as
/// `CKR_ATTRIBUTE_VALUE_INVALID` or a malformed value from
/// `C_GetAttributeValue`, and `CKR_GENERAL_ERROR` or `CKR_FUNCTION_FAILED`
/// from a concurrent `C_GenerateKey`. Wrap and unwrap never take this lock:
/// they are the hot path (see [`super::lock`] for why that is safe).
static MANAGEMENT: Mutex<()> = Mutex::new(());

/// Held while a PKCS#11 call that reads or writes the token's storage is in
/// progress (under [`MANAGEMENT`] and the token lock); what [`quiesce`]
/// waits for. Separate from `MANAGEMENT` so that a thread merely waiting for
/// another process's token lock does not delay an exit.
static TOKEN_CALLS: Mutex<()> = Mutex::new(());

/// For a process about to exit on a signal: waits until no login, key
/// generation or other object management is in progress (at most `max`),
/// then blocks any new one for the rest of the process's life. A token
/// whose files are being rewritten (SoftHSM2 rewrites token.object at every
/// `C_Login`) is then never left half-written by the exit. The token lock
/// is released by the exit itself (the kernel drops a dead process's
/// `flock`s).
pub fn quiesce(max: std::time::Duration) {
    let deadline = std::time::Instant::now() + max;
    loop {
        match TOKEN_CALLS.try_lock() {
            Ok(guard) => return std::mem::forget(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => return std::mem::forget(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => {
                if std::time::Instant::now() >= deadline {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }
}

/// The right to make PKCS#11 calls that touch the token's storage: the
/// in-process lock, the token lock between processes, and the marker
/// [`quiesce`] waits for. Fields drop in declaration order: the marker, then
/// the token lock, then the in-process lock.
pub struct TokenGuard {
    _calls: MutexGuard<'static, ()>,
    held: Held,
    _management: MutexGuard<'static, ()>,
}

impl TokenGuard {
    /// Takes the in-process lock, then `lock` in `mode` (waiting for other
    /// processes as long as they hold it).
    pub(super) fn take(lock: &Arc<TokenLock>, mode: Mode) -> Result<TokenGuard> {
        let management = self::lock(&MANAGEMENT);
        let held = lock.acquire(mode)?;
        let calls = self::lock(&TOKEN_CALLS);
        Ok(TokenGuard {
            _calls: calls,
            held,
            _management: management,
        })
    }

    /// The mode the token lock is held in.
    pub fn mode(&self) -> Mode {
        self.held.mode()
    }
}

/// Holds the token lock for the module at `module` (one lock for all its
/// tokens, see [`super::lock`]) as an hsmseal process would around its token
/// calls; for tests and tools that must not run beside hsmseal's own token
/// calls. The module need not be loaded.
pub fn lock_token(module: &Path, mode: Mode) -> Result<TokenGuard> {
    let canonical = std::fs::canonicalize(module).map_err(|e| {
        Error::token(format!(
            "cannot load PKCS#11 module {}: {e} — set --module or HSMSEAL_PKCS11_MODULE",
            module.display()
        ))
    })?;
    TokenGuard::take(&TokenLock::for_module(&canonical)?, mode)
}

/// The path of the token lock file hsmseal uses for the module at `module`,
/// with the current environment (see [`super::lock`]).
pub fn token_lock_path(module: &Path) -> Result<PathBuf> {
    let canonical = std::fs::canonicalize(module)
        .map_err(|e| Error::token(format!("cannot resolve module {}: {e}", module.display())))?;
    Ok(TokenLock::for_module(&canonical)?.path().to_path_buf())
}

/// SoftHSM2 2.6.1's transient failures while another process (one that does
/// not take hsmseal's token lock, e.g. `pkcs11-tool`, or a SoftHSM2 reader
/// that caught a write in progress) rewrites `token.object`: `C_GetTokenInfo`
/// and `C_Login` return `CKR_GENERAL_ERROR` when the file read back empty
/// (`Token::getTokenInfo`, `Token::loginUser`: the latter before checking
/// the PIN, so no try is spent). These calls alone are retried, and only on
/// SoftHSM2; any other module's `CKR_GENERAL_ERROR` is reported at once.
fn is_transient(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::GeneralError,
            Function::GetTokenInfo | Function::Login
        )
    )
}

/// Pauses before each retry of a transient failure: bounded (about 0.3 s
/// in all), long enough for SoftHSM2's write window (the time between its
/// unlock and `fclose`, microseconds) to pass many times over.
const RETRY_BACKOFF_MS: [u64; 5] = [1, 4, 16, 64, 250];

/// Runs `op`, retrying it with [`RETRY_BACKOFF_MS`] while it fails with
/// [`is_transient`] and `softhsm2` is true.
pub(super) fn retry_transient<T>(
    softhsm2: bool,
    mut op: impl FnMut() -> Result<T, CkError>,
) -> Result<T, CkError> {
    for pause in RETRY_BACKOFF_MS {
        match op() {
            Err(e) if softhsm2 && is_transient(&e) => {
                std::thread::sleep(std::time::Duration::from_millis(pause))
            }
            r => return r,
        }
    }
    op()
}

/// The admin session, held together with a [`TokenGuard`] (always taken
/// first, so the two locks cannot deadlock).
pub(super) struct Admin<'a> {
    pub(super) session: MutexGuard<'a, Session>,
    pub(super) _guard: TokenGuard,
}

impl std::ops::Deref for Admin<'_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}

/// A session borrowed from the pool; it goes back on drop unless discarded.
pub(super) struct PooledSession<'a> {
    pub(super) pool: &'a Mutex<Vec<Session>>,
    pub(super) session: Option<Session>,
}

impl PooledSession<'_> {
    pub(super) fn get(&self) -> &Session {
        self.session.as_ref().expect("session present until drop")
    }
    /// Closes the session instead of returning it: after an unexpected
    /// failure we do not trust its operation state.
    pub(super) fn discard(mut self) {
        self.session.take();
    }
}

impl Drop for PooledSession<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let mut pool = lock(self.pool);
            if pool.len() < MAX_POOLED_SESSIONS {
                pool.push(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `retry_transient` over errors handed out in order, then `Ok`;
    /// returns (result, calls made).
    fn run(softhsm2: bool, errors: Vec<CkError>) -> (Result<usize, CkError>, usize) {
        let mut errors = errors.into_iter();
        let mut calls = 0;
        let r = retry_transient(softhsm2, || {
            calls += 1;
            match errors.next() {
                Some(e) => Err(e),
                None => Ok(calls),
            }
        });
        (r, calls)
    }

    #[test]
    fn only_softhsm2s_transient_store_errors_are_retried_and_boundedly() {
        let general = |f| CkError::Pkcs11(RvError::GeneralError, f);
        // C_GetTokenInfo and C_Login's CKR_GENERAL_ERROR: retried.
        let (r, calls) = run(
            true,
            vec![general(Function::GetTokenInfo), general(Function::Login)],
        );
        assert_eq!((r.unwrap(), calls), (3, 3));
        // At most 6 tries in all, then the error itself.
        let (r, calls) = run(true, (0..10).map(|_| general(Function::Login)).collect());
        assert_eq!(calls, RETRY_BACKOFF_MS.len() + 1);
        assert!(matches!(
            r,
            Err(CkError::Pkcs11(RvError::GeneralError, Function::Login))
        ));
        // Never a wrong PIN, never another call's general error (C_Decrypt:
        // a bad GCM tag), never another module.
        for (softhsm2, e) in [
            (
                true,
                CkError::Pkcs11(RvError::PinIncorrect, Function::Login),
            ),
            (true, general(Function::Decrypt)),
            (true, general(Function::GenerateKey)),
            (false, general(Function::GetTokenInfo)),
            (false, general(Function::Login)),
        ] {
            let (r, calls) = run(softhsm2, vec![e]);
            assert!(r.is_err());
            assert_eq!(calls, 1);
        }
    }
}
