//! Atomic output files: nothing is ever left half-written under its final
//! name.
//!
//! `AtomicFile` writes to a temporary file in the destination's directory
//! (same filesystem, so the final rename is atomic), and `commit()` fsyncs the
//! data, renames it into place and fsyncs the directory so the rename itself is
//! durable. Dropping an uncommitted `AtomicFile` removes the temporary file.
//! Temporary names start with `.` and contain `.hsmseal-tmp-` so a crashed
//! run's leftovers are recognisable.

use crate::error::{Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Buffer size for output files: large reads and writes bypass it. 1 MiB
/// buffers made 1 MiB-aligned writes, which were markedly slower on the
/// build machines than 64 KiB pieces.
pub const IO_BUF: usize = 64 * 1024;

/// Temporary files being written right now, so a SIGINT/SIGTERM handler can
/// remove them before the process exits (destructors do not run then).
static LIVE_TEMPS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

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

/// Marker in every temporary file name hsmseal creates.
pub const TEMP_MARKER: &str = ".hsmseal-tmp-";

pub struct AtomicFile {
    file: Option<io::BufWriter<File>>,
    temp: PathBuf,
    dest: PathBuf,
    force: bool,
    committed: bool,
}

impl AtomicFile {
    /// Starts writing `dest` with permissions `mode` (e.g. 0o600 for
    /// decrypted data). Refuses (ErrorKind::Usage) if `dest` exists and
    /// `force` is false; the check is repeated at commit time.
    pub fn create(dest: &Path, mode: u32, force: bool) -> Result<AtomicFile> {
        if !force && dest.symlink_metadata().is_ok() {
            return Err(Error::usage(format!(
                "{} already exists; pass --force to overwrite it",
                dest.display()
            )));
        }
        let dir = parent_dir(dest);
        let name = dest
            .file_name()
            .ok_or_else(|| Error::usage(format!("{} is not a file name", dest.display())))?
            .to_string_lossy()
            .into_owned();
        // Random suffix: two concurrent runs must never share a temp file.
        let mut last_err = None;
        for _ in 0..16 {
            let suffix: u64 = rand::random();
            let temp = dir.join(format!(".{name}{TEMP_MARKER}{suffix:016x}"));
            // Registered and created under the registry's lock, so a signal
            // handler sees every temporary file that exists (and none can
            // appear after it has cleaned up).
            let mut live = LIVE_TEMPS.lock().unwrap_or_else(|p| p.into_inner());
            live.push(temp.clone());
            let opened = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&temp);
            if opened.is_err() {
                live.pop();
            }
            drop(live);
            match opened {
                Ok(f) => {
                    return Ok(AtomicFile {
                        file: Some(io::BufWriter::with_capacity(IO_BUF, f)),
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

    /// Makes the output durable under its final name.
    pub fn commit(mut self) -> Result<()> {
        let writer = self.file.take().expect("AtomicFile used after commit");
        let file = writer
            .into_inner()
            .map_err(|e| Error::io_at("writing", self.temp.display(), e.error()))?;
        file.sync_all()
            .map_err(|e| Error::io_at("fsync of", self.temp.display(), &e))?;
        drop(file);
        if !self.force && self.dest.symlink_metadata().is_ok() {
            return Err(Error::usage(format!(
                "{} appeared while writing; pass --force to overwrite it",
                self.dest.display()
            )));
        }
        fs::rename(&self.temp, &self.dest)
            .map_err(|e| Error::io_at("cannot rename into place", self.dest.display(), &e))?;
        self.committed = true;
        unregister_temp(&self.temp);
        sync_dir(&parent_dir(&self.dest))
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
            drop(self.file.take());
            let _ = fs::remove_file(&self.temp);
            unregister_temp(&self.temp);
        }
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
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
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
