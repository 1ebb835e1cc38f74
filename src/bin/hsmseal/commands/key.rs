//! `hsmseal key create|rotate|list|info|disable|enable|destroy|purge`:
//! key-wrapping keys live in the HSM; these commands create them there,
//! move them through their lifecycle (see `hsmseal::hsm::lifecycle`) and
//! describe them. They never write a file (`destroy` and `purge` read the
//! files named by `--check`, to spare versions data still needs), and no
//! key material is ever shown (it cannot be: the keys are never
//! extractable).
//!
//! Every command that changes the token says what it changed, on stdout
//! (one JSON object with `--json`). The irreversible ones (`destroy`,
//! `purge`) refuse without `--yes`, after checking what they would do so the
//! refusal can say it.

use crate::app::App;
use crate::cli::KeyCommand;
use hsmseal::backend::{validate_key_name, KeyRef};
use hsmseal::envelope::any_recipient::AnyRecipient;
use hsmseal::error::{Error, Result};
use hsmseal::hsm::pubkey::PubKeyType;
use hsmseal::hsm::{KeyInfo, KeyState, PurgeReport, StateChange};
use std::sync::atomic::Ordering;

pub fn run(app: &App, cmd: KeyCommand) -> Result<i32> {
    // Names are checked before the PIN is asked for.
    match &cmd {
        KeyCommand::List | KeyCommand::BackupTrust { .. } | KeyCommand::Restore { .. } => {}
        KeyCommand::Create { name, .. }
        | KeyCommand::BackupTarget { name, .. }
        | KeyCommand::ExportPublic { name, .. }
        | KeyCommand::Backup { name, .. }
        | KeyCommand::Rotate { name, .. }
        | KeyCommand::Info { name }
        | KeyCommand::Disable { name, .. }
        | KeyCommand::Enable { name, .. }
        | KeyCommand::Destroy { name, .. }
        | KeyCommand::Purge { name, .. } => validate_key_name(name)?,
    }
    // The security officer's step runs without the user PIN (PKCS#11
    // allows one login per application: SO or user).
    if let KeyCommand::BackupTrust { file, so_pin_file } = &cmd {
        return backup_trust(app, file, so_pin_file.as_deref());
    }
    let hsm = app.hsm()?;
    let token = hsm.token_label().to_string();
    // For the audit entry: the version a command acts on is named even if
    // it fails; versions created or destroyed are counted as items.
    let done = |k: KeyRef, changed: bool| {
        app.stats.add_key(k);
        let counter = if changed {
            &app.stats.ok
        } else {
            &app.stats.skipped
        };
        counter.fetch_add(1, Ordering::Relaxed);
    };
    match &cmd {
        KeyCommand::Disable { name, version }
        | KeyCommand::Enable { name, version }
        | KeyCommand::Destroy { name, version, .. } => app.stats.add_key(KeyRef {
            name: name.clone(),
            version: *version,
        }),
        _ => {}
    }
    match cmd {
        KeyCommand::Create {
            name,
            key_type,
            bits,
            backup,
        } => {
            let Some(ty) = PubKeyType::from_name(&key_type) else {
                // aes: the one type with no public half.
                let info = hsm.create_key_with(&name, backup)?;
                done(info.key_ref(), true);
                if app.json {
                    crate::report::emit("key", &info);
                } else {
                    crate::outln!(
                        "created {} v{} on token {token}; files were not changed",
                        info.name,
                        info.version
                    );
                }
                return Ok(0);
            };
            if backup {
                return Err(Error::usage(format!(
                    "--backup is for aes keys; an {key_type} key's data stays reachable through the other keys of each file (encrypt --key and --recipient together)"
                )));
            }
            let r = hsm.create_pub_key(ty, &name, bits)?;
            done(r.key_ref(), true);
            let fp = format!("sha256:{}", hsmseal::envelope::slots::hex(&r.fingerprint()));
            match (&r, app.json) {
                (AnyRecipient::Rsa(r), true) => crate::report::emit(
                    "key",
                    &serde_json::json!({"name": name, "version": r.version, "type": "rsa-oaep", "bits": r.bits, "oaep_hash": r.oaep.name(), "fingerprint": fp}),
                ),
                (AnyRecipient::Rsa(r), false) => crate::outln!(
                    "created {name} v1 on token {token} (RSA-{}, private key decrypt-only, never extractable, OAEP {}); fingerprint {fp}; `hsmseal key export-public {name}` writes its recipient file",
                    r.bits,
                    r.oaep.name()
                ),
                (AnyRecipient::Ec(r), true) => crate::report::emit(
                    "key",
                    &serde_json::json!({"name": name, "version": r.version, "key_type": "ec-p256", "fingerprint": fp}),
                ),
                (AnyRecipient::Ec(_), false) => crate::outln!(
                    "created {name} v1 on token {token} (EC P-256, private key derive-only (ECDH), never extractable); fingerprint {fp}; `hsmseal key export-public {name}` writes its recipient file"
                ),
            }
        }
        KeyCommand::ExportPublic { name, version } => {
            let text = hsm.export_recipient(&name, version)?.to_text();
            crate::outln!("{}", text.trim_end());
        }
        KeyCommand::Rotate {
            name,
            if_older_than: Some(age),
            backup: false,
        } => {
            let r = hsm.rotate_if_older(&name, age, hsmseal::time::now_unix())?;
            let k = KeyRef {
                name: name.clone(),
                version: r.current_version,
            };
            done(k, r.rotated);
            if app.json {
                crate::report::emit("key_rotation", &r);
            } else if r.rotated {
                crate::outln!(
                    "created {name} v{v} on token {token} ({}): new encryptions under {name} use v{v}; older versions stay decrypt-only. Files were not changed (`hsmseal rewrap` rewraps them under v{v})",
                    r.reason,
                    v = r.current_version
                );
            } else {
                crate::outln!(
                    "not rotated: key {name} on token {token}: {}; new encryptions under {name} use v{}. Nothing changed",
                    r.reason,
                    r.current_version
                );
            }
        }
        KeyCommand::Rotate {
            if_older_than: Some(_),
            ..
        } => {
            return Err(Error::usage(
                "--backup and --if-older-than cannot be combined: rotate with --backup once; later rotations keep the property",
            ))
        }
        KeyCommand::Rotate { name, backup, .. } => {
            let info = hsm.create_next_version_with(&name, backup)?;
            done(info.key_ref(), true);
            if app.json {
                crate::report::emit("key", &info);
            } else if info.key_type != "aes" {
                crate::outln!(
                    "created {name} v{v} on token {token} ({}): `hsmseal key export-public {name}` now hands out v{v}; older versions stay decrypt-only. Files were not changed (`hsmseal rotate` re-seals their {name} slots to v{v})",
                    info.key_type,
                    v = info.version
                );
            } else {
                crate::outln!(
                    "created {name} v{v} on token {token}: new encryptions under {name} use v{v}; older versions stay decrypt-only. Files were not changed (`hsmseal rewrap` rewraps them under v{v})",
                    v = info.version
                );
            }
        }
        KeyCommand::List => {
            let keys = hsm.list_keys()?;
            print_keys(app, &keys);
            // The KDKs and blind-index keys beside them, with their checks
            // (human output only: `key list --json` stays one `key` line
            // per version, as consumers expect; `doctor --json` carries
            // them as `hmac_keys`).
            if !app.json {
                let hmac = hsm.hmac_keys(&keys)?;
                crate::outln!(
                    "HMAC KEYS (key-derivation keys of versions, blind-index keys of names)"
                );
                for o in &hmac {
                    crate::outln!("{}", hsmseal::hsm::doctor::hmac_key_line(o));
                }
            }
        }
        KeyCommand::Info { name } => print_keys(app, &hsm.key_versions(&name)?),
        KeyCommand::Disable { name, version } => {
            let change = hsm.disable_version(&KeyRef { name, version })?;
            done(change.key_ref(), change.changed);
            print_change(app, &change);
        }
        KeyCommand::Enable { name, version } => {
            let change = hsm.enable_version(&KeyRef { name, version })?;
            done(change.key_ref(), change.changed);
            print_change(app, &change);
        }
        KeyCommand::Destroy {
            name,
            version,
            yes,
            force,
            check,
        } => {
            let k = KeyRef { name, version };
            if !check.is_empty() {
                // Before anything else: a version data still needs is never
                // destroyed, with or without --yes.
                let found = super::deps::search(app, &check, &Default::default(), true)?;
                super::deps::require_complete(&found, &format!("destroy {k}"))?;
                if let Some(why) = super::deps::needed_versions(&found, &k.name).get(&k.version) {
                    return Err(Error::usage(format!(
                        "refusing to destroy {k}: {why}; rewrap that data first (`hsmseal rewrap` for files; `hsmseal columns rewrap` for dumps, decrypting a sealed dump first)"
                    )));
                }
            }
            if !yes {
                // Check first (exists, not current without --force), so the
                // refusal names what would actually happen.
                return Err(match hsm.check_destroy(&k, force)? {
                    None => Error::usage(format!(
                        "{k} is already destroyed on token {token:?}; nothing to do (and --yes is required to destroy anything)"
                    )),
                    Some(info) => Error::usage(format!(
                        "refusing to destroy {k} without --yes: its key object {} ({}) would be deleted from token {token:?}, and everything encrypted under it (files, column values, every backup copy) could never be decrypted again",
                        info.label, info.state
                    )),
                });
            }
            let change = hsm.destroy_version(&k, force)?;
            done(change.key_ref(), change.changed);
            print_change(app, &change);
        }
        KeyCommand::Purge {
            name,
            older_than,
            dry_run,
            yes,
            check,
        } => {
            let now = hsmseal::time::now_unix();
            // Versions that data under --check still needs are spared; a
            // search that could not read everything destroys nothing.
            let needed = if check.is_empty() {
                Default::default()
            } else {
                let found = super::deps::search(app, &check, &Default::default(), true)?;
                super::deps::require_complete(&found, &format!("purge key {name}"))?;
                super::deps::needed_versions(&found, &name)
            };
            if !dry_run && !yes {
                let plan = hsm.purge(&name, older_than, now, true, &needed)?;
                let what = if plan.destroyed.is_empty() {
                    "nothing is old enough today".to_string()
                } else {
                    format!(
                        "it would destroy {} of key {name} on token {token:?}, and data under those versions could never be decrypted again",
                        versions(&plan.destroyed)
                    )
                };
                return Err(Error::usage(format!(
                    "refusing to purge without --yes: {what}. Check with --dry-run, then confirm with --yes"
                )));
            }
            let report = hsm.purge(&name, older_than, now, dry_run, &needed)?;
            for i in &report.destroyed {
                let k = KeyRef {
                    name: name.clone(),
                    version: i.version,
                };
                // A dry run destroys nothing: counted as skipped, keys not named.
                if dry_run {
                    app.stats.skipped.fetch_add(1, Ordering::Relaxed);
                } else {
                    done(k, true);
                }
            }
            print_purge(app, &report);
            // Spared because data still needs them: retention could not be
            // applied in full, which a nightly job must notice.
            let held: Vec<_> = report
                .spared
                .iter()
                .filter(|i| needed.get(&i.version) == Some(&i.reason))
                .collect();
            if !held.is_empty() && !dry_run {
                for i in &held {
                    eprintln!(
                        "hsmseal: key purge spared {name} v{}: {}; rewrap that data (`hsmseal rewrap` for files; `hsmseal columns rewrap` for dumps, decrypting a sealed dump first) and purge again",
                        i.version, i.reason
                    );
                }
                return Ok(1);
            }
        }
        KeyCommand::BackupTarget { name, output } => {
            let tk = hsm.create_transport_key(&name)?;
            write_new(&output, tk.to_text().as_bytes(), 0o644)?;
            app.stats.ok.fetch_add(1, Ordering::Relaxed);
            if app.json {
                crate::report::emit(
                    "transport_key",
                    &serde_json::json!({"name": name, "token": token, "fingerprint": tk.fingerprint(), "file": output.display().to_string()}),
                );
            } else {
                crate::outln!(
                    "created transport key hsmseal-transport:{name} on token {token} (RSA-3072, private key unwrap-only, never extractable); public key written to {}, fingerprint {}. Give it to the source token's security officer (`hsmseal key backup-trust`) and compare the fingerprint there",
                    output.display(),
                    tk.fingerprint()
                );
            }
        }
        KeyCommand::BackupTrust { .. } => unreachable!("handled before login"),
        KeyCommand::Backup {
            name,
            version,
            to,
            output,
        } => {
            let tk = read_transport(&to)?;
            let version = match version {
                Some(v) => v,
                None => hsmseal::backend::KeyBackend::current_version(&*hsm, &name)?,
            };
            let k = KeyRef { name, version };
            app.stats.add_key(k.clone());
            let b = hsm.backup_version(&k, &tk)?;
            write_new(&output, b.to_text().as_bytes(), 0o600)?;
            app.stats.ok.fetch_add(1, Ordering::Relaxed);
            if app.json {
                crate::report::emit(
                    "key_backup",
                    &serde_json::json!({"key": k.name, "version": k.version, "token": token, "transport": tk.fingerprint(), "fingerprint": b.fingerprint(), "file": output.display().to_string()}),
                );
            } else {
                crate::outln!(
                    "backed up {k} and its key-derivation key from token {token} to {}, wrapped for transport key {} ({}); backup fingerprint {}: compare it with what `hsmseal key restore` prints on the recovery token",
                    output.display(),
                    tk.label(),
                    tk.fingerprint(),
                    b.fingerprint()
                );
            }
        }
        KeyCommand::Restore { file, backup } => {
            let text = read_small(&file, "backup file")?;
            let source = file.display().to_string();
            let b = hsmseal::hsm::backup::Backup::parse(&text, &source)?;
            app.stats.add_key(b.key.clone());
            let r = hsm.restore_backup(&b, backup, &source)?;
            app.stats.ok.fetch_add(1, Ordering::Relaxed);
            if app.json {
                crate::report::emit("key_restore", &r);
            } else {
                crate::outln!(
                    "restored {} v{} on token {token} ({}); backup fingerprint {}: it must match what `hsmseal key backup` printed. {}",
                    r.key,
                    r.version,
                    if r.backup_capable {
                        "backup-capable"
                    } else {
                        "not extractable"
                    },
                    r.fingerprint,
                    current_note(&r.key, r.current_version)
                );
            }
        }
    }
    Ok(0)
}

