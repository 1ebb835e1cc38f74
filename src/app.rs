//! What every command gets: the resolved settings and a lazily opened key
//! backend (the HSM is only loaded and logged into when a command needs it).

use crate::error::{Error, Result};
use crate::keys::KeyBackend;
use std::sync::Arc;

/// Shared state for one invocation of the binary.
pub struct App {
    /// `--json`: machine-readable output on stdout.
    pub json: bool,
    /// `--quiet`: no progress or informational messages on stderr.
    pub quiet: bool,
    /// The key name from `--key`, `HSMSEAL_KEY` or `default_key` in hsmseal.toml.
    pub default_key: Option<String>,
    backend: std::sync::OnceLock<Arc<dyn KeyBackend>>,
    opener: Box<dyn Fn() -> Result<Arc<dyn KeyBackend>> + Send + Sync>,
}

impl App {
    /// An app whose backend is produced by `opener` on first use.
    pub fn new(
        json: bool,
        quiet: bool,
        default_key: Option<String>,
        opener: Box<dyn Fn() -> Result<Arc<dyn KeyBackend>> + Send + Sync>,
    ) -> Self {
        App {
            json,
            quiet,
            default_key,
            backend: std::sync::OnceLock::new(),
            opener,
        }
    }

    /// The key backend (the HSM), opened and logged into on first call.
    pub fn backend(&self) -> Result<Arc<dyn KeyBackend>> {
        if let Some(b) = self.backend.get() {
            return Ok(b.clone());
        }
        let b = (self.opener)()?;
        Ok(self.backend.get_or_init(|| b).clone())
    }

    /// The key to encrypt under: the flag if given, else the configured default.
    pub fn key_name(&self, flag: Option<&str>) -> Result<String> {
        match flag
            .map(str::to_string)
            .or_else(|| self.default_key.clone())
        {
            Some(k) => {
                crate::keys::validate_key_name(&k)?;
                Ok(k)
            }
            None => Err(Error::usage(
                "no key given: pass --key NAME or set default_key in hsmseal.toml",
            )),
        }
    }
}
