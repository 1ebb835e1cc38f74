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
            Error::usage("no token selected: pass --token LABEL, set HSMSEAL_TOKEN, or run `hsmseal init --dev`")
        })
    }

    /// Makes a dev token's SoftHSM2 configuration visible to the module.
    /// Must run before the module is loaded (SoftHSM2 reads it at
    /// C_Initialize) and before any thread is started.
    pub fn export_softhsm2_conf(&self) {
        if let Some(s) = &self.softhsm2_conf {
            if !matches!(s.source, Source::Env(_)) {
                std::env::set_var("SOFTHSM2_CONF", &s.value);
            }
        }
    }

    /// The PIN: `--pin-file` flag, then `HSMSEAL_PIN`, then a PIN file from
    /// the environment or config, then a prompt if stdin is a terminal.
    pub fn read_pin(&self) -> Result<Pin> {
        let from_file = |s: &Setting<PathBuf>| -> Result<Pin> {
            let text = fs::read_to_string(&s.value).map_err(|e| {
                Error::pin(format!(
                    "cannot read PIN file {} ({}): {e}",
                    s.value.display(),
                    s.source
                ))
            })?;
            warn_if_readable_by_others(&s.value);
            let pin = text.trim_end_matches(['\n', '\r']).to_string();
            if pin.is_empty() {
                return Err(Error::pin(format!(
                    "PIN file {} is empty",
                    s.value.display()
                )));
            }
            Ok(Pin::new(pin))
        };
        if let Some(s) = self.pin_file.as_ref().filter(|s| s.source == Source::Flag) {
            return from_file(s);
        }
        if let Ok(p) = std::env::var("HSMSEAL_PIN") {
            if !p.is_empty() {
                return Ok(Pin::new(p));
            }
        }
        if let Some(s) = &self.pin_file {
            return from_file(s);
        }
        if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
            let label = self.token.as_ref().map(|t| t.value.as_str()).unwrap_or("?");
            let p = rpassword::prompt_password(format!("PIN for token {label}: "))
                .map_err(|e| Error::pin(format!("cannot read the PIN from the terminal: {e}")))?;
            return Ok(Pin::new(p));
        }
        Err(Error::pin(
            "no PIN available: set HSMSEAL_PIN, pass --pin-file FILE, set pin_file in hsmseal.toml, or run on a terminal to be prompted",
        ))
    }
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
