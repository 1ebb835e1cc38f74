//! The KWK backup ceremony (docs/FORMAT.md section 9, README "Disaster
//! recovery"): a KWK version and its KDK are copied from token A to a
//! disaster-recovery token B by PKCS#11 key wrapping, so the key never
//! exists in clear outside an HSM.
//!
//! 1. On B, [`Hsm::create_transport_key`] generates an RSA-3072 pair: the
//!    private key sensitive, never extractable, `CKA_UNWRAP` only (no
//!    decrypt, sign or derive), `CKM_RSA_PKCS_OAEP` only. Its public half
//!    leaves B as a [`TransportKey`] text file.
//! 2. On A, the security officer imports that public key with
//!    [`Hsm::trust_transport_key`] as `CKA_TRUSTED`, `CKA_WRAP` only. Only
//!    the SO can set `CKA_TRUSTED` (PKCS#11; SoftHSM2 2.6.1 returns
//!    `CKR_ATTRIBUTE_READ_ONLY` to anyone else).
//! 3. On A, [`Hsm::backup_version`] wraps a backup-capable KWK version and
//!    its KDK under it (`C_WrapKey`, OAEP with SHA-1/MGF1-SHA-1, the only
//!    OAEP SoftHSM2 2.6.1 does). The token enforces the rule: the objects
//!    are `CKA_WRAP_WITH_TRUSTED`, so a non-trusted wrapping key is refused
//!    by the token itself (`CKR_KEY_NOT_WRAPPABLE`), not only by hsmseal.
//! 4. On B, [`Hsm::restore_backup`] unwraps them with the transport private
//!    key into objects with the same labels and IDs and hsmseal's
//!    attributes (not extractable unless asked), then checks both against
//!    the check values in the file (computed on A with the keys
//!    themselves) before keeping them.
//!
//! Invariants:
//! - No key in this module both wraps and decrypts: the transport public key
//!   only wraps (on A), its private key only unwraps (on B); KWKs and KDKs
//!   keep `CKA_WRAP`/`CKA_UNWRAP` false.
//! - Restore writes under B's exclusive token lock, refuses a version that
//!   already has an object (KWK or KDK) on B, and leaves nothing behind if
//!   any step fails (what it created is destroyed).
//! - The backup file's check values bind every byte before them to the KWK
//!   and the KDK: any change to the file fails the restore (exit 3). They do
//!   not prove *who* made the file: anyone with B's public transport key can
//!   wrap a key of their own. The ceremony compares the file's fingerprint
//!   printed on A and on B (docs/SECURITY.md).

use super::errors::{ckr_name, rv_of, token_error};
use super::kdk::{kdk_label, kdk_problems};
use super::kwk::{self, KeyInfo, KeyState};
use super::objects::private_key_problems;
use super::Hsm;
use crate::backend::{validate_key_name, KeyRef};
use crate::error::{Error, Result};
use crate::secret::Pin;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use cryptoki::error::RvError;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Label prefix of transport keys (public on A, private on B).
pub const TRANSPORT_LABEL_PREFIX: &str = "hsmseal-transport:";
/// RSA modulus size of transport keys.
pub const TRANSPORT_BITS: u64 = 3072;
/// First line of a transport public key file.
pub const TRANSPORT_MAGIC: &str = "hsmseal-transport-key v1";
/// First line of a backup file.
pub const BACKUP_MAGIC: &str = "hsmseal-kwk-backup v1";
/// The wrapping mechanism as recorded in files.
pub const WRAP_MECHANISM: &str = "CKM_RSA_PKCS_OAEP sha1 mgf1-sha1";
/// Domain separation of the check values.
const CHECK_CONTEXT: &[u8] = b"hsmseal/kwk-backup/v1";

/// The OAEP parameters: SHA-1, MGF1-SHA-1, no label. (SoftHSM2 2.6.1
/// refuses anything else; OAEP's security as key transport rests on the
/// hash as a random oracle for the padding, not on its collision
/// resistance: docs/SECURITY.md.)
fn oaep() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    ))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn strip_zeros(b: &[u8]) -> Vec<u8> {
    let n = b.iter().take_while(|x| **x == 0).count();
    b[n..].to_vec()
}

/// The public half of a transport key, as written by `key backup-target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportKey {
    /// The name given at creation (`hsmseal-transport:NAME` on both tokens).
    pub name: String,
    /// The label of the token holding the private key (informational).
    pub token: String,
    /// Big-endian, no leading zero.
    pub modulus: Vec<u8>,
    pub exponent: Vec<u8>,
}

impl TransportKey {
    pub fn label(&self) -> String {
        format!("{TRANSPORT_LABEL_PREFIX}{}", self.name)
    }