/// `key backup-trust`: the SO PIN from --so-pin-file or HSMSEAL_SO_PIN,
/// never from the command line; the token is opened without the user PIN.
fn backup_trust(
    app: &App,
    file: &std::path::Path,
    so_pin_file: Option<&std::path::Path>,
) -> Result<i32> {
    let tk = read_transport(file)?;
    let pin = match so_pin_file {
        Some(p) => crate::config::read_pin_file(p, &crate::config::Source::Flag)?,
        None => {
            use std::os::unix::ffi::OsStringExt;
            let v = zeroize::Zeroizing::new(
                std::env::var_os("HSMSEAL_SO_PIN")
                    .map(|v| v.into_vec())
                    .unwrap_or_default(),
            );
            if v.is_empty() {
                return Err(Error::pin(
                    "`key backup-trust` needs the security officer PIN: set HSMSEAL_SO_PIN or pass --so-pin-file FILE",
                ));
            }
            hsmseal::secret::Pin::from_utf8(v)
                .ok_or_else(|| Error::pin("HSMSEAL_SO_PIN is not UTF-8 text"))?
        }
    };
    // An audited run has logged in as the user already (to check the log
    // first) and appends its entry as the user afterwards.
    let (hsm, user_pin) = if super::audit::configured_log(app).is_some() {
        (app.hsm()?, Some(app.settings.read_pin()?))
    } else {
        (std::sync::Arc::new(app.open_hsm(false)?), None)
    };
    let added = hsm.trust_transport_key(&pin, &tk, user_pin.as_ref())?;
    if added {
        app.stats.ok.fetch_add(1, Ordering::Relaxed);
    } else {
        app.stats.skipped.fetch_add(1, Ordering::Relaxed);
    }
    let token = hsm.token_label();
    if app.json {
        crate::report::emit(
            "transport_trust",
            &serde_json::json!({"name": tk.name, "token": token, "fingerprint": tk.fingerprint(), "changed": added}),
        );
    } else if added {
        crate::outln!(
            "imported transport key {} as trusted, wrap-only, on token {token}; fingerprint {} (it must match what `key backup-target` printed)",
            tk.label(),
            tk.fingerprint()
        );
    } else {
        crate::outln!(
            "transport key {} (fingerprint {}) is already on token {token}; nothing changed",
            tk.label(),
            tk.fingerprint()
        );
    }
    Ok(0)
}

