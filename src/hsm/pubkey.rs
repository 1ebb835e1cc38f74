//! Public-key KWKs: a key pair generated in the token whose public half is
//! exported as a recipient file (`key export-public`), so hosts encrypt
//! without the token or PIN, and whose private half opens v2 key slots and
//! nothing else. Each type is one [`PubKeyType`] entry (its label prefix,
//! its private key's one usage, its attribute table); the lifecycle
//! (`super::pubkey_lifecycle`) scans every prefix in [`PUBKEY_TYPES`], so a
//! new type plugs in by adding an entry and its generate/open code.
//!
//! Objects of a version: the private key and the public key, both
//! labelled `{prefix}NAME:vN` (`hsmseal-rsa:` for RSA-OAEP, `hsmseal-ec:`
//! for EC-P256; not under `hsmseal:`, so the AES KWK scan, list and doctor
//! never take them for AES keys), `CKA_ID` = label `@` creation time as for
//! AES keys. Private key: token, private, sensitive, never extractable, its
//! type's one usage true (`CKA_DECRYPT` for RSA-OAEP, `CKA_DERIVE` for
//! EC-P256) and every other usage false, `CKA_ALLOWED_MECHANISMS` = that
//! usage's one mechanism (`CKM_RSA_PKCS_OAEP`, `CKM_ECDH1_DERIVE`). A
//! *disabled* version has its private key's usage attribute false: the
//! token itself then refuses it, whoever asks. (EC v1 keys made before EC
//! joined this table carry the same labels and attributes but no
//! `CKA_ID`: their creation time shows as unknown, so `key purge` spares
//! them.)
//!
//! Invariant: a private key is used only after its attributes passed
//! [`private_problems`], it is not disabled, and its public key's SPKI
//! fingerprint equals the one the slot names (so a slot can never be
//! opened by another key that happens to carry the label).

use super::errors::{is_gone, is_not_permitted, token_error};
use super::objects::private_key_problems;
use super::Hsm;
use crate::backend::{validate_key_name, KeyRef};
use crate::envelope::any_recipient::AnyRecipient;
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
/// [`Hsm::generate_pub_pair`], its SPKI reading and its slot opening.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PubKeyType {
    /// RSA-OAEP key transport (`key create --type rsa-oaep`).
    RsaOaep,
    /// EC-P256 ephemeral-static ECDH (`key create --type ec-p256`,
    /// `super::ecdh`).
    EcP256,
}

/// Every public-key type the lifecycle scans for.
pub const PUBKEY_TYPES: &[PubKeyType] = &[PubKeyType::RsaOaep, PubKeyType::EcP256];

/// Label prefix of RSA-OAEP KWK objects.
pub const RSA_LABEL_PREFIX: &str = "hsmseal-rsa:";
/// Label prefix of EC-P256 KWK objects.
pub const EC_LABEL_PREFIX: &str = "hsmseal-ec:";

/// DER of the named-curve OID prime256v1 (1.2.840.10045.3.1.7), the
/// `CKA_EC_PARAMS` of every EC key hsmseal makes.
pub const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

