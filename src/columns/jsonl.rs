//! JSON Lines: one JSON object per line, `--columns` naming top-level keys.
//!
//! The object is scanned, not rebuilt: only the bytes of selected values are
//! replaced, so key order, whitespace, number spelling and every untouched
//! member stay byte for byte.
//!
//! What is encrypted (see the flags in `token.rs`):
//! - `null` is left as it is.
//! - A string written the canonical way (as serde_json writes it: only `"`,
//!   `\` and control characters escaped, `\u00XX` lowercase) is encrypted as
//!   its decoded text, and decrypts to a string written canonically again.
//! - Any other value (number, boolean, object, array, or a string with
//!   other escapes such as `\u00e9` or `\/`) is encrypted as its exact JSON
//!   text with the JSON flag, and decrypts to that text.
//!
//! Lines must be UTF-8 (JSON requires it): invalid UTF-8 is an error naming
//! the row. Blank lines are copied.
//!
//! Hand-written rather than parsed with `serde_json`: a parsed object is
//! written back in serde_json's spelling, and only a scan that reports the
//! byte span of each top-level value can leave everything else untouched.

use crate::error::{Error, Result};

/// Where a member of the top-level object lies in its line.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// Raw key, quotes included.
    pub key: (usize, usize),
    /// Raw value.
    pub value: (usize, usize),
}

/// Deepest nesting accepted inside a value.
const MAX_DEPTH: usize = 512;

/// Scans `line` (no terminator) as one JSON object into `members`.
pub fn parse_object(line: &[u8], members: &mut Vec<Member>) -> Result<()> {
    members.clear();
    let mut i = ws(line, 0);
    if line.get(i) != Some(&b'{') {
        return Err(Error::format("not a JSON object"));
    }
    i = ws(line, i + 1);
    if line.get(i) == Some(&b'}') {
        return trailing(line, i + 1);
    }
    loop {
        if line.get(i) != Some(&b'"') {
            return Err(Error::format("expected a string key"));
        }
        let kend = skip_string(line, i)?;
        let key = (i, kend);
        i = ws(line, kend);
        if line.get(i) != Some(&b':') {
            return Err(Error::format("expected ':' after a key"));
        }
        i = ws(line, i + 1);
        let vend = skip_value(line, i)?;
        members.push(Member {
            key,
            value: (i, vend),
        });
        i = ws(line, vend);
        match line.get(i) {
            Some(b',') => i = ws(line, i + 1),
            Some(b'}') => return trailing(line, i + 1),
            _ => return Err(Error::format("expected ',' or '}' in an object")),
        }
    }
}

fn trailing(line: &[u8], i: usize) -> Result<()> {
    if ws(line, i) == line.len() {
        Ok(())
    } else {
        Err(Error::format("text after the JSON object"))
    }
}

fn ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\r' | b'\n') {
        i += 1;
    }
    i
}

/// End (exclusive) of the string starting with `"` at `i`.
fn skip_string(b: &[u8], i: usize) -> Result<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'"' => return Ok(j + 1),
            b'\\' => j += 2,
            _ => j += 1,
        }
    }
    Err(Error::format("unterminated JSON string"))
}

/// End (exclusive) of the JSON value starting at `i`. Strings and nesting
/// are tracked exactly; scalars are taken as the run of characters that can
/// form them (selected ones are validated by [`validate`]).
fn skip_value(b: &[u8], i: usize) -> Result<usize> {
    match b.get(i) {
        Some(b'"') => skip_string(b, i),
        Some(b'{') | Some(b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => {
                        depth += 1;
                        if depth > MAX_DEPTH {
                            return Err(Error::format("JSON nested too deeply"));
                        }
                    }
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            Err(Error::format("unterminated JSON object or array"))
        }
        Some(_) => {
            let mut j = i;
            while j < b.len()
                && (b[j].is_ascii_alphanumeric() || matches!(b[j], b'-' | b'+' | b'.'))
            {
                j += 1;
            }
            if j == i {
                Err(Error::format("expected a JSON value"))
            } else {
                Ok(j)
            }
        }
        None => Err(Error::format("expected a JSON value")),
    }
}

/// Checks a raw value is one well-formed JSON value.
pub fn validate(raw: &[u8]) -> Result<()> {
    serde_json::from_slice::<serde::de::IgnoredAny>(raw)
        .map(|_| ())
        .map_err(|e| Error::format(format!("invalid JSON value: {e}")))
}

