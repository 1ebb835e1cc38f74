//! Envelopes: how a data key travels with the data it protects.
//!
//! `header` is the file format's envelope (a fixed 1024-byte header with two
//! key slots so rotation can rewrite it in place, crash-safely); `file` puts
//! the header and the chunked payload together.

pub mod file;
pub mod header;
pub mod rewrap;