    /// `sha256:` and the hex SHA-256 of `"hsmseal-transport-key/v1" ||
    /// u32be(len modulus) || modulus || u32be(len exponent) || exponent`.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"hsmseal-transport-key/v1");
        for part in [&self.modulus, &self.exponent] {
            h.update((part.len() as u32).to_be_bytes());
            h.update(part);
        }
        format!("sha256:{}", hex(&h.finalize()))
    }

    pub fn to_text(&self) -> String {
        format!(
            "{TRANSPORT_MAGIC}\nname: {}\ntoken: {}\nalgorithm: rsa-{}\nwrap-mechanism: {WRAP_MECHANISM}\nmodulus: {}\npublic-exponent: {}\nfingerprint: {}\n",
            self.name,
            self.token,
            self.modulus.len() * 8,
            B64.encode(&self.modulus),
            B64.encode(&self.exponent),
            self.fingerprint()
        )
    }

    /// Parses [`Self::to_text`]; `source` names the file in errors. The
    /// fingerprint line must match the key (a damaged file is refused).
    pub fn parse(text: &str, source: &str) -> Result<TransportKey> {
        let bad = |why: &str| {
            Error::format(format!(
                "{source} is not a valid hsmseal transport key file: {why} (make it with `hsmseal key backup-target NAME -o FILE` on the recovery token)"
            ))
        };
        let fields = parse_fields(text, TRANSPORT_MAGIC).map_err(|w| bad(&w))?;
        let get = |k: &str| -> Result<&str> {
            single(&fields, k).ok_or_else(|| bad(&format!("no single `{k}:` line")))
        };
        let name = get("name")?.to_string();
        validate_transport_name(&name).map_err(|_| bad("bad name"))?;
        let b64 = |k: &str| -> Result<Vec<u8>> {
            B64.decode(get(k)?)
                .map_err(|_| bad(&format!("`{k}` is not base64")))
        };
        let t = TransportKey {
            name,
            token: get("token")?.to_string(),
            modulus: b64("modulus")?,
            exponent: b64("public-exponent")?,
        };
        if get("wrap-mechanism")? != WRAP_MECHANISM {
            return Err(bad(&format!("wrap-mechanism is not `{WRAP_MECHANISM}`")));
        }
        if t.modulus.first().is_none_or(|b| *b == 0)
            || t.modulus.len() * 8 < TRANSPORT_BITS as usize
        {
            return Err(bad(&format!(
                "the modulus is not a canonical RSA modulus of at least {TRANSPORT_BITS} bits"
            )));
        }
        if t.exponent.first().is_none_or(|b| *b == 0) {
            return Err(bad("the public exponent is not canonical"));
        }
        if get("fingerprint")? != t.fingerprint() {
            return Err(bad(
                "its fingerprint line does not match its key (damaged or edited)",
            ));
        }
        Ok(t)
    }
}

/// Transport key names: the same rule as key names.
fn validate_transport_name(name: &str) -> Result<()> {
    validate_key_name(name)
}

/// `key: value` lines after the magic line, in order. Every line must be of
/// that form and end with a newline.
fn parse_fields(text: &str, magic: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let rest = text
        .strip_prefix(magic)
        .and_then(|r| r.strip_prefix('\n'))
        .ok_or_else(|| format!("its first line is not `{magic}`"))?;
    if !rest.ends_with('\n') {
        return Err("it does not end with a newline (truncated?)".into());
    }
    let mut out = Vec::new();
    for (i, line) in rest.lines().enumerate() {
        let (k, v) = line
            .split_once(": ")
            .ok_or_else(|| format!("line {} is not `field: value`", i + 2))?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn single<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    let mut it = fields.iter().filter(|(k, _)| k == key);
    let v = it.next()?;
    if it.next().is_some() {
        return None;
    }
    Some(&v.1)
}

/// One wrapped object in a backup file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupObject {
    pub label: String,
    /// `CKA_ID` as written by hsmseal (label `@` creation time).
    pub id: String,
    pub wrapped: Vec<u8>,
}

/// A backup file (docs/FORMAT.md section 9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backup {
    pub key: KeyRef,
    /// [`TransportKey::fingerprint`] of the key the objects are wrapped for.
    pub transport: String,
    pub kwk: BackupObject,
    pub kdk: BackupObject,
    /// `iv (12) || AES-256-GCM(KWK, iv, SHA-256(body), aad = CHECK_CONTEXT)`
    /// with its 16-byte tag.
    pub kwk_check: Vec<u8>,
    /// `HMAC-SHA256(KDK, CHECK_CONTEXT || SHA-256(body))`.
    pub kdk_check: Vec<u8>,
}

/// The attribute line recorded for each object: what restore sets (besides
/// extractable / wrap-with-trusted, see [`restore_template`]).
const KWK_ATTRS: &str = "CKK_AES 32 token private sensitive encrypt decrypt allowed=CKM_AES_GCM";
const KDK_ATTRS: &str =
    "CKK_GENERIC_SECRET 32 token private sensitive sign allowed=CKM_SHA256_HMAC";

impl Backup {
    /// Everything the check values cover: the file up to its first check
    /// line.
    pub fn body(&self) -> String {
        let obj = |kind: &str, attrs: &str, o: &BackupObject| {
            format!(
                "object: {kind}\nlabel: {}\nid: {}\nattributes: {attrs}\nwrapped: {}\n",
                o.label,
                o.id,
                B64.encode(&o.wrapped)
            )
        };
        format!(
            "{BACKUP_MAGIC}\nkey: {}\nversion: {}\ntransport: {}\nwrap-mechanism: {WRAP_MECHANISM}\n{}{}",
            self.key.name,
            self.key.version,
            self.transport,
            obj("kwk", KWK_ATTRS, &self.kwk),
            obj("kdk", KDK_ATTRS, &self.kdk)
        )
    }

