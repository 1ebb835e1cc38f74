//! The abort marker: how a `columns` run that fails after its output began
//! makes the reader of that output fail too (issue 9).
//!
//! Output is written in blocks of whole records, so without a marker a
//! failed run's stream ends at a clean record boundary, and a loader such as
//! `psql -c "\copy t FROM pstdin ..."` commits the rows so far and exits 0.
//! Instead, a stream (stdout) of a failed run ends with [`MARKER`], two lines
//! that every reader of the four formats rejects whatever the table's
//! column count and encoding (docs/FORMAT.md section 6, "Failed runs"):
//!
//! - both lines contain the COPY text escape `\0`, a NUL byte, which
//!   PostgreSQL refuses in every server encoding ("invalid byte sequence");
//! - the second opens a CSV quoted field that never closes: "unterminated
//!   CSV quoted field" for CSV and for TSV read as CSV;
//! - neither is JSON;
//! - the first line is a complete record, so a loader that takes it as the
//!   header (nothing else was written yet) still meets the second.
//!
//! Invariants: the marker text is fixed (no error text, nothing from the
//! data), starts with the human-readable `hsmseal: aborted`, and hsmseal's
//! own readers refuse input that contains it, so a chain of hsmseal steps
//! passes the failure on instead of encrypting the marker into a token.

use crate::error::Error;

/// One line of the marker, without its LF. `\0` is two characters, a
/// backslash and a zero: the COPY text escape of a NUL byte. A raw NUL
/// would not do: psql cuts a line at a raw NUL and loads the rest.
pub const LINE: &[u8] =
    b"hsmseal: aborted: this output is incomplete because the run that wrote it failed\\0";

/// What ends the stream of a failed run that stopped at a record boundary:
/// `LINE` LF `"` `LINE` LF (the quote is never closed).
pub const MARKER: &[u8] = b"hsmseal: aborted: this output is incomplete because the run that wrote it failed\\0\n\"hsmseal: aborted: this output is incomplete because the run that wrote it failed\\0\n";

/// Appends what ends a failed stream to `out`. `at_line_start`: the stream
/// so far is empty or ends with LF; `in_quotes`: it was cut inside a CSV
/// quoted field (an odd number of `"` since the last record boundary), so
/// a quote closes it first. Without both, a cut record would swallow the
/// marker's first line, or its quotes would pair up with the cut one's.
pub fn write_marker(out: &mut Vec<u8>, at_line_start: bool, in_quotes: bool) {
    if in_quotes {
        out.push(b'"');
    }
    if in_quotes || !at_line_start {
        out.push(b'\n');
    }
    out.extend_from_slice(MARKER);
}

/// True if `rec` (a record, or the rest of the input) starts with either
/// line of the marker.
pub fn begins_with_marker(rec: &[u8]) -> bool {
    match rec.first() {
        Some(b'h') => rec.starts_with(LINE),
        Some(b'"') => rec[1..].starts_with(LINE),
        _ => false,
    }
}

/// The error for input that contains the marker (the caller adds the row).
pub fn found() -> Error {
    Error::format(
        "this input ends with the marker \"hsmseal: aborted\" of an hsmseal run that failed, so it is incomplete: rerun the step that wrote it",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_is_two_lines_of_the_same_text() {
        let mut m = LINE.to_vec();
        m.extend_from_slice(b"\n\"");
        m.extend_from_slice(LINE);
        m.push(b'\n');
        assert_eq!(m, MARKER);
        // Nothing a CSV, TSV or COPY reader would split or unquote: no
        // delimiter, quote, CR or LF, one backslash (the NUL escape).
        assert!(!LINE.iter().any(|c| b",\t\"\r\n".contains(c)));
        assert_eq!(LINE.iter().filter(|&&c| c == b'\\').count(), 1);
        assert!(LINE.starts_with(b"hsmseal: aborted"));
    }

    #[test]
    fn prefixes_close_a_cut_record() {
        let mut out = Vec::new();
        write_marker(&mut out, true, false);
        assert_eq!(out, MARKER);
        out.clear();
        write_marker(&mut out, false, false);
        assert_eq!(out[0], b'\n');
        assert_eq!(&out[1..], MARKER);
        out.clear();
        write_marker(&mut out, false, true);
        assert_eq!(&out[..2], b"\"\n");
        assert_eq!(&out[2..], MARKER);
    }

    #[test]
    fn recognises_either_line() {
        assert!(begins_with_marker(MARKER));
        assert!(begins_with_marker(&MARKER[LINE.len() + 1..]));
        assert!(!begins_with_marker(b"hsmseal: aborted"));
        assert!(!begins_with_marker(b"\"x\""));
        assert!(!begins_with_marker(b""));
    }
}
