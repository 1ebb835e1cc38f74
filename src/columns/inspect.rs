//! What the values of a column depend on, from token headers alone: per
//! column, how many values are NULL, in clear, tokens per key name, key
//! version and token format version, and malformed token-looking values.
//! `columns inspect` counts a dump with it; `pg status` (whose server does
//! the counting) reports through the same [`ColumnCounts`], so both print
//! one JSON shape (docs/FORMAT.md §8).
//!
//! Invariants:
//! - Nothing is decrypted or authenticated and no key is used: a count is
//!   what the token *says* it is under, enough to gate `key purge`, never a
//!   proof that the token opens (that is `columns decrypt`/`pg verify`).
//! - Every non-NULL value lands in exactly one of clear, a key entry, or
//!   malformed: `nulls + clear + tokens + malformed` = the cells seen.
//! - A value with the token prefix (`hsc1.`/`hsc2.`) is never "clear": if
//!   its header does not parse it is malformed, as decrypt would refuse it.

use super::token::{has_prefix, token_key};
use crate::backend::KeyRef;
use std::collections::BTreeMap;

/// The counts of one column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnCounts {
    /// Values seen, NULLs included.
    pub rows: u64,
    pub nulls: u64,
    /// Values without the token prefix.
    pub clear: u64,
    /// Values with the prefix whose header does not parse.
    pub malformed: u64,
    /// Tokens per (key name, key version, token format version).
    pub keys: BTreeMap<(String, u32, u8), u64>,
}

impl ColumnCounts {
    pub fn add_null(&mut self) {
        self.rows += 1;
        self.nulls += 1;
    }

    /// Counts one non-NULL value (its text: a token is ASCII text).
    pub fn add(&mut self, value: &[u8]) {
        self.rows += 1;
        if !has_prefix(value) {
            self.clear += 1;
            return;
        }
        match token_key(value) {
            Ok((tv, KeyRef { name, version })) => {
                *self.keys.entry((name, version, tv)).or_default() += 1
            }
            Err(_) => self.malformed += 1,
        }
    }

    /// Adds another worker's (or run's) counts.
    pub fn merge(&mut self, o: &ColumnCounts) {
        self.rows += o.rows;
        self.nulls += o.nulls;
        self.clear += o.clear;
        self.malformed += o.malformed;
        for (k, n) in &o.keys {
            *self.keys.entry(k.clone()).or_default() += n;
        }
    }

    /// Tokens whose header parsed.
    pub fn tokens(&self) -> u64 {
        self.keys.values().sum()
    }

    /// The key versions the tokens are under.
    pub fn key_refs(&self) -> Vec<KeyRef> {
        let mut v: Vec<KeyRef> = self
            .keys
            .keys()
            .map(|(n, v, _)| KeyRef {
                name: n.clone(),
                version: *v,
            })
            .collect();
        v.dedup();
        v
    }

    /// The JSON fields shared by `pg status` and `columns inspect`
    /// (FORMAT §8): rows, nulls, clear, tokens, malformed, and `keys` as
    /// `[{name, version, token_version, tokens}]`.
    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("rows".into(), self.rows.into());
        m.insert("nulls".into(), self.nulls.into());
        m.insert("clear".into(), self.clear.into());
        m.insert("tokens".into(), self.tokens().into());
        m.insert("malformed".into(), self.malformed.into());
        m.insert(
            "keys".into(),
            self.keys
                .iter()
                .map(|((n, v, f), c)| {
                    serde_json::json!({"name": n, "version": v, "token_version": f, "tokens": c})
                })
                .collect(),
        );
        m
    }

    /// One line: `N rows, N NULL, N clear, N tokens [key vV (token vF): N, …]`
    /// and `, N malformed` when there are any.
    pub fn summary(&self) -> String {
        let ks: Vec<String> = self
            .keys
            .iter()
            .map(|((n, v, f), c)| format!("{n} v{v} (token v{f}): {c}"))
            .collect();
        format!(
            "{} rows, {} NULL, {} clear, {} tokens{}{}",
            self.rows,
            self.nulls,
            self.clear,
            self.tokens(),
            if ks.is_empty() {
                String::new()
            } else {
                format!(" [{}]", ks.join(", "))
            },
            if self.malformed > 0 {
                format!(", {} malformed", self.malformed)
            } else {
                String::new()
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::columns::token::{self, Sealer};

    #[test]
    fn classifies_clear_tokens_and_malformed() {
        let be = MemoryBackend::new();
        let k = KeyRef {
            name: "pii".into(),
            version: be.add_version("pii"),
        };
        let mut s = Sealer::new(&be, &k, 16).unwrap();
        let mut tok = Vec::new();
        s.seal(b"aad", 0, b"123-45-6789", &mut tok).unwrap();
        let mut c = ColumnCounts::default();
        c.add_null();
        c.add(b"");
        c.add(b"plain");
        c.add(&tok);
        c.add(&tok);
        let mut bad = tok.clone();
        bad.truncate(token::PREFIX.len() + 3);
        c.add(&bad);
        c.add(b"hsc2.!!!!");
        assert_eq!(
            (c.rows, c.nulls, c.clear, c.malformed, c.tokens()),
            (7, 1, 2, 2, 2)
        );
        assert_eq!(c.key_refs(), vec![k.clone()]);
        let j = serde_json::Value::Object(c.to_json());
        assert_eq!(j["keys"][0]["name"], "pii");
        assert_eq!(j["keys"][0]["tokens"], 2);
        let mut d = ColumnCounts::default();
        d.merge(&c);
        d.merge(&c);
        assert_eq!((d.rows, d.tokens(), d.malformed), (14, 4, 4));
        assert!(c.summary().ends_with(", 2 malformed"), "{}", c.summary());
    }
}
