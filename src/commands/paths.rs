//! Inputs and outputs shared by the file commands, and the per-item report.

use super::bulk::Item;
use crate::app::App;
use crate::cli::OutputArgs;
use crate::error::{Error, Result};
use crate::keys::KeyBackend;
use crate::output::{same_file, AtomicFile};
use serde::Serialize;
use std::fs::File;
use std::io::{self, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

/// Where bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Stdin,
    File(PathBuf),
}

impl Input {
    pub fn from_arg(p: &Path) -> Input {
        if p == Path::new("-") {
            Input::Stdin
        } else {
            Input::File(p.to_path_buf())
        }
    }

    pub fn display(&self) -> String {
        match self {
            Input::Stdin => "<stdin>".into(),
            Input::File(p) => p.display().to_string(),
        }
    }

    /// Opens for reading. Directories and missing files are clear I/O errors.
    pub fn open(&self) -> Result<Box<dyn Read + Send>> {
        match self {
            Input::Stdin => Ok(Box::new(io::stdin())),
            Input::File(p) => {
                let f = File::open(p).map_err(|e| Error::io(format!("cannot open: {e}")))?;
                let meta = f
                    .metadata()
                    .map_err(|e| Error::io(format!("cannot stat: {e}")))?;
                if meta.is_dir() {
                    return Err(Error::usage("is a directory"));
                }
                Ok(Box::new(BufReader::with_capacity(crate::output::IO_BUF, f)))
            }
        }
    }
}

/// Where bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout,
    File(PathBuf),
}

impl Output {
    pub fn from_arg(p: &Path) -> Output {
        if p == Path::new("-") {
            Output::Stdout
        } else {
            Output::File(p.to_path_buf())
        }
    }

    pub fn display(&self) -> String {
        match self {
            Output::Stdout => "<stdout>".into(),
            Output::File(p) => p.display().to_string(),
        }
    }
}

/// Where each item's output goes, decided before any work so that two
/// items never write the same file: `-o` if given (a single input), stdout
/// for stdin, `--output-dir DIR` joined with `derive(item's relative path)`,
/// else `derive(input path)` next to the input (also for `--in-place`).
pub fn plan_outputs(
    args: &OutputArgs,
    items: &[Item],
    derive: impl Fn(&Path) -> Result<PathBuf>,
) -> Result<Vec<Result<Output>>> {
    if args.output.is_some() && items.len() > 1 {
        return Err(Error::usage(
            "-o takes a single input; with several, use --output-dir DIR or let each output go next to its input",
        ));
    }
    let mut seen: std::collections::HashMap<PathBuf, String> = Default::default();
    Ok(items
        .iter()
        .map(|item| {
            let out = match (&args.output, &item.input) {
                (Some(o), _) => Output::from_arg(o),
                (None, Input::Stdin) => Output::Stdout,
                (None, Input::File(p)) => match &args.output_dir {
                    Some(dir) => Output::File(dir.join(derive(&item.rel)?)),
                    None => Output::File(derive(p)?),
                },
            };
            if let Output::File(p) = &out {
                if let Some(first) = seen.insert(p.clone(), item.display()) {
                    return Err(Error::usage(format!(
                        "{} would also be the output of {first}; rename one of them",
                        p.display()
                    )));
                }
            }
            Ok(out)
        })
        .collect())
}

/// Creates the directories an `--output-dir` output needs.
fn make_parent(output: &Output) -> Result<()> {
    if let Output::File(p) = output {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io_at("cannot create directory", dir.display(), &e))?;
        }
    }
    Ok(())
}

/// Which way an encrypt or decrypt item goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Seal,
    Open,
}

/// The common end of an encrypt or decrypt item: write `output` through
/// `f` (atomically for a file: 0644 ciphertext, 0600 plaintext), replace
/// the original for `--in-place`, and report the item.
pub fn write_item(
    app: &App,
    backend: &dyn KeyBackend,
    dir: Direction,
    io: &OutputArgs,
    input: &Input,
    output: &Output,
    f: impl FnOnce(&mut dyn Write) -> Result<crate::envelope::file::FileReport>,
) -> Result<ItemReport> {
    let (action, verb, mode) = match dir {
        Direction::Seal => ("encrypt", "encrypted", 0o644),
        // Decrypted data is for the owner only.
        Direction::Open => ("decrypt", "decrypted", 0o600),
    };
    make_parent(output)?;
    let report = write_output(output, mode, io.force, f)?;
    if let (true, Input::File(orig), Output::File(new)) = (io.in_place, input, output) {
        let (sealed, plain) = match dir {
            Direction::Seal => (new, orig),
            Direction::Open => (orig, new),
        };
        replace_original(backend, orig, new, sealed, plain)?;
    }
    // The human line ("encrypted A -> B (key v2)"); none with --json or
    // when the data went to stdout.
    let note = (!app.json && *output != Output::Stdout).then(|| {
        let removed = if io.in_place {
            ", original removed"
        } else {
            ""
        };
        format!(
            "{verb} {} -> {} ({}){removed}",
            input.display(),
            output.display(),
            report.kwk
        )
    });
    Ok(ItemReport {
        path: input.display(),
        output: Some(output.display()),
        action,
        key: Some(report.kwk.name),
        version: Some(report.kwk.version),
        bytes: Some(report.plaintext_bytes),
        status: "ok",
        note,
        ..Default::default()
    })
}

