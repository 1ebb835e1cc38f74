//! The token lock: an advisory `flock(2)` on one file that every hsmseal
//! process holds around the PKCS#11 calls that read or write the token's
//! own storage, so several processes on one token never see each other's
//! half-written files (issue 9).
//!
//! Why it exists: SoftHSM2 2.6.1 (Debian's) keeps a token in files, and its
//! writer releases the file's `fcntl` lock *before* its buffered bytes reach
//! the file: `ObjectFile::writeAttributes` truncates the file, writes through
//! stdio, calls `File::unlock()`, and only the `File` destructor's `fclose`
//! writes the bytes (fixed upstream in 2.7.0, SoftHSMv2 PR #578 "Flush files
//! before unlocking", and #573). A reader in another process that takes the
//! read lock in that window finds the file empty (or cut short) and marks the
//! object, or the whole token, invalid. Every `C_Login` rewrites
//! `token.object` (it stores the PIN-failure flags), so every hsmseal start
//! opened such a window for every other process: seen as `C_GetTokenInfo`
//! returning `CKR_GENERAL_ERROR`, `C_Login` returning
//! `CKR_USER_PIN_NOT_INITIALIZED`, "no token labelled ..." (`C_Initialize`
//! skips a token whose `token.object` it cannot read, for the life of the
//! process), and a freshly generated key read back with no attributes.
//!
//! Invariants:
//! - **Modes.** Calls that write the store (`C_Login`, `C_InitToken`,
//!   `C_InitPIN`, `C_GenerateKey`, `C_CreateObject`, `C_SetAttributeValue`,
//!   `C_DestroyObject`) run under the exclusive lock; calls that only read it
//!   (`C_Initialize`, `C_GetTokenInfo`, `C_FindObjects*`,
//!   `C_GetAttributeValue`) under the shared lock: SoftHSM2's readers only
//!   take `fcntl` read locks, and the one write `C_Initialize` makes (the
//!   token's `generation` file, rewritten in place with the value it already
//!   holds) is harmless to a concurrent reader.
//! - **Not the hot path.** `C_Encrypt`/`C_Decrypt` (wrap, unwrap) and
//!   `C_Sign`/`C_Verify` (audit MACs) on keys already found run unlocked: they
//!   re-read a key's file only after someone rewrote that key (disable,
//!   enable), which happens under the exclusive lock, and a read that lands
//!   in SoftHSM2's window fails with an invalid-handle code that the caller
//!   answers by looking the key up again under the lock (`Hsm::with_key`).
//! - **One open file description per lock file per process**, kept for the
//!   process's life. `flock` belongs to the open file description, so threads
//!   sharing it would not exclude each other: within a process the callers
//!   are serialised by `MANAGEMENT` (src/hsm/mod.rs) before they take it.
//! - **Never held across hsmseal's own file or pipe I/O**, only around
//!   PKCS#11 calls, so a pipeline (`hsmseal decrypt -o - | hsmseal columns
//!   decrypt`) cannot deadlock on it.
//! - **The lock file is never written, truncated or removed.** It is opened
//!   read-only (enough for `flock`) with `O_NOFOLLOW`; a symbolic link, FIFO,
//!   device or directory in its place is refused. If it is replaced while we
//!   wait, we lock the new one (checked by device and inode after locking).
//!
//! Where it lives:
//! - **SoftHSM2** (a module file named `libsofthsm2*`): `.hsmseal.lock` in the
//!   token directory (`directories.tokendir` of the configuration SoftHSM2
//!   itself reads: `SOFTHSM2_CONF`, else `~/.config/softhsm2/softhsm2.conf`,
//!   else `/etc/softhsm/softhsm2.conf`), so every process using that
//!   directory shares it whoever runs it. One lock for the whole directory:
//!   `C_Initialize` reads every token in it.
//! - **Any other module**: `HSMSEAL_LOCK_DIR` (must exist), else
//!   `$XDG_RUNTIME_DIR/hsmseal`, else `${TMPDIR:-/tmp}/hsmseal-<uid>` (both
//!   created mode 0700 and refused unless owned by the user and closed to
//!   others), file `pkcs11-<module file>-<16 hex digits of SHA-256(module
//!   path)>.lock`: one lock per module, like SoftHSM2's one per directory.
//!   It used to be per module and token label; but a token can be named by
//!   its label, its serial or its slot (`--token pkcs11:serial=...`), two
//!   tokens can share a label, and which token a name means is only known
//!   after `C_GetTokenInfo`, which itself runs under the lock. So the lock
//!   keys on what certainly contains the token, its module: every name of
//!   one token takes the same lock, and two tokens with one label are not
//!   mistaken for one. The cost, serialising management calls on different
//!   tokens of one module, is small: the hot path runs unlocked.
//!
//! The lock coordinates hsmseal processes on one host only; see
//! docs/SECURITY.md, "The token: logins, key versions, the object store".

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Name of the lock file in a SoftHSM2 token directory.
pub const SOFTHSM2_LOCK_NAME: &str = ".hsmseal.lock";

