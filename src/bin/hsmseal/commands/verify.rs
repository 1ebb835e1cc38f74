//! `hsmseal verify`: authenticate every byte (header via the HSM unwrap,
//! every payload chunk); write nothing and print nothing secret.

use crate::app::App;
use crate::bulk::{for_each_item, Spec};
use crate::cli::VerifyArgs;
use crate::report::ItemReport;
use crate::select::{self, Want};
use hsmseal::envelope::file;
use hsmseal::error::Result;

pub fn run(app: &App, args: VerifyArgs) -> Result<i32> {
    let selection = select::select(&args.inputs, &args.select, Want::Sealed, false)?;
    let items = selection.items;
    let spec = Spec {
        action: "verify",
        bytes_progress: true,
        json_summary: true,
        bar: true,
        extra: vec![("other_files", selection.other_files.into())],
        ..Default::default()
    };
    for_each_item(app, &spec, &items, |_, item, opts| {
        let (header, reader) = item.input.open_sealed()?;
        let backend = app.backend()?;
        let report = file::verify_payload(&*backend, &header, reader, opts)?;
        let text = (!app.quiet).then(|| {
            let mut t = format!(
                "{}: OK ({}, key {})",
                item.display(),
                hsmseal::error::count(report.plaintext_bytes, "byte", "bytes"),
                report.kwk
            );
            // A v2 file: what became of every key slot (slots under other
            // tokens' keys cannot be checked here).
            for (i, s) in report.slots.iter().enumerate() {
                t.push_str(&format!("\n  slot {i} ({}): {}", s.slot, s.status));
            }
            t
        });
        Ok(ItemReport {
            path: item.display(),
            action: "verify",
            key: Some(report.kwk.name),
            version: Some(report.kwk.version),
            bytes: Some(report.plaintext_bytes),
            status: "ok",
            text,
            ..Default::default()
        })
    })
}
