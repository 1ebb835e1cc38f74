//! EC-P256 public-key KWKs: a P-256 key pair generated in the token whose
//! public half is exported as a recipient file (`key export-public`), so
//! hosts encrypt without the token or PIN (ephemeral-static ECDH on the
//! host, docs/FORMAT.md section 3.3, slot kind 3), and whose private half
//! does `C_DeriveKey` with `CKM_ECDH1_DERIVE` and nothing else.
//!
//! Objects: the private key and the public key, both labelled
//! `hsmseal-ec:NAME:vN` (not under `hsmseal:` or `hsmseal-rsa:`, so neither
//! the AES KWK scan nor the RSA code ever takes them). Private key: token,
//! private, sensitive, never extractable, `CKA_DERIVE` true and every other
//! usage false, `CKA_ALLOWED_MECHANISMS = { CKM_ECDH1_DERIVE }`.
//!
//! Invariants:
//! - A private key is used only after its attributes passed
//!   [`private_problems`] and its public key's SPKI fingerprint equals the
//!   one the slot names (another key carrying the label never opens it).
//! - The ephemeral point sent to the token was validated on the host
//!   (on the curve, not the identity) by the caller
//!   (`envelope::ec_recipient`), and is validated again here.
//! - The ECDH output leaves the token as a *session* object (never on the
//!   token), readable so the host can run HKDF on it, and is destroyed
//!   right after its value is read, on every path. It is the raw shared
//!   secret of one slot: it opens that slot of that file and nothing else
//!   (docs/SECURITY.md, "Public-key KWKs and recipients").
//!
//! Scope: `key create --type ec-p256` makes version 1; rotate, disable,
//! destroy and purge of EC keys come with the generic public-key lifecycle.

use super::errors::token_error;
use super::objects::private_key_problems;
use super::Hsm;
use crate::backend::{validate_key_name, KeyRef};
use crate::envelope::ec_recipient::{spki_of_point, EcRecipient};
use crate::envelope::recipient::fingerprint_of;
use crate::error::{Error, Result};
use crate::secret::SecretKey;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

pub use super::kwk::{ec_label, EC_LABEL_PREFIX};

/// DER of the named-curve OID prime256v1 (1.2.840.10045.3.1.7), the
/// `CKA_EC_PARAMS` of every key this module makes.
pub const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The attributes the private-key check reads.
const CHECKED: [AttributeType; 9] = [
    AttributeType::Token,
    AttributeType::Private,
    AttributeType::Sensitive,
    AttributeType::Extractable,
    AttributeType::Derive,
    AttributeType::Decrypt,
    AttributeType::Unwrap,
    AttributeType::Sign,
    AttributeType::NeverExtractable,
];

