//! The PKCS#11 module: one context per module file per process,
//! `C_Initialize`d once (under the shared token lock) and never finalised,
//! and the token found by its label or `pkcs11:` URI attributes. SoftHSM2 reads `SOFTHSM2_CONF` at
//! `C_Initialize`, so a later change of it is refused, not silently
//! ignored. The invariants are stated in `crate::hsm`.

use super::errors::{module_error, rv_of};
use super::lock::{Mode, TokenLock};
use super::session::{lock, retry_transient, TokenGuard};
use super::uri::{TokenFields, TokenSpec};
use crate::error::{Error, Result};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::slot::Slot;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
/// use, and the token lock for its tokens. `C_Initialize` runs
/// under the shared token lock: SoftHSM2 reads every token of its directory
/// then, and skips (for the life of the process) one whose `token.object`
/// it finds half-written.
pub(super) fn context(module: &Path) -> Result<(Pkcs11, Arc<TokenLock>)> {
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
        return Ok((m.ctx.clone(), TokenLock::for_module(&canonical)?));
    }
    let token_lock = TokenLock::for_module(&canonical)?;
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

/// The slot holding the one initialised token `spec` matches, and that
/// token's label (trimmed). The caller holds the token lock (at least
/// shared). No match, or several, is an error listing the tokens found, so
/// that the right `pkcs11:` URI can be written from it.
pub(super) fn find_token(
    ctx: &Pkcs11,
    module: &Path,
    spec: &TokenSpec,
    softhsm2: bool,
) -> Result<(Slot, String)> {
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
        let fields = TokenFields {
            label: info.label().trim(),
            serial: info.serial_number().trim(),
            manufacturer: info.manufacturer_id().trim(),
            model: info.model().trim(),
            slot_id: slot.id(),
        };
        if spec.matches(&fields) {
            matches.push((slot, fields.label.to_string()));
        }
        found.push(format!(
            "{:?} (pkcs11:token={};serial={};slot-id={})",
            fields.label,
            percent(fields.label),
            percent(fields.serial),
            fields.slot_id
        ));
    }
    let list = || {
        if found.is_empty() {
            "none (for SoftHSM2, check SOFTHSM2_CONF)".to_string()
        } else {
            found.join(", ")
        }
    };
    match matches.len() {
        1 => Ok(matches.remove(0)),
        0 => Err(Error::token(format!(
            "no token {} in PKCS#11 module {}; tokens found: {} — set --token or HSMSEAL_TOKEN",
            match (&spec.label, spec.is_label_only()) {
                (Some(l), true) => format!("labelled {l:?}"),
                _ => format!("matches {spec}"),
            },
            module.display(),
            list()
        ))),
        n => Err(Error::token(format!(
            "{n} tokens match {} in PKCS#11 module {}; hsmseal will not guess which one holds the keys — name one with a pkcs11: URI (--token 'pkcs11:serial=...'): {}",
            match (&spec.label, spec.is_label_only()) {
                (Some(l), true) => format!("the label {l:?}"),
                _ => spec.to_string(),
            },
            module.display(),
            list()
        ))),
    }
}

/// A value as it goes into a `pkcs11:` URI (see [`TokenSpec`]'s Display).
fn percent(v: &str) -> String {
    TokenSpec {
        serial: Some(v.to_string()),
        ..TokenSpec::default()
    }
    .to_string()
    .trim_start_matches("pkcs11:serial=")
    .to_string()
}
