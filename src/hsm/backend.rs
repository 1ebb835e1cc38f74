//! `impl KeyBackend for Hsm`: the current version of a key, and wrap and
//! unwrap with AES-256-GCM inside the token (`C_Encrypt`/`C_Decrypt`) on
//! pooled sessions. A handle is used only after its attributes passed the
//! check ([`kwk::problems`]) and it is not disabled; verified handles are
//! cached per version, and a handle the token stops accepting is evicted
//! and looked up again (the invariants in `crate::hsm`). IV and tag sizes
//! are enforced here: some tokens accept weaker ones.

use super::errors::{is_bad_tag, is_gone, is_not_permitted, token_error};
use super::kwk::{self, KeyAttributes};
use super::{Hsm, Verified};
use crate::backend::{
    validate_key_name, KeyBackend, KeyRef, WrappedKey, WRAPPED_KEY_LEN, WRAP_IV_LEN, WRAP_TAG_LEN,
};
use crate::error::{Error, Result};
use crate::secret::SecretKey;
use cryptoki::error::Error as CkError;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use rand::RngCore;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use zeroize::Zeroizing;

/// What a key is used for in [`Hsm::with_key`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    Wrap,
    Unwrap,
}

impl Hsm {
    /// The usable objects of `k`, after checking their attributes (cached).
    /// Fails when none is usable: a weak object is refused naming what is
    /// weak, a disabled one as disabled.
    pub(super) fn resolve(&self, k: &KeyRef) -> Result<Arc<Verified>> {
        if let Some(v) = self
            .verified
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(k)
        {
            return Ok(v.clone());
        }
        validate_key_name(&k.name)?;
        let admin = self.admin_reading()?;
        let label = kwk::label(&k.name, k.version);
        let handles = admin
            .find_objects(&[Attribute::Label(label.clone().into_bytes())])
            .map_err(|e| token_error(e, &self.token_label, &format!("looking up key {k}")))?;
        let mut usable = Vec::new();
        let mut weak = None;
        let mut disabled = false;
        for &h in &handles {
            let attributes = match admin.get_attributes(h, kwk::CHECKED_ATTRIBUTES) {
                Ok(a) => KeyAttributes::from_attributes(&a),
                // Destroyed since the search.
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(token_error(e, &self.token_label, "reading key attributes")),
            };
            let problems = kwk::problems(&attributes);
            if !problems.is_empty() {
                weak.get_or_insert(problems);
            } else if kwk::is_disabled(&attributes) {
                disabled = true;
            } else {
                usable.push(h);
            }
        }
        if usable.is_empty() {
            return Err(if let Some(problems) = weak {
                Error::key(kwk::refusal(k, &problems))
            } else if disabled {
                Error::key(kwk::disabled_refusal(k))
            } else {
                let family = self.family(&admin, &k.name)?;
                self.missing_version(&family, k.version)
            });
        }
        let v = Arc::new(Verified {
            usable,
            labelled: handles.len(),
        });
        self.verified
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(k.clone(), v.clone());
        Ok(v)
    }

