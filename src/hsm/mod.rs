//! The PKCS#11 key backend: KWKs live in a token reached through a vendor's
//! PKCS#11 module (SoftHSM2 in development and tests).
//!
//! Invariants:
//! - One `Pkcs11` context per module per process, `C_Initialize`d once with
//!   OS locking and never finalised (see `context`). SoftHSM2 reads
//!   `SOFTHSM2_CONF` at that moment, so the environment must be set before
//!   the first [`Hsm::open`] or [`Hsm::init_token`].
//! - Each [`Hsm`] keeps one *admin* session open for its whole life: PKCS#11
//!   logs the application out when its last session on a token closes, and
//!   the admin session is what keeps the login alive while pooled sessions
//!   come and go. It also serves key lookup and creation.
//! - Wrap and unwrap run on pooled sessions, one per concurrent caller
//!   (a PKCS#11 session holds one operation at a time and is not `Sync`).
//!   Everything else (initialisation, token lookup, login, search,
//!   attributes, generation, destruction) runs under a [`TokenGuard`]: the
//!   process-wide `MANAGEMENT` lock, then the token lock shared between
//!   hsmseal processes ([`lock`]: shared for calls that only read the
//!   token's storage, exclusive for calls that write it). Object-changing
//!   methods hold the exclusive lock from their first lookup to their last
//!   check, so e.g. two `key rotate` can never issue one version twice.
//! - A key handle is used only after its attributes passed
//!   [`kwk::problems`] and it is not disabled; verified handles are cached
//!   per (name, version). Every key-changing method of this `Hsm` evicts
//!   what it changed; a change made elsewhere (another process) is caught
//!   because the token then refuses the cached handle (destroyed: invalid
//!   handle; disabled: `CKR_KEY_FUNCTION_NOT_PERMITTED`), which evicts it and
//!   looks the key up again.
//! - A version carried by several objects (made by an older hsmseal or
//!   another client; hsmseal itself never makes one) still unwraps: each
//!   object is tried, and AES-GCM's tag makes only the right one
//!   authenticate. Nothing new is wrapped under it (docs/FORMAT.md section 1).
//! - Key lifecycle (versions, states, destroy, purge) lives in [`lifecycle`].
//! - No PIN or key byte appears in an error, a log line or `Debug` output.

pub mod audit_key;
pub mod doctor;
mod errors;
pub mod kwk;
pub mod lifecycle;
pub mod lock;

pub use doctor::DoctorReport;
pub use kwk::{KeyAttributes, KeyInfo, KeyState};
pub use lifecycle::{PurgeItem, PurgeReport, StateChange};

use crate::backend::{
    validate_key_name, KeyBackend, KeyRef, WrappedKey, WRAPPED_KEY_LEN, WRAP_IV_LEN, WRAP_TAG_LEN,
};
use crate::error::{Error, Result};
use crate::secret::{Pin, SecretKey};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use errors::{module_error, rv_of, token_error};
use lifecycle::{Family, Scan};
use lock::{Held, Mode, TokenLock};
use rand::RngCore;
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use zeroize::Zeroizing;

/// Idle sessions kept for reuse; more than the number of worker threads
/// would only hold token resources.
const MAX_POOLED_SESSIONS: usize = 64;

