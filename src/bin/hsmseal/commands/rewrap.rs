//! `hsmseal rewrap` (alias `rotate`): move files to the current version of
//! their key (or to another key with `--key`), rewriting only the envelope
//! in the header.
//!
//! Changes on disk: the 1024-byte header of each rewrapped file, in place
//! (crash-safe, see docs/FORMAT.md section 5); with `--reencrypt`, the whole
//! file is replaced atomically. Changes in the HSM: none (it wraps and
//! unwraps only). Files that fail authentication are left byte-identical and
//! reported; the run goes on and exits 1.
//!
//! The `--json` lines keep the names of before the rename (`"action":
//! "rotate"`, statuses `rotated` and `would-rotate`), so scripts written for
//! `rotate` read `rewrap` the same (CHANGELOG 0.2).

use crate::app::App;
use crate::bulk::{for_each_item, Spec};
use crate::cli::RewrapArgs;
use crate::report::ItemReport;
use crate::select::{self, Want};
use hsmseal::envelope::rewrap::{self, Outcome};
use hsmseal::error::{Error, Result};

pub fn run(app: &App, args: RewrapArgs) -> Result<i32> {
    if let Some(k) = &args.key {
        hsmseal::backend::validate_key_name(k)?;
    }
    if args.inputs.iter().any(|p| p.as_os_str() == "-") {
        return Err(Error::usage("rewrap works in place on files; stdin cannot be rewrapped (decrypt and encrypt it instead)"));
    }
    if args.inputs.is_empty() && args.select.recursive.is_empty() {
        return Err(Error::usage(
            "nothing to rewrap: name files or a directory with -r DIR",
        ));
    }
    // In a tree, only hsmseal files are candidates; others are not errors,
    // but damaged ones are (skipping one would let `key purge` destroy the
    // only key version it still needs).
    let selection = select::select(&args.inputs, &args.select, Want::Sealed, false)?;
    let items = selection.items;
    let backend = app.backend()?;
    let spec = Spec {
        action: "rotate",
        // Header-only rewraps move no payload bytes: count items.
        bytes_progress: args.reencrypt,
        json_summary: true,
        bar: true,
        status_counts: &[
            ("rotated", "rotated"),
            ("reencrypted", "reencrypted"),
            ("unchanged", "unchanged"),
            ("would_rotate", "would-rotate"),
        ],
        extra: vec![
            ("dry_run", args.dry_run.into()),
            ("other_files", selection.other_files.into()),
        ],
        ..Default::default()
    };
    for_each_item(app, &spec, &items, |_, item, opts| {
        let path = item.path().expect("rewrap items are files");
        let outcome = if args.reencrypt {
            rewrap::reencrypt(&*backend, path, args.key.as_deref(), args.dry_run, opts)?
        } else {
            rewrap::rewrap(&*backend, path, args.key.as_deref(), args.dry_run)?
        };
        let path_s = path.display().to_string();
        let (status, from, to, note) = match &outcome {
            Outcome::Unchanged(k) => (
                "unchanged",
                None,
                k.clone(),
                format!("unchanged {path_s} ({k})"),
            ),
            Outcome::Rewrapped { from, to } => {
                let (status, how) = if args.reencrypt {
                    ("reencrypted", "re-encrypted")
                } else {
                    ("rotated", "rewrapped")
                };
                (
                    status,
                    Some(from.clone()),
                    to.clone(),
                    format!("{how} {path_s}: {from} -> {to}"),
                )
            }
            Outcome::WouldRewrap { from, to } => (
                "would-rotate",
                Some(from.clone()),
                to.clone(),
                format!("would rewrap {path_s}: {from} -> {to}"),
            ),
        };
        Ok(ItemReport {
            path: path_s,
            action: "rotate",
            key: Some(to.name),
            version: Some(to.version),
            from_key: from.as_ref().map(|f| f.name.clone()),
            from_version: from.map(|f| f.version),
            status,
            note: Some(note),
            ..Default::default()
        })
    })
}
