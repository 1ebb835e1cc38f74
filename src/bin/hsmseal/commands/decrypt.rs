//! `hsmseal decrypt`: to a file, nothing appears under the output name unless
//! the whole input authenticated (the temporary file is removed otherwise);
//! to stdout, only authenticated chunks are written and the first failure
//! ends the run with a non-zero exit.

use crate::app::App;
use crate::bulk::{for_each_item, Spec};
use crate::cli::DecryptArgs;
use crate::input::Input;
use crate::outputs::{plan_outputs, prepare, write_item, Direction, Output};
use crate::select::{self, check_suffix, Want};
use hsmseal::envelope::file;
use hsmseal::error::{Error, Result};
use std::path::{Path, PathBuf};

pub fn run(app: &App, args: DecryptArgs) -> Result<i32> {
    let io = &args.io;
    check_suffix(&io.select)?;
    let selection = select::select(&io.inputs, &io.select, Want::Sealed, true)?;
    let items = selection.items;
    if io.in_place && items.iter().any(|i| i.input == Input::Stdin) {
        return Err(Error::usage("--in-place works on files, not stdin"));
    }
    let outputs = plan_outputs(io, &items, |p| strip_suffix(p, &io.select.suffix))?;
    let guard = hsmseal::guard::Guard::new(app.settings.limits.clone(), args.override_limits);
    if guard.is_active() {
        charge_files(&guard, &items)?;
    }
    let spec = Spec {
        action: "decrypt",
        bytes_progress: true,
        json_summary: true,
        bar: true,
        data_on_stdout: outputs.iter().any(|o| matches!(o, Ok(Output::Stdout))),
        extra: vec![("other_files", selection.other_files.into())],
        ..Default::default()
    };
    for_each_item(app, &spec, &items, |i, item, opts| {
        let output = outputs[i].clone()?;
        let input = &item.input;
        let sink = prepare(input, &output, io)?;
        // Reject what is not an hsmseal file before touching the HSM.
        let (header, reader) = input.open_sealed()?;
        if guard.is_active() && *input == Input::Stdin {
            charge_stdin(&guard, &header)?;
        }
        let backend = app.backend()?;
        write_item(
            app,
            &*backend,
            Direction::Open,
            io,
            input,
            &output,
            &sink,
            |w| file::open_payload(&*backend, &header, reader, w, opts),
        )
    })
}

/// The limits, checked before anything is decrypted: every file's key
/// (from its header) is charged one item and the file's size (an upper
/// bound of its plaintext). A run over a limit decrypts nothing.
/// Standard input is charged when its header is read (see `charge_stdin`).
fn charge_files(guard: &hsmseal::guard::Guard, items: &[select::Item]) -> Result<()> {
    for item in items {
        let Input::File(p) = &item.input else {
            continue;
        };
        let (header, _) = item
            .input
            .open_sealed()
            .map_err(|e| e.context(p.display().to_string()))?;
        let size = std::fs::metadata(p)
            .map_err(|e| Error::io_at("cannot read", p.display(), &e))?
            .len();
        // A multi-key (v2) file is charged to each of its keys: a limit on
        // a key counts every file that key can open.
        for key in key_names(&header) {
            guard.charge(
                &key,
                hsmseal::guard::Usage {
                    items: 1,
                    bytes: size,
                    ..Default::default()
                },
            )?;
        }
    }
    Ok(())
}

/// Standard input's size is not known before decrypting it: with a byte
/// limit on its key, it is refused (unless overridden).
fn charge_stdin(
    guard: &hsmseal::guard::Guard,
    header: &hsmseal::envelope::file::AnyHeader,
) -> Result<()> {
    for key in key_names(header) {
        charge_stdin_key(guard, &key)?;
    }
    Ok(())
}

/// The distinct key names a file's slots are under.
fn key_names(header: &hsmseal::envelope::file::AnyHeader) -> std::collections::BTreeSet<String> {
    header.keys().into_iter().map(|k| k.name).collect()
}

fn charge_stdin_key(guard: &hsmseal::guard::Guard, key: &str) -> Result<()> {
    if guard.limits(key).max_bytes.is_some() && !guard.overridden() {
        return Err(Error::usage(format!(
            "refusing to decrypt standard input: key {key} has a byte limit (max_bytes in hsmseal.toml [limits.{key}]) and the size of a stream is not known before decrypting it; decrypt the file by name, or pass --override-limits (the audit log records it)"
        )));
    }
    guard.charge(
        key,
        hsmseal::guard::Usage {
            items: 1,
            ..Default::default()
        },
    )
}

fn strip_suffix(p: &Path, suffix: &str) -> Result<PathBuf> {
    let s = p.to_string_lossy();
    match s.strip_suffix(suffix) {
        Some(base) if !base.is_empty() && !base.ends_with('/') => Ok(PathBuf::from(base)),
        _ => Err(Error::usage(format!(
            "cannot derive an output name (no {suffix} suffix); pass -o OUT, or --suffix if the files use another one"
        ))),
    }
}
