//! Recipient files of any algorithm: RSA-OAEP (`super::recipient`, slot
//! kind 2) or EC-P256 (`super::ec_recipient`, slot kind 3), told apart by
//! the `algorithm:` line, for `encrypt --recipient` and `[groups]`.
//!
//! Invariant: a file is accepted only if the parser of its algorithm
//! accepts it (each checks its fingerprint line against its key).

use super::recipient::Recipient;
use super::slots::Slot;
use crate::backend::KeyRef;
use crate::error::{Error, Result};
use crate::secret::SecretKey;

/// A recipient file of any algorithm: RSA-OAEP (kind 2 slots) or EC-P256
/// (kind 3, `super::ec_recipient`), told apart by its `algorithm:` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnyRecipient {
    Rsa(Recipient),
    Ec(super::ec_recipient::EcRecipient),
}

impl AnyRecipient {
    /// Parses a recipient file; `source` names the file in errors.
    pub fn parse(text: &str, source: &str) -> Result<AnyRecipient> {
        let f = super::recipient::Fields::parse(text, source)?;
        if f.has("algorithm") && f.get("algorithm")? == super::ec_recipient::EC_ALGORITHM {
            return Ok(AnyRecipient::Ec(
                super::ec_recipient::EcRecipient::from_fields(&f)?,
            ));
        }
        Ok(AnyRecipient::Rsa(Recipient::parse(text, source)?))
    }

    /// Reads and parses a recipient file.
    pub fn load(path: &std::path::Path) -> Result<AnyRecipient> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io_at("cannot read recipient file", path.display(), &e))?;
        AnyRecipient::parse(&text, &path.display().to_string())
    }

    /// The kind of slot this recipient seals.
    pub fn kind(&self) -> super::slots::SlotKind {
        match self {
            AnyRecipient::Rsa(_) => super::slots::SlotKind::RsaOaep,
            AnyRecipient::Ec(_) => super::slots::SlotKind::EcP256,
        }
    }

    pub fn key_ref(&self) -> KeyRef {
        match self {
            AnyRecipient::Rsa(r) => r.key_ref(),
            AnyRecipient::Ec(r) => r.key_ref(),
        }
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        match self {
            AnyRecipient::Rsa(r) => r.fingerprint(),
            AnyRecipient::Ec(r) => r.fingerprint(),
        }
    }

    pub fn to_text(&self) -> String {
        match self {
            AnyRecipient::Rsa(r) => r.to_text(),
            AnyRecipient::Ec(r) => r.to_text(),
        }
    }

    /// A v2 slot holding `dek` for this recipient (host side only).
    pub fn seal_slot(&self, n: usize, dek: &SecretKey) -> Result<Slot> {
        match self {
            AnyRecipient::Rsa(r) => r.seal_slot(n, dek),
            AnyRecipient::Ec(r) => r.seal_slot(n, dek),
        }
    }
}
