//! `hsmseal columns encrypt|decrypt|rotate`: per-record encryption of
//! selected columns in CSV, TSV, JSONL and PostgreSQL COPY dumps, streamed
//! from stdin (or `-i FILE`) to stdout (or `-o FILE`, written atomically).

use crate::app::App;
use crate::columns::{self, ColumnOptions, ColumnStats, Format};
use crate::error::{Error, Result};
use crate::keys::{KeyBackend, KeyRef};
use crate::output::{same_file, AtomicFile};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

#[derive(Debug, clap::Subcommand)]
pub enum ColumnsCommand {
    /// Encrypt the selected columns: each non-NULL value becomes a token.
    Encrypt(EncryptArgs),
    /// Decrypt the tokens in the selected columns.
    Decrypt(DecryptArgs),
    /// Rewrap every token's batch key to the current KWK version, without
    /// re-encrypting the values.
    Rotate(RotateArgs),
    /// Parse and rewrite the selected columns without cryptography (the
    /// benchmark's speed ceiling).
    #[command(hide = true)]
    Passthrough(DumpArgs),
}

/// What every `columns` subcommand shares.
#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// Columns to process: header names (JSON keys for jsonl), or 1-based
    /// positions with --no-header.
    #[arg(long, short = 'c', value_delimiter = ',', required = true)]
    pub columns: Vec<String>,
    /// csv, tsv, jsonl or pgcopy (PostgreSQL COPY text). Default: from the
    /// file extension, else csv.
    #[arg(long, short = 'f')]
    pub format: Option<String>,
    /// The first record is data, not a header: --columns are positions.
    #[arg(long)]
    pub no_header: bool,
    /// Bind each token to this column's value in its row (a unique id), so a
    /// token moved to another row fails to decrypt.
    #[arg(long, value_name = "COL")]
    pub row_id: Option<String>,
    /// Bound into every token, e.g. the table `app.users`; decrypt must be
    /// given the same. Default: empty.
    #[arg(long, default_value = "")]
    pub context: String,
    /// Input file ("-" or absent: stdin).
    #[arg(long, short = 'i', value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Output file, written atomically with mode 0600 ("-" or absent: stdout).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print a summary (rows, cells, batches, HSM calls, seconds) on stderr
    /// (with --json: as JSON, also on stderr: stdout carries the dump).
    #[arg(long)]
    pub stats: bool,
}

#[derive(Debug, clap::Args)]
pub struct EncryptArgs {
    #[command(flatten)]
    pub dump: DumpArgs,
    /// Key (KWK) name; default from the configuration.
    #[arg(long, short = 'k')]
    pub key: Option<String>,
    /// Records per batch key: one HSM call per batch.
    #[arg(long, default_value_t = columns::DEFAULT_BATCH_SIZE)]
    pub batch_size: u64,
}

#[derive(Debug, clap::Args)]
pub struct DecryptArgs {
    #[command(flatten)]
    pub dump: DumpArgs,
    /// Copy selected values that are not tokens instead of failing.
    #[arg(long)]
    pub allow_plaintext: bool,
}

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub dump: DumpArgs,
    /// Key (KWK) name whose current version tokens are rewrapped to;
    /// default from the configuration.
    #[arg(long, short = 'k')]
    pub key: Option<String>,
    /// Copy selected values that are not tokens instead of failing.
    #[arg(long)]
    pub allow_plaintext: bool,
}

/// Runs a `columns` subcommand; returns the exit code.
pub fn run(app: &App, cmd: ColumnsCommand) -> Result<i32> {
    // Usage errors first: no PIN prompt or HSM login for a mistyped flag.
    let key_name = match &cmd {
        ColumnsCommand::Encrypt(EncryptArgs { key, .. })
        | ColumnsCommand::Rotate(RotateArgs { key, .. }) => Some(app.key_name(key.as_deref())?),
        _ => None,
    };
    options(dump_args(&cmd))?;
    let backend = match &cmd {
        ColumnsCommand::Passthrough(_) => None,
        _ => Some(app.backend()?),
    };
    // 0: one worker per core (the global --jobs setting, once App has it).
    let (stats, key) = execute_with_stats(backend.as_deref(), key_name, app.json, app.jobs, cmd)?;
    // For the audit entry: cells are the items, NULLs and plaintext cells
    // left as they were are skipped.
    app.stats.ok.fetch_add(stats.cells, Ordering::Relaxed);
    app.stats
        .skipped
        .fetch_add(stats.nulls + stats.plaintext, Ordering::Relaxed);
    app.stats.bytes.fetch_add(stats.bytes_in, Ordering::Relaxed);
    if let Some(k) = key {
        app.stats.add_key(k);
    }
    Ok(0)
}

fn dump_args(cmd: &ColumnsCommand) -> &DumpArgs {
    match cmd {
        ColumnsCommand::Encrypt(a) => &a.dump,
        ColumnsCommand::Decrypt(a) => &a.dump,
        ColumnsCommand::Rotate(a) => &a.dump,
        ColumnsCommand::Passthrough(a) => a,
    }
}

