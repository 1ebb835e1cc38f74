//! PostgreSQL `COPY ... TO STDOUT` text format (`--format pgcopy`).
//!
//! Records end at LF (a CR right before it belongs to the terminator);
//! fields are separated by tab; `\N` is NULL; a backslash escapes the next
//! byte: `\b \f \n \r \t \v` are control characters, `\` followed by one to
//! three octal digits or by `x` and one or two hex digits is that byte, and
//! any other escaped byte stands for itself (so `\\` is a backslash and a
//! backslash before a real tab or newline makes it data, as PostgreSQL reads
//! it). A line that is exactly `\.` is the end-of-data marker and is copied.
//! A backslash that is the last byte of the input escapes nothing: an error
//! (the dump was cut short), never data.
//!
//! Encrypted values are the decoded values; decryption writes them back the
//! way PostgreSQL writes them (see [`encode`]), so input PostgreSQL wrote
//! round-trips byte for byte and non-canonical escapes (`\x41` for `A`) are
//! normalised. Unselected fields are always copied as their raw bytes.
//!
//! Hand-written: no crate reads COPY text as raw spans, and the spans (no
//! per-field allocation, as in `csv.rs`) are what keep unselected fields
//! byte for byte.

use super::csv::MAX_FIELD;
use super::scan::find3;
use crate::error::{Error, Result};

/// Parses one line at the start of `buf` (see [`super::csv::parse_record`]
/// for the contract); `on_field` gets raw spans.
pub fn parse_record(
    buf: &[u8],
    eof: bool,
    mut on_field: impl FnMut(usize, usize, usize, bool) -> Result<()>,
) -> Result<Option<(usize, usize)>> {
    let n = buf.len();
    let mut start = 0;
    let mut i = 0;
    let mut idx = 0;
    // Position just past the last escape, so an escaped CR before LF stays data.
    let mut escaped_to = 0;
    loop {
        match find3(&buf[i..], b'\t', b'\n', b'\\') {
            None => {
                if !eof {
                    if n - start > MAX_FIELD {
                        check_len(idx, n - start)?;
                    }
                    return Ok(None);
                }
                check_len(idx, n - start)?;
                on_field(idx, start, n, false)?;
                return Ok(Some((n, idx + 1)));
            }
            Some(p) => {
                let q = i + p;
                match buf[q] {
                    b'\\' => {
                        if q + 1 >= n {
                            if !eof {
                                return Ok(None);
                            }
                            // The dump was cut short. As data it would be
                            // written back as `\\`, and PostgreSQL 15's COPY
                            // drops it: a value changes either way (issue 9).
                            return Err(Error::format(format!(
                                "field {}: a backslash at the end of the input escapes nothing (is the dump cut short?)",
                                idx + 1
                            )));
                        }
                        i = q + 2;
                        escaped_to = i;
                    }
                    b'\t' => {
                        check_len(idx, q - start)?;
                        on_field(idx, start, q, false)?;
                        idx += 1;
                        i = q + 1;
                        start = i;
                    }
                    _ => {
                        let fend = if q > start && q > escaped_to && buf[q - 1] == b'\r' {
                            q - 1
                        } else {
                            q
                        };
                        check_len(idx, fend - start)?;
                        on_field(idx, start, fend, false)?;
                        return Ok(Some((q + 1, idx + 1)));
                    }
                }
            }
        }
    }
}

fn check_len(idx: usize, len: usize) -> Result<()> {
    if len > MAX_FIELD {
        Err(Error::format(format!(
            "field {}: field of {len} bytes is over the {} MiB limit",
            idx + 1,
            MAX_FIELD >> 20
        )))
    } else {
        Ok(())
    }
}

/// True for the NULL marker.
pub fn is_null(raw: &[u8]) -> bool {
    raw == b"\\N"
}

/// True for the end-of-data line.
pub fn is_end_marker(raw_line: &[u8]) -> bool {
    raw_line == b"\\."
}

/// The value of a raw (non-NULL) field, escapes decoded. Uses `scratch`
/// only when there is a backslash.
pub fn decode<'a>(raw: &'a [u8], scratch: &'a mut Vec<u8>) -> &'a [u8] {
    if !raw.contains(&b'\\') {
        return raw;
    }
    scratch.clear();
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        i += 1;
        if c != b'\\' || i == raw.len() {
            scratch.push(c);
            continue;
        }
        let e = raw[i];
        i += 1;
        let b = match e {
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 0x0b,
            b'0'..=b'7' => {
                let mut v = (e - b'0') as u32;
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + (d - b'0') as u32;
                            i += 1;
                        }
                        _ => break,
                    }
                }
                (v & 0xff) as u8
            }
            b'x' if raw.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = hex(raw[i]);
                i += 1;
                if let Some(&d) = raw.get(i).filter(|d| d.is_ascii_hexdigit()) {
                    v = v * 16 + hex(d);
                    i += 1;
                }
                v
            }
            other => other,
        };
        scratch.push(b);
    }
    scratch
}

