//! A byte-level RFC 4180 reader and writer for CSV and TSV that keeps every
//! field's raw span, so untouched fields and record terminators are copied
//! exactly as they were.
//!
//! Reading rules (the ones PostgreSQL, Python's `csv` module and RFC 4180
//! writers follow; TSV is the same with a tab delimiter, as Python's
//! `csv.writer(delimiter="\t")` writes it):
//! - A field starting with `"` is quoted: it runs to the next `"` not
//!   followed by another `"`; inside, `""` is one quote, and delimiters, CR
//!   and LF are data. After the closing quote comes a delimiter, a record
//!   terminator or the end of input; anything else is an error.
//! - Any other field is unquoted and runs to the next delimiter or LF. A `"`
//!   inside it is data (lenient, like Python's reader).
//! - A record ends at LF outside quotes; a CR right before that LF belongs
//!   to the terminator (CRLF), each record keeping its own. The last record
//!   may lack a terminator.
//! - An unquoted empty field is NULL (PostgreSQL's convention); `""` is the
//!   empty string.
//!
//! Invariant: the parser never allocates per field; it reports spans into
//! the caller's buffer through a callback.
//!
//! Hand-written rather than the `csv` crate: that crate hands out decoded
//! fields, so it cannot tell `""` (empty) from an empty field (NULL), nor
//! give the raw span that copies an untouched field and its record's own
//! terminator byte for byte.

use super::scan::{find1, find2};
use crate::error::{Error, Result};

/// Longest raw field (including its quotes) accepted in any input.
pub const MAX_FIELD: usize = 32 << 20;

/// Parses one record at the start of `buf`, calling `on_field(index, start,
/// end, quoted)` for each field with its raw span (quotes included).
///
/// Returns `Ok(Some((consumed, fields)))` for a complete record (`consumed`
/// includes the terminator), `Ok(None)` if `buf` holds only part of a record
/// and more input may follow (`eof` false). Call only with a non-empty `buf`.
pub fn parse_record(
    buf: &[u8],
    eof: bool,
    delim: u8,
    mut on_field: impl FnMut(usize, usize, usize, bool) -> Result<()>,
) -> Result<Option<(usize, usize)>> {
    let n = buf.len();
    let mut i = 0;
    let mut idx = 0;
    loop {
        if i < n && buf[i] == b'"' {
            // Quoted field: find the closing quote.
            let mut j = i + 1;
            let end = loop {
                match find1(&buf[j..], b'"') {
                    None if eof => {
                        return Err(field_err(idx, "unterminated quoted field at end of input"))
                    }
                    None => return Ok(None),
                    Some(p) => {
                        let q = j + p;
                        if q + 1 < n && buf[q + 1] == b'"' {
                            j = q + 2;
                        } else if q + 1 == n && !eof {
                            return Ok(None);
                        } else {
                            break q + 1;
                        }
                    }
                }
            };
            check_len(idx, end - i)?;
            on_field(idx, i, end, true)?;
            if end == n {
                return Ok(Some((n, idx + 1)));
            }
            match buf[end] {
                c if c == delim => {
                    i = end + 1;
                    idx += 1;
                }
                b'\n' => return Ok(Some((end + 1, idx + 1))),
                b'\r' if end + 1 < n && buf[end + 1] == b'\n' => {
                    return Ok(Some((end + 2, idx + 1)))
                }
                b'\r' if end + 1 == n && !eof => return Ok(None),
                _ => {
                    return Err(field_err(
                        idx,
                        "unexpected character after the closing quote of a quoted field",
                    ))
                }
            }
        } else {
            match find2(&buf[i..], delim, b'\n') {
                None if eof => {
                    check_len(idx, n - i)?;
                    on_field(idx, i, n, false)?;
                    return Ok(Some((n, idx + 1)));
                }
                None => {
                    if n - i > MAX_FIELD {
                        check_len(idx, n - i)?;
                    }
                    return Ok(None);
                }
                Some(p) => {
                    let q = i + p;
                    if buf[q] == delim {
                        check_len(idx, q - i)?;
                        on_field(idx, i, q, false)?;
                        i = q + 1;
                        idx += 1;
                    } else {
                        let fend = if q > i && buf[q - 1] == b'\r' {
                            q - 1
                        } else {
                            q
                        };
                        check_len(idx, fend - i)?;
                        on_field(idx, i, fend, false)?;
                        return Ok(Some((q + 1, idx + 1)));
                    }
                }
            }
        }
    }
}

