//! Lists the KDKs and blind-index keys on a token with their checks, for
//! `key list` and `doctor` (reads only, shared token lock), and signs with
//! them ([`Hsm::hmac_sign`]). Apart from
//! [`super::hmac_object`] (the rules) because it needs each object's own
//! check ([`super::kdk`], [`super::bidx_key`]), which use those rules.

use super::errors::{is_gone, is_not_permitted, token_error};
use super::kwk::{KeyAttributes, KeyInfo, KeyState};
use super::Hsm;
use crate::backend::KeyRef;
use crate::error::{Error, Result};
use crate::secret::SecretKey;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// One KDK or blind-index key as found on the token, with its check
/// (`key list`, `doctor`; JSON type `hmac_key`).
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct HmacKeyInfo {
    pub label: String,
    /// `kdk` (key-derivation key of a version) or `blind_index` (of a name).
    pub kind: &'static str,
    pub key: String,
    /// The KWK version a KDK belongs to; `None` for a blind-index key.
    pub version: Option<u32>,
    /// From `CKA_ID` (`label@time`), if it holds one.
    pub created: Option<String>,
    /// Why it is not usable; empty: fine.
    pub problems: Vec<String>,
}

/// Drops the expected "CKA_SIGN is false" of a disabled version's KDK.
fn without_sign_false(problems: Vec<String>) -> Vec<String> {
    problems
        .into_iter()
        .filter(|p| !p.starts_with("CKA_SIGN is false"))
        .collect()
}

impl Hsm {
    /// Every KDK and blind-index key on the token, sorted by label, each
    /// checked against its rules and against the key versions `versions`
    /// (from [`Hsm::list_keys`]): a KDK of a disabled version must not
    /// sign, one whose version is destroyed or a blind-index key whose key
    /// has no version left is an orphan (harmless: nothing uses it; a
    /// repeated `key destroy` removes it).
    pub fn hmac_keys(&self, versions: &[KeyInfo]) -> Result<Vec<HmacKeyInfo>> {
        let admin = self.admin_reading()?;
        let t = &self.token_label;
        let handles = admin
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
            .map_err(|e| token_error(e, t, "searching for HMAC keys"))?;
        let mut found: BTreeMap<String, Vec<HmacKeyInfo>> = BTreeMap::new();
        for h in handles {
            let attrs = match admin.get_attributes(h, &[AttributeType::Label, AttributeType::Id]) {
                Ok(a) => a,
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(token_error(e, t, "reading a key label")),
            };
            let (mut label, mut id) = (None, None);
            for a in attrs {
                match a {
                    Attribute::Label(l) => label = String::from_utf8(l).ok(),
                    Attribute::Id(i) => id = String::from_utf8(i).ok(),
                    _ => {}
                }
            }
            let Some(label) = label else { continue };
            let (kind, key, version) = if let Some(k) = super::kdk::parse_kdk_label(&label) {
                ("kdk", k.name, Some(k.version))
            } else if let Some(name) = super::bidx_key::parse_bidx_label(label.as_bytes()) {
                ("blind_index", name, None)
            } else {
                continue;
            };
            let a = match admin.get_attributes(h, super::kwk::CHECKED_ATTRIBUTES) {
                Ok(a) => KeyAttributes::from_attributes(&a),
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(token_error(e, t, "reading key attributes")),
            };
            let mut problems = Vec::new();
            match version {
                Some(v) => {
                    let state = versions
                        .iter()
                        .find(|k| k.name == key && k.version == v)
                        .map_or(KeyState::Destroyed, |k| k.state);
                    let k = KeyRef {
                        name: key.clone(),
                        version: v,
                    };
                    match state {
                        KeyState::Destroyed => problems.push(format!(
                            "orphan: {k} is destroyed (nothing derives with it; `hsmseal key destroy {} --version {v} --yes` removes it)",
                            k.name
                        )),
                        KeyState::Disabled => {
                            problems = without_sign_false(super::kdk::kdk_problems(&super::kwk::relax_backup(&a)));
                            if a.sign == Some(true) {
                                problems.push(format!(
                                    "{k} is disabled but its KDK can still sign: run `hsmseal key disable {} --version {v}` again",
                                    k.name
                                ));
                            }
                        }
                        _ => problems = super::kdk::kdk_problems(&super::kwk::relax_backup(&a)),
                    }
                }
                None => {
                    problems = super::bidx_key::bidx_key_problems(&a);
                    let live = versions
                        .iter()
                        .any(|k| k.name == key && k.state != KeyState::Destroyed);
                    if !live {
                        problems.push(format!(
                            "orphan: no version of key {key:?} is left (nothing uses it; `hsmseal key destroy` of a destroyed version removes it)"
                        ));
                    }
                }
            }
            let created = id
                .and_then(|i| i.strip_prefix(&format!("{label}@")).map(str::to_string))
                .filter(|c| crate::time::parse_rfc3339(c).is_some());
            found.entry(label.clone()).or_default().push(HmacKeyInfo {
                label,
                kind,
                key,
                version,
                created,
                problems,
            });
        }
        let mut out = Vec::new();
        for (_, mut same) in found {
            let n = same.len();
            if n > 1 {
                for i in &mut same {
                    i.problems.push(format!(
                        "DUPLICATE: {n} objects carry this label; hsmseal uses none of them — remove the ones another tool made"
                    ));
                }
            }
            out.extend(same);
        }
        Ok(out)
    }
}

impl Hsm {
    /// HMAC-SHA256 of `data` by the token (C_Sign, `CKM_SHA256_HMAC`) with
    /// the HMAC object `handle` finds (after whatever check it makes; `None`:
    /// there is none, returned as is). A handle that went stale (the object
    /// was destroyed or replaced by another process, or disabled meanwhile)
    /// is looked up once more after `forget` drops the caches; `what` names
    /// the operation in the error. Shared by the KDK's batch-key derivation
    /// and the blind-index key's per-column key.
    pub(super) fn hmac_sign(
        &self,
        data: &[u8],
        mut handle: impl FnMut() -> Result<Option<ObjectHandle>>,
        forget: impl Fn(),
        what: &str,
    ) -> Result<Option<SecretKey>> {
        let mut retried = false;
        loop {
            let Some(h) = handle()? else {
                return Ok(None);
            };
            let session = self.session()?;
            self.calls.fetch_add(1, Ordering::Relaxed);
            match session.get().sign(&Mechanism::Sha256Hmac, h, data) {
                Ok(mut mac) => {
                    let n = mac.len();
                    return SecretKey::from_slice(&mut mac).map(Some).ok_or_else(|| {
                        Error::token(format!(
                            "C_Sign with CKM_SHA256_HMAC on token {:?} returned {n} bytes, expected 32",
                            self.token_label
                        ))
                    });
                }
                Err(e) => {
                    session.discard();
                    if (is_gone(&e) || is_not_permitted(&e)) && !retried {
                        retried = true;
                        forget();
                        continue;
                    }
                    return Err(token_error(e, &self.token_label, what));
                }
            }
        }
    }
}
