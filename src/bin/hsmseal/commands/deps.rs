//! `inspect --deps` and the `--check` of `key purge` / `key destroy`: which
//! key versions the data under some paths still needs (see `hsmseal::deps`).
//!
//! Every regular file under the paths is read:
//! - an hsmseal file needs its envelope's key version (from the header);
//!   unless `--headers-only`, its payload is also decrypted into memory
//!   (authenticated chunks only, nothing written) and searched for column
//!   tokens, so a dump sealed as `.hseal` reveals the versions its cells need;
//! - any other file is searched for column tokens as it is.
//!
//! An answer that misses a dependency can destroy data (a purge trusts it),
//! so anything that could hide one is a failed item, never a silent skip: a
//! file that cannot be read, a damaged or unopenable hsmseal file, a broken
//! link. An empty selection is an error (an unmounted backup directory must
//! not read as "nothing depends on this key"). Symbolic links under a tree
//! are not followed and are reported as skipped.

use crate::app::App;
use crate::cli::SelectArgs;
use crate::select::walk::{classify, Kind};
use crate::select::{self, Item, Verdict, Want};
use hsmseal::backend::KeyRef;
use hsmseal::deps::{Dependencies, TokenScanner};
use hsmseal::envelope::{file, header};
use hsmseal::error::{count, Error, Result};
use hsmseal::stream::StreamOptions;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What a search found.
pub struct Search {
    pub deps: Dependencies,
    /// Items that could not be searched, with why: the answer may be
    /// incomplete while any remain.
    pub failed: Vec<(String, Error)>,
    /// Items left out, with why (symbolic links under a tree).
    pub skipped: Vec<(String, String)>,
    /// Files searched completely.
    pub searched: u64,
    /// Of those, hsmseal files.
    pub sealed: u64,
}

/// Searches `paths` (files, or directories walked recursively with the
/// `--include`/`--exclude` filters of `sel`) and `sel`'s `-r` directories.
/// `open_sealed`: decrypt hsmseal files to search their payloads (needs the
/// HSM).
pub fn search(app: &App, paths: &[PathBuf], sel: &SelectArgs, open_sealed: bool) -> Result<Search> {
    let mut files = Vec::new();
    let mut trees = sel.clone();
    for p in paths {
        if p.as_os_str() == "-" {
            return Err(Error::usage(
                "dependencies are searched in files and directories, not stdin",
            ));
        }
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => trees.recursive.push(p.clone()),
            _ => files.push(p.clone()),
        }
    }
    let items = select::select(&files, &trees, Want::AnyFile, false)?.items;
    if items.is_empty() {
        let where_ = paths
            .iter()
            .chain(&sel.recursive)
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Error::usage(format!(
            "no files found under {where_}: nothing to search (is it mounted? are the --include/--exclude filters right?)"
        )));
    }
    let opts = StreamOptions {
        threads: app.jobs,
        progress: None,
    };
    let mut out = Search {
        deps: Dependencies::default(),
        failed: Vec::new(),
        skipped: Vec::new(),
        searched: 0,
        sealed: 0,
    };
    for item in &items {
        let path = item.display();
        match &item.verdict {
            Some(Verdict::Fail(e)) => out.failed.push((path, e.clone())),
            Some(Verdict::Skip(why)) => out.skipped.push((path, why.clone())),
            None => match search_file(app, item, open_sealed, &opts, &mut out.deps) {
                Ok(sealed) => {
                    out.searched += 1;
                    out.sealed += u64::from(sealed);
                }
                // The HSM could not be opened (wrong PIN, no token...): the
                // same for every sealed file, so the search stops once.
                Err(e) if app.is_hsm_failure(&e) => return Err(e),
                Err(e) => out.failed.push((path, e)),
            },
        }
    }
    Ok(out)
}

/// Searches one file; true if it is an hsmseal file.
fn search_file(
    app: &App,
    item: &Item,
    open_sealed: bool,
    opts: &StreamOptions,
    deps: &mut Dependencies,
) -> Result<bool> {
    let path = item.display();
    let mut reader = item.input.open()?;
    let mut head = vec![0u8; header::HEADER_LEN];
    let n = file::read_up_to(&mut reader, &mut head)?;
    head.truncate(n);
    if !header::looks_like_hsmseal(&head) {
        // The rule of every -r run (walk::classify): a damaged hsmseal file
        // (first bytes nearly the prefix, an intact envelope, or the suffix)
        // is a failed item, so its key version is never taken as unneeded.
        let name = item.path().unwrap_or(std::path::Path::new(""));
        if let Kind::Damaged(e) = classify(&head, name, select::SUFFIX) {
            return Err(Error::new(
                e.kind(),
                format!("{} (its key version cannot be read)", e.message()),
            ));
        }
        let mut scanner = TokenScanner::new();
        scanner.feed(&head);
        std::io::copy(&mut reader, &mut scanner).map_err(|e| Error::io(format!("reading: {e}")))?;
        deps.add_tokens(&scanner.finish(), &path);
        return Ok(false);
    }
    let mut reader = std::io::Read::chain(std::io::Cursor::new(head), reader);
    let (h, _) = file::read_header(&mut reader)?;
    for k in h.keys() {
        deps.add_file(&k, &path);
    }
    if open_sealed {
        let backend = app.backend()?;
        let mut scanner = TokenScanner::new();
        file::open_payload(&*backend, &h, reader, &mut scanner, opts)?;
        deps.add_tokens(&scanner.finish(), &path);
    }
    Ok(true)
}

