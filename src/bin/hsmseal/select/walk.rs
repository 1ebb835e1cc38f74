//! `-r DIR`: what is under a directory, in a stable order.
//!
//! Symbolic links are not followed (a link could lead outside the tree or
//! into a loop): they are reported, a broken one as a failure. hsmseal's own
//! temporary files are skipped. A subdirectory that cannot be read is
//! reported and the walk goes on. `classify` says whether a file is an
//! hsmseal file, a damaged one, or some other file.

use crate::select::glob::Filter;
use hsmseal::error::{Error, Result};
use hsmseal::fs::TEMP_MARKER;
use std::path::{Path, PathBuf};

/// What the walk found at a path.
#[derive(Debug)]
pub enum Found {
    File {
        len: u64,
    },
    /// A symbolic link (not followed); `broken` if its target does not exist.
    Symlink {
        broken: bool,
    },
    /// A FIFO, socket or device.
    Special,
    /// A directory that could not be read.
    Unreadable(Error),
}

#[derive(Debug)]
pub struct Entry {
    pub path: PathBuf,
    /// Relative to the walked root.
    pub rel: PathBuf,
    pub found: Found,
}

/// Everything under `root` that `filter` takes, sorted by path.
/// Directories themselves are not entries; `filter` is applied to the path
/// relative to `root`.
///
/// The walk is `walkdir`'s: links not followed (the root itself must be a
/// real directory, checked here), siblings read sorted by name so that the
/// depth-first order is the order of the paths, a directory that cannot be
/// read an entry of its own while the walk goes on.
pub fn entries_under(root: &Path, filter: &Filter) -> Result<Vec<Entry>> {
    let meta = std::fs::symlink_metadata(root)
        .map_err(|e| Error::io_at("cannot read directory", root.display(), &e))?;
    if !meta.is_dir() {
        return Err(Error::usage(format!(
            "{} is not a directory (-r takes a directory)",
            root.display()
        )));
    }
    let walk = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        // Skips a temp file, and a directory's whole subtree (as before).
        .filter_entry(|e| e.depth() == 0 || !is_temp(e.file_name()));
    let mut out = Vec::new();
    for next in walk {
        let entry = match next {
            Ok(entry) => entry,
            Err(e) => {
                let path = e.path().unwrap_or(root).to_path_buf();
                let depth = e.depth();
                // Links are not followed, so every error is an I/O one
                // (walkdir's only other kind is a link loop).
                let text = e.to_string();
                let io = e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other(text));
                if depth == 0 {
                    return Err(Error::io_at("cannot read directory", path.display(), &io));
                }
                // Removed since its directory was listed (an --in-place
                // run beside this one): nothing to do.
                if io.kind() == std::io::ErrorKind::NotFound {
                    continue;
                }
                out.push(Entry {
                    rel: rel_of(root, &path),
                    found: Found::Unreadable(Error::io(format!("cannot read directory: {io}"))),
                    path,
                });
                continue;
            }
        };
        let ft = entry.file_type();
        if ft.is_dir() {
            continue;
        }
        let rel = rel_of(root, entry.path());
        if !filter.takes(&rel) {
            continue;
        }
        let found = if ft.is_file() {
            match entry.metadata() {
                Ok(m) => Found::File { len: m.len() },
                // Vanished since the listing: nothing to do.
                Err(_) => continue,
            }
        } else if ft.is_symlink() {
            Found::Symlink {
                broken: std::fs::metadata(entry.path()).is_err(),
            }
        } else {
            Found::Special
        };
        out.push(Entry {
            path: entry.into_path(),
            rel,
            found,
        });
    }
    Ok(out)
}

fn rel_of(root: &Path, p: &Path) -> PathBuf {
    p.strip_prefix(root).unwrap_or(p).to_path_buf()
}