/// Locks a mutex, recovering from poisoning: the protected values (sessions,
/// a handle cache) stay consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
/// they are the hot path (see [`lock`] for why that is safe).
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
    fn take(lock: &Arc<TokenLock>, mode: Mode) -> Result<TokenGuard> {
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

/// Holds the token lock for `token_label` in the module at `module` as an
/// hsmseal process would around its token calls; for tests and tools that
/// must not run beside hsmseal's own token calls. The module need not be
/// loaded.
pub fn lock_token(module: &Path, token_label: &str, mode: Mode) -> Result<TokenGuard> {
    let canonical = std::fs::canonicalize(module).map_err(|e| {
        Error::token(format!(
            "cannot load PKCS#11 module {}: {e} — set --module or HSMSEAL_PKCS11_MODULE",
            module.display()
        ))
    })?;
    TokenGuard::take(&TokenLock::for_token(&canonical, token_label)?, mode)
}

/// The path of the token lock file hsmseal uses for `token_label` in the
/// module at `module`, with the current environment (see [`lock`]).
pub fn token_lock_path(module: &Path, token_label: &str) -> Result<PathBuf> {
    let canonical = std::fs::canonicalize(module)
        .map_err(|e| Error::token(format!("cannot resolve module {}: {e}", module.display())))?;
    Ok(TokenLock::for_token(&canonical, token_label)?
        .path()
        .to_path_buf())
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
fn retry_transient<T>(
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
struct Admin<'a> {
    session: MutexGuard<'a, Session>,
    _guard: TokenGuard,
}

impl std::ops::Deref for Admin<'_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}

/// A module loaded and initialised in this process.
struct LoadedModule {
    path: PathBuf,
    ctx: Pkcs11,
    /// `SOFTHSM2_CONF` when it was initialised: SoftHSM2 reads it only then.
    softhsm2_conf: Option<OsString>,
}

/// Process-wide PKCS#11 contexts, one per module file. `C_Initialize` may be
/// called only once per process per module; a second `Hsm` on the same
/// module shares the context (and the token login state, which PKCS#11 keeps
/// per application, not per session).
static CONTEXTS: Mutex<Vec<LoadedModule>> = Mutex::new(Vec::new());

/// The process's context for `module`, loading and initialising it on first
/// use, and the token lock for `token_label` in it. `C_Initialize` runs
/// under the shared token lock: SoftHSM2 reads every token of its directory
/// then, and skips (for the life of the process) one whose `token.object`
/// it finds half-written.
fn context(module: &Path, token_label: &str) -> Result<(Pkcs11, Arc<TokenLock>)> {
    let load_error = |detail: String| {
        Error::token(format!(
            "cannot load PKCS#11 module {}: {detail} — set --module or HSMSEAL_PKCS11_MODULE",
            module.display()
        ))
    };
    let canonical = std::fs::canonicalize(module).map_err(|e| load_error(e.to_string()))?;
    let conf = std::env::var_os("SOFTHSM2_CONF");
    let mut contexts = lock(&CONTEXTS);
    if let Some(m) = contexts.iter().find(|m| m.path == canonical) {
        // SoftHSM2 would silently keep using the first configuration's
        // tokens; refuse rather than touch tokens the caller did not mean.
        if m.softhsm2_conf != conf {
            return Err(Error::token(format!(
                "SOFTHSM2_CONF changed after module {} was initialised in this process; SoftHSM2 reads it only once — use a new process",
                module.display()
            )));
        }
        return Ok((
            m.ctx.clone(),
            TokenLock::for_token(&canonical, token_label)?,
        ));
    }
    let token_lock = TokenLock::for_token(&canonical, token_label)?;
    let ctx = Pkcs11::new(&canonical).map_err(|e| load_error(e.to_string()))?;
    let initialized = {
        let _guard = TokenGuard::take(&token_lock, Mode::Shared)?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
    };
    match initialized {
        Ok(()) => {}
        // Another part of the process initialised it (e.g. a test's own
        // cryptoki context): the library state is shared, so just use it.
        Err(e) if rv_of(&e) == Some(RvError::CryptokiAlreadyInitialized) => {}
        Err(e) => {
            return Err(module_error(
                e,
                module,
                "initialising the PKCS#11 module (for SoftHSM2, check SOFTHSM2_CONF and its directories.tokendir)",
            ))
        }
    }
    contexts.push(LoadedModule {
        path: canonical,
        ctx: ctx.clone(),
        softhsm2_conf: conf,
    });
    Ok((ctx, token_lock))
}

/// The slot holding the initialised token labelled `label` (compared
/// trimmed). The caller holds the token lock (at least shared).
fn find_token(ctx: &Pkcs11, module: &Path, label: &str, softhsm2: bool) -> Result<Slot> {
    let wanted = label.trim();
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| module_error(e, module, "listing slots"))?;
    let mut found = Vec::new();
    let mut matches = Vec::new();
    for slot in slots {
        let info = retry_transient(softhsm2, || ctx.get_token_info(slot))
            .map_err(|e| module_error(e, module, "reading token information"))?;
        if !info.token_initialized() {
            continue;
        }
        let l = info.label().trim().to_string();
        if l == wanted {
            matches.push(slot);
        }
        found.push(format!("{l:?}"));
    }
    match matches.len() {
        1 => Ok(matches[0]),
        0 => Err(Error::token(format!(
            "no token labelled {wanted:?} in PKCS#11 module {}; tokens found: {} — set --token or HSMSEAL_TOKEN",
            module.display(),
            if found.is_empty() {
                "none (for SoftHSM2, check SOFTHSM2_CONF)".to_string()
            } else {
                found.join(", ")
            }
        ))),
        n => Err(Error::token(format!(
            "{n} tokens are labelled {wanted:?} in PKCS#11 module {}; hsmseal will not guess which one holds the keys — relabel or remove the others",
            module.display()
        ))),
    }
}

/// A token in a PKCS#11 module, holding hsmseal's KWKs.
pub struct Hsm {
    ctx: Pkcs11,
    slot: Slot,
    module: PathBuf,
    token_label: String,
    /// Shared with every hsmseal process on this token (see [`lock`]).
    token_lock: Arc<TokenLock>,
    /// Held for the `Hsm`'s whole life (keeps the login); used for login,
    /// key lookup, attribute reads and key generation.
    admin: Mutex<Session>,
    /// Idle sessions for wrap/unwrap: take one, use it, put it back.
    pool: Mutex<Vec<Session>>,
    /// Objects whose attributes passed the check, per key version. The
    /// check is trusted for the life of this `Hsm` (one CLI run); a handle
    /// that stops working is evicted and looked up again.
    verified: RwLock<HashMap<KeyRef, Arc<Verified>>>,
    /// The current version per key name, as first found in this `Hsm`'s
    /// life: a bulk run looks it up once, not once per file. Cleared by this
    /// `Hsm`'s own key changes and whenever a handle of the name is evicted.
    current: RwLock<HashMap<String, u32>>,
    /// Wrap and unwrap operations sent to the token (one `C_Encrypt` or
    /// `C_Decrypt` each).
    calls: AtomicU64,
    /// The audit HMAC key, once found and checked (see [`audit_key`]).
    audit_key: Mutex<Option<ObjectHandle>>,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("module", &self.module)
            .field("token", &self.token_label)
            .field("slot", &self.slot.id())
            .finish_non_exhaustive()
    }
}