impl PubKeyType {
    /// The `--type` name.
    pub fn name(self) -> &'static str {
        match self {
            PubKeyType::RsaOaep => "rsa-oaep",
            PubKeyType::EcP256 => "ec-p256",
        }
    }

    /// The type whose `--type` name is `name`.
    pub fn from_name(name: &str) -> Option<PubKeyType> {
        PUBKEY_TYPES.iter().copied().find(|t| t.name() == name)
    }

    /// Every object of this type is labelled `{prefix}{name}:v{n}`; its
    /// high-water record `{prefix}{name}:high-water`.
    pub fn label_prefix(self) -> &'static str {
        match self {
            PubKeyType::RsaOaep => RSA_LABEL_PREFIX,
            PubKeyType::EcP256 => EC_LABEL_PREFIX,
        }
    }

    /// The private key's one usage; `key disable` sets it false.
    pub fn usage(self) -> AttributeType {
        match self {
            PubKeyType::RsaOaep => AttributeType::Decrypt,
            PubKeyType::EcP256 => AttributeType::Derive,
        }
    }

    /// [`Self::usage`] as an attribute with value `on`.
    pub(super) fn usage_attribute(self, on: bool) -> Attribute {
        match self {
            PubKeyType::RsaOaep => Attribute::Decrypt(on),
            PubKeyType::EcP256 => Attribute::Derive(on),
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
            PubKeyType::EcP256 => &[
                (AttributeType::Token, true),
                (AttributeType::Private, true),
                (AttributeType::Sensitive, true),
                (AttributeType::Extractable, false),
                (AttributeType::Derive, true),
                (AttributeType::Decrypt, false),
                (AttributeType::Unwrap, false),
                (AttributeType::Sign, false),
                (AttributeType::NeverExtractable, true),
            ],
        }
    }

    /// The public and private key templates of a version labelled
    /// `label` with `CKA_ID` `id` (`bits`: the RSA modulus size). The
    /// private key gets exactly what [`Self::private_want`] checks (the
    /// token sets `CKA_NEVER_EXTRACTABLE` itself) and its one mechanism.
    /// EC-P256: as `key create --type ec-p256` made v1 before EC keys had
    /// versions, plus `CKA_ID`.
    pub(super) fn pair_templates(
        self,
        label: &str,
        id: &[u8],
        bits: u64,
    ) -> (Vec<Attribute>, Vec<Attribute>) {
        let (mut public, mechanism) = match self {
            PubKeyType::RsaOaep => (
                vec![
                    Attribute::ModulusBits(bits.into()),
                    Attribute::PublicExponent(vec![1, 0, 1]),
                ],
                MechanismType::RSA_PKCS_OAEP,
            ),
            PubKeyType::EcP256 => (
                vec![
                    Attribute::EcParams(P256_PARAMS.to_vec()),
                    Attribute::Derive(false),
                ],
                MechanismType::ECDH1_DERIVE,
            ),
        };
        let labelled = [
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        public.extend([
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::Verify(false),
        ]);
        public.extend(labelled.clone());
        let mut private = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Decrypt(self == PubKeyType::RsaOaep),
            Attribute::Derive(self == PubKeyType::EcP256),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::AllowedMechanisms(vec![mechanism]),
        ];
        private.extend(labelled);
        (public, private)
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

/// What `key create` makes: an AES KWK or a public-key KWK of a type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KeyKind {
    Aes,
    Pub(PubKeyType),
}

