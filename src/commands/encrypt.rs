//! `hsmseal encrypt`: each input gets a fresh data key wrapped by the HSM key.
//! Inputs are only read; outputs appear atomically.

use super::paths::{
    check_binary_stdout, check_pair, for_each_item, write_output, Input, ItemReport, Output,
};
use crate::app::App;
use crate::cli::EncryptArgs;
use crate::envelope::{file, header};
use crate::error::{Error, Result};
use crate::keys::KeyRef;
use crate::stream::StreamOptions;
use std::io::Read;
use std::path::PathBuf;

/// Default suffix of encrypted files.
pub const SUFFIX: &str = ".hseal";

pub fn run(app: &App, args: EncryptArgs) -> Result<i32> {
    let inputs = Input::list(&args.inputs)?;
    if args.output.is_some() && inputs.len() > 1 {
        return Err(Error::usage(
            "-o takes a single input; each of several inputs is written to INPUT.hseal",
        ));
    }
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
        let output = match (&args.output, input) {
            (Some(o), _) => Output::from_arg(o),
            (None, Input::Stdin) => Output::Stdout,
            (None, Input::File(p)) => {
                let mut s = p.clone().into_os_string();
                s.push(SUFFIX);
                Output::File(PathBuf::from(s))
            }
        };
        check_pair(input, &output, args.force)?;
        check_binary_stdout(&output)?;
        let mut reader = input.open()?;
        // Never wrap an hsmseal file in another layer by accident.
        let mut head = [0u8; 8];
        let n = read_up_to(&mut reader, &mut head)?;
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
        let report = write_output(&output, 0o644, args.force, |w| {
            file::seal(&*backend, &kwk, chained, w, &opts)
        })?;
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

/// Reads until `buf` is full or the input ends.
pub fn read_up_to(r: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("reading input: {e}"))),
        }
    }
    Ok(got)
}
