//! The one door to key-wrapping keys (KWKs): a `KeyBackend` wraps and unwraps
//! 256-bit keys under a named, versioned KWK that it never reveals.
//!
//! The PKCS#11 backend (`crate::hsm`) is the real one; `MemoryBackend` here is
//! for unit tests of the formats only. Both implement exactly the same
//! construction — AES-256-GCM, 96-bit IV, 128-bit tag, caller-supplied AAD —
//! so a format test against the memory backend exercises the same bytes.

use crate::error::{Error, Result};
use crate::secret::SecretKey;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// GCM IV length used for every wrap (enforced: some HSMs accept others).
pub const WRAP_IV_LEN: usize = 12;
/// GCM tag length for every wrap, in bytes (enforced likewise).
pub const WRAP_TAG_LEN: usize = 16;
/// A wrapped 256-bit key: 32 bytes of ciphertext followed by the 16-byte tag.
pub const WRAPPED_KEY_LEN: usize = 32 + WRAP_TAG_LEN;

/// Longest key name; names are `[A-Za-z0-9._-]{1,64}`.
pub const MAX_KEY_NAME_LEN: usize = 64;

/// A specific version of a named KWK.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyRef {
    pub name: String,
    pub version: u32,
}

impl std::fmt::Display for KeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} v{}", self.name, self.version)
    }
}

/// A key encrypted under a KWK with AES-256-GCM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// The 12-byte GCM IV (chosen by us, or by an HSM that generates IVs).
    pub iv: [u8; WRAP_IV_LEN],
    /// Ciphertext (32 bytes) || tag (16 bytes).
    pub ciphertext: [u8; WRAPPED_KEY_LEN],
}

/// Checks a key name is one hsmseal can store in headers and labels.
pub fn validate_key_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_KEY_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "invalid key name {name:?}: use 1 to {MAX_KEY_NAME_LEN} characters from A-Z a-z 0-9 . _ -"
        )))
    }
}

/// Everything the formats need from a key store.
///
/// Implementations must be usable from several worker threads at once.
pub trait KeyBackend: Send + Sync {
    /// The version new encryptions under `name` must use (the active one).
    fn current_version(&self, name: &str) -> Result<u32>;

    /// Encrypts `key` under the KWK `kwk` with AES-256-GCM and `aad`.
    fn wrap(&self, kwk: &KeyRef, key: &SecretKey, aad: &[u8]) -> Result<WrappedKey>;

    /// Decrypts a wrapped key. A wrong tag (tampering, wrong AAD, wrong KWK)
    /// is an `ErrorKind::Integrity` error that says authentication failed.
    fn unwrap(&self, kwk: &KeyRef, wrapped: &WrappedKey, aad: &[u8]) -> Result<SecretKey>;

    /// HMAC-SHA256 of `data` under the key-derivation key (KDK) of `kwk`:
    /// the batch keys of version-2 column tokens (docs/FORMAT.md section
    /// 6). `Ok(None)` if that version has no KDK (it was created before
    /// token v2; its callers then write version-1 tokens). The KDK is used
    /// only while its KWK version is usable: a disabled, weak or destroyed
    /// version fails here as it does for `wrap`/`unwrap`.
    fn derive(&self, kwk: &KeyRef, data: &[u8]) -> Result<Option<SecretKey>> {
        let _ = (kwk, data);
        Ok(None)
    }

    /// HMAC-SHA256 of `data` under the blind-index key of the key *name*
    /// `name` (one per name, not per version, so `key rotate` leaves index
    /// values alone; docs/FORMAT.md section 6, "Blind indexes"): the
    /// per-column index keys of `columns::blind_index`. The index key is
    /// created on first use if the name has none; it is used only while
    /// `name` has a usable current version (a key whose versions are all
    /// disabled or destroyed computes no index), and `key destroy` of the
    /// last version destroys it.
    fn blind_index_mac(&self, name: &str, data: &[u8]) -> Result<SecretKey> {
        let _ = data;
        Err(Error::key(format!(
            "this key store has no blind-index keys, so no index can be computed under {name:?}"
        )))
    }

    /// Whether the key store holds an object for the version `k` (a v2
    /// file's slots under keys this store lacks are skipped without an
    /// HSM decrypt: another token opens them). A destroyed version is
    /// absent too.
    fn has_version(&self, k: &KeyRef) -> Result<bool> {
        let _ = k;
        Ok(true)
    }

    /// Whether the store holds the private key of public-key KWK version
    /// `kwk` whose public key has SPKI SHA-256 `fingerprint`.
    fn has_private_key(&self, kwk: &KeyRef, fingerprint: &[u8; 32]) -> Result<bool> {
        let _ = (kwk, fingerprint);
        Ok(false)
    }

