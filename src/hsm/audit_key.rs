//! The audit log's anchors in the token (docs/FORMAT.md section 7): the
//! HMAC key that authenticates every line, and one *head* record per log
//! that holds the last sequence number and line hash, so that cutting lines
//! off the end of a log is detected.
//!
//! - **HMAC key**: a `CKO_SECRET_KEY` of type `CKK_GENERIC_SECRET`, 32 bytes,
//!   generated in the token with `CKM_GENERIC_SECRET_KEY_GEN`, labelled
//!   [`AUDIT_KEY_LABEL`]: token, private, sensitive, never extractable, sign
//!   and verify only, `CKA_ALLOWED_MECHANISMS = [CKM_SHA256_HMAC]`. Checked
//!   before every use ([`audit_key_problems`]), like KWKs are.
//! - **Head**: a `CKO_DATA` object (token, private) labelled
//!   `hsmseal-audit-head:<log id>` whose `CKA_VALUE` is
//!   `v1 <seq> <sha256 hex of the last line> <absolute log path>`
//!   ([`Head::encode`]), rewritten with `C_SetAttributeValue` after every
//!   append. A token that refuses gets a new record and the old one is
//!   destroyed after; a kill between the two leaves two records, of which
//!   the higher seq counts (`crate::audit::current_head`) and the next
//!   append removes the other.
//!
//! Neither label starts with `hsmseal:` (the KWK prefix), so `key list` and
//! the key scan never see these objects.
//!
//! Object management (search, generation, attribute changes) runs on the
//! admin session under the process-wide management lock, like the key
//! lifecycle; `C_Sign`/`C_Verify` run on a pooled session.

use super::errors::{is_gone, rv_of, token_error};
use super::hmac_object;
use super::kwk::KeyAttributes;
use super::Hsm;
use crate::audit::{current_head, AuditBackend, Head};
use crate::error::{Error, Result};
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

/// Label of the audit HMAC key. Deliberately not under `hsmseal:`.
pub const AUDIT_KEY_LABEL: &str = "hsmseal-audit-hmac";
/// Label prefix of head records; the log id follows.
pub const HEAD_LABEL_PREFIX: &str = "hsmseal-audit-head:";
/// `CKA_APPLICATION` of head records.
const HEAD_APPLICATION: &[u8] = b"hsmseal-audit";
/// HMAC key length in bytes.
pub const AUDIT_KEY_LEN: u64 = 32;

/// The template for `C_GenerateKey(CKM_GENERIC_SECRET_KEY_GEN)`.
pub fn audit_key_template(created_unix: u64) -> Vec<Attribute> {
    hmac_object::template(AUDIT_KEY_LABEL, AUDIT_KEY_LEN, true, created_unix)
}

/// What the audit key must be, and why ([`hmac_object::problems`]).
const AUDIT_KEY_RULES: hmac_object::Rules = hmac_object::Rules {
    min_len: AUDIT_KEY_LEN,
    extractable_why: "it could leave the HSM, and whoever holds a copy can rewrite the log",
    sign_why: "it cannot authenticate new entries",
    verify_why: Some("it cannot check entries"),
    only: "(the audit key must only sign and verify)",
};

/// Every way `a` is weaker than a key made by [`audit_key_template`]; empty
/// means usable. A token that does not report `CKA_ALLOWED_MECHANISMS` is
/// accepted (the key can still only sign and verify); one that lists any
/// mechanism besides `CKM_SHA256_HMAC` is not.
pub fn audit_key_problems(a: &KeyAttributes) -> Vec<String> {
    hmac_object::problems(a, &AUDIT_KEY_RULES)
}

/// The label of the head record of log `log_id`.
pub fn head_label(log_id: &str) -> String {
    format!("{HEAD_LABEL_PREFIX}{log_id}")
}

/// What `audit init` found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKeyStatus {
    Created,
    Exists,
}

