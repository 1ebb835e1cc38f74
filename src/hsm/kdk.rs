//! Key-derivation keys (KDKs): one HMAC key object beside each KWK version,
//! from which the batch keys of version-2 column tokens are derived
//! (docs/FORMAT.md sections 1 and 6).
//!
//! - A KDK is a `CKO_SECRET_KEY` of type `CKK_GENERIC_SECRET`, 32 bytes,
//!   generated in the token with `CKM_GENERIC_SECRET_KEY_GEN`, labelled
//!   `hsmseal-kdk:{name}:v{version}` ([`kdk_label`]): token, private,
//!   sensitive, never extractable, `CKA_SIGN` true and every other use
//!   (verify, encrypt, decrypt, wrap, unwrap, derive) false,
//!   `CKA_ALLOWED_MECHANISMS = [CKM_SHA256_HMAC]`. One purpose: batch key
//!   derivation. Checked before every use ([`kdk_problems`]); a weaker
//!   object is refused, naming what is weak.
//! - It lives and dies with its KWK version: made right after it by
//!   `key create`/`key rotate` and destroyed right after it by
//!   `key destroy`/`key purge`, under the same exclusive token lock
//!   (`super::lifecycle`). hsmseal derives with it only after the KWK
//!   version passed its own check ([`Hsm::resolve`]): a disabled, weak or
//!   destroyed version derives nothing, so crypto-shredding a version
//!   shreds its v2 tokens too.
//! - A version made before token v2 has no KDK: `derive` answers `None`
//!   and sealing writes v1 tokens under it (a new version from
//!   `key rotate` has one).
//! - The label does not start with `hsmseal:` (the KWK prefix), so the key
//!   scan, `key list` and version numbering never mistake a KDK for a KWK.

use super::errors::{is_gone, token_error};
use super::hmac_object;
use super::kwk::{self, KeyAttributes};
use super::Hsm;
use crate::backend::KeyRef;
use crate::error::{Error, Result};
use crate::secret::SecretKey;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;

/// Label prefix of KDKs; `{name}:v{version}` follows.
pub const KDK_LABEL_PREFIX: &str = "hsmseal-kdk:";
/// KDK length in bytes.
pub const KDK_LEN: u64 = 32;

/// The label of the KDK of `name` version `version`.
pub fn kdk_label(name: &str, version: u32) -> String {
    format!("{KDK_LABEL_PREFIX}{name}:v{version}")
}

/// The key version in a KDK's label, if it is one.
pub fn parse_kdk_label(label: &str) -> Option<KeyRef> {
    let rest = label.strip_prefix(KDK_LABEL_PREFIX)?;
    let (name, v) = rest.rsplit_once(":v")?;
    crate::backend::validate_key_name(name).ok()?;
    let version = super::kwk::parse_version(v)?;
    (kdk_label(name, version) == label).then(|| KeyRef {
        name: name.to_string(),
        version,
    })
}

/// The template for `C_GenerateKey(CKM_GENERIC_SECRET_KEY_GEN)`.
pub fn kdk_template(name: &str, version: u32, created_unix: u64) -> Vec<Attribute> {
    hmac_object::template(&kdk_label(name, version), KDK_LEN, false, created_unix)
}

/// What a KDK must be, and why ([`hmac_object::problems`]).
const KDK_RULES: hmac_object::Rules = hmac_object::Rules {
    min_len: KDK_LEN,
    extractable_why:
        "it could leave the HSM, and whoever holds a copy derives every batch key of its version",
    sign_why: "it cannot derive batch keys",
    verify_why: None,
    only: "(a key-derivation key must only sign)",
};

/// Every way `a` is weaker than a KDK made by [`kdk_template`]; empty means
/// usable. A token that does not report `CKA_ALLOWED_MECHANISMS` is
/// accepted (the key can still only sign); one that lists any mechanism
/// besides `CKM_SHA256_HMAC` is not.
pub fn kdk_problems(a: &KeyAttributes) -> Vec<String> {
    hmac_object::problems(a, &KDK_RULES)
}

impl Hsm {
    /// Generates the KDK of `k` and checks what the token made; the caller
    /// holds the exclusive token lock (it has just made the KWK `k`).
    /// Returns the new object, or an error after destroying it.
    /// With `backup`, the KDK is backup-capable like its KWK
    /// (`kwk::make_backup_capable`).
    pub(super) fn generate_kdk(
        &self,
        admin: &Session,
        k: &KeyRef,
        backup: bool,
    ) -> Result<ObjectHandle> {
        let t = &self.token_label;
        let label = kdk_label(&k.name, k.version);
        let mut template = kdk_template(&k.name, k.version, crate::time::now_unix());
        if backup {
            kwk::make_backup_capable(&mut template);
        }
        let h = admin
            .generate_key(&Mechanism::GenericSecretKeyGen, &template)
            .map_err(|e| {
                token_error(
                    e,
                    t,
                    &format!(
                        "generating the key-derivation key {label} with CKM_GENERIC_SECRET_KEY_GEN"
                    ),
                )
            })?;
        let problems = kdk_problems(&kwk::relax_backup(&self.read_attributes(admin, h)?));
        if !problems.is_empty() {
            let destroyed = match admin.destroy_object(h) {
                Ok(()) => "it was destroyed",
                Err(_) => "destroying it failed too, remove it by hand",
            };
            return Err(Error::token(format!(
                "token {t:?} did not honour hsmseal's template for the key-derivation key {label}: {}; {destroyed}",
                problems.join("; ")
            )));
        }
        Ok(h)
    }