/// Runs a `columns` subcommand with a given key backend (the HSM, or a test
/// backend): `key_name` is the resolved key for encrypt and rotate, `json`
/// selects the JSON summary, `jobs` the worker threads (0: one per core).
pub fn execute(
    backend: Option<&dyn KeyBackend>,
    key_name: Option<String>,
    json: bool,
    jobs: usize,
    cmd: ColumnsCommand,
) -> Result<i32> {
    execute_with_stats(backend, key_name, json, jobs, cmd).map(|_| 0)
}

/// [`execute`], returning the run's statistics and the key version it
/// encrypted or rewrapped under.
pub fn execute_with_stats(
    backend: Option<&dyn KeyBackend>,
    key_name: Option<String>,
    json: bool,
    jobs: usize,
    cmd: ColumnsCommand,
) -> Result<(ColumnStats, Option<KeyRef>)> {
    let op = match &cmd {
        ColumnsCommand::Encrypt(_) => "encrypt",
        ColumnsCommand::Decrypt(_) => "decrypt",
        ColumnsCommand::Rotate(_) => "rotate",
        ColumnsCommand::Passthrough(_) => "passthrough",
    };
    let dump = dump_args(&cmd);
    let mut opts = options(dump)?;
    opts.jobs = jobs;
    match &cmd {
        ColumnsCommand::Encrypt(a) => opts.batch_size = a.batch_size,
        ColumnsCommand::Decrypt(a) => opts.allow_plaintext = a.allow_plaintext,
        ColumnsCommand::Rotate(a) => opts.allow_plaintext = a.allow_plaintext,
        ColumnsCommand::Passthrough(_) => {}
    }
    let backend = || backend.ok_or_else(|| Error::usage("no key backend for this command"));
    let input_path = dump.input.as_deref().filter(|p| *p != Path::new("-"));
    let output_path = dump.output.as_deref().filter(|p| *p != Path::new("-"));
    if let (Some(i), Some(o)) = (input_path, output_path) {
        if same_file(i, o) {
            return Err(Error::usage(format!(
                "{} is both the input and the output",
                o.display()
            )));
        }
    }
    // Resolve the key version before creating any output file.
    let target = match key_name {
        Some(name) if op == "encrypt" || op == "rotate" => {
            let version = backend()?.current_version(&name)?;
            Some(KeyRef { name, version })
        }
        _ => None,
    };
    let input: Box<dyn Read + Send> = match input_path {
        Some(p) => Box::new(
            std::fs::File::open(p).map_err(|e| Error::io_at("cannot open", p.display(), &e))?,
        ),
        None => Box::new(std::io::stdin()),
    };
    let place = input_path.map_or_else(|| "stdin".to_string(), |p| p.display().to_string());
    let go = |out: &mut dyn Write| -> Result<ColumnStats> {
        let target = || {
            target
                .as_ref()
                .ok_or_else(|| Error::usage("no key given: pass --key NAME"))
        };
        match &cmd {
            ColumnsCommand::Encrypt(_) => {
                columns::encrypt(backend()?, target()?, &opts, input, out)
            }
            ColumnsCommand::Decrypt(_) => columns::decrypt(backend()?, &opts, input, out),
            ColumnsCommand::Rotate(_) => columns::rotate(backend()?, target()?, &opts, input, out),
            ColumnsCommand::Passthrough(_) => columns::passthrough(&opts, input, out),
        }
    };
    let stats = match output_path {
        Some(p) => {
            let mut f = AtomicFile::create(p, 0o600, dump.force)?;
            let s = go(&mut f).map_err(|e| e.context(&place))?;
            f.commit()?;
            s
        }
        None => {
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::with_capacity(
                1 << 20,
                crate::signals::PipeAware(stdout.lock()),
            );
            let s = go(&mut w).map_err(|e| e.context(&place))?;
            w.flush()
                .map_err(|e| Error::io(format!("writing stdout: {e}")))?;
            s
        }
    };
    report(json, dump, op, opts.format, target.as_ref(), &stats);
    Ok((stats, target))
}

fn options(a: &DumpArgs) -> Result<ColumnOptions> {
    let format = match &a.format {
        Some(f) => Format::parse(f)?,
        None => a
            .input
            .as_deref()
            .and_then(Format::from_path)
            .or_else(|| a.output.as_deref().and_then(Format::from_path))
            .unwrap_or(Format::Csv),
    };
    Ok(ColumnOptions {
        format,
        columns: a.columns.iter().map(|c| c.trim().to_string()).collect(),
        header: !a.no_header,
        row_id: a.row_id.clone(),
        context: a.context.clone(),
        ..ColumnOptions::default()
    })
}

/// The summary on stderr: JSON with `--json`, a line with `--stats` (asked
/// for explicitly, so printed even with `--quiet`).
fn report(json: bool, a: &DumpArgs, op: &str, fmt: Format, key: Option<&KeyRef>, s: &ColumnStats) {
    if json {
        let v = serde_json::json!({
            "command": format!("columns {op}"),
            "format": fmt,
            "key": key.map(|k| serde_json::json!({"name": k.name, "version": k.version})),
            "stats": s,
        });
        eprintln!("{v}");
    } else if a.stats {
        eprintln!(
            "columns {op}: {} rows, {} cells, {} nulls, {} batches, {} HSM calls, {:.3} s ({:.0} cells/s)",
            s.rows,
            s.cells,
            s.nulls,
            s.batches,
            s.hsm_calls,
            s.seconds,
            s.cells as f64 / s.seconds.max(1e-9)
        );
    }
}
