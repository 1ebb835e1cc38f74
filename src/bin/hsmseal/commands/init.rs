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
use rand::distributions::{Alphanumeric, DistString};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub fn run(args: &InitArgs, json: bool, quiet: bool) -> Result<i32> {
    let started = std::time::Instant::now();
    if !args.dev {
        return Err(Error::usage("only `hsmseal init --dev` exists: production tokens are set up with your HSM vendor's tools"));
    }
    let module = std::env::var_os("HSMSEAL_PKCS11_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE));
    if !module.exists() {
        return Err(Error::token(format!(
            "SoftHSM2 module {} not found: install it (`apt-get install softhsm2`) or set HSMSEAL_PKCS11_MODULE",
            module.display()
        )));
    }
    let config_path = PathBuf::from(CONFIG_FILE);
    if config_path.exists() && !args.force {
        return Err(Error::usage(format!(
            "{CONFIG_FILE} already exists here; pass --force to replace it"
        )));
    }
    let dir = &args.dir;
    let conf = dir.join("softhsm2.conf");
    if conf.exists() {
        return Err(Error::usage(format!(
            "{} already holds a dev token; remove the directory or choose another DIR",
            dir.display()
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
    let mut rng = rand::rngs::OsRng;
    let user_pin = Pin::new(Alphanumeric.sample_string(&mut rng, 24));
    let so_pin = Pin::new(Alphanumeric.sample_string(&mut rng, 24));
    write_private(
        &dir.join("user-pin"),
        format!("{}\n", user_pin.expose()).as_bytes(),
    )?;
    write_private(
        &dir.join("so-pin"),
        format!("{}\n", so_pin.expose()).as_bytes(),
    )?;

    // SoftHSM2 reads SOFTHSM2_CONF when the module is initialised; this
    // process has started no other thread yet.
    std::env::set_var("SOFTHSM2_CONF", abs_dir.join("softhsm2.conf"));
    Hsm::init_token(&module, &args.label, &so_pin, &user_pin)?;

    // The audit log's HMAC key, and the log's first entry (this run).
    let audit_log = dir.join("audit.log");
    let hsm = Hsm::open(&module, &args.label)?;
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
