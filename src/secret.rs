//! Zeroizing holders for secret key material.
//!
//! Invariant: every data key, batch key and PIN lives in one of these types
//! from the moment it is generated or read, is wiped on drop, and never
//! appears in `Debug` output.

use rand::{CryptoRng, RngCore};
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// A 256-bit symmetric key (file DEK, batch key or record DEK).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    pub const LEN: usize = 32;

    /// A fresh key from the given CSPRNG.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        SecretKey(k)
    }

    /// A fresh key from the operating system's CSPRNG (one syscall): for
    /// one-per-file keys, where the cost does not matter.
    pub fn random() -> Self {
        Self::generate(&mut rand::rngs::OsRng)
    }

    /// Takes the bytes of an unwrapped key; the caller's copy is wiped.
    pub fn from_slice(bytes: &mut [u8]) -> Option<Self> {
        if bytes.len() != 32 {
            bytes.zeroize();
            return None;
        }
        let mut k = [0u8; 32];
        k.copy_from_slice(bytes);
        bytes.zeroize();
        Some(SecretKey(k))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SecretKey(bytes)
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A token PIN.
#[derive(Clone)]
pub struct Pin(Zeroizing<String>);

impl Pin {
    pub fn new(s: String) -> Self {
        Pin(Zeroizing::new(s))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = SecretKey::from_bytes([0xAB; 32]);
        let s = format!("{k:?}");
        assert!(!s.to_lowercase().contains("ab"), "{s}");
        let p = Pin::new("123456".into());
        assert!(!format!("{p:?}").contains("123456"));
    }

    #[test]
    fn from_slice_wipes_source_and_checks_length() {
        let mut buf = [7u8; 32];
        let k = SecretKey::from_slice(&mut buf).unwrap();
        assert_eq!(buf, [0u8; 32]);
        assert_eq!(k.expose(), &[7u8; 32]);
        let mut short = [1u8; 31];
        assert!(SecretKey::from_slice(&mut short).is_none());
        assert_eq!(short, [0u8; 31]);
    }
}
