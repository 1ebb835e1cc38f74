//! Host-side RSA-OAEP encryption for recipient slots (RFC 8017 7.1.1,
//! empty label, MGF1 with the OAEP hash), with the modular arithmetic of
//! RustCrypto `crypto-bigint`.
//!
//! Why not `rsa::RsaPublicKey::encrypt`: `encrypt --recipient` makes one
//! RSA public-key operation per file, and the `rsa` crate's (0.9,
//! num-bigint-dig) exponentiation runs a 4-bit window over every bit of a
//! 64-bit exponent word: about 94 Montgomery multiplications for e = 65537
//! where square-and-multiply needs 17. Measured with perf on 2,000 files it
//! was the largest cost of the whole run (0.6-0.9 ms of CPU per file). Here
//! the modulus' Montgomery parameters are computed once per recipient and
//! each encryption is 16 squarings and one multiplication in
//! `crypto-bigint`'s constant-time Montgomery form.
//!
//! What is and is not constant time: the exponent and the modulus are
//! public (the recipient file), so branching on the exponent's bits leaks
//! nothing; the message (the OAEP encoding of the slot key) only ever goes
//! through `crypto-bigint`'s constant-time multiplication and reduction.
//! The `rsa` crate stays the parser of the public key and the reference the
//! unit tests compare this encoder with, byte for byte.

use super::slots::OaepHash;
use crate::error::{Error, Result};
use crypto_bigint::modular::runtime_mod::{DynResidue, DynResidueParams};
use crypto_bigint::Uint;
use rsa::traits::PublicKeyParts;
use rsa::RsaPublicKey;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// Limbs of a 3072-bit and a 4096-bit modulus (64-bit limbs).
const LIMBS_3072: usize = 3072 / 64;
const LIMBS_4096: usize = 4096 / 64;

/// An RSA public key prepared for repeated OAEP encryption.
#[derive(Clone, Debug)]
pub struct OaepPublicKey {
    /// Modulus length in bytes (`k` in RFC 8017).
    k: usize,
    e: u64,
    modulus: Modulus,
}

#[derive(Clone, Debug)]
enum Modulus {
    R3072(Box<DynResidueParams<LIMBS_3072>>),
    R4096(Box<DynResidueParams<LIMBS_4096>>),
}

impl OaepPublicKey {
    /// Prepares `key` (a 3072- or 4096-bit modulus: the sizes recipient
    /// files may name). `what` names the key in errors.
    pub fn new(key: &RsaPublicKey, what: &str) -> Result<OaepPublicKey> {
        let bad = |why: &str| Error::format(format!("{what}: {why}"));
        let n = key.n().to_bytes_be();
        let e_bytes = key.e().to_bytes_be();
        if e_bytes.len() > 8 {
            return Err(bad("its RSA exponent is too large"));
        }
        let e = e_bytes.iter().fold(0u64, |e, b| e << 8 | u64::from(*b));
        // RSA moduli are odd; the Montgomery form needs it (and would panic).
        if n.last().is_none_or(|b| b & 1 == 0) || e < 3 {
            return Err(bad("not a valid RSA public key"));
        }
        let k = key.size();
        let modulus = match k * 8 {
            3072 => Modulus::R3072(Box::new(params(&left_pad(&n, k)))),
            4096 => Modulus::R4096(Box::new(params(&left_pad(&n, k)))),
            bits => return Err(bad(&format!("a {bits}-bit RSA key (3072 or 4096 bits)"))),
        };
        Ok(OaepPublicKey { k, e, modulus })
    }

    /// RSAES-OAEP-ENCRYPT of `msg` with the random `seed` (as many bytes
    /// as the hash's output).
    pub fn encrypt_with_seed(&self, hash: OaepHash, msg: &[u8], seed: &[u8]) -> Result<Vec<u8>> {
        let em = oaep_encode(hash, msg, seed, self.k)?;
        Ok(match &self.modulus {
            Modulus::R3072(p) => pow_public(p, &em, self.e),
            Modulus::R4096(p) => pow_public(p, &em, self.e),
        })
    }

