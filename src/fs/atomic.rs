//! `AtomicFile`: nothing is ever left half-written under its final name
//! (the first, second and fourth invariants of `crate::fs`). A temporary
//! file in the destination's directory, flocked by its writer and named
//! with its pid, is fsynced and renamed into place; the registry of
//! temporary files being written lets a signal handler remove them; stale
//! ones of killed runs are removed by the next run writing there.
//!
//! Hand-written rather than `tempfile`'s `persist` (or `atomicwrites`):
//! neither keeps a registry a signal handler can clean up from, nor marks
//! a temp file with its writer's pid and lock so the next run can tell a
//! stale one from a live one, nor fsyncs the directory after the rename.

use super::durable::DurableWriter;
use super::lock::{lock_path, try_lock, LockFail, LockMode, LockedFile, MAX_RELOCKS};
use super::{describe, parent_dir, sync_dir, FileId};
use crate::error::{Error, Result};
use crate::notify::notice;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{self, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Temporary files being written right now, so a SIGINT/SIGTERM handler can
/// remove them before the process exits (destructors do not run then).
static LIVE_TEMPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn unregister_temp(p: &Path) {
    if let Ok(mut v) = LIVE_TEMPS.lock() {
        v.retain(|x| x != p);
    }
}

/// Removes every temporary file still being written. Called on SIGINT and
/// SIGTERM just before exiting; finished outputs are already renamed into
/// place and are untouched, inputs are never written. The registry stays
/// locked afterwards, so no worker thread can create another temporary file
/// before the process exits (creating one happens under this lock).
pub fn remove_live_temps_for_exit() {
    let guard = LIVE_TEMPS.lock().unwrap_or_else(|p| p.into_inner());
    for p in guard.iter() {
        let _ = fs::remove_file(p);
    }
    std::mem::forget(guard);
}

/// Marker in every temporary file name hsmseal creates:
/// `.NAME.hsmseal-tmp-PID-RANDOM` (PID decimal, RANDOM 16 hex digits).
pub const TEMP_MARKER: &str = ".hsmseal-tmp-";

pub struct AtomicFile {
    /// Gathers small writes, writes page-aligned, and starts write-back
    /// as it goes, so the fsync in `commit` waits only for the tail
    /// (`super::durable`).
    file: Option<DurableWriter>,
    temp: PathBuf,
    dest: PathBuf,
    force: bool,
    committed: bool,
}

/// Refuses a destination that is not absent or a regular file, and an
/// existing one without `force`. `at_commit`: checked again right before
/// the rename (the messages say what changed meanwhile).
fn check_destination(dest: &Path, force: bool, at_commit: bool) -> Result<Option<Metadata>> {
    match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io_at("cannot stat", dest.display(), &e)),
        Ok(m) if !m.file_type().is_file() => Err(Error::usage(format!(
            "{} {} {}; hsmseal only ever replaces a regular file",
            dest.display(),
            if at_commit { "became" } else { "is" },
            describe(&m)
        ))),
        Ok(_) if !force => Err(Error::usage(format!(
            "{} {}; pass --force to overwrite it",
            dest.display(),
            if at_commit {
                "appeared while writing"
            } else {
                "already exists"
            }
        ))),
        Ok(m) => Ok(Some(m)),
    }
}

/// `rename(from, to)` that fails with `AlreadyExists` if `to` exists.
/// `Ok(false)` if the filesystem cannot do that (the caller falls back to
/// a check just before a plain rename).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
    use std::ffi::CString;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(e),
    }
}