/// What the token holds under one key version's label, as checked.
#[derive(Debug)]
struct Verified {
    /// The objects that passed [`kwk::problems`] and are not disabled, in
    /// the token's order; never empty. Normally exactly one.
    usable: Vec<ObjectHandle>,
    /// How many objects carry the label, usable or not. More than one is a
    /// duplicated version (docs/FORMAT.md section 1): it unwraps, trying
    /// each usable object, but nothing new is wrapped under it.
    labelled: usize,
}

/// What a key is used for in [`Hsm::with_key`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    Wrap,
    Unwrap,
}

/// A session borrowed from the pool; it goes back on drop unless discarded.
struct PooledSession<'a> {
    hsm: &'a Hsm,
    session: Option<Session>,
}

impl PooledSession<'_> {
    fn get(&self) -> &Session {
        self.session.as_ref().expect("session present until drop")
    }
    /// Closes the session instead of returning it: after an unexpected
    /// failure we do not trust its operation state.
    fn discard(mut self) {
        self.session.take();
    }
}

impl Drop for PooledSession<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let mut pool = lock(&self.hsm.pool);
            if pool.len() < MAX_POOLED_SESSIONS {
                pool.push(s);
            }
        }
    }
}

impl Hsm {
    /// Loads the module, initialises it (once per process) and finds the
    /// token whose label is `token_label`. Does not log in.
    pub fn open(module: &Path, token_label: &str) -> Result<Hsm> {
        let (ctx, token_lock) = context(module, token_label)?;
        let label = token_label.trim().to_string();
        let (slot, admin) = {
            let _guard = TokenGuard::take(&token_lock, Mode::Shared)?;
            let slot = find_token(&ctx, module, token_label, token_lock.is_softhsm2())?;
            let admin = match ctx.open_rw_session(slot) {
                Ok(s) => s,
                // A write-protected token can still wrap and unwrap.
                Err(e) if rv_of(&e) == Some(RvError::TokenWriteProtected) => ctx
                    .open_ro_session(slot)
                    .map_err(|e| token_error(e, &label, "opening a session"))?,
                Err(e) => return Err(token_error(e, &label, "opening a session")),
            };
            (slot, admin)
        };
        Ok(Hsm {
            ctx,
            slot,
            module: module.to_path_buf(),
            token_label: label,
            token_lock,
            admin: Mutex::new(admin),
            pool: Mutex::new(Vec::new()),
            verified: RwLock::new(HashMap::new()),
            current: RwLock::new(HashMap::new()),
            calls: AtomicU64::new(0),
            audit_key: Mutex::new(None),
        })
    }

    /// The token's label (trimmed), as used in messages.
    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    /// The module path this token was opened through.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// Logs in as the normal user, once. A wrong PIN is never retried: a
    /// few wrong tries lock the token on real HSMs.
    pub fn login(&self, pin: &Pin) -> Result<()> {
        let t = &self.token_label;
        let softhsm2 = self.token_lock.is_softhsm2();
        // Exclusive from the first look to the last: SoftHSM2 rewrites
        // token.object at every C_Login, right or wrong PIN.
        let admin = self.admin(Mode::Exclusive)?;
        let info = retry_transient(softhsm2, || self.ctx.get_token_info(self.slot))
            .map_err(|e| token_error(e, t, "reading token information"))?;
        // Refuse up front when the token says a login cannot succeed, rather
        // than spend a try.
        if info.user_pin_locked() {
            return Err(pin_locked(t));
        }
        if !info.user_pin_initialized() {
            return Err(Error::pin(format!(
                "token {t:?} has no user PIN yet; its security officer must set one (SoftHSM2: `hsmseal init --dev` or `softhsm2-util --init-token`)"
            )));
        }
        let auth = AuthPin::from(pin.expose());
        // Retried only for SoftHSM2's CKR_GENERAL_ERROR, which it returns
        // before looking at the PIN (see `is_transient`): a wrong PIN is
        // never tried twice.
        match retry_transient(softhsm2, || admin.login(UserType::User, Some(&auth))) {
            Ok(()) => Ok(()),
            Err(e) => match rv_of(&e) {
                // Another Hsm in this process (same token) already logged in.
                Some(RvError::UserAlreadyLoggedIn) => Ok(()),
                Some(RvError::PinIncorrect) => {
                    let left = match self.ctx.get_token_info(self.slot) {
                        Ok(i) if i.user_pin_locked() => "; the token has now locked the PIN",
                        Ok(i) if i.user_pin_final_try() => {
                            "; one more wrong PIN will lock the token"
                        }
                        _ => "",
                    };
                    Err(Error::pin(format!(
                        "wrong PIN for token {t:?} (not retried, to avoid locking the token){left}"
                    )))
                }
                Some(RvError::PinLocked) => Err(pin_locked(t)),
                Some(RvError::PinLenRange) | Some(RvError::PinInvalid) => Err(Error::pin(format!(
                    "the PIN for token {t:?} has a length or characters the token does not accept (not retried)"
                ))),
                Some(RvError::PinExpired) => Err(Error::pin(format!(
                    "the user PIN of token {t:?} has expired; change it with the vendor's tool"
                ))),
                _ => Err(token_error(e, t, "logging in")),
            },
        }
    }

