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

fn strip_suffix(p: &Path, suffix: &str) -> Result<PathBuf> {
    let s = p.to_string_lossy();
    match s.strip_suffix(suffix) {
        Some(base) if !base.is_empty() && !base.ends_with('/') => Ok(PathBuf::from(base)),
        _ => Err(Error::usage(format!(
            "cannot derive an output name (no {suffix} suffix); pass -o OUT, or --suffix if the files use another one"
        ))),
    }
}