impl AtomicFile {
    /// Starts writing `dest` with permissions `mode` (e.g. 0o600 for
    /// decrypted data). Refuses (ErrorKind::Usage) if `dest` exists and
    /// `force` is false, or is anything but a regular file; both are checked
    /// again at commit time. Removes stale temporary files of killed runs
    /// from the directory first (once per directory and process).
    pub fn create(dest: &Path, mode: u32, force: bool) -> Result<AtomicFile> {
        check_destination(dest, force, false)?;
        let dir = parent_dir(dest);
        let name = dest
            .file_name()
            .ok_or_else(|| Error::usage(format!("{} is not a file name", dest.display())))?
            .to_string_lossy()
            .into_owned();
        sweep_stale_temps(&dir);
        let pid = std::process::id();
        // Random suffix: two concurrent runs must never share a temp file.
        let mut last_err = None;
        for _ in 0..16 {
            let suffix: u64 = rand::random();
            let temp = dir.join(format!(".{name}{TEMP_MARKER}{pid}-{suffix:016x}"));
            // Registered, created and locked under the registry's lock, so a
            // signal handler sees every temporary file that exists (and none
            // can appear after it has cleaned up).
            let mut live = LIVE_TEMPS.lock().unwrap_or_else(|p| p.into_inner());
            live.push(temp.clone());
            let opened = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&temp);
            let opened = match opened {
                // The writer's lock, held until the file is renamed or
                // removed: a later run's sweep never takes a live file. On a
                // filesystem without flock the sweep cannot lock it either,
                // and so leaves it alone.
                Ok(f) => match try_lock(&f, LockMode::Exclusive) {
                    Ok(false) => {
                        // Another run's sweep holds it (it can only be in
                        // another pid namespace) and will remove it: take
                        // another name.
                        live.pop();
                        continue;
                    }
                    _ => Ok(f),
                },
                Err(e) => Err(e),
            };
            if opened.is_err() {
                live.pop();
            }
            drop(live);
            match opened {
                Ok(f) => {
                    return Ok(AtomicFile {
                        file: Some(DurableWriter::new(f)),
                        temp,
                        dest: dest.to_path_buf(),
                        force,
                        committed: false,
                    })
                }
                // Not ours: it was never registered, so no signal handler deletes it.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => {
                    return Err(Error::io_at(
                        "cannot create a temporary file in",
                        dir.display(),
                        &e,
                    ));
                }
            }
        }
        Err(Error::io_at(
            "cannot create a temporary file in",
            dir.display(),
            &last_err.unwrap_or_else(|| io::Error::other("name collision")),
        ))
    }

    /// The final path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// The temporary path being written.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Makes the output durable under its final name; returns the identity
    /// of the file now there. An existing destination is replaced only if it
    /// is a regular file and `force` was given, and only while holding its
    /// lock (so a rotation in progress on it finishes first, and one waiting
    /// for it moves on to the new file).
    pub fn commit(self) -> Result<FileId> {
        self.finish(None)
    }

    /// `commit` for a caller that already holds the destination's lock
    /// (`rotate --reencrypt`): replaces exactly the locked file, which must
    /// still be at the destination.
    pub fn commit_over(self, held: &LockedFile) -> Result<FileId> {
        self.finish(Some(held))
    }

    fn finish(mut self, held: Option<&LockedFile>) -> Result<FileId> {
        let writer = self.file.take().expect("AtomicFile used after commit");
        // The file stays open (and so locked) until it is in place.
        let file = writer
            .finish()
            .map_err(|e| Error::io_at("writing", self.temp.display(), &e))?;
        file.sync_all()
            .map_err(|e| Error::io_at("fsync of", self.temp.display(), &e))?;
        let id = FileId::of(
            &file
                .metadata()
                .map_err(|e| Error::io_at("cannot stat", self.temp.display(), &e))?,
        );
        self.rename_into_place(held)?;
        self.committed = true;
        unregister_temp(&self.temp);
        drop(file);
        sync_dir(&parent_dir(&self.dest))?;
        Ok(id)
    }

    fn rename_into_place(&self, held: Option<&LockedFile>) -> Result<()> {
        let rename = |what: &str| {
            fs::rename(&self.temp, &self.dest)
                .map_err(|e| Error::io_at(what, self.dest.display(), &e))
        };
        for _ in 0..MAX_RELOCKS {
            let existing = check_destination(&self.dest, self.force, true)?;
            let Some(meta) = existing else {
                if held.is_some() {
                    return Err(Error::io(format!(
                        "{} was removed by another process meanwhile; not putting it back",
                        self.dest.display()
                    )));
                }
                match rename_noreplace(&self.temp, &self.dest) {
                    Ok(true) => return Ok(()),
                    // No RENAME_NOREPLACE here: the check above is the best
                    // there is.
                    Ok(false) => return rename("cannot rename into place"),
                    // Appeared since the check: decide again.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => {
                        return Err(Error::io_at(
                            "cannot rename into place",
                            self.dest.display(),
                            &e,
                        ))
                    }
                }
            };
            if let Some(h) = held {
                if h.id() != FileId::of(&meta) {
                    return Err(Error::io(format!(
                        "{} was replaced by another program meanwhile; left it as it is",
                        self.dest.display()
                    )));
                }
                return rename("cannot rename into place");
            }
            match lock_path(&self.dest, false, false) {
                Ok(lock) => {
                    let r = rename("cannot rename into place");
                    drop(lock);
                    return r;
                }
                // Gone, or replaced by a link or a FIFO meanwhile: decide again.
                Err(LockFail::Gone) => continue,
                Err(LockFail::Open(e)) if e.raw_os_error() == Some(libc::ELOOP) => continue,
                // A file this user cannot read cannot be under rotation by
                // this user's hsmseal either: replace it without its lock.
                Err(LockFail::Open(e)) if e.kind() == io::ErrorKind::PermissionDenied => {
                    return rename("cannot rename into place")
                }
                Err(LockFail::Open(e)) => {
                    return Err(Error::io_at("cannot open", self.dest.display(), &e))
                }
                Err(LockFail::Other(e)) => return Err(e.context(self.dest.display())),
            }
        }
        Err(Error::io(format!(
            "{} kept changing while hsmseal tried to put its output there; run again",
            self.dest.display()
        )))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file
            .as_mut()
            .expect("AtomicFile used after commit")
            .write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file
            .as_mut()
            .expect("AtomicFile used after commit")
            .write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file
            .as_mut()
            .expect("AtomicFile used after commit")
            .flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            // Removed while still open, so still locked: no sweep can see
            // an unlocked temporary file of a live run.
            let _ = fs::remove_file(&self.temp);
            drop(self.file.take());
            unregister_temp(&self.temp);
        }
    }
}

