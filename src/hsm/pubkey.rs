//! Public-key KWKs: a key pair generated in the token whose public half is
//! exported as a recipient file (`key export-public`), so hosts encrypt
//! without the token or PIN, and whose private half opens v2 key slots and
//! nothing else. Each type is one [`PubKeyType`] entry (its label prefix,
//! its private key's one usage, its attribute table); the lifecycle
//! (`super::pubkey_lifecycle`) scans every prefix in [`PUBKEY_TYPES`], so a
//! new type plugs in by adding an entry and its generate/open code.
//!
//! RSA-OAEP objects: the private key and the public key, both labelled
//! `hsmseal-rsa:NAME:vN` (not under `hsmseal:`, so the AES KWK scan, list
//! and doctor never take them for AES keys), `CKA_ID` = label `@` creation
//! time as for AES keys. Private key: token, private, sensitive, never
//! extractable, `CKA_DECRYPT` true and every other usage false,
//! `CKA_ALLOWED_MECHANISMS = { CKM_RSA_PKCS_OAEP }`. A *disabled* version
//! has its private key's usage attribute (`CKA_DECRYPT`) false: the token
//! itself then refuses it, whoever asks.
//!
//! Invariant: a private key is used only after its attributes passed
//! [`private_problems`], it is not disabled, and its public key's SPKI
//! fingerprint equals the one the slot names (so a slot can never be
//! opened by another key that happens to carry the label).

use super::errors::{is_gone, is_not_permitted, token_error};
use super::objects::private_key_problems;
use super::Hsm;
use crate::backend::{validate_key_name, KeyRef};
use crate::envelope::recipient::{fingerprint_of, Recipient};
use crate::envelope::slots::OaepHash;
use crate::error::{Error, Result};
use crate::secret::SecretKey;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use rsa::pkcs8::EncodePublicKey;
use rsa::{BigUint, RsaPublicKey};

/// The public-key KWK types. Adding one: an entry here and in
/// [`PUBKEY_TYPES`], its arms in the `match`es below, its generation in
/// [`Hsm::generate_pub_pair`] and its slot opening.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PubKeyType {
    /// RSA-OAEP key transport (`key create --type rsa-oaep`).
    RsaOaep,
}

/// Every public-key type the lifecycle scans for.
pub const PUBKEY_TYPES: &[PubKeyType] = &[PubKeyType::RsaOaep];

/// Label prefix of RSA-OAEP KWK objects.
pub const RSA_LABEL_PREFIX: &str = "hsmseal-rsa:";

impl PubKeyType {
    /// The `--type` name.
    pub fn name(self) -> &'static str {
        match self {
            PubKeyType::RsaOaep => "rsa-oaep",
        }
    }

    /// Every object of this type is labelled `{prefix}{name}:v{n}`; its
    /// high-water record `{prefix}{name}:high-water`.
    pub fn label_prefix(self) -> &'static str {
        match self {
            PubKeyType::RsaOaep => RSA_LABEL_PREFIX,
        }
    }

    /// The private key's one usage; `key disable` sets it false.
    pub fn usage(self) -> AttributeType {
        match self {
            PubKeyType::RsaOaep => AttributeType::Decrypt,
        }
    }

    /// The private key's boolean attributes as `key create` makes them.
    pub(super) fn private_want(self) -> &'static [(AttributeType, bool)] {
        match self {
            PubKeyType::RsaOaep => &[
                (AttributeType::Token, true),
                (AttributeType::Private, true),
                (AttributeType::Sensitive, true),
                (AttributeType::Extractable, false),
                (AttributeType::Decrypt, true),
                (AttributeType::Unwrap, false),
                (AttributeType::Sign, false),
                (AttributeType::Derive, false),
                (AttributeType::NeverExtractable, true),
            ],
        }
    }

    pub fn label(self, name: &str, version: u32) -> String {
        format!("{}{name}:v{version}", self.label_prefix())
    }

    pub fn high_water_label(self, name: &str) -> String {
        format!("{}{name}:high-water", self.label_prefix())
    }

    /// `CKA_ID`: the label, `@`, the creation time (as `kwk::key_id`).
    pub fn key_id(self, name: &str, version: u32, created_unix: u64) -> String {
        format!(
            "{}@{}",
            self.label(name, version),
            crate::time::rfc3339(created_unix)
        )
    }
}

