//! Where a command's bytes come from: a file or stdin. A sealed input that
//! is a regular file has its header read under a shared lock, so it never
//! sees a rewrap half-way.

use hsmseal::envelope::file::AnyHeader as Header;
use hsmseal::error::{Error, Result};
use hsmseal::fs::LockMode;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

/// Where bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Stdin,
    File(PathBuf),
}

impl Input {
    pub fn from_arg(p: &Path) -> Input {
        if p == Path::new("-") {
            Input::Stdin
        } else {
            Input::File(p.to_path_buf())
        }
    }

    pub fn display(&self) -> String {
        match self {
            Input::Stdin => "<stdin>".into(),
            Input::File(p) => p.display().to_string(),
        }
    }

    /// Opens for reading. Directories and missing files are clear I/O errors.
    pub fn open(&self) -> Result<Box<dyn Read + Send>> {
        match self {
            Input::Stdin => Ok(Box::new(io::stdin())),
            Input::File(p) => {
                let f = File::open(p).map_err(|e| Error::io(format!("cannot open: {e}")))?;
                let meta = f
                    .metadata()
                    .map_err(|e| Error::io(format!("cannot stat: {e}")))?;
                if meta.is_dir() {
                    return Err(Error::usage("is a directory"));
                }
                hsmseal::fs::advise_sequential(&f);
                Ok(Box::new(BufReader::with_capacity(hsmseal::fs::IO_BUF, f)))
            }
        }
    }

    /// Opens an hsmseal input and reads its header; the reader is left at
    /// the payload. A regular file's header is read under a shared lock
    /// (released before the payload is read): a rotation holds the
    /// exclusive lock while it rewrites the header, so a reader sees the
    /// header before or after it, never half-way (a torn envelope would read as
    /// damage). The payload never changes in place, so it needs no lock.
    pub fn open_sealed(&self) -> Result<(Header, Box<dyn Read + Send>)> {
        match self {
            Input::Stdin => {
                let mut r = self.open()?;
                let (h, _) = hsmseal::envelope::file::read_header(&mut r)?;
                Ok((h, r))
            }
            Input::File(p) => {
                let f = File::open(p).map_err(|e| Error::io(format!("cannot open: {e}")))?;
                let header = read_header_locked(&f, p)?;
                hsmseal::fs::advise_sequential(&f);
                Ok((
                    header,
                    Box::new(BufReader::with_capacity(hsmseal::fs::IO_BUF, f)),
                ))
            }
        }
    }
}

/// Reads the header of `f` (the file at `p`, positioned at its start); a
/// regular file under a shared lock.
pub fn read_header_locked(f: &File, p: &Path) -> Result<Header> {
    let meta = f
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat: {e}")))?;
    if meta.is_dir() {
        return Err(Error::usage("is a directory"));
    }
    let regular = meta.is_file();
    if regular {
        hsmseal::fs::lock_wait(f, LockMode::Shared, p)?;
    }
    let r = hsmseal::envelope::file::read_header(&mut &*f).map(|(h, _)| h);
    if regular {
        hsmseal::fs::unlock(f);
    }
    r
}