// ---------------------------------------------------------------------------
// Stale temporary files of killed runs

/// Directories this process has already swept.
static SWEPT: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// The writer's pid, if `name` is one of our temporary file names
/// (`.NAME.hsmseal-tmp-PID-RANDOM`).
fn temp_writer_pid(name: &OsStr) -> Option<u32> {
    let s = name.to_str()?;
    if !s.starts_with('.') {
        return None;
    }
    let at = s.rfind(TEMP_MARKER)?;
    let rest = &s[at + TEMP_MARKER.len()..];
    let (pid, random) = rest.split_once('-')?;
    let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
    if random.len() != 16 || !random.chars().all(hex) {
        return None;
    }
    if pid.is_empty() || !pid.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether a process with this pid exists (in this pid namespace).
fn process_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if p <= 0 {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(p, 0) } == 0 {
        return true;
    }
    // EPERM: it exists, under another user.
    io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes `path` if it is a stale temporary file: a regular file owned by
/// this user, whose writer no longer exists, and whose lock can be taken
/// without waiting (a live writer in another pid namespace holds it), still
/// the same file when it is removed.
fn remove_if_stale(path: &Path) -> bool {
    let Ok(m) = fs::symlink_metadata(path) else {
        return false;
    };
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if !m.file_type().is_file() || m.uid() != uid {
        return false;
    }
    let Ok(f) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    else {
        return false;
    };
    match f.metadata() {
        Ok(fm) if fm.is_file() && FileId::of(&fm) == FileId::of(&m) => {}
        _ => return false,
    }
    if !matches!(try_lock(&f, LockMode::Exclusive), Ok(true)) {
        return false;
    }
    match fs::symlink_metadata(path) {
        Ok(now) if FileId::of(&now) == FileId::of(&m) => fs::remove_file(path).is_ok(),
        _ => false,
    }
}

/// Removes our stale temporary files from `dir`, once per directory and
/// process (a bulk run writing 10,000 files into one directory reads it
/// once). Best effort: a directory that cannot be read is left as it is.
fn sweep_stale_temps(dir: &Path) {
    {
        let mut swept = SWEPT.lock().unwrap_or_else(|p| p.into_inner());
        if !swept.insert(dir.to_path_buf()) {
            return;
        }
    }
    let Ok(listing) = fs::read_dir(dir) else {
        return;
    };
    let me = std::process::id();
    for entry in listing.flatten() {
        let Some(pid) = temp_writer_pid(&entry.file_name()) else {
            continue;
        };
        if pid == me || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        if remove_if_stale(&path) {
            notice(&format!(
                "removed {}: a temporary file left by a run that was killed (process {pid})",
                path.display()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn commit_renames_and_drop_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        let mut f = AtomicFile::create(&dest, 0o600, false).unwrap();
        f.write_all(b"hello").unwrap();
        let temp = f.temp_path().to_path_buf();
        assert!(temp.exists() && !dest.exists());
        f.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"hello");
        assert!(!temp.exists());
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // Existing output refused without force, kept intact.
        assert!(AtomicFile::create(&dest, 0o600, false).is_err());
        let mut g = AtomicFile::create(&dest, 0o600, true).unwrap();
        g.write_all(b"partial").unwrap();
        drop(g);
        assert_eq!(fs::read(&dest).unwrap(), b"hello");
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "temp file left behind"
        );
    }

    #[test]
    fn commit_rechecks_the_destination_and_never_replaces_a_non_file() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        let temps = || {
            fs::read_dir(d.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .contains(TEMP_MARKER)
                })
                .count()
        };
        // Appeared while writing, without force: kept (RENAME_NOREPLACE).
        let mut f = AtomicFile::create(&dest, 0o600, false).unwrap();
        f.write_all(b"new").unwrap();
        fs::write(&dest, b"theirs").unwrap();
        let e = f.commit().unwrap_err();
        assert!(e.message().contains("appeared while writing"), "{e}");
        assert_eq!(fs::read(&dest).unwrap(), b"theirs");
        assert_eq!(temps(), 0);
        // Turned into a link, a FIFO or a directory while writing, with
        // force: refused, left as it is.
        for kind in ["link", "fifo", "dir"] {
            fs::remove_file(&dest).ok();
            fs::remove_dir(&dest).ok();
            let mut f = AtomicFile::create(&dest, 0o600, true).unwrap();
            f.write_all(b"new").unwrap();
            match kind {
                "link" => std::os::unix::fs::symlink("elsewhere", &dest).unwrap(),
                "fifo" => {
                    let c = std::ffi::CString::new(dest.to_str().unwrap()).unwrap();
                    // SAFETY: a NUL-terminated path.
                    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
                }
                _ => fs::create_dir(&dest).unwrap(),
            }
            let e = f.commit().unwrap_err();
            assert!(
                e.message().contains("only ever replaces a regular file"),
                "{kind}: {e}"
            );
            let t = fs::symlink_metadata(&dest).unwrap().file_type();
            assert!(!t.is_file(), "{kind} replaced");
            assert_eq!(temps(), 0, "{kind}: temp left");
        }
        fs::remove_dir(&dest).unwrap();
        // A regular file with force: replaced, and the new identity returned.
        fs::write(&dest, b"old").unwrap();
        let mut f = AtomicFile::create(&dest, 0o600, true).unwrap();
        f.write_all(b"new").unwrap();
        let id = f.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        assert_eq!(id, FileId::of(&fs::metadata(&dest).unwrap()));
        // Refused up front too.
        fs::remove_file(&dest).unwrap();
        std::os::unix::fs::symlink("elsewhere", &dest).unwrap();
        assert!(AtomicFile::create(&dest, 0o600, true).is_err());
    }

    #[test]
    fn temp_names_carry_the_writer_pid() {
        let d = tempfile::tempdir().unwrap();
        let f = AtomicFile::create(&d.path().join("x.y"), 0o600, false).unwrap();
        let name = f.temp_path().file_name().unwrap().to_owned();
        assert_eq!(temp_writer_pid(&name), Some(std::process::id()));
        // The writer holds its temp file's lock.
        let other = std::fs::File::open(f.temp_path()).unwrap();
        assert!(!try_lock(&other, LockMode::Exclusive).unwrap());
        drop(f);
        for bad in [
            "x.hsmseal-tmp-12-0123456789abcdef",  // not hidden
            ".x.hsmseal-tmp-12-0123456789abcde",  // short
            ".x.hsmseal-tmp-12-0123456789abcdeX", // not hex
            ".x.hsmseal-tmp--0123456789abcdef",   // no pid
            ".x.hsmseal-tmp-0123456789abcdef",    // old form
            ".x.hsmseal-tmp-1a-0123456789abcdef", // pid not decimal
        ] {
            assert_eq!(temp_writer_pid(OsStr::new(bad)), None, "{bad}");
        }
        assert_eq!(
            temp_writer_pid(OsStr::new(
                ".a.hsmseal-tmp-b.hsmseal-tmp-77-0123456789abcdef"
            )),
            Some(77)
        );
    }
}