/// The type and version of a public-key KWK label (any type); anything
/// else is `None`, with the same canonical-spelling rules as AES labels.
pub fn parse_pub_label(label: &[u8]) -> Option<(PubKeyType, KeyRef)> {
    let s = std::str::from_utf8(label).ok()?;
    PUBKEY_TYPES.iter().find_map(|&ty| {
        let rest = s.strip_prefix(ty.label_prefix())?;
        let (name, version) = rest.rsplit_once(":v")?;
        validate_key_name(name).ok()?;
        let version = super::kwk::parse_version(version)?;
        Some((
            ty,
            KeyRef {
                name: name.to_string(),
                version,
            },
        ))
    })
}

/// The type and key name of a public-key high-water record label.
pub fn parse_pub_high_water(label: &[u8]) -> Option<(PubKeyType, String)> {
    let s = std::str::from_utf8(label).ok()?;
    PUBKEY_TYPES.iter().find_map(|&ty| {
        let name = s
            .strip_prefix(ty.label_prefix())?
            .strip_suffix(":high-water")?;
        validate_key_name(name).ok()?;
        Some((ty, name.to_string()))
    })
}

pub fn rsa_label(name: &str, version: u32) -> String {
    PubKeyType::RsaOaep.label(name, version)
}

fn oaep(hash: OaepHash) -> Mechanism<'static> {
    let (h, m) = match hash {
        OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
        OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
    };
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(h, m, PkcsOaepSource::empty()))
}

/// Why a private key of `ty` is weaker than `key create` makes it, and
/// whether it is disabled (its usage false: not a weakness, a state).
pub(super) fn private_problems(ty: PubKeyType, attrs: &[Attribute]) -> (bool, Vec<String>) {
    let usage = ty.usage();
    let disabled = attrs.iter().any(|a| {
        matches!(
            (a, usage),
            (Attribute::Decrypt(false), AttributeType::Decrypt)
                | (Attribute::Derive(false), AttributeType::Derive)
        )
    });
    let want: Vec<(AttributeType, bool)> = ty
        .private_want()
        .iter()
        .copied()
        .filter(|(t, _)| !(disabled && *t == usage))
        .collect();
    (disabled, private_key_problems(attrs, &want))
}

/// The attributes [`private_problems`] reads.
pub(super) fn private_attribute_types(ty: PubKeyType) -> Vec<AttributeType> {
    ty.private_want().iter().map(|(t, _)| *t).collect()
}

fn strip_zeros(b: &[u8]) -> Vec<u8> {
    let n = b.iter().take_while(|x| **x == 0).count();
    b[n..].to_vec()
}

impl Hsm {
    pub(super) fn find_pub(
        &self,
        s: &Session,
        ty: PubKeyType,
        k: &KeyRef,
        class: ObjectClass,
    ) -> Result<Vec<ObjectHandle>> {
        s.find_objects(&[
            Attribute::Class(class),
            Attribute::Label(ty.label(&k.name, k.version).into_bytes()),
        ])
        .map_err(|e| {
            token_error(
                e,
                &self.token_label,
                &format!("looking up {} key {k}", ty.name()),
            )
        })
    }

    /// The one object of `class` labelled as `k`; `None` if there is none,
    /// refused if there are several (no guessing which one a slot means).
    fn one_pub(
        &self,
        s: &Session,
        ty: PubKeyType,
        k: &KeyRef,
        class: ObjectClass,
    ) -> Result<Option<ObjectHandle>> {
        match self.find_pub(s, ty, k, class)?.as_slice() {
            [] => Ok(None),
            [h] => Ok(Some(*h)),
            _ => Err(Error::key(format!(
                "token {:?} has several {} objects labelled {}; refusing to guess",
                self.token_label,
                if class == ObjectClass::PUBLIC_KEY {
                    "public-key"
                } else {
                    "private-key"
                },
                ty.label(&k.name, k.version)
            ))),
        }
    }