    /// Initialises a fresh token labelled `label` in the module's first free
    /// slot and sets its user PIN (for `hsmseal init --dev`). For SoftHSM2
    /// the caller has already set `SOFTHSM2_CONF`, before this process's
    /// first use of the module (it is read once; a later change is refused
    /// rather than silently initialising a token in the old directory).
    pub fn init_token(module: &Path, label: &str, so_pin: &Pin, user_pin: &Pin) -> Result<()> {
        let label = label.trim();
        if label.is_empty() || label.len() > 32 {
            return Err(Error::usage(format!(
                "invalid token label {label:?}: use 1 to 32 bytes"
            )));
        }
        let (ctx, token_lock) = context(module, label)?;
        let softhsm2 = token_lock.is_softhsm2();
        // Exclusive throughout: C_InitToken creates the token's files,
        // C_Login and C_InitPIN rewrite them.
        let _guard = TokenGuard::take(&token_lock, Mode::Exclusive)?;
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| module_error(e, module, "listing slots"))?;
        let mut free = None;
        for slot in slots {
            let info = retry_transient(softhsm2, || ctx.get_token_info(slot))
                .map_err(|e| module_error(e, module, "reading token information"))?;
            if info.token_initialized() {
                if info.label().trim() == label {
                    return Err(Error::token(format!(
                        "a token labelled {label:?} already exists in module {}; choose another label",
                        module.display()
                    )));
                }
            } else if free.is_none() {
                free = Some(slot);
            }
        }
        let free = free.ok_or_else(|| {
            Error::token(format!(
                "no free slot in module {} to initialise a token in (for SoftHSM2, check that SOFTHSM2_CONF's directories.tokendir exists and is writable)",
                module.display()
            ))
        })?;
        let so = AuthPin::from(so_pin.expose());
        ctx.init_token(free, &so, label)
            .map_err(|e| match rv_of(&e) {
                Some(RvError::PinLenRange) | Some(RvError::PinInvalid) => Error::pin(format!(
                    "the security officer PIN has a length or characters module {} does not accept",
                    module.display()
                )),
                _ => token_error(e, label, "initialising the token"),
            })?;
        // SoftHSM2 moves a newly initialised token to a new slot id, so look
        // it up again by its label.
        let slot = find_token(&ctx, module, label, softhsm2)?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| token_error(e, label, "opening a session"))?;
        session
            .login(UserType::So, Some(&so))
            .map_err(|e| token_error(e, label, "logging in as security officer"))?;
        let user = AuthPin::from(user_pin.expose());
        session.init_pin(&user).map_err(|e| match rv_of(&e) {
            Some(RvError::PinLenRange) | Some(RvError::PinInvalid) => Error::pin(format!(
                "the user PIN has a length or characters token {label:?} does not accept"
            )),
            _ => token_error(e, label, "setting the user PIN"),
        })?;
        session
            .logout()
            .map_err(|e| token_error(e, label, "logging out the security officer"))?;
        Ok(())
    }

    // ---- internals ----

    /// The admin session, with the token guard in `mode`.
    fn admin(&self, mode: Mode) -> Result<Admin<'_>> {
        let guard = TokenGuard::take(&self.token_lock, mode)?;
        Ok(Admin {
            session: lock(&self.admin),
            _guard: guard,
        })
    }

    /// The admin session under the exclusive token lock, after checking the
    /// token is logged in (private objects are invisible otherwise, which
    /// would look like "no keys"). Exclusive is the default so that any
    /// method that creates, changes or destroys an object holds it from its
    /// first lookup to its last check; methods that only read use
    /// [`Self::admin_reading`].
    fn admin_logged_in(&self) -> Result<Admin<'_>> {
        self.admin_checked(Mode::Exclusive)
    }

    /// [`Self::admin_logged_in`] under the shared token lock, for methods
    /// that only search and read attributes.
    fn admin_reading(&self) -> Result<Admin<'_>> {
        self.admin_checked(Mode::Shared)
    }

    fn admin_checked(&self, mode: Mode) -> Result<Admin<'_>> {
        let admin = self.admin(mode)?;
        let state = admin
            .get_session_info()
            .map_err(|e| token_error(e, &self.token_label, "reading the session state"))?
            .session_state();
        match state {
            SessionState::RoUser | SessionState::RwUser => Ok(admin),
            _ => Err(Error::pin(format!(
                "not logged in to token {:?}: give the user PIN with HSMSEAL_PIN, --pin-file or at the prompt",
                self.token_label
            ))),
        }
    }

    /// Reads the token information under the shared token lock (SoftHSM2
    /// re-reads token.object for it).
    fn token_info(&self) -> Result<cryptoki::slot::TokenInfo> {
        let _guard = TokenGuard::take(&self.token_lock, Mode::Shared)?;
        retry_transient(self.token_lock.is_softhsm2(), || {
            self.ctx.get_token_info(self.slot)
        })
        .map_err(|e| token_error(e, &self.token_label, "reading token information"))
    }

    /// Every hsmseal object on the token: key versions (sorted) and
    /// version high-water records.
    fn scan(&self, admin: &Session) -> Result<Scan> {
        let t = &self.token_label;
        // An empty template finds every object the user can see, so an
        // object of the wrong class with our label shows up (and is refused)
        // rather than hiding.
        let handles = admin
            .find_objects(&[])
            .map_err(|e| token_error(e, t, "searching for keys"))?;
        let mut out = Scan::default();
        for h in handles {
            let attrs = match admin.get_attributes(h, &[AttributeType::Label]) {
                Ok(a) => a,
                // Destroyed by someone else since the search: not a key any more.
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(token_error(e, t, "reading a key label")),
            };
            for a in attrs {
                if let Attribute::Label(l) = a {
                    if let Some(k) = kwk::parse_label(&l) {
                        out.keys.push((k, h));
                    } else if let Some(name) = kwk::parse_high_water_label(&l) {
                        out.records.push((name, h));
                    }
                }
            }
        }
        out.keys.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// What the token holds for `name`.
    fn family(&self, admin: &Session, name: &str) -> Result<Family> {
        let scan = self.scan(admin)?;
        Ok(self.family_from(admin, &scan, name))
    }

    /// [`Self::family`] for one name from a scan already made.
    fn family_from(&self, admin: &Session, scan: &Scan, name: &str) -> Family {
        let mut f = Family {
            name: name.to_string(),
            ..Family::default()
        };
        f.keys = scan
            .keys
            .iter()
            .filter(|(k, _)| k.name == name)
            .map(|(k, h)| (k.version, *h))
            .collect();
        for (_, h) in scan.records.iter().filter(|(n, _)| n == name) {
            f.records.push(*h);
            if let Some(v) = read_high_water(admin, *h) {
                f.high_water = f.high_water.max(v);
            }
        }
        f
    }

    fn read_attributes(&self, admin: &Session, h: ObjectHandle) -> Result<KeyAttributes> {
        let attrs = admin
            .get_attributes(h, kwk::CHECKED_ATTRIBUTES)
            .map_err(|e| token_error(e, &self.token_label, "reading key attributes"))?;
        Ok(KeyAttributes::from_attributes(&attrs))
    }

    fn key_info(&self, admin: &Session, k: &KeyRef, h: ObjectHandle) -> Result<KeyInfo> {
        Ok(make_key_info(k, self.read_attributes(admin, h)?, admin, h))
    }

    /// Whether the object `h` is disabled; `None` if it is gone.
    fn disabled(&self, admin: &Session, h: ObjectHandle) -> Result<Option<bool>> {
        match admin.get_attributes(h, &[AttributeType::Encrypt, AttributeType::Decrypt]) {
            Ok(attrs) => Ok(Some(kwk::is_disabled(&KeyAttributes::from_attributes(
                &attrs,
            )))),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(token_error(e, &self.token_label, "reading key attributes")),
        }
    }

    /// [`Self::key_info`], or `None` if the object was destroyed meanwhile.
    fn key_info_if_present(
        &self,
        admin: &Session,
        k: &KeyRef,
        h: ObjectHandle,
    ) -> Result<Option<KeyInfo>> {
        match admin.get_attributes(h, kwk::CHECKED_ATTRIBUTES) {
            Ok(attrs) => Ok(Some(make_key_info(
                k,
                KeyAttributes::from_attributes(&attrs),
                admin,
                h,
            ))),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(token_error(e, &self.token_label, "reading key attributes")),
        }
    }

    /// Generates version `version` of `name` and checks what the token
    /// made. The caller holds the exclusive token lock and then calls
    /// [`Self::ensure_unique`].
    fn generate(
        &self,
        admin: &Session,
        name: &str,
        version: u32,
    ) -> Result<(KeyInfo, ObjectHandle)> {
        let k = KeyRef {
            name: name.to_string(),
            version,
        };
        let template = kwk::kwk_template(name, version, crate::time::now_unix());
        let h = admin
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(|e| {
                token_error(
                    e,
                    &self.token_label,
                    &format!("generating key {k} with CKM_AES_KEY_GEN"),
                )
            })?;
        // Check what the token made, not what we asked for: a token that
        // ignores part of the template must not leave a weak key behind.
        let info = self.key_info(admin, &k, h)?;
        if !info.is_ok() {
            let destroyed = match admin.destroy_object(h) {
                Ok(()) => "it was destroyed",
                Err(_) => "destroying it failed too, remove it by hand",
            };
            return Err(Error::token(format!(
                "token {:?} did not honour hsmseal's key template for {k}: {}; {destroyed}. Run `hsmseal doctor`",
                self.token_label,
                info.problems.join("; ")
            )));
        }
        Ok((info, h))
    }

    /// After generating `h` as version `k`: checks that no other object
    /// carries its label. hsmseal processes cannot make one meanwhile (the
    /// caller holds the exclusive token lock from its scan to here), but a
    /// client that does not take the lock can. Then `h` is destroyed (no
    /// hsmseal process can have used it: they need the lock to look it up)
    /// and the creation fails, so hsmseal never leaves a duplicated label.
    fn ensure_unique(&self, admin: &Session, k: &KeyRef, h: ObjectHandle) -> Result<()> {
        let t = &self.token_label;
        let label = kwk::label(&k.name, k.version);
        let handles = admin
            .find_objects(&[Attribute::Label(label.clone().into_bytes())])
            .map_err(|e| token_error(e, t, &format!("checking that {label} is unique")))?;
        if handles.len() > 1 {
            let destroyed = match admin.destroy_object(h) {
                Ok(()) => "hsmseal destroyed the one it made, so the label stays unique",
                Err(_) => "destroying the one hsmseal made failed too; `hsmseal key list` shows the duplicate",
            };
            return Err(Error::token(format!(
                "another PKCS#11 client created an object labelled {label} on token {t:?} while hsmseal was creating key {k}; {destroyed}. Check with `hsmseal key list` and run the command again"
            )));
        }
        self.verified
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                k.clone(),
                Arc::new(Verified {
                    usable: vec![h],
                    labelled: 1,
                }),
            );
        self.forget_current(&k.name);
        Ok(())
    }

    /// Why version `version` of `family` has no object: destroyed (its
    /// number was issued), or never created.
    fn missing_version(&self, family: &Family, version: u32) -> Error {
        let name = &family.name;
        let t = &self.token_label;
        if family.is_empty() {
            self.key_not_found(name)
        } else if version <= family.last_issued() {
            Error::key(format!(
                "key {name} v{version} not found on token {t:?}: it was destroyed (`hsmseal key destroy` or `key purge`); data encrypted under it can no longer be decrypted"
            ))
        } else {
            Error::key(format!(
                "key {name} v{version} not found on token {t:?}: the newest version is v{}; v{version} was never created here (or was destroyed by another tool)",
                family.last_issued()
            ))
        }
    }

    /// Why `family` has no current version: unknown, all destroyed, or
    /// every remaining version disabled.
    fn no_current_version(&self, family: &Family) -> Error {
        let name = &family.name;
        let t = &self.token_label;
        let last = family.last_issued();
        if family.is_empty() {
            self.key_not_found(name)
        } else if family.keys.is_empty() {
            Error::key(format!(
                "key {name} has no versions left on token {t:?} (v1 to v{last} were destroyed); `hsmseal key rotate {name}` creates v{}",
                u64::from(last) + 1
            ))
        } else {
            Error::key(format!(
                "key {name} has no enabled version on token {t:?} (every remaining version is disabled); `hsmseal key enable {name} --version N` re-enables one, `hsmseal key rotate {name}` creates v{}",
                u64::from(last) + 1
            ))
        }
    }

    /// The refusal to wrap under a version several objects carry.
    fn ambiguous(&self, k: &KeyRef, n: usize) -> Error {
        Error::key(format!(
            "{n} objects on token {:?} are labelled {} (made by an older hsmseal or another PKCS#11 client); data under key {k} still decrypts (each is tried), but hsmseal wraps nothing new under a duplicated version — run `hsmseal key rotate {}` to make a new, unique current version",
            self.token_label,
            kwk::label(&k.name, k.version),
            k.name
        ))
    }

    fn key_not_found(&self, name: &str) -> Error {
        Error::key(format!(
            "key {name:?} not found on token {:?} (see `hsmseal key list`)",
            self.token_label
        ))
    }

    /// The usable objects of `k`, after checking their attributes (cached).
    /// Fails when none is usable: a weak object is refused naming what is
    /// weak, a disabled one as disabled.
    fn resolve(&self, k: &KeyRef) -> Result<Arc<Verified>> {
        if let Some(v) = self
            .verified
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(k)
        {
            return Ok(v.clone());
        }
        validate_key_name(&k.name)?;
        let admin = self.admin_reading()?;
        let label = kwk::label(&k.name, k.version);
        let handles = admin
            .find_objects(&[Attribute::Label(label.clone().into_bytes())])
            .map_err(|e| token_error(e, &self.token_label, &format!("looking up key {k}")))?;
        let mut usable = Vec::new();
        let mut weak = None;
        let mut disabled = false;
        for &h in &handles {
            let attributes = match admin.get_attributes(h, kwk::CHECKED_ATTRIBUTES) {
                Ok(a) => KeyAttributes::from_attributes(&a),
                // Destroyed since the search.
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(token_error(e, &self.token_label, "reading key attributes")),
            };
            let problems = kwk::problems(&attributes);
            if !problems.is_empty() {
                weak.get_or_insert(problems);
            } else if kwk::is_disabled(&attributes) {
                disabled = true;
            } else {
                usable.push(h);
            }
        }
        if usable.is_empty() {
            return Err(if let Some(problems) = weak {
                Error::key(kwk::refusal(k, &problems))
            } else if disabled {
                Error::key(kwk::disabled_refusal(k))
            } else {
                let family = self.family(&admin, &k.name)?;
                self.missing_version(&family, k.version)
            });
        }
        let v = Arc::new(Verified {
            usable,
            labelled: handles.len(),
        });
        self.verified
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(k.clone(), v.clone());
        Ok(v)
    }

    /// Forgets the verified handle of `k` and the current version of its
    /// name, so both are looked up again.
    fn evict(&self, k: &KeyRef) {
        self.verified
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(k);
        self.forget_current(&k.name);
    }

    fn forget_current(&self, name: &str) {
        self.current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    fn session(&self) -> Result<PooledSession<'_>> {
        let idle = lock(&self.pool).pop();
        let session = match idle {
            Some(s) => s,
            // Read-only is enough to use token keys; the admin session's
            // login covers it.
            None => self
                .ctx
                .open_ro_session(self.slot)
                .map_err(|e| token_error(e, &self.token_label, "opening a session"))?,
        };
        Ok(PooledSession {
            hsm: self,
            session: Some(session),
        })
    }

    /// Runs one wrap or unwrap, retrying once with a fresh lookup if the
    /// cached handle went stale (key destroyed and re-created, token reset,
    /// or SoftHSM2 caught rewriting the key's file by another process) or
    /// the token refuses it (disabled by another process since it was
    /// verified): the fresh lookup then reports why. A wrap needs a version
    /// carried by exactly one object. An unwrap tries each usable object of
    /// a duplicated version in turn while `wrong_key` says the last one did
    /// not authenticate the data.
    fn with_key<T>(
        &self,
        k: &KeyRef,
        purpose: Use,
        op: impl Fn(&Session, ObjectHandle) -> Result<T, CkError>,
        wrong_key: impl Fn(&CkError) -> bool,
        on_error: impl Fn(CkError) -> Error,
    ) -> Result<T> {
        let mut retried = false;
        'lookup: loop {
            let v = self.resolve(k)?;
            if purpose == Use::Wrap && v.labelled > 1 {
                return Err(self.ambiguous(k, v.labelled));
            }
            let mut last = None;
            for &h in &v.usable {
                let session = self.session()?;
                self.calls.fetch_add(1, Ordering::Relaxed);
                match op(session.get(), h) {
                    Ok(out) => return Ok(out),
                    Err(e) => {
                        session.discard();
                        if (is_gone(&e) || is_not_permitted(&e)) && !retried {
                            self.evict(k);
                            retried = true;
                            continue 'lookup;
                        }
                        if !wrong_key(&e) {
                            return Err(on_error(e));
                        }
                        last = Some(e);
                    }
                }
            }
            // Every usable object was tried and none authenticated the data.
            return Err(on_error(last.expect("resolve returns at least one object")));
        }
    }
}

