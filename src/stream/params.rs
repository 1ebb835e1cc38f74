//! The payload's sizes (C2SP chunked encryption v1, Cobblestone-256:
//! https://c2sp.org/chunked-encryption), in a file of their own so the
//! stream's parts (`mod.rs`, `engine`, `kdf`) all import them from below
//! instead of from each other.

/// Plaintext bytes in every chunk but the final one.
pub const CHUNK_SIZE: usize = 16384;
/// AES-GCM tag appended to every chunk.
pub const TAG_LEN: usize = 16;
/// Random salt at the start of the payload.
pub const SALT_LEN: usize = 24;
/// Key commitment after the salt.
pub const COMMITMENT_LEN: usize = 32;
/// Salt and commitment.
pub const PAYLOAD_HEADER_LEN: usize = SALT_LEN + COMMITMENT_LEN;

/// A full chunk as stored.
pub(super) const ENC_CHUNK_LEN: usize = CHUNK_SIZE + TAG_LEN;
