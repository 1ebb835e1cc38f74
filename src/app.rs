//! What every command gets: the resolved settings and a lazily opened HSM
//! (the module is only loaded and logged into when a command needs keys).

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::hsm::Hsm;
use crate::keys::KeyBackend;
use std::sync::{Arc, OnceLock};

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
    hsm: OnceLock<Arc<Hsm>>,
}

impl App {
    pub fn new(settings: Settings, json: bool, quiet: bool) -> Self {
        App {
            json,
            quiet,
            default_key: settings.default_key.as_ref().map(|s| s.value.clone()),
            jobs: settings.jobs.value,
            settings,
            hsm: OnceLock::new(),
        }
    }

    /// The HSM: module loaded, token found, user logged in (once).
    pub fn hsm(&self) -> Result<Arc<Hsm>> {
        if let Some(h) = self.hsm.get() {
            return Ok(h.clone());
        }
        let hsm = self.open_hsm(true)?;
        Ok(self.hsm.get_or_init(|| Arc::new(hsm)).clone())
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
        Ok(self.hsm()? as Arc<dyn KeyBackend>)
    }

    /// The key to encrypt under: the flag if given, else the configured default.
    pub fn key_name(&self, flag: Option<&str>) -> Result<String> {
        match flag.map(str::to_string).or_else(|| self.default_key.clone()) {
            Some(k) => {
                crate::keys::validate_key_name(&k)?;
                Ok(k)
            }
            None => Err(Error::usage(
                "no key given: pass --key NAME, set HSMSEAL_KEY, or set default_key in hsmseal.toml",
            )),
        }
    }

    /// Informational message on stderr unless `--quiet`.
    pub fn info(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }
}
