//! EC-P256 recipients and the host side of v2 slot kind 3
//! (docs/FORMAT.md sections 3.3 and 3.4).
//!
//! Sealing needs no PKCS#11 module, token or PIN: a fresh ephemeral P-256
//! key E (RustCrypto `p256`), the ECDH shared secret Z with the
//! recipient's public key, and HKDF-SHA256 of Z (salt: E's point and the
//! recipient's fingerprint; info: a domain label) give a 32-byte slot key
//! that AES-256-GCM-wraps the file's DEK under the slot's AAD, exactly as
//! the RSA slot's transported key does. The slot keeps E's point where an
//! RSA slot keeps its ciphertext. Opening: the token holding the private
//! key computes Z (`C_DeriveKey`, `CKM_ECDH1_DERIVE`, `hsm::ecdh`), then the
//! same HKDF and GCM here.
//!
//! Invariants: a recipient's point is on P-256 and not the identity (its
//! file is refused otherwise), and so is a slot's ephemeral point before
//! any token sees it; the fingerprint is the SHA-256 of the SPKI DER.

use super::recipient::{fingerprint_of, gcm_unwrap, gcm_wrap, Fields, RECIPIENT_MAGIC};
use super::slots::{self, hex, Slot, SlotKind};
use crate::backend::{validate_key_name, KeyRef, WrappedKey, WRAPPED_KEY_LEN, WRAP_IV_LEN};
use crate::error::{Error, Result};
use crate::secret::SecretKey;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
use p256::PublicKey;

/// The `algorithm:` line of an EC-P256 recipient file and the slot type.
pub const EC_ALGORITHM: &str = "ec-p256";
/// An uncompressed SEC1 P-256 point: 0x04 || X (32) || Y (32).
pub const POINT_LEN: usize = slots::EC_POINT_LEN;
/// HKDF info: domain separation of the slot key.
const SLOT_KEY_INFO: &[u8] = b"hsmseal ec-p256 slot key v1\0";

/// An EC-P256 KWK version's public half.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EcRecipient {
    pub name: String,
    pub version: u32,
    /// SubjectPublicKeyInfo, DER (id-ecPublicKey, prime256v1, uncompressed).
    pub spki: Vec<u8>,
}

/// The public key of a raw point, if it is a valid P-256 point (on the
/// curve; the identity has no 65-byte encoding).
pub fn check_point(point: &[u8]) -> std::result::Result<PublicKey, &'static str> {
    if point.len() != POINT_LEN || point[0] != 0x04 {
        return Err("not an uncompressed P-256 point");
    }
    PublicKey::from_sec1_bytes(point).map_err(|_| "not a point on P-256")
}

/// The SPKI DER of a raw point.
pub fn spki_of_point(point: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
    let k = check_point(point)?;
    Ok(k.to_public_key_der()
        .map_err(|_| "cannot encode")?
        .as_bytes()
        .to_vec())
}

fn point_of(k: &PublicKey) -> Vec<u8> {
    k.to_encoded_point(false).as_bytes().to_vec()
}

/// HKDF-SHA256(IKM = Z, salt = point || fingerprint, info = label): the
/// 32-byte key that wraps the DEK of one kind-3 slot.
pub fn slot_key(z: &SecretKey, point: &[u8], fingerprint: &[u8; 32]) -> SecretKey {
    let mut salt = Vec::with_capacity(POINT_LEN + 32);
    salt.extend_from_slice(point);
    salt.extend_from_slice(fingerprint);
    let h = hkdf::Hkdf::<sha2::Sha256>::new(Some(&salt), z.expose());
    let mut k = zeroize::Zeroizing::new([0u8; 32]);
    h.expand(SLOT_KEY_INFO, &mut k[..])
        .expect("32 bytes is a valid HKDF-SHA256 length");
    SecretKey::from_bytes(*k)
}

/// Opens a kind-3 slot of a header of `n` slots, given the ECDH secret
/// Z of its point with the private key.
pub fn open_slot(z: &SecretKey, n: usize, slot: &Slot) -> Result<SecretKey> {
    let k = slot_key(z, &slot.transport, &slot.fingerprint);
    gcm_unwrap(&k, &slot.wrapped, &slots::dek_aad(n, slot))
}

