//! Output files, and locks on existing files.
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

use crate::error::{Error, Result};
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buffer size for output files: large reads and writes bypass it. 1 MiB
/// buffers made 1 MiB-aligned writes, which were markedly slower on the
/// build machines than 64 KiB pieces.
pub const IO_BUF: usize = 64 * 1024;

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

/// Informational lines on stderr (lock waits, stale temporary files
/// removed); off with `--quiet`.
static NOTICES: AtomicBool = AtomicBool::new(true);

/// Turns the stderr notices of this module on or off (`--quiet`).
pub fn set_notices(on: bool) {
    NOTICES.store(on, Ordering::Relaxed);
}

fn notice(msg: &str) {
    if NOTICES.load(Ordering::Relaxed) {
        eprintln!("hsmseal: {msg}");
    }
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

// ---------------------------------------------------------------------------
// flock(2)

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
const LOCK_POLL_MAX: Duration = Duration::from_millis(50);

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
const MAX_RELOCKS: usize = 1000;

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
enum LockFail {
    /// The path names no file (any more).
    Gone,
    /// The path's file cannot be opened (for example permissions).
    Open(io::Error),
    Other(Error),
}

fn lock_path(path: &Path, write: bool, follow: bool) -> std::result::Result<LockedFile, LockFail> {
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

// ---------------------------------------------------------------------------
// What an output path means

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

// ---------------------------------------------------------------------------
// Atomic output files

pub struct AtomicFile {
    file: Option<io::BufWriter<File>>,
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
            .into_inner()
            .map_err(|e| Error::io_at("writing", self.temp.display(), e.error()))?;
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
                if h.id != FileId::of(&meta) {
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
        let other = File::open(f.temp_path()).unwrap();
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