    /// SHA-256 of [`Self::body`]: what the check values bind.
    fn body_hash(&self) -> [u8; 32] {
        Sha256::digest(self.body().as_bytes()).into()
    }

    pub fn to_text(&self) -> String {
        format!(
            "{}kwk-check: {}\nkdk-check: {}\n",
            self.body(),
            B64.encode(&self.kwk_check),
            B64.encode(&self.kdk_check)
        )
    }

    /// SHA-256 of the whole file, hex: what the ceremony compares on A and B.
    pub fn fingerprint(&self) -> String {
        format!("sha256:{}", hex(&Sha256::digest(self.to_text().as_bytes())))
    }

    /// Parses [`Self::to_text`] strictly: the fields in that order, nothing
    /// else, so that what is checked is what was parsed.
    pub fn parse(text: &str, source: &str) -> Result<Backup> {
        let bad = |why: &str| {
            Error::format(format!(
                "{source} is not a valid hsmseal key backup file: {why} (it is made by `hsmseal key backup`)"
            ))
        };
        let fields = parse_fields(text, BACKUP_MAGIC).map_err(|w| bad(&w))?;
        const ORDER: [&str; 16] = [
            "key",
            "version",
            "transport",
            "wrap-mechanism",
            "object",
            "label",
            "id",
            "attributes",
            "wrapped",
            "object",
            "label",
            "id",
            "attributes",
            "wrapped",
            "kwk-check",
            "kdk-check",
        ];
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        if keys != ORDER {
            return Err(bad(&format!(
                "its fields are not `{}` in that order",
                ORDER.join("`, `")
            )));
        }
        let v: Vec<&str> = fields.iter().map(|(_, v)| v.as_str()).collect();
        let b64 = |i: usize| -> Result<Vec<u8>> {
            B64.decode(v[i])
                .map_err(|_| bad(&format!("`{}` is not base64", ORDER[i])))
        };
        let name = v[0].to_string();
        validate_key_name(&name).map_err(|_| bad("bad key name"))?;
        let version = kwk::parse_version(v[1]).ok_or_else(|| bad("bad version"))?;
        let key = KeyRef { name, version };
        if v[3] != WRAP_MECHANISM {
            return Err(bad(&format!("wrap-mechanism is not `{WRAP_MECHANISM}`")));
        }
        let expect = [
            (4, "kwk", kwk::label(&key.name, version), KWK_ATTRS),
            (9, "kdk", kdk_label(&key.name, version), KDK_ATTRS),
        ];
        for (i, kind, label, attrs) in &expect {
            if v[*i] != *kind || v[i + 1] != label || v[i + 3] != *attrs {
                return Err(bad(&format!(
                    "object {kind} is not labelled {label} with the attributes this hsmseal restores"
                )));
            }
            let time_ok = v[i + 2]
                .strip_prefix(label.as_str())
                .and_then(|r| r.strip_prefix('@'))
                .and_then(crate::time::parse_rfc3339)
                .is_some();
            if !time_ok {
                return Err(bad(&format!("the id of {label} is not `{label}@TIME`")));
            }
        }
        let obj = |i: usize| -> Result<BackupObject> {
            Ok(BackupObject {
                label: v[i + 1].to_string(),
                id: v[i + 2].to_string(),
                wrapped: b64(i + 4)?,
            })
        };
        Ok(Backup {
            key,
            transport: v[2].to_string(),
            kwk: obj(4)?,
            kdk: obj(9)?,
            kwk_check: b64(14)?,
            kdk_check: b64(15)?,
        })
    }
}

/// What `key restore` made on B.
#[derive(serde::Serialize, Clone, Debug)]
pub struct RestoreReport {
    pub key: String,
    pub version: u32,
    pub token: String,
    /// The backup file's fingerprint ([`Backup::fingerprint`]).
    pub fingerprint: String,
    /// True if restored backup-capable (`--backup`).
    pub backup_capable: bool,
    /// The version new encryptions under the name use on B now.
    pub current_version: Option<u32>,
}

/// The template `C_UnwrapKey` gets for a restored object: hsmseal's own
/// attributes (never the file's), the label and ID from the file. Marked
/// `CKA_WRAP_WITH_TRUSTED` in every case (what [`kwk::provenance`] takes
/// for restored); extractable only with `backup`.
fn restore_template(kind_kwk: bool, o: &BackupObject, backup: bool) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(backup),
        Attribute::WrapWithTrusted(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Verify(false),
        Attribute::Label(o.label.clone().into_bytes()),
        Attribute::Id(o.id.clone().into_bytes()),
    ];
    if kind_kwk {
        t.extend([
            Attribute::KeyType(KeyType::AES),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Sign(false),
            Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
        ]);
    } else {
        t.extend([
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Sign(true),
            Attribute::AllowedMechanisms(vec![MechanismType::SHA256_HMAC]),
        ]);
    }
    t
}

