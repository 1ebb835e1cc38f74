//! `hsmseal encrypt`: each input gets a fresh data key wrapped by the HSM key.
//! Inputs are only read (`--in-place` removes one only after its ciphertext
//! is durable and decrypts back to it); outputs appear atomically.

use super::bulk::{self, for_each_item, Spec, Want};
use super::paths::{
    check_binary_stdout, check_pair, plan_outputs, write_item, Direction, Input, ItemReport, Output,
};
use crate::app::App;
use crate::cli::{EncryptArgs, OutputArgs};
use crate::envelope::{file, header};
use crate::error::{Error, Result};
use crate::keys::KeyRef;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Default suffix of encrypted files.
pub const SUFFIX: &str = ".hseal";

/// Checks `--suffix`: not empty, and a name ending, not a path.
pub fn check_suffix(io: &OutputArgs) -> Result<()> {
    if io.suffix.is_empty() || io.suffix.contains('/') {
        return Err(Error::usage(format!(
            "--suffix {:?}: give a non-empty file name ending such as .hseal",
            io.suffix
        )));
    }
    Ok(())
}

pub fn run(app: &App, args: EncryptArgs) -> Result<i32> {
    let io = &args.io;
    check_suffix(io)?;
    let items = bulk::select(&io.inputs, &io.select, Want::AnyFile, true)?;
    if io.in_place && items.iter().any(|i| i.input == Input::Stdin) {
        return Err(Error::usage("--in-place works on files, not stdin"));
    }
    let outputs = plan_outputs(io, &items, |p: &Path| {
        let mut s = p.as_os_str().to_owned();
        s.push(&io.suffix);
        Ok(PathBuf::from(s))
    })?;
    let name = app.key_name(args.key.as_deref())?;
    let backend = app.backend()?;
    let kwk = KeyRef {
        version: backend.current_version(&name)?,
        name,
    };
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
        check_pair(input, &output, io.force)?;
        check_binary_stdout(&output)?;
        let mut reader = input.open()?;
        // Never wrap an hsmseal file in another layer by accident.
        let mut head = [0u8; 8];
        let n = file::read_up_to(&mut reader, &mut head)?;
        if header::looks_like_hsmseal(&head[..n]) {
            return Ok(ItemReport {
                path: input.display(),
                action: "encrypt",
                status: "skipped",
                reason: Some("already encrypted by hsmseal".into()),
                ..Default::default()
            });
        }
        let chained = std::io::Cursor::new(head[..n].to_vec()).chain(reader);
        write_item(app, &*backend, Direction::Seal, io, input, &output, |w| {
            file::seal(&*backend, &kwk, chained, w, opts)
        })
    })
}
