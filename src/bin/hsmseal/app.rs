//! What every command gets: the resolved settings and a lazily opened HSM
//! (the module is only loaded and logged into when a command needs keys).

use crate::config::Settings;
use hsmseal::backend::KeyBackend;
use hsmseal::backend::KeyRef;
use hsmseal::error::{Error, Result};
use hsmseal::hsm::Hsm;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// What one run did, item by item: the numbers the `--json` summary and the
/// audit log report. Updated by the per-item loop from any worker thread.
#[derive(Default)]
pub struct RunStats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub skipped: AtomicU64,
    /// Plaintext bytes processed by successful items.
    pub bytes: AtomicU64,
    /// Every key version the run used (read or wrote under).
    keys: Mutex<BTreeSet<KeyRef>>,
}

impl RunStats {
    pub fn add_key(&self, k: KeyRef) {
        if let Ok(mut s) = self.keys.lock() {
            s.insert(k);
        }
    }
    pub fn keys(&self) -> Vec<KeyRef> {
        self.keys
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
    /// Counts one finished item from its report.
    pub fn record(&self, r: &crate::report::ItemReport) {
        let counter = if r.status == "skipped" || r.status == "unchanged" {
            &self.skipped
        } else {
            &self.ok
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(r.bytes.unwrap_or(0), Ordering::Relaxed);
        if let (Some(name), Some(version)) = (&r.key, r.version) {
            self.add_key(KeyRef {
                name: name.clone(),
                version,
            });
        }
        if let (Some(name), Some(version)) = (&r.from_key, r.from_version) {
            self.add_key(KeyRef {
                name: name.clone(),
                version,
            });
        }
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Shared state for one invocation of the binary.
pub struct App {
    /// `--json`: machine-readable output on stdout.
    pub json: bool,
    /// `--quiet`: no progress or informational messages on stderr.
    pub quiet: bool,
    /// The key name from `--key`, `HSMSEAL_KEY` or `default_key` in hsmseal.toml.
    pub default_key: Option<String>,
    /// Worker threads.
    pub jobs: usize,
    pub settings: Settings,
    /// Counts and keys of this run, for the summary and the audit log.
    pub stats: RunStats,
    /// When the run started.
    pub started: std::time::Instant,
    hsm: OnceLock<Arc<Hsm>>,
    /// Held while the HSM is being opened, so concurrent workers log in
    /// once; keeps the error if that failed (a wrong PIN is never retried).
    hsm_init: Mutex<Option<Error>>,
    /// In the binary's own unit tests only: the key backend the commands
    /// get instead of the HSM (an in-memory one), so command logic is
    /// tested in process where the HSM is not the point. Not compiled into
    /// the shipped binary: no setting or variable can swap the HSM out.
    #[cfg(test)]
    test_backend: Option<Arc<dyn KeyBackend>>,
}

impl App {
    pub fn new(settings: Settings, json: bool, quiet: bool) -> Self {
        App {
            json,
            quiet,
            default_key: settings.default_key.as_ref().map(|s| s.value.clone()),
            jobs: settings.jobs.value,
            settings,
            stats: RunStats::default(),
            started: std::time::Instant::now(),
            hsm: OnceLock::new(),
            hsm_init: Mutex::new(None),
            #[cfg(test)]
            test_backend: None,
        }
    }

    /// An app whose commands use `backend` for every key operation (unit
    /// tests of the commands; see `test_backend`).
    #[cfg(test)]
    pub fn with_backend(backend: Arc<dyn KeyBackend>, jobs: usize) -> Self {
        use crate::config::{Setting, Source};
        let settings = Settings {
            config_file: None,
            module: Setting {
                value: "/nonexistent/not-used-by-tests.so".into(),
                source: Source::Default,
            },
            token: None,
            pin_file: None,
            default_key: None,
            jobs: Setting {
                value: jobs,
                source: Source::Default,
            },
            audit_log: None,
            softhsm2_conf: None,
            limits: Default::default(),
            groups: Default::default(),
        };
        App {
            test_backend: Some(backend),
            ..App::new(settings, false, true)
        }
    }

    /// The HSM: module loaded, token found, user logged in (once).
    pub fn hsm(&self) -> Result<Arc<Hsm>> {
        if let Some(h) = self.hsm.get() {
            return Ok(h.clone());
        }
        let mut failed = self.hsm_init.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = self.hsm.get() {
            return Ok(h.clone());
        }
        if let Some(e) = &*failed {
            return Err(e.clone());
        }
        let hsm = self
            .open_hsm(true)
            .inspect_err(|e| *failed = Some(e.clone()))?;
        Ok(self.hsm.get_or_init(|| Arc::new(hsm)).clone())
    }

    /// Why the HSM could not be opened in this run, if it was tried and
    /// failed: a missing module, a token not found, a wrong or missing PIN.
    /// Such an error is the same for every item that needs a key, so a bulk
    /// run stops on it once, with its own exit code, instead of reporting
    /// it per item (and `App::hsm` never retries it, so the token's PIN
    /// counter is decremented once).
    pub fn hsm_failure(&self) -> Option<Error> {
        self.hsm_init
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// True if `e` is [`Self::hsm_failure`] as `App::hsm` returned it (an
    /// item that failed for another reason meanwhile is its own failure).
    pub fn is_hsm_failure(&self, e: &Error) -> bool {
        self.hsm_failure()
            .is_some_and(|f| f.kind() == e.kind() && f.message() == e.message())
    }

    /// Opens the module and token; logs in if `login`.
    pub fn open_hsm(&self, login: bool) -> Result<Hsm> {
        let label = self.settings.token_label()?;
        let hsm = Hsm::open(&self.settings.module.value, label)?;
        if login {
            let pin = self.settings.read_pin()?;
            hsm.login(&pin)?;
        }
        Ok(hsm)
    }

    /// The key backend (the HSM), opened and logged into on first call.
    pub fn backend(&self) -> Result<Arc<dyn KeyBackend>> {
        #[cfg(test)]
        if let Some(b) = &self.test_backend {
            return Ok(b.clone());
        }
        Ok(self.hsm()? as Arc<dyn KeyBackend>)
    }

    /// The key to encrypt under: the flag if given, else the configured default.
    pub fn key_name(&self, flag: Option<&str>) -> Result<String> {
        match flag.map(str::to_string).or_else(|| self.default_key.clone()) {
            Some(k) => {
                hsmseal::backend::validate_key_name(&k)?;
                Ok(k)
            }
            None => Err(Error::usage(
                "no key given: pass --key NAME, set HSMSEAL_KEY, or set default_key in hsmseal.toml",
            )),
        }
    }

    /// HSM calls made so far by this run (0 if the HSM was never opened).
    pub fn hsm_calls(&self) -> u64 {
        self.hsm.get().map(|h| h.calls()).unwrap_or(0)
    }

    /// Informational message on stderr unless `--quiet`.
    pub fn info(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            crate::report::diag(msg);
        }
    }
}