fn read_transport(path: &std::path::Path) -> Result<hsmseal::hsm::backup::TransportKey> {
    let text = read_small(path, "transport key file")?;
    hsmseal::hsm::backup::TransportKey::parse(&text, &path.display().to_string())
}

/// A small text file (transport key, backup): at most 64 KiB of UTF-8.
fn read_small(path: &std::path::Path, what: &str) -> Result<String> {
    use std::io::Read;
    let f =
        std::fs::File::open(path).map_err(|e| Error::io_at("cannot open", path.display(), &e))?;
    let mut buf = Vec::new();
    f.take(64 * 1024 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io_at("cannot read", path.display(), &e))?;
    if buf.len() > 64 * 1024 {
        return Err(Error::format(format!(
            "{} is larger than any {what} (64 KiB)",
            path.display()
        )));
    }
    String::from_utf8(buf).map_err(|_| {
        Error::format(format!(
            "{} is not a {what}: not UTF-8 text",
            path.display()
        ))
    })
}

/// Writes `bytes` to `path` atomically (never half-written under its
/// name); refuses an existing file.
fn write_new(path: &std::path::Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let mut f = hsmseal::fs::AtomicFile::create(path, mode, false)?;
    f.write_all(bytes)
        .map_err(|e| Error::io_at("cannot write", path.display(), &e))?;
    f.commit()?;
    Ok(())
}