/// SoftHSM2's default configuration file (Debian's build).
const SOFTHSM2_DEFAULT_CONF: &str = "/etc/softhsm/softhsm2.conf";
/// SoftHSM2's default token directory when the configuration names none.
const SOFTHSM2_DEFAULT_TOKENDIR: &str = "/var/lib/softhsm/tokens/";

/// How many times a lock file that was replaced while we waited is
/// reopened before giving up (someone is removing it in a loop).
const MAX_REOPEN: usize = 100;

/// Shared for calls that only read the token's storage, exclusive for calls
/// that write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// One lock file; one per path per process (see [`TokenLock::for_token`]).
#[derive(Debug)]
pub struct TokenLock {
    path: PathBuf,
    /// True when the module is SoftHSM2 (the lock is its token directory's).
    softhsm2: bool,
    /// Opened on first use and kept: the open file description carries the
    /// lock. `None` again after the file was found replaced.
    file: Mutex<Option<File>>,
}

/// A held lock; released on drop.
#[derive(Debug)]
pub struct Held {
    lock: Arc<TokenLock>,
    mode: Mode,
}

impl Held {
    pub fn mode(&self) -> Mode {
        self.mode
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(f) = self.lock.file().as_ref() {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            // Failure leaves the lock held until the process exits, which
            // only delays other processes.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

fn registry() -> MutexGuard<'static, Vec<Arc<TokenLock>>> {
    static LOCKS: Mutex<Vec<Arc<TokenLock>>> = Mutex::new(Vec::new());
    LOCKS.lock().unwrap_or_else(|p| p.into_inner())
}

impl TokenLock {
    /// The lock for the tokens of the module at `module` (canonical path;
    /// see the module comment for why not per token). Reads the environment
    /// (SoftHSM2's configuration, the lock directory) each time; the file is
    /// opened on first [`Self::acquire`].
    pub fn for_module(module: &Path) -> Result<Arc<TokenLock>> {
        let (path, softhsm2) = match softhsm2_token_dir(module) {
            Some(dir) => (dir.join(SOFTHSM2_LOCK_NAME), true),
            None => (generic_lock_dir()?.join(generic_lock_name(module)), false),
        };
        let mut locks = registry();
        if let Some(l) = locks.iter().find(|l| l.path == path) {
            return Ok(l.clone());
        }
        let l = Arc::new(TokenLock {
            path,
            softhsm2,
            file: Mutex::new(None),
        });
        locks.push(l.clone());
        Ok(l)
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the module is SoftHSM2 (whose transient store errors
    /// hsmseal retries, see `retry_transient` in src/hsm/mod.rs).
    pub fn is_softhsm2(&self) -> bool {
        self.softhsm2
    }

    fn file(&self) -> MutexGuard<'_, Option<File>> {
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until the lock is held in `mode`. The caller must hold the
    /// process-wide management lock (see the module invariants).
    pub fn acquire(self: &Arc<Self>, mode: Mode) -> Result<Held> {
        let mut file = self.file();
        for _ in 0..MAX_REOPEN {
            if file.is_none() {
                *file = Some(open_lock_file(&self.path)?);
            }
            let f = file.as_ref().expect("opened above");
            flock(f, mode, &self.path)?;
            // A lock on a file that is no longer (or not yet again) at the
            // path excludes nobody: lock what is there now.
            if same_file(&self.path, f) {
                return Ok(Held {
                    lock: self.clone(),
                    mode,
                });
            }
            // SAFETY: as in `Held::drop`.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
            *file = None;
        }
        Err(Error::token(format!(
            "the token lock file {} keeps being replaced while hsmseal waits for it; stop whatever removes it",
            self.path.display()
        )))
    }
}

/// Opens (creating if needed) the lock file read-only, without following a
/// symbolic link and without blocking on a FIFO; refuses anything but a
/// regular file.
fn open_lock_file(path: &Path) -> Result<File> {
    let fail = |what: &str, e: &io::Error| {
        let fix = match e.kind() {
            io::ErrorKind::PermissionDenied => format!(
                "; every user of the token must be able to read it (as the directory's owner: `touch {p} && chmod 0644 {p}`)",
                p = path.display()
            ),
            _ => String::new(),
        };
        Error::token(format!(
            "cannot {what} the token lock file {}: {e}{fix}",
            path.display()
        ))
    };
    let open = |create: bool| {
        let mut o = std::fs::OpenOptions::new();
        o.read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC);
        if create {
            // O_CREAT with O_RDONLY is allowed; O_EXCL so that we only ever
            // set the mode of a file we made.
            o.custom_flags(
                libc::O_NOFOLLOW
                    | libc::O_NONBLOCK
                    | libc::O_CLOEXEC
                    | libc::O_CREAT
                    | libc::O_EXCL,
            )
            .mode(0o644);
        }
        o.open(path)
    };
    let file = match open(false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => match open(true) {
            Ok(f) => {
                // Readable by every user of the token whatever the umask:
                // `flock` needs only a read-only descriptor, and the file
                // holds nothing.
                let _ = f.set_permissions(std::fs::Permissions::from_mode(0o644));
                f
            }
            // Another process created it first.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                open(false).map_err(|e| fail("open", &e))?
            }
            Err(e) => return Err(fail("create", &e)),
        },
        // ELOOP: O_NOFOLLOW met a symbolic link.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Error::token(format!(
                "the token lock file {} is a symbolic link; hsmseal does not follow it (remove it: hsmseal recreates the file)",
                path.display()
            )))
        }
        Err(e) => return Err(fail("open", &e)),
    };
    let meta = file.metadata().map_err(|e| fail("inspect", &e))?;
    if !meta.file_type().is_file() {
        return Err(Error::token(format!(
            "the token lock file {} is not a regular file; remove it (hsmseal recreates it)",
            path.display()
        )));
    }
    Ok(file)
}