impl Hsm {
    /// Creates the audit HMAC key unless the token already has one (which
    /// is then checked). Idempotent.
    pub fn create_audit_key(&self) -> Result<AuditKeyStatus> {
        let admin = self.admin_logged_in()?;
        if self.find_audit_key(&admin)?.is_some() {
            return Ok(AuditKeyStatus::Exists);
        }
        let t = &self.token_label;
        let h = admin
            .generate_key(
                &Mechanism::GenericSecretKeyGen,
                &audit_key_template(crate::time::now_unix()),
            )
            .map_err(|e| {
                token_error(
                    e,
                    t,
                    &format!("generating the audit key {AUDIT_KEY_LABEL} with CKM_GENERIC_SECRET_KEY_GEN"),
                )
            })?;
        // Check what the token made, not what we asked for.
        let problems = audit_key_problems(&self.read_attributes(&admin, h)?);
        if !problems.is_empty() {
            let destroyed = match admin.destroy_object(h) {
                Ok(()) => "it was destroyed",
                Err(_) => "destroying it failed too, remove it by hand",
            };
            return Err(Error::token(format!(
                "token {t:?} did not honour hsmseal's template for the audit key {AUDIT_KEY_LABEL}: {}; {destroyed}",
                problems.join("; ")
            )));
        }
        *super::lock(&self.audit_key) = Some(h);
        Ok(AuditKeyStatus::Created)
    }

    /// The audit key's handle if the token has one, after checking its
    /// attributes (refused with a key error naming the weak attributes).
    fn find_audit_key(&self, admin: &Session) -> Result<Option<ObjectHandle>> {
        let t = &self.token_label;
        let handles = admin
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(AUDIT_KEY_LABEL.as_bytes().to_vec()),
            ])
            .map_err(|e| token_error(e, t, "looking up the audit key"))?;
        let h = match handles.as_slice() {
            [] => return Ok(None),
            [h] => *h,
            many => {
                return Err(Error::key(format!(
                    "{} objects on token {t:?} are labelled {AUDIT_KEY_LABEL}; hsmseal will not guess which one authenticates the audit log — remove the duplicates",
                    many.len()
                )))
            }
        };
        let problems = audit_key_problems(&self.read_attributes(admin, h)?);
        if !problems.is_empty() {
            return Err(Error::key(format!(
                "the audit key {AUDIT_KEY_LABEL} on token {t:?} is refused: {}",
                problems.join("; ")
            )));
        }
        Ok(Some(h))
    }

    /// The audit key's handle (cached for this `Hsm`'s life), or a key
    /// error saying how to create it.
    fn audit_key_handle(&self) -> Result<ObjectHandle> {
        if let Some(h) = *super::lock(&self.audit_key) {
            return Ok(h);
        }
        let admin = self.admin_logged_in()?;
        let h = self.find_audit_key(&admin)?.ok_or_else(|| {
            Error::key(format!(
                "no audit key ({AUDIT_KEY_LABEL}) on token {:?}: run `hsmseal audit init` (a log written with another token's key cannot be checked here)",
                self.token_label
            ))
        })?;
        *super::lock(&self.audit_key) = Some(h);
        Ok(h)
    }

    /// Every head record: (object, label, value).
    fn head_objects(&self, admin: &Session) -> Result<Vec<(ObjectHandle, String, Vec<u8>)>> {
        let t = &self.token_label;
        let handles = admin
            .find_objects(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Application(HEAD_APPLICATION.to_vec()),
            ])
            .map_err(|e| token_error(e, t, "searching for audit head records"))?;
        let mut out = Vec::new();
        for h in handles {
            let attrs = match admin.get_attributes(h, &[AttributeType::Label, AttributeType::Value])
            {
                Ok(a) => a,
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(token_error(e, t, "reading an audit head record")),
            };
            let mut label = None;
            let mut value = None;
            for a in attrs {
                match a {
                    Attribute::Label(l) => label = String::from_utf8(l).ok(),
                    Attribute::Value(v) => value = Some(v),
                    _ => {}
                }
            }
            if let (Some(l), Some(v)) = (label, value) {
                if l.starts_with(HEAD_LABEL_PREFIX) {
                    out.push((h, l, v));
                }
            }
        }
        Ok(out)
    }
}

