//! Files: output files written atomically, what an output path means, and
//! locks on existing files. `atomic` (AtomicFile, the registry of temporary
//! files being written, stale ones of killed runs), `durable` (the writer
//! under AtomicFile: page-aligned writes, early write-back), `sink` (resolve_output,
//! Sink, OutputFile, open_stream), `lock` (LockedFile and flock(2)), `spool`
//! (an unlinked scratch file sealed under a key held only in memory).
//!
//! Invariants (docs/SECURITY.md, "Files: rewriting an existing hsmseal
//! file", says why each holds):
//! - Nothing is ever left half-written under its final name: `AtomicFile`
//!   writes a temporary file in the destination's directory (same
//!   filesystem, so the rename is atomic), and `commit()` fsyncs it, renames
//!   it into place and fsyncs the directory.
//! - Only a regular file is ever replaced, and only with `force`: a symbolic
//!   link, FIFO, device, socket or directory at the destination is refused
//!   by `AtomicFile::create` and again right before the rename in `commit`,
//!   and without `force` the rename itself refuses an existing name
//!   (`RENAME_NOREPLACE`), so a file that appeared meanwhile is never
//!   clobbered. `resolve_output` decides beforehand what an output path
//!   means: a file to create or replace, a FIFO or character device to write
//!   into, or this process's stdout.
//! - Every process that rewrites an existing file in place or renames over
//!   it holds an exclusive `flock` on that file while it does, and has
//!   checked under the lock that the path still names the locked inode
//!   (`LockedFile`). So two hsmseal processes never interleave their changes
//!   to one file, and one that waited while the file was replaced works on
//!   the new file, never on an orphaned inode.
//! - A temporary file is flocked by its writer from creation until it is
//!   renamed or removed, and its name carries the writer's pid. One of ours
//!   whose writer is dead (SIGKILL, power loss) is removed by the next run
//!   that writes into that directory; a live writer's never is (its pid
//!   exists and it holds the lock).

mod atomic;
mod durable;
mod lock;
mod sink;
pub mod spool;

pub use atomic::{remove_live_temps_for_exit, AtomicFile, TEMP_MARKER};
pub use lock::{lock_wait, try_lock, unlock, LockMode, LockedFile, LOCK_NOTICE_AFTER};
pub use sink::{names_stdout, open_stream, resolve_output, OutputFile, Sink};

use crate::error::{Error, Result};
use std::fs::{self, File, Metadata};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Buffer size for readers, pipes and devices: large reads and writes
/// bypass it. (Output files go through `durable::DurableWriter` instead.)
pub const IO_BUF: usize = 64 * 1024;

/// Tells the kernel `f` is read from start to end once, so it reads ahead
/// further. A hint: where it is not supported nothing changes.
pub fn advise_sequential(f: &File) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a plain syscall on a descriptor the caller owns; the
        // result is only advice, so an error (a pipe: ESPIPE) is ignored.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = f;
}

/// Identity of a file: device and inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    pub fn of(m: &Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// What a metadata's file type is, for messages ("a FIFO").
pub fn describe(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// The directory a path lives in ("." for a bare file name).
pub fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// fsync a directory so a rename or create inside it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io_at("fsync of directory", dir.display(), &e))
}

/// True if `a` and `b` name the same existing file (so writing `b` would
/// destroy the input `a`).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => FileId::of(&x) == FileId::of(&y),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_file_detects_links() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        fs::write(&a, b"x").unwrap();
        let b = d.path().join("b");
        std::os::unix::fs::symlink(&a, &b).unwrap();
        assert!(same_file(&a, &b));
        assert!(!same_file(&a, &d.path().join("c")));
    }
}
