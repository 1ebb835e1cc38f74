//! `hsmseal decrypt`: to a file, nothing appears under the output name unless
//! the whole input authenticated (the temporary file is removed otherwise);
//! to stdout, only authenticated chunks are written and the first failure
//! ends the run with a non-zero exit.

use super::encrypt::SUFFIX;
use super::paths::{check_pair, for_each_item, write_output, Input, ItemReport, Output};
use crate::app::App;
use crate::cli::DecryptArgs;
use crate::envelope::file;
use crate::error::{Error, Result};
use crate::stream::StreamOptions;
use std::path::PathBuf;

pub fn run(app: &App, args: DecryptArgs) -> Result<i32> {
    let inputs = Input::list(&args.inputs)?;
    if args.output.is_some() && inputs.len() > 1 {
        return Err(Error::usage(
            "-o takes a single input; several inputs are each written without their .hseal suffix",
        ));
    }
    let opts = StreamOptions {
        threads: app.jobs,
        progress: None,
    };
    for_each_item(app, &inputs, Input::display, |input| {
        let output = match (&args.output, input) {
            (Some(o), _) => Output::from_arg(o),
            (None, Input::Stdin) => Output::Stdout,
            (None, Input::File(p)) => Output::File(strip_suffix(p)?),
        };
        check_pair(input, &output, args.force)?;
        let mut reader = input.open()?;
        // Reject what is not an hsmseal file before touching the HSM.
        let (header, _) = file::read_header(&mut reader)?;
        let backend = app.backend()?;
        // 0600: decrypted data is for the owner only.
        let report = write_output(&output, 0o600, args.force, |w| {
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
