//! KWK objects on the token: how they are labelled, the template they are
//! generated with, and the attribute check every key passes before use.
//!
//! A KWK version is one AES-256 secret key object labelled
//! `hsmseal:{name}:v{version}`; its `CKA_ID` is the label followed by
//! `@` and its creation time (`hsmseal:backups:v2@2025-01-31T12:00:00Z`),
//! because `CKA_ID` is the one place every token lets us read a creation time
//! back from (SoftHSM2 cannot return `CKA_START_DATE` of a private object).
//! Versions of a name are separate objects, so retiring one never touches the
//! others. A version is *disabled* by setting its `CKA_ENCRYPT` and
//! `CKA_DECRYPT` to false: the HSM itself then refuses to use it.
//!
//! Invariant: hsmseal never wraps or unwraps with a key for which
//! [`problems`] returns anything. The check is done on the attributes the
//! token reports, not on what we asked for at generation time, so a key
//! created by another tool (or a token that silently ignored part of our
//! template) is caught the same way.

use crate::backend::{validate_key_name, KeyRef};
use crate::time::{civil_from_days, now_unix, parse_rfc3339, rfc3339};
use cryptoki::mechanism::MechanismType;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::types::Date;
use serde::Serialize;

/// Every label hsmseal gives a key starts with this.
pub const LABEL_PREFIX: &str = "hsmseal:";

/// KWK length in bytes (AES-256).
pub const KWK_LEN: u64 = 32;

/// Where a key version is in its life (docs/FORMAT.md section 1).
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    /// The current version: new encryptions use it (the highest version
    /// that is not disabled).
    Active,
    /// An older (or, below a disabled newest one, lower) version: still
    /// decrypts what was encrypted under it.
    DecryptOnly,
    /// `CKA_ENCRYPT` and `CKA_DECRYPT` are false: the HSM refuses both.
    Disabled,
    /// The object is gone from the token (a version number below the highest
    /// ever issued with no object): what was encrypted under it is lost.
    Destroyed,
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Disabled => "disabled",
            KeyState::Destroyed => "destroyed",
        })
    }
}

/// What `key disable`, `key enable` or `key destroy` did.
#[derive(Serialize, Clone, Debug)]
pub struct StateChange {
    pub key: String,
    pub version: u32,
    pub token: String,
    /// `disable`, `enable` or `destroy`.
    pub action: &'static str,
    /// False if the version was already in the requested state.
    pub changed: bool,
    pub previous_state: KeyState,
    pub state: KeyState,
    /// The version new encryptions use after the change (`None`: none can).
    pub current_version: Option<u32>,
}

impl StateChange {
    pub fn key_ref(&self) -> KeyRef {
        KeyRef {
            name: self.key.clone(),
            version: self.version,
        }
    }
}

/// The version marked active in a listing of one key.
pub(super) fn current_of(versions: &[KeyInfo]) -> Option<u32> {
    versions
        .iter()
        .find(|k| k.state == KeyState::Active)
        .map(|k| k.version)
}

/// The state of `version` in a listing of one key (absent: destroyed).
pub(super) fn state_of(versions: &[KeyInfo], version: u32) -> KeyState {
    versions
        .iter()
        .find(|k| k.version == version)
        .map(|k| k.state)
        .unwrap_or(KeyState::Destroyed)
}

/// One version of a named KWK as found on the token.
#[derive(Serialize, Clone, Debug)]
pub struct KeyInfo {
    pub name: String,
    pub version: u32,
    /// `aes` for a KWK; `rsa-oaep-3072`, `rsa-oaep-4096` (and other
    /// public-key types, `super::pubkey::PubKeyType`) for a public-key KWK.
    /// (Serialized as `key_type`: `type` is the JSON line's record tag.)
    pub key_type: String,
    /// `hsmseal:{name}:v{version}` (a public-key KWK: its type's prefix).
    pub label: String,
    pub state: KeyState,
    /// Creation time: `YYYY-MM-DDTHH:MM:SSZ` from `CKA_ID`, else the
    /// `YYYY-MM-DD` of `CKA_START_DATE`; `None` if the token recorded
    /// neither (and for destroyed versions).
    pub created: Option<String>,
    /// The latest Unix time the version can have been created: exact from
    /// `CKA_ID`, the end of the day from `CKA_START_DATE`. What retention
    /// (`key purge`) compares, so a day-precision date never makes a key
    /// look older than it is.
    #[serde(skip)]
    pub created_not_after: Option<u64>,
    /// `None` for a destroyed version (there is no object to read).
    pub attributes: Option<KeyAttributes>,
    /// Why this key is weaker than hsmseal requires; empty means usable
    /// (a disabled or destroyed version has no problems: it is not weak).
    pub problems: Vec<String>,
}

