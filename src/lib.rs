//! hsmseal: envelope encryption at rest with key-wrapping keys (KWKs) held
//! in a PKCS#11 HSM. Every file and every column value gets its own random
//! data key; data keys are wrapped by a KWK that never leaves the HSM. The
//! `hsmseal` command line (src/bin/hsmseal/) is one user of this library,
//! the way the `age` crate serves `rage`.
//!
//! # A short tour
//!
//! - [`backend`]: the [`KeyBackend`] trait, the one door to KWKs (current
//!   version, wrap, unwrap), and [`MemoryBackend`], an in-memory backend for
//!   tests of the formats.
//! - [`hsm`]: [`Hsm`], the PKCS#11 implementation (module, token, login,
//!   key versions and their lifecycle, `doctor`, the audit key).
//! - [`envelope`]: hsmseal files: the 1024-byte header that carries the
//!   wrapped data key ([`envelope::header`]), sealing and opening a whole
//!   file or stream ([`envelope::file`]), rewrapping one in place under the
//!   current KWK version ([`envelope::rewrap`]).
//! - [`stream`]: the payload, C2SP chunked encryption (Cobblestone-256),
//!   in constant memory on several threads.
//! - [`columns`]: column dumps (CSV, TSV, JSONL, PostgreSQL `COPY`) whose
//!   selected cells become self-contained tokens ([`columns::token`]).
//! - [`audit`]: the HSM-authenticated, hash-chained audit log.
//! - [`deps`]: which key versions data still needs (before destroying one).
//! - [`fs`]: atomic output files and file locks; [`notify`]: the library's
//!   notices; [`error`]: one error type whose kinds are the command line's
//!   exit codes; [`secret`]: zeroizing key and PIN types; [`time`].
//!
//! The library parses no arguments, prints nothing and never ends the
//! process: failures come back as [`Error`] (one line, naming the fix), and
//! the few things worth telling a person while it works (waiting for
//! another process's lock) go to the notifier a program installs with
//! [`notify::set_notifier`]. The file format is specified byte by byte in
//! docs/FORMAT.md.
//!
//! The default feature `cli` only builds the `hsmseal` binary (clap, toml,
//! indicatif, ...); a program using the library needs none of it:
//! `hsmseal = { version = "0.1", default-features = false }`.
//!
//! # Sealing and opening a stream
//!
//! Any `Read` becomes an hsmseal file under the current version of a KWK;
//! opening releases only authenticated plaintext. [`MemoryBackend`] stands
//! in for the HSM here (its keys live in process memory: for tests only).
//!
//! ```
//! use hsmseal::envelope::file;
//! use hsmseal::{KeyBackend, KeyRef, MemoryBackend, StreamOptions};
//!
//! let keys = MemoryBackend::new();
//! keys.add_version("backups");
//! let kwk = KeyRef {
//!     name: "backups".into(),
//!     version: keys.current_version("backups")?,
//! };
//! let opts = StreamOptions::default();
//!
//! let mut sealed = Vec::new();
//! file::seal(&keys, &kwk, &b"pg_dump output"[..], &mut sealed, &opts)?;
//!
//! let mut plain = Vec::new();
//! let report = file::open(&keys, &sealed[..], &mut plain, &opts)?;
//! assert_eq!(plain, b"pg_dump output");
//! assert_eq!(report.kwk, kwk);
//!
//! // One flipped byte (here in the last tag): nothing is released.
//! let last = sealed.len() - 1;
//! sealed[last] ^= 1;
//! let e = file::open(&keys, &sealed[..], &mut Vec::new(), &opts).unwrap_err();
//! assert_eq!(e.kind(), hsmseal::ErrorKind::Integrity);
//! # Ok::<(), hsmseal::Error>(())
//! ```
//!
//! # A cell token
//!
//! A value becomes a text token bound to its context, column and row, so a
//! token copied into another row does not open. One HSM call per batch of
//! tokens, not per token.
//!
//! ```
//! use hsmseal::columns::token::{binding, binding_prefix, BatchCache, ColumnId, Opener, Sealer};
//! use hsmseal::{KeyBackend, KeyRef, MemoryBackend};
//!
//! let keys = MemoryBackend::new();
//! keys.add_version("pii");
//! let kwk = KeyRef { name: "pii".into(), version: 1 };
//! let prefix = binding_prefix("app.users", &ColumnId::Name("ssn".into()));
//! let mut aad = Vec::new();
//! binding(&mut aad, &prefix, Some(b"42")); // the row's id
//!
//! let mut sealer = Sealer::new(&keys, &kwk, 10_000)?;
//! let mut token = Vec::new();
//! sealer.seal(&aad, 0, b"123-45-6789", &mut token)?;
//! assert!(token.starts_with(b"hsc2."));
//!
//! let cache = BatchCache::new();
//! let mut opener = Opener::new(&keys, &cache);
//! assert_eq!(opener.open(&aad, &token)?.1, b"123-45-6789");
//!
//! // The same token in row 43 does not open.
//! binding(&mut aad, &prefix, Some(b"43"));
//! assert!(opener.open(&aad, &token).is_err());
//! # Ok::<(), hsmseal::Error>(())
//! ```
//!
//! Whole dumps go through [`columns::encrypt`] and [`columns::decrypt`],
//! which parse the format, keep every byte outside the selected cells, and
//! spread the work over threads.
//!
//! # With an HSM
//!
//! The same calls take an [`Hsm`]: a token in a PKCS#11 module, logged in
//! once (a wrong PIN is never retried). Its KWKs are made by `hsmseal key
//! create` or [`Hsm::create_key`].
//!
//! ```no_run
//! use hsmseal::envelope::file;
//! use hsmseal::secret::Pin;
//! use hsmseal::{Hsm, KeyBackend, KeyRef, StreamOptions};
//! use std::path::Path;
//!
//! let hsm = Hsm::open(Path::new("/usr/lib/softhsm/libsofthsm2.so"), "prod")?;
//! hsm.login(&Pin::new(std::env::var("HSMSEAL_PIN").unwrap_or_default()))?;
//! let kwk = KeyRef {
//!     name: "backups".into(),
//!     version: hsm.current_version("backups")?,
//! };
//! let input = std::fs::File::open("db.sql")?;
//! let mut output = std::fs::File::create("db.sql.hseal")?;
//! file::seal(&hsm, &kwk, input, &mut output, &StreamOptions::default())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod audit;
pub mod backend;
pub mod columns;
pub mod deps;
pub mod envelope;
pub mod error;
pub mod fs;
pub mod guard;
pub mod hsm;
pub mod notify;
pub mod secret;
pub mod stream;
pub mod time;

// The common path: a key backend, a key reference, errors, stream options.
pub use backend::{KeyBackend, KeyRef, MemoryBackend};
pub use error::{Error, ErrorKind, Result};
pub use hsm::Hsm;
pub use stream::StreamOptions;