/// The value of a high-water record: a canonical decimal version number in
/// a `CKO_DATA` object. Anything else is ignored (the record only guards
/// against reusing a version number; see [`lifecycle`]).
fn read_high_water(admin: &Session, h: ObjectHandle) -> Option<u32> {
    let attrs = admin
        .get_attributes(h, &[AttributeType::Class, AttributeType::Value])
        .ok()?;
    let mut class_ok = false;
    let mut value = None;
    for a in attrs {
        match a {
            Attribute::Class(c) => class_ok = c == ObjectClass::DATA,
            Attribute::Value(v) => value = String::from_utf8(v).ok(),
            _ => {}
        }
    }
    if !class_ok {
        return None;
    }
    kwk::parse_version(&value?)
}

/// The creation time of `k`: from its `CKA_ID` (see [`kwk::key_id`]), else
/// the day of `start_date`. (display string, latest possible Unix time)
fn created(
    admin: &Session,
    h: ObjectHandle,
    k: &KeyRef,
    start_date: Option<&str>,
) -> (Option<String>, Option<u64>) {
    let from_id = admin
        .get_attributes(h, &[AttributeType::Id])
        .ok()
        .and_then(|attrs| {
            attrs.iter().find_map(|a| match a {
                Attribute::Id(id) => kwk::created_from_id(id, k),
                _ => None,
            })
        });
    match (from_id, start_date) {
        (Some(t), _) => (Some(crate::time::rfc3339(t)), Some(t)),
        (None, Some(d)) => (Some(d.to_string()), crate::time::date_end_unix(d)),
        (None, None) => (None, None),
    }
}

