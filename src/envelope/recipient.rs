//! Recipients: the public half of a public-key KWK, as a text file that
//! `hsmseal key export-public` writes and `encrypt --recipient FILE` reads,
//! and the host-side sealing of a v2 slot to it.
//!
//! Sealing to a recipient needs no PKCS#11 module, token or PIN: a fresh
//! 32-byte slot key is RSA-OAEP-encrypted to the public key (on the host,
//! [`super::rsa_oaep`]), and the slot key AES-256-GCM-wraps the file's DEK
//! under the slot's AAD. Only the token holding the private key can
//! decrypt the slot key (`C_Decrypt`, `CKM_RSA_PKCS_OAEP`).
//!
//! Why a slot key rather than OAEP of the DEK with the AAD as OAEP label:
//! SoftHSM2 2.6.1 ignores the OAEP label (`pSourceData`) when decrypting,
//! so a label binding would not be checked by the token; the GCM layer
//! binds every slot field on every token alike (docs/FORMAT.md 3.3).
//!
//! Invariants: a recipient is accepted only if its fingerprint line is the
//! SHA-256 of its SubjectPublicKeyInfo DER, its algorithm line names the
//! key's actual size, and its OAEP hash is one hsmseal knows.

use super::rsa_oaep::OaepPublicKey;
use super::slots::{self, hex, OaepHash, Slot, SlotKind};
use crate::backend::{validate_key_name, KeyRef, WrappedKey, WRAPPED_KEY_LEN, WRAP_IV_LEN};
use crate::error::{Error, Result};
use crate::secret::SecretKey;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::RsaPublicKey;
use sha2::{Digest, Sha256};
use std::sync::{Arc, OnceLock};

/// First line of a recipient file.
pub const RECIPIENT_MAGIC: &str = "hsmseal-recipient v1";

/// A public-key KWK version's public half.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    pub name: String,
    pub version: u32,
    /// RSA modulus size in bits (3072 or 4096).
    pub bits: usize,
    pub oaep: OaepHash,
    /// SubjectPublicKeyInfo, DER.
    pub spki: Vec<u8>,
    /// `spki` prepared for encryption, on first use.
    pub(crate) prepared: PreparedKey,
}

/// A recipient's public key prepared for RSA-OAEP encryption
/// ([`OaepPublicKey`]: its Montgomery parameters), made once per recipient
/// rather than once per file, and shared by clones. Derived from `spki`
/// alone, so it takes no part in comparisons.
#[derive(Clone, Debug, Default)]
pub(crate) struct PreparedKey(Arc<OnceLock<OaepPublicKey>>);

impl PartialEq for PreparedKey {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for PreparedKey {}

/// SHA-256 of a SubjectPublicKeyInfo DER.
pub fn fingerprint_of(spki: &[u8]) -> [u8; 32] {
    Sha256::digest(spki).into()
}

/// The `key: value` lines of a recipient file, shared by every algorithm.
pub(super) struct Fields<'a> {
    source: &'a str,
    fields: Vec<(&'a str, &'a str)>,
}

impl<'a> Fields<'a> {
    /// Checks the first line and splits the rest; each key once.
    pub(super) fn parse(text: &'a str, source: &'a str) -> Result<Fields<'a>> {
        let mut f = Fields {
            source,
            fields: Vec::new(),
        };
        let mut lines = text.lines();
        if lines.next() != Some(RECIPIENT_MAGIC) {
            return Err(f.bad(&format!("its first line is not `{RECIPIENT_MAGIC}`")));
        }
        for l in lines {
            if l.trim().is_empty() || l.starts_with('#') {
                continue;
            }
            let (k, v) = l
                .split_once(": ")
                .ok_or_else(|| f.bad(&format!("line {l:?} is not `key: value`")))?;
            if f.fields.iter().any(|(x, _)| *x == k) {
                return Err(f.bad(&format!("`{k}:` appears twice")));
            }
            f.fields.push((k, v.trim()));
        }
        Ok(f)
    }

    /// The error for a bad file: names it and the fix.
    pub(super) fn bad(&self, why: &str) -> Error {
        Error::format(format!(
            "{} is not a valid hsmseal recipient file: {why} (export it again with `hsmseal key export-public NAME` on the token that holds the key)",
            self.source
        ))
    }

    pub(super) fn has(&self, k: &str) -> bool {
        self.fields.iter().any(|(x, _)| *x == k)
    }

    pub(super) fn get(&self, k: &str) -> Result<&'a str> {
        self.fields
            .iter()
            .find(|(x, _)| *x == k)
            .map(|(_, v)| *v)
            .ok_or_else(|| self.bad(&format!("no `{k}:` line")))
    }
}