    /// The SPKI DER of the public key object of `k`, if there is exactly one.
    pub(super) fn pub_spki(
        &self,
        s: &Session,
        ty: PubKeyType,
        k: &KeyRef,
    ) -> Result<Option<Vec<u8>>> {
        match ty {
            PubKeyType::RsaOaep => self.rsa_spki(s, k),
        }
    }

    /// The SPKI DER of the RSA public key object of `k`, if there is exactly one.
    fn rsa_spki(&self, s: &Session, k: &KeyRef) -> Result<Option<Vec<u8>>> {
        let t = &self.token_label;
        let Some(h) = self.one_pub(s, PubKeyType::RsaOaep, k, ObjectClass::PUBLIC_KEY)? else {
            return Ok(None);
        };
        let attrs =
            match s.get_attributes(h, &[AttributeType::Modulus, AttributeType::PublicExponent]) {
                Ok(a) => a,
                Err(e) if is_gone(&e) => return Ok(None),
                Err(e) => return Err(token_error(e, t, "reading an RSA public key")),
            };
        let (mut m, mut e) = (None, None);
        for a in attrs {
            match a {
                Attribute::Modulus(x) => m = Some(strip_zeros(&x)),
                Attribute::PublicExponent(x) => e = Some(strip_zeros(&x)),
                _ => {}
            }
        }
        let (Some(m), Some(e)) = (m, e) else {
            return Err(Error::token(format!(
                "token {t:?} did not return the modulus and exponent of {k}"
            )));
        };
        let key = RsaPublicKey::new(BigUint::from_bytes_be(&m), BigUint::from_bytes_be(&e))
            .map_err(|e| Error::key(format!("RSA key {k} on token {t:?} is not usable: {e}")))?;
        let der = key
            .to_public_key_der()
            .map_err(|e| Error::key(format!("encoding the public key of {k}: {e}")))?;
        Ok(Some(der.as_bytes().to_vec()))
    }

    /// The one private key of `k` (type `ty`) whose public key has
    /// `fingerprint`, checked (not weak, not disabled); `None` if this
    /// token has no such key.
    pub(super) fn pub_private(
        &self,
        s: &Session,
        ty: PubKeyType,
        k: &KeyRef,
        fingerprint: &[u8; 32],
    ) -> Result<Option<ObjectHandle>> {
        let t = &self.token_label;
        match self.pub_spki(s, ty, k)? {
            Some(spki) if fingerprint_of(&spki) == *fingerprint => {}
            _ => return Ok(None),
        }
        let Some(h) = self.one_pub(s, ty, k, ObjectClass::PRIVATE_KEY)? else {
            return Ok(None);
        };
        let attrs = s
            .get_attributes(h, &private_attribute_types(ty))
            .map_err(|e| token_error(e, t, "reading private key attributes"))?;
        let (disabled, problems) = private_problems(ty, &attrs);
        if !problems.is_empty() {
            return Err(Error::key(format!(
                "refusing {} key {k} on token {t:?}: its private key is weaker than hsmseal requires ({})",
                ty.name(),
                problems.join("; ")
            )));
        }
        if disabled {
            return Err(Error::key(super::kwk::disabled_refusal(k)));
        }
        Ok(Some(h))
    }

    /// `key create NAME --type rsa-oaep`: an RSA key pair of `bits` (3072
    /// or 4096) generated in the token, version 1. Refuses a name that
    /// already has a key of any type (a name is used by one type only).
    pub fn create_rsa_key(&self, name: &str, bits: u64) -> Result<Recipient> {
        self.create_pub_key(PubKeyType::RsaOaep, name, bits)
    }

    /// Version 1 of a new public-key KWK of type `ty` (`bits`: RSA only).
    pub fn create_pub_key(&self, ty: PubKeyType, name: &str, bits: u64) -> Result<Recipient> {
        validate_key_name(name)?;
        if ty == PubKeyType::RsaOaep && bits != 3072 && bits != 4096 {
            return Err(Error::usage("--bits is 3072 or 4096"));
        }
        let admin = self.admin_logged_in()?;
        self.refuse_taken_name(&admin, ty, name)?;
        let r = self.generate_pub_pair(&admin, ty, name, 1, bits)?;
        self.forget_pub();
        Ok(r)
    }