impl AuditBackend for Hsm {
    fn check_audit_key(&self) -> Result<()> {
        self.audit_key_handle().map(|_| ())
    }

    fn audit_mac(&self, data: &[u8]) -> Result<[u8; 32]> {
        let h = self.audit_key_handle()?;
        let session = self.session()?;
        let mac = session
            .get()
            .sign(&Mechanism::Sha256Hmac, h, data)
            .map_err(|e| {
                token_error(
                    e,
                    &self.token_label,
                    "authenticating an audit entry (C_Sign with CKM_SHA256_HMAC)",
                )
            })?;
        mac.try_into().map_err(|m: Vec<u8>| {
            Error::token(format!(
                "C_Sign with CKM_SHA256_HMAC on token {:?} returned {} bytes, expected 32",
                self.token_label,
                m.len()
            ))
        })
    }

    fn audit_check_mac(&self, data: &[u8], mac: &[u8; 32]) -> Result<bool> {
        let h = self.audit_key_handle()?;
        let session = self.session()?;
        match session.get().verify(&Mechanism::Sha256Hmac, h, data, mac) {
            Ok(()) => Ok(true),
            Err(e)
                if matches!(
                    rv_of(&e),
                    Some(RvError::SignatureInvalid | RvError::SignatureLenRange)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(token_error(
                e,
                &self.token_label,
                "checking an audit entry (C_Verify with CKM_SHA256_HMAC)",
            )),
        }
    }

    fn audit_head(&self, log_id: &str) -> Result<Option<Head>> {
        let admin = self.admin_logged_in()?;
        let records = self.heads_of(&admin, log_id)?;
        self.current(log_id, records).map(|c| c.map(|(_, h)| h))
    }

    /// Updates the current head record of `log_id` in place, or, on a token
    /// that refuses to change `CKA_VALUE` (or under the test hook), creates
    /// a new record and then destroys the old ones. A kill between the two
    /// leaves two records; the higher seq counts ([`current_head`]) and the
    /// next append destroys the stale one. So a failed destroy of a stale
    /// record is harmless, and is retried at the next append.
    fn set_audit_head(&self, log_id: &str, head: &Head) -> Result<()> {
        let admin = self.admin_logged_in()?;
        let t = &self.token_label;
        let label = head_label(log_id);
        let value = head.encode();
        let records = self.heads_of(&admin, log_id)?;
        let current = self.current(log_id, records.clone())?.map(|(h, _)| h);
        let stale = |keep: Option<ObjectHandle>| {
            records
                .iter()
                .map(|(h, _)| *h)
                .filter(move |h| Some(*h) != keep)
        };
        if let Some(h) = current.filter(|_| !crate::audit::faults::replace_head()) {
            match admin.update_attributes(h, &[Attribute::Value(value.clone())]) {
                Ok(()) => {
                    for old in stale(Some(h)) {
                        let _ = admin.destroy_object(old);
                    }
                    return Ok(());
                }
                // A token that will not change CKA_VALUE of a data
                // object: replace the object instead (below).
                Err(e)
                    if matches!(
                        rv_of(&e),
                        Some(RvError::AttributeReadOnly | RvError::ActionProhibited)
                    ) => {}
                Err(e) => {
                    return Err(token_error(
                        e,
                        t,
                        &format!("updating the audit head record {label}"),
                    ))
                }
            }
        }
        admin
            .create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Modifiable(true),
                Attribute::Label(label.clone().into_bytes()),
                Attribute::Application(HEAD_APPLICATION.to_vec()),
                Attribute::Value(value),
            ])
            .map_err(|e| token_error(e, t, &format!("creating the audit head record {label}")))?;
        crate::audit::faults::after("head-created");
        for old in stale(None) {
            let _ = admin.destroy_object(old);
        }
        Ok(())
    }

    fn audit_heads_for_path(&self, path: &str) -> Result<Vec<(String, Head)>> {
        let admin = self.admin_logged_in()?;
        let mut by_log: std::collections::BTreeMap<String, Vec<Head>> = Default::default();
        for (_, l, v) in self.head_objects(&admin)? {
            let (Some(head), Some(id)) = (Head::decode(&v), l.strip_prefix(HEAD_LABEL_PREFIX))
            else {
                continue;
            };
            by_log.entry(id.to_string()).or_default().push(head);
        }
        Ok(by_log
            .into_iter()
            .filter_map(|(id, heads)| {
                let head = current_head(heads).ok()??;
                (head.path == path).then_some((id, head))
            })
            .collect())
    }
}

