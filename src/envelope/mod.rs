//! Envelopes: how a data key travels with the data it protects.
//!
//! `header` is the file format's envelope (a fixed 1024-byte header with
//! room for two key envelopes, so a rewrap can replace one in place,
//! crash-safely); `file` puts the header and the chunked payload together;
//! `rewrap` moves a file to the current KWK version (header only) or
//! re-encrypts it under a fresh data key.

pub mod file;
pub mod header;
pub mod rewrap;