    /// RSAES-OAEP-ENCRYPT of `msg` with a fresh seed from the OS.
    pub fn encrypt(&self, hash: OaepHash, msg: &[u8]) -> Result<Vec<u8>> {
        let mut seed = Zeroizing::new(vec![0u8; hash_len(hash)]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        self.encrypt_with_seed(hash, msg, &seed)
    }
}

/// The Montgomery parameters of the odd modulus `n` (big-endian, exactly
/// `L` limbs long).
fn params<const L: usize>(n: &[u8]) -> DynResidueParams<L> {
    DynResidueParams::new(&Uint::from_be_slice(n))
}

fn left_pad(b: &[u8], k: usize) -> Vec<u8> {
    let mut v = vec![0u8; k - b.len().min(k)];
    v.extend_from_slice(b);
    v
}

fn hash_len(hash: OaepHash) -> usize {
    match hash {
        OaepHash::Sha1 => 20,
        OaepHash::Sha256 => 32,
    }
}

fn digest(hash: OaepHash, parts: &[&[u8]]) -> Vec<u8> {
    match hash {
        OaepHash::Sha1 => {
            let mut h = sha1::Sha1::new();
            parts.iter().for_each(|p| h.update(p));
            h.finalize().to_vec()
        }
        OaepHash::Sha256 => {
            let mut h = Sha256::new();
            parts.iter().for_each(|p| h.update(p));
            h.finalize().to_vec()
        }
    }
}

/// XORs MGF1(`seed`) (RFC 8017 B.2.1) into `out`.
fn mgf1_xor(hash: OaepHash, seed: &[u8], out: &mut [u8]) {
    for (counter, block) in out.chunks_mut(hash_len(hash)).enumerate() {
        let mut t = digest(hash, &[seed, &(counter as u32).to_be_bytes()]);
        block.iter_mut().zip(t.iter()).for_each(|(o, m)| *o ^= m);
        t.zeroize();
    }
}

/// EME-OAEP encoding (RFC 8017 7.1.1 step 2) with the empty label:
/// `0x00 || maskedSeed || maskedDB`, `k` bytes.
fn oaep_encode(hash: OaepHash, msg: &[u8], seed: &[u8], k: usize) -> Result<Zeroizing<Vec<u8>>> {
    let h = hash_len(hash);
    if seed.len() != h || k < 2 * h + 2 || msg.len() > k - 2 * h - 2 {
        return Err(Error::format("RSA-OAEP: message too long for the key"));
    }
    let mut em = Zeroizing::new(vec![0u8; k]);
    let (seed_part, db) = em[1..].split_at_mut(h);
    // DB = lHash || PS (zeros) || 0x01 || M
    db[..h].copy_from_slice(&digest(hash, &[b""]));
    let one = db.len() - msg.len() - 1;
    db[one] = 1;
    db[one + 1..].copy_from_slice(msg);
    mgf1_xor(hash, seed, db);
    seed_part.copy_from_slice(seed);
    mgf1_xor(hash, db, seed_part);
    Ok(em)
}

/// `em`^`e` mod n, big-endian, as long as the modulus. The exponent is
/// public, so square-and-multiply may branch on its bits.
fn pow_public<const L: usize>(p: &DynResidueParams<L>, em: &[u8], e: u64) -> Vec<u8> {
    let mut m = Uint::<L>::from_be_slice(em);
    let base = DynResidue::new(&m, *p);
    m.zeroize();
    let mut acc = base;
    for bit in (0..63 - e.leading_zeros()).rev() {
        acc = acc.square();
        if (e >> bit) & 1 == 1 {
            acc *= base;
        }
    }
    let c = acc.retrieve();
    let mut out = Vec::with_capacity(L * 8);
    for w in c.as_words().iter().rev() {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};
    use rsa::{Oaep, RsaPrivateKey};

    /// An RNG that yields `seed` and then nothing else: makes the `rsa`
    /// crate's OAEP deterministic, so its ciphertext can be compared with
    /// ours byte for byte.
    struct FixedSeed(Vec<u8>);
    impl RngCore for FixedSeed {
        fn next_u32(&mut self) -> u32 {
            unreachable!()
        }
        fn next_u64(&mut self) -> u64 {
            unreachable!()
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            assert_eq!(dest.len(), self.0.len(), "OAEP asks for one seed");
            dest.copy_from_slice(&self.0);
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> std::result::Result<(), rand::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }
    impl rand::CryptoRng for FixedSeed {}

    fn check(bits: usize, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let private = RsaPrivateKey::new(&mut rng, bits).unwrap();
        let public = RsaPublicKey::from(&private);
        let ours = OaepPublicKey::new(&public, "test key").unwrap();
        for hash in [OaepHash::Sha1, OaepHash::Sha256] {
            for len in [0usize, 1, 32, bits / 8 - 2 * hash_len(hash) - 2] {
                let mut msg = vec![0u8; len];
                rng.fill_bytes(&mut msg);
                let mut s = vec![0u8; hash_len(hash)];
                rng.fill_bytes(&mut s);
                let got = ours.encrypt_with_seed(hash, &msg, &s).unwrap();
                let want = match hash {
                    OaepHash::Sha1 => {
                        public.encrypt(&mut FixedSeed(s), Oaep::new::<sha1::Sha1>(), &msg)
                    }
                    OaepHash::Sha256 => {
                        public.encrypt(&mut FixedSeed(s), Oaep::new::<Sha256>(), &msg)
                    }
                }
                .unwrap();
                assert_eq!(got, want, "{bits} bits, {hash:?}, {len}-byte message");
                // And the random-seed path decrypts with the private key.
                let c = ours.encrypt(hash, &msg).unwrap();
                assert_eq!(c.len(), bits / 8);
                let back = match hash {
                    OaepHash::Sha1 => private.decrypt(Oaep::new::<sha1::Sha1>(), &c),
                    OaepHash::Sha256 => private.decrypt(Oaep::new::<Sha256>(), &c),
                }
                .unwrap();
                assert_eq!(back, msg);
            }
        }
    }

    #[test]
    fn equals_the_rsa_crate_byte_for_byte_at_3072_bits() {
        check(3072, 1);
    }

    #[test]
    fn equals_the_rsa_crate_byte_for_byte_at_4096_bits() {
        check(4096, 2);
    }

    #[test]
    fn refuses_messages_too_long_and_other_key_sizes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let private = RsaPrivateKey::new(&mut rng, 3072).unwrap();
        let ours = OaepPublicKey::new(&RsaPublicKey::from(&private), "k").unwrap();
        let too_long = vec![0u8; 384 - 2 * 32 - 1];
        assert!(ours.encrypt(OaepHash::Sha256, &too_long).is_err());
        assert!(ours.encrypt(OaepHash::Sha256, &too_long[1..]).is_ok());
        let small = RsaPrivateKey::new(&mut rng, 2048).unwrap();
        let e = OaepPublicKey::new(&RsaPublicKey::from(&small), "k").unwrap_err();
        assert!(e.to_string().contains("2048-bit"), "{e}");
    }
}
