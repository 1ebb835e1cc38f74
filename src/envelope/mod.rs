//! Envelopes: how a data key travels with the data it protects.
//!
//! `header` is the v1 file header (a fixed 1024-byte header with room for
//! two key envelopes, so a rewrap can replace one in place, crash-safely);
//! `slots` is the v2 header (the data key wrapped once per KWK or
//! recipient, the whole slot set in two places A/B); `recipient` (RSA-OAEP)
//! and `ec_recipient` (EC-P256) seal a v2 slot to a public key on the host,
//! `any_recipient` reads a recipient file of either algorithm; `file` puts a header and the
//! chunked payload together; `rewrap` moves a file to the current KWK
//! versions (header only) or re-encrypts it under a fresh data key.
//!
//! Invariant: one key with no group writes v1 byte for byte as before;
//! readers take both versions.

pub mod any_recipient;
pub mod ec_recipient;
pub mod file;
pub mod header;
pub mod recipient;
pub mod rewrap;
pub mod rsa_oaep;
pub mod slots;
