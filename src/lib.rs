//! hsmseal: envelope encryption at rest with key-wrapping keys held in a
//! PKCS#11 HSM. The `hsmseal` binary is a thin user of this library.
//!
//! Layout: `backend` (the KeyBackend trait, the only door to KWKs), `hsm` (its
//! PKCS#11 implementation), `stream` (C2SP chunked payload encryption),
//! `envelope` (file header), `columns` (column dumps), `commands` (one module
//! per subcommand), `config`, `output` (atomic files), `error` (exit codes).

pub mod app;
pub mod audit;
pub mod backend;
pub mod cli;
pub mod columns;
pub mod commands;
pub mod config;
pub mod deps;
pub mod envelope;
pub mod error;
pub mod fs;
pub mod hardening;
pub mod hsm;
pub mod notify;
pub mod secret;
pub mod signals;
pub mod stream;
pub mod time;