    /// Decrypts `ciphertext` with the private key of the public-key KWK
    /// version `kwk` whose SPKI has SHA-256 `fingerprint` (RSA-OAEP, MGF1
    /// with the same hash, empty label): the 32-byte slot key of a v2
    /// public-key slot (docs/FORMAT.md section 3.3).
    fn rsa_decrypt(
        &self,
        kwk: &KeyRef,
        fingerprint: &[u8; 32],
        sha256: bool,
        ciphertext: &[u8],
    ) -> Result<SecretKey> {
        let _ = (fingerprint, sha256, ciphertext);
        Err(Error::key(format!(
            "this key store has no public-key KWKs, so it cannot open the slot of {kwk}"
        )))
    }

    /// The recipient file text (docs/FORMAT.md 3.4) of public-key KWK
    /// `name` at its current version, if this store holds such a key (its
    /// public half is on the token), so `rotate` can re-seal that key's
    /// slots to the current version without anyone handing it a recipient
    /// file. Text rather than the parsed type so this layer does not
    /// depend on the envelope layer above it.
    fn current_recipient_text(&self, name: &str) -> Result<Option<String>> {
        let _ = name;
        Ok(None)
    }

    /// Whether the store holds the private key of EC-P256 KWK version
    /// `kwk` whose public key has SPKI SHA-256 `fingerprint`.
    fn has_ec_private_key(&self, kwk: &KeyRef, fingerprint: &[u8; 32]) -> Result<bool> {
        let _ = (kwk, fingerprint);
        Ok(false)
    }

    /// The ECDH shared secret (x-coordinate, 32 bytes) of the private key
    /// of EC-P256 KWK version `kwk` whose SPKI has SHA-256 `fingerprint`
    /// and the uncompressed P-256 `point` of a v2 kind-3 slot
    /// (docs/FORMAT.md section 3.3). The point is validated first.
    fn ecdh_derive(&self, kwk: &KeyRef, fingerprint: &[u8; 32], point: &[u8]) -> Result<SecretKey> {
        let _ = (fingerprint, point);
        Err(Error::key(format!(
            "this key store has no EC keys, so it cannot open the slot of {kwk}"
        )))
    }

    /// How many calls into the key store (HSM) this backend has made so far.
    fn calls(&self) -> u64;
}

/// An in-memory key store for unit tests of the formats. Never used by the
/// binary: its keys live in process memory.
#[derive(Default)]
pub struct MemoryBackend {
    keys: Mutex<BTreeMap<String, Vec<SecretKey>>>,
    /// The KDK of each version (`None`: a version made without one).
    kdks: Mutex<BTreeMap<KeyRef, Option<SecretKey>>>,
    /// The blind-index key of each key name, made on first use.
    bidx: Mutex<BTreeMap<String, SecretKey>>,
    calls: AtomicU64,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a new version of `name` (version 1 if it is new) and returns it.
    pub fn add_version(&self, name: &str) -> u32 {
        self.add(name, true)
    }

    /// Adds a version with no KDK, as versions made before token v2 are.
    pub fn add_version_without_kdk(&self, name: &str) -> u32 {
        self.add(name, false)
    }

    fn add(&self, name: &str, kdk: bool) -> u32 {
        let mut keys = self.keys.lock().expect("memory backend lock");
        let versions = keys.entry(name.to_string()).or_default();
        versions.push(SecretKey::random());
        let v = versions.len() as u32;
        let k = KeyRef {
            name: name.to_string(),
            version: v,
        };
        let kdk = kdk.then(SecretKey::random);
        self.kdks
            .lock()
            .expect("memory backend lock")
            .insert(k, kdk);
        v
    }

    /// Sets the blind-index key of `name` (test vectors).
    pub fn set_blind_index_key(&self, name: &str, key: SecretKey) {
        self.bidx
            .lock()
            .expect("memory backend lock")
            .insert(name.to_string(), key);
    }

    /// Destroys the KDK of `k` alone (tests of a KDK gone missing).
    pub fn remove_kdk(&self, k: &KeyRef) {
        self.kdks.lock().expect("memory backend lock").remove(k);
    }

    fn cipher(&self, kwk: &KeyRef) -> Result<Aes256Gcm> {
        let keys = self.keys.lock().expect("memory backend lock");
        let k = keys
            .get(&kwk.name)
            .and_then(|v| v.get((kwk.version as usize).wrapping_sub(1)))
            .ok_or_else(|| Error::key(format!("key {kwk} not found")))?;
        Ok(Aes256Gcm::new(k.expose().into()))
    }
}

