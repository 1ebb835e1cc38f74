//! What an output path means (`resolve_output`: a file to create or
//! replace, a FIFO or character device to write into, this process's
//! stdout), and `OutputFile`, which writes by those rules. Only a regular
//! file is ever replaced (the second invariant of `crate::fs`).

use super::atomic::AtomicFile;
use super::lock::{LOCK_NOTICE_AFTER, LOCK_POLL_MAX};
use super::{describe, IO_BUF};
use crate::error::{Error, Result};
use crate::notify::notice;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where an output goes, decided from what is at its path now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// This process's stdout (`-`, or a path such as `/dev/stdout` that
    /// names it).
    Stdout,
    /// A FIFO or character device (`/dev/null`, a tape): written into,
    /// never replaced, no `force` needed.
    Stream(PathBuf),
    /// A regular file written atomically through `AtomicFile`: created if
    /// absent, replaced if present (only with `force`). For a symbolic link
    /// to a regular file this is the link's target: the target is replaced
    /// and the link kept.
    File(PathBuf),
}

/// True if `m` (a followed path's metadata) is the file open as stdout.
fn is_stdout(m: &Metadata) -> bool {
    // SAFETY: fstat on descriptor 1 into a zeroed struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(1, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == m.dev() && st.st_ino as u64 == m.ino()
}

/// True if `p` is a symbolic link (such as `/dev/stdout`, `/dev/fd/1` or
/// `/proc/self/fd/1`) to whatever this process's stdout is.
pub fn names_stdout(p: &Path) -> bool {
    matches!(fs::symlink_metadata(p), Ok(l) if l.file_type().is_symlink())
        && matches!(fs::metadata(p), Ok(m) if is_stdout(&m))
}

/// Decides what writing to `p` means (see the module invariants and
/// README "Outputs"):
/// - nothing there: a new file;
/// - a regular file: replaced atomically, only with `force`;
/// - a FIFO or character device: written into;
/// - a symbolic link: to this process's stdout (`/dev/stdout`), stdout;
///   to a FIFO or character device, written into; to a regular file, the
///   target is replaced (only with `force`) and the link kept; to nothing
///   (dangling), refused: hsmseal does not create files through links;
/// - anything else (directory, socket, block device): refused.
pub fn resolve_output(p: &Path, force: bool) -> Result<Sink> {
    let here = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Sink::File(p.to_path_buf())),
        Err(e) => return Err(Error::io_at("cannot stat", p.display(), &e)),
    };
    let t = here.file_type();
    if t.is_file() {
        if !force {
            return Err(Error::usage(format!(
                "{} already exists; pass --force to overwrite it",
                p.display()
            )));
        }
        return Ok(Sink::File(p.to_path_buf()));
    }
    if !t.is_symlink() {
        return stream_or_refuse(p, &here);
    }
    let target = match fs::metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let to = fs::read_link(p)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into());
            return Err(Error::usage(format!(
                "{} is a symbolic link to {to}, which does not exist; hsmseal does not create files through a link: give the path to write, or remove the link",
                p.display()
            )));
        }
        Err(e) => return Err(Error::io_at("cannot stat", p.display(), &e)),
    };
    if is_stdout(&target) {
        return Ok(Sink::Stdout);
    }
    if target.is_file() {
        let real =
            fs::canonicalize(p).map_err(|e| Error::io_at("cannot resolve", p.display(), &e))?;
        if !force {
            return Err(Error::usage(format!(
                "{} already exists (a symbolic link to {}); pass --force to replace {} (the link is kept)",
                p.display(),
                real.display(),
                real.display()
            )));
        }
        return Ok(Sink::File(real));
    }
    stream_or_refuse(p, &target)
}

fn stream_or_refuse(p: &Path, m: &Metadata) -> Result<Sink> {
    let t = m.file_type();
    if t.is_fifo() || t.is_char_device() {
        return Ok(Sink::Stream(p.to_path_buf()));
    }
    Err(Error::usage(format!(
        "{} is {}; hsmseal writes only to regular files (replaced atomically), FIFOs and character devices",
        p.display(),
        describe(m)
    )))
}