    /// Generates version `version` of `name` (the caller holds the
    /// exclusive token lock and checked the number is free), checks what
    /// the token made, and returns its recipient; backs out on failure.
    pub(super) fn generate_pub_pair(
        &self,
        admin: &Session,
        ty: PubKeyType,
        name: &str,
        version: u32,
        bits: u64,
    ) -> Result<Recipient> {
        let t = &self.token_label;
        let k = KeyRef {
            name: name.to_string(),
            version,
        };
        let label = ty.label(name, version);
        let id = ty
            .key_id(name, version, crate::time::now_unix())
            .into_bytes();
        let (pub_h, priv_h) = match ty {
            PubKeyType::RsaOaep => {
                let public = [
                    Attribute::Token(true),
                    Attribute::Private(false),
                    Attribute::ModulusBits(bits.into()),
                    Attribute::PublicExponent(vec![1, 0, 1]),
                    Attribute::Encrypt(false),
                    Attribute::Wrap(false),
                    Attribute::Verify(false),
                    Attribute::Label(label.clone().into_bytes()),
                    Attribute::Id(id.clone()),
                ];
                let private = [
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Decrypt(true),
                    Attribute::Unwrap(false),
                    Attribute::Sign(false),
                    Attribute::Derive(false),
                    Attribute::AllowedMechanisms(vec![MechanismType::RSA_PKCS_OAEP]),
                    Attribute::Label(label.clone().into_bytes()),
                    Attribute::Id(id),
                ];
                admin
                    .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
                    .map_err(|e| token_error(e, t, &format!("generating {label} (RSA-{bits})")))?
            }
        };
        let made = (|| {
            let spki = self
                .pub_spki(admin, ty, &k)?
                .ok_or_else(|| Error::token("the new public key is not found"))?;
            self.pub_private(admin, ty, &k, &fingerprint_of(&spki))?
                .ok_or_else(|| Error::token("the new private key is not found"))?;
            self.recipient_from(admin, &k, spki)
        })();
        if made.is_err() {
            let _ = admin.destroy_object(priv_h);
            let _ = admin.destroy_object(pub_h);
        }
        made
    }

    /// The recipient of `name`: version `version`, or the current one (the
    /// newest enabled version) if `None`.
    pub fn export_recipient(&self, name: &str, version: Option<u32>) -> Result<Recipient> {
        validate_key_name(name)?;
        let admin = self.admin_reading()?;
        let t = &self.token_label;
        let Some(family) = self.pub_family(&admin, name)? else {
            let what = if self.family(&admin, name)?.is_empty() {
                "no public-key KWK"
            } else {
                "an aes key, not a public-key KWK: it has no public half to export; there is"
            };
            return Err(Error::key(format!(
                "{name:?} is {what} on token {t:?} (make one with `hsmseal key create NAME --type rsa-oaep`)"
            )));
        };
        let ty = family.ty;
        let version = match version {
            Some(v) => v,
            None => self.pub_current(&admin, &family)?,
        };
        let k = KeyRef {
            name: name.to_string(),
            version,
        };
        let spki = self
            .pub_spki(&admin, ty, &k)?
            .ok_or_else(|| self.pub_missing_version(&family, version))?;
        self.pub_private(&admin, ty, &k, &fingerprint_of(&spki))?
            .ok_or_else(|| {
                Error::key(format!(
                    "{} key {k} has no private key on token {t:?}",
                    ty.name()
                ))
            })?;
        self.recipient_from(&admin, &k, spki)
    }