/// `CKA_START_DATE` as `YYYY-MM-DD`, or `None` if unset or unreadable (see
/// [`kwk::CHECKED_ATTRIBUTES`] for why unreadable is expected on SoftHSM2).
fn read_start_date(admin: &Session, h: ObjectHandle) -> Option<String> {
    let attrs = admin.get_attributes(h, &[AttributeType::StartDate]).ok()?;
    attrs.iter().find_map(|a| match a {
        Attribute::StartDate(d) => kwk::date_string(d),
        _ => None,
    })
}

fn make_key_info(
    k: &KeyRef,
    mut attributes: KeyAttributes,
    admin: &Session,
    h: ObjectHandle,
) -> KeyInfo {
    attributes.start_date = read_start_date(admin, h);
    let (created, created_not_after) = created(admin, h, k, attributes.start_date.as_deref());
    // Provisional: which version is active depends on its siblings
    // (`lifecycle::Family::states`).
    let state = if kwk::is_disabled(&attributes) {
        KeyState::Disabled
    } else {
        KeyState::DecryptOnly
    };
    KeyInfo {
        name: k.name.clone(),
        version: k.version,
        label: kwk::label(&k.name, k.version),
        state,
        created,
        created_not_after,
        problems: kwk::problems(&attributes),
        attributes: Some(attributes),
    }
}