    /// Runs one wrap or unwrap, retrying once with a fresh lookup if the
    /// cached handle went stale (key destroyed and re-created, token reset,
    /// or SoftHSM2 caught rewriting the key's file by another process) or
    /// the token refuses it (disabled by another process since it was
    /// verified): the fresh lookup then reports why. A wrap needs a version
    /// carried by exactly one object. An unwrap tries each usable object of
    /// a duplicated version in turn while `wrong_key` says the last one did
    /// not authenticate the data.
    fn with_key<T>(
        &self,
        k: &KeyRef,
        purpose: Use,
        op: impl Fn(&Session, ObjectHandle) -> Result<T, CkError>,
        wrong_key: impl Fn(&CkError) -> bool,
        on_error: impl Fn(CkError) -> Error,
    ) -> Result<T> {
        let mut retried = false;
        'lookup: loop {
            let v = self.resolve(k)?;
            if purpose == Use::Wrap && v.labelled > 1 {
                return Err(self.ambiguous(k, v.labelled));
            }
            let mut last = None;
            for &h in &v.usable {
                let session = self.session()?;
                self.calls.fetch_add(1, Ordering::Relaxed);
                match op(session.get(), h) {
                    Ok(out) => return Ok(out),
                    Err(e) => {
                        session.discard();
                        if (is_gone(&e) || is_not_permitted(&e)) && !retried {
                            self.evict(k);
                            retried = true;
                            continue 'lookup;
                        }
                        if !wrong_key(&e) {
                            return Err(on_error(e));
                        }
                        last = Some(e);
                    }
                }
            }
            // Every usable object was tried and none authenticated the data.
            return Err(on_error(last.expect("resolve returns at least one object")));
        }
    }

    /// The refusal to wrap under a version several objects carry.
    fn ambiguous(&self, k: &KeyRef, n: usize) -> Error {
        Error::key(format!(
            "{n} objects on token {:?} are labelled {} (made by an older hsmseal or another PKCS#11 client); data under key {k} still decrypts (each is tried), but hsmseal wraps nothing new under a duplicated version — run `hsmseal key rotate {}` to make a new, unique current version",
            self.token_label,
            kwk::label(&k.name, k.version),
            k.name
        ))
    }
}

fn gcm_params<'a>(iv: &'a mut [u8], aad: &'a [u8]) -> Result<GcmParams<'a>, CkError> {
    GcmParams::new(iv, aad, ((WRAP_TAG_LEN * 8) as u64).into())
}

/// The IV length in GCM parameters after a call (a module may rewrite them).
fn gcm_iv_len(mech: &mut Mechanism) -> usize {
    match mech {
        Mechanism::AesGcm(p) => p.iv().len(),
        _ => 0,
    }
}