fn hex(d: u8) -> u8 {
    match d {
        b'0'..=b'9' => d - b'0',
        b'a'..=b'f' => d - b'a' + 10,
        _ => d - b'A' + 10,
    }
}

/// Appends `value` escaped as PostgreSQL's `COPY TO` writes text fields:
/// backslash, BS, FF, LF, CR, tab and VT as two-character escapes, every
/// other byte as itself.
pub fn encode(value: &[u8], out: &mut Vec<u8>) {
    let mut rest = value;
    loop {
        let p = first_to_escape(rest);
        match p {
            None => {
                out.extend_from_slice(rest);
                return;
            }
            Some(p) => {
                out.extend_from_slice(&rest[..p]);
                let e = match rest[p] {
                    b'\\' => b'\\',
                    0x08 => b'b',
                    0x0c => b'f',
                    b'\n' => b'n',
                    b'\r' => b'r',
                    b'\t' => b't',
                    _ => b'v',
                };
                out.extend_from_slice(&[b'\\', e]);
                rest = &rest[p + 1..];
            }
        }
    }
}

/// The first byte `encode` escapes (backslash, 8..=13), if any: eight
/// bytes at a time where none is near (tokens, most text), byte by byte
/// from the first word that may hold one.
fn first_to_escape(b: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let needs = |c: u8| c == b'\\' || matches!(c, 8..=13);
    let mut at = 0;
    while at + 8 <= b.len() {
        let w = u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        // A byte below 14, or a zero byte of w ^ backslashes: the classic
        // "has less than n" test (exact for n <= 128, bytes of w < 0x80;
        // bytes >= 0x80 never set it, as `!w` clears their high bit).
        let lt14 = w.wrapping_sub(ONES * 14) & !w & HIGHS;
        let bs = w ^ (ONES * u64::from(b'\\'));
        let zero = bs.wrapping_sub(ONES) & !bs & HIGHS;
        if lt14 | zero != 0 {
            break;
        }
        at += 8;
    }
    b[at..].iter().position(|&c| needs(c)).map(|p| at + p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_byte_to_escape_at_every_offset() {
        // Against the byte-by-byte definition, for every position and
        // every byte value, in runs long enough for the word-wise scan.
        let slow = |b: &[u8]| b.iter().position(|&c| c == b'\\' || matches!(c, 8..=13));
        for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 40] {
            for pos in 0..len {
                for v in 0..=255u8 {
                    let mut b = vec![b'A'; len];
                    b[pos] = v;
                    if pos + 1 < len {
                        b[pos + 1] = 0xff;
                    }
                    assert_eq!(
                        first_to_escape(&b),
                        slow(&b),
                        "len {len} pos {pos} byte {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn decode_and_encode() {
        let mut s = Vec::new();
        assert_eq!(decode(b"a\\tb\\\\c\\n", &mut s), b"a\tb\\c\n");
        assert_eq!(decode(b"\\101\\x42\\x4g\\q\\xz", &mut s), b"AB\x04gqxz");
        let mut out = Vec::new();
        encode(b"a\tb\\c\n\r\x08\x0b\x0c\x01\xc3\xa9", &mut out);
        assert_eq!(out, b"a\\tb\\\\c\\n\\r\\b\\v\\f\x01\xc3\xa9");
        assert_eq!(decode(&out, &mut s), b"a\tb\\c\n\r\x08\x0b\x0c\x01\xc3\xa9");
    }

    #[test]
    fn splits_fields_and_lines() {
        let buf = b"1\ta\\\tb\t\\N\r\nnext";
        let mut f = Vec::new();
        let r = parse_record(buf, false, |_, s, e, _| {
            f.push(buf[s..e].to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(r, Some((11, 3)));
        assert_eq!(f, vec![b"1".to_vec(), b"a\\\tb".to_vec(), b"\\N".to_vec()]);
        assert_eq!(
            parse_record(b"x\\", false, |_, _, _, _| Ok(())).unwrap(),
            None
        );
        // A dangling backslash at the end of the input is an error, in any
        // field; one escaping the LF or a tab is data.
        for bad in [&b"x\\"[..], b"a\tb\\", b"\\\\\\", b"a\t\\"] {
            let e = parse_record(bad, true, |_, _, _, _| Ok(())).unwrap_err();
            assert!(e.message().contains("backslash at the end"), "{bad:?}: {e}");
        }
        assert_eq!(
            parse_record(b"a\\\n", true, |_, _, _, _| Ok(())).unwrap(),
            Some((3, 1))
        );
        assert_eq!(
            parse_record(b"a\\\\", true, |_, _, _, _| Ok(())).unwrap(),
            Some((3, 1))
        );
    }
}