/// Why a transport private key on B is weaker than [`Hsm::create_transport_key`]
/// makes it (empty: usable).
fn transport_private_problems(attrs: &[Attribute]) -> Vec<String> {
    private_key_problems(
        attrs,
        &[
            (AttributeType::Sensitive, true),
            (AttributeType::Extractable, false),
            (AttributeType::Unwrap, true),
            (AttributeType::Decrypt, false),
            (AttributeType::Sign, false),
            (AttributeType::Derive, false),
            (AttributeType::Token, true),
        ],
    )
}

impl Hsm {
    /// On the recovery token B: generates transport key `name` (RSA-3072,
    /// private half `CKA_UNWRAP` only, sensitive, never extractable) and
    /// returns its public half. Refuses a name B already has.
    pub fn create_transport_key(&self, name: &str) -> Result<TransportKey> {
        validate_transport_name(name)?;
        let t = &self.token_label;
        let label = format!("{TRANSPORT_LABEL_PREFIX}{name}");
        let admin = self.admin_logged_in()?;
        let existing = admin
            .find_objects(&[Attribute::Label(label.clone().into_bytes())])
            .map_err(|e| token_error(e, t, &format!("looking up {label}")))?;
        if !existing.is_empty() {
            return Err(Error::key(format!(
                "token {t:?} already has a transport key {label}; choose another name (or export the existing one again: it is the same key)"
            )));
        }
        let public = [
            // A session object: B keeps only the private half; the public
            // half is read once, written to the file, and gone with the
            // session. It could not wrap anyway (CKA_WRAP false).
            Attribute::Token(false),
            Attribute::ModulusBits(TRANSPORT_BITS.into()),
            Attribute::PublicExponent(vec![1, 0, 1]),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::Verify(false),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Unwrap(true),
            Attribute::Decrypt(false),
            Attribute::Sign(false),
            Attribute::Derive(false),
            Attribute::AllowedMechanisms(vec![MechanismType::RSA_PKCS_OAEP]),
            Attribute::Label(label.clone().into_bytes()),
        ];
        let (pub_h, priv_h) = admin
            .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
            .map_err(|e| {
                token_error(
                    e,
                    t,
                    &format!("generating transport key {label} (RSA-{TRANSPORT_BITS})"),
                )
            })?;
        let result = (|| {
            let (modulus, exponent) = read_rsa_public(&admin, pub_h, t)?;
            let problems = transport_private_problems(&read_bools(&admin, priv_h, t)?);
            if !problems.is_empty() {
                return Err(Error::token(format!(
                    "token {t:?} did not honour hsmseal's template for transport key {label}: {}",
                    problems.join("; ")
                )));
            }
            Ok(TransportKey {
                name: name.to_string(),
                token: t.clone(),
                modulus,
                exponent,
            })
        })();
        let _ = admin.destroy_object(pub_h);
        if result.is_err() {
            let _ = admin.destroy_object(priv_h);
        }
        result
    }

    /// On the source token A, as its security officer: imports `tk` as a
    /// trusted wrap-only public key (`CKA_TRUSTED`, `CKA_WRAP` true;
    /// encrypt and verify false; `CKM_RSA_PKCS_OAEP` only). PKCS#11 allows
    /// one login per application: if this process is logged in as the user
    /// (an audited run checks its log first), give `user_pin` and the user
    /// is logged out for the SO's step and back in after it. Idempotent
    /// for the same key; refuses a different object under the same label.
    pub fn trust_transport_key(
        &self,
        so_pin: &Pin,
        tk: &TransportKey,
        user_pin: Option<&Pin>,
    ) -> Result<bool> {
        let result = self.trust_as_so(so_pin, tk, user_pin.is_some());
        if let Some(pin) = user_pin {
            // Handles of private objects do not survive a logout (SoftHSM2
            // invalidates them): forget every cached one.
            *super::lock(&self.audit_key) = None;
            super::lock(&self.kdks).clear();
            self.verified
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            self.current
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            self.login(pin)?;
        }
        result
    }

