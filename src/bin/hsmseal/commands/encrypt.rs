//! `hsmseal encrypt`: each input gets a fresh data key wrapped by the HSM key.
//! Inputs are only read (`--in-place` removes one only after its ciphertext
//! is durable and decrypts back to it); outputs appear atomically.

use crate::app::App;
use crate::bulk::{for_each_item, Spec};
use crate::cli::EncryptArgs;
use crate::input::Input;
use crate::outputs::{check_binary_stdout, plan_outputs, prepare, write_item, Direction, Output};
use crate::report::ItemReport;
use crate::select::walk::{classify, Kind};
use crate::select::{self, check_suffix, Want};
use hsmseal::backend::{KeyBackend, KeyRef, WrappedKey};
use hsmseal::envelope::any_recipient::AnyRecipient;
use hsmseal::envelope::{file, header};
use hsmseal::error::{Error, Result};
use hsmseal::secret::SecretKey;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn run(app: &App, args: EncryptArgs) -> Result<i32> {
    let io = &args.io;
    check_suffix(&io.select)?;
    let items = select::select(&io.inputs, &io.select, Want::AnyFile, true)?.items;
    if io.in_place && items.iter().any(|i| i.input == Input::Stdin) {
        return Err(Error::usage("--in-place works on files, not stdin"));
    }
    let outputs = plan_outputs(io, &items, |p: &Path| {
        let mut s = p.as_os_str().to_owned();
        s.push(&io.select.suffix);
        Ok(PathBuf::from(s))
    })?;
    let (names, recipients) = key_names(app, &args)?;
    // Recipients only: the PKCS#11 module is never loaded (no token, no
    // PIN): the slots are sealed on the host with the public keys.
    let backend: Arc<dyn KeyBackend> = if names.is_empty() {
        if io.in_place {
            return Err(Error::usage(
                "--in-place checks the new file by decrypting it, which needs a key on the token; with --recipient only there is none: write the output and remove the original yourself",
            ));
        }
        Arc::new(NoKeyStore)
    } else {
        app.backend()?
    };
    // One key, no group, no recipient: format v1, as before (byte layout
    // unchanged). Otherwise format v2, a slot per key, in the order given
    // (keys first, then recipients).
    let multi =
        names.len() + recipients.len() > 1 || args.group.is_some() || !recipients.is_empty();
    let mut targets: Vec<file::Target> = Vec::with_capacity(names.len() + recipients.len());
    for name in names {
        targets.push(file::Target::Kwk(KeyRef {
            version: backend.current_version(&name)?,
            name,
        }));
    }
    targets.extend(recipients.into_iter().map(file::Target::Recipient));
    let kwk = targets[0].key();
    let spec = Spec {
        action: "encrypt",
        bytes_progress: true,
        json_summary: true,
        bar: true,
        data_on_stdout: outputs.iter().any(|o| matches!(o, Ok(Output::Stdout))),
        ..Default::default()
    };
    for_each_item(app, &spec, &items, |i, item, opts| {
        let output = outputs[i].clone()?;
        let input = &item.input;
        let sink = prepare(input, &output, io)?;
        check_binary_stdout(&sink)?;
        let mut reader = input.open()?;
        // Never wrap an hsmseal file in another layer by accident, nor a
        // damaged one (it would then hide from rewrap and verify -r).
        let mut head = vec![0u8; header::SNIFF_LEN];
        let n = file::read_up_to(&mut reader, &mut head)?;
        head.truncate(n);
        let name = match input {
            Input::File(p) => p.as_path(),
            Input::Stdin => Path::new(""),
        };
        match classify(&head, name, &io.select.suffix) {
            Kind::Sealed => {
                return Ok(ItemReport {
                    path: input.display(),
                    action: "encrypt",
                    status: "skipped",
                    reason: Some("already encrypted by hsmseal".into()),
                    ..Default::default()
                })
            }
            Kind::Damaged(e) => {
                return Err(Error::new(
                    e.kind(),
                    format!("not encrypting it again: {}", e.message()),
                ))
            }
            Kind::Other => {}
        }
        let chained = std::io::Cursor::new(head).chain(reader);
        write_item(
            app,
            &*backend,
            Direction::Seal,
            io,
            input,
            &output,
            &sink,
            |w| {
                if multi {
                    file::seal_slots(Some(&*backend), &targets, chained, w, opts)
                } else {
                    file::seal(&*backend, &kwk, chained, w, opts)
                }
            },
        )
    })
}

