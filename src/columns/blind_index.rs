//! Blind indexes: a keyed, truncated hash of a column's (optionally
//! normalised) plaintext, written into a companion column so a database can
//! find rows by equality without decrypting (docs/FORMAT.md section 6,
//! "Blind indexes"; what they leak: docs/SECURITY.md, "Blind indexes: what
//! they leak").
//!
//! ```text
//! k_col = HMAC-SHA256(index key of the key name,           # C_Sign in the HSM,
//!           lp("hsmseal/bidx/v1") || lp(context)           # once per column per run
//!           || lp(column id) || u8(normalisation) || u16be(bits))
//! index = lowercase hex of the first bits/8 bytes of HMAC-SHA256(k_col, normalise(value))
//! ```
//!
//! Invariants:
//! - The index key never leaves the HSM; `k_col` lives in a zeroizing
//!   [`SecretKey`] for the indexer's life and is never in `Debug` output.
//! - Context, column, normalisation and length are all in `k_col`'s input:
//!   indexes of different columns, tables or settings are unrelated, so
//!   equal values are linkable only within one column of one table.
//! - The index key is per key *name*: `key rotate` leaves index values
//!   unchanged; destroying the key's last version destroys it.
//! - NULL has no index (callers keep NULL); `''` is a value and has one.

use super::token::ColumnId;
use crate::backend::KeyBackend;
use crate::error::{Error, Result};
use crate::secret::SecretKey;
use hmac::Mac;

/// Domain separation string of the per-column key derivation.
pub const BIDX_DOMAIN: &[u8] = b"hsmseal/bidx/v1";
/// Default index length in bits.
pub const DEFAULT_BITS: u16 = 64;
/// Shortest index allowed, in bits.
pub const MIN_BITS: u16 = 16;
/// Longest index allowed, in bits (a whole HMAC-SHA256).
pub const MAX_BITS: u16 = 256;

/// How a value is normalised before it is hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalize {
    /// The exact bytes (code 0).
    #[default]
    None,
    /// UTF-8 only: Unicode white space trimmed at both ends, then
    /// `str::to_lowercase` (full Unicode lower-casing) (code 1).
    LowerTrim,
}

impl Normalize {
    /// Every mode, for help texts and parsing.
    pub const ALL: [Normalize; 2] = [Normalize::None, Normalize::LowerTrim];

    /// The code bound into `k_col`.
    pub fn code(self) -> u8 {
        match self {
            Normalize::None => 0,
            Normalize::LowerTrim => 1,
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Normalize::None => "none",
            Normalize::LowerTrim => "lower-trim",
        }
    }

    /// Parses a name from [`Self::name`].
    pub fn parse(s: &str) -> Result<Normalize> {
        Self::ALL
            .into_iter()
            .find(|n| n.name() == s)
            .ok_or_else(|| {
                Error::usage(format!(
                    "unknown blind-index normalisation {s:?}: use none or lower-trim"
                ))
            })
    }

    /// `value` normalised; `buf` holds the result when it differs.
    pub fn apply<'v>(self, value: &'v [u8], buf: &'v mut Vec<u8>) -> Result<&'v [u8]> {
        match self {
            Normalize::None => Ok(value),
            Normalize::LowerTrim => {
                let s = std::str::from_utf8(value).map_err(|e| {
                    Error::format(format!(
                        "the value is not UTF-8 (invalid byte at {}), which blind-index normalisation lower-trim needs; use --blind-index-normalize none for binary values",
                        e.valid_up_to() + 1
                    ))
                })?;
                buf.clear();
                let t = s.trim();
                // ASCII needs no allocation beyond `buf`.
                if t.is_ascii() {
                    buf.extend(t.bytes().map(|b| b.to_ascii_lowercase()));
                } else {
                    buf.extend_from_slice(t.to_lowercase().as_bytes());
                }
                Ok(buf)
            }
        }
    }
}

/// Checks an index length: 16..=256, a multiple of 8.
pub fn check_bits(bits: u16) -> Result<()> {
    if (MIN_BITS..=MAX_BITS).contains(&bits) && bits.is_multiple_of(8) {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "blind-index length {bits} bits is not allowed: use a multiple of 8 from {MIN_BITS} to {MAX_BITS} (64 by default; see docs/SECURITY.md, \"Blind indexes: what they leak\")"
        )))
    }
}

/// One `--blind-index COL[=TARGET]` of a dump run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlindIndexSpec {
    /// The encrypted column whose plaintext is indexed.
    pub column: String,
    /// The companion column the index is written into.
    pub target: String,
    pub bits: u16,
    pub normalize: Normalize,
}

