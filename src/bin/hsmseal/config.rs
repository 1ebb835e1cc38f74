//! Settings resolution: command-line flags, then `HSMSEAL_*` environment
//! variables, then `hsmseal.toml` (in the working directory, or the file named
//! by `HSMSEAL_CONFIG`). Each resolved value remembers where it came from so
//! `hsmseal config show` can explain it.
//!
//! Secrets: the PIN is never a setting value. It comes from `HSMSEAL_PIN`, a
//! PIN file, or a terminal prompt, and is held in a zeroizing `Pin`.

use hsmseal::error::{Error, Result};
use hsmseal::secret::Pin;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// Default PKCS#11 module: Debian's SoftHSM2.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Name of the configuration file looked up in the working directory.
pub const CONFIG_FILE: &str = "hsmseal.toml";

/// The contents of hsmseal.toml. Relative paths are relative to the file.
#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub module: Option<PathBuf>,
    pub token: Option<String>,
    pub pin_file: Option<PathBuf>,
    pub default_key: Option<String>,
    pub jobs: Option<usize>,
    pub audit_log: Option<PathBuf>,
    /// For SoftHSM2 dev tokens: the SOFTHSM2_CONF to use when the
    /// environment does not set one.
    pub softhsm2_conf: Option<PathBuf>,
    /// Bulk-decrypt guardrails: `[limits.KEY]` with `max_items`,
    /// `max_cells`, `max_bytes` (`hsmseal::guard`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub limits: std::collections::BTreeMap<String, hsmseal::guard::Limits>,
    /// Key groups: `[groups.NAME] keys = [...]`, for `encrypt --group NAME`
    /// (one v2 file with a slot per key).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub groups: std::collections::BTreeMap<String, Group>,
}

/// One `[groups.NAME]` table.
#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// AES KWK names, each a slot of every file sealed to the group.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Recipient files (relative to hsmseal.toml), each a slot.
    #[serde(default)]
    pub recipients: Vec<PathBuf>,
}

/// Where a resolved value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Flag,
    Env(String),
    File(PathBuf),
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag => f.write_str("command-line flag"),
            Source::Env(v) => write!(f, "environment {v}"),
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Default => f.write_str("default"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Setting<T> {
    pub value: T,
    pub source: Source,
}

/// Flags that override everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub module: Option<PathBuf>,
    pub token: Option<String>,
    pub pin_file: Option<PathBuf>,
    pub key: Option<String>,
    pub jobs: Option<usize>,
    pub audit_log: Option<PathBuf>,
}

/// Fully resolved settings.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub config_file: Option<PathBuf>,
    pub module: Setting<PathBuf>,
    pub token: Option<Setting<String>>,
    pub pin_file: Option<Setting<PathBuf>>,
    pub default_key: Option<Setting<String>>,
    pub jobs: Setting<usize>,
    pub audit_log: Option<Setting<PathBuf>>,
    pub softhsm2_conf: Option<Setting<PathBuf>>,
    /// From hsmseal.toml only (`[limits.KEY]`): no flag or variable can
    /// raise a limit, only `--override-limits`, which is audit-logged.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub limits: std::collections::BTreeMap<String, hsmseal::guard::Limits>,
    /// From hsmseal.toml only (`[groups.NAME]`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub groups: std::collections::BTreeMap<String, Group>,
}

