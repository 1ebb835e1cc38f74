//! `hsmseal init --dev [DIR]`: a local SoftHSM2 token to try hsmseal out.
//!
//! Creates DIR/softhsm2.conf and DIR/tokens/, initialises a token with random
//! SO and user PINs stored in DIR/so-pin and DIR/user-pin (0600), and writes
//! ./hsmseal.toml pointing at all of it. It also creates the audit HMAC key
//! in the token and starts DIR/audit.log with this run's entry. A software token's keys are files
//! protected by the PIN file next to them: fine for development and tests,
//! not for production, and the command says so.

use crate::cli::InitArgs;
use crate::config::{FileConfig, CONFIG_FILE, DEFAULT_MODULE};
use hsmseal::audit::{self, Record};
use hsmseal::error::{Error, Result};
use hsmseal::hsm::Hsm;
use hsmseal::secret::Pin;
use rand::distributions::{Alphanumeric, Distribution};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// `module`: the global `--module` flag (it used to be ignored here), else
/// `HSMSEAL_PKCS11_MODULE`, else Debian's SoftHSM2.
pub fn run(args: &InitArgs, module: Option<&Path>, json: bool, quiet: bool) -> Result<i32> {
    let started = std::time::Instant::now();
    if !args.dev {
        return Err(Error::usage("only `hsmseal init --dev` exists: production tokens are set up with your HSM vendor's tools"));
    }
    let module = module
        .map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os("HSMSEAL_PKCS11_MODULE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE));
    if !module.exists() {
        return Err(Error::token(format!(
            "SoftHSM2 module {} not found: install it (`apt-get install softhsm2`) or set HSMSEAL_PKCS11_MODULE",
            module.display()
        )));
    }
    let config_path = PathBuf::from(CONFIG_FILE);
    let dir = &args.dir;
    let conf = dir.join("softhsm2.conf");
    // The token first: --force replaces hsmseal.toml, never a token, so
    // suggesting it here would only lead to this same refusal.
    if conf.exists() {
        return Err(Error::usage(format!(
            "{} already holds a dev token; remove the directory or choose another DIR",
            dir.display()
        )));
    }
    if config_path.exists() && !args.force {
        return Err(Error::usage(format!(
            "{CONFIG_FILE} already exists here; pass --force to replace it"
        )));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir.join("tokens"))
        .map_err(|e| Error::io_at("cannot create", dir.display(), &e))?;
    let abs_dir =
        fs::canonicalize(dir).map_err(|e| Error::io_at("cannot resolve", dir.display(), &e))?;
    write_private(
        &conf,
        format!(
            "# SoftHSM2 configuration written by `hsmseal init --dev` (development only)\n\
             directories.tokendir = {}\n\
             objectstore.backend = file\n\
             log.level = ERROR\n\
             slots.removable = false\n",
            abs_dir.join("tokens").display()
        )
        .as_bytes(),
    )?;
    let user_pin = random_pin();
    let so_pin = random_pin();
    write_private(&dir.join("user-pin"), &pin_file_text(&user_pin))?;
    write_private(&dir.join("so-pin"), &pin_file_text(&so_pin))?;

    // SoftHSM2 reads SOFTHSM2_CONF (set by `export_softhsm2_conf`, before
    // any thread started) when the module is initialised, here.
    Hsm::init_token(&module, &args.label, &so_pin, &user_pin)?;

    // The audit log's HMAC key, and the log's first entry (this run).
    let audit_log = dir.join("audit.log");
    let hsm = Hsm::open_spec(&module, &hsmseal::hsm::TokenSpec::label(&args.label))?;
    hsm.login(&user_pin)?;
    hsm.create_audit_key()?;
    let record = Record {
        command: "init --dev".into(),
        ok: 1,
        seconds: started.elapsed().as_secs_f64(),
        result: "ok",
        ..Default::default()
    };
    audit::append(&hsm, &audit_log, &record, true)?;

    let cfg = FileConfig {
        module: Some(module.clone()),
        token: Some(args.label.clone()),
        pin_file: Some(dir.join("user-pin")),
        softhsm2_conf: Some(dir.join("softhsm2.conf")),
        audit_log: Some(audit_log.clone()),
        ..Default::default()
    };
    let text = format!(
        "# Written by `hsmseal init --dev`: a SoftHSM2 software token for trying hsmseal out.\n\
         # Relative paths are relative to this file. Do not use a software token in production.\n{}",
        toml::to_string(&cfg).map_err(|e| Error::usage(format!("cannot write {CONFIG_FILE}: {e}")))?
    );
    let tmp = PathBuf::from(format!(".{CONFIG_FILE}.hsmseal-tmp"));
    write_private(&tmp, text.as_bytes())?;
    fs::rename(&tmp, &config_path).map_err(|e| Error::io_at("cannot write", CONFIG_FILE, &e))?;

    if json {
        crate::report::emit(
            "init",
            &serde_json::json!({
                "token": args.label, "dir": abs_dir, "config": CONFIG_FILE,
                "module": module, "software_token": true, "audit_log": audit_log
            }),
        );
    } else if !quiet {
        eprintln!(
            "Created SoftHSM2 token {:?} in {} and {CONFIG_FILE}, with an audit log at {}.\n\
             This is a SOFTWARE token for trying hsmseal out: its keys are files protected only by\n\
             the PIN file beside them. Use a real HSM's PKCS#11 module in production.\n\
             Next: hsmseal key create backups && hsmseal encrypt --key backups FILE",
            args.label,
            dir.display(),
            audit_log.display()
        );
    }
    Ok(0)
}

/// Points `SOFTHSM2_CONF` at the configuration this run will write in
/// DIR. Called by `main` before any thread starts (`set_env_alone`); the
/// file need not exist yet: the module is loaded only after it is written.
pub fn export_softhsm2_conf(args: &InitArgs) -> Result<()> {
    let dir = std::path::absolute(&args.dir)
        .map_err(|e| Error::io_at("cannot resolve", args.dir.display(), &e))?;
    crate::config::set_env_alone("SOFTHSM2_CONF", &dir.join("softhsm2.conf"));
    Ok(())
}

/// Length of a generated PIN: 24 alphanumerics, about 143 bits.
const PIN_LEN: usize = 24;

/// A fresh random PIN, built in a zeroizing buffer of its final size (no
/// reallocation, so no unwiped copy of a part of it is left behind).
fn random_pin() -> Pin {
    let mut s = Zeroizing::new(String::with_capacity(PIN_LEN));
    let mut rng = rand::rngs::OsRng;
    for _ in 0..PIN_LEN {
        s.push(char::from(Alphanumeric.sample(&mut rng)));
    }
    Pin::from_zeroizing(s)
}

/// The PIN file's contents, the PIN and a newline, in a zeroizing buffer
/// (not a `format!`, whose `String` would never be wiped).
fn pin_file_text(pin: &Pin) -> Zeroizing<Vec<u8>> {
    let mut v = Zeroizing::new(Vec::with_capacity(pin.expose().len() + 1));
    v.extend_from_slice(pin.expose().as_bytes());
    v.push(b'\n');
    v
}

/// Creates a new file readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io_at("cannot create", path.display(), &e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io_at("cannot write", path.display(), &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pins_and_their_file_text_are_zeroizing_and_never_grown() {
        let a = random_pin();
        let b = random_pin();
        assert_eq!(a.expose().len(), PIN_LEN);
        assert!(a.expose().bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a.expose(), b.expose());
        let text: Zeroizing<Vec<u8>> = pin_file_text(&a);
        assert_eq!(&text[..PIN_LEN], a.expose().as_bytes());
        assert_eq!(&text[PIN_LEN..], b"\n");
        // Allocated once at its final size: nothing was copied on growth.
        assert_eq!(text.capacity(), PIN_LEN + 1);
    }
}
