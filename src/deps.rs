//! Which key versions data depends on: the question to answer before a key
//! version is destroyed (`hsmseal key purge --check`, `hsmseal inspect
//! --deps`).
//!
//! Data depends on a key version in two ways:
//! - an hsmseal **file** depends on the version in its active envelope
//!   (docs/FORMAT.md section 3.1; read from the header, no HSM needed);
//! - a **column token** (`hsc1.…` or `hsc2.…`, section 6) depends on the
//!   version in its batch envelope (v1) or header (v2): both bodies start
//!   with the key name and version. Tokens live in column dumps, and a dump may itself be
//!   sealed in an hsmseal file (a COPY dump saved as `.hseal`): its tokens
//!   are only visible after decryption, so the caller decrypts the payload
//!   (authenticated chunks only, into memory) and feeds it to a
//!   [`TokenScanner`].
//!
//! [`TokenScanner`] finds tokens in any bytes without knowing the dump's
//! format: a token never needs quoting or escaping in CSV, TSV, pgcopy or
//! JSON (its alphabet is `[A-Za-z0-9_-]` after the `hsc1.` prefix), so it
//! appears literally in every format hsmseal writes. A candidate counts if
//! the byte before `hsc1.` cannot be part of a token, its key name and
//! version decode, and the token is long enough to hold a whole record.
//! Nothing is authenticated here: for retention that errs on the safe side
//! (a damaged token still marks its version as needed). Tokens inside
//! compressed data (e.g. `pg_dump -Fc`) are not visible to any scan.

use crate::backend::KeyRef;
use crate::columns::token::{key_ref_prefix, token_len, token_len_v2, PREFIX};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::collections::BTreeMap;
use std::io;

/// Longest key name a token envelope can hold (FORMAT.md section 6).
const MAX_NAME: usize = 64;
/// Base64 characters needed to decode the envelope's key reference: 1 length
/// byte, up to 64 name bytes and a version (4 bytes in v1, a varint of up
/// to 5 in v2), rounded up to whole quads.
const REF_CHARS: usize = (1 + MAX_NAME + 5).div_ceil(3) * 4;

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Bytes that cannot directly precede a token: a token is never glued to a
/// run of its own alphabet (or to a `.`, which would make it part of a
/// longer dotted word).
fn may_precede(b: Option<u8>) -> bool {
    match b {
        None => true,
        Some(b) => !(is_token_char(b) || b == b'.'),
    }
}

/// The key version in a token's batch envelope, from the base64 text after
/// the `hsc1.` prefix: `head` holds the first characters of the body (up to
/// `REF_CHARS`), `total_chars` the length of the whole body text. `None`
/// if it cannot be a token.
pub fn token_key_ref(head: &[u8], total_chars: u64) -> Option<KeyRef> {
    token_key_ref_of(1, head, total_chars)
}

/// [`token_key_ref`] for a token of format `format` (1 or 2).
pub fn token_key_ref_of(format: u8, head: &[u8], total_chars: u64) -> Option<KeyRef> {
    let usable = head.len().min(REF_CHARS) / 4 * 4;
    let bytes = URL_SAFE_NO_PAD.decode(&head[..usable]).ok()?;
    let (kref, _) = key_ref_prefix(format, &bytes)?;
    if kref.version == 0 {
        return None;
    }
    // Shorter than the smallest token for this name: not a token.
    let n = kref.name.len();
    let min_chars = if format == 2 {
        token_len_v2(n, 0)
    } else {
        token_len(n, 0)
    } - PREFIX.len();
    let min_chars = min_chars as u64;
    if total_chars < min_chars {
        return None;
    }
    Some(kref)
}

/// Where the scanner is in the byte stream.
enum State {
    /// Between tokens; `prev` is the last byte seen.
    Idle { prev: Option<u8> },
    /// Matched this many bytes of `hsc1.` or `hsc2.` (byte 3, the format
    /// version, when matched, is the second field).
    Prefix(usize, u8),
    /// In the base64 body: its first characters and its length so far.
    Body {
        head: Vec<u8>,
        chars: u64,
        version: u8,
    },
}

/// Counts the column tokens in a byte stream by the key version they depend
/// on. Feed it with [`TokenScanner::feed`] (or as an [`io::Write`]), then
/// [`TokenScanner::finish`].
pub struct TokenScanner {
    state: State,
    found: BTreeMap<KeyRef, u64>,
}

impl Default for TokenScanner {
    fn default() -> Self {
        TokenScanner {
            state: State::Idle { prev: None },
            found: BTreeMap::new(),
        }
    }
}