impl KeyBackend for Hsm {
    /// The highest version of `name` that is not disabled (destroyed
    /// versions have no object and so are never current). A current version
    /// with weak attributes is an error, not skipped: falling back to an
    /// older key silently would hide the problem.
    fn current_version(&self, name: &str) -> Result<u32> {
        validate_key_name(name)?;
        let cached = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied();
        let version = match cached {
            Some(v) => v,
            None => {
                let admin = self.admin_reading()?;
                let family = self.family(&admin, name)?;
                let mut found = None;
                for (v, h) in family.keys.iter().rev() {
                    if self.disabled(&admin, *h)? == Some(false) {
                        found = Some(*v);
                        break;
                    }
                }
                match found {
                    Some(v) => v,
                    None => return Err(self.no_current_version(&family)),
                }
            }
        };
        let k = KeyRef {
            name: name.to_string(),
            version,
        };
        if let Err(e) = self.resolve(&k) {
            self.forget_current(name);
            return Err(e);
        }
        self.current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), version);
        Ok(version)
    }

    fn wrap(&self, kwk: &KeyRef, key: &SecretKey, aad: &[u8]) -> Result<WrappedKey> {
        let t = &self.token_label;
        let (iv_len, iv, ct) = self.with_key(
            kwk,
            Use::Wrap,
            |session, h| {
                // Our random IV goes in; an HSM that generates GCM IVs itself
                // writes its own into the same buffer, and that is what we keep.
                let mut iv = [0u8; WRAP_IV_LEN];
                rand::rngs::OsRng.fill_bytes(&mut iv);
                let mut mech = Mechanism::AesGcm(gcm_params(&mut iv, aad)?);
                let ct = session.encrypt(&mech, h, key.expose())?;
                let iv_len = gcm_iv_len(&mut mech);
                Ok((iv_len, iv, ct))
            },
            |_| false,
            |e| token_error(e, t, &format!("wrapping a data key with {kwk}")),
        )?;
        // The format stores exactly 12 bytes of IV: a module that changed the
        // length in the parameters it was given is not one we can use.
        if iv_len != WRAP_IV_LEN {
            return Err(Error::token(format!(
                "wrapping a data key with {kwk} on token {t:?}: the module returned a {iv_len}-byte AES-GCM IV; hsmseal needs 12-byte IVs"
            )));
        }
        if ct.len() != WRAPPED_KEY_LEN {
            return Err(Error::token(format!(
                "wrapping a data key with {kwk} on token {t:?}: C_Encrypt returned {} bytes, expected {WRAPPED_KEY_LEN} (32-byte key and 16-byte tag); the module's AES-GCM output is not standard",
                ct.len()
            )));
        }
        let mut ciphertext = [0u8; WRAPPED_KEY_LEN];
        ciphertext.copy_from_slice(&ct);
        Ok(WrappedKey { iv, ciphertext })
    }

    fn unwrap(&self, kwk: &KeyRef, wrapped: &WrappedKey, aad: &[u8]) -> Result<SecretKey> {
        let t = &self.token_label;
        let mut pt = self.with_key(
            kwk,
            Use::Unwrap,
            |session, h| {
                let mut iv = wrapped.iv;
                let mech = Mechanism::AesGcm(gcm_params(&mut iv, aad)?);
                // Zeroizing from the moment the plaintext key exists: its
                // whole buffer is wiped on drop whatever happens next.
                session
                    .decrypt(&mech, h, &wrapped.ciphertext)
                    .map(Zeroizing::new)
            },
            is_bad_tag,
            |e| {
                if is_bad_tag(&e) {
                    Error::integrity(format!(
                        "authentication failed unwrapping the data key with {kwk}: the header was modified or the data belongs to another key"
                    ))
                } else {
                    token_error(e, t, &format!("unwrapping a data key with {kwk}"))
                }
            },
        )?;
        let n = pt.len();
        SecretKey::from_slice(&mut pt).ok_or_else(|| {
            Error::token(format!(
                "unwrapping a data key with {kwk} on token {t:?}: C_Decrypt returned {n} bytes, expected 32"
            ))
        })
    }

    fn derive(&self, kwk: &KeyRef, data: &[u8]) -> Result<Option<SecretKey>> {
        self.derive_with_kdk(kwk, data)
    }

    fn blind_index_mac(&self, name: &str, data: &[u8]) -> Result<SecretKey> {
        self.bidx_mac(name, data)
    }

    /// One label look-up (no token scan), or none when the version was
    /// already verified.
    fn has_version(&self, k: &KeyRef) -> Result<bool> {
        if self
            .verified
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(k)
        {
            return Ok(true);
        }
        validate_key_name(&k.name)?;
        let admin = self.admin_reading()?;
        let label = kwk::label(&k.name, k.version);
        let handles = admin
            .find_objects(&[Attribute::Label(label.into_bytes())])
            .map_err(|e| token_error(e, &self.token_label, &format!("looking up key {k}")))?;
        Ok(!handles.is_empty())
    }

    fn has_private_key(&self, kwk: &KeyRef, fingerprint: &[u8; 32]) -> Result<bool> {
        self.pub_has(super::pubkey::PubKeyType::RsaOaep, kwk, fingerprint)
    }

    fn rsa_decrypt(
        &self,
        kwk: &KeyRef,
        fingerprint: &[u8; 32],
        sha256: bool,
        ciphertext: &[u8],
    ) -> Result<SecretKey> {
        self.rsa_open(kwk, fingerprint, sha256, ciphertext)
    }

    fn current_recipient_text(&self, name: &str) -> Result<Option<String>> {
        Ok(self.current_pub_recipient(name)?.map(|r| r.to_text()))
    }

    fn has_ec_private_key(&self, kwk: &KeyRef, fingerprint: &[u8; 32]) -> Result<bool> {
        self.pub_has(super::pubkey::PubKeyType::EcP256, kwk, fingerprint)
    }

    fn ecdh_derive(&self, kwk: &KeyRef, fingerprint: &[u8; 32], point: &[u8]) -> Result<SecretKey> {
        self.ec_derive(kwk, fingerprint, point)
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}
