//! One error type for the whole library, and the process exit code each kind
//! of failure maps to.
//!
//! Invariant: an `Error`'s message is a single line that names what failed
//! (file, row, PKCS#11 call) and, where there is one, what the user can do.
//! It never contains key material, a PIN or plaintext.

use std::fmt;

/// What went wrong, at the granularity a script needs to react to.
/// Each kind has its own documented exit code (see README "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad flags, bad configuration, refused overwrite.
    Usage,
    /// Data failed authentication: tampered, truncated, reordered, swapped or
    /// encrypted under a different key.
    Integrity,
    /// The named key or key version does not exist, is disabled, or has
    /// attributes weaker than hsmseal requires.
    Key,
    /// The PKCS#11 module or token could not be loaded, found or used.
    Token,
    /// Login to the token failed (wrong or locked PIN).
    Pin,
    /// Reading or writing a file or stream failed.
    Io,
    /// Input is not in the expected format (not an hsmseal file, bad CSV...).
    Format,
    /// The run was interrupted by a signal.
    Interrupted,
    /// The work was done, but its audit entry could not be written (full
    /// disk, a log changed meanwhile, the HSM unreachable): the caller must
    /// not take it for a failure to redo, nor for an audited success.
    Unaudited,
}

impl ErrorKind {
    /// Process exit code for this kind. 1 is reserved for "some items of a
    /// bulk run failed"; 0 for success.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Usage => 2,
            ErrorKind::Integrity => 3,
            ErrorKind::Key => 4,
            ErrorKind::Token => 5,
            ErrorKind::Pin => 6,
            ErrorKind::Io => 7,
            ErrorKind::Format => 8,
            ErrorKind::Interrupted => 130,
            ErrorKind::Unaudited => 9,
        }
    }

    /// A fixed phrase for this kind (the README's exit code table).
    pub fn describe(self) -> &'static str {
        match self {
            ErrorKind::Usage => "usage or configuration error",
            ErrorKind::Integrity => "authentication failed",
            ErrorKind::Key => "key error",
            ErrorKind::Token => "token error",
            ErrorKind::Pin => "PIN error",
            ErrorKind::Io => "I/O error",
            ErrorKind::Format => "input is not in the expected format",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::Unaudited => "done but not audited",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    /// The OS's own description of the I/O error underneath, if any
    /// ("No space left on device (os error 28)"): from the errno or the
    /// `std::io::ErrorKind` only, so it never holds a path. See [`Error::summary`].
    os_cause: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            os_cause: None,
        }
    }
    pub fn usage(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, m)
    }
    pub fn integrity(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Integrity, m)
    }
    pub fn key(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Key, m)
    }
    pub fn token(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Token, m)
    }
    pub fn pin(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Pin, m)
    }
    pub fn io(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io, m)
    }
    pub fn format(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Format, m)
    }

    /// An I/O error with what was being done and to which path.
    pub fn io_at(what: &str, path: impl fmt::Display, e: &std::io::Error) -> Self {
        let mut err = Self::io(format!("{what} {path}: {e}"));
        // Not `e.to_string()`: a wrapped error (tempfile's) names its path.
        err.os_cause = Some(match e.raw_os_error() {
            Some(code) => std::io::Error::from_raw_os_error(code).to_string(),
            None => e.kind().to_string(),
        });
        err
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn exit_code(&self) -> i32 {
        self.kind.exit_code()
    }

    /// What went wrong without saying where: the kind's fixed phrase, and
    /// for an I/O error the OS's reason (`I/O error: No space left on device
    /// (os error 28)`). Built only from those two sources, never from the
    /// message, so it holds no path, file name or row: this is what the
    /// audit log records (docs/FORMAT.md 7.1), the message goes to stderr.
    pub fn summary(&self) -> String {
        match &self.os_cause {
            Some(c) => format!("{}: {c}", self.kind.describe()),
            None => self.kind.describe().to_string(),
        }
    }

    /// Prefix the message with where it happened (a file name, a row), keeping
    /// the kind: `"backup.hseal: authentication failed ..."`.
    pub fn context(mut self, place: impl fmt::Display) -> Self {
        self.message = format!("{place}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never more than one line, whatever a lower layer put in the message.
        let one_line = self.message.replace(['\n', '\r'], " ");
        f.write_str(&one_line)
    }
}

impl std::error::Error for Error {}

/// `n` and the noun in the number that goes with it, for messages:
/// `count(1, "file", "files")` is "1 file", `count(0, ..)` "0 files".
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Extension to add a place to any `Result<_, Error>`.
pub trait ResultExt<T> {
    fn context(self, place: impl fmt::Display) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn context(self, place: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.context(place))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_agree_with_their_noun() {
        assert_eq!(count(1, "chunk", "chunks"), "1 chunk");
        assert_eq!(count(0, "chunk", "chunks"), "0 chunks");
        assert_eq!(count(2, "entry", "entries"), "2 entries");
    }

    #[test]
    fn the_summary_never_holds_the_place() {
        let path = "acme-payroll-2025/missing.csv";
        let os = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = Error::io_at("cannot write", path, &os).context("row 7");
        assert!(e.to_string().contains(path));
        assert_eq!(
            e.summary(),
            "I/O error: No space left on device (os error 28)"
        );
        // An error that wraps its path in its own text (tempfile does).
        let wrapped = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{path}: gone"));
        let e = Error::io_at("cannot open", path, &wrapped);
        assert!(!e.summary().contains("acme"), "{}", e.summary());
        let e = Error::integrity(format!("{path}: authentication failed")).context(path);
        assert_eq!(e.summary(), "authentication failed");
    }
}
