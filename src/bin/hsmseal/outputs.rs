//! Where each item's output goes and how it is written, for encrypt and
//! decrypt: the plan (`-o`, `--output-dir`, next to the input), the checks
//! right before an item's work, the atomic write, and `--in-place`.
//!
//! Invariants: an output path is resolved per item right before its work
//! (`prepare`): only a regular file is ever replaced (with `--force`), a
//! FIFO or character device is written into, a link to stdout is stdout
//! (`fs::resolve_output`). `--in-place` removes an original only under the original's exclusive
//! lock, after comparing it (read through that locked descriptor) with the
//! new file, which must still be the one this run wrote.

use crate::app::App;
use crate::cli::OutputArgs;
use crate::input::{read_header_locked, Input};
use crate::report::ItemReport;
use crate::select::Item;
use hsmseal::backend::KeyBackend;
use hsmseal::error::{Error, Result};
use hsmseal::fs::{same_file, AtomicFile, FileId, LockedFile, Sink};
use std::fs::File;
use std::io::{self, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

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
                // `-o /dev/stdout` is stdout itself (whatever it is), so
                // --json lines keep out of the data.
                (Some(o), _) if hsmseal::fs::names_stdout(o) => Output::Stdout,
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

/// The common end of an encrypt or decrypt item: write `sink` (the
/// resolved `output`) through `f` (atomically for a file: 0644 ciphertext,
/// 0600 plaintext), replace the original for `--in-place`, and report the
/// item.
#[allow(clippy::too_many_arguments)]
pub fn write_item(
    app: &App,
    backend: &dyn KeyBackend,
    dir: Direction,
    io: &OutputArgs,
    input: &Input,
    output: &Output,
    sink: &Sink,
    f: impl FnOnce(&mut dyn Write) -> Result<hsmseal::envelope::file::FileReport>,
) -> Result<ItemReport> {
    let (action, verb, mode) = match dir {
        Direction::Seal => ("encrypt", "encrypted", 0o644),
        // Decrypted data is for the owner only.
        Direction::Open => ("decrypt", "decrypted", 0o600),
    };
    make_parent(output)?;
    let (report, written) = write_output(sink, mode, io.force, f)?;
    if let (true, Input::File(orig), Sink::File(new), Some(id)) =
        (io.in_place, input, sink, written)
    {
        replace_original(backend, dir, orig, new, id)?;
    }
    // The human line ("encrypted A -> B (key v2)"); none with --json or
    // when the data went to stdout.
    let note = (!app.json && *sink != Sink::Stdout).then(|| {
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

/// `--in-place`: `new` (the file `new_id`) has been written and fsynced.
/// Under the original's exclusive lock (so no rotation, `--reencrypt` or
/// other replacement of it runs meanwhile), check that `new` is still the
/// file this run wrote and holds exactly the bytes of the original (the
/// sealed side decrypted and compared with the plain side), and only then
/// remove the original and fsync its directory. If the check fails, the new
/// file is removed (if it is still ours) and the original kept. Killed in
/// between, both files exist.
fn replace_original(
    backend: &dyn KeyBackend,
    dir: Direction,
    original: &Path,
    new: &Path,
    new_id: FileId,
) -> Result<()> {
    let orig = LockedFile::open(original, false)?;
    let checked = (|| {
        let newf = File::open(new).map_err(|e| Error::io_at("cannot open", new.display(), &e))?;
        let now = newf
            .metadata()
            .map_err(|e| Error::io_at("cannot stat", new.display(), &e))?;
        if FileId::of(&now) != new_id {
            return Err(Error::io(format!(
                "{} was replaced by another process before it could be checked",
                new.display()
            )));
        }
        match dir {
            // The new file is sealed and may be under rotation by another
            // process already: its header is read under a shared lock.
            Direction::Seal => sealed_matches(backend, &newf, new, true, orig.file(), original),
            // The original is sealed and locked by this process.
            Direction::Open => sealed_matches(backend, orig.file(), original, false, &newf, new),
        }
    })();
    if let Err(e) = checked {
        // The original's lock is let go first: a process holding the new
        // file's lock may be waiting for it (two opposite --in-place runs),
        // and nothing is removed from the original's side.
        drop(orig);
        let removed = remove_if_ours(new, new_id);
        return Err(Error::new(
            e.kind(),
            format!(
                "{} did not check out against the original, {} and kept the original: {}",
                new.display(),
                if removed { "removed it" } else { "left it" },
                e.message()
            ),
        ));
    }
    std::fs::remove_file(original)
        .map_err(|e| Error::io_at("cannot remove the original", original.display(), &e))?;
    drop(orig);
    hsmseal::fs::sync_dir(&hsmseal::fs::parent_dir(original))
}

/// Removes `p` if it is still the file `id` (under its lock); false if it
/// was left alone.
fn remove_if_ours(p: &Path, id: FileId) -> bool {
    match LockedFile::open(p, false) {
        Ok(l) if l.id() == id => std::fs::remove_file(p).is_ok(),
        _ => false,
    }
}

/// Decrypts `sealed` (the file at `sealed_path`; its header read under a
/// shared lock if `lock_header`) and compares the plaintext with `plain`.
/// Both are read from the start through the given descriptors.
fn sealed_matches(
    backend: &dyn KeyBackend,
    sealed: &File,
    sealed_path: &Path,
    lock_header: bool,
    plain: &File,
    plain_path: &Path,
) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let rewind = |mut f: &File, p: &Path| {
        f.seek(SeekFrom::Start(0))
            .map(|_| ())
            .map_err(|e| Error::io_at("reading", p.display(), &e))
    };
    rewind(sealed, sealed_path)?;
    rewind(plain, plain_path)?;
    let header = if lock_header {
        read_header_locked(sealed, sealed_path)?
    } else {
        hsmseal::envelope::file::read_header(&mut &*sealed)?.0
    };
    let reader = BufReader::with_capacity(hsmseal::fs::IO_BUF, sealed);
    hsmseal::fs::advise_sequential(sealed);
    hsmseal::fs::advise_sequential(plain);
    let mut cmp = Compare {
        other: BufReader::with_capacity(hsmseal::fs::IO_BUF, plain),
        theirs: Vec::new(),
        differs: false,
    };
    let opts = hsmseal::stream::StreamOptions {
        threads: 1,
        progress: None,
    };
    let r = hsmseal::envelope::file::open_payload(backend, &header, reader, &mut cmp, &opts);
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
        Err(e) => Err(Error::io_at("reading", plain_path.display(), &e)),
    }
}

/// A writer that compares what it is given with another file's bytes.
struct Compare<R: Read> {
    other: R,
    /// The other file's bytes for the current write, reused: writes come
    /// a batch (~1 MiB) at a time, and a fresh buffer each time would be a
    /// fresh mapping, faulted in page by page.
    theirs: Vec<u8>,
    differs: bool,
}

impl<R: Read> Write for Compare<R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.theirs.resize(buf.len(), 0);
        let got = hsmseal::stream::read_full(&mut self.other, &mut self.theirs)?;
        if got != buf.len() || self.theirs != buf {
            self.differs = true;
            return Err(io::Error::other("differs from the original"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Checks an (input, output) pair right before the item's work and decides
/// what writing the output means: the output must not be the input; an
/// existing regular file needs `--force`; a FIFO or character device is
/// written into; a symbolic link is resolved (`fs::resolve_output`).
/// `--in-place` needs a regular input (not a link) and a regular output.
pub fn prepare(input: &Input, output: &Output, io: &OutputArgs) -> Result<Sink> {
    let sink = match output {
        Output::Stdout => Sink::Stdout,
        Output::File(o) => {
            if let Input::File(i) = input {
                if same_file(i, o) || i == o {
                    return Err(Error::usage(format!(
                        "output {} is the input; refusing to overwrite it",
                        o.display()
                    )));
                }
            }
            hsmseal::fs::resolve_output(o, io.force)?
        }
    };
    if io.in_place {
        if let Input::File(i) = input {
            if matches!(std::fs::symlink_metadata(i), Ok(m) if m.file_type().is_symlink()) {
                return Err(Error::usage(
                    "--in-place on a symbolic link would remove the link and keep its target: name the target instead",
                ));
            }
        }
        if !matches!(sink, Sink::File(_)) {
            return Err(Error::usage(format!(
                "--in-place replaces the input by a regular file, and {} is not one",
                output.display()
            )));
        }
    }
    Ok(sink)
}

/// Refuses to print binary ciphertext on a terminal.
pub fn check_binary_stdout(sink: &Sink) -> Result<()> {
    if *sink == Sink::Stdout && io::stdout().is_terminal() {
        return Err(Error::usage(
            "refusing to write binary output to a terminal; use -o FILE or redirect stdout",
        ));
    }
    Ok(())
}

/// Writes through `f` to the output: atomically for a file (nothing under
/// the final name unless `f` succeeds; returns the new file's identity),
/// straight through for stdout, a FIFO or a device (where a failure after
/// some output leaves that output, as on stdout: only authenticated
/// plaintext is ever written, and the exit code says it failed).
pub fn write_output<T>(
    sink: &Sink,
    mode: u32,
    force: bool,
    f: impl FnOnce(&mut dyn Write) -> Result<T>,
) -> Result<(T, Option<FileId>)> {
    match sink {
        Sink::Stdout => {
            let stdout = io::stdout();
            let mut lock = io::BufWriter::with_capacity(
                hsmseal::fs::IO_BUF,
                crate::report::PipeAware(stdout.lock()),
            );
            let r = f(&mut lock)?;
            lock.flush()
                .map_err(|e| Error::io(format!("writing stdout: {e}")))?;
            Ok((r, None))
        }
        Sink::Stream(p) => {
            let file = hsmseal::fs::open_stream(p)?;
            let mut w = io::BufWriter::with_capacity(hsmseal::fs::IO_BUF, file);
            let r = f(&mut w)?;
            w.flush()
                .map_err(|e| Error::io_at("writing", p.display(), &e))?;
            Ok((r, None))
        }
        Sink::File(p) => {
            let mut file = AtomicFile::create(p, mode, force)?;
            let r = f(&mut file)?;
            let id = file.commit()?;
            Ok((r, Some(id)))
        }
    }
}
