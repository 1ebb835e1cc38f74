//! hsmseal: envelope encryption at rest with key-wrapping keys held in a
//! PKCS#11 HSM. The `hsmseal` binary is a thin user of this library.

pub mod app;
pub mod columns;
pub mod commands;
pub mod error;
pub mod keys;
pub mod output;
pub mod secret;
