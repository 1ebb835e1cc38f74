//! `-r DIR`: the regular files under a directory, in a stable order.
//!
//! Symbolic links are not followed (a link could lead outside the tree or
//! into a loop); hsmseal's own temporary files are skipped.

use crate::error::{Error, Result};
use crate::output::TEMP_MARKER;
use std::path::{Path, PathBuf};

/// Every regular file under `root`, sorted by path.
pub fn files_under(root: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::symlink_metadata(root)
        .map_err(|e| Error::io_at("cannot read directory", root.display(), &e))?;
    if !meta.is_dir() {
        return Err(Error::usage(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| Error::io_at("cannot read directory", dir.display(), &e))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::io_at("cannot read directory", dir.display(), &e))?;
            let ft = entry
                .file_type()
                .map_err(|e| Error::io_at("cannot stat", entry.path().display(), &e))?;
            if entry.file_name().to_string_lossy().contains(TEMP_MARKER) {
                continue;
            }
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The first bytes of a file, to tell hsmseal files from others.
pub fn starts_with_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map(|_| crate::envelope::header::looks_like_hsmseal(&head))
        .unwrap_or(false)
}
