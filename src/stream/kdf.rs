//! Per-stream key derivation and key commitment for Cobblestone-256.
//!
//! One HKDF-Expand with HMAC-SHA-512 turns the input key, the random salt and
//! the caller's context into the AES-256-GCM key, the base nonce and the
//! 32-byte commitment. The input key is used directly as the PRK (there is no
//! HKDF-Extract step), which the `hkdf` crate refuses for a PRK shorter than
//! the hash output, so the two HKDF-Expand blocks are computed here with HMAC.

use hmac::digest::generic_array::GenericArray;
use hmac::digest::FixedOutput;
use hmac::{Hmac, Mac};
use sha2::Sha512;
use zeroize::{Zeroize, Zeroizing};

use super::params::{COMMITMENT_LEN, SALT_LEN};

/// `"c2sp.org/chunked-encryption@v1+" || AEAD name || 0x00`, the fixed start
/// of the HKDF info string; salt and context follow it.
const INFO_PREFIX: &[u8] = b"c2sp.org/chunked-encryption@v1+AEAD_AES_256_GCM\x00";

pub(super) const KEY_LEN: usize = 32;
pub(super) const NONCE_LEN: usize = 12;
/// key || base_nonce || commitment.
const OKM_LEN: usize = KEY_LEN + NONCE_LEN + COMMITMENT_LEN;
const HASH_LEN: usize = 64;

/// Everything derived for one stream. Wiped on drop.
pub(super) struct Derived {
    okm: Zeroizing<[u8; 2 * HASH_LEN]>,
}

impl Derived {
    pub(super) fn aead_key(&self) -> &[u8; KEY_LEN] {
        self.okm[..KEY_LEN].try_into().expect("fixed slice length")
    }
    pub(super) fn base_nonce(&self) -> [u8; NONCE_LEN] {
        self.okm[KEY_LEN..KEY_LEN + NONCE_LEN]
            .try_into()
            .expect("fixed slice length")
    }
    pub(super) fn commitment(&self) -> &[u8; COMMITMENT_LEN] {
        self.okm[KEY_LEN + NONCE_LEN..OKM_LEN]
            .try_into()
            .expect("fixed slice length")
    }
}

fn hmac_with(prk: &[u8; KEY_LEN]) -> Hmac<Sha512> {
    // HMAC accepts keys of any length, so this cannot fail.
    <Hmac<Sha512> as Mac>::new_from_slice(prk).expect("HMAC takes any key length")
}

/// HKDF-Expand(prk = input_key, info = INFO_PREFIX || salt || context, L = 76).
pub(super) fn derive(input_key: &[u8; KEY_LEN], salt: &[u8; SALT_LEN], context: &[u8]) -> Derived {
    let mut okm = Zeroizing::new([0u8; 2 * HASH_LEN]);
    let (t1, t2) = okm.split_at_mut(HASH_LEN);

    // T(1) = HMAC(prk, info || 0x01)
    let mut mac = hmac_with(input_key);
    mac.update(INFO_PREFIX);
    mac.update(salt);
    mac.update(context);
    mac.update(&[1]);
    mac.finalize_into(GenericArray::from_mut_slice(t1));

    // T(2) = HMAC(prk, T(1) || info || 0x02); only its first 12 bytes are used.
    let mut mac = hmac_with(input_key);
    mac.update(t1);
    mac.update(INFO_PREFIX);
    mac.update(salt);
    mac.update(context);
    mac.update(&[2]);
    mac.finalize_into(GenericArray::from_mut_slice(t2));

    // Bytes past L are not part of the output; do not keep them around.
    okm[OKM_LEN..].zeroize();
    Derived { okm }
}

/// Compares two commitments without an early exit, so the time taken does
/// not tell an attacker how many leading bytes matched.
pub(super) fn ct_eq(a: &[u8; COMMITMENT_LEN], b: &[u8; COMMITMENT_LEN]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq_detects_any_difference() {
        let a = [0x5au8; 32];
        assert!(ct_eq(&a, &a));
        for i in 0..32 {
            for bit in 0..8 {
                let mut b = a;
                b[i] ^= 1 << bit;
                assert!(!ct_eq(&a, &b));
            }
        }
    }

    #[test]
    fn derivation_depends_on_every_input() {
        let k = [1u8; 32];
        let s = [2u8; 24];
        let base = derive(&k, &s, b"ctx");
        let mut k2 = k;
        k2[31] ^= 1;
        let mut s2 = s;
        s2[0] ^= 1;
        for other in [
            derive(&k2, &s, b"ctx"),
            derive(&k, &s2, b"ctx"),
            derive(&k, &s, b"ctx\0"),
        ] {
            assert_ne!(base.commitment(), other.commitment());
            assert_ne!(base.aead_key(), other.aead_key());
        }
        assert_eq!(base.okm[OKM_LEN..], [0u8; 2 * HASH_LEN - OKM_LEN]);
    }
}