    /// Builds the recipient, probing the OAEP hash: SHA-256 if the token
    /// decrypts with it, SHA-1 when it refuses SHA-256 (SoftHSM2 2.6.1:
    /// `CKR_ARGUMENTS_BAD`).
    fn recipient_from(&self, s: &Session, k: &KeyRef, spki: Vec<u8>) -> Result<Recipient> {
        let bits = RsaPublicKey::from_public_key_der_bytes(&spki)?;
        let probe = |hash: OaepHash| -> Result<bool> {
            let r = Recipient {
                name: k.name.clone(),
                version: k.version,
                bits,
                oaep: hash,
                spki: spki.clone(),
                prepared: Default::default(),
            };
            let secret = SecretKey::random();
            let ct = r.encrypt_raw(secret.expose())?;
            let h = self
                .pub_private(s, PubKeyType::RsaOaep, k, &r.fingerprint())?
                .ok_or_else(|| Error::token("private key vanished"))?;
            Ok(match s.decrypt(&oaep(hash), h, &ct) {
                Ok(pt) => pt.as_slice() == secret.expose(),
                Err(_) => false,
            })
        };
        let oaep = if probe(OaepHash::Sha256)? {
            OaepHash::Sha256
        } else if probe(OaepHash::Sha1)? {
            OaepHash::Sha1
        } else {
            return Err(Error::token(format!(
                "token {:?} decrypts RSA-OAEP with neither SHA-256 nor SHA-1",
                self.token_label
            )));
        };
        Ok(Recipient {
            name: k.name.clone(),
            version: k.version,
            bits,
            oaep,
            spki,
            prepared: Default::default(),
        })
    }

    /// Drops every cached public-key handle (after a lifecycle change).
    pub(super) fn forget_pub(&self) {
        super::lock(&self.pub_private).clear();
        super::lock(&self.pub_current).clear();
    }

    /// The recipient of `name`'s current version (`None`: `name` is no
    /// public-key KWK on this token), built once per run (it costs a scan
    /// and an OAEP probe).
    pub(super) fn current_pub_recipient(&self, name: &str) -> Result<Option<Recipient>> {
        if let Some(r) = super::lock(&self.pub_current).get(name) {
            return Ok(r.clone());
        }
        let r = {
            let admin = self.admin_reading()?;
            match self.pub_family(&admin, name)? {
                None => None,
                Some(f) => {
                    let k = KeyRef {
                        name: name.to_string(),
                        version: self.pub_current(&admin, &f)?,
                    };
                    let spki = self
                        .pub_spki(&admin, f.ty, &k)?
                        .ok_or_else(|| self.pub_missing_version(&f, k.version))?;
                    Some(self.recipient_from(&admin, &k, spki)?)
                }
            }
        };
        super::lock(&self.pub_current).insert(name.to_string(), r.clone());
        Ok(r)
    }

    /// Whether this token holds the private key of `k` with `fingerprint`
    /// (present: it may still be disabled or weak, which opening reports
    /// as that slot's failure, so the file's other slots are still tried).
    /// A checked handle is cached; otherwise one label look-up.
    pub(super) fn rsa_has(&self, k: &KeyRef, fingerprint: &[u8; 32]) -> Result<bool> {
        if super::lock(&self.pub_private).contains_key(&(k.clone(), *fingerprint)) {
            return Ok(true);
        }
        let s = self.session()?;
        let ty = PubKeyType::RsaOaep;
        Ok(match self.pub_spki(s.get(), ty, k)? {
            Some(spki) if fingerprint_of(&spki) == *fingerprint => !self
                .find_pub(s.get(), ty, k, ObjectClass::PRIVATE_KEY)?
                .is_empty(),
            _ => false,
        })
    }

    /// The checked private-key handle of `k`, cached per run as AES KWK
    /// handles are (`Verified`): a bulk decrypt looks it up once.
    fn rsa_handle(&self, s: &Session, k: &KeyRef, fingerprint: &[u8; 32]) -> Result<ObjectHandle> {
        if let Some(h) = super::lock(&self.pub_private).get(&(k.clone(), *fingerprint)) {
            return Ok(*h);
        }
        let h = self
            .pub_private(s, PubKeyType::RsaOaep, k, fingerprint)?
            .ok_or_else(|| {
                Error::key(format!(
                    "RSA key {k} with this fingerprint is not on token {:?}",
                    self.token_label
                ))
            })?;
        super::lock(&self.pub_private).insert((k.clone(), *fingerprint), h);
        Ok(h)
    }