/// Finds and parses hsmseal.toml, if any.
pub fn load_file() -> Result<Option<(PathBuf, FileConfig)>> {
    let path = match std::env::var_os("HSMSEAL_CONFIG") {
        Some(p) => {
            let p = PathBuf::from(p);
            if !p.exists() {
                return Err(Error::usage(format!(
                    "HSMSEAL_CONFIG names {}, which does not exist",
                    p.display()
                )));
            }
            p
        }
        None => {
            let p = PathBuf::from(CONFIG_FILE);
            if !p.exists() {
                return Ok(None);
            }
            p
        }
    };
    let text =
        fs::read_to_string(&path).map_err(|e| Error::io_at("cannot read", path.display(), &e))?;
    let cfg: FileConfig = toml::from_str(&text).map_err(|e| {
        Error::usage(format!(
            "{}: {}",
            path.display(),
            e.message()
                .lines()
                .next()
                .unwrap_or("invalid configuration")
        ))
    })?;
    Ok(Some((path, cfg)))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Resolves every setting from flags, environment and file.
pub fn resolve(flags: &Overrides) -> Result<Settings> {
    let file = load_file()?;
    let (file_path, cfg) = match &file {
        Some((p, c)) => (Some(p.clone()), c.clone()),
        None => (None, FileConfig::default()),
    };
    let base = file_path
        .as_deref()
        .map(hsmseal::fs::parent_dir)
        .unwrap_or_else(|| PathBuf::from("."));
    let from_file = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let file_src = || Source::File(file_path.clone().unwrap_or_default());

    fn pick<T>(
        flag: Option<T>,
        envv: Option<(T, &str)>,
        file: Option<T>,
        file_src: Source,
    ) -> Option<Setting<T>> {
        if let Some(v) = flag {
            return Some(Setting {
                value: v,
                source: Source::Flag,
            });
        }
        if let Some((v, name)) = envv {
            return Some(Setting {
                value: v,
                source: Source::Env(name.into()),
            });
        }
        file.map(|v| Setting {
            value: v,
            source: file_src,
        })
    }

    let module = pick(
        flags.module.clone(),
        env("HSMSEAL_PKCS11_MODULE").map(|v| (PathBuf::from(v), "HSMSEAL_PKCS11_MODULE")),
        cfg.module.as_deref().map(from_file),
        file_src(),
    )
    .unwrap_or(Setting {
        value: PathBuf::from(DEFAULT_MODULE),
        source: Source::Default,
    });
    let token = pick(
        flags.token.clone(),
        env("HSMSEAL_TOKEN").map(|v| (v, "HSMSEAL_TOKEN")),
        cfg.token.clone(),
        file_src(),
    );
    // A bad `pkcs11:` URI (or one holding a PIN) is refused here, before
    // it is shown (`config show`, the PIN prompt) or used.
    if let Some(t) = &token {
        hsmseal::hsm::TokenSpec::parse(&t.value)?;
    }
    let pin_file = pick(
        flags.pin_file.clone(),
        env("HSMSEAL_PIN_FILE").map(|v| (PathBuf::from(v), "HSMSEAL_PIN_FILE")),
        cfg.pin_file.as_deref().map(from_file),
        file_src(),
    );
    let default_key = pick(
        flags.key.clone(),
        env("HSMSEAL_KEY").map(|v| (v, "HSMSEAL_KEY")),
        cfg.default_key.clone(),
        file_src(),
    );
    let jobs_env = match env("HSMSEAL_JOBS") {
        Some(v) => Some((
            v.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                Error::usage(format!("HSMSEAL_JOBS={v:?} is not a positive number"))
            })?,
            "HSMSEAL_JOBS",
        )),
        None => None,
    };
    let jobs = pick(flags.jobs, jobs_env, cfg.jobs, file_src()).unwrap_or(Setting {
        value: default_jobs(),
        source: Source::Default,
    });
    if jobs.value == 0 {
        return Err(Error::usage("jobs must be at least 1"));
    }
    let audit_log = pick(
        flags.audit_log.clone(),
        env("HSMSEAL_AUDIT_LOG").map(|v| (PathBuf::from(v), "HSMSEAL_AUDIT_LOG")),
        cfg.audit_log.as_deref().map(from_file),
        file_src(),
    );
    let softhsm2_conf = pick(
        None,
        env("SOFTHSM2_CONF").map(|v| (PathBuf::from(v), "SOFTHSM2_CONF")),
        cfg.softhsm2_conf.as_deref().map(from_file),
        file_src(),
    );
    Ok(Settings {
        config_file: file_path,
        module,
        token,
        pin_file,
        default_key,
        jobs,
        audit_log,
        softhsm2_conf,
        limits: cfg.limits.clone(),
        groups: cfg.groups.clone(),
    })
}

/// Number of cores, the default worker count.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

impl Settings {
    /// The token label, or a usage error saying how to set it.
    pub fn token_label(&self) -> Result<&str> {
        self.token.as_ref().map(|s| s.value.as_str()).ok_or_else(|| {
            // hsmseal.toml is looked up in the working directory only: a
            // new user who cds into a subdirectory is told so, rather than
            // to make a second dev token there.
            let why = match &self.config_file {
                None => format!(" (no {CONFIG_FILE} in this directory, and HSMSEAL_CONFIG is not set)"),
                Some(p) => format!(" ({} names none)", p.display()),
            };
            Error::usage(format!(
                "no token selected{why}: pass --token LABEL, set HSMSEAL_TOKEN, point HSMSEAL_CONFIG at your {CONFIG_FILE}, or run `hsmseal init --dev` to create a dev token here"
            ))
        })
    }