impl BlindIndexSpec {
    /// `COL[=TARGET]` (TARGET defaults to `COL_bidx`).
    pub fn parse(s: &str, bits: u16, normalize: Normalize) -> Result<BlindIndexSpec> {
        let (column, target) = match s.split_once('=') {
            Some((c, t)) => (c.to_string(), t.to_string()),
            None => (s.to_string(), format!("{s}_bidx")),
        };
        if column.is_empty() || target.is_empty() {
            return Err(Error::usage(format!(
                "--blind-index {s:?}: use COL or COL=TARGET"
            )));
        }
        check_bits(bits)?;
        Ok(BlindIndexSpec {
            column,
            target,
            bits,
            normalize,
        })
    }
}

/// The column id bound into `k_col`, encoded as the token binding encodes
/// it: `u8(1) || lp(name)` or `u8(2) || u32be(position)`.
pub fn column_id(column: &ColumnId) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    match column {
        ColumnId::Name(n) => {
            b.push(1);
            b.extend_from_slice(&(n.len() as u32).to_be_bytes());
            b.extend_from_slice(n.as_bytes());
        }
        ColumnId::Index(i) => {
            b.push(2);
            b.extend_from_slice(&i.to_be_bytes());
        }
    }
    b
}

/// The input of `k_col`'s derivation (what the HSM signs).
pub fn derivation_input(
    context: &str,
    column_id: &[u8],
    bits: u16,
    normalize: Normalize,
) -> Vec<u8> {
    let mut d = Vec::with_capacity(32 + context.len() + column_id.len());
    for part in [BIDX_DOMAIN, context.as_bytes(), column_id] {
        d.extend_from_slice(&(part.len() as u32).to_be_bytes());
        d.extend_from_slice(part);
    }
    d.push(normalize.code());
    d.extend_from_slice(&bits.to_be_bytes());
    d
}

/// Computes the index values of one column. `Sync`: workers share one.
pub struct BlindIndexer {
    k_col: SecretKey,
    bits: u16,
    normalize: Normalize,
}

impl std::fmt::Debug for BlindIndexer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlindIndexer")
            .field("bits", &self.bits)
            .field("normalize", &self.normalize)
            .finish_non_exhaustive()
    }
}

impl BlindIndexer {
    /// Derives the column key with one call into `backend` (the HSM's
    /// `C_Sign` under the index key of `key`). `column_id` is
    /// [`column_id`]'s encoding. Fails on a bad `bits`, or when `key` has
    /// no usable version or its index key is refused (weak, duplicated).
    pub fn new(
        backend: &dyn KeyBackend,
        key: &str,
        context: &str,
        column_id: &[u8],
        bits: u16,
        normalize: Normalize,
    ) -> Result<Self> {
        check_bits(bits)?;
        let input = derivation_input(context, column_id, bits, normalize);
        let k_col = backend.blind_index_mac(key, &input)?;
        Ok(BlindIndexer {
            k_col,
            bits,
            normalize,
        })
    }

    /// Index length in bits.
    pub fn bits(&self) -> u16 {
        self.bits
    }

    /// Appends the index of `value` (lowercase hex, `bits / 4` characters)
    /// to `out`. Fails only for a value `lower-trim` cannot normalise (not
    /// UTF-8); `out` is then unchanged.
    pub fn index(&self, value: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let mut buf = Vec::new();
        let v = self.normalize.apply(value, &mut buf)?;
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(self.k_col.expose())
            .expect("HMAC takes any key");
        mac.update(v);
        let full = mac.finalize().into_bytes();
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for b in &full[..usize::from(self.bits / 8)] {
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 15)]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    fn indexer(
        b: &MemoryBackend,
        key: &str,
        ctx: &str,
        col: &str,
        bits: u16,
        n: Normalize,
    ) -> BlindIndexer {
        BlindIndexer::new(
            b,
            key,
            ctx,
            &column_id(&ColumnId::Name(col.into())),
            bits,
            n,
        )
        .unwrap()
    }

