//! The PKCS#11 key backend: KWKs live in a token reached through a vendor's
//! PKCS#11 module (SoftHSM2 in development and tests).
//!
//! This file holds [`Hsm`] itself (open, login, token initialisation, the
//! admin session, the verified-handle caches). Split by PKCS#11 topic:
//! `module` (contexts, `C_Initialize` once, finding the token), `session`
//! (the in-process and token locks, the session pool, [`quiesce`]),
//! `backend` (`impl KeyBackend for Hsm`: wrap, unwrap, current version),
//! `objects` (finding and reading hsmseal's objects), [`kwk`] (labels,
//! template and attribute checks of a KWK, no token access), [`lifecycle`]
//! (creating, disabling, destroying and purging versions), [`audit_key`]
//! (the audit log's HMAC key and head records), [`kdk`] (the key-derivation
//! key beside each KWK version, for v2 column tokens), [`bidx_key`] (the
//! blind-index key of each key name), [`hmac_object`] (the template and
//! attribute check those three HMAC objects share), [`doctor`], [`lock`] (the
//! token lock file) and `errors` (PKCS#11 errors to hsmseal's).
//!
//! Invariants:
//! - One `Pkcs11` context per module per process, `C_Initialize`d once with
//!   OS locking and never finalised (see `module::context`). SoftHSM2 reads
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
//! - No PIN or key byte appears in an error, a log line or `Debug` output.

pub mod audit_key;
mod backend;
pub mod backup;
pub mod bidx_key;
pub mod doctor;
pub mod ecdh;
mod errors;
pub mod hmac_keys;
pub mod hmac_object;
pub mod kdk;
pub mod kwk;
pub mod lifecycle;
pub mod lock;
mod module;
mod objects;
pub mod pubkey;
mod pubkey_lifecycle;
mod session;
pub mod uri;

pub use doctor::DoctorReport;
pub use kwk::{KeyAttributes, KeyInfo, KeyState, StateChange};
pub use lifecycle::{PurgeItem, PurgeReport, RotateReport};
pub use session::{lock_token, quiesce, token_lock_path, TokenGuard};
pub use uri::TokenSpec;

use crate::backend::KeyRef;
use crate::error::{Error, Result};
use crate::secret::Pin;
use cryptoki::context::Pkcs11;
use cryptoki::error::RvError;
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use errors::{module_error, pin_locked, rv_of, token_error};
use lock::{Mode, TokenLock};
use module::{context, find_token};
use session::{lock, retry_transient, Admin, PooledSession};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

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
    /// The checked KDK of each key version (`None`: it has none), once
    /// looked up (see [`kdk`]); dropped with the version's other caches.
    kdks: Mutex<HashMap<KeyRef, Option<ObjectHandle>>>,
    /// The checked blind-index key of each key name, once found or made
    /// (see [`bidx_key`]); dropped when the last version is destroyed.
    bidx_keys: Mutex<HashMap<String, ObjectHandle>>,
    /// The checked private key of each public-key KWK version (by version
    /// and SPKI fingerprint), once looked up (see [`pubkey`]); cleared by
    /// this `Hsm`'s public-key lifecycle changes, and a handle the token
    /// stops accepting is looked up again.
    pub_private: Mutex<HashMap<(KeyRef, [u8; 32]), ObjectHandle>>,
    /// The current recipient of each public-key KWK name (`None`: the name
    /// is no public-key KWK here), once built, for `rotate`'s re-sealing;
    /// cleared with `pub_private`.
    pub_current: Mutex<HashMap<String, Option<crate::envelope::any_recipient::AnyRecipient>>>,
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

impl Hsm {
    /// Loads the module, initialises it (once per process) and finds the
    /// token `token` names: a label, or a `pkcs11:` URI ([`TokenSpec`]).
    /// Does not log in.
    pub fn open(module: &Path, token: &str) -> Result<Hsm> {
        Hsm::open_spec(module, &TokenSpec::parse(token)?)
    }

    /// [`Hsm::open`] with a parsed token spec.
    pub fn open_spec(module: &Path, spec: &TokenSpec) -> Result<Hsm> {
        let (ctx, token_lock) = context(module)?;
        let (slot, label, admin) = {
            let _guard = TokenGuard::take(&token_lock, Mode::Shared)?;
            let (slot, label) = find_token(&ctx, module, spec, token_lock.is_softhsm2())?;
            let admin = match ctx.open_rw_session(slot) {
                Ok(s) => s,
                // A write-protected token can still wrap and unwrap.
                Err(e) if rv_of(&e) == Some(RvError::TokenWriteProtected) => ctx
                    .open_ro_session(slot)
                    .map_err(|e| token_error(e, &label, "opening a session"))?,
                Err(e) => return Err(token_error(e, &label, "opening a session")),
            };
            (slot, label, admin)
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
            kdks: Mutex::new(HashMap::new()),
            bidx_keys: Mutex::new(HashMap::new()),
            pub_private: Mutex::new(HashMap::new()),
            pub_current: Mutex::new(HashMap::new()),
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
        let (ctx, token_lock) = context(module)?;
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
        let (slot, _) = find_token(&ctx, module, &TokenSpec::label(label), softhsm2)?;
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

    /// Forgets the verified handle of `k` and the current version of its
    /// name, so both are looked up again.
    fn evict(&self, k: &KeyRef) {
        self.verified
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(k);
        lock(&self.kdks).remove(k);
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
            pool: &self.pool,
            session: Some(session),
        })
    }
}