impl KeyInfo {
    pub fn key_ref(&self) -> KeyRef {
        KeyRef {
            name: self.name.clone(),
            version: self.version,
        }
    }
    /// True when the key's attributes are as strong as hsmseal requires
    /// (it may still be disabled or destroyed: see [`KeyInfo::state`]).
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The entry for a version number that has no object any more.
    pub fn destroyed(name: &str, version: u32) -> KeyInfo {
        KeyInfo {
            name: name.to_string(),
            version,
            key_type: "aes".into(),
            label: label(name, version),
            state: KeyState::Destroyed,
            created: None,
            created_not_after: None,
            attributes: None,
            problems: Vec::new(),
        }
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
    /// `CKA_WRAP_WITH_TRUSTED`: only a `CKA_TRUSTED` key may wrap it (the
    /// backup ceremony, `super::backup`).
    pub wrap_with_trusted: Option<bool>,
    /// `CKA_LOCAL`: generated in this token (false: unwrapped or imported).
    pub local: Option<bool>,
    /// `CKA_START_DATE` as `YYYY-MM-DD`.
    pub start_date: Option<String>,
}

/// The attributes the security check needs, fetched in one
/// `C_GetAttributeValue`. `CKA_START_DATE` is not among them: it is only
/// informational, and SoftHSM2 (2.6.1 and earlier) fails the whole call with
/// `CKR_GENERAL_ERROR` when it is requested from a private object (it stores
/// the date in clear but tries to decrypt it on read; SoftHSMv2 issues #655
/// and #804). It is read on its own, failures tolerated.
pub const CHECKED_ATTRIBUTES: &[AttributeType] = &[
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
    AttributeType::WrapWithTrusted,
    AttributeType::Local,
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
                Attribute::WrapWithTrusted(b) => k.wrap_with_trusted = Some(*b),
                Attribute::Local(b) => k.local = Some(*b),
                _ => {}
            }
        }
        k
    }
}

/// The label of a key version.
pub fn label(name: &str, version: u32) -> String {
    format!("{LABEL_PREFIX}{name}:v{version}")
}

/// The `CKA_ID` of a key version: its label, `@`, and its creation time
/// (RFC 3339, UTC, whole seconds). Keys are looked up by label, so the ID is
/// free to carry the time.
pub fn key_id(name: &str, version: u32, created_unix: u64) -> String {
    format!("{}@{}", label(name, version), rfc3339(created_unix))
}

/// The creation time recorded in a `CKA_ID` made by [`key_id`] for `key`;
/// `None` for any other ID (keys made before IDs carried a time, or by
/// another tool), so a key never borrows another key's time.
pub fn created_from_id(id: &[u8], key: &KeyRef) -> Option<u64> {
    let s = std::str::from_utf8(id).ok()?;
    let time = s
        .strip_prefix(label(&key.name, key.version).as_str())?
        .strip_prefix('@')?;
    parse_rfc3339(time)
}

/// The label of a version high-water record (a `CKO_DATA` object, see
/// `crate::hsm::lifecycle`) for key `name`.
pub fn high_water_label(name: &str) -> String {
    format!("{LABEL_PREFIX}{name}:high-water")
}

/// The key name of a label made by [`high_water_label`].
pub fn parse_high_water_label(label: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(label).ok()?;
    let name = s.strip_prefix(LABEL_PREFIX)?.strip_suffix(":high-water")?;
    validate_key_name(name).ok()?;
    Some(name.to_string())
}