impl Hsm {
    /// The head records of `log_id`, decoded: (object, head).
    fn heads_of(&self, admin: &Session, log_id: &str) -> Result<Vec<(ObjectHandle, Head)>> {
        let label = head_label(log_id);
        let mut out = Vec::new();
        for (h, l, v) in self.head_objects(admin)? {
            if l == label {
                let head = Head::decode(&v).ok_or_else(|| {
                    Error::integrity(format!(
                        "the audit head record {label} on token {:?} has an unreadable value",
                        self.token_label
                    ))
                })?;
                out.push((h, head));
            }
        }
        Ok(out)
    }

    /// The record that counts among `records` of `log_id` ([`current_head`]).
    fn current(
        &self,
        log_id: &str,
        records: Vec<(ObjectHandle, Head)>,
    ) -> Result<Option<(ObjectHandle, Head)>> {
        let heads = records.iter().map(|(_, h)| h.clone()).collect();
        let top = current_head(heads).map_err(|why| {
            Error::integrity(format!(
                "audit head records {} on token {:?}: {why}; hsmseal will not guess which one holds the log's end — check the log with `hsmseal audit verify` and remove the wrong record with the vendor's tool",
                head_label(log_id),
                self.token_label
            ))
        })?;
        Ok(top.and_then(|top| records.into_iter().find(|(_, h)| *h == top)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::kwk;
    use cryptoki::mechanism::MechanismType;
    use cryptoki::object::KeyType;

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
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::AllowedMechanisms(vec![MechanismType::SHA256_HMAC]),
        ])
    }

    #[test]
    fn the_template_key_has_no_problems_and_weak_ones_are_named() {
        assert!(audit_key_problems(&good()).is_empty());
        let mut a = good();
        a.extractable = Some(true);
        let p = audit_key_problems(&a).join("; ");
        assert!(p.contains("CKA_EXTRACTABLE is true"), "{p}");
        let mut a = good();
        a.decrypt = Some(true);
        a.allowed_mechanisms = Some(vec!["CKM_SHA256_HMAC".into(), "CKM_AES_ECB".into()]);
        let p = audit_key_problems(&a).join("; ");
        assert!(p.contains("CKA_DECRYPT is true"), "{p}");
        assert!(p.contains("allows CKM_AES_ECB"), "{p}");
        let mut a = good();
        a.key_type = Some(KeyType::AES.to_string());
        assert!(audit_key_problems(&a).join(";").contains("CKA_KEY_TYPE"));
    }

    #[test]
    fn audit_labels_are_not_kwk_labels() {
        assert!(kwk::parse_label(AUDIT_KEY_LABEL.as_bytes()).is_none());
        let l = head_label("0123456789abcdef0123456789abcdef");
        assert!(kwk::parse_label(l.as_bytes()).is_none());
        assert!(kwk::parse_high_water_label(l.as_bytes()).is_none());
        assert!(!AUDIT_KEY_LABEL.starts_with(kwk::LABEL_PREFIX));
    }
}
