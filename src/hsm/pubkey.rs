//! Public-key KWKs (RSA-OAEP): a key pair generated in the token whose
//! public half is exported as a recipient file (`key export-public`), so
//! hosts encrypt without the token or PIN, and whose private half opens
//! v2 key slots (`C_Decrypt`, `CKM_RSA_PKCS_OAEP`) and nothing else.
//!
//! Objects: the private key and the public key, both labelled
//! `hsmseal-rsa:NAME:vN` (not under `hsmseal:`, so the AES KWK scan, list
//! and doctor never take them for AES keys). Private key: token, private,
//! sensitive, never extractable, `CKA_DECRYPT` true and every other usage
//! false, `CKA_ALLOWED_MECHANISMS = { CKM_RSA_PKCS_OAEP }`.
//!
//! Invariant: a private key is used only after its attributes passed
//! [`private_problems`] and its public key's SPKI fingerprint equals the
//! one the slot names (so a slot can never be opened by another key that
//! happens to carry the label).
//!
//! Scope today: `key create --type rsa-oaep` makes version 1; rotate,
//! disable, destroy and purge of RSA keys are not implemented yet.

use super::errors::token_error;
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

/// Label prefix of RSA-OAEP KWK objects.
pub const RSA_LABEL_PREFIX: &str = "hsmseal-rsa:";

pub fn rsa_label(name: &str, version: u32) -> String {
    format!("{RSA_LABEL_PREFIX}{name}:v{version}")
}

fn oaep(hash: OaepHash) -> Mechanism<'static> {
    let (h, m) = match hash {
        OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
        OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
    };
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(h, m, PkcsOaepSource::empty()))
}