    /// Makes a dev token's SoftHSM2 configuration visible to the module.
    /// Must run before the module is loaded (SoftHSM2 reads it at
    /// C_Initialize) and before any thread is started (`set_env_alone`):
    /// `main` calls it, through `commands::prepare`, before the signal
    /// thread starts.
    pub fn export_softhsm2_conf(&self) {
        if let Some(s) = &self.softhsm2_conf {
            if !matches!(s.source, Source::Env(_)) {
                set_env_alone("SOFTHSM2_CONF", &s.value);
            }
        }
    }

    /// The PIN: `--pin-file` flag, then `HSMSEAL_PIN`, then a PIN file from
    /// the environment or config, then a prompt if stdin is a terminal.
    /// Every copy of the PIN made on the way is in a zeroizing buffer.
    pub fn read_pin(&self) -> Result<Pin> {
        let from_file = |s: &Setting<PathBuf>| -> Result<Pin> {
            let pin = read_pin_file(&s.value, &s.source)?;
            warn_if_readable_by_others(&s.value);
            Ok(pin)
        };
        if let Some(s) = self.pin_file.as_ref().filter(|s| s.source == Source::Flag) {
            return from_file(s);
        }
        if let Some(p) = pin_from_env()? {
            return Ok(p);
        }
        if let Some(s) = &self.pin_file {
            return from_file(s);
        }
        if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
            let label = self.token.as_ref().map(|t| t.value.as_str()).unwrap_or("?");
            crate::signals::on_stop_restore_terminal(crate::tty::restore);
            return crate::tty::read_pin(&format!("PIN for token {label}: "))
                .map_err(|e| Error::pin(format!("cannot read the PIN from the terminal: {e}")))?
                .ok_or_else(|| Error::pin("no PIN entered at the prompt"));
        }
        Err(Error::pin(
            "no PIN available: set HSMSEAL_PIN, pass --pin-file FILE, set pin_file in hsmseal.toml, or run on a terminal to be prompted",
        ))
    }
}

/// Sets an environment variable while this is the process's only thread.
///
/// SoftHSM2 finds its configuration only through `SOFTHSM2_CONF`, read
/// with getenv(3) at C_Initialize, so a dev token's path must be in the
/// environment; there is no other way to hand it over. But setenv(3)
/// while another thread may call getenv (a PKCS#11 module, glibc itself)
/// is undefined behaviour, and Rust's own lock does not cover C code. So
/// it is done first thing, before any thread starts, and checked: another
/// thread alive here is a bug in the order of `main`, not a user's error.
pub fn set_env_alone(name: &str, value: &Path) {
    let threads = threads_alive();
    assert!(
        threads.is_none_or(|n| n == 1),
        "{name} must be set before any thread starts ({threads:?} threads alive)"
    );
    // SAFETY-by-order: no other thread exists (checked above), so nothing
    // can read the environment meanwhile.
    std::env::set_var(name, value);
}

/// How many threads this process has (Linux `/proc/self/task`), or `None`
/// if that cannot be read.
fn threads_alive() -> Option<usize> {
    fs::read_dir("/proc/self/task").ok().map(|d| d.count())
}

/// The longest PIN file read. PKCS#11 PINs are short (SoftHSM2 takes up
/// to 255 bytes); a bigger file is not a PIN file.
const MAX_PIN_FILE: usize = 4096;

/// The PIN in a PIN file: its text without the trailing newline.
///
/// Read into one buffer of fixed size, wiped on drop, which becomes the
/// `Pin` itself: `read_to_string` would grow a `String` (each reallocation
/// leaves an unwiped copy in freed memory) and then the trimmed copy.
pub fn read_pin_file(path: &Path, source: &Source) -> Result<Pin> {
    use std::io::Read;
    let cannot = |e: std::io::Error| {
        Error::pin(format!(
            "cannot read PIN file {} ({source}): {e}",
            path.display()
        ))
    };
    let mut f = fs::File::open(path).map_err(cannot)?;
    let mut buf = zeroize::Zeroizing::new(vec![0u8; MAX_PIN_FILE + 1]);
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(cannot(e)),
        }
    }
    if n > MAX_PIN_FILE {
        return Err(Error::pin(format!(
            "PIN file {} ({source}) is longer than {MAX_PIN_FILE} bytes: it must hold the PIN alone",
            path.display()
        )));
    }
    // Shortening never reallocates: the buffer stays the one wiped.
    buf.truncate(n);
    while buf.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
        buf.pop();
    }
    if buf.is_empty() {
        return Err(Error::pin(format!(
            "PIN file {} ({source}) is empty",
            path.display()
        )));
    }
    Pin::from_utf8(buf).ok_or_else(|| {
        Error::pin(format!(
            "PIN file {} ({source}) is not UTF-8 text",
            path.display()
        ))
    })
}