impl TokenScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans the next piece of the stream (tokens may span pieces).
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Idle { prev } => {
                    // Fast path: jump to the next `h`.
                    let Some(at) = data.iter().position(|&b| b == PREFIX[0]) else {
                        self.state = State::Idle {
                            prev: data.last().copied(),
                        };
                        return;
                    };
                    let before = if at == 0 { *prev } else { Some(data[at - 1]) };
                    self.state = if may_precede(before) {
                        State::Prefix(1, 0)
                    } else {
                        State::Idle {
                            prev: Some(PREFIX[0]),
                        }
                    };
                    data = &data[at + 1..];
                }
                State::Prefix(k, version) => {
                    let b = data[0];
                    // Byte 3 is the format version: `1` or `2`.
                    let matched = if *k == 3 {
                        matches!(b, b'1' | b'2')
                    } else {
                        b == PREFIX[*k]
                    };
                    if matched {
                        if *k == 3 {
                            *version = b - b'0';
                        }
                        *k += 1;
                        if *k == PREFIX.len() {
                            self.state = State::Body {
                                head: Vec::with_capacity(REF_CHARS),
                                chars: 0,
                                version: *version,
                            };
                        }
                        data = &data[1..];
                    } else {
                        // Every prefix byte before the mismatch is a token
                        // character, so no token can start inside it: look
                        // at `b` again as an ordinary byte after one.
                        self.state = State::Idle {
                            prev: Some(PREFIX[*k - 1]),
                        };
                    }
                }
                State::Body { head, chars, .. } => {
                    let run = data
                        .iter()
                        .position(|&b| !is_token_char(b))
                        .unwrap_or(data.len());
                    let want = REF_CHARS.saturating_sub(head.len()).min(run);
                    head.extend_from_slice(&data[..want]);
                    *chars += run as u64;
                    if run == data.len() {
                        return;
                    }
                    // The body ended at a byte outside the alphabet.
                    self.end_body();
                    self.state = State::Idle {
                        prev: Some(data[run]),
                    };
                    data = &data[run + 1..];
                }
            }
        }
    }

    fn end_body(&mut self) {
        if let State::Body {
            head,
            chars,
            version,
        } = &self.state
        {
            if let Some(k) = token_key_ref_of(*version, head, *chars) {
                *self.found.entry(k).or_default() += 1;
            }
        }
    }

    /// Ends the stream and returns how many tokens each key version has.
    pub fn finish(mut self) -> BTreeMap<KeyRef, u64> {
        self.end_body();
        self.found
    }
}

impl io::Write for TokenScanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What one key version is needed by.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Usage {
    /// hsmseal files whose envelope is under this version.
    pub files: u64,
    /// Column tokens under this version (in plain or sealed dumps).
    pub tokens: u64,
    /// Every path that needs the version (a file counted once per version).
    pub paths: Vec<String>,
}

/// Key versions and what needs each, over any number of files.
#[derive(Debug, Default, Clone)]
pub struct Dependencies {
    pub by_key: BTreeMap<KeyRef, Usage>,
}

impl Dependencies {
    /// Records that the file `path` is sealed under `k`.
    pub fn add_file(&mut self, k: &KeyRef, path: &str) {
        let u = self.by_key.entry(k.clone()).or_default();
        u.files += 1;
        if u.paths.last().map(String::as_str) != Some(path) {
            u.paths.push(path.to_string());
        }
    }

    /// Records the tokens found in `path`.
    pub fn add_tokens(&mut self, found: &BTreeMap<KeyRef, u64>, path: &str) {
        for (k, n) in found {
            let u = self.by_key.entry(k.clone()).or_default();
            u.tokens += n;
            if u.paths.last().map(String::as_str) != Some(path) {
                u.paths.push(path.to_string());
            }
        }
    }