fn check_len(idx: usize, len: usize) -> Result<()> {
    if len > MAX_FIELD {
        Err(field_err(
            idx,
            &format!(
                "field of {len} bytes is over the {} MiB limit",
                MAX_FIELD >> 20
            ),
        ))
    } else {
        Ok(())
    }
}

/// An error in field `idx` (0-based); the caller adds the row.
fn field_err(idx: usize, what: &str) -> Error {
    Error::format(format!("field {}: {what}", idx + 1))
}

/// The value of a raw field: quotes removed and `""` turned into `"`. Uses
/// `scratch` only when the value has embedded quotes.
pub fn unquote<'a>(raw: &'a [u8], quoted: bool, scratch: &'a mut Vec<u8>) -> &'a [u8] {
    if !quoted {
        return raw;
    }
    let inner = &raw[1..raw.len() - 1];
    if find1(inner, b'"').is_none() {
        return inner;
    }
    scratch.clear();
    let mut rest = inner;
    while let Some(p) = find1(rest, b'"') {
        scratch.extend_from_slice(&rest[..=p]);
        rest = &rest[p + 2..];
    }
    scratch.extend_from_slice(rest);
    scratch
}

/// Writes `value` as a field. It is quoted if it was quoted in the input
/// (`quoted`), or if writing it bare would read back differently (empty,
/// so NULL; a delimiter or LF inside; a leading quote; a trailing CR in the
/// last field). The second case only arises for tokens made from other
/// formats: a field that needed quotes was quoted when it was read.
pub fn write_field(out: &mut Vec<u8>, value: &[u8], quoted: bool, delim: u8, last: bool) {
    let needs = quoted
        || value.is_empty()
        || value[0] == b'"'
        || find2(value, delim, b'\n').is_some()
        || (last && value.last() == Some(&b'\r'));
    if !needs {
        out.extend_from_slice(value);
        return;
    }
    out.push(b'"');
    let mut rest = value;
    while let Some(p) = find1(rest, b'"') {
        out.extend_from_slice(&rest[..=p]);
        out.push(b'"');
        rest = &rest[p + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed = Option<(usize, Vec<(String, bool)>)>;

    fn fields(buf: &[u8], eof: bool) -> Result<Parsed> {
        let mut v = Vec::new();
        let r = parse_record(buf, eof, b',', |_, s, e, q| {
            v.push((String::from_utf8_lossy(&buf[s..e]).into_owned(), q));
            Ok(())
        })?;
        Ok(r.map(|(n, c)| {
            assert_eq!(c, v.len());
            (n, v)
        }))
    }

    #[test]
    fn parses_rfc4180_records() {
        let (n, f) = fields(b"a,\"b,\"\"c\"\"\r\nd\",\r\nnext", false)
            .unwrap()
            .unwrap();
        assert_eq!(n, 17);
        assert_eq!(
            f,
            vec![
                ("a".into(), false),
                ("\"b,\"\"c\"\"\r\nd\"".into(), true),
                ("".into(), false)
            ]
        );
        assert!(fields(b"a,\"b", false).unwrap().is_none());
        assert!(fields(b"a,\"b\"", false).unwrap().is_none());
        assert!(fields(b"a,b", false).unwrap().is_none());
        assert_eq!(fields(b"a,b", true).unwrap().unwrap().0, 3);
        assert!(fields(b"a,\"b", true).is_err());
        assert!(fields(b"\"a\"x,b\n", true).is_err());
        assert_eq!(fields(b"x\"y,z\n", true).unwrap().unwrap().1[0].0, "x\"y");
    }

    #[test]
    fn unquote_and_write_are_inverse() {
        let mut s = Vec::new();
        for v in [&b""[..], b"a", b"a\"b", b"\"", b"a,b\r\nc", b"\"\"x\"\""] {
            let mut out = Vec::new();
            write_field(&mut out, v, true, b',', false);
            assert_eq!(unquote(&out, true, &mut s), v);
        }
        let mut out = Vec::new();
        write_field(&mut out, b"plain", false, b',', true);
        assert_eq!(out, b"plain");
    }
}