/// Why a private key is weaker than `key create --type ec-p256` makes it.
fn private_problems(attrs: &[Attribute]) -> Vec<String> {
    private_key_problems(
        attrs,
        &[
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
    )
}

/// The raw point of a `CKA_EC_POINT` value: PKCS#11 says DER OCTET STRING
/// (SoftHSM2 returns `04 41 04 X Y`); some tokens return the raw point.
fn raw_point(v: &[u8]) -> Option<&[u8]> {
    match v {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 => Some(rest),
        [0x04, ..] if v.len() == 65 => Some(v),
        _ => None,
    }
}

impl Hsm {
    fn find_ec(&self, s: &Session, k: &KeyRef, class: ObjectClass) -> Result<Vec<ObjectHandle>> {
        s.find_objects(&[
            Attribute::Class(class),
            Attribute::Label(ec_label(&k.name, k.version).into_bytes()),
        ])
        .map_err(|e| token_error(e, &self.token_label, &format!("looking up EC key {k}")))
    }

    /// The SPKI DER of the public key object of `k`, if there is exactly one.
    fn ec_spki(&self, s: &Session, k: &KeyRef) -> Result<Option<Vec<u8>>> {
        let t = &self.token_label;
        let h = match self.find_ec(s, k, ObjectClass::PUBLIC_KEY)?.as_slice() {
            [] => return Ok(None),
            [h] => *h,
            _ => {
                return Err(Error::key(format!(
                    "token {t:?} has several public keys labelled {}; refusing to guess",
                    ec_label(&k.name, k.version)
                )))
            }
        };
        let attrs = s
            .get_attributes(h, &[AttributeType::EcParams, AttributeType::EcPoint])
            .map_err(|e| token_error(e, t, "reading an EC public key"))?;
        let (mut params, mut point) = (None, None);
        for a in attrs {
            match a {
                Attribute::EcParams(x) => params = Some(x),
                Attribute::EcPoint(x) => point = Some(x),
                _ => {}
            }
        }
        if params.as_deref() != Some(&P256_PARAMS[..]) {
            return Err(Error::key(format!(
                "EC key {k} on token {t:?} is not on curve P-256"
            )));
        }
        let point = point
            .as_deref()
            .and_then(raw_point)
            .ok_or_else(|| Error::key(format!("EC key {k} on token {t:?} has no usable point")))?;
        let spki = spki_of_point(point)
            .map_err(|_| Error::key(format!("EC key {k} on token {t:?} is not a P-256 point")))?;
        Ok(Some(spki))
    }

    /// The one private key of `k` whose public key has `fingerprint`,
    /// checked; `None` if this token has no such key.
    fn ec_private(
        &self,
        s: &Session,
        k: &KeyRef,
        fingerprint: &[u8; 32],
    ) -> Result<Option<ObjectHandle>> {
        let t = &self.token_label;
        match self.ec_spki(s, k)? {
            Some(spki) if fingerprint_of(&spki) == *fingerprint => {}
            _ => return Ok(None),
        }
        let h = match self.find_ec(s, k, ObjectClass::PRIVATE_KEY)?.as_slice() {
            [] => return Ok(None),
            [h] => *h,
            _ => {
                return Err(Error::key(format!(
                    "token {t:?} has several private keys labelled {}; refusing to guess",
                    ec_label(&k.name, k.version)
                )))
            }
        };
        let attrs = s
            .get_attributes(h, &CHECKED)
            .map_err(|e| token_error(e, t, "reading EC private key attributes"))?;
        let problems = private_problems(&attrs);
        if !problems.is_empty() {
            return Err(Error::key(format!(
                "refusing EC key {k} on token {t:?}: its private key is weaker than hsmseal requires ({})",
                problems.join("; ")
            )));
        }
        Ok(Some(h))
    }

    /// `key create NAME --type ec-p256`: a P-256 key pair generated in the
    /// token, version 1. Refuses a name that already has an AES, RSA or EC
    /// key.
    pub fn create_ec_key(&self, name: &str) -> Result<EcRecipient> {
        validate_key_name(name)?;
        let t = &self.token_label;
        let k = KeyRef {
            name: name.to_string(),
            version: 1,
        };
        let label = ec_label(name, 1);
        let admin = self.admin_logged_in()?;
        // A name is used by one key type only: no AES key (any version
        // ever issued), no public-key KWK of a type in the table, and no
        // EC key of this name.
        let taken_by = if !self.family(&admin, name)?.is_empty() {
            Some("an aes".to_string())
        } else if let Some(f) = self.pub_family(&admin, name)? {
            Some(format!("a {}", f.ty.name()))
        } else if !admin
            .find_objects(&[Attribute::Label(label.clone().into_bytes())])
            .map_err(|e| token_error(e, t, "looking up keys"))?
            .is_empty()
        {
            Some("an ec-p256".to_string())
        } else {
            None
        };
        if let Some(what) = taken_by {
            return Err(Error::key(format!(
                "token {t:?} already has a key {name:?} ({what} key); a name is used by one key type only: choose another name"
            )));
        }
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::EcParams(P256_PARAMS.to_vec()),
            Attribute::Verify(false),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::Derive(false),
            Attribute::Label(label.clone().into_bytes()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Derive(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::AllowedMechanisms(vec![MechanismType::ECDH1_DERIVE]),
            Attribute::Label(label.clone().into_bytes()),
        ];
        let (pub_h, priv_h) = admin
            .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
            .map_err(|e| token_error(e, t, &format!("generating {label} (EC P-256)")))?;
        let made = (|| {
            let spki = self
                .ec_spki(&admin, &k)?
                .ok_or_else(|| Error::token("the new public key is not found"))?;
            let r = EcRecipient::new(&k, spki)?;
            let h = self
                .ec_private(&admin, &k, &r.fingerprint())?
                .ok_or_else(|| Error::token("the new private key is not found"))?;
            // One derive against a fresh ephemeral key proves the token
            // does ECDH with this key as hsmseal will ask it to.
            let (point, want) = r.probe()?;
            let got = self.ecdh_raw(&admin, h, &k, &point)?;
            if got.expose() != want.expose() {
                return Err(Error::token(format!(
                    "token {t:?} derived another ECDH secret than P-256 gives"
                )));
            }
            Ok(r)
        })();
        if made.is_err() {
            let _ = admin.destroy_object(priv_h);
            let _ = admin.destroy_object(pub_h);
        }
        made
    }

    /// The EC recipient of `k`, or `None` if this token has no EC key `k`.
    pub fn export_ec_recipient(&self, name: &str, version: u32) -> Result<Option<EcRecipient>> {
        validate_key_name(name)?;
        let admin = self.admin_reading()?;
        let k = KeyRef {
            name: name.to_string(),
            version,
        };
        let Some(spki) = self.ec_spki(&admin, &k)? else {
            return Ok(None);
        };
        let r = EcRecipient::new(&k, spki)?;
        self.ec_private(&admin, &k, &r.fingerprint())?
            .ok_or_else(|| Error::key(format!("EC key {k} has no private key on this token")))?;
        Ok(Some(r))
    }

    /// `C_DeriveKey(CKM_ECDH1_DERIVE, KDF NULL, point)` into a 32-byte
    /// generic-secret session object, read and destroyed: the x-coordinate
    /// of d·point. `point` is the raw uncompressed SEC1 point (65 bytes),
    /// which SoftHSM2 2.6.1 takes as is (it also takes it DER
    /// OCTET STRING-wrapped; `getECDHPubData` tells them apart by length).
    fn ecdh_raw(
        &self,
        s: &Session,
        h: ObjectHandle,
        k: &KeyRef,
        point: &[u8],
    ) -> Result<SecretKey> {
        let t = &self.token_label;
        let mech = Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), point));
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ];
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let secret = s.derive_key(&mech, h, &template).map_err(|e| {
            Error::integrity(format!(
                "the token refused the ECDH derive for the key slot of {k} on token {t:?} (the slot's point was edited or damaged, or the token lacks CKM_ECDH1_DERIVE: {e})"
            ))
        })?;
        let value = s.get_attributes(secret, &[AttributeType::Value]);
        // Destroyed before anything else can fail: a session object would
        // otherwise live until the session closes (pooled: much later).
        let destroyed = s.destroy_object(secret);
        let value = value.map_err(|e| token_error(e, t, "reading the ECDH secret"))?;
        destroyed.map_err(|e| token_error(e, t, "destroying the ECDH secret"))?;
        let mut v = value
            .into_iter()
            .find_map(|a| match a {
                Attribute::Value(v) => Some(zeroize::Zeroizing::new(v)),
                _ => None,
            })
            .ok_or_else(|| Error::token(format!("token {t:?} returned no ECDH secret")))?;
        SecretKey::from_slice(&mut v).ok_or_else(|| {
            Error::token(format!(
                "token {t:?} returned an ECDH secret of another length"
            ))
        })
    }

    pub(super) fn ec_has(&self, k: &KeyRef, fingerprint: &[u8; 32]) -> Result<bool> {
        let s = self.session()?;
        Ok(self.ec_private(s.get(), k, fingerprint)?.is_some())
    }

    /// The ECDH shared secret of the EC key `k` (with this fingerprint) and
    /// the slot's ephemeral `point`, validated first.
    pub(super) fn ec_derive(
        &self,
        k: &KeyRef,
        fingerprint: &[u8; 32],
        point: &[u8],
    ) -> Result<SecretKey> {
        crate::envelope::ec_recipient::check_point(point).map_err(|why| {
            Error::integrity(format!(
                "the ephemeral key of the key slot of {k} is {why} (edited or damaged)"
            ))
        })?;
        let s = self.session()?;
        let h = self.ec_private(s.get(), k, fingerprint)?.ok_or_else(|| {
            Error::key(format!(
                "EC key {k} with this fingerprint is not on token {:?}",
                self.token_label
            ))
        })?;
        self.ecdh_raw(s.get(), h, k, point)
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
            Attribute::Derive(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::NeverExtractable(true),
        ];
        assert!(private_problems(&good).is_empty());
        let mut weak = good.clone();
        weak[3] = Attribute::Extractable(true);
        weak[5] = Attribute::Decrypt(true);
        weak[7] = Attribute::Sign(true);
        let p = private_problems(&weak);
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn ec_points_are_read_raw_or_der_wrapped() {
        let mut raw = vec![0x04];
        raw.extend_from_slice(&[7; 64]);
        let mut der = vec![0x04, 0x41];
        der.extend_from_slice(&raw);
        assert_eq!(raw_point(&raw), Some(&raw[..]));
        assert_eq!(raw_point(&der), Some(&raw[..]));
        assert_eq!(raw_point(&der[..60]), None);
        assert_eq!(raw_point(&[0x02; 33]), None);
    }
}
