//! KWK objects on the token: how they are labelled, the template they are
//! generated with, and the attribute check every key passes before use.
//!
//! A KWK version is one AES-256 secret key object whose `CKA_LABEL` and
//! `CKA_ID` are both `hsmseal:{name}:v{version}`. Versions of a name are
//! separate objects, so retiring one never touches the others.
//!
//! Invariant: hsmseal never wraps or unwraps with a key for which
//! [`problems`] returns anything. The check is done on the attributes the
//! token reports, not on what we asked for at generation time, so a key
//! created by another tool (or a token that silently ignored part of our
//! template) is caught the same way.

use crate::keys::{validate_key_name, KeyRef};
use cryptoki::mechanism::MechanismType;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::types::Date;
use serde::Serialize;

/// Every label hsmseal gives a key starts with this.
pub const LABEL_PREFIX: &str = "hsmseal:";

/// KWK length in bytes (AES-256).
pub const KWK_LEN: u64 = 32;

/// One version of a named KWK as found on the token.
#[derive(Serialize, Clone, Debug)]
pub struct KeyInfo {
    pub name: String,
    pub version: u32,
    /// `hsmseal:{name}:v{version}`.
    pub label: String,
    /// `YYYY-MM-DD` from `CKA_START_DATE`, if the token recorded one.
    pub created: Option<String>,
    pub attributes: KeyAttributes,
    /// Why this key is weaker than hsmseal requires; empty means usable.
    pub problems: Vec<String>,
}

