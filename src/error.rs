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
        }
    }
}

#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
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
        Self::io(format!("{what} {path}: {e}"))
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

/// Extension to add a place to any `Result<_, Error>`.
pub trait ResultExt<T> {
    fn context(self, place: impl fmt::Display) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn context(self, place: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.context(place))
    }
}