/// Why a private key is weaker than `key create --type rsa-oaep` makes it.
fn private_problems(attrs: &[Attribute]) -> Vec<String> {
    private_key_problems(
        attrs,
        &[
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
    )
}

fn strip_zeros(b: &[u8]) -> Vec<u8> {
    let n = b.iter().take_while(|x| **x == 0).count();
    b[n..].to_vec()
}

impl Hsm {
    fn find_rsa(&self, s: &Session, k: &KeyRef, class: ObjectClass) -> Result<Vec<ObjectHandle>> {
        s.find_objects(&[
            Attribute::Class(class),
            Attribute::Label(rsa_label(&k.name, k.version).into_bytes()),
        ])
        .map_err(|e| token_error(e, &self.token_label, &format!("looking up RSA key {k}")))
    }

    /// The SPKI DER of the public key object of `k`, if there is exactly one.
    fn rsa_spki(&self, s: &Session, k: &KeyRef) -> Result<Option<Vec<u8>>> {
        let t = &self.token_label;
        let h = match self.find_rsa(s, k, ObjectClass::PUBLIC_KEY)?.as_slice() {
            [] => return Ok(None),
            [h] => *h,
            _ => {
                return Err(Error::key(format!(
                    "token {t:?} has several public keys labelled {}; refusing to guess",
                    rsa_label(&k.name, k.version)
                )))
            }
        };
        let attrs = s
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

    /// The one private key of `k` whose public key has `fingerprint`,
    /// checked; `None` if this token has no such key.
    fn rsa_private(
        &self,
        s: &Session,
        k: &KeyRef,
        fingerprint: &[u8; 32],
    ) -> Result<Option<ObjectHandle>> {
        let t = &self.token_label;
        match self.rsa_spki(s, k)? {
            Some(spki) if fingerprint_of(&spki) == *fingerprint => {}
            _ => return Ok(None),
        }
        let h = match self.find_rsa(s, k, ObjectClass::PRIVATE_KEY)?.as_slice() {
            [] => return Ok(None),
            [h] => *h,
            _ => {
                return Err(Error::key(format!(
                    "token {t:?} has several private keys labelled {}; refusing to guess",
                    rsa_label(&k.name, k.version)
                )))
            }
        };
        let attrs = s
            .get_attributes(
                h,
                &[
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Decrypt,
                    AttributeType::Unwrap,
                    AttributeType::Sign,
                    AttributeType::Derive,
                    AttributeType::NeverExtractable,
                ],
            )
            .map_err(|e| token_error(e, t, "reading RSA private key attributes"))?;
        let problems = private_problems(&attrs);
        if !problems.is_empty() {
            return Err(Error::key(format!(
                "refusing RSA key {k} on token {t:?}: its private key is weaker than hsmseal requires ({})",
                problems.join("; ")
            )));
        }
        Ok(Some(h))
    }

    /// `key create NAME --type rsa-oaep`: an RSA key pair of `bits` (3072
    /// or 4096) generated in the token, version 1. Refuses a name that
    /// already has an AES or RSA key.
    pub fn create_rsa_key(&self, name: &str, bits: u64) -> Result<Recipient> {
        validate_key_name(name)?;
        if bits != 3072 && bits != 4096 {
            return Err(Error::usage("--bits is 3072 or 4096"));
        }
        let t = &self.token_label;
        let k = KeyRef {
            name: name.to_string(),
            version: 1,
        };
        let label = rsa_label(name, 1);
        let admin = self.admin_logged_in()?;
        let taken = !admin
            .find_objects(&[Attribute::Label(label.clone().into_bytes())])
            .map_err(|e| token_error(e, t, "looking up keys"))?
            .is_empty()
            || !admin
                .find_objects(&[Attribute::Label(super::kwk::label(name, 1).into_bytes())])
                .map_err(|e| token_error(e, t, "looking up keys"))?
                .is_empty()
            || !admin
                .find_objects(&[Attribute::Label(super::kwk::ec_label(name, 1).into_bytes())])
                .map_err(|e| token_error(e, t, "looking up keys"))?
                .is_empty();
        if taken {
            return Err(Error::key(format!(
                "token {t:?} already has a key {name:?}; choose another name"
            )));
        }
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::ModulusBits(bits.into()),
            Attribute::PublicExponent(vec![1, 0, 1]),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::Verify(false),
            Attribute::Label(label.clone().into_bytes()),
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
        ];
        let (pub_h, priv_h) = admin
            .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
            .map_err(|e| token_error(e, t, &format!("generating {label} (RSA-{bits})")))?;
        let made = (|| {
            let spki = self
                .rsa_spki(&admin, &k)?
                .ok_or_else(|| Error::token("the new public key is not found"))?;
            self.rsa_private(&admin, &k, &fingerprint_of(&spki))?
                .ok_or_else(|| Error::token("the new private key is not found"))?;
            self.recipient_from(&admin, &k, spki)
        })();
        if made.is_err() {
            let _ = admin.destroy_object(priv_h);
            let _ = admin.destroy_object(pub_h);
        }
        made
    }

    /// The recipient of `k` (the newest version if `version` is None).
    pub fn export_recipient(&self, name: &str, version: Option<u32>) -> Result<Recipient> {
        validate_key_name(name)?;
        let admin = self.admin_reading()?;
        let version = version.unwrap_or(1);
        let k = KeyRef {
            name: name.to_string(),
            version,
        };
        let spki = self.rsa_spki(&admin, &k)?.ok_or_else(|| {
            Error::key(format!(
                "no RSA-OAEP key {k} on token {:?} (make one with `hsmseal key create {name} --type rsa-oaep`)",
                self.token_label
            ))
        })?;
        self.rsa_private(&admin, &k, &fingerprint_of(&spki))?
            .ok_or_else(|| Error::key(format!("RSA key {k} has no private key on this token")))?;
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
            };
            let secret = SecretKey::random();
            let ct = r.encrypt_raw(secret.expose())?;
            let h = self
                .rsa_private(s, k, &r.fingerprint())?
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
        })
    }

    pub(super) fn rsa_has(&self, k: &KeyRef, fingerprint: &[u8; 32]) -> Result<bool> {
        let s = self.session()?;
        Ok(self.rsa_private(s.get(), k, fingerprint)?.is_some())
    }

    pub(super) fn rsa_open(
        &self,
        k: &KeyRef,
        fingerprint: &[u8; 32],
        sha256: bool,
        ciphertext: &[u8],
    ) -> Result<SecretKey> {
        let s = self.session()?;
        let h = self.rsa_private(s.get(), k, fingerprint)?.ok_or_else(|| {
            Error::key(format!(
                "RSA key {k} with this fingerprint is not on token {:?}",
                self.token_label
            ))
        })?;
        let hash = if sha256 {
            OaepHash::Sha256
        } else {
            OaepHash::Sha1
        };
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut pt =
            zeroize::Zeroizing::new(s.get().decrypt(&oaep(hash), h, ciphertext).map_err(|_| {
                Error::integrity(format!(
                    "the RSA-OAEP part of the key slot of {k} does not decrypt (edited or damaged)"
                ))
            })?);
        SecretKey::from_slice(&mut pt)
            .ok_or_else(|| Error::integrity(format!("the key slot of {k} holds a bad slot key")))
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
        assert!(private_problems(&good).is_empty());
        let mut weak = good.clone();
        weak[3] = Attribute::Extractable(true);
        weak[5] = Attribute::Unwrap(true);
        let p = private_problems(&weak);
        assert_eq!(p.len(), 2, "{p:?}");
    }
}