/// Why a version is needed, for a purge report: "still needed by 3 files
/// and 1,204 column tokens (e.g. a.hseal)".
pub fn needed_reason(files: u64, tokens: u64, first: &str) -> String {
    let mut what = Vec::new();
    if files > 0 {
        what.push(format!("{files} file{}", if files == 1 { "" } else { "s" }));
    }
    if tokens > 0 {
        what.push(format!(
            "{tokens} column token{}",
            if tokens == 1 { "" } else { "s" }
        ));
    }
    format!(
        "still needed by {} under --check (e.g. {first})",
        what.join(" and ")
    )
}

/// The versions of `name` that `search` found needed, with why.
pub fn needed_versions(search: &Search, name: &str) -> BTreeMap<u32, String> {
    search
        .deps
        .by_key
        .iter()
        .filter(|(k, _)| k.name == name)
        .map(|(k, u)| {
            let first = u.paths.first().map(String::as_str).unwrap_or("?");
            (k.version, needed_reason(u.files, u.tokens, first))
        })
        .collect()
}

/// Refuses a destroy or purge whose `--check` search is incomplete: a file
/// that could not be read might need any version.
pub fn require_complete(search: &Search, what: &str) -> Result<()> {
    for (path, e) in &search.failed {
        eprintln!("hsmseal: error: {path}: {e}");
    }
    match search.failed.first() {
        None => Ok(()),
        Some((path, e)) => Err(Error::new(
            e.kind(),
            format!(
                "refusing to {what}: {} of the files under --check could not be searched (first: {path}), so what they need is unknown; nothing was destroyed — fix or move them, then run again",
                search.failed.len()
            ),
        )),
    }
}

#[derive(Serialize)]
struct DepLine<'a> {
    key: &'a str,
    version: u32,
    files: u64,
    tokens: u64,
    paths: &'a [String],
}

/// `hsmseal inspect --deps`.
pub fn run_inspect(
    app: &App,
    inputs: &[PathBuf],
    sel: &SelectArgs,
    headers_only: bool,
) -> Result<i32> {
    let s = search(app, inputs, sel, !headers_only)?;
    if app.json {
        for (k, u) in &s.deps.by_key {
            let line = DepLine {
                key: &k.name,
                version: k.version,
                files: u.files,
                tokens: u.tokens,
                paths: &u.paths,
            };
            crate::report::emit("dependency", &line);
        }
        for (path, why) in &s.skipped {
            crate::report::emit(
                "item",
                &serde_json::json!({"path": path, "action": "deps", "status": "skipped", "reason": why}),
            );
        }
        for (path, e) in &s.failed {
            crate::report::emit(
                "item",
                &serde_json::json!({"path": path, "action": "deps", "status": "failed",
                    "error": e.message(), "exit_code": e.exit_code()}),
            );
        }
        crate::report::emit(
            "summary",
            &serde_json::json!({
                "action": "deps",
                "items": s.searched + s.failed.len() as u64 + s.skipped.len() as u64,
                "ok": s.searched, "skipped": s.skipped.len(), "failed": s.failed.len(),
                "hsmseal_files": s.sealed, "versions": s.deps.by_key.len(),
                "sealed_payloads_searched": !headers_only,
                "complete": s.failed.is_empty(),
            }),
        );
    } else {
        print_table(&s, headers_only);
    }
    for (path, why) in &s.skipped {
        app.info(format!("hsmseal: skipped {path}: {why}"));
    }
    for (path, e) in &s.failed {
        eprintln!("hsmseal: error: {path}: {e}");
    }
    if s.failed.is_empty() {
        Ok(0)
    } else {
        eprintln!(
            "hsmseal: {} of {} could not be searched: the versions they need are not listed",
            s.failed.len(),
            count(s.searched + s.failed.len() as u64, "file", "files")
        );
        Ok(1)
    }
}

fn print_table(s: &Search, headers_only: bool) {
    let how = if headers_only {
        "headers only; sealed payloads not searched for column tokens"
    } else {
        "sealed payloads decrypted in memory and searched for column tokens"
    };
    crate::outln!(
        "{} searched, {} of them {} ({how})",
        count(s.searched, "file", "files"),
        s.sealed,
        if s.sealed == 1 {
            "an hsmseal file"
        } else {
            "hsmseal files"
        }
    );
    if s.deps.by_key.is_empty() {
        crate::outln!("no key version is needed by these files");
        return;
    }
    crate::outln!(
        "{:<24} {:>7} {:>8} {:>10}  NEEDED BY",
        "KEY",
        "VERSION",
        "FILES",
        "TOKENS"
    );
    for (KeyRef { name, version }, u) in &s.deps.by_key {
        const SHOWN: usize = 3;
        let mut by = u
            .paths
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if u.paths.len() > SHOWN {
            by.push_str(&format!(" and {} more", u.paths.len() - SHOWN));
        }
        crate::outln!(
            "{:<24} {:>7} {:>8} {:>10}  {by}",
            name,
            version,
            u.files,
            u.tokens
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_what_needs_the_version() {
        assert_eq!(
            needed_reason(2, 0, "a.hseal"),
            "still needed by 2 files under --check (e.g. a.hseal)"
        );
        assert_eq!(
            needed_reason(1, 1, "d.csv.hseal"),
            "still needed by 1 file and 1 column token under --check (e.g. d.csv.hseal)"
        );
    }
}
