//! hsmseal: envelope encryption at rest with key-wrapping keys held in a
//! PKCS#11 HSM. The `hsmseal` binary is a thin user of this library.
//!
//! Layout: `backend` (the KeyBackend trait, the only door to KWKs), `hsm` (its
//! PKCS#11 implementation), `stream` (C2SP chunked payload encryption),
//! `envelope` (file header), `columns` (column dumps), `audit` (the audit
//! log), `deps` (which key versions data needs), `fs` (atomic files, locks),
//! `notify` (the library's notices), `error` (exit codes).

pub mod audit;
pub mod backend;
pub mod columns;
pub mod deps;
pub mod envelope;
pub mod error;
pub mod fs;
pub mod hsm;
pub mod notify;
pub mod secret;
pub mod stream;
pub mod time;