    fn trust_as_so(&self, so_pin: &Pin, tk: &TransportKey, user_in: bool) -> Result<bool> {
        let t = &self.token_label;
        let label = tk.label();
        let admin = self.admin(super::lock::Mode::Exclusive)?;
        if user_in {
            match admin.logout() {
                Ok(()) => {}
                Err(e) if rv_of(&e) == Some(RvError::UserNotLoggedIn) => {}
                Err(e) => return Err(token_error(e, t, "logging out the user for the SO's step")),
            }
        }
        let so = AuthPin::from(so_pin.expose());
        admin
            .login(UserType::So, Some(&so))
            .map_err(|e| match rv_of(&e) {
                Some(RvError::PinIncorrect) => Error::pin(format!(
                    "wrong security officer PIN for token {t:?} (not retried)"
                )),
                Some(RvError::PinLocked) => {
                    Error::pin(format!("the security officer PIN of token {t:?} is locked"))
                }
                _ => token_error(e, t, "logging in as security officer"),
            })?;
        let result = (|| {
            let existing = admin
                .find_objects(&[Attribute::Label(label.clone().into_bytes())])
                .map_err(|e| token_error(e, t, &format!("looking up {label}")))?;
            if let [h] = existing.as_slice() {
                let (m, e) = read_rsa_public(&admin, *h, t)?;
                let trusted = admin
                    .get_attributes(*h, &[AttributeType::Trusted])
                    .map_err(|e| token_error(e, t, &format!("reading {label}")))?
                    .iter()
                    .any(|a| matches!(a, Attribute::Trusted(true)));
                if m == tk.modulus && e == tk.exponent && trusted {
                    return Ok(false);
                }
            }
            if !existing.is_empty() {
                return Err(Error::key(format!(
                    "token {t:?} already has an object labelled {label} that is not this trusted transport key; remove it (it may be an untrusted copy) or choose another name on the recovery token"
                )));
            }
            let template = [
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(KeyType::RSA),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Modulus(tk.modulus.clone()),
                Attribute::PublicExponent(tk.exponent.clone()),
                Attribute::Trusted(true),
                Attribute::Wrap(true),
                Attribute::Encrypt(false),
                Attribute::Verify(false),
                Attribute::Derive(false),
                Attribute::AllowedMechanisms(vec![MechanismType::RSA_PKCS_OAEP]),
                Attribute::Label(label.clone().into_bytes()),
                Attribute::Id(tk.fingerprint().into_bytes()),
            ];
            admin.create_object(&template).map_err(|e| {
                token_error(e, t, &format!("importing transport key {label} as trusted"))
            })?;
            Ok(true)
        })();
        let _ = admin.logout();
        result
    }