/// `v1, v3`
fn versions(items: &[hsmseal::hsm::PurgeItem]) -> String {
    items
        .iter()
        .map(|i| format!("v{}", i.version))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What new encryptions use now, for the end of a message.
fn current_note(name: &str, current: Option<u32>) -> String {
    match current {
        Some(v) => format!("new encryptions under {name} use v{v}"),
        None => format!(
            "key {name} has no usable version: encryption under it fails until `hsmseal key enable` or `hsmseal key rotate {name}`"
        ),
    }
}

fn print_change(app: &App, c: &StateChange) {
    if app.json {
        crate::report::emit("key_change", c);
        return;
    }
    let k = format!("{} v{}", c.key, c.version);
    let t = &c.token;
    let what = match (c.action, c.changed) {
        ("disable", true) => format!(
            "disabled {k} on token {t}: CKA_ENCRYPT and CKA_DECRYPT are now false, the HSM refuses to use it"
        ),
        ("enable", true) => format!(
            "enabled {k} on token {t}: CKA_ENCRYPT and CKA_DECRYPT are true again"
        ),
        ("destroy", true) => format!(
            "destroyed {k} on token {t}: its key object is deleted; data under it can never be decrypted again"
        ),
        (_, false) => format!("{k} was already {} on token {t}; nothing changed", c.state),
        (other, true) => format!("{other} {k} on token {t}"),
    };
    crate::outln!(
        "{what}; {}. Files were not changed",
        current_note(&c.key, c.current_version)
    );
}

fn print_purge(app: &App, r: &PurgeReport) {
    if app.json {
        crate::report::emit("purge", r);
        return;
    }
    let verb = if r.dry_run {
        "would destroy"
    } else {
        "destroyed"
    };
    crate::outln!(
        "purge of key {} on token {} (cutoff {}){}:",
        r.key,
        r.token,
        r.cutoff,
        if r.dry_run {
            ", dry run: nothing changed"
        } else {
            ""
        }
    );
    for i in &r.destroyed {
        crate::outln!(
            "  {verb:<13} v{:<5} {:<12} created {:<20} {}",
            i.version,
            i.state.to_string(),
            i.created.as_deref().unwrap_or("unknown"),
            i.reason
        );
    }
    for i in &r.spared {
        crate::outln!(
            "  {:<13} v{:<5} {:<12} created {:<20} {}",
            "spared",
            i.version,
            i.state.to_string(),
            i.created.as_deref().unwrap_or("unknown"),
            i.reason
        );
    }
    if r.destroyed.is_empty() {
        crate::outln!("  nothing to destroy");
    }
    crate::outln!("files were not changed");
}

fn print_keys(app: &App, keys: &[KeyInfo]) {
    if app.json {
        // One line per key version (none: no line).
        for k in keys {
            crate::report::emit("key", k);
        }
        return;
    }
    if keys.is_empty() {
        crate::outln!("no hsmseal keys on this token (create one with `hsmseal key create NAME`)");
        return;
    }
    crate::outln!(
        "{:<24} {:>7}  {:<13}  {:<12}  {:<20}  STATUS",
        "NAME",
        "VERSION",
        "TYPE",
        "STATE",
        "CREATED"
    );
    for k in keys {
        let status = match (k.state, k.problems.is_empty()) {
            (KeyState::Destroyed, _) => "-".to_string(),
            _ => format!(
                "{}{}",
                hsmseal::hsm::kwk::status(&k.problems),
                hsmseal::hsm::kwk::provenance_note(k)
            ),
        };
        crate::outln!(
            "{:<24} {:>7}  {:<13}  {:<12}  {:<20}  {status}",
            k.name,
            k.version,
            k.key_type,
            k.state.to_string(),
            k.created.as_deref().unwrap_or("-"),
        );
    }
}
