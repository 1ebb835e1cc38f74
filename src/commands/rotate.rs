//! `hsmseal rotate`: move files to the current version of their key (or to
//! another key with `--key`), rewriting only the envelope in the header.
//!
//! Changes on disk: the 1024-byte header of each rotated file, in place
//! (crash-safe, see docs/FORMAT.md section 5); with `--reencrypt`, the whole
//! file is replaced atomically. Changes in the HSM: none (it wraps and
//! unwraps only). Files that fail authentication are left byte-identical and
//! reported; the run goes on and exits 1.

use super::paths::{for_each_item, ItemReport};
use super::walk;
use crate::app::App;
use crate::cli::RotateArgs;
use crate::envelope::rotate::{self, Outcome};
use crate::error::{Error, Result};
use crate::stream::StreamOptions;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

pub fn run(app: &App, args: RotateArgs) -> Result<i32> {
    if let Some(k) = &args.key {
        crate::keys::validate_key_name(k)?;
    }
    let mut files: Vec<PathBuf> = args.inputs.clone();
    if files.iter().any(|p| p.as_os_str() == "-") {
        return Err(Error::usage("rotate works in place on files; stdin cannot be rotated (decrypt and encrypt it instead)"));
    }
    for dir in &args.recursive {
        // In a tree, only hsmseal files are candidates; others are not errors.
        files.extend(
            walk::files_under(dir)?
                .into_iter()
                .filter(|p| walk::starts_with_magic(p)),
        );
    }
    if files.is_empty() {
        return Err(Error::usage(
            "nothing to rotate: name files or a directory with -r DIR",
        ));
    }
    let backend = app.backend()?;
    let opts = StreamOptions {
        threads: app.jobs,
        progress: None,
    };
    let started = std::time::Instant::now();
    let calls_before = backend.calls();
    let (rotated, unchanged, would) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let code = for_each_item(
        app,
        &files,
        |p| p.display().to_string(),
        |path| {
            let outcome = if args.reencrypt {
                rotate::reencrypt(&*backend, path, args.key.as_deref(), args.dry_run, &opts)?
            } else {
                rotate::rewrap(&*backend, path, args.key.as_deref(), args.dry_run)?
            };
            let path_s = path.display().to_string();
            let (status, from, to) = match &outcome {
                Outcome::Unchanged(k) => {
                    unchanged.fetch_add(1, Ordering::Relaxed);
                    app.info(format!("unchanged {path_s} ({k})"));
                    ("unchanged", None, k.clone())
                }
                Outcome::Rotated { from, to } => {
                    rotated.fetch_add(1, Ordering::Relaxed);
                    let how = if args.reencrypt {
                        "re-encrypted"
                    } else {
                        "rotated"
                    };
                    app.info(format!("{how} {path_s}: {from} -> {to}"));
                    (
                        if args.reencrypt {
                            "reencrypted"
                        } else {
                            "rotated"
                        },
                        Some(from.clone()),
                        to.clone(),
                    )
                }
                Outcome::WouldRotate { from, to } => {
                    would.fetch_add(1, Ordering::Relaxed);
                    app.info(format!("would rotate {path_s}: {from} -> {to}"));
                    ("would-rotate", Some(from.clone()), to.clone())
                }
            };
            Ok(Some(ItemReport {
                path: path_s,
                action: "rotate",
                key: Some(to.name),
                version: Some(to.version),
                from_key: from.as_ref().map(|f| f.name.clone()),
                from_version: from.map(|f| f.version),
                status,
                ..Default::default()
            }))
        },
    );
    let (rotated, unchanged, would) = (
        rotated.load(Ordering::Relaxed),
        unchanged.load(Ordering::Relaxed),
        would.load(Ordering::Relaxed),
    );
    let failed = files.len() as u64 - rotated - unchanged - would;
    let summary = serde_json::json!({
        "summary": {
            "action": "rotate",
            "files": files.len(),
            "rotated": rotated,
            "unchanged": unchanged,
            "would_rotate": would,
            "failed": failed,
            "dry_run": args.dry_run,
            "hsm_calls": backend.calls() - calls_before,
            "seconds": started.elapsed().as_secs_f64(),
        }
    });
    if app.json {
        println!("{summary}");
    } else if !app.quiet && files.len() > 1 {
        eprintln!(
            "rotate: {} files, {rotated} rotated, {unchanged} unchanged, {would} would rotate, {failed} failed, {:.3} s",
            files.len(),
            started.elapsed().as_secs_f64()
        );
    }
    code
}