/// `--in-place`: `new` has been written and fsynced; read it back, check
/// that it holds exactly the bytes of `original` (for encrypt, `sealed` is
/// the new file; for decrypt, the original), and only then remove the
/// original and fsync its directory. If the check fails, the new file is
/// removed and the original kept. Killed in between, both files exist.
fn replace_original(
    backend: &dyn KeyBackend,
    original: &Path,
    new: &Path,
    sealed: &Path,
    plain: &Path,
) -> Result<()> {
    if let Err(e) = sealed_matches(backend, sealed, plain) {
        let _ = std::fs::remove_file(new);
        return Err(Error::new(
            e.kind(),
            format!(
                "{} did not check out against the original, removed it and kept the original: {}",
                new.display(),
                e.message()
            ),
        ));
    }
    std::fs::remove_file(original)
        .map_err(|e| Error::io_at("cannot remove the original", original.display(), &e))?;
    crate::output::sync_dir(&crate::output::parent_dir(original))
}

/// Decrypts `sealed` and compares the plaintext with the file `plain`.
fn sealed_matches(backend: &dyn KeyBackend, sealed: &Path, plain: &Path) -> Result<()> {
    let open = |p: &Path| {
        File::open(p)
            .map(|f| BufReader::with_capacity(crate::output::IO_BUF, f))
            .map_err(|e| Error::io_at("cannot open", p.display(), &e))
    };
    let mut reader = open(sealed)?;
    let (header, _) = crate::envelope::file::read_header(&mut reader)?;
    let mut cmp = Compare {
        other: open(plain)?,
        differs: false,
    };
    let opts = crate::stream::StreamOptions {
        threads: 1,
        progress: None,
    };
    let r = crate::envelope::file::open_payload(backend, &header, reader, &mut cmp, &opts);
    if cmp.differs {
        return Err(Error::integrity(
            "the ciphertext does not decrypt to the original",
        ));
    }
    r?;
    let mut rest = [0u8; 1];
    match cmp.other.read(&mut rest) {
        Ok(0) => Ok(()),
        Ok(_) => Err(Error::integrity(
            "the ciphertext holds less than the original",
        )),
        Err(e) => Err(Error::io_at("reading", plain.display(), &e)),
    }
}

/// A writer that compares what it is given with another file's bytes.
struct Compare<R: Read> {
    other: R,
    differs: bool,
}

impl<R: Read> Write for Compare<R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut theirs = vec![0u8; buf.len()];
        let got = crate::stream::read_full(&mut self.other, &mut theirs)?;
        if got != buf.len() || theirs != buf {
            self.differs = true;
            return Err(io::Error::other("differs from the original"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Checks an (input, output) pair before any work: the output must not be
/// the input, and an existing output needs `--force`.
pub fn check_pair(input: &Input, output: &Output, force: bool) -> Result<()> {
    if let (Input::File(i), Output::File(o)) = (input, output) {
        if same_file(i, o) || i == o {
            return Err(Error::usage(format!(
                "output {} is the input; refusing to overwrite it",
                o.display()
            )));
        }
        if !force && o.symlink_metadata().is_ok() {
            return Err(Error::usage(format!(
                "{} already exists; pass --force to overwrite it",
                o.display()
            )));
        }
    }
    Ok(())
}

/// Refuses to print binary ciphertext on a terminal.
pub fn check_binary_stdout(output: &Output) -> Result<()> {
    if *output == Output::Stdout && io::stdout().is_terminal() {
        return Err(Error::usage(
            "refusing to write binary output to a terminal; use -o FILE or redirect stdout",
        ));
    }
    Ok(())
}

/// Writes through `f` to the output: atomically for a file (nothing under
/// the final name unless `f` succeeds), straight through for stdout.
pub fn write_output<T>(
    output: &Output,
    mode: u32,
    force: bool,
    f: impl FnOnce(&mut dyn Write) -> Result<T>,
) -> Result<T> {
    match output {
        Output::Stdout => {
            let stdout = io::stdout();
            let mut lock = io::BufWriter::with_capacity(
                crate::output::IO_BUF,
                crate::signals::PipeAware(stdout.lock()),
            );
            let r = f(&mut lock)?;
            lock.flush()
                .map_err(|e| Error::io(format!("writing stdout: {e}")))?;
            Ok(r)
        }
        Output::File(p) => {
            let mut file = AtomicFile::create(p, mode, force)?;
            let r = f(&mut file)?;
            file.commit()?;
            Ok(r)
        }
    }
}

/// One line of `--json` output per item.
#[derive(Serialize, Debug, Default)]
pub struct ItemReport {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why an item was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Informational line for stderr (unless --quiet), printed in input order.
    #[serde(skip)]
    pub note: Option<String>,
    /// Human-readable result for stdout (without --json), printed in input order.
    #[serde(skip)]
    pub text: Option<String>,
    /// Replaces the serialised report as the item's --json line.
    #[serde(skip)]
    pub json_line: Option<String>,
}