impl KeyKind {
    pub(super) fn name(self) -> &'static str {
        match self {
            KeyKind::Aes => "aes",
            KeyKind::Pub(ty) => ty.name(),
        }
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

pub fn ec_label(name: &str, version: u32) -> String {
    PubKeyType::EcP256.label(name, version)
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
    let off = ty.usage_attribute(false);
    let disabled = attrs.contains(&off);
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
    /// The one look-up of a version's public or private key, every type.
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

    /// The SPKI DER of the public key object of `k`, if there is exactly
    /// one (`None` also if it vanished while being read).
    pub(super) fn pub_spki(
        &self,
        s: &Session,
        ty: PubKeyType,
        k: &KeyRef,
    ) -> Result<Option<Vec<u8>>> {
        let Some(h) = self.one_pub(s, ty, k, ObjectClass::PUBLIC_KEY)? else {
            return Ok(None);
        };
        match ty {
            PubKeyType::RsaOaep => self.rsa_spki(s, k, h),
            PubKeyType::EcP256 => self.ec_spki(s, k, h),
        }
    }

    /// The SPKI DER of the RSA public key object `h` of `k`.
    fn rsa_spki(&self, s: &Session, k: &KeyRef, h: ObjectHandle) -> Result<Option<Vec<u8>>> {
        let t = &self.token_label;
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

    /// `key create NAME --type rsa-oaep|ec-p256`: version 1 of a new
    /// public-key KWK of type `ty` generated in the token (`bits`: the RSA
    /// modulus size, 3072 or 4096; ignored for EC). Refuses a name that
    /// already has a key of any type (a name is used by one type only),
    /// checked and created under one exclusive token lock.
    pub fn create_pub_key(&self, ty: PubKeyType, name: &str, bits: u64) -> Result<AnyRecipient> {
        validate_key_name(name)?;
        if ty == PubKeyType::RsaOaep && bits != 3072 && bits != 4096 {
            return Err(Error::usage("--bits is 3072 or 4096"));
        }
        let admin = self.admin_logged_in()?;
        self.refuse_taken_name(&admin, KeyKind::Pub(ty), name)?;
        let r = self.generate_pub_pair(&admin, ty, name, 1, bits)?;
        self.forget_pub();
        Ok(r)
    }

    /// Generates version `version` of `name` (the caller holds the
    /// exclusive token lock and checked the number is free), checks what
    /// the token made (attributes, and one slot key through it), and
    /// returns its recipient; backs out on failure.
    pub(super) fn generate_pub_pair(
        &self,
        admin: &Session,
        ty: PubKeyType,
        name: &str,
        version: u32,
        bits: u64,
    ) -> Result<AnyRecipient> {
        let t = &self.token_label;
        let k = KeyRef {
            name: name.to_string(),
            version,
        };
        let label = ty.label(name, version);
        let id = ty
            .key_id(name, version, crate::time::now_unix())
            .into_bytes();
        let (public, private) = ty.pair_templates(&label, &id, bits);
        let (keygen, what) = match ty {
            PubKeyType::RsaOaep => (Mechanism::RsaPkcsKeyPairGen, format!("RSA-{bits}")),
            PubKeyType::EcP256 => (Mechanism::EccKeyPairGen, "EC P-256".to_string()),
        };
        let (pub_h, priv_h) = admin
            .generate_key_pair(&keygen, &public, &private)
            .map_err(|e| token_error(e, t, &format!("generating {label} ({what})")))?;
        let made = (|| {
            let spki = self
                .pub_spki(admin, ty, &k)?
                .ok_or_else(|| Error::token("the new public key is not found"))?;
            self.pub_private(admin, ty, &k, &fingerprint_of(&spki))?
                .ok_or_else(|| Error::token("the new private key is not found"))?;
            self.recipient_from(admin, ty, &k, spki)
        })();
        if made.is_err() {
            let _ = admin.destroy_object(priv_h);
            let _ = admin.destroy_object(pub_h);
        }
        made
    }

    /// The recipient of `name`: version `version`, or the current one (the
    /// newest enabled version) if `None`.
    pub fn export_recipient(&self, name: &str, version: Option<u32>) -> Result<AnyRecipient> {
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
                "{name:?} is {what} on token {t:?} (make one with `hsmseal key create NAME --type ec-p256` or `--type rsa-oaep`)"
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
        self.recipient_from(&admin, ty, &k, spki)
    }

    /// The recipient of version `k` of type `ty` whose public key is
    /// `spki`, after one slot key sealed to it on the host opened through
    /// the token (so a recipient file is never handed out for a key the
    /// token cannot use as hsmseal will ask it to).
    fn recipient_from(
        &self,
        s: &Session,
        ty: PubKeyType,
        k: &KeyRef,
        spki: Vec<u8>,
    ) -> Result<AnyRecipient> {
        Ok(match ty {
            PubKeyType::RsaOaep => AnyRecipient::Rsa(self.rsa_recipient(s, k, spki)?),
            PubKeyType::EcP256 => AnyRecipient::Ec(self.ec_recipient(s, k, spki)?),
        })
    }

    /// Builds the RSA recipient, probing the OAEP hash: SHA-256 if the
    /// token decrypts with it, SHA-1 when it refuses SHA-256 (SoftHSM2
    /// 2.6.1: `CKR_ARGUMENTS_BAD`).
    fn rsa_recipient(&self, s: &Session, k: &KeyRef, spki: Vec<u8>) -> Result<Recipient> {
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
    pub(super) fn current_pub_recipient(&self, name: &str) -> Result<Option<AnyRecipient>> {
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
                    Some(self.recipient_from(&admin, f.ty, &k, spki)?)
                }
            }
        };
        super::lock(&self.pub_current).insert(name.to_string(), r.clone());
        Ok(r)
    }