/// Opens a FIFO or character device for writing into it (no create, no
/// truncate). Waiting for a FIFO's reader is announced after
/// `LOCK_NOTICE_AFTER`. Refuses if the path no longer names a FIFO or
/// character device (it was swapped for a regular file since
/// `resolve_output`): nothing is written then.
pub fn open_stream(p: &Path) -> Result<File> {
    let start = Instant::now();
    let mut announced = false;
    let mut pause = Duration::from_millis(1);
    let f = loop {
        // O_NONBLOCK so that opening a FIFO without a reader fails (ENXIO)
        // instead of blocking where no notice can be printed.
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(p)
        {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if !announced && start.elapsed() >= LOCK_NOTICE_AFTER {
                    announced = true;
                    notice(&format!("waiting for a reader to open {}", p.display()));
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(LOCK_POLL_MAX);
            }
            Err(e) => return Err(Error::io_at("cannot open", p.display(), &e)),
        }
    };
    // Writes block again as for any pipe or device.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0 {
            return Err(Error::io_at(
                "cannot set blocking writes on",
                p.display(),
                &io::Error::last_os_error(),
            ));
        }
    }
    let m = f
        .metadata()
        .map_err(|e| Error::io_at("cannot stat", p.display(), &e))?;
    if !(m.file_type().is_fifo() || m.file_type().is_char_device()) {
        return Err(Error::usage(format!(
            "{} changed into {} while hsmseal was starting; nothing written",
            p.display(),
            describe(&m)
        )));
    }
    Ok(f)
}

/// An output file opened by the rules of `resolve_output`, for commands that
/// write one file (`columns ... -o PATH`): a new or replaced regular file
/// (atomic), or a FIFO or character device written into. A path that names
/// stdout (`/dev/stdout`) writes to descriptor 1.
pub enum OutputFile {
    Atomic(AtomicFile),
    Stream(io::BufWriter<File>),
}

impl OutputFile {
    /// Opens `p` for writing by the rules of `resolve_output`.
    pub fn create(p: &Path, mode: u32, force: bool) -> Result<OutputFile> {
        Ok(match resolve_output(p, force)? {
            Sink::File(real) => OutputFile::Atomic(AtomicFile::create(&real, mode, force)?),
            Sink::Stream(s) => {
                OutputFile::Stream(io::BufWriter::with_capacity(IO_BUF, open_stream(&s)?))
            }
            // Descriptor 1 itself (duplicated), not a reopening of the
            // path: same offset and flags as stdout, as with `> file`.
            Sink::Stdout => {
                use std::os::fd::AsFd;
                let fd = io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| Error::io(format!("cannot use stdout: {e}")))?;
                OutputFile::Stream(io::BufWriter::with_capacity(IO_BUF, File::from(fd)))
            }
        })
    }

    /// Finishes the output: commits an atomic file, flushes a stream.
    pub fn commit(self) -> Result<()> {
        match self {
            OutputFile::Atomic(f) => f.commit().map(|_| ()),
            OutputFile::Stream(mut w) => w
                .flush()
                .map_err(|e| Error::io(format!("writing output: {e}"))),
        }
    }
}

impl Write for OutputFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            OutputFile::Atomic(f) => f.write(buf),
            OutputFile::Stream(w) => w.write(buf),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            OutputFile::Atomic(f) => f.write_all(buf),
            OutputFile::Stream(w) => w.write_all(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            OutputFile::Atomic(f) => f.flush(),
            OutputFile::Stream(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_output_decides_by_what_is_there() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        assert_eq!(
            resolve_output(&p("new"), false).unwrap(),
            Sink::File(p("new"))
        );
        fs::write(p("file"), b"x").unwrap();
        assert!(resolve_output(&p("file"), false).is_err());
        assert_eq!(
            resolve_output(&p("file"), true).unwrap(),
            Sink::File(p("file"))
        );
        std::os::unix::fs::symlink(p("file"), p("link")).unwrap();
        assert!(resolve_output(&p("link"), false).is_err());
        let real = fs::canonicalize(p("file")).unwrap();
        assert_eq!(resolve_output(&p("link"), true).unwrap(), Sink::File(real));
        std::os::unix::fs::symlink(p("nowhere"), p("dangling")).unwrap();
        assert!(resolve_output(&p("dangling"), true).is_err());
        fs::create_dir(p("dir")).unwrap();
        assert!(resolve_output(&p("dir"), true).is_err());
        let c = std::ffi::CString::new(p("fifo").to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(
            resolve_output(&p("fifo"), false).unwrap(),
            Sink::Stream(p("fifo"))
        );
        // OutputFile follows the same rules.
        let fifo = p("fifo");
        let reader = std::thread::spawn(move || fs::read(fifo).unwrap());
        let mut o = OutputFile::create(&p("fifo"), 0o600, false).unwrap();
        o.write_all(b"into the fifo").unwrap();
        o.commit().unwrap();
        assert_eq!(reader.join().unwrap(), b"into the fifo");
        let mut o = OutputFile::create(&p("file"), 0o600, true).unwrap();
        o.write_all(b"replaced").unwrap();
        o.commit().unwrap();
        assert_eq!(fs::read(p("file")).unwrap(), b"replaced");
        assert!(OutputFile::create(&p("dangling"), 0o600, true).is_err());
    }
}
