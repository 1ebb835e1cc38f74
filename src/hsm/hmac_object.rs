//! The one template and attribute check of hsmseal's HMAC key objects: the
//! audit key ([`super::audit_key`]), the key-derivation key of each KWK
//! version ([`super::kdk`]) and the blind-index key of each key name
//! ([`super::bidx_key`]); docs/FORMAT.md sections 1, 6 and 7.3.
//!
//! Invariants shared by all three:
//! - `CKO_SECRET_KEY`, `CKK_GENERIC_SECRET`, at least [`Rules::min_len`]
//!   bytes, generated in the token (`CKM_GENERIC_SECRET_KEY_GEN`), token,
//!   private, sensitive and always sensitive, never extractable;
//! - `CKA_SIGN` true, `CKA_VERIFY` true only where the caller needs it (the
//!   audit key checks its own MACs), every other use (encrypt, decrypt,
//!   wrap, unwrap, derive) false: one purpose per object;
//! - `CKA_ALLOWED_MECHANISMS` lists `CKM_SHA256_HMAC` only (a token that
//!   does not report the attribute is accepted: the usage flags still
//!   restrict the key to signing).
//!
//! Each caller keeps its own "why" texts ([`Rules`]), so a refusal says
//! what the weakness costs for that object.
//!
//! Only rules and templates live here, so the objects' own modules can use
//! them; listing the objects on a token is [`super::hmac_keys`].

use super::kwk::KeyAttributes;
use cryptoki::mechanism::MechanismType;
use cryptoki::object::{Attribute, KeyType, ObjectClass};

/// What differs between hsmseal's HMAC objects: whether they verify, and
/// the reasons a refusal gives.
pub struct Rules<'a> {
    /// Smallest acceptable `CKA_VALUE_LEN`.
    pub min_len: u64,
    /// Why an extractable object is refused.
    pub extractable_why: &'a str,
    /// Why an object that cannot sign is refused.
    pub sign_why: &'a str,
    /// `Some(why)`: `CKA_VERIFY` must be true (why it is refused if not);
    /// `None`: it must be false, like the other usages.
    pub verify_why: Option<&'a str>,
    /// Said of every forbidden usage that is true, e.g. "(a key-derivation
    /// key must only sign)".
    pub only: &'a str,
}

/// The template for `C_GenerateKey(CKM_GENERIC_SECRET_KEY_GEN)`: an object
/// labelled `label` whose `CKA_ID` is `label@<RFC 3339 creation time>`
/// (docs/FORMAT.md section 1, "Creation time").
pub fn template(label: &str, len: u64, verify: bool, created_unix: u64) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(len.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(verify),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::SHA256_HMAC]),
        Attribute::Id(format!("{label}@{}", crate::time::rfc3339(created_unix)).into_bytes()),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// Every way `a` is weaker than an object made by [`template`] under
/// `rules`; empty means usable. In this order: class, key type, length,
/// the required attributes, the forbidden usages, the mechanisms.
pub fn problems(a: &KeyAttributes, rules: &Rules) -> Vec<String> {
    let mut p = Vec::new();
    check_kind(a, rules.min_len, &mut p);
    check_required(a, rules, &mut p);
    check_forbidden(a, rules, &mut p);
    check_only_mechanism(a, &mut p);
    p
}

/// Class `CKO_SECRET_KEY`, type `CKK_GENERIC_SECRET`, at least `min_len`
/// bytes.
pub fn check_kind(a: &KeyAttributes, min_len: u64, p: &mut Vec<String>) {
    let secret_key = ObjectClass::SECRET_KEY.to_string();
    let generic = KeyType::GENERIC_SECRET.to_string();
    match &a.class {
        Some(c) if *c == secret_key => {}
        Some(c) => p.push(format!("CKA_CLASS is {c}, not {secret_key}")),
        None => p.push("CKA_CLASS could not be read".to_string()),
    }
    match &a.key_type {
        Some(t) if *t == generic => {}
        Some(t) => p.push(format!("CKA_KEY_TYPE is {t}, not {generic}")),
        None => p.push("CKA_KEY_TYPE could not be read".to_string()),
    }
    match a.value_len {
        Some(n) if n >= min_len => {}
        Some(n) => p.push(format!(
            "CKA_VALUE_LEN is {n} bytes (at least {min_len} are required)"
        )),
        None => p.push("CKA_VALUE_LEN could not be read".to_string()),
    }
}