/// The key store of a recipients-only run: never asked for anything (every
/// slot is sealed on the host); an unexpected call is an error, not a
/// token load.
struct NoKeyStore;

impl KeyBackend for NoKeyStore {
    fn current_version(&self, name: &str) -> Result<u32> {
        Err(Error::usage(format!(
            "key {name} needs the token, which this run does not open"
        )))
    }
    fn wrap(&self, kwk: &KeyRef, _: &SecretKey, _: &[u8]) -> Result<WrappedKey> {
        Err(Error::usage(format!(
            "key {kwk} needs the token, which this run does not open"
        )))
    }
    fn unwrap(&self, kwk: &KeyRef, _: &WrappedKey, _: &[u8]) -> Result<SecretKey> {
        Err(Error::usage(format!(
            "key {kwk} needs the token, which this run does not open"
        )))
    }
    fn calls(&self) -> u64 {
        0
    }
}

/// The key names (`--key`, repeatable, and `--group`'s keys, or the
/// default key when no recipient is given) and the recipients
/// (`--recipient` and `--group`'s recipients) to seal to; each once.
fn key_names(app: &App, args: &EncryptArgs) -> Result<(Vec<String>, Vec<AnyRecipient>)> {
    let mut recipients = Vec::new();
    for p in &args.recipient {
        recipients.push(AnyRecipient::load(p)?);
    }
    if let Some(g) = &args.group {
        if let Some(group) = app.settings.groups.get(g) {
            let base = app
                .settings
                .config_file
                .as_deref()
                .and_then(Path::parent)
                .unwrap_or(Path::new("."));
            for p in &group.recipients {
                recipients.push(AnyRecipient::load(&base.join(p))?);
            }
        }
    }
    let names = key_names_only(app, args, recipients.is_empty())?;
    let mut seen = std::collections::BTreeSet::new();
    for r in &recipients {
        let name = r.key_ref().name;
        if names.contains(&name) || !seen.insert(name.clone()) {
            return Err(Error::usage(format!(
                "key {name} is given twice (each key or recipient gets one slot)"
            )));
        }
    }
    if names.len() + recipients.len() > hsmseal::envelope::slots::MAX_SLOTS {
        return Err(Error::usage(format!(
            "{} keys and recipients given; a file has at most {} key slots",
            names.len() + recipients.len(),
            hsmseal::envelope::slots::MAX_SLOTS
        )));
    }
    Ok((names, recipients))
}

/// The key names to seal to: `--key` (repeatable) and `--group`'s keys, or
/// the default key; each name once.
fn key_names_only(app: &App, args: &EncryptArgs, default: bool) -> Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for k in &args.key {
        hsmseal::backend::validate_key_name(k)?;
        names.push(k.clone());
    }
    if let Some(g) = &args.group {
        let group = app.settings.groups.get(g).ok_or_else(|| {
            Error::usage(format!(
                "no group {g:?} in hsmseal.toml: add [groups.{g}] keys = [\"NAME\", ...]"
            ))
        })?;
        if group.keys.is_empty() && group.recipients.is_empty() {
            return Err(Error::usage(format!(
                "group {g:?} in hsmseal.toml has no keys: give [groups.{g}] keys = [\"NAME\", ...] or recipients = [\"FILE\", ...]"
            )));
        }
        for k in &group.keys {
            hsmseal::backend::validate_key_name(k).map_err(|e| {
                Error::usage(format!("[groups.{g}] in hsmseal.toml: {}", e.message()))
            })?;
            names.push(k.clone());
        }
    }
    if names.is_empty() && default {
        names.push(app.key_name(None)?);
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(d) = names.iter().find(|n| !seen.insert(n.as_str())) {
        return Err(Error::usage(format!(
            "key {d} is given twice (--key and --group together name each key once)"
        )));
    }
    if names.len() > hsmseal::envelope::slots::MAX_SLOTS {
        return Err(Error::usage(format!(
            "{} keys given; a file has at most {} key slots",
            names.len(),
            hsmseal::envelope::slots::MAX_SLOTS
        )));
    }
    Ok(names)
}