/// A canonical decimal version number (as in labels): no sign, no leading
/// zero, 1..=u32::MAX.
pub fn parse_version(s: &str) -> Option<u32> {
    if s.is_empty() || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a label made by [`label`]; anything else (another application's
/// objects, non-canonical spellings like `v01`) is `None`, so exactly one
/// label string maps to each key version.
pub fn parse_label(label: &[u8]) -> Option<KeyRef> {
    let s = std::str::from_utf8(label).ok()?;
    let rest = s.strip_prefix(LABEL_PREFIX)?;
    let (name, version) = rest.rsplit_once(":v")?;
    validate_key_name(name).ok()?;
    let version = parse_version(version)?;
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
/// - `ID`: the label and the creation time ([`key_id`]), which `key list`
///   shows and `key purge` goes by.
/// - `START_DATE`: the creation day (UTC), the standard place for it, read
///   when the ID carries no time. SoftHSM2 2.6.1 stores it but cannot read it
///   back from a private object (SoftHSMv2 issues #655, #804).
///
/// `CKA_MODIFIABLE` is left at its default (true): disabling a version sets
/// its `CKA_ENCRYPT`/`CKA_DECRYPT` to false later. Anything else someone
/// might change (say `CKA_WRAP` to true) is caught by [`problems`].
pub fn kwk_template(name: &str, version: u32, created_unix: u64) -> Vec<Attribute> {
    let id = key_id(name, version, created_unix).into_bytes();
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
        Attribute::Label(label),
        Attribute::Id(id),
        Attribute::StartDate(date_utc(created_unix)),
    ]
}

/// True for a version `hsmseal key disable` turned off: `CKA_ENCRYPT` and
/// `CKA_DECRYPT` both false. Only one of them false is not this state (the
/// key is then merely broken, and [`problems`] says so).
pub fn is_disabled(a: &KeyAttributes) -> bool {
    a.encrypt == Some(false) && a.decrypt == Some(false)
}

/// The one-line refusal for a disabled version.
pub fn disabled_refusal(key: &KeyRef) -> String {
    format!(
        "key {key} is disabled (`hsmseal key disable`); the HSM refuses to use it, so data under it cannot be decrypted until `hsmseal key enable {} --version {}`",
        key.name, key.version
    )
}

/// How a key object came to be, as far as its attributes tell
/// (docs/FORMAT.md section 1, "Backup-capable and restored versions").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provenance {
    /// Generated in this token, never extractable: the default.
    Generated,
    /// Generated here with `--backup`: `CKA_EXTRACTABLE` true, but only
    /// together with `CKA_WRAP_WITH_TRUSTED` true (only a key the security
    /// officer marked `CKA_TRUSTED` may wrap it) and still sensitive.
    BackupCapable,
    /// Made by `key restore` (`C_UnwrapKey`): `CKA_LOCAL`,
    /// `CKA_ALWAYS_SENSITIVE` and `CKA_NEVER_EXTRACTABLE` false as PKCS#11
    /// requires of an unwrapped key, `CKA_WRAP_WITH_TRUSTED` true.
    Restored,
}

/// Which [`Provenance`] `a` shows; `None` when it fits none of them (then
/// [`problems`] names what is wrong). Only the attributes that tell the
/// three apart are looked at here; everything else is checked as before.
pub fn provenance(a: &KeyAttributes) -> Option<Provenance> {
    let trusted_only = a.wrap_with_trusted == Some(true) && a.sensitive == Some(true);
    match (a.extractable, a.always_sensitive, a.never_extractable) {
        (Some(false), Some(true), Some(true)) => Some(Provenance::Generated),
        (Some(true), Some(true), Some(false)) if trusted_only => Some(Provenance::BackupCapable),
        (Some(_), Some(false), Some(false)) if trusted_only && a.local == Some(false) => {
            Some(Provenance::Restored)
        }
        _ => None,
    }
}

/// `a` with the attributes the backup rule accepts set to the values of a
/// generated key, so the strict checks ([`problems`], the KDK's check) stay
/// as they are and name anything else: extractable is accepted only with
/// `CKA_WRAP_WITH_TRUSTED` (and sensitive); not-always-sensitive and
/// not-never-extractable only for a restored object (not `CKA_LOCAL`,
/// wrap-with-trusted). What PKCS#11 cannot tell apart: a key imported in
/// clear by another tool with these attributes looks restored; docs/SECURITY.md
/// says so, and `key list` shows the provenance.
pub fn relax_backup(a: &KeyAttributes) -> KeyAttributes {
    let mut out = a.clone();
    if matches!(
        provenance(a),
        Some(Provenance::BackupCapable | Provenance::Restored)
    ) {
        out.extractable = Some(false);
        out.always_sensitive = Some(true);
        out.never_extractable = Some(true);
    }
    // SoftHSM2 2.6.1 reports CKA_VALUE_LEN 0 for a secret key made by
    // C_UnwrapKey and refuses the attribute in the unwrap template
    // (CKR_ATTRIBUTE_READ_ONLY). `key restore` checked the length the only
    // way left: the restored key opened the check value made on the source
    // token with a key that passed this check (docs/FORMAT.md section 9).
    if provenance(a) == Some(Provenance::Restored) && a.value_len == Some(0) {
        out.value_len = Some(KWK_LEN);
    }
    out
}

/// What `key list` and `doctor` add after a version's status: whether it
/// is backup-capable or was restored from a backup (empty otherwise).
pub fn provenance_note(k: &KeyInfo) -> &'static str {
    match k.attributes.as_ref().and_then(provenance) {
        Some(Provenance::BackupCapable) => " (backup-capable)",
        Some(Provenance::Restored)
            if k.attributes.as_ref().and_then(|a| a.extractable) == Some(true) =>
        {
            " (restored from a backup, backup-capable)"
        }
        Some(Provenance::Restored) => " (restored from a backup)",
        _ => "",
    }
}