/// The attributes that must have one value (an unreadable one is a
/// problem too).
pub fn check_required(a: &KeyAttributes, rules: &Rules, p: &mut Vec<String>) {
    let mut required: Vec<(&str, Option<bool>, bool, &str)> = vec![
        (
            "CKA_TOKEN",
            a.token,
            true,
            "it would vanish with the session",
        ),
        (
            "CKA_PRIVATE",
            a.private,
            true,
            "it is usable without logging in",
        ),
        (
            "CKA_SENSITIVE",
            a.sensitive,
            true,
            "its value can be read out of the HSM",
        ),
        (
            "CKA_ALWAYS_SENSITIVE",
            a.always_sensitive,
            true,
            "its value was readable at some point",
        ),
        (
            "CKA_EXTRACTABLE",
            a.extractable,
            false,
            rules.extractable_why,
        ),
        (
            "CKA_NEVER_EXTRACTABLE",
            a.never_extractable,
            true,
            "it may have left the HSM before",
        ),
        ("CKA_SIGN", a.sign, true, rules.sign_why),
    ];
    if let Some(why) = rules.verify_why {
        required.push(("CKA_VERIFY", a.verify, true, why));
    }
    for (attr, value, want, why) in required {
        match value {
            Some(v) if v == want => {}
            Some(v) => p.push(format!("{attr} is {v} ({why})")),
            None => p.push(format!("{attr} could not be read")),
        }
    }
}

/// The usages that must not be true (not reported: not a problem, the
/// token would refuse the use anyway).
pub fn check_forbidden(a: &KeyAttributes, rules: &Rules, p: &mut Vec<String>) {
    let verify = rules
        .verify_why
        .is_none()
        .then_some(("CKA_VERIFY", a.verify));
    for (attr, value) in verify.into_iter().chain([
        ("CKA_ENCRYPT", a.encrypt),
        ("CKA_DECRYPT", a.decrypt),
        ("CKA_WRAP", a.wrap),
        ("CKA_UNWRAP", a.unwrap),
        ("CKA_DERIVE", a.derive),
    ]) {
        if value == Some(true) {
            p.push(format!("{attr} is true {}", rules.only));
        }
    }
}

/// `CKA_ALLOWED_MECHANISMS`, if reported, lists `CKM_SHA256_HMAC` only.
pub fn check_only_mechanism(a: &KeyAttributes, p: &mut Vec<String>) {
    let hmac = MechanismType::SHA256_HMAC.to_string();
    if let Some(m) = &a.allowed_mechanisms {
        let extra: Vec<&str> = m
            .iter()
            .filter(|x| **x != hmac)
            .map(String::as_str)
            .collect();
        if !extra.is_empty() {
            p.push(format!(
                "CKA_ALLOWED_MECHANISMS allows {} (only {hmac} is accepted)",
                extra.join(", ")
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        min_len: 32,
        extractable_why: "X",
        sign_why: "S",
        verify_why: None,
        only: "(only signs)",
    };

    /// What a token would report for `template`.
    fn made(verify: bool) -> KeyAttributes {
        let mut attrs = template("l", 32, verify, 0);
        attrs.push(Attribute::AlwaysSensitive(true));
        attrs.push(Attribute::NeverExtractable(true));
        KeyAttributes::from_attributes(&attrs)
    }

    #[test]
    fn the_template_passes_its_own_check_and_each_weakness_is_named_with_its_why() {
        assert!(problems(&made(false), &RULES).is_empty());
        let verifying = Rules {
            verify_why: Some("V"),
            ..RULES
        };
        assert!(problems(&made(true), &verifying).is_empty());
        // Verify is forbidden or required, by the rules.
        assert_eq!(
            problems(&made(true), &RULES),
            ["CKA_VERIFY is true (only signs)"]
        );
        assert_eq!(
            problems(&made(false), &verifying),
            ["CKA_VERIFY is false (V)"]
        );
        let mut a = made(false);
        a.extractable = Some(true);
        a.sign = Some(false);
        a.derive = Some(true);
        a.token = None;
        a.allowed_mechanisms = Some(vec!["CKM_SHA256_HMAC".into(), "CKM_AES_ECB".into()]);
        assert_eq!(
            problems(&a, &RULES),
            [
                "CKA_TOKEN could not be read",
                "CKA_EXTRACTABLE is true (X)",
                "CKA_SIGN is false (S)",
                "CKA_DERIVE is true (only signs)",
                "CKA_ALLOWED_MECHANISMS allows CKM_AES_ECB (only CKM_SHA256_HMAC is accepted)",
            ]
        );
        let mut a = made(false);
        a.value_len = Some(16);
        a.key_type = Some(KeyType::AES.to_string());
        let p = problems(&a, &RULES).join("; ");
        assert!(p.contains("CKA_KEY_TYPE is CKK_AES"), "{p}");
        assert!(p.contains("CKA_VALUE_LEN is 16 bytes"), "{p}");
        // Not reporting the mechanisms is accepted.
        let mut a = made(false);
        a.allowed_mechanisms = None;
        assert!(problems(&a, &RULES).is_empty());
    }
}
