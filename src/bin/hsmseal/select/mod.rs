//! The bulk selection: which items a command takes. Inputs named on the
//! command line are always taken; under `-r DIR`, files are found by the
//! walk (`walk`: links not followed, a stable order) and filtered by
//! `--include`/`--exclude` (`glob`); commands that read hsmseal files take
//! only those, and a file that looks like a damaged one is a failed item,
//! never passed over. An `-r` directory that yields nothing to process is
//! an error unless `--allow-empty` (issue 9).

pub mod glob;
#[cfg(test)]
mod tests;
pub mod walk;

use crate::cli::SelectArgs;
use crate::input::Input;
use glob::Filter;
use hsmseal::error::{Error, Result};
use std::path::PathBuf;
use walk::{Found, Kind};

/// Default suffix of encrypted files.
pub const SUFFIX: &str = ".hseal";

/// Checks `--suffix`: not empty, and a name ending, not a path.
pub fn check_suffix(sel: &SelectArgs) -> Result<()> {
    if sel.suffix.is_empty() || sel.suffix.contains('/') {
        return Err(Error::usage(format!(
            "--suffix {:?}: give a non-empty file name ending such as .hseal",
            sel.suffix
        )));
    }
    Ok(())
}

/// One unit of work of a bulk run.
#[derive(Debug)]
pub struct Item {
    pub input: Input,
    /// Where an `--output-dir` output goes below the directory: the path
    /// relative to the `-r` directory the file was found under, or the file
    /// name of an input named on the command line.
    pub rel: PathBuf,
    /// Size in bytes, if known (for the progress bar's total).
    pub len: Option<u64>,
    /// Decided while selecting: reported without running the command.
    pub verdict: Option<Verdict>,
}

#[derive(Debug)]
pub enum Verdict {
    Skip(String),
    Fail(Error),
}

impl Item {
    pub fn display(&self) -> String {
        self.input.display()
    }

    /// The path of a file input (every item but stdin).
    pub fn path(&self) -> Option<&std::path::Path> {
        match &self.input {
            Input::File(p) => Some(p),
            Input::Stdin => None,
        }
    }
}

/// Which files under `-r` a command takes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Want {
    /// Every regular file (encrypt: hsmseal files are then skipped and
    /// reported, damaged ones failed).
    AnyFile,
    /// hsmseal files, and files that look like damaged ones (reported as
    /// failed, see `walk::classify`); other files are not items.
    Sealed,
}

/// The items of a run, and how many files under `-r` were not items
/// (`Want::Sealed`: not hsmseal files).
pub struct Selection {
    pub items: Vec<Item>,
    pub other_files: u64,
}

/// The items of a run: the named inputs (none: stdin, if `stdin_ok`), then
/// each `-r` directory's files in path order. Filters apply to files found
/// under `-r` only; a file named on the command line is always taken.
/// An `-r` directory that yields nothing to process (no item, or only
/// skipped ones) is an error unless `--allow-empty`: an empty or unmounted
/// directory must not look like a clean run (issue 9).
pub fn select(
    inputs: &[PathBuf],
    sel: &SelectArgs,
    want: Want,
    stdin_ok: bool,
) -> Result<Selection> {
    let filter = Filter::new(&sel.include, &sel.exclude)?;
    if sel.recursive.is_empty() && (!sel.include.is_empty() || !sel.exclude.is_empty()) {
        return Err(Error::usage(
            "--include and --exclude select files under -r DIR; name a directory with -r",
        ));
    }
    let mut items = Vec::new();
    let named: Vec<Input> = if inputs.is_empty() && sel.recursive.is_empty() && stdin_ok {
        vec![Input::Stdin]
    } else {
        inputs.iter().map(|p| Input::from_arg(p)).collect()
    };
    if named.contains(&Input::Stdin) && (named.len() > 1 || !sel.recursive.is_empty()) {
        return Err(Error::usage(
            "stdin (-) can only be used as the single input",
        ));
    }
    for input in named {
        let (rel, len) = match &input {
            Input::File(p) => (
                p.file_name()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| p.clone()),
                std::fs::metadata(p).ok().map(|m| m.len()),
            ),
            Input::Stdin => (PathBuf::new(), None),
        };
        items.push(Item {
            input,
            rel,
            len,
            verdict: None,
        });
    }
    let mut other_files = 0;
    for root in &sel.recursive {
        let (mut to_do, mut others) = (0u64, 0u64);
        for e in walk::entries_under(root, &filter)? {
            let (len, verdict) = match e.found {
                Found::File { len } => {
                    let verdict = if want == Want::Sealed {
                        // Unreadable files stay in, to be reported.
                        match walk::sniff(&e.path) {
                            Ok(head) => match walk::classify(&head, &e.path, &sel.suffix) {
                                Kind::Sealed => None,
                                Kind::Damaged(err) => Some(Verdict::Fail(err)),
                                Kind::Other => {
                                    others += 1;
                                    continue;
                                }
                            },
                            // Removed since the listing (an --in-place run
                            // beside this one): nothing to do, as in the walk.
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                            Err(_) => None,
                        }
                    } else {
                        None
                    };
                    (Some(len), verdict)
                }
                Found::Symlink { broken: true } => (
                    None,
                    Some(Verdict::Fail(Error::io(
                        "broken symbolic link (links under -r are not followed)",
                    ))),
                ),
                Found::Symlink { broken: false } => (
                    None,
                    Some(Verdict::Skip(
                        "symbolic link, not followed under -r (name its target to include it)"
                            .into(),
                    )),
                ),
                Found::Special => (None, Some(Verdict::Skip("not a regular file".into()))),
                Found::Unreadable(err) => (None, Some(Verdict::Fail(err))),
            };
            if !matches!(verdict, Some(Verdict::Skip(_))) {
                to_do += 1;
            }
            items.push(Item {
                input: Input::File(e.path),
                rel: e.rel,
                len,
                verdict,
            });
        }
        if to_do == 0 && !sel.allow_empty {
            let what = match want {
                Want::AnyFile => "no files found".to_string(),
                Want::Sealed if others > 0 => format!(
                    "no hsmseal files (only {others} other file{})",
                    if others == 1 { "" } else { "s" }
                ),
                Want::Sealed => "no hsmseal files".to_string(),
            };
            return Err(Error::usage(format!(
                "-r {}: {what}; an empty or unmounted directory must not pass for a clean run: check the path (and --include/--exclude), or pass --allow-empty if nothing there is expected",
                root.display()
            )));
        }
        other_files += others;
    }
    Ok(Selection { items, other_files })
}