impl Recipient {
    pub fn key_ref(&self) -> KeyRef {
        KeyRef {
            name: self.name.clone(),
            version: self.version,
        }
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint_of(&self.spki)
    }

    pub fn algorithm(&self) -> String {
        format!("rsa-oaep-{}", self.bits)
    }

    pub fn to_text(&self) -> String {
        format!(
            "{RECIPIENT_MAGIC}\nname: {}\nversion: {}\nalgorithm: {}\noaep-hash: {}\npublic-key: {}\nfingerprint: sha256:{}\n",
            self.name,
            self.version,
            self.algorithm(),
            self.oaep.name(),
            B64.encode(&self.spki),
            hex(&self.fingerprint())
        )
    }

    /// Parses [`Self::to_text`]; `source` names the file in errors.
    pub fn parse(text: &str, source: &str) -> Result<Recipient> {
        let f = Fields::parse(text, source)?;
        let bad = |why: &str| f.bad(why);
        let get = |k: &str| f.get(k);
        let name = get("name")?.to_string();
        validate_key_name(&name).map_err(|_| bad("bad key name"))?;
        let version: u32 = get("version")?
            .parse()
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| bad("bad version"))?;
        let oaep = match get("oaep-hash")? {
            "sha1" => OaepHash::Sha1,
            "sha256" => OaepHash::Sha256,
            other => {
                return Err(bad(&format!(
                    "unknown oaep-hash {other:?} (sha1 or sha256)"
                )))
            }
        };
        let spki = B64
            .decode(get("public-key")?)
            .map_err(|_| bad("`public-key` is not base64"))?;
        let key = RsaPublicKey::from_public_key_der(&spki)
            .map_err(|_| bad("`public-key` is not an RSA SubjectPublicKeyInfo"))?;
        let bits = key.size() * 8;
        let algorithm = get("algorithm")?;
        if !["rsa-oaep-3072", "rsa-oaep-4096"].contains(&algorithm) {
            return Err(bad(&format!(
                "unknown algorithm {algorithm:?} (this hsmseal knows rsa-oaep-3072, rsa-oaep-4096 and ec-p256)"
            )));
        }
        let r = Recipient {
            name,
            version,
            bits,
            oaep,
            spki,
            prepared: PreparedKey::default(),
        };
        if algorithm != r.algorithm() {
            return Err(bad(&format!(
                "algorithm {algorithm:?} does not match its {bits}-bit key"
            )));
        }
        if get("fingerprint")? != format!("sha256:{}", hex(&r.fingerprint())) {
            return Err(bad(
                "its fingerprint line does not match its public key (damaged or edited)",
            ));
        }
        Ok(r)
    }

    /// Reads and parses a recipient file.
    pub fn load(path: &std::path::Path) -> Result<Recipient> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io_at("cannot read recipient file", path.display(), &e))?;
        Recipient::parse(&text, &path.display().to_string())
    }

    /// RSA-OAEP encryption of `msg` to this recipient (host side).
    pub fn encrypt_raw(&self, msg: &[u8]) -> Result<Vec<u8>> {
        let key = match self.prepared.0.get() {
            Some(k) => k,
            None => {
                let what = format!("recipient {}", self.name);
                let key = RsaPublicKey::from_public_key_der(&self.spki)
                    .map_err(|_| Error::format(format!("{what} has a bad public key")))?;
                // Another thread may have won the race: either value is the same.
                let _ = self.prepared.0.set(OaepPublicKey::new(&key, &what)?);
                self.prepared.0.get().expect("set just above")
            }
        };
        key.encrypt(self.oaep, msg)
    }

    /// A v2 slot holding `dek` for this recipient, in a header of `n`
    /// slots. Host-side only: no key store is involved.
    pub fn seal_slot(&self, n: usize, dek: &SecretKey) -> Result<Slot> {
        let slot_key = SecretKey::random();
        let transport = self.encrypt_raw(slot_key.expose())?;
        let mut slot = Slot {
            kind: SlotKind::RsaOaep,
            kwk: self.key_ref(),
            oaep: Some(self.oaep),
            fingerprint: self.fingerprint(),
            transport,
            wrapped: WrappedKey {
                iv: [0; WRAP_IV_LEN],
                ciphertext: [0; WRAPPED_KEY_LEN],
            },
        };
        slot.wrapped = gcm_wrap(&slot_key, dek, &slots::dek_aad(n, &slot))?;
        Ok(slot)
    }
}