    pub(super) fn rsa_open(
        &self,
        k: &KeyRef,
        fingerprint: &[u8; 32],
        sha256: bool,
        ciphertext: &[u8],
    ) -> Result<SecretKey> {
        let hash = if sha256 {
            OaepHash::Sha256
        } else {
            OaepHash::Sha1
        };
        let mut retried = false;
        loop {
            let s = self.session()?;
            let h = self.rsa_handle(s.get(), k, fingerprint)?;
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match s.get().decrypt(&oaep(hash), h, ciphertext) {
                Ok(pt) => {
                    let mut pt = zeroize::Zeroizing::new(pt);
                    return SecretKey::from_slice(&mut pt).ok_or_else(|| {
                        Error::integrity(format!("the key slot of {k} holds a bad slot key"))
                    });
                }
                // A cached handle gone stale (destroyed, or disabled by
                // another process): look it up again once; the fresh
                // look-up says why it cannot be used.
                Err(e) if (is_gone(&e) || is_not_permitted(&e)) && !retried => {
                    s.discard();
                    self.forget_pub();
                    retried = true;
                }
                Err(_) => {
                    return Err(Error::integrity(format!(
                    "the RSA-OAEP part of the key slot of {k} does not decrypt (edited or damaged)"
                )))
                }
            }
        }
    }
}

/// The modulus size in bits of an SPKI.
trait SpkiBits {
    fn from_public_key_der_bytes(spki: &[u8]) -> Result<usize>;
}

impl SpkiBits for RsaPublicKey {
    fn from_public_key_der_bytes(spki: &[u8]) -> Result<usize> {
        use rsa::pkcs8::DecodePublicKey;
        use rsa::traits::PublicKeyParts;
        let k = RsaPublicKey::from_public_key_der(spki)
            .map_err(|_| Error::key("not an RSA public key"))?;
        Ok(k.size() * 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_key_checks_name_each_weakness() {
        let good = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Decrypt(true),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Derive(false),
            Attribute::NeverExtractable(true),
        ];
        let ty = PubKeyType::RsaOaep;
        assert_eq!(private_problems(ty, &good), (false, vec![]));
        let mut weak = good.clone();
        weak[3] = Attribute::Extractable(true);
        weak[5] = Attribute::Unwrap(true);
        let (disabled, p) = private_problems(ty, &weak);
        assert!(!disabled);
        assert_eq!(p.len(), 2, "{p:?}");
        // CKA_DECRYPT false is the disabled state, not a weakness; but a
        // disabled key that is also extractable is still weak.
        let mut off = good.clone();
        off[4] = Attribute::Decrypt(false);
        assert_eq!(private_problems(ty, &off), (true, vec![]));
        off[3] = Attribute::Extractable(true);
        let (disabled, p) = private_problems(ty, &off);
        assert!(disabled);
        assert_eq!(p.len(), 1, "{p:?}");
    }

    #[test]
    fn public_key_labels_round_trip_for_every_type() {
        for &ty in PUBKEY_TYPES {
            let l = ty.label("dr", 12);
            assert_eq!(
                parse_pub_label(l.as_bytes()),
                Some((
                    ty,
                    KeyRef {
                        name: "dr".into(),
                        version: 12
                    }
                ))
            );
            assert_eq!(
                parse_pub_high_water(ty.high_water_label("dr").as_bytes()),
                Some((ty, "dr".into()))
            );
            assert!(parse_pub_label(format!("{}dr:v01", ty.label_prefix()).as_bytes()).is_none());
            assert!(parse_pub_label(format!("{}dr:v0", ty.label_prefix()).as_bytes()).is_none());
        }
        // AES labels are not public-key labels, and vice versa.
        assert!(parse_pub_label(b"hsmseal:dr:v1").is_none());
        assert!(crate::hsm::kwk::parse_label(rsa_label("dr", 1).as_bytes()).is_none());
    }
}
