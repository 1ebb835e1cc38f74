//! EC-P256 public-key KWKs (`PubKeyType::EcP256` in `super::pubkey`, whose
//! lifecycle they share: versions, rotation, disable, destroy, purge): a
//! P-256 key pair generated in the token whose public half is exported as a
//! recipient file (`key export-public`), so hosts encrypt without the token
//! or PIN (ephemeral-static ECDH on the host, docs/FORMAT.md section 3.3,
//! slot kind 3), and whose private half does `C_DeriveKey` with
//! `CKM_ECDH1_DERIVE` and nothing else. This file holds what is EC's own:
//! reading a public key's point, the recipient's probe, and the derive
//! (the key templates are in `super::pubkey`, beside RSA's).
//!
//! Objects: the private key and the public key, both labelled
//! `hsmseal-ec:NAME:vN` (not under `hsmseal:` or `hsmseal-rsa:`, so neither
//! the AES KWK scan nor the RSA code ever takes them). Private key: token,
//! private, sensitive, never extractable, `CKA_DERIVE` true (false while
//! the version is disabled) and every other usage false,
//! `CKA_ALLOWED_MECHANISMS = { CKM_ECDH1_DERIVE }`.
//!
//! Invariants:
//! - A private key is used only after its attributes passed
//!   `pubkey::private_problems`, it is not disabled, and its public key's
//!   SPKI fingerprint equals the one the slot names (another key carrying
//!   the label never opens it): `Hsm::pub_handle`, shared with RSA.
//! - The ephemeral point sent to the token was validated on the host
//!   (on the curve, not the identity) by the caller
//!   (`envelope::ec_recipient`), and is validated again here.
//! - The ECDH output leaves the token as a *session* object (never on the
//!   token), readable so the host can run HKDF on it, and is destroyed
//!   right after its value is read, on every path. It is the raw shared
//!   secret of one slot: it opens that slot of that file and nothing else
//!   (docs/SECURITY.md, "Public-key KWKs and recipients").

use super::errors::{is_gone, is_not_permitted, token_error};
use super::pubkey::PubKeyType;
use super::Hsm;
use crate::backend::KeyRef;
use crate::envelope::ec_recipient::{spki_of_point, EcRecipient};
use crate::error::{Error, Result};
use crate::secret::SecretKey;
use cryptoki::error::Error as CkError;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

pub use super::pubkey::{ec_label, EC_LABEL_PREFIX, P256_PARAMS};

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
    /// The SPKI DER of the EC public key object `h` of `k` (`None` if it
    /// vanished while being read).
    pub(super) fn ec_spki(
        &self,
        s: &Session,
        k: &KeyRef,
        h: ObjectHandle,
    ) -> Result<Option<Vec<u8>>> {
        let t = &self.token_label;
        let attrs = match s.get_attributes(h, &[AttributeType::EcParams, AttributeType::EcPoint]) {
            Ok(a) => a,
            Err(e) if is_gone(&e) => return Ok(None),
            Err(e) => return Err(token_error(e, t, "reading an EC public key")),
        };
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

    /// The EC recipient of `k` (public key `spki`), after one derive
    /// against a fresh ephemeral key proved the token does ECDH with the
    /// private key as hsmseal will ask it to.
    pub(super) fn ec_recipient(
        &self,
        s: &Session,
        k: &KeyRef,
        spki: Vec<u8>,
    ) -> Result<EcRecipient> {
        let t = &self.token_label;
        let r = EcRecipient::new(k, spki)?;
        let h = self
            .pub_private(s, PubKeyType::EcP256, k, &r.fingerprint())?
            .ok_or_else(|| Error::key(format!("EC key {k} has no private key on token {t:?}")))?;
        let (point, want) = r.probe()?;
        let got = self
            .ecdh_raw(s, h, &point)?
            .map_err(|e| derive_refused(k, t, &e))?;
        if got.expose() != want.expose() {
            return Err(Error::token(format!(
                "token {t:?} derived another ECDH secret than P-256 gives"
            )));
        }
        Ok(r)
    }

    /// `C_DeriveKey(CKM_ECDH1_DERIVE, KDF NULL, point)` into a 32-byte
    /// generic-secret session object, read and destroyed: the x-coordinate
    /// of d·point. `point` is the raw uncompressed SEC1 point (65 bytes),
    /// which SoftHSM2 2.6.1 takes as is (it also takes it DER
    /// OCTET STRING-wrapped; `getECDHPubData` tells them apart by length).
    /// The derive's own refusal is returned inside (`Ok(Err(_))`), so the
    /// caller can tell a stale handle from a bad slot.
    fn ecdh_raw(
        &self,
        s: &Session,
        h: ObjectHandle,
        point: &[u8],
    ) -> Result<std::result::Result<SecretKey, CkError>> {
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
        let secret = match s.derive_key(&mech, h, &template) {
            Ok(secret) => secret,
            Err(e) => return Ok(Err(e)),
        };
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
        SecretKey::from_slice(&mut v).map(Ok).ok_or_else(|| {
            Error::token(format!(
                "token {t:?} returned an ECDH secret of another length"
            ))
        })
    }

    /// The ECDH shared secret of the EC key `k` (with this fingerprint) and
    /// the slot's ephemeral `point`, validated first. The checked handle is
    /// cached per run (`Hsm::pub_handle`); one the token stops accepting
    /// (destroyed, or disabled by another process) is looked up again once,
    /// and that look-up says why it cannot be used.
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
        let mut retried = false;
        loop {
            let s = self.session()?;
            let h = self.pub_handle(s.get(), PubKeyType::EcP256, k, fingerprint)?;
            match self.ecdh_raw(s.get(), h, point)? {
                Ok(z) => return Ok(z),
                Err(e) if (is_gone(&e) || is_not_permitted(&e)) && !retried => {
                    s.discard();
                    self.forget_pub();
                    retried = true;
                }
                Err(e) => return Err(derive_refused(k, &self.token_label, &e)),
            }
        }
    }
}

/// The token refused the derive of a slot whose key passed every check.
fn derive_refused(k: &KeyRef, t: &str, e: &CkError) -> Error {
    Error::integrity(format!(
        "the token refused the ECDH derive for the key slot of {k} on token {t:?} (the slot's point was edited or damaged, or the token lacks CKM_ECDH1_DERIVE: {e})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
