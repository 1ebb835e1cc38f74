//! `hsmseal encrypt`: each input gets a fresh data key wrapped by the HSM key.
//! Inputs are only read; outputs appear atomically.

use super::paths::{
    check_binary_stdout, check_pair, for_each_item, inputs_of, output_of, write_output, Input,
    ItemReport, Output,
};
use crate::app::App;
use crate::cli::EncryptArgs;
use crate::envelope::{file, header};
use crate::error::Result;
use crate::keys::KeyRef;
use crate::stream::StreamOptions;
use std::io::Read;
use std::path::PathBuf;

/// Default suffix of encrypted files.
pub const SUFFIX: &str = ".hseal";

pub fn run(app: &App, args: EncryptArgs) -> Result<i32> {
    let inputs = inputs_of(&args.io, "each of several inputs is written to INPUT.hseal")?;
    let name = app.key_name(args.key.as_deref())?;
    let backend = app.backend()?;
    let kwk = KeyRef {
        version: backend.current_version(&name)?,
        name,
    };
    let opts = StreamOptions {
        threads: app.jobs,
        progress: None,
    };
    for_each_item(app, &inputs, Input::display, |input| {
        let output = output_of(&args.io, input, |p| {
            let mut s = p.as_os_str().to_owned();
            s.push(SUFFIX);
            Ok(PathBuf::from(s))
        })?;
        check_pair(input, &output, args.io.force)?;
        check_binary_stdout(&output)?;
        let mut reader = input.open()?;
        // Never wrap an hsmseal file in another layer by accident.
        let mut head = [0u8; 8];
        let n = file::read_up_to(&mut reader, &mut head)?;
        if header::looks_like_hsmseal(&head[..n]) {
            app.info(format!(
                "hsmseal: skipped {}: already encrypted by hsmseal",
                input.display()
            ));
            return Ok(Some(ItemReport {
                path: input.display(),
                action: "encrypt",
                status: "skipped",
                ..Default::default()
            }));
        }
        let chained = std::io::Cursor::new(head[..n].to_vec()).chain(reader);
        let report = write_output(&output, 0o644, args.io.force, |w| {
            file::seal(&*backend, &kwk, chained, w, &opts)
        })?;
        if !app.json && output != Output::Stdout {
            app.info(format!(
                "encrypted {} -> {} ({})",
                input.display(),
                output.display(),
                report.kwk
            ));
        }
        Ok(Some(ItemReport {
            path: input.display(),
            output: Some(output.display()),
            action: "encrypt",
            key: Some(report.kwk.name),
            version: Some(report.kwk.version),
            bytes: Some(report.plaintext_bytes),
            status: "ok",
            ..Default::default()
        }))
    })
}