/// True for what `C_Decrypt` returns when the GCM tag does not verify (wrong
/// key, modified data). SoftHSM2 reports a bad GCM tag as
/// `CKR_GENERAL_ERROR`; the spec's answer is `CKR_ENCRYPTED_DATA_INVALID`.
/// Only on `C_Decrypt` itself: the same codes from `C_DecryptInit` mean
/// something else.
fn is_bad_tag(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::GeneralError | RvError::EncryptedDataInvalid,
            Function::Decrypt
        )
    )
}

/// True for the code a token returns for a key whose attributes forbid the
/// operation (here: a version disabled since its handle was verified).
fn is_not_permitted(e: &CkError) -> bool {
    rv_of(e) == Some(RvError::KeyFunctionNotPermitted)
}

/// True for the codes a token returns for an object that no longer exists.
fn is_gone(e: &CkError) -> bool {
    matches!(
        rv_of(e),
        Some(RvError::ObjectHandleInvalid) | Some(RvError::KeyHandleInvalid)
    )
}

fn pin_locked(token: &str) -> Error {
    Error::pin(format!(
        "the user PIN of token {token:?} is locked; its security officer must reset it (e.g. `pkcs11-tool --login --login-type so --init-pin`)"
    ))
}

fn gcm_params<'a>(iv: &'a mut [u8], aad: &'a [u8]) -> Result<GcmParams<'a>, CkError> {
    GcmParams::new(iv, aad, ((WRAP_TAG_LEN * 8) as u64).into())
}