/// AES-256-GCM of a 32-byte key under a host-held slot key.
pub fn gcm_wrap(k: &SecretKey, key: &SecretKey, aad: &[u8]) -> Result<WrappedKey> {
    let mut iv = [0u8; WRAP_IV_LEN];
    rand::rngs::OsRng.fill_bytes(&mut iv);
    let c = Aes256Gcm::new_from_slice(k.expose()).expect("32-byte key");
    let ct = c
        .encrypt(
            Nonce::from_slice(&iv),
            Payload {
                msg: key.expose(),
                aad,
            },
        )
        .map_err(|_| Error::integrity("slot wrap failed"))?;
    let mut ciphertext = [0u8; WRAPPED_KEY_LEN];
    ciphertext.copy_from_slice(&ct);
    Ok(WrappedKey { iv, ciphertext })
}

/// Opens [`gcm_wrap`]; a wrong tag is an `Integrity` error.
pub fn gcm_unwrap(k: &SecretKey, wrapped: &WrappedKey, aad: &[u8]) -> Result<SecretKey> {
    let c = Aes256Gcm::new_from_slice(k.expose()).expect("32-byte key");
    let mut pt = zeroize::Zeroizing::new(
        c.decrypt(
            Nonce::from_slice(&wrapped.iv),
            Payload {
                msg: &wrapped.ciphertext,
                aad,
            },
        )
        .map_err(|_| {
            Error::integrity(
                "key slot authentication failed (the slot was edited, moved from another file, or its fields changed)",
            )
        })?,
    );
    SecretKey::from_slice(&mut pt).ok_or_else(|| Error::integrity("bad unwrapped key length"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::slots::Header2;
    use rsa::pkcs8::EncodePublicKey;
    use rsa::{Oaep, RsaPrivateKey};

    fn pair(hash: OaepHash) -> (RsaPrivateKey, Recipient) {
        let k = RsaPrivateKey::new(&mut rand::rngs::OsRng, 3072).unwrap();
        let spki = k.to_public_key().to_public_key_der().unwrap().to_vec();
        let r = Recipient {
            name: "dr".into(),
            version: 1,
            bits: 3072,
            oaep: hash,
            spki,
            prepared: Default::default(),
        };
        (k, r)
    }

    #[test]
    fn a_sealed_slot_opens_with_the_private_key_only_under_its_aad() {
        let (k, r) = pair(OaepHash::Sha1);
        let dek = SecretKey::random();
        let slot = r.seal_slot(2, &dek).unwrap();
        assert_eq!(slot.transport.len(), 384);
        let sk = k
            .decrypt(Oaep::new::<sha1::Sha1>(), &slot.transport)
            .unwrap();
        let mut sk: [u8; 32] = sk.try_into().unwrap();
        let sk = SecretKey::from_slice(&mut sk).unwrap();
        let got = gcm_unwrap(&sk, &slot.wrapped, &slots::dek_aad(2, &slot)).unwrap();
        assert_eq!(got.expose(), dek.expose());
        // Another slot count or an edited field: refused.
        assert!(gcm_unwrap(&sk, &slot.wrapped, &slots::dek_aad(3, &slot)).is_err());
        let mut edited = slot.clone();
        edited.kwk.version = 2;
        assert!(gcm_unwrap(&sk, &slot.wrapped, &slots::dek_aad(2, &edited)).is_err());
        // And it round-trips through a v2 header.
        let h = Header2::new(vec![slot.clone(), slot.clone()]);
        assert_eq!(Header2::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn recipient_files_round_trip_and_refuse_edits() {
        let (_, r) = pair(OaepHash::Sha256);
        let text = r.to_text();
        assert_eq!(Recipient::parse(&text, "r.pub").unwrap(), r);
        let fp = format!("sha256:{}", hex(&r.fingerprint()));
        let bad_fp = fp
            .replace("sha256:", "sha256:0")
            .chars()
            .take(fp.len())
            .collect::<String>();
        for (what, edited) in [
            ("fingerprint", text.replace(&fp, &bad_fp)),
            ("algorithm", text.replace("rsa-oaep-3072", "rsa-oaep-9999")),
            (
                "algorithm size",
                text.replace("rsa-oaep-3072", "rsa-oaep-4096"),
            ),
            ("hash", text.replace("oaep-hash: sha256", "oaep-hash: md5")),
            (
                "magic",
                text.replace("hsmseal-recipient v1", "hsmseal-recipient v9"),
            ),
            ("version", text.replace("version: 1", "version: 0")),
        ] {
            let e = Recipient::parse(&edited, "r.pub").unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Format, "{what}");
            assert!(e.message().starts_with("r.pub is not a valid"), "{what}");
        }
    }
}
