//! `hsmseal verify`: authenticate every byte (header via the HSM unwrap,
//! every payload chunk); write nothing and print nothing secret.

use super::paths::{for_each_item, Input, ItemReport};
use crate::app::App;
use crate::cli::VerifyArgs;
use crate::envelope::file;
use crate::error::Result;
use crate::stream::StreamOptions;

pub fn run(app: &App, args: VerifyArgs) -> Result<i32> {
    let inputs = Input::list(&args.inputs)?;
    let opts = StreamOptions {
        threads: app.jobs,
        progress: None,
    };
    for_each_item(app, &inputs, Input::display, |input| {
        let mut reader = input.open()?;
        let (header, _) = file::read_header(&mut reader)?;
        let backend = app.backend()?;
        let report = file::verify_payload(&*backend, &header, reader, &opts)?;
        if !app.json && !app.quiet {
            println!(
                "{}: OK ({} bytes, key {})",
                input.display(),
                report.plaintext_bytes,
                report.kwk
            );
        }
        Ok(Some(ItemReport {
            path: input.display(),
            action: "verify",
            key: Some(report.kwk.name),
            version: Some(report.kwk.version),
            bytes: Some(report.plaintext_bytes),
            status: "ok",
            ..Default::default()
        }))
    })
}