fn flock(f: &File, mode: Mode, path: &Path) -> Result<()> {
    let op = match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    };
    loop {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(Error::token(format!(
                "cannot lock the token lock file {}: {e} (hsmseal processes on one token wait for each other through it; a file system without flock support cannot hold it)",
                path.display()
            )));
        }
    }
}

/// True if `path` still names the file `f` is open on.
fn same_file(path: &Path, f: &File) -> bool {
    match (std::fs::symlink_metadata(path), f.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The token directory of the SoftHSM2 module at `module` (canonical
/// path), canonicalised; `None` if the module is not SoftHSM2 or the
/// directory cannot be found (SoftHSM2's own `C_Initialize` then fails with
/// its own error).
pub fn softhsm2_token_dir(module: &Path) -> Option<PathBuf> {
    let name = module.file_name()?.to_str()?;
    if !name.starts_with("libsofthsm2") {
        return None;
    }
    let conf = softhsm2_conf_path();
    let text = std::fs::read(&conf).ok()?;
    let dir = parse_tokendir(&String::from_utf8_lossy(&text))
        .unwrap_or_else(|| SOFTHSM2_DEFAULT_TOKENDIR.to_string());
    std::fs::canonicalize(dir).ok()
}

/// The configuration file SoftHSM2 2.6.1 reads (`SimpleConfigLoader::
/// getConfigPath`): `SOFTHSM2_CONF` if set; else
/// `$HOME/.config/softhsm2/softhsm2.conf` if readable; else the default.
fn softhsm2_conf_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SOFTHSM2_CONF") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        let p = Path::new(&home).join(".config/softhsm2/softhsm2.conf");
        if std::fs::File::open(&p).is_ok() {
            return p;
        }
    }
    PathBuf::from(SOFTHSM2_DEFAULT_CONF)
}

/// `directories.tokendir` as SoftHSM2 2.6.1 parses its configuration: each
/// line cut at the first `#`, CR or LF; the name before the first `=`, the
/// value up to the next `=`, both trimmed of white space; the last
/// occurrence wins.
pub fn parse_tokendir(conf: &str) -> Option<String> {
    let mut found = None;
    for line in conf.split('\n') {
        let line = line.split(['#', '\r']).next().unwrap_or("");
        // strtok(line, "="): leading delimiters are skipped, empty tokens
        // never returned.
        let mut parts = line.split('=').filter(|s| !s.is_empty());
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name == "directories.tokendir" && !value.is_empty() {
            found = Some(value.to_string());
        }
    }
    found
}

/// The directory for lock files of modules other than SoftHSM2.
fn generic_lock_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("HSMSEAL_LOCK_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(dir),
            _ => Err(Error::usage(format!(
                "HSMSEAL_LOCK_DIR {} is not a directory; create it (shared by every user of the token, e.g. mode 1777) or unset it",
                dir.display()
            ))),
        };
    }
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() => d.join("hsmseal"),
        _ => std::env::temp_dir().join(format!("hsmseal-{uid}")),
    };
    private_dir(&dir, uid)?;
    Ok(dir)
}