impl EcRecipient {
    /// A recipient for the key `k` with this SPKI, checked.
    pub fn new(k: &KeyRef, spki: Vec<u8>) -> Result<EcRecipient> {
        PublicKey::from_public_key_der(&spki)
            .map_err(|_| Error::key(format!("key {k} is not a P-256 public key")))?;
        Ok(EcRecipient {
            name: k.name.clone(),
            version: k.version,
            spki,
        })
    }

    pub fn key_ref(&self) -> KeyRef {
        KeyRef {
            name: self.name.clone(),
            version: self.version,
        }
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint_of(&self.spki)
    }

    fn public_key(&self) -> Result<PublicKey> {
        PublicKey::from_public_key_der(&self.spki)
            .map_err(|_| Error::format(format!("recipient {} has a bad public key", self.name)))
    }

    pub fn to_text(&self) -> String {
        format!(
            "{RECIPIENT_MAGIC}\nname: {}\nversion: {}\nalgorithm: {EC_ALGORITHM}\npublic-key: {}\nfingerprint: sha256:{}\n",
            self.name,
            self.version,
            B64.encode(&self.spki),
            hex(&self.fingerprint())
        )
    }

    /// Parses the fields of a recipient file whose algorithm is `ec-p256`.
    pub(super) fn from_fields(f: &Fields) -> Result<EcRecipient> {
        let name = f.get("name")?.to_string();
        validate_key_name(&name).map_err(|_| f.bad("bad key name"))?;
        let version: u32 = f
            .get("version")?
            .parse()
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| f.bad("bad version"))?;
        if f.has("oaep-hash") {
            return Err(f.bad("an ec-p256 key has no `oaep-hash:` line"));
        }
        let spki = B64
            .decode(f.get("public-key")?)
            .map_err(|_| f.bad("`public-key` is not base64"))?;
        // from_public_key_der checks the algorithm, the curve and that the
        // point is on it (p256's SEC1 decoding refuses other points).
        let key = PublicKey::from_public_key_der(&spki).map_err(|_| {
            f.bad("`public-key` is not a P-256 SubjectPublicKeyInfo with a point on the curve")
        })?;
        // One encoding only (uncompressed), so one key has one fingerprint.
        if key.to_public_key_der().map(|d| d.as_bytes() == spki) != Ok(true) {
            return Err(f.bad("`public-key` is not in the uncompressed form hsmseal writes"));
        }
        let r = EcRecipient {
            name,
            version,
            spki,
        };
        if f.get("fingerprint")? != format!("sha256:{}", hex(&r.fingerprint())) {
            return Err(
                f.bad("its fingerprint line does not match its public key (damaged or edited)")
            );
        }
        Ok(r)
    }

    /// A v2 slot holding `dek` for this recipient, in a header of `n`
    /// slots. Host-side only: no key store is involved.
    pub fn seal_slot(&self, n: usize, dek: &SecretKey) -> Result<Slot> {
        let e = p256::ecdh::EphemeralSecret::random(&mut rand::rngs::OsRng);
        let point = point_of(&e.public_key());
        let mut z = zeroize::Zeroizing::new([0u8; 32]);
        z.copy_from_slice(e.diffie_hellman(&self.public_key()?).raw_secret_bytes());
        self.slot_from(n, dek, point, &SecretKey::from_bytes(*z))
    }

    fn slot_from(&self, n: usize, dek: &SecretKey, point: Vec<u8>, z: &SecretKey) -> Result<Slot> {
        let fingerprint = self.fingerprint();
        let k = slot_key(z, &point, &fingerprint);
        let mut slot = Slot {
            kind: SlotKind::EcP256,
            kwk: self.key_ref(),
            oaep: None,
            fingerprint,
            transport: point,
            wrapped: WrappedKey {
                iv: [0; WRAP_IV_LEN],
                ciphertext: [0; WRAPPED_KEY_LEN],
            },
        };
        slot.wrapped = gcm_wrap(&k, dek, &slots::dek_aad(n, &slot))?;
        Ok(slot)
    }

    /// A fresh ephemeral point and the ECDH secret the private key must
    /// derive from it (checks a new key in the token).
    pub fn probe(&self) -> Result<(Vec<u8>, SecretKey)> {
        let e = p256::ecdh::EphemeralSecret::random(&mut rand::rngs::OsRng);
        let mut z = zeroize::Zeroizing::new([0u8; 32]);
        z.copy_from_slice(e.diffie_hellman(&self.public_key()?).raw_secret_bytes());
        Ok((point_of(&e.public_key()), SecretKey::from_bytes(*z)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::any_recipient::AnyRecipient;
    use crate::envelope::slots::Header2;
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use sha2::{Digest, Sha256};

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn fixed(label: &str) -> p256::SecretKey {
        p256::SecretKey::from_slice(&Sha256::digest(label.as_bytes())).unwrap()
    }

    fn recipient(d: &p256::SecretKey) -> EcRecipient {
        let spki = d
            .public_key()
            .to_public_key_der()
            .unwrap()
            .as_bytes()
            .to_vec();
        EcRecipient::new(
            &KeyRef {
                name: "dr".into(),
                version: 1,
            },
            spki,
        )
        .unwrap()
    }

    fn z_of(d: &p256::SecretKey, point: &[u8]) -> SecretKey {
        let p = check_point(point).unwrap();
        let s = p256::ecdh::diffie_hellman(d.to_nonzero_scalar(), p.as_affine());
        SecretKey::from_bytes((*s.raw_secret_bytes()).into())
    }

    /// The vector of docs/FORMAT.md section 3.3 ("Test vector, kind 3"),
    /// also computed by scripts/ec-slot-vector.py.
    #[test]
    fn documented_vector() {
        let d = fixed("hsmseal ec-p256 test recipient");
        let e = fixed("hsmseal ec-p256 test ephemeral");
        let r = recipient(&d);
        let point = point_of(&e.public_key());
        let z = z_of(&d, &point);
        // Z is symmetric: the ephemeral side gives the same.
        assert_eq!(z.expose(), z_of(&e, &point_of(&d.public_key())).expose());
        let fp = r.fingerprint();
        let k = slot_key(&z, &point, &fp);
        let dek = SecretKey::from_bytes([0x11; 32]);
        let iv = [0x22u8; 12];
        let slot = r.slot_from(1, &dek, point.clone(), &z).unwrap();
        let ct = aes_gcm::Aes256Gcm::new_from_slice(k.expose())
            .unwrap()
            .encrypt(
                aes_gcm::Nonce::from_slice(&iv),
                Payload {
                    msg: dek.expose(),
                    aad: &slots::dek_aad(1, &slot),
                },
            )
            .unwrap();
        let got = [
            hex(&r.spki),
            hex(&fp),
            hex(&point),
            hex(z.expose()),
            hex(k.expose()),
            hex(&ct),
        ];
        let want = [
            VECTOR_SPKI,
            VECTOR_FINGERPRINT,
            VECTOR_POINT,
            VECTOR_Z,
            VECTOR_K,
            VECTOR_WRAPPED,
        ];
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g, w, "got {got:#?}");
        }
        // And the documented wrap opens with the documented key.
        let mut s = slot.clone();
        s.wrapped.iv = iv;
        s.wrapped.ciphertext.copy_from_slice(&unhex(VECTOR_WRAPPED));
        assert_eq!(open_slot(&z, 1, &s).unwrap().expose(), dek.expose());
    }

    const VECTOR_SPKI: &str =
        "3059301306072a8648ce3d020106082a8648ce3d03010703420004661cb5b9fdc31acd7f7c91cf16c95d8291b7d9ecb28d94d03adaa70bf4c92e2f34a8327c9f8eac60229d00ba732af5fe396fcdeb51405dae5265df4575b3800b";
    const VECTOR_FINGERPRINT: &str =
        "ee49fb6c8189de98fa0352b5284ebc992b72348871d9c8ac85a094134f46f9b0";
    const VECTOR_POINT: &str =
        "0469f0d466fc0207e157d4dfb3c25c99da31f5be8300d4eee4ed72fa9cfb6282eb0bdcd6a23d50f6d420e35c4f95436ef907f3864e69061a22736e07e9f26e604d";
    const VECTOR_Z: &str = "262f40b2c9ec9ed57aa85de64d6763eb959d84ec208f5d8e5864914d76e677ab";
    const VECTOR_K: &str = "b593e77bdfe0db872bcbfe0c42bf86ef1d11d7c58714a444d241c9935451abc1";
    const VECTOR_WRAPPED: &str =
        "a78d4da7249d62cad0963c796c452d10a4c6803f43331acfada94c5daceb159cb915edbd200458a1547e5968443e66d3";

    #[test]
    fn a_sealed_slot_opens_with_the_private_key_only_under_its_aad() {
        let d = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let r = recipient(&d);
        let dek = SecretKey::random();
        let slot = r.seal_slot(2, &dek).unwrap();
        assert_eq!(slot.transport.len(), POINT_LEN);
        let z = z_of(&d, &slot.transport);
        assert_eq!(open_slot(&z, 2, &slot).unwrap().expose(), dek.expose());
        // Another slot count, an edited field or point, or another
        // private key: refused.
        assert!(open_slot(&z, 3, &slot).is_err());
        let mut edited = slot.clone();
        edited.kwk.version = 2;
        assert!(open_slot(&z, 2, &edited).is_err());
        let mut edited = slot.clone();
        edited.fingerprint[0] ^= 1;
        assert!(open_slot(&z, 2, &edited).is_err());
        let other = p256::SecretKey::random(&mut rand::rngs::OsRng);
        assert!(open_slot(&z_of(&other, &slot.transport), 2, &slot).is_err());
        // Two seals differ (fresh ephemeral key each time).
        assert_ne!(r.seal_slot(2, &dek).unwrap().transport, slot.transport);
        // It round-trips through a v2 header.
        let h = Header2::new(vec![slot.clone(), slot]);
        assert_eq!(Header2::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn points_off_the_curve_are_refused() {
        let d = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let mut p = point_of(&d.public_key());
        assert!(check_point(&p).is_ok());
        p[64] ^= 1; // y changed: off the curve
        assert_eq!(check_point(&p).unwrap_err(), "not a point on P-256");
        assert!(check_point(&[0]).is_err()); // the identity
        assert!(check_point(&[0x04; 65][..]).is_err());
        assert!(check_point(&point_of(&d.public_key())[..33]).is_err());
    }

    #[test]
    fn recipient_files_round_trip_and_refuse_edits() {
        let d = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let r = recipient(&d);
        let text = r.to_text();
        assert!(text.contains("algorithm: ec-p256\n"), "{text}");
        assert_eq!(
            AnyRecipient::parse(&text, "r.pub").unwrap(),
            AnyRecipient::Ec(r.clone())
        );
        let b64 = B64.encode(&r.spki);
        // A point off the curve, with a fingerprint that matches it.
        let mut off = r.spki.clone();
        let last = off.len() - 1;
        off[last] ^= 1;
        let off_text = text
            .replace(&b64, &B64.encode(&off))
            .replace(&hex(&r.fingerprint()), &hex(&fingerprint_of(&off)));
        // The same key compressed: a second encoding, refused.
        let compressed = {
            let p = d.public_key().to_encoded_point(true);
            let mut der = unhex("3039301306072a8648ce3d020106082a8648ce3d030107032200");
            der.extend_from_slice(p.as_bytes());
            der
        };
        let comp_text = text
            .replace(&b64, &B64.encode(&compressed))
            .replace(&hex(&r.fingerprint()), &hex(&fingerprint_of(&compressed)));
        for (what, edited) in [
            ("off-curve point", off_text),
            ("compressed point", comp_text),
            ("fingerprint", text.replace("sha256:", "sha256:0")),
            ("algorithm", text.replace("ec-p256", "ec-p999")),
            (
                "oaep line",
                text.replace("algorithm:", "oaep-hash: sha1\nalgorithm:"),
            ),
            ("version", text.replace("version: 1", "version: 0")),
        ] {
            let e = AnyRecipient::parse(&edited, "r.pub").unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Format, "{what}");
            assert!(e.message().starts_with("r.pub is not a valid"), "{what}");
        }
    }
}