/// True if the raw key (quotes included) spells `name`.
pub fn key_is(raw: &[u8], name: &str) -> bool {
    let inner = &raw[1..raw.len() - 1];
    if !inner.contains(&b'\\') {
        return inner == name.as_bytes();
    }
    serde_json::from_slice::<String>(raw).is_ok_and(|k| k == name)
}

/// How a selected value is encrypted.
pub enum Plain<'a> {
    /// `null`: left as it is.
    Null,
    /// A canonically written string: its decoded text.
    Str(&'a [u8]),
    /// Anything else: its exact JSON text (encrypted with the JSON flag).
    Json(&'a [u8]),
}

/// Classifies a raw selected value; `scratch` holds a decoded string.
pub fn plain<'a>(raw: &'a [u8], scratch: &'a mut Vec<u8>) -> Result<Plain<'a>> {
    if raw == b"null" {
        return Ok(Plain::Null);
    }
    if raw[0] != b'"' {
        validate(raw)?;
        return Ok(Plain::Json(raw));
    }
    let inner = &raw[1..raw.len() - 1];
    if !inner.iter().any(|&c| c == b'\\' || c < 0x20) {
        return Ok(Plain::Str(inner));
    }
    // Escapes: keep the decoded text only if writing it back canonically
    // gives the same bytes; otherwise keep the JSON text itself.
    match serde_json::from_slice::<String>(raw) {
        Ok(s) => {
            scratch.clear();
            serde_json::to_writer(&mut *scratch, &s).expect("writing to a Vec");
            if scratch[..] == raw[..] {
                scratch.clear();
                scratch.extend_from_slice(s.as_bytes());
                Ok(Plain::Str(scratch))
            } else {
                Ok(Plain::Json(raw))
            }
        }
        Err(_) if inner.iter().all(|&c| c >= 0x20) => Ok(Plain::Json(raw)),
        Err(e) => Err(Error::format(format!("invalid JSON string: {e}"))),
    }
}

/// The string inside a raw JSON string value (for tokens and row ids).
pub fn string_value<'a>(raw: &'a [u8], scratch: &'a mut Vec<u8>) -> Option<&'a [u8]> {
    if raw.first() != Some(&b'"') {
        return None;
    }
    let inner = &raw[1..raw.len() - 1];
    if !inner.contains(&b'\\') {
        return Some(inner);
    }
    let s = serde_json::from_slice::<String>(raw).ok()?;
    scratch.clear();
    scratch.extend_from_slice(s.as_bytes());
    Some(scratch)
}

/// Appends a decrypted value: JSON text as it is, a string written
/// canonically (it must be UTF-8, which tokens made from other formats may
/// not be).
pub fn write_value(out: &mut Vec<u8>, value: &[u8], json: bool) -> Result<()> {
    if json {
        out.extend_from_slice(value);
        return Ok(());
    }
    let s = std::str::from_utf8(value).map_err(|_| {
        Error::format("the decrypted value is not UTF-8 and cannot be written as a JSON string")
    })?;
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_members_exactly() {
        let line = br#" {"a" : 1, "b":{"x":[1,"}"]},"c\"d":"e\u00e9", "n":null}  "#;
        let mut m = Vec::new();
        parse_object(line, &mut m).unwrap();
        let vals: Vec<&[u8]> = m.iter().map(|m| &line[m.value.0..m.value.1]).collect();
        assert_eq!(
            vals,
            vec![&b"1"[..], br#"{"x":[1,"}"]}"#, br#""e\u00e9""#, b"null"]
        );
        assert!(key_is(&line[m[2].key.0..m[2].key.1], "c\"d"));
        for bad in [
            &b"[1]"[..],
            b"{\"a\":1",
            b"{\"a\" 1}",
            b"{\"a\":1} x",
            b"{a:1}",
        ] {
            assert!(parse_object(bad, &mut m).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn canonical_strings_are_decoded_others_kept_as_json() {
        let mut s = Vec::new();
        assert!(matches!(plain(br#""a\"b\n""#, &mut s).unwrap(), Plain::Str(v) if v == b"a\"b\n"));
        assert!(matches!(
            plain(br#""\u00e9""#, &mut s).unwrap(),
            Plain::Json(_)
        ));
        assert!(matches!(plain(br#""\/""#, &mut s).unwrap(), Plain::Json(_)));
        assert!(matches!(
            plain(br#""\ud800""#, &mut s).unwrap(),
            Plain::Json(_)
        ));
        assert!(matches!(plain(b"12.50", &mut s).unwrap(), Plain::Json(_)));
        assert!(matches!(plain(b"null", &mut s).unwrap(), Plain::Null));
        assert!(plain(b"tru", &mut s).is_err());
    }
}