    /// On A: wraps version `k` and its KDK for `tk` (whose public key the
    /// SO imported as trusted). The version must be backup-capable, enabled
    /// and pass its checks.
    pub fn backup_version(&self, k: &KeyRef, tk: &TransportKey) -> Result<Backup> {
        validate_key_name(&k.name)?;
        let t = &self.token_label;
        let admin = self.admin_reading()?;
        let family = self.family(&admin, &k.name)?;
        let handles = family.handles(k.version);
        let kwk_h = match handles.as_slice() {
            [] => return Err(self.missing_version(&family, k.version)),
            [h] => *h,
            many => {
                return Err(Error::key(format!(
                    "{} objects on token {t:?} are labelled {}; back up a version with one object (`hsmseal key list`)",
                    many.len(),
                    kwk::label(&k.name, k.version)
                )))
            }
        };
        let a = self.read_attributes(&admin, kwk_h)?;
        if kwk::is_disabled(&a) {
            return Err(Error::key(format!(
                "{}; enable it for the backup (its check value needs it)",
                kwk::disabled_refusal(k)
            )));
        }
        let problems = kwk::problems(&a);
        if !problems.is_empty() {
            return Err(Error::key(kwk::refusal(k, &problems)));
        }
        if a.extractable != Some(true) {
            return Err(Error::key(format!(
                "key {k} is not backup-capable: it was created without --backup (CKA_EXTRACTABLE false), and PKCS#11 never lets a key become extractable later. `hsmseal key rotate {} --backup` makes a backup-capable version; back that up and rewrap data under it",
                k.name
            )));
        }
        let kdk_h = match self.kdk_objects(&admin, k)?.as_slice() {
            [h] => *h,
            [] => {
                return Err(Error::key(format!(
                    "key {k} has no key-derivation key ({}) on token {t:?}; a backup without it could not open v2 column tokens",
                    kdk_label(&k.name, k.version)
                )))
            }
            many => {
                return Err(Error::key(format!(
                    "{} objects on token {t:?} are labelled {}",
                    many.len(),
                    kdk_label(&k.name, k.version)
                )))
            }
        };
        let kdk_problems = kdk_problems(&kwk::relax_backup(&self.read_attributes(&admin, kdk_h)?));
        if !kdk_problems.is_empty() {
            return Err(Error::key(format!(
                "the key-derivation key {} on token {t:?} is refused: {}",
                kdk_label(&k.name, k.version),
                kdk_problems.join("; ")
            )));
        }
        let label = tk.label();
        let mut wrap_h = None;
        for h in admin
            .find_objects(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Label(label.clone().into_bytes()),
            ])
            .map_err(|e| token_error(e, t, &format!("looking up {label}")))?
        {
            let (m, e) = read_rsa_public(&admin, h, t)?;
            if m == tk.modulus && e == tk.exponent {
                wrap_h = Some(h);
            }
        }
        let wrap_h = wrap_h.ok_or_else(|| {
            Error::key(format!(
                "token {t:?} has no transport key {label} with fingerprint {}: its security officer imports it first with `hsmseal key backup-trust FILE` (HSMSEAL_SO_PIN or --so-pin-file)",
                tk.fingerprint()
            ))
        })?;
        // No check of CKA_TRUSTED here: the token enforces it
        // (CKA_WRAP_WITH_TRUSTED), and its refusal is what we report.
        let wrap = |h: ObjectHandle, what: &str| {
            admin.wrap_key(&oaep(), wrap_h, h).map_err(|e| {
                let why = match rv_of(&e) {
                    Some(RvError::KeyNotWrappable) => format!(
                        "the token refused ({}): {what} may only be wrapped under a CKA_TRUSTED key, and transport key {label} is not trusted on this token. Only the security officer can make it trusted: `hsmseal key backup-trust FILE`",
                        ckr_name(RvError::KeyNotWrappable)
                    ),
                    Some(RvError::KeyUnextractable) => format!(
                        "the token refused ({}): {what} is not extractable",
                        ckr_name(RvError::KeyUnextractable)
                    ),
                    _ => return token_error(e, t, &format!("wrapping {what} under {label}")),
                };
                Error::key(format!("cannot back up key {k} on token {t:?}: {why}"))
            })
        };
        let kwk_wrapped = wrap(kwk_h, &kwk::label(&k.name, k.version))?;
        let kdk_wrapped = wrap(kdk_h, &kdk_label(&k.name, k.version))?;
        let id = |h: ObjectHandle| -> Result<String> {
            let attrs = admin
                .get_attributes(h, &[AttributeType::Id])
                .map_err(|e| token_error(e, t, "reading CKA_ID"))?;
            attrs
                .iter()
                .find_map(|a| match a {
                    Attribute::Id(id) => String::from_utf8(id.clone()).ok(),
                    _ => None,
                })
                .ok_or_else(|| Error::key(format!("key {k} on token {t:?} has no readable CKA_ID")))
        };
        let mut backup = Backup {
            key: k.clone(),
            transport: tk.fingerprint(),
            kwk: BackupObject {
                label: kwk::label(&k.name, k.version),
                id: id(kwk_h)?,
                wrapped: kwk_wrapped,
            },
            kdk: BackupObject {
                label: kdk_label(&k.name, k.version),
                id: id(kdk_h)?,
                wrapped: kdk_wrapped,
            },
            kwk_check: Vec::new(),
            kdk_check: Vec::new(),
        };
        let digest = backup.body_hash();
        let mut iv = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut iv);
        let params = GcmParams::new(&mut iv, CHECK_CONTEXT, 128.into())
            .map_err(|e| token_error(e, t, "preparing GCM parameters"))?;
        let ct = admin
            .encrypt(&Mechanism::AesGcm(params), kwk_h, &digest)
            .map_err(|e| token_error(e, t, &format!("computing the check value of {k}")))?;
        backup.kwk_check = [&iv[..], &ct].concat();
        backup.kdk_check = admin
            .sign(
                &Mechanism::Sha256Hmac,
                kdk_h,
                &[CHECK_CONTEXT, &digest].concat(),
            )
            .map_err(|e| {
                token_error(
                    e,
                    t,
                    &format!("computing the check value of the KDK of {k}"),
                )
            })?;
        Ok(backup)
    }

    /// On B: unwraps `b` with transport private key `b.transport` into a
    /// new version object and KDK (extractable under a trusted key only if
    /// `backup`), checks both against the file's check values, and keeps
    /// them only if everything passed.
    pub fn restore_backup(&self, b: &Backup, backup: bool, source: &str) -> Result<RestoreReport> {
        let t = &self.token_label;
        let k = &b.key;
        let admin = self.admin_logged_in()?;
        // The transport private key: label prefix and fingerprint.
        let mut unwrap_h = None;
        for h in admin
            .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
            .map_err(|e| token_error(e, t, "looking up transport keys"))?
        {
            let attrs = admin
                .get_attributes(
                    h,
                    &[
                        AttributeType::Label,
                        AttributeType::Modulus,
                        AttributeType::PublicExponent,
                    ],
                )
                .map_err(|e| token_error(e, t, "reading a transport key"))?;
            let (mut label, mut m, mut e) = (None, None, None);
            for a in attrs {
                match a {
                    Attribute::Label(l) => label = String::from_utf8(l).ok(),
                    Attribute::Modulus(x) => m = Some(strip_zeros(&x)),
                    Attribute::PublicExponent(x) => e = Some(strip_zeros(&x)),
                    _ => {}
                }
            }
            let (Some(label), Some(m), Some(e)) = (label, m, e) else {
                continue;
            };
            let Some(name) = label.strip_prefix(TRANSPORT_LABEL_PREFIX) else {
                continue;
            };
            let tk = TransportKey {
                name: name.to_string(),
                token: t.clone(),
                modulus: m,
                exponent: e,
            };
            if tk.fingerprint() == b.transport {
                let problems = transport_private_problems(&read_bools(&admin, h, t)?);
                if !problems.is_empty() {
                    return Err(Error::key(format!(
                        "transport key {label} on token {t:?} is refused: {}",
                        problems.join("; ")
                    )));
                }
                unwrap_h = Some(h);
            }
        }
        let unwrap_h = unwrap_h.ok_or_else(|| {
            Error::key(format!(
                "{source} is wrapped for transport key {}, which token {t:?} does not hold; restore on the token where `hsmseal key backup-target` made it",
                b.transport
            ))
        })?;
        let family = self.family(&admin, &k.name)?;
        if !family.handles(k.version).is_empty() || !self.kdk_objects(&admin, k)?.is_empty() {
            return Err(Error::key(format!(
                "key {k} already exists on token {t:?}; nothing was restored (destroy it there first if it is a wrong copy)"
            )));
        }
        let mut made: Vec<ObjectHandle> = Vec::new();
        let result = (|| {
            let unwrap = |o: &BackupObject, kind_kwk: bool| {
                admin
                    .unwrap_key(&oaep(), unwrap_h, &o.wrapped, &restore_template(kind_kwk, o, backup))
                    .map_err(|e| match rv_of(&e) {
                        Some(
                            RvError::EncryptedDataInvalid
                            | RvError::WrappedKeyInvalid
                            | RvError::WrappedKeyLenRange
                            | RvError::GeneralError
                            | RvError::FunctionFailed,
                        ) => Error::integrity(format!(
                            "{source}: the token could not unwrap {} ({}): the file was damaged or altered, or wrapped for another key; nothing was restored",
                            o.label,
                            ckr_name(rv_of(&e).unwrap_or(RvError::GeneralError))
                        )),
                        _ => token_error(e, t, &format!("unwrapping {} from {source}", o.label)),
                    })
            };
            let kwk_h = unwrap(&b.kwk, true)?;
            made.push(kwk_h);
            let kdk_h = unwrap(&b.kdk, false)?;
            made.push(kdk_h);
            let problems = kwk::problems(&self.read_attributes(&admin, kwk_h)?);
            if !problems.is_empty() {
                return Err(Error::token(format!(
                    "token {t:?} did not honour hsmseal's template for restored key {k}: {}; nothing was restored",
                    problems.join("; ")
                )));
            }
            let problems = kdk_problems(&kwk::relax_backup(&self.read_attributes(&admin, kdk_h)?));
            if !problems.is_empty() {
                return Err(Error::token(format!(
                    "token {t:?} did not honour hsmseal's template for the restored key-derivation key of {k}: {}; nothing was restored",
                    problems.join("; ")
                )));
            }
            let digest = b.body_hash();
            let failed = || {
                Error::integrity(format!(
                    "{source}: the restored keys do not match the file's check values: the file was altered after `hsmseal key backup` (or is not from it); nothing was restored"
                ))
            };
            if b.kwk_check.len() != 12 + 32 + 16 {
                return Err(failed());
            }
            let mut iv = [0u8; 12];
            iv.copy_from_slice(&b.kwk_check[..12]);
            let params = GcmParams::new(&mut iv, CHECK_CONTEXT, 128.into())
                .map_err(|e| token_error(e, t, "preparing GCM parameters"))?;
            match admin.decrypt(&Mechanism::AesGcm(params), kwk_h, &b.kwk_check[12..]) {
                Ok(plain) if plain == digest => {}
                Ok(_) => return Err(failed()),
                Err(e) if super::errors::is_bad_tag(&e) => return Err(failed()),
                Err(e) => return Err(token_error(e, t, &format!("checking restored key {k}"))),
            }
            let mac = admin
                .sign(
                    &Mechanism::Sha256Hmac,
                    kdk_h,
                    &[CHECK_CONTEXT, &digest].concat(),
                )
                .map_err(|e| {
                    token_error(
                        e,
                        t,
                        &format!("checking the restored key-derivation key of {k}"),
                    )
                })?;
            if !constant_time_eq(&mac, &b.kdk_check) {
                return Err(failed());
            }
            // Unique label, as every version hsmseal creates.
            for label in [&b.kwk.label, &b.kdk.label] {
                let n = admin
                    .find_objects(&[Attribute::Label(label.clone().into_bytes())])
                    .map_err(|e| token_error(e, t, &format!("checking that {label} is unique")))?
                    .len();
                if n != 1 {
                    return Err(Error::token(format!(
                        "another PKCS#11 client created an object labelled {label} on token {t:?} during the restore; nothing was restored"
                    )));
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            for h in made {
                let _ = admin.destroy_object(h);
            }
            return Err(e);
        }
        self.evict(k);
        let after = self.family(&admin, &k.name)?;
        let versions: Vec<KeyInfo> = self.version_infos(&admin, &after)?;
        Ok(RestoreReport {
            key: k.name.clone(),
            version: k.version,
            token: t.clone(),
            fingerprint: b.fingerprint(),
            backup_capable: backup,
            current_version: versions
                .iter()
                .find(|i| i.state == KeyState::Active)
                .map(|i| i.version),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn read_rsa_public(admin: &Session, h: ObjectHandle, t: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let attrs = admin
        .get_attributes(h, &[AttributeType::Modulus, AttributeType::PublicExponent])
        .map_err(|e| token_error(e, t, "reading an RSA public key"))?;
    let (mut m, mut e) = (None, None);
    for a in attrs {
        match a {
            Attribute::Modulus(x) => m = Some(strip_zeros(&x)),
            Attribute::PublicExponent(x) => e = Some(strip_zeros(&x)),
            _ => {}
        }
    }
    match (m, e) {
        (Some(m), Some(e)) => Ok((m, e)),
        _ => Err(Error::token(format!(
            "token {t:?} did not return the modulus and exponent of an RSA key"
        ))),
    }
}

fn read_bools(admin: &Session, h: ObjectHandle, t: &str) -> Result<Vec<Attribute>> {
    admin
        .get_attributes(
            h,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Unwrap,
                AttributeType::Decrypt,
                AttributeType::Sign,
                AttributeType::Derive,
                AttributeType::Token,
            ],
        )
        .map_err(|e| token_error(e, t, "reading transport key attributes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tk() -> TransportKey {
        TransportKey {
            name: "dr1".into(),
            token: "B".into(),
            modulus: {
                let mut m = vec![0xc5u8; 384];
                m[383] = 0x01;
                m
            },
            exponent: vec![1, 0, 1],
        }
    }

    fn backup() -> Backup {
        Backup {
            key: KeyRef {
                name: "pii".into(),
                version: 2,
            },
            transport: tk().fingerprint(),
            kwk: BackupObject {
                label: "hsmseal:pii:v2".into(),
                id: "hsmseal:pii:v2@2026-01-02T03:04:05Z".into(),
                wrapped: vec![7; 384],
            },
            kdk: BackupObject {
                label: "hsmseal-kdk:pii:v2".into(),
                id: "hsmseal-kdk:pii:v2@2026-01-02T03:04:05Z".into(),
                wrapped: vec![8; 384],
            },
            kwk_check: vec![1; 60],
            kdk_check: vec![2; 32],
        }
    }

    #[test]
    fn transport_key_files_round_trip_and_refuse_edits() {
        let t = tk();
        let text = t.to_text();
        assert!(
            text.starts_with("hsmseal-transport-key v1\nname: dr1\n"),
            "{text}"
        );
        assert!(text.contains("algorithm: rsa-3072\n"), "{text}");
        assert_eq!(TransportKey::parse(&text, "f").unwrap(), t);
        let edited = text.replace(&B64.encode(&t.exponent), &B64.encode([1u8, 0, 3]));
        assert_ne!(edited, text);
        let e = TransportKey::parse(&edited, "f").unwrap_err();
        assert!(
            e.message().contains("fingerprint line does not match"),
            "{}",
            e.message()
        );
        for bad in [
            "",
            "hsmseal-transport-key v2\n",
            &text[..text.len() - 1],
            &text.replace("name: dr1", "name: a/b"),
            &text.replace("sha1 mgf1-sha1", "sha256"),
        ] {
            assert!(TransportKey::parse(bad, "f").is_err(), "{bad}");
        }
    }

    #[test]
    fn backup_files_round_trip_strictly() {
        let b = backup();
        let text = b.to_text();
        assert!(text.starts_with(&format!("{}{}", b.body(), "kwk-check: ")));
        assert_eq!(Backup::parse(&text, "f").unwrap(), b);
        assert_ne!(
            b.fingerprint(),
            backup_with(|x| x.kdk_check[0] ^= 1).fingerprint()
        );
        for bad in [
            text.replace("version: 2", "version: 02"),
            text.replace("hsmseal:pii:v2@", "hsmseal:pii:v3@"),
            text.replace("label: hsmseal-kdk:pii:v2", "label: hsmseal-kdk:pii:v3"),
            text.replace(KWK_ATTRS, "CKK_AES 32 token private extractable"),
            text.replace("kdk-check: ", "kdk-check:  "),
            text.replace("object: kdk\n", ""),
            format!("{text}extra: 1\n"),
            text[..text.len() - 1].to_string(),
        ] {
            assert!(Backup::parse(&bad, "f").is_err(), "{bad}");
        }
        // The body covers names and wrapped bytes.
        assert_ne!(
            b.body_hash(),
            backup_with(|x| x.kwk.wrapped[0] ^= 1).body_hash()
        );
    }

    fn backup_with(f: impl Fn(&mut Backup)) -> Backup {
        let mut b = backup();
        f(&mut b);
        b
    }

    #[test]
    fn restore_templates_set_hsmseal_attributes_not_the_files() {
        let b = backup();
        let kwk_t = kwk::KeyAttributes::from_attributes(&restore_template(true, &b.kwk, false));
        assert_eq!(kwk_t.extractable, Some(false));
        assert_eq!(kwk_t.wrap_with_trusted, Some(true));
        assert_eq!(kwk_t.wrap, Some(false));
        assert_eq!(kwk_t.encrypt, Some(true));
        let kdk_t = kwk::KeyAttributes::from_attributes(&restore_template(false, &b.kdk, true));
        assert_eq!(kdk_t.extractable, Some(true));
        assert_eq!(kdk_t.sign, Some(true));
        assert_eq!(kdk_t.decrypt, Some(false));
        assert!(constant_time_eq(b"ab", b"ab"));
        assert!(!constant_time_eq(b"ab", b"ac"));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
