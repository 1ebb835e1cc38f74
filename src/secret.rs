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

/// A token PIN (user or SO).
///
/// Where it comes from must not leave copies behind either: a PIN is read
/// into a buffer allocated once at its final size (a `String` grown while
/// reading would leave an unwiped copy in freed memory at each
/// reallocation), and that buffer becomes the `Pin`'s own storage.
#[derive(Clone)]
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Takes ownership of the text (moved, not copied).
    pub fn new(s: String) -> Self {
        Pin(Zeroizing::new(s))
    }

    /// Takes text that was already held in a zeroizing buffer.
    pub fn from_zeroizing(s: Zeroizing<String>) -> Self {
        Pin(s)
    }

    /// Takes the bytes of a PIN as read (a PIN file, an environment
    /// variable): the buffer itself becomes the PIN, without a copy, if it
    /// is UTF-8; it is wiped and `None` returned if not.
    pub fn from_utf8(mut bytes: Zeroizing<Vec<u8>>) -> Option<Self> {
        // `take` moves the allocation out and leaves an empty one behind.
        match String::from_utf8(std::mem::take(&mut *bytes)) {
            Ok(s) => Some(Pin(Zeroizing::new(s))),
            Err(e) => {
                drop(Zeroizing::new(e.into_bytes()));
                None
            }
        }
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
    fn a_pin_from_bytes_is_the_buffer_itself_never_a_copy() {
        let mut buf = Zeroizing::new(Vec::with_capacity(64));
        buf.extend_from_slice(b"user-pin-42");
        let at = buf.as_ptr();
        let pin = Pin::from_utf8(buf).unwrap();
        assert_eq!(pin.expose(), "user-pin-42");
        assert_eq!(pin.expose().as_ptr(), at, "copied");
        assert!(Pin::from_utf8(Zeroizing::new(vec![0xff, b'1'])).is_none());
        let s = String::from("moved");
        let at = s.as_ptr();
        assert_eq!(Pin::new(s).expose().as_ptr(), at, "copied");
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