/// `HSMSEAL_PIN`, if set and not empty. The copy the environment hands
/// out is moved into a zeroizing buffer at once (the environment's own
/// copy stays for the life of the process: prefer a PIN file).
pub fn pin_from_env() -> Result<Option<Pin>> {
    use std::os::unix::ffi::OsStringExt;
    let Some(v) = std::env::var_os("HSMSEAL_PIN") else {
        return Ok(None);
    };
    let bytes = zeroize::Zeroizing::new(v.into_vec());
    if bytes.is_empty() {
        return Ok(None);
    }
    Pin::from_utf8(bytes)
        .map(Some)
        .ok_or_else(|| Error::pin("HSMSEAL_PIN is not UTF-8 text"))
}

/// Whether `HSMSEAL_PIN` is set and not empty (for `config show`); the
/// value is looked at in a zeroizing buffer only.
pub fn pin_env_set() -> bool {
    use std::os::unix::ffi::OsStringExt;
    let v = zeroize::Zeroizing::new(
        std::env::var_os("HSMSEAL_PIN")
            .map(|v| v.into_vec())
            .unwrap_or_default(),
    );
    !v.is_empty()
}

fn warn_if_readable_by_others(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = fs::metadata(p) {
        if m.permissions().mode() & 0o077 != 0 {
            crate::report::diag(format!(
                "hsmseal: warning: PIN file {} is readable by other users; run `chmod 600 {}`",
                p.display(),
                p.display()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pin");
        fs::write(&p, bytes).unwrap();
        (d, p)
    }

    #[test]
    fn the_thread_count_that_guards_set_env_alone_sees_other_threads() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        // This thread and the one just started, at least.
        assert!(threads_alive().expect("/proc/self/task") >= 2);
        let refused =
            std::panic::catch_unwind(|| set_env_alone("HSMSEAL_TEST_UNSET", Path::new("x")));
        assert!(refused.is_err(), "set while another thread runs");
        assert!(std::env::var_os("HSMSEAL_TEST_UNSET").is_none());
        drop(tx);
        t.join().unwrap().unwrap_err();
    }

    #[test]
    fn a_pin_file_is_read_into_a_pin_and_its_errors_name_the_file_not_the_pin() {
        // The type is the point: the PIN comes back as a `Pin`, no `String`.
        let read: fn(&Path, &Source) -> Result<Pin> = read_pin_file;
        for (text, want) in [
            (&b"user-1234\n"[..], "user-1234"),
            (b"user-1234\r\n\n", "user-1234"),
            (b"  spaced pin ", "  spaced pin "),
        ] {
            let (_d, p) = file_with(text);
            assert_eq!(read(&p, &Source::Flag).unwrap().expose(), want);
        }
        let too_long = vec![b'7'; MAX_PIN_FILE + 1];
        for (text, says) in [
            (&b"\n"[..], "is empty"),
            (b"\xff\xfesecret-ish", "not UTF-8"),
            (&too_long[..], "longer than"),
        ] {
            let (_d, p) = file_with(text);
            let e = read(&p, &Source::Flag).unwrap_err();
            assert_eq!(e.kind(), hsmseal::error::ErrorKind::Pin);
            assert!(e.message().contains(says), "{e}");
            assert!(e.message().contains(&p.display().to_string()), "{e}");
            assert!(!e.message().contains("secret-ish") && !e.message().contains("7777"));
        }
        let (_d, p) = file_with(&vec![b'7'; MAX_PIN_FILE]);
        assert_eq!(
            read(&p, &Source::Flag).unwrap().expose().len(),
            MAX_PIN_FILE
        );
        let e = read(Path::new("/nonexistent/pin"), &Source::Flag).unwrap_err();
        assert_eq!(e.kind(), hsmseal::error::ErrorKind::Pin);
        assert!(e.message().contains("/nonexistent/pin"), "{e}");
    }
}