    fn idx(i: &BlindIndexer, v: &[u8]) -> String {
        let mut out = Vec::new();
        i.index(v, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// docs/FORMAT.md section 6, "Blind indexes", test vector (also
    /// computed by scripts/bidx-vector.py with Python's hmac alone; the
    /// test `spec_vector_matches_python` in tests/columns_bidx.rs runs it).
    #[test]
    fn spec_test_vector() {
        let b = MemoryBackend::new();
        b.add_version("pii");
        b.set_blind_index_key(
            "pii",
            SecretKey::from_bytes(std::array::from_fn(|i| 0xc0 + i as u8)),
        );
        let v = b" Alice@X.org ";
        for (n, bits, want) in [
            (Normalize::LowerTrim, 64, "cd8479761da46488"),
            (Normalize::None, 64, "29b11ffd035face9"),
            (Normalize::None, 128, "26ff93d9767936b7bc6ec6a5e79c5386"),
        ] {
            assert_eq!(
                idx(&indexer(&b, "pii", "app.users", "email", bits, n), v),
                want
            );
        }
    }

    #[test]
    fn equal_values_match_and_every_parameter_separates() {
        let b = MemoryBackend::new();
        b.add_version("pii");
        b.add_version("other");
        let base = indexer(&b, "pii", "app.users", "email", 64, Normalize::None);
        let a = idx(&base, b"alice@x.org");
        assert_eq!(a.len(), 16);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(a, idx(&base, b"alice@x.org"));
        assert_ne!(a, idx(&base, b"bob@x.org"));
        // '' is a value with its own index.
        assert_eq!(idx(&base, b"").len(), 16);
        assert_ne!(idx(&base, b""), a);
        for other in [
            indexer(&b, "pii", "app.people", "email", 64, Normalize::None),
            indexer(&b, "pii", "app.users", "mail", 64, Normalize::None),
            indexer(&b, "other", "app.users", "email", 64, Normalize::None),
            indexer(&b, "pii", "app.users", "email", 64, Normalize::LowerTrim),
        ] {
            assert_ne!(idx(&other, b"alice@x.org"), a, "{other:?}");
        }
        // Another length is unrelated, not a prefix.
        let long = idx(
            &indexer(&b, "pii", "app.users", "email", 128, Normalize::None),
            b"alice@x.org",
        );
        assert_eq!(long.len(), 32);
        assert!(!long.starts_with(&a));
        // A position binds differently from a name.
        let pos = BlindIndexer::new(
            &b,
            "pii",
            "app.users",
            &column_id(&ColumnId::Index(2)),
            64,
            Normalize::None,
        )
        .unwrap();
        assert_ne!(idx(&pos, b"alice@x.org"), a);
        // Rotation keeps index values (the key is per name).
        b.add_version("pii");
        assert_eq!(
            idx(
                &indexer(&b, "pii", "app.users", "email", 64, Normalize::None),
                b"alice@x.org"
            ),
            a
        );
    }

    #[test]
    fn lower_trim_folds_case_and_unicode_white_space_and_refuses_non_utf8() {
        let b = MemoryBackend::new();
        b.add_version("pii");
        let lt = indexer(&b, "pii", "c", "email", 64, Normalize::LowerTrim);
        let none = indexer(&b, "pii", "c", "email", 64, Normalize::None);
        assert_eq!(idx(&lt, b" Alice@X.org "), idx(&lt, b"alice@x.org"));
        assert_ne!(idx(&none, b" Alice@X.org "), idx(&none, b"alice@x.org"));
        // U+00A0 and U+3000 are Unicode white space; Ä lower-cases to ä.
        assert_eq!(
            idx(&lt, "\u{a0}ÄBC\u{3000}\t".as_bytes()),
            idx(&lt, "äbc".as_bytes())
        );
        // Inner space is kept.
        assert_ne!(idx(&lt, b"a b"), idx(&lt, b"ab"));
        let mut out = b"x".to_vec();
        let e = lt.index(b"\xffabc", &mut out).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Format);
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        assert_eq!(out, b"x");
        // `none` indexes any bytes.
        assert_eq!(idx(&none, b"\xffabc").len(), 16);
    }

    #[test]
    fn bits_specs_and_names_are_checked() {
        for ok in [16, 24, 64, 256] {
            check_bits(ok).unwrap();
        }
        for bad in [0, 8, 12, 65, 264, 1024] {
            assert_eq!(
                check_bits(bad).unwrap_err().kind(),
                crate::error::ErrorKind::Usage,
                "{bad}"
            );
        }
        let s = BlindIndexSpec::parse("email", 64, Normalize::None).unwrap();
        assert_eq!(s.target, "email_bidx");
        let s = BlindIndexSpec::parse("email=e_idx", 32, Normalize::LowerTrim).unwrap();
        assert_eq!(
            (s.column.as_str(), s.target.as_str(), s.bits),
            ("email", "e_idx", 32)
        );
        assert!(BlindIndexSpec::parse("=x", 64, Normalize::None).is_err());
        assert!(BlindIndexSpec::parse("x=", 64, Normalize::None).is_err());
        assert_eq!(
            Normalize::parse("lower-trim").unwrap(),
            Normalize::LowerTrim
        );
        assert!(Normalize::parse("lower").is_err());
        // A key with no usable version computes no index.
        let b = MemoryBackend::new();
        let e = BlindIndexer::new(&b, "nope", "", b"", 64, Normalize::None).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Key);
    }

    #[test]
    fn the_column_key_never_shows_in_debug() {
        let b = MemoryBackend::new();
        b.add_version("pii");
        let i = indexer(&b, "pii", "c", "email", 64, Normalize::None);
        let d = format!("{i:?}");
        assert!(!d.contains(&format!("{:?}", i.k_col.expose())), "{d}");
        assert!(d.contains("bits: 64"), "{d}");
    }
}
