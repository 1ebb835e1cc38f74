//! Inputs, outputs and the per-item loop shared by the file commands.
//!
//! A bulk run reports each failed item on stderr, goes on with the rest, and
//! exits 1; a run with a single item exits with that item's own error code.

use crate::app::App;
use crate::cli::OutputArgs;
use crate::error::{Error, Result};
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

    /// The inputs named on the command line; none means stdin.
    pub fn list(args: &[PathBuf]) -> Result<Vec<Input>> {
        let inputs: Vec<Input> = if args.is_empty() {
            vec![Input::Stdin]
        } else {
            args.iter().map(|p| Input::from_arg(p)).collect()
        };
        if inputs.len() > 1 && inputs.contains(&Input::Stdin) {
            return Err(Error::usage(
                "stdin (-) can only be used as the single input",
            ));
        }
        Ok(inputs)
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

/// The inputs of an encrypt or decrypt run. `-o` names one output, so it
/// takes one input; `several` says where several inputs' outputs go instead.
pub fn inputs_of(args: &OutputArgs, several: &str) -> Result<Vec<Input>> {
    let inputs = Input::list(&args.inputs)?;
    if args.output.is_some() && inputs.len() > 1 {
        return Err(Error::usage(format!("-o takes a single input; {several}")));
    }
    Ok(inputs)
}

/// Where `input`'s output goes: `-o` if given, stdout for stdin, else the
/// file name `derive` makes from the input's.
pub fn output_of(
    args: &OutputArgs,
    input: &Input,
    derive: impl FnOnce(&Path) -> Result<PathBuf>,
) -> Result<Output> {
    Ok(match (&args.output, input) {
        (Some(o), _) => Output::from_arg(o),
        (None, Input::Stdin) => Output::Stdout,
        (None, Input::File(p)) => Output::File(derive(p)?),
    })
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
            let mut lock = io::BufWriter::with_capacity(crate::output::IO_BUF, stdout.lock());
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
}

/// Runs `work` for each item, reporting failures and going on. `work`
/// returns the item's `--json` report, or None if it printed its own.
/// Returns the exit code: 0, the single item's error code, or 1.
pub fn for_each_item<T>(
    app: &App,
    items: &[T],
    name: impl Fn(&T) -> String,
    mut work: impl FnMut(&T) -> Result<Option<ItemReport>>,
) -> Result<i32> {
    let mut failed: Vec<Error> = Vec::new();
    for item in items {
        match work(item) {
            Ok(report) => {
                if let Some(r) = &report {
                    app.stats.record(r);
                }
                // None: the command printed its own report.
                if let (true, Some(report)) = (app.json, report) {
                    println!("{}", serde_json::to_string(&report).expect("serialisable"));
                }
            }
            Err(e) => {
                let e = e.context(name(item));
                app.stats
                    .failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if app.json {
                    let report = ItemReport {
                        path: name(item),
                        action: "error",
                        status: "failed",
                        error: Some(e.message().to_string()),
                        exit_code: Some(e.exit_code()),
                        ..Default::default()
                    };
                    println!("{}", serde_json::to_string(&report).expect("serialisable"));
                }
                if items.len() == 1 {
                    return Err(e);
                }
                eprintln!("hsmseal: error: {e}");
                failed.push(e);
            }
        }
    }
    if failed.is_empty() {
        Ok(0)
    } else {
        eprintln!("hsmseal: {} of {} items failed", failed.len(), items.len());
        Ok(1)
    }
}
