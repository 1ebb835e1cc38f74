//! flock(2) on existing files, and `LockedFile`: an existing regular file,
//! exclusively locked, that its path still names (the third invariant of
//! `crate::fs`). Waits have no timeout (a lock dies with its holder) and are
//! announced through `crate::notify` after `LOCK_NOTICE_AFTER`.

use super::{describe, FileId};
use crate::error::{Error, Result};
use crate::notify::notice;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// Which flock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// How long a lock wait goes on before it is announced on stderr.
pub const LOCK_NOTICE_AFTER: Duration = Duration::from_secs(1);

/// Longest pause between two attempts while waiting for a lock: the most a
/// waiter adds after the holder lets go.
pub(super) const LOCK_POLL_MAX: Duration = Duration::from_millis(50);

fn flock_op(f: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor this process owns; no memory involved.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Takes `mode` on `f` if no other open file holds a conflicting lock:
/// `Ok(false)` if one does.
pub fn try_lock(f: &File, mode: LockMode) -> io::Result<bool> {
    let op = match mode {
        LockMode::Shared => libc::LOCK_SH,
        LockMode::Exclusive => libc::LOCK_EX,
    };
    match flock_op(f, op | libc::LOCK_NB) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Takes `mode` on `f` (the file at `path`), waiting as long as another
/// process holds a conflicting lock. There is no timeout: an flock dies
/// with its holder, so a wait ends when the holder finishes or is killed,
/// and a legitimately long holder (`rotate --reencrypt` of a large file)
/// must not make a waiter fail. After `LOCK_NOTICE_AFTER` the wait is
/// announced once on stderr (unless `--quiet`), so it is never silent.
/// It polls (non-blocking attempts, pauses up to `LOCK_POLL_MAX`) rather
/// than blocking, which keeps the notice on this thread.
pub fn lock_wait(f: &File, mode: LockMode, path: &Path) -> Result<()> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    let mut announced = false;
    loop {
        match try_lock(f, mode) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(Error::io_at("cannot lock", path.display(), &e)),
        }
        if !announced && start.elapsed() >= LOCK_NOTICE_AFTER {
            announced = true;
            notice(&format!(
                "waiting for {}: another process is changing it (it holds the file's lock)",
                path.display()
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(LOCK_POLL_MAX);
    }
}

/// Releases this open file's flock (closing the file does too).
pub fn unlock(f: &File) {
    let _ = flock_op(f, libc::LOCK_UN);
}

/// How often a lock is retried on a path whose file keeps being replaced
/// by other processes while this one waits.
pub(super) const MAX_RELOCKS: usize = 1000;

/// An existing regular file, opened and exclusively flocked, that its path
/// still named once the lock was granted. Every hsmseal process that
/// changes an existing file (rotation in place, a rename over it, an
/// `--in-place` removal) holds this first, so their changes never
/// interleave; the lock is released when this is dropped.
pub struct LockedFile {
    file: File,
    id: FileId,
}

/// Why locking a path did not give a `LockedFile`.
pub(super) enum LockFail {
    /// The path names no file (any more).
    Gone,
    /// The path's file cannot be opened (for example permissions).
    Open(io::Error),
    Other(Error),
}

pub(super) fn lock_path(
    path: &Path,
    write: bool,
    follow: bool,
) -> std::result::Result<LockedFile, LockFail> {
    for _ in 0..MAX_RELOCKS {
        let mut flags = libc::O_NONBLOCK; // a FIFO must not block the open
        if !follow {
            flags |= libc::O_NOFOLLOW;
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(flags)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(LockFail::Gone),
            Err(e) => return Err(LockFail::Open(e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| LockFail::Other(Error::io(format!("cannot stat: {e}"))))?;
        if !meta.is_file() {
            return Err(LockFail::Other(Error::usage(format!(
                "is {}, not a regular file",
                describe(&meta)
            ))));
        }
        lock_wait(&file, LockMode::Exclusive, path).map_err(LockFail::Other)?;
        let now = if follow {
            fs::metadata(path)
        } else {
            fs::symlink_metadata(path)
        };
        match now {
            Ok(m) if FileId::of(&m) == FileId::of(&meta) => {
                return Ok(LockedFile {
                    file,
                    id: FileId::of(&meta),
                })
            }
            // Replaced while this process waited (by `rotate --reencrypt`
            // or a `--force` output): the new file is the one to lock.
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(LockFail::Gone),
            Err(e) => return Err(LockFail::Other(Error::io(format!("cannot stat: {e}")))),
        }
    }
    Err(LockFail::Other(Error::io(
        "was replaced by other processes again and again while this one waited for its lock; run again",
    )))
}

impl LockedFile {
    /// Opens the regular file at `path` (read-only, or read-write with
    /// `write`; symbolic links followed), waits for its exclusive lock, and
    /// makes sure the path still names it (else locks the new file there).
    /// Messages name no path: callers add it.
    pub fn open(path: &Path, write: bool) -> Result<LockedFile> {
        lock_path(path, write, true).map_err(|f| match f {
            LockFail::Gone => Error::io("cannot open: no such file (removed by another process?)"),
            LockFail::Open(e) => Error::io(format!("cannot open: {e}")),
            LockFail::Other(e) => e,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn file_mut(&mut self) -> &mut File {
        &mut self.file
    }

    pub fn id(&self) -> FileId {
        self.id
    }
}
