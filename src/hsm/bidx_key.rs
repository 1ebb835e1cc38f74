//! Blind-index keys: one HMAC key object per key *name*, from which the
//! per-column keys of blind indexes are derived (docs/FORMAT.md section 1
//! and section 6, "Blind indexes"; `crate::columns::blind_index`).
//!
//! - A `CKO_SECRET_KEY` of type `CKK_GENERIC_SECRET`, 32 bytes, generated
//!   in the token with `CKM_GENERIC_SECRET_KEY_GEN`, labelled
//!   `hsmseal-bidx:{name}` ([`bidx_label`]): token, private, sensitive,
//!   never extractable, `CKA_SIGN` true and every other use false,
//!   `CKA_ALLOWED_MECHANISMS = [CKM_SHA256_HMAC]` (the rules of
//!   [`super::hmac_object`]). Checked before use ([`bidx_key_problems`]): a
//!   weaker object is refused (exit 4) naming what is weak; two objects
//!   with the label are refused.
//! - One per name, not per version: `key rotate` must not change index
//!   values, or every lookup would break after a rotation. It is used only
//!   while the name has a usable current version (checked first, as the
//!   KDK is used only after its KWK version), so a key whose versions are
//!   all disabled computes no index.
//! - **Created on first use**, under the exclusive token lock held from
//!   the look-up that found none to the re-check after generation: two
//!   hsmseal processes using a key's indexes for the first time at once
//!   make exactly one object (the second finds the first's). A key made
//!   before blind indexes existed gets one the same way.
//! - Destroyed with the last version of its key (`key destroy` of the only
//!   remaining version, under the same lock as that destroy: see
//!   `super::lifecycle`): crypto-shredding the key shreds the ability to
//!   query its indexes. `key purge` never destroys the current version, so
//!   it never destroys the index key.
//! - The label does not start with `hsmseal:` (the KWK prefix), so the key
//!   scan and version numbering never mistake it for a KWK.

use super::errors::{is_gone, token_error};
use super::hmac_object;
use super::kwk::KeyAttributes;
use super::Hsm;
use crate::backend::KeyBackend;
use crate::error::{Error, Result};
use crate::secret::SecretKey;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;

/// Label prefix of blind-index keys; the key name follows.
pub const BIDX_LABEL_PREFIX: &str = "hsmseal-bidx:";
/// Blind-index key length in bytes.
pub const BIDX_KEY_LEN: u64 = 32;

/// The label of the blind-index key of key `name`.
pub fn bidx_label(name: &str) -> String {
    format!("{BIDX_LABEL_PREFIX}{name}")
}

/// The key name in a blind-index key's label, if it is one.
pub fn parse_bidx_label(label: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(label).ok()?;
    let name = s.strip_prefix(BIDX_LABEL_PREFIX)?;
    crate::backend::validate_key_name(name).ok()?;
    Some(name.to_string())
}

/// The template for `C_GenerateKey(CKM_GENERIC_SECRET_KEY_GEN)`.
pub fn bidx_key_template(name: &str, created_unix: u64) -> Vec<Attribute> {
    hmac_object::template(&bidx_label(name), BIDX_KEY_LEN, false, created_unix)
}

const BIDX_RULES: hmac_object::Rules = hmac_object::Rules {
    min_len: BIDX_KEY_LEN,
    extractable_why:
        "it could leave the HSM, and whoever holds a copy computes the index of any guess offline",
    sign_why: "it cannot compute blind indexes",
    verify_why: None,
    only: "(a blind-index key must only sign)",
};

/// Every way `a` is weaker than an object made by [`bidx_key_template`];
/// empty means usable.
pub fn bidx_key_problems(a: &KeyAttributes) -> Vec<String> {
    hmac_object::problems(a, &BIDX_RULES)
}

impl Hsm {
    /// Every object labelled as the blind-index key of `name`.
    pub(super) fn bidx_objects(&self, admin: &Session, name: &str) -> Result<Vec<ObjectHandle>> {
        let label = bidx_label(name);
        admin
            .find_objects(&[Attribute::Label(label.clone().into_bytes())])
            .map_err(|e| token_error(e, &self.token_label, &format!("looking up {label}")))
    }

    /// The one checked object among `handles`, `None` if there is none, or
    /// why it is refused (weak, duplicated).
    fn checked_bidx(
        &self,
        admin: &Session,
        name: &str,
        handles: &[ObjectHandle],
    ) -> Result<Option<ObjectHandle>> {
        let t = &self.token_label;
        let label = bidx_label(name);
        match handles {
            [] => Ok(None),
            [h] => {
                let problems = bidx_key_problems(&self.read_attributes(admin, *h)?);
                if problems.is_empty() {
                    Ok(Some(*h))
                } else {
                    Err(Error::key(format!(
                        "the blind-index key {label} on token {t:?} is refused: {}",
                        problems.join("; ")
                    )))
                }
            }
            many => Err(Error::key(format!(
                "{} objects on token {t:?} are labelled {label}; hsmseal will not guess which one computes the blind indexes of key {name:?} — remove the ones another tool made",
                many.len()
            ))),
        }
    }