/// Makes a generation template (KWK or KDK) backup-capable: extractable,
/// but only under a trusted key (`CKA_WRAP_WITH_TRUSTED`, which the token
/// never lets anyone turn off again).
pub fn make_backup_capable(template: &mut Vec<Attribute>) {
    for a in template.iter_mut() {
        if let Attribute::Extractable(e) = a {
            *e = true;
        }
    }
    template.push(Attribute::WrapWithTrusted(true));
}

/// Every way `a` is weaker than a KWK made by [`kwk_template`], each as a
/// short clause naming the attribute and why it matters. Empty = usable.
/// A disabled key ([`is_disabled`]) is not weak: its `CKA_ENCRYPT` and
/// `CKA_DECRYPT` being false is reported as disabled, not here. A
/// backup-capable or restored key is held to the same rules after
/// [`relax_backup`].
pub fn problems(a: &KeyAttributes) -> Vec<String> {
    let a = &relax_backup(a);
    let mut p = Vec::new();
    let disabled = is_disabled(a);
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
        if disabled && (attr == "CKA_ENCRYPT" || attr == "CKA_DECRYPT") {
            continue;
        }
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
    // Signing (a MAC such as CKM_AES_CMAC) is a second use of the key: only
    // CKA_ALLOWED_MECHANISMS would stand between it and a MAC oracle, and the
    // template (FORMAT.md section 1) says false. Same rule as CKA_DERIVE for
    // a token that does not report them.
    if a.sign == Some(true) {
        p.push("CKA_SIGN is true (the key could also compute MACs; a KWK must only encrypt and decrypt)".to_string());
    }
    if a.verify == Some(true) {
        p.push("CKA_VERIFY is true (the key could also check MACs; a KWK must only encrypt and decrypt)".to_string());
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

/// The problem `key list` and `doctor` report for each object of a version
/// that `n` objects carry (docs/FORMAT.md section 1: it still decrypts,
/// nothing new is wrapped under it).
pub fn duplicate_problem(n: usize, name: &str, version: u32) -> String {
    format!(
        "{n} {DUPLICATE_MARK} {} (data under it still decrypts, each object tried; nothing new is wrapped under it: `hsmseal key rotate {name}` makes a new unique current version)",
        label(name, version)
    )
}

/// The words that mark [`duplicate_problem`].
const DUPLICATE_MARK: &str = "objects carry the label";

/// True if every problem in `problems` is a [`duplicate_problem`]: the
/// version is ambiguous, not weak.
pub fn only_duplicated(problems: &[String]) -> bool {
    !problems.is_empty() && problems.iter().all(|p| p.contains(DUPLICATE_MARK))
}

/// The STATUS column of `key list` and `doctor`: `ok`, `DUPLICATE: ...` for
/// a duplicated version (which still decrypts), else `REFUSED: ...`.
pub fn status(problems: &[String]) -> String {
    if problems.is_empty() {
        "ok".to_string()
    } else if only_duplicated(problems) {
        format!("DUPLICATE: {}", problems.join("; "))
    } else {
        format!("REFUSED: {}", problems.join("; "))
    }
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
    date_utc(now_unix())
}

/// The UTC date of a Unix time as a `CK_DATE`.
pub fn date_utc(unix: u64) -> Date {
    let (y, m, d) = civil_from_days((unix / 86_400) as i64);
    Date::new(digits::<4>(y as u32), digits::<2>(m), digits::<2>(d))
}

fn digits<const N: usize>(mut v: u32) -> [u8; N] {
    let mut out = [b'0'; N];
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out
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
            wrap_with_trusted: Some(false),
            local: Some(true),
        }
    }

    #[test]
    fn backup_capable_and_restored_keys_pass_only_with_wrap_with_trusted() {
        assert_eq!(provenance(&good()), Some(Provenance::Generated));
        // `key create --backup`.
        let mut b = good();
        b.extractable = Some(true);
        b.never_extractable = Some(false);
        b.wrap_with_trusted = Some(true);
        assert_eq!(provenance(&b), Some(Provenance::BackupCapable));
        assert!(problems(&b).is_empty(), "{:?}", problems(&b));
        // Extractable without wrap-with-trusted: any wrapping key could
        // export it.
        let mut weak = b.clone();
        weak.wrap_with_trusted = Some(false);
        assert_eq!(provenance(&weak), None);
        assert!(problems(&weak)
            .iter()
            .any(|p| p.contains("CKA_EXTRACTABLE is true")));
        // Extractable and not sensitive: refused whatever else.
        let mut weak = b.clone();
        weak.sensitive = Some(false);
        assert!(problems(&weak)
            .iter()
            .any(|p| p.contains("CKA_EXTRACTABLE is true")));
        // `key restore`: unwrapped, so not local, not always sensitive,
        // not never extractable; with or without --backup.
        let mut r = good();
        r.local = Some(false);
        r.always_sensitive = Some(false);
        r.never_extractable = Some(false);
        r.wrap_with_trusted = Some(true);
        assert_eq!(provenance(&r), Some(Provenance::Restored));
        assert!(problems(&r).is_empty(), "{:?}", problems(&r));
        r.extractable = Some(true);
        assert_eq!(provenance(&r), Some(Provenance::Restored));
        assert!(problems(&r).is_empty(), "{:?}", problems(&r));
        // The same, but generated here (CKA_LOCAL true) or without the
        // wrap-with-trusted mark: once readable, refused as before.
        for f in [
            (|a: &mut KeyAttributes| a.local = Some(true)) as fn(&mut KeyAttributes),
            |a| a.local = None,
            |a| a.wrap_with_trusted = Some(false),
        ] {
            let mut x = r.clone();
            f(&mut x);
            assert_eq!(provenance(&x), None);
            assert!(problems(&x)
                .iter()
                .any(|p| p.contains("CKA_ALWAYS_SENSITIVE is false")));
        }
        // The template change is exactly extractable + wrap-with-trusted.
        let mut t = kwk_template("k", 1, 0);
        make_backup_capable(&mut t);
        let a = KeyAttributes::from_attributes(&t);
        assert_eq!(a.extractable, Some(true));
        assert_eq!(a.wrap_with_trusted, Some(true));
        assert_eq!(a.sensitive, Some(true));
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
    fn a_duplicated_version_is_reported_as_such_not_as_weak() {
        let dup = duplicate_problem(2, "k", 3);
        assert!(
            dup.starts_with("2 objects carry the label hsmseal:k:v3 "),
            "{dup}"
        );
        assert!(dup.contains("`hsmseal key rotate k`"), "{dup}");
        assert_eq!(status(&[]), "ok");
        assert!(status(std::slice::from_ref(&dup)).starts_with("DUPLICATE: 2 objects"));
        let weak = "CKA_SIGN is true (x)".to_string();
        assert!(status(&[dup.clone(), weak.clone()]).starts_with("REFUSED: "));
        assert!(status(&[weak]).starts_with("REFUSED: "));
        assert!(only_duplicated(&[dup]));
        assert!(!only_duplicated(&[]));
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
            (|a| a.sign = Some(true), "CKA_SIGN is true"),
            (|a| a.verify = Some(true), "CKA_VERIFY is true"),
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
        // 2024-03-09T10:11:12Z
        let t = kwk_template("k", 2, 1_709_979_072);
        let a = KeyAttributes::from_attributes(&t);
        // The template lacks what only the token can report.
        let mut expected = good();
        expected.always_sensitive = None;
        expected.never_extractable = None;
        expected.start_date = Some("2024-03-09".into());
        expected.wrap_with_trusted = None;
        expected.local = None;
        assert_eq!(a, expected);
        assert!(t.contains(&Attribute::Label(b"hsmseal:k:v2".to_vec())));
        assert!(t.contains(&Attribute::Id(
            b"hsmseal:k:v2@2024-03-09T10:11:12Z".to_vec()
        )));
    }

    #[test]
    fn creation_time_round_trips_through_the_id_of_that_key_only() {
        let k = KeyRef {
            name: "k".into(),
            version: 2,
        };
        let id = key_id("k", 2, 1_709_979_072);
        assert_eq!(created_from_id(id.as_bytes(), &k), Some(1_709_979_072));
        for other in [
            "hsmseal:k:v2",
            "hsmseal:k:v3@2024-03-09T10:11:12Z",
            "hsmseal:kk:v2@2024-03-09T10:11:12Z",
            "hsmseal:k:v2@",
            "hsmseal:k:v2@2024-03-09T10:11:12Z ",
            "hsmseal:k:v2@2024-03-09 10:11:12Z",
            "hsmseal:k:v2@2024-03-09T10:11:12+00:00",
        ] {
            assert_eq!(created_from_id(other.as_bytes(), &k), None, "{other}");
        }
    }

    #[test]
    fn a_disabled_key_is_not_weak_but_one_missing_use_is() {
        let mut a = good();
        a.encrypt = Some(false);
        a.decrypt = Some(false);
        assert!(is_disabled(&a));
        assert!(problems(&a).is_empty(), "{:?}", problems(&a));
        // Disabled and weak: the weakness is still named.
        a.extractable = Some(true);
        assert_eq!(problems(&a).len(), 1, "{:?}", problems(&a));
        let mut a = good();
        a.decrypt = Some(false);
        assert!(!is_disabled(&a));
        assert!(problems(&a)
            .iter()
            .any(|p| p.contains("CKA_DECRYPT is false")));
        let k = KeyRef {
            name: "backups".into(),
            version: 1,
        };
        let m = disabled_refusal(&k);
        assert!(
            m.starts_with("key backups v1 is disabled (`hsmseal key disable`);"),
            "{m}"
        );
        assert!(m.contains("hsmseal key enable backups --version 1"), "{m}");
    }

    #[test]
    fn high_water_labels() {
        assert_eq!(high_water_label("a.b"), "hsmseal:a.b:high-water");
        assert_eq!(
            parse_high_water_label(b"hsmseal:a.b:high-water").as_deref(),
            Some("a.b")
        );
        for bad in [
            &b"hsmseal::high-water"[..],
            b"hsmseal:a:b:high-water",
            b"hsmseal:a:high-water ",
            b"other:a:high-water",
        ] {
            assert_eq!(parse_high_water_label(bad), None);
        }
        // Never mistaken for a key label, nor a key label for it.
        assert!(parse_label(b"hsmseal:a:high-water").is_none());
        assert!(parse_high_water_label(b"hsmseal:a:v1").is_none());
        assert_eq!(parse_version("12"), Some(12));
        for bad in ["", "0", "01", "-1", "+1", "4294967296", "1 "] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
    }

    #[test]
    fn dates() {
        let today = date_string(&today_utc()).unwrap();
        assert_eq!(today.len(), 10);
        assert!(today.starts_with("20"), "{today}");
        assert_eq!(date_string(&Date::new_empty()), None);
        assert_eq!(date_string(&Date::new(*b"20a4", *b"01", *b"01")), None);
    }
}