    /// What needs version `version` of key `name`, if anything does.
    pub fn of(&self, name: &str, version: u32) -> Option<&Usage> {
        self.by_key.get(&KeyRef {
            name: name.to_string(),
            version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{KeyBackend, MemoryBackend};
    use crate::columns::token::Sealer;

    fn tokens(b: &MemoryBackend, name: &str, n: usize, value_len: usize) -> Vec<Vec<u8>> {
        let kwk = KeyRef {
            name: name.into(),
            version: b.current_version(name).unwrap(),
        };
        let mut sealer = Sealer::new(b, &kwk, 1000).unwrap();
        (0..n)
            .map(|i| {
                let mut out = Vec::new();
                sealer
                    .seal(b"aad", 0, &vec![b'x'; value_len + i], &mut out)
                    .unwrap();
                out
            })
            .collect()
    }

    fn scan_in_pieces(data: &[u8], piece: usize) -> BTreeMap<KeyRef, u64> {
        let mut s = TokenScanner::new();
        for c in data.chunks(piece.max(1)) {
            s.feed(c);
        }
        s.finish()
    }

    fn kr(name: &str, version: u32) -> KeyRef {
        KeyRef {
            name: name.into(),
            version,
        }
    }

    #[test]
    fn finds_tokens_in_every_dump_shape_whatever_the_piece_size() {
        let b = MemoryBackend::new();
        b.add_version("pii");
        let v1 = tokens(&b, "pii", 3, 5);
        b.add_version("pii");
        // A version made before token v2 (no KDK): its tokens are v1, so
        // the dump mixes both formats.
        b.add_version_without_kdk("other.key_2-x");
        let v2 = tokens(&b, "pii", 2, 0);
        let o = tokens(&b, "other.key_2-x", 1, 70_000);
        let s = |t: &Vec<u8>| String::from_utf8(t.clone()).unwrap();
        let dump = format!(
            "id,ssn,email\n1,{},\"{}\"\n2,{}\t{}\n{{\"a\":\"{}\",\"b\":[\"{}\"]}}\n{}\\N{}",
            s(&v1[0]),
            s(&v1[1]),
            s(&v2[0]),
            s(&o[0]),
            s(&v1[2]),
            s(&v2[1]),
            "3\t",
            "\n"
        );
        let want: BTreeMap<KeyRef, u64> = [
            (kr("other.key_2-x", 1), 1),
            (kr("pii", 1), 3),
            (kr("pii", 2), 2),
        ]
        .into_iter()
        .collect();
        for piece in [1, 2, 3, 5, 7, 64, 4096, usize::MAX] {
            assert_eq!(
                scan_in_pieces(dump.as_bytes(), piece.min(dump.len())),
                want,
                "piece size {piece}"
            );
        }
        // A token at the very end of the stream, with no byte after it.
        assert_eq!(scan_in_pieces(&v1[0], 3), [(kr("pii", 1), 1)].into());
        assert!(v1[0].starts_with(b"hsc2.") && o[0].starts_with(b"hsc1."));
    }

    #[test]
    fn rejects_what_only_looks_like_a_token() {
        let b = MemoryBackend::new();
        b.add_version("pii");
        let t = String::from_utf8(tokens(&b, "pii", 1, 3).remove(0)).unwrap();
        let body = &t[PREFIX.len()..];
        for (what, text) in [
            ("glued to a word", format!("x{t}")),
            ("glued to a dotted word", format!("a.{t}")),
            ("cut short", t[..t.len() - 40].to_string()),
            ("no prefix", body.to_string()),
            ("other prefix", format!("hsc3.{body}")),
            ("v1 prefix on a v2 body", format!("hsc1.{body}")),
            ("prefix only", "hsc1.".to_string()),
            ("junk body", "hsc1.!!!!".to_string()),
        ] {
            assert!(
                scan_in_pieces(text.as_bytes(), 4).is_empty(),
                "{what}: counted"
            );
        }
        // A zero-length name, a name too long, a bad character, version 0.
        let mk = |n: u8, name: &[u8], v: u32| {
            let mut body = vec![n];
            body.extend_from_slice(name);
            body.extend_from_slice(&v.to_be_bytes());
            body.resize(400, 0);
            format!("hsc1.{}", URL_SAFE_NO_PAD.encode(body))
        };
        for (what, text) in [
            ("empty name", mk(0, b"", 1)),
            ("long name", mk(65, &[b'a'; 65], 1)),
            ("bad char", mk(3, b"a b", 1)),
            ("version 0", mk(3, b"abc", 0)),
        ] {
            assert!(
                scan_in_pieces(text.as_bytes(), 5).is_empty(),
                "{what}: counted"
            );
        }
        assert_eq!(
            scan_in_pieces(mk(3, b"abc", 9).as_bytes(), 5),
            [(kr("abc", 9), 1)].into()
        );
        // Start of a line, after a quote or a separator: counted.
        let line = format!("{t},\"{t}\"\t{t}\n[{t}]");
        assert_eq!(
            scan_in_pieces(line.as_bytes(), 3),
            [(kr("pii", 1), 4)].into()
        );
    }

    #[test]
    fn dependencies_count_files_tokens_and_paths_once() {
        let mut d = Dependencies::default();
        d.add_file(&kr("k", 1), "a.hseal");
        d.add_tokens(&[(kr("k", 1), 5), (kr("p", 2), 1)].into(), "a.hseal");
        d.add_tokens(&[(kr("p", 2), 3)].into(), "b.csv");
        let k1 = d.of("k", 1).unwrap();
        assert_eq!((k1.files, k1.tokens, k1.paths.len()), (1, 5, 1));
        let p2 = d.of("p", 2).unwrap();
        assert_eq!((p2.files, p2.tokens), (0, 4));
        assert_eq!(p2.paths, ["a.hseal", "b.csv"]);
        assert!(d.of("k", 2).is_none());
    }
}