/// The IV length in GCM parameters after a call (a module may rewrite them).
fn gcm_iv_len(mech: &mut Mechanism) -> usize {
    match mech {
        Mechanism::AesGcm(p) => p.iv().len(),
        _ => 0,
    }
}

impl KeyBackend for Hsm {
    /// The highest version of `name` that is not disabled (destroyed
    /// versions have no object and so are never current). A current version
    /// with weak attributes is an error, not skipped: falling back to an
    /// older key silently would hide the problem.
    fn current_version(&self, name: &str) -> Result<u32> {
        validate_key_name(name)?;
        let cached = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied();
        let version = match cached {
            Some(v) => v,
            None => {
                let admin = self.admin_reading()?;
                let family = self.family(&admin, name)?;
                let mut found = None;
                for (v, h) in family.keys.iter().rev() {
                    if self.disabled(&admin, *h)? == Some(false) {
                        found = Some(*v);
                        break;
                    }
                }
                match found {
                    Some(v) => v,
                    None => return Err(self.no_current_version(&family)),
                }
            }
        };
        let k = KeyRef {
            name: name.to_string(),
            version,
        };
        if let Err(e) = self.resolve(&k) {
            self.forget_current(name);
            return Err(e);
        }
        self.current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), version);
        Ok(version)
    }

    fn wrap(&self, kwk: &KeyRef, key: &SecretKey, aad: &[u8]) -> Result<WrappedKey> {
        let t = &self.token_label;
        let (iv_len, iv, ct) = self.with_key(
            kwk,
            Use::Wrap,
            |session, h| {
                // Our random IV goes in; an HSM that generates GCM IVs itself
                // writes its own into the same buffer, and that is what we keep.
                let mut iv = [0u8; WRAP_IV_LEN];
                rand::rngs::OsRng.fill_bytes(&mut iv);
                let mut mech = Mechanism::AesGcm(gcm_params(&mut iv, aad)?);
                let ct = session.encrypt(&mech, h, key.expose())?;
                let iv_len = gcm_iv_len(&mut mech);
                Ok((iv_len, iv, ct))
            },
            |_| false,
            |e| token_error(e, t, &format!("wrapping a data key with {kwk}")),
        )?;
        // The format stores exactly 12 bytes of IV: a module that changed the
        // length in the parameters it was given is not one we can use.
        if iv_len != WRAP_IV_LEN {
            return Err(Error::token(format!(
                "wrapping a data key with {kwk} on token {t:?}: the module returned a {iv_len}-byte AES-GCM IV; hsmseal needs 12-byte IVs"
            )));
        }
        if ct.len() != WRAPPED_KEY_LEN {
            return Err(Error::token(format!(
                "wrapping a data key with {kwk} on token {t:?}: C_Encrypt returned {} bytes, expected {WRAPPED_KEY_LEN} (32-byte key and 16-byte tag); the module's AES-GCM output is not standard",
                ct.len()
            )));
        }
        let mut ciphertext = [0u8; WRAPPED_KEY_LEN];
        ciphertext.copy_from_slice(&ct);
        Ok(WrappedKey { iv, ciphertext })
    }

    fn unwrap(&self, kwk: &KeyRef, wrapped: &WrappedKey, aad: &[u8]) -> Result<SecretKey> {
        let t = &self.token_label;
        let mut pt = self.with_key(
            kwk,
            Use::Unwrap,
            |session, h| {
                let mut iv = wrapped.iv;
                let mech = Mechanism::AesGcm(gcm_params(&mut iv, aad)?);
                // Zeroizing from the moment the plaintext key exists: its
                // whole buffer is wiped on drop whatever happens next.
                session
                    .decrypt(&mech, h, &wrapped.ciphertext)
                    .map(Zeroizing::new)
            },
            is_bad_tag,
            |e| {
                if is_bad_tag(&e) {
                    Error::integrity(format!(
                        "authentication failed unwrapping the data key with {kwk}: the header was modified or the data belongs to another key"
                    ))
                } else {
                    token_error(e, t, &format!("unwrapping a data key with {kwk}"))
                }
            },
        )?;
        let n = pt.len();
        SecretKey::from_slice(&mut pt).ok_or_else(|| {
            Error::token(format!(
                "unwrapping a data key with {kwk} on token {t:?}: C_Decrypt returned {n} bytes, expected 32"
            ))
        })
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
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

    #[test]
    fn a_bad_tag_is_only_c_decrypts_general_or_encrypted_data_invalid() {
        assert!(is_bad_tag(&CkError::Pkcs11(
            RvError::GeneralError,
            Function::Decrypt
        )));
        assert!(is_bad_tag(&CkError::Pkcs11(
            RvError::EncryptedDataInvalid,
            Function::Decrypt
        )));
        assert!(!is_bad_tag(&CkError::Pkcs11(
            RvError::GeneralError,
            Function::DecryptInit
        )));
        assert!(!is_bad_tag(&CkError::Pkcs11(
            RvError::KeyHandleInvalid,
            Function::Decrypt
        )));
    }
}