impl KeyBackend for MemoryBackend {
    fn has_version(&self, k: &KeyRef) -> Result<bool> {
        Ok(self
            .keys
            .lock()
            .expect("memory backend lock")
            .get(&k.name)
            .is_some_and(|v| k.version >= 1 && v.len() >= k.version as usize))
    }

    fn current_version(&self, name: &str) -> Result<u32> {
        let keys = self.keys.lock().expect("memory backend lock");
        match keys.get(name) {
            Some(v) if !v.is_empty() => Ok(v.len() as u32),
            _ => Err(Error::key(format!("key {name:?} not found"))),
        }
    }

    fn wrap(&self, kwk: &KeyRef, key: &SecretKey, aad: &[u8]) -> Result<WrappedKey> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let cipher = self.cipher(kwk)?;
        let mut iv = [0u8; WRAP_IV_LEN];
        rand::rngs::OsRng.fill_bytes(&mut iv);
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: key.expose(),
                    aad,
                },
            )
            .map_err(|_| Error::key("wrap failed"))?;
        let mut ciphertext = [0u8; WRAPPED_KEY_LEN];
        ciphertext.copy_from_slice(&ct);
        Ok(WrappedKey { iv, ciphertext })
    }

    fn unwrap(&self, kwk: &KeyRef, wrapped: &WrappedKey, aad: &[u8]) -> Result<SecretKey> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let cipher = self.cipher(kwk)?;
        let mut pt = cipher
            .decrypt(
                Nonce::from_slice(&wrapped.iv),
                Payload {
                    msg: &wrapped.ciphertext,
                    aad,
                },
            )
            .map_err(|_| {
                Error::integrity(format!(
                    "authentication failed unwrapping the data key with {kwk}: the data was modified or belongs to another key"
                ))
            })?;
        SecretKey::from_slice(&mut pt)
            .ok_or_else(|| Error::integrity("unwrapped key has the wrong length"))
    }

    fn derive(&self, kwk: &KeyRef, data: &[u8]) -> Result<Option<SecretKey>> {
        use hmac::Mac;
        self.cipher(kwk)?;
        let kdks = self.kdks.lock().expect("memory backend lock");
        let Some(kdk) = kdks.get(kwk) else {
            return Err(Error::key(format!(
                "the key-derivation key of {kwk} is missing: tokens under {kwk} cannot be opened"
            )));
        };
        // No KDK: nothing to sign with, so (like the HSM) no call counted.
        let Some(kdk) = kdk else { return Ok(None) };
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(kdk.expose())
            .expect("HMAC takes any key");
        mac.update(data);
        Ok(Some(SecretKey::from_bytes(
            mac.finalize().into_bytes().into(),
        )))
    }

    fn blind_index_mac(&self, name: &str, data: &[u8]) -> Result<SecretKey> {
        use hmac::Mac;
        // As in the HSM: only a name with a usable version computes indexes.
        self.current_version(name)?;
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut keys = self.bidx.lock().expect("memory backend lock");
        let key = keys
            .entry(name.to_string())
            .or_insert_with(SecretKey::random);
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key.expose())
            .expect("HMAC takes any key");
        mac.update(data);
        Ok(SecretKey::from_bytes(mac.finalize().into_bytes().into()))
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_backend_round_trip_and_rejects_wrong_aad_and_version() {
        let b = MemoryBackend::new();
        b.add_version("k");
        b.add_version("k");
        assert_eq!(b.current_version("k").unwrap(), 2);
        let v1 = KeyRef {
            name: "k".into(),
            version: 1,
        };
        let v2 = KeyRef {
            name: "k".into(),
            version: 2,
        };
        let dek = SecretKey::random();
        let w = b.wrap(&v1, &dek, b"aad").unwrap();
        assert_eq!(b.unwrap(&v1, &w, b"aad").unwrap().expose(), dek.expose());
        assert_eq!(
            b.unwrap(&v1, &w, b"aae").unwrap_err().kind(),
            crate::error::ErrorKind::Integrity
        );
        assert_eq!(
            b.unwrap(&v2, &w, b"aad").unwrap_err().kind(),
            crate::error::ErrorKind::Integrity
        );
        let missing = KeyRef {
            name: "nope".into(),
            version: 1,
        };
        assert_eq!(
            b.unwrap(&missing, &w, b"aad").unwrap_err().kind(),
            crate::error::ErrorKind::Key
        );
        assert_eq!(b.calls(), 5);
    }

    #[test]
    fn key_names_are_validated() {
        assert!(validate_key_name("backups").is_ok());
        assert!(validate_key_name("a.b_c-1").is_ok());
        for bad in ["", "a b", "a/b", "a:b", &"x".repeat(65), "é"] {
            assert!(validate_key_name(bad).is_err(), "{bad}");
        }
    }
}