/// Creates `dir` (mode 0700) if missing and checks it is ours alone: a
/// directory (not a link to one), owned by `uid`, closed to group and others.
/// In a shared place like /tmp anyone could otherwise make it first.
fn private_dir(dir: &Path, uid: u32) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::token(format!(
                "cannot create the lock directory {}: {e}; set HSMSEAL_LOCK_DIR to a directory you can write",
                dir.display()
            )))
        }
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| {
        Error::token(format!(
            "cannot inspect the lock directory {}: {e}",
            dir.display()
        ))
    })?;
    if !m.file_type().is_dir() || m.uid() != uid || m.mode() & 0o077 != 0 {
        return Err(Error::token(format!(
            "the lock directory {} is not a directory of yours closed to others (owner {}, mode {:o}); remove it or set HSMSEAL_LOCK_DIR",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// `pkcs11-<module file name>-<16 hex of SHA-256(module path)>.lock`:
/// readable, and distinct per module file.
pub fn generic_lock_name(module: &Path) -> String {
    let mut h = Sha256::new();
    h.update(module.as_os_str().as_encoded_bytes());
    let digest = h.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let base: String = module
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!("pkcs11-{base}-{hex}.lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokendir_is_parsed_as_softhsm2_does() {
        assert_eq!(
            parse_tokendir("# c\ndirectories.tokendir = /a/b/ # x\nlog.level = ERROR\n").as_deref(),
            Some("/a/b/")
        );
        // Last one wins; CRLF; leading '='; spaces inside names do not match.
        assert_eq!(
            parse_tokendir("directories.tokendir=/x\r\n=directories.tokendir = /y=z\n").as_deref(),
            Some("/y")
        );
        assert_eq!(parse_tokendir("directories.tokendir =\n"), None);
        assert_eq!(parse_tokendir("#directories.tokendir = /a\n"), None);
        assert_eq!(parse_tokendir("directories. tokendir = /a\n"), None);
    }

    #[test]
    fn generic_names_differ_per_module_and_are_safe() {
        let a = generic_lock_name(Path::new("/usr/lib/x/libvendor pkcs11.so"));
        let c = generic_lock_name(Path::new("/opt/libvendor pkcs11.so"));
        assert!(
            a.starts_with("pkcs11-libvendor_pkcs11.so-") && a.ends_with(".lock"),
            "{a}"
        );
        assert_ne!(a, c);
        assert!(!a.contains('/'));
    }

    #[test]
    fn only_softhsm2_modules_use_the_token_directory() {
        assert_eq!(softhsm2_token_dir(Path::new("/usr/lib/libvendor.so")), None);
    }
}