/// hsmseal's own temporary files (`fs::AtomicFile`), never inputs.
fn is_temp(name: &std::ffi::OsStr) -> bool {
    name.to_string_lossy().contains(TEMP_MARKER)
}

/// The first `header::SNIFF_LEN` bytes of a file (fewer if it is shorter);
/// an error if it cannot be opened or read (so the caller can report it
/// rather than pass it over).
pub fn sniff(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let mut head = vec![0u8; hsmseal::envelope::header::SNIFF_LEN];
    let got = hsmseal::stream::read_full(&mut f, &mut head)?;
    head.truncate(got);
    Ok(head)
}

/// What a file is to the commands that take hsmseal files.
#[derive(Debug)]
pub enum Kind {
    /// Starts with the hsmseal magic (its header may still be damaged:
    /// reading it says how).
    Sealed,
    /// Does not start with the magic but looks like a damaged hsmseal file:
    /// the error to report it with.
    Damaged(Error),
    /// Anything else.
    Other,
}

/// The rule (README "Selection", SECURITY.md "Trees"): a file is an hsmseal
/// file if it starts with the magic; a damaged one if its first bytes are
/// nearly the hsmseal prefix or hold an intact key envelope
/// (`header::damage_evidence`, exit 3), or if its name ends with `suffix`
/// (exit 8); otherwise it is some other file.
pub fn classify(head: &[u8], name: &Path, suffix: &str) -> Kind {
    use hsmseal::envelope::header;
    if header::looks_like_hsmseal(head) {
        return Kind::Sealed;
    }
    if let Some(why) = header::damage_evidence(head) {
        return Kind::Damaged(Error::integrity(format!(
            "{why}; restore it from a copy, or rewrite its first 64 bytes with the prefix in docs/FORMAT.md section 3.1"
        )));
    }
    let named = name
        .file_name()
        .is_some_and(|n| !suffix.is_empty() && n.to_string_lossy().ends_with(suffix));
    if named {
        return Kind::Damaged(Error::format(if head.is_empty() {
            format!("an empty file named *{suffix}: an hsmseal file is at least 1096 bytes; restore it from a copy, or rename or --exclude it if it is not an hsmseal file")
        } else {
            format!("named *{suffix} but not an hsmseal file (bad magic bytes): damaged, or not written by hsmseal; restore it from a copy, or rename or --exclude it")
        }));
    }
    Kind::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_sorted_reports_links_and_filters() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::write(r.join("a/b/x.sql"), b"1").unwrap();
        std::fs::write(r.join("a/y.tmp"), b"22").unwrap();
        std::fs::write(r.join("z"), b"").unwrap();
        std::fs::write(r.join(format!(".z{TEMP_MARKER}1")), b"").unwrap();
        std::os::unix::fs::symlink(r.join("nowhere"), r.join("dangling")).unwrap();
        std::os::unix::fs::symlink(r.join("z"), r.join("link")).unwrap();
        let all = entries_under(r, &Filter::default()).unwrap();
        let rels: Vec<String> = all
            .iter()
            .map(|e| e.rel.to_string_lossy().into_owned())
            .collect();
        assert_eq!(rels, ["a/b/x.sql", "a/y.tmp", "dangling", "link", "z"]);
        assert!(matches!(all[0].found, Found::File { len: 1 }));
        assert!(matches!(all[2].found, Found::Symlink { broken: true }));
        assert!(matches!(all[3].found, Found::Symlink { broken: false }));
        let f = Filter::new(&[], &["*.tmp".into(), "dangling".into()]).unwrap();
        let rels: Vec<PathBuf> = entries_under(r, &f)
            .unwrap()
            .into_iter()
            .map(|e| e.rel)
            .collect();
        assert_eq!(
            rels,
            [
                PathBuf::from("a/b/x.sql"),
                PathBuf::from("link"),
                PathBuf::from("z")
            ]
        );
        assert!(entries_under(&r.join("z"), &Filter::default()).is_err());
    }
}