    /// The checked blind-index key of `name` (cached), created if the token
    /// has none (see the module comment for the lock that makes this
    /// happen once).
    fn bidx_handle(&self, name: &str) -> Result<ObjectHandle> {
        if let Some(h) = super::lock(&self.bidx_keys).get(name) {
            return Ok(*h);
        }
        let found = {
            let admin = self.admin_reading()?;
            let handles = self.bidx_objects(&admin, name)?;
            self.checked_bidx(&admin, name, &handles)?
        };
        let h = match found {
            Some(h) => h,
            None => self.create_bidx_key(name)?,
        };
        super::lock(&self.bidx_keys).insert(name.to_string(), h);
        Ok(h)
    }

    /// Creates the blind-index key of `name` unless another process did
    /// since the caller looked: under the exclusive token lock from the
    /// look-up to the re-check of the new label.
    fn create_bidx_key(&self, name: &str) -> Result<ObjectHandle> {
        let admin = self.admin_logged_in()?;
        let t = &self.token_label;
        let label = bidx_label(name);
        if let Some(h) = self.checked_bidx(&admin, name, &self.bidx_objects(&admin, name)?)? {
            return Ok(h);
        }
        let h = admin
            .generate_key(
                &Mechanism::GenericSecretKeyGen,
                &bidx_key_template(name, crate::time::now_unix()),
            )
            .map_err(|e| {
                token_error(
                    e,
                    t,
                    &format!(
                        "generating the blind-index key {label} with CKM_GENERIC_SECRET_KEY_GEN"
                    ),
                )
            })?;
        // Check what the token made, not what we asked for.
        let problems = bidx_key_problems(&self.read_attributes(&admin, h)?);
        let duplicated = self.bidx_objects(&admin, name)?.len() > 1;
        if !problems.is_empty() || duplicated {
            let destroyed = match admin.destroy_object(h) {
                Ok(()) => "it was destroyed",
                Err(_) => "destroying it failed too, remove it by hand",
            };
            return Err(Error::token(if duplicated {
                format!(
                    "another PKCS#11 client created an object labelled {label} on token {t:?} while hsmseal was creating it; {destroyed}. Run the command again"
                )
            } else {
                format!(
                    "token {t:?} did not honour hsmseal's template for the blind-index key {label}: {}; {destroyed}",
                    problems.join("; ")
                )
            }));
        }
        Ok(h)
    }

    /// Destroys the blind-index key of `name` if no version of the key is
    /// left; the caller holds the exclusive token lock (it has just
    /// destroyed versions).
    pub(super) fn destroy_bidx_if_last(&self, admin: &Session, name: &str) -> Result<bool> {
        if self.family(admin, name)?.newest().is_some() {
            return Ok(false);
        }
        let mut destroyed = false;
        for h in self.bidx_objects(admin, name)? {
            match admin.destroy_object(h) {
                Ok(()) => destroyed = true,
                Err(e) if is_gone(&e) => {}
                Err(e) => {
                    return Err(token_error(
                        e,
                        &self.token_label,
                        &format!(
                            "destroying the blind-index key {} (the last version of key {name:?} is destroyed; run the command again to finish)",
                            bidx_label(name)
                        ),
                    ))
                }
            }
        }
        super::lock(&self.bidx_keys).remove(name);
        Ok(destroyed)
    }

    /// `KeyBackend::blind_index_mac` for the HSM: C_Sign with
    /// CKM_SHA256_HMAC under the blind-index key of `name`, after `name`'s
    /// current version passed its check. A stale cached handle is looked up
    /// again once.
    pub(super) fn bidx_mac(&self, name: &str, data: &[u8]) -> Result<SecretKey> {
        let mac = self.hmac_sign(
            data,
            || {
                self.current_version(name)?;
                self.bidx_handle(name).map(Some)
            },
            || {
                super::lock(&self.bidx_keys).remove(name);
                self.forget_current(name);
            },
            &format!("computing a blind-index key with {}", bidx_label(name)),
        )?;
        // `bidx_handle` finds or makes the key, so there always is one.
        mac.ok_or_else(|| Error::token(format!("no {} on the token", bidx_label(name))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::kwk;

    #[test]
    fn bidx_labels_are_not_kwk_or_kdk_labels_and_parse_back() {
        let l = bidx_label("pii");
        assert_eq!(l, "hsmseal-bidx:pii");
        assert!(kwk::parse_label(l.as_bytes()).is_none());
        assert!(kwk::parse_high_water_label(l.as_bytes()).is_none());
        assert_eq!(parse_bidx_label(l.as_bytes()).as_deref(), Some("pii"));
        assert_eq!(parse_bidx_label(b"hsmseal-bidx:a b"), None);
        assert_eq!(parse_bidx_label(b"hsmseal-kdk:pii:v1"), None);
    }

    #[test]
    fn the_template_passes_and_a_verifying_or_extractable_one_is_refused() {
        let mut attrs = bidx_key_template("pii", 0);
        attrs.push(Attribute::AlwaysSensitive(true));
        attrs.push(Attribute::NeverExtractable(true));
        let good = KeyAttributes::from_attributes(&attrs);
        assert!(bidx_key_problems(&good).is_empty());
        let mut a = good.clone();
        a.extractable = Some(true);
        a.verify = Some(true);
        let p = bidx_key_problems(&a).join("; ");
        assert!(
            p.contains("CKA_EXTRACTABLE is true (it could leave the HSM"),
            "{p}"
        );
        assert!(
            p.contains("CKA_VERIFY is true (a blind-index key must only sign)"),
            "{p}"
        );
    }
}