impl KeyInfo {
    pub fn key_ref(&self) -> KeyRef {
        KeyRef {
            name: self.name.clone(),
            version: self.version,
        }
    }
    /// True when hsmseal will use this key.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The security-relevant attributes of a key object, as the token reports
/// them. `None` means the token did not return the attribute (not defined
/// for the object, or unreadable).
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyAttributes {
    /// `CKO_SECRET_KEY`, ...
    pub class: Option<String>,
    /// `CKK_AES`, ...
    pub key_type: Option<String>,
    /// Key length in bytes.
    pub value_len: Option<u64>,
    pub token: Option<bool>,
    pub private: Option<bool>,
    pub sensitive: Option<bool>,
    pub always_sensitive: Option<bool>,
    pub extractable: Option<bool>,
    pub never_extractable: Option<bool>,
    pub encrypt: Option<bool>,
    pub decrypt: Option<bool>,
    pub wrap: Option<bool>,
    pub unwrap: Option<bool>,
    pub sign: Option<bool>,
    pub verify: Option<bool>,
    pub derive: Option<bool>,
    /// `CKA_ALLOWED_MECHANISMS`; an empty list means "no restriction" in
    /// PKCS#11, the same as the attribute being absent.
    pub allowed_mechanisms: Option<Vec<String>>,
    /// `CKA_START_DATE` as `YYYY-MM-DD`.
    pub start_date: Option<String>,
}

/// The attributes the security check needs, fetched in one
/// `C_GetAttributeValue`. `CKA_START_DATE` is not among them: it is only
/// informational, and SoftHSM2 (2.6.1 and earlier) fails the whole call with
/// `CKR_GENERAL_ERROR` when it is requested from a private object (it stores
/// the date in clear but tries to decrypt it on read; SoftHSMv2 issues #655
/// and #804). It is read on its own, failures tolerated.
pub(crate) const CHECKED_ATTRIBUTES: &[AttributeType] = &[
    AttributeType::Class,
    AttributeType::KeyType,
    AttributeType::ValueLen,
    AttributeType::Token,
    AttributeType::Private,
    AttributeType::Sensitive,
    AttributeType::AlwaysSensitive,
    AttributeType::Extractable,
    AttributeType::NeverExtractable,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Sign,
    AttributeType::Verify,
    AttributeType::Derive,
    AttributeType::AllowedMechanisms,
];

impl KeyAttributes {
    /// Collects what `C_GetAttributeValue` returned; unknown ones are ignored.
    pub fn from_attributes(attrs: &[Attribute]) -> KeyAttributes {
        let mut k = KeyAttributes::default();
        for a in attrs {
            match a {
                Attribute::Class(c) => k.class = Some(c.to_string()),
                Attribute::KeyType(t) => k.key_type = Some(t.to_string()),
                Attribute::ValueLen(n) => k.value_len = Some(u64::from(*n)),
                Attribute::Token(b) => k.token = Some(*b),
                Attribute::Private(b) => k.private = Some(*b),
                Attribute::Sensitive(b) => k.sensitive = Some(*b),
                Attribute::AlwaysSensitive(b) => k.always_sensitive = Some(*b),
                Attribute::Extractable(b) => k.extractable = Some(*b),
                Attribute::NeverExtractable(b) => k.never_extractable = Some(*b),
                Attribute::Encrypt(b) => k.encrypt = Some(*b),
                Attribute::Decrypt(b) => k.decrypt = Some(*b),
                Attribute::Wrap(b) => k.wrap = Some(*b),
                Attribute::Unwrap(b) => k.unwrap = Some(*b),
                Attribute::Sign(b) => k.sign = Some(*b),
                Attribute::Verify(b) => k.verify = Some(*b),
                Attribute::Derive(b) => k.derive = Some(*b),
                Attribute::AllowedMechanisms(m) => {
                    k.allowed_mechanisms = Some(m.iter().map(|m| m.to_string()).collect())
                }
                Attribute::StartDate(d) => k.start_date = date_string(d),
                _ => {}
            }
        }
        k
    }
}

/// The label (and `CKA_ID`) of a key version.
pub fn label(name: &str, version: u32) -> String {
    format!("{LABEL_PREFIX}{name}:v{version}")
}

/// Parses a label made by [`label`]; anything else (another application's
/// objects, non-canonical spellings like `v01`) is `None`, so exactly one
/// label string maps to each key version.
pub fn parse_label(label: &[u8]) -> Option<KeyRef> {
    let s = std::str::from_utf8(label).ok()?;
    let rest = s.strip_prefix(LABEL_PREFIX)?;
    let (name, version) = rest.rsplit_once(":v")?;
    validate_key_name(name).ok()?;
    if version.is_empty()
        || version.starts_with('0')
        || !version.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let version: u32 = version.parse().ok()?;
    Some(KeyRef {
        name: name.to_string(),
        version,
    })
}

/// The template for `C_GenerateKey(CKM_AES_KEY_GEN)` of a new KWK version.
///
/// Why each attribute:
/// - `TOKEN`: a session object would vanish with the session.
/// - `PRIVATE`: the key is only visible (and usable) after login.
/// - `SENSITIVE` true, `EXTRACTABLE` false: the key value can never be read
///   or exported; the token then also reports `ALWAYS_SENSITIVE` and
///   `NEVER_EXTRACTABLE`, which we check so a key that was once exportable is
///   refused.
/// - `ENCRYPT`/`DECRYPT` true: wrapping a DEK is `C_Encrypt` with AES-GCM
///   (the brief measured it 3.5x faster than `C_WrapKey`), unwrapping is
///   `C_Decrypt`.
/// - `WRAP`/`UNWRAP` false: a key that can both wrap and decrypt lets anyone
///   with a session export any extractable key in plaintext (wrap it, then
///   decrypt the result); unwrap + encrypt lets them import a key of their
///   choosing (Clulow, "On the Security of PKCS #11", CHES 2003).
/// - `SIGN`/`VERIFY`/`DERIVE` false: no use for them, and derivation is
///   another way to leak key material.
/// - `ALLOWED_MECHANISMS` = `[CKM_AES_GCM]`: the key cannot be used with ECB,
///   CBC or anything else an attacker might prefer.
///   SoftHSM2 2.6.1 accepts and enforces this attribute.
/// - `START_DATE`: today (UTC), shown as the creation date by `key list`.
///   SoftHSM2 2.6.1 stores it but cannot read it back from a private object
///   (SoftHSMv2 issues #655, #804), so there `created` is unknown.
pub fn kwk_template(name: &str, version: u32, today: Date) -> Vec<Attribute> {
    let label = label(name, version).into_bytes();
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(KWK_LEN.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
        Attribute::Label(label.clone()),
        Attribute::Id(label),
        Attribute::StartDate(today),
    ]
}

/// Every way `a` is weaker than a KWK made by [`kwk_template`], each as a
/// short clause naming the attribute and why it matters. Empty = usable.
pub fn problems(a: &KeyAttributes) -> Vec<String> {
    let mut p = Vec::new();
    let secret_key = ObjectClass::SECRET_KEY.to_string();
    let aes = KeyType::AES.to_string();
    let gcm = MechanismType::AES_GCM.to_string();

    match &a.class {
        Some(c) if *c == secret_key => {}
        Some(c) => p.push(format!("CKA_CLASS is {c}, not {secret_key}")),
        None => p.push("CKA_CLASS could not be read".to_string()),
    }
    match &a.key_type {
        Some(t) if *t == aes => {}
        Some(t) => p.push(format!("CKA_KEY_TYPE is {t}, not {aes}")),
        None => p.push("CKA_KEY_TYPE could not be read".to_string()),
    }
    match a.value_len {
        Some(KWK_LEN) => {}
        Some(n) => p.push(format!(
            "CKA_VALUE_LEN is {n} bytes (only AES-256, 32 bytes, is accepted)"
        )),
        None => p.push("CKA_VALUE_LEN could not be read".to_string()),
    }

    // (attribute, required value, why it matters when it differs)
    let flags: [(&str, Option<bool>, bool, &str); 8] = [
        (
            "CKA_TOKEN",
            a.token,
            true,
            "a session key disappears when the session closes",
        ),
        (
            "CKA_PRIVATE",
            a.private,
            true,
            "the key is visible without logging in",
        ),
        (
            "CKA_SENSITIVE",
            a.sensitive,
            true,
            "the key value can be read out of the HSM",
        ),
        (
            "CKA_ALWAYS_SENSITIVE",
            a.always_sensitive,
            true,
            "the key value was readable at some point",
        ),
        (
            "CKA_EXTRACTABLE",
            a.extractable,
            false,
            "the key could leave the HSM",
        ),
        (
            "CKA_NEVER_EXTRACTABLE",
            a.never_extractable,
            true,
            "the key may have left the HSM before",
        ),
        ("CKA_ENCRYPT", a.encrypt, true, "it cannot wrap data keys"),
        ("CKA_DECRYPT", a.decrypt, true, "it cannot unwrap data keys"),
    ];
    for (attr, value, required, why) in flags {
        match value {
            Some(v) if v == required => {}
            Some(v) => p.push(format!("{attr} is {v} ({why})")),
            None => p.push(format!("{attr} could not be read")),
        }
    }

    // Wrap/unwrap: named together with decrypt/encrypt, since the pair is
    // what makes them dangerous (Clulow 2003).
    match (a.wrap, a.decrypt) {
        (Some(false), _) => {}
        (Some(true), Some(true)) => p.push(
            "CKA_WRAP and CKA_DECRYPT are both true (a key that can wrap and decrypt leaks other keys, Clulow 2003)"
                .to_string(),
        ),
        (Some(true), _) => p.push("CKA_WRAP is true (the key could export other keys)".to_string()),
        (None, _) => p.push("CKA_WRAP could not be read".to_string()),
    }
    match (a.unwrap, a.encrypt) {
        (Some(false), _) => {}
        (Some(true), Some(true)) => p.push(
            "CKA_UNWRAP and CKA_ENCRYPT are both true (a key that can unwrap and encrypt lets anyone import keys of their choosing, Clulow 2003)"
                .to_string(),
        ),
        (Some(true), _) => {
            p.push("CKA_UNWRAP is true (the key could import other keys)".to_string())
        }
        (None, _) => p.push("CKA_UNWRAP could not be read".to_string()),
    }
    // Derivation is another way out for key material; a token that does not
    // report CKA_DERIVE is not penalised (the allowed-mechanisms check below
    // excludes every derivation mechanism anyway).
    if a.derive == Some(true) {
        p.push("CKA_DERIVE is true (keys derived from it may be extractable)".to_string());
    }

    match &a.allowed_mechanisms {
        None => p.push(
            "CKA_ALLOWED_MECHANISMS is not set (the key may be used with any mechanism, e.g. CKM_AES_ECB)"
                .to_string(),
        ),
        Some(m) if m.is_empty() => p.push(
            "CKA_ALLOWED_MECHANISMS is empty (the key may be used with any mechanism, e.g. CKM_AES_ECB)"
                .to_string(),
        ),
        Some(m) => {
            let extra: Vec<&str> = m.iter().filter(|x| **x != gcm).map(String::as_str).collect();
            if !extra.is_empty() {
                p.push(format!(
                    "CKA_ALLOWED_MECHANISMS allows {} (only {gcm} is accepted)",
                    extra.join(", ")
                ));
            }
        }
    }
    p
}

/// The one-line refusal for a key with problems.
pub fn refusal(key: &KeyRef, problems: &[String]) -> String {
    format!(
        "key {key} is refused: {}. Create a new key with `hsmseal key create`",
        problems.join("; ")
    )
}

/// `YYYY-MM-DD` from a `CK_DATE`, or `None` if it is empty or not digits.
pub fn date_string(d: &Date) -> Option<String> {
    if d.is_empty() {
        return None;
    }
    let all_digits = d
        .year
        .iter()
        .chain(&d.month)
        .chain(&d.day)
        .all(u8::is_ascii_digit);
    if !all_digits {
        return None;
    }
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Some(format!("{}-{}-{}", s(&d.year), s(&d.month), s(&d.day)))
}

/// Today's date in UTC as a `CK_DATE`.
pub fn today_utc() -> Date {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    Date::new(digits::<4>(y as u32), digits::<2>(m), digits::<2>(d))
}

fn digits<const N: usize>(mut v: u32) -> [u8; N] {
    let mut out = [b'0'; N];
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`); avoids a date crate for
/// one call.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> KeyAttributes {
        KeyAttributes {
            class: Some(ObjectClass::SECRET_KEY.to_string()),
            key_type: Some(KeyType::AES.to_string()),
            value_len: Some(32),
            token: Some(true),
            private: Some(true),
            sensitive: Some(true),
            always_sensitive: Some(true),
            extractable: Some(false),
            never_extractable: Some(true),
            encrypt: Some(true),
            decrypt: Some(true),
            wrap: Some(false),
            unwrap: Some(false),
            sign: Some(false),
            verify: Some(false),
            derive: Some(false),
            allowed_mechanisms: Some(vec![MechanismType::AES_GCM.to_string()]),
            start_date: Some("2024-01-02".into()),
        }
    }

    #[test]
    fn labels_round_trip_and_reject_other_spellings() {
        assert_eq!(label("backups", 3), "hsmseal:backups:v3");
        let k = parse_label(b"hsmseal:backups:v3").unwrap();
        assert_eq!((k.name.as_str(), k.version), ("backups", 3));
        assert_eq!(
            parse_label(b"hsmseal:a.b-c_d:v4294967295").unwrap().version,
            u32::MAX
        );
        for bad in [
            &b"hsmseal:backups:v0"[..],
            b"hsmseal:backups:v01",
            b"hsmseal:backups:v",
            b"hsmseal:backups:v-1",
            b"hsmseal:backups:v4294967296",
            b"hsmseal::v1",
            b"hsmseal:a:b:v1",
            b"other:backups:v1",
            b"hsmseal:backups",
            b"\xff",
        ] {
            assert!(
                parse_label(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_required_attributes_have_no_problems() {
        assert!(problems(&good()).is_empty(), "{:?}", problems(&good()));
    }

    #[test]
    fn each_weakness_is_named() {
        type Weaken = fn(&mut KeyAttributes);
        let cases: Vec<(Weaken, &str)> = vec![
            (|a| a.extractable = Some(true), "CKA_EXTRACTABLE is true"),
            (
                |a| a.never_extractable = Some(false),
                "CKA_NEVER_EXTRACTABLE is false",
            ),
            (|a| a.sensitive = Some(false), "CKA_SENSITIVE is false"),
            (
                |a| a.always_sensitive = Some(false),
                "CKA_ALWAYS_SENSITIVE is false",
            ),
            (|a| a.token = Some(false), "CKA_TOKEN is false"),
            (|a| a.private = Some(false), "CKA_PRIVATE is false"),
            (
                |a| a.wrap = Some(true),
                "CKA_WRAP and CKA_DECRYPT are both true",
            ),
            (
                |a| a.unwrap = Some(true),
                "CKA_UNWRAP and CKA_ENCRYPT are both true",
            ),
            (|a| a.derive = Some(true), "CKA_DERIVE is true"),
            (|a| a.encrypt = Some(false), "CKA_ENCRYPT is false"),
            (|a| a.value_len = Some(16), "CKA_VALUE_LEN is 16"),
            (
                |a| a.key_type = Some("CKK_DES3".into()),
                "CKA_KEY_TYPE is CKK_DES3",
            ),
            (
                |a| a.class = Some("CKO_DATA".into()),
                "CKA_CLASS is CKO_DATA",
            ),
            (
                |a| a.allowed_mechanisms = None,
                "CKA_ALLOWED_MECHANISMS is not set",
            ),
            (
                |a| a.allowed_mechanisms = Some(vec![]),
                "CKA_ALLOWED_MECHANISMS is empty",
            ),
            (
                |a| {
                    a.allowed_mechanisms = Some(vec![
                        MechanismType::AES_GCM.to_string(),
                        MechanismType::AES_ECB.to_string(),
                    ])
                },
                "CKA_ALLOWED_MECHANISMS allows CKM_AES_ECB",
            ),
            (
                |a| a.extractable = None,
                "CKA_EXTRACTABLE could not be read",
            ),
        ];
        for (weaken, expected) in cases {
            let mut a = good();
            weaken(&mut a);
            let p = problems(&a);
            assert!(p.iter().any(|x| x.contains(expected)), "{expected}: {p:?}");
        }
    }

    #[test]
    fn refusal_names_every_problem_on_one_line() {
        let mut a = good();
        a.extractable = Some(true);
        a.wrap = Some(true);
        let k = KeyRef {
            name: "backups".into(),
            version: 1,
        };
        let m = refusal(&k, &problems(&a));
        assert!(m.starts_with("key backups v1 is refused: CKA_EXTRACTABLE is true (the key could leave the HSM); CKA_WRAP and CKA_DECRYPT are both true"), "{m}");
        assert!(m.ends_with("`hsmseal key create`"), "{m}");
        assert!(!m.contains('\n'));
    }

    #[test]
    fn template_asks_for_exactly_the_required_attributes() {
        let t = kwk_template("k", 2, Date::new(*b"2024", *b"03", *b"09"));
        let a = KeyAttributes::from_attributes(&t);
        // The template lacks what only the token can report.
        let mut expected = good();
        expected.always_sensitive = None;
        expected.never_extractable = None;
        expected.start_date = Some("2024-03-09".into());
        assert_eq!(a, expected);
        assert!(t.contains(&Attribute::Label(b"hsmseal:k:v2".to_vec())));
        assert!(t.contains(&Attribute::Id(b"hsmseal:k:v2".to_vec())));
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        let today = date_string(&today_utc()).unwrap();
        assert_eq!(today.len(), 10);
        assert!(today.starts_with("20"), "{today}");
        assert_eq!(date_string(&Date::new_empty()), None);
        assert_eq!(date_string(&Date::new(*b"20a4", *b"01", *b"01")), None);
    }
}
