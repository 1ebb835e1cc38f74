//! `hsmseal decrypt`: to a file, nothing appears under the output name unless
//! the whole input authenticated (the temporary file is removed otherwise);
//! to stdout, only authenticated chunks are written and the first failure
//! ends the run with a non-zero exit.

use super::encrypt::SUFFIX;
use super::paths::{
    check_pair, for_each_item, inputs_of, output_of, write_output, Input, ItemReport, Output,
};
use crate::app::App;
use crate::cli::DecryptArgs;
use crate::envelope::file;
use crate::error::{Error, Result};
use crate::stream::StreamOptions;
use std::path::PathBuf;

pub fn run(app: &App, args: DecryptArgs) -> Result<i32> {
    let inputs = inputs_of(
        &args.io,
        "several inputs are each written without their .hseal suffix",
    )?;
    let opts = StreamOptions {
        threads: app.jobs,
        progress: None,
    };
    for_each_item(app, &inputs, Input::display, |input| {
        let output = output_of(&args.io, input, strip_suffix)?;
        check_pair(input, &output, args.io.force)?;
        let mut reader = input.open()?;
        // Reject what is not an hsmseal file before touching the HSM.
        let (header, _) = file::read_header(&mut reader)?;
        let backend = app.backend()?;
        // 0600: decrypted data is for the owner only.
        let report = write_output(&output, 0o600, args.io.force, |w| {
            file::open_payload(&*backend, &header, reader, w, &opts)
        })?;
        if !app.json && output != Output::Stdout {
            app.info(format!(
                "decrypted {} -> {} ({})",
                input.display(),
                output.display(),
                report.kwk
            ));
        }
        Ok(Some(ItemReport {
            path: input.display(),
            output: Some(output.display()),
            action: "decrypt",
            key: Some(report.kwk.name),
            version: Some(report.kwk.version),
            bytes: Some(report.plaintext_bytes),
            status: "ok",
            ..Default::default()
        }))
    })
}

fn strip_suffix(p: &std::path::Path) -> Result<PathBuf> {
    let s = p.to_string_lossy();
    match s.strip_suffix(SUFFIX) {
        Some(base) if !base.is_empty() && !base.ends_with('/') => Ok(PathBuf::from(base)),
        _ => Err(Error::usage(format!(
            "cannot derive an output name (no {SUFFIX} suffix); pass -o OUT"
        ))),
    }
}