    /// Every object labelled as the KDK of `k`.
    pub(super) fn kdk_objects(&self, admin: &Session, k: &KeyRef) -> Result<Vec<ObjectHandle>> {
        let label = kdk_label(&k.name, k.version);
        admin
            .find_objects(&[Attribute::Label(label.clone().into_bytes())])
            .map_err(|e| token_error(e, &self.token_label, &format!("looking up {label}")))
    }

    /// Destroys the KDK(s) of `k` (none is fine: a version made before
    /// token v2, or already destroyed). The caller holds the exclusive
    /// token lock.
    pub(super) fn destroy_kdk(&self, admin: &Session, k: &KeyRef) -> Result<()> {
        for h in self.kdk_objects(admin, k)? {
            match admin.destroy_object(h) {
                Ok(()) => {}
                Err(e) if is_gone(&e) => {}
                Err(e) => {
                    return Err(token_error(
                        e,
                        &self.token_label,
                        &format!(
                            "destroying the key-derivation key {} (key {k} itself is destroyed; run the command again to finish)",
                            kdk_label(&k.name, k.version)
                        ),
                    ))
                }
            }
        }
        super::lock(&self.kdks).remove(k);
        Ok(())
    }

    /// The checked KDK of `k` (cached), `None` if it has none, or an error
    /// naming what is wrong with it (weak, duplicated).
    fn kdk_handle(&self, k: &KeyRef) -> Result<Option<ObjectHandle>> {
        if let Some(h) = super::lock(&self.kdks).get(k) {
            return Ok(*h);
        }
        let admin = self.admin_reading()?;
        let t = &self.token_label;
        let label = kdk_label(&k.name, k.version);
        let h = match self.kdk_objects(&admin, k)?.as_slice() {
            [] => None,
            [h] => {
                let problems = kdk_problems(&kwk::relax_backup(&self.read_attributes(&admin, *h)?));
                if !problems.is_empty() {
                    return Err(Error::key(format!(
                        "the key-derivation key {label} on token {t:?} is refused: {}",
                        problems.join("; ")
                    )));
                }
                Some(*h)
            }
            many => {
                return Err(Error::key(format!(
                    "{} objects on token {t:?} are labelled {label}; hsmseal will not guess which one derives the batch keys of {k} — remove the ones another tool made",
                    many.len()
                )))
            }
        };
        super::lock(&self.kdks).insert(k.clone(), h);
        Ok(h)
    }

    /// `KeyBackend::derive` for the HSM: C_Sign with CKM_SHA256_HMAC under
    /// the KDK of `kwk`, after `kwk` itself passed its check (so a disabled
    /// or destroyed version derives nothing). A stale cached handle is
    /// looked up again once.
    pub(super) fn derive_with_kdk(&self, kwk: &KeyRef, data: &[u8]) -> Result<Option<SecretKey>> {
        self.hmac_sign(
            data,
            || {
                self.resolve(kwk)?;
                self.kdk_handle(kwk)
            },
            || {
                super::lock(&self.kdks).remove(kwk);
                self.evict(kwk);
            },
            &format!("deriving a batch key with the key-derivation key of {kwk}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::kwk;
    use cryptoki::mechanism::MechanismType;
    use cryptoki::object::{KeyType, ObjectClass};

    fn good() -> KeyAttributes {
        KeyAttributes::from_attributes(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen(32u64.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::AlwaysSensitive(true),
            Attribute::Extractable(false),
            Attribute::NeverExtractable(true),
            Attribute::Sign(true),
            Attribute::Verify(false),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::AllowedMechanisms(vec![MechanismType::SHA256_HMAC]),
        ])
    }

    #[test]
    fn the_template_kdk_has_no_problems_and_weak_ones_are_named() {
        assert!(kdk_problems(&good()).is_empty());
        for (what, f) in [
            (
                "CKA_EXTRACTABLE is true",
                &(|a: &mut KeyAttributes| a.extractable = Some(true))
                    as &dyn Fn(&mut KeyAttributes),
            ),
            ("CKA_VERIFY is true", &|a: &mut KeyAttributes| {
                a.verify = Some(true)
            }),
            ("CKA_DECRYPT is true", &|a: &mut KeyAttributes| {
                a.decrypt = Some(true)
            }),
            ("CKA_SIGN is false", &|a: &mut KeyAttributes| {
                a.sign = Some(false)
            }),
            ("allows CKM_AES_ECB", &|a: &mut KeyAttributes| {
                a.allowed_mechanisms = Some(vec!["CKM_SHA256_HMAC".into(), "CKM_AES_ECB".into()])
            }),
            ("CKA_VALUE_LEN is 16", &|a: &mut KeyAttributes| {
                a.value_len = Some(16)
            }),
        ] {
            let mut a = good();
            f(&mut a);
            let p = kdk_problems(&a).join("; ");
            assert!(p.contains(what), "{what}: {p}");
        }
    }

    #[test]
    fn kdk_labels_are_not_kwk_labels() {
        let l = kdk_label("pii", 3);
        assert_eq!(l, "hsmseal-kdk:pii:v3");
        assert_eq!(
            parse_kdk_label(&l),
            Some(KeyRef {
                name: "pii".into(),
                version: 3
            })
        );
        for bad in [
            "hsmseal-kdk:pii:v03",
            "hsmseal-kdk:pii",
            "hsmseal-kdk::v1",
            "hsmseal:pii:v1",
        ] {
            assert_eq!(parse_kdk_label(bad), None, "{bad}");
        }
        assert!(kwk::parse_label(l.as_bytes()).is_none());
        assert!(kwk::parse_high_water_label(l.as_bytes()).is_none());
    }
}