    /// Whether this token holds the private key of `k` (type `ty`) with
    /// `fingerprint` (present: it may still be disabled or weak, which
    /// opening reports as that slot's failure, so the file's other slots
    /// are still tried). A checked handle is cached; otherwise one label
    /// look-up.
    pub(super) fn pub_has(
        &self,
        ty: PubKeyType,
        k: &KeyRef,
        fingerprint: &[u8; 32],
    ) -> Result<bool> {
        if super::lock(&self.pub_private).contains_key(&(k.clone(), *fingerprint)) {
            return Ok(true);
        }
        let s = self.session()?;
        Ok(match self.pub_spki(s.get(), ty, k)? {
            Some(spki) if fingerprint_of(&spki) == *fingerprint => !self
                .find_pub(s.get(), ty, k, ObjectClass::PRIVATE_KEY)?
                .is_empty(),
            _ => false,
        })
    }

    /// The checked private-key handle of `k` (type `ty`), cached per run
    /// as AES KWK handles are (`Verified`): a bulk decrypt looks it up
    /// once. (The cache is keyed by fingerprint, which names the type too.)
    pub(super) fn pub_handle(
        &self,
        s: &Session,
        ty: PubKeyType,
        k: &KeyRef,
        fingerprint: &[u8; 32],
    ) -> Result<ObjectHandle> {
        if let Some(h) = super::lock(&self.pub_private).get(&(k.clone(), *fingerprint)) {
            return Ok(*h);
        }
        let h = self.pub_private(s, ty, k, fingerprint)?.ok_or_else(|| {
            Error::key(format!(
                "{} key {k} with this fingerprint is not on token {:?}",
                ty.name(),
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
            let h = self.pub_handle(s.get(), PubKeyType::RsaOaep, k, fingerprint)?;
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
        for &ty in PUBKEY_TYPES {
            let (_, template) = ty.pair_templates("l", b"id", 3072);
            // What `key create` asks for, plus what the token then sets.
            let mut good: Vec<Attribute> = template
                .into_iter()
                .filter(|a| {
                    !matches!(
                        a,
                        Attribute::AllowedMechanisms(_) | Attribute::Label(_) | Attribute::Id(_)
                    )
                })
                .collect();
            good.push(Attribute::NeverExtractable(true));
            assert_eq!(private_problems(ty, &good), (false, vec![]), "{ty:?}");
            let at = |t: AttributeType| good.iter().position(|a| a.attribute_type() == t).unwrap();
            let mut weak = good.clone();
            weak[at(AttributeType::Extractable)] = Attribute::Extractable(true);
            weak[at(AttributeType::Unwrap)] = Attribute::Unwrap(true);
            let (disabled, p) = private_problems(ty, &weak);
            assert!(!disabled);
            assert_eq!(p.len(), 2, "{ty:?} {p:?}");
            // The usage false is the disabled state, not a weakness; but a
            // disabled key that is also extractable is still weak.
            let mut off = good.clone();
            off[at(ty.usage())] = ty.usage_attribute(false);
            assert_eq!(private_problems(ty, &off), (true, vec![]), "{ty:?}");
            off[at(AttributeType::Extractable)] = Attribute::Extractable(true);
            let (disabled, p) = private_problems(ty, &off);
            assert!(disabled);
            assert_eq!(p.len(), 1, "{ty:?} {p:?}");
            // The other type's usage is a weakness.
            let o = PUBKEY_TYPES.iter().find(|o| **o != ty).unwrap();
            let mut other = good.clone();
            other[at(o.usage())] = o.usage_attribute(true);
            assert_eq!(private_problems(ty, &other).1.len(), 1, "{ty:?}");
        }
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
