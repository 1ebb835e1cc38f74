//! `hsmseal columns encrypt|decrypt|rewrap`: per-record encryption of
//! selected columns in CSV, TSV, JSONL and PostgreSQL COPY dumps, streamed
//! from stdin (or the INPUT file, also spelled `-i FILE`) to stdout (or
//! `-o FILE`, written atomically). One dump per run: several inputs are a
//! usage error (see [`input_of`]).
//!
//! Invariants (issue 9): the format is never guessed (stdin needs
//! `--format`); a run that fails writes nothing under `-o`'s name, and ends
//! a stream with the abort marker so its reader fails too, whatever stopped
//! it: an error, a usage error found before the first byte, SIGINT/SIGTERM.
//! A stream is stdout, or an `-o` that is written into rather than replaced
//! (a FIFO, a character device, `/dev/stdout`: `fs::resolve_output`).
//! The marker is only left out when stdout is a terminal, when its reader
//! has gone (EPIPE), and when a signal finds the stream stalled for
//! [`SIGNAL_WAIT`] (see docs/SECURITY.md, "Column pipelines").

use crate::app::App;
use crate::cli::{
    ColumnsCommand, ColumnsDecryptArgs, ColumnsEncryptArgs, ColumnsIndexArgs, ColumnsInspectArgs,
    ColumnsRewrapArgs, DumpArgs,
};
use hsmseal::backend::{KeyBackend, KeyRef};
use hsmseal::columns::{self, abort, ColumnOptions, ColumnStats, Format};
use hsmseal::error::{count, Error, Result};
use hsmseal::fs::{resolve_output, same_file, AtomicFile, Sink};
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Runs a `columns` subcommand; returns the exit code.
/// The decrypt limits of hsmseal.toml, checked before anything is
/// decrypted: the dump file is scanned for tokens (no HSM call) and each
/// key is charged its cells and the file's size. A dump on standard input
/// cannot be counted first: with limits configured it is refused (unless
/// overridden).
fn charge_limits(app: &App, a: &crate::cli::ColumnsDecryptArgs) -> Result<()> {
    let guard = hsmseal::guard::Guard::new(app.settings.limits.clone(), a.override_limits);
    if !guard.is_active() || a.override_limits {
        return Ok(());
    }
    let Some(path) = input_of(&a.dump)? else {
        return Err(Error::usage(
            "refusing to decrypt a dump from standard input: decrypt limits are configured (hsmseal.toml [limits.KEY]) and a stream cannot be counted before decrypting it; pass -i FILE, or --override-limits (the audit log records it)",
        ));
    };
    let mut f =
        std::fs::File::open(path).map_err(|e| Error::io_at("cannot open", path.display(), &e))?;
    let size = f
        .metadata()
        .map_err(|e| Error::io_at("cannot read", path.display(), &e))?
        .len();
    let opts = options(&a.dump)?;
    if opts.format == Format::Parquet {
        // Compressed pages hide the token text from a byte scan: the
        // selected columns are read and their tokens counted instead.
        let stats = columns::parquet::inspect(&opts, f)
            .map_err(|e| e.context(path.display().to_string()))?;
        let mut cells: std::collections::BTreeMap<String, u64> = Default::default();
        for (_, c) in &stats.inspect {
            for ((name, _, _), n) in &c.keys {
                *cells.entry(name.clone()).or_default() += n;
            }
        }
        return charge_cells(&guard, cells, size, path);
    }
    let mut scanner = hsmseal::deps::TokenScanner::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io_at("cannot read", path.display(), &e))?;
        if n == 0 {
            break;
        }
        scanner.feed(&buf[..n]);
    }
    let mut cells: std::collections::BTreeMap<String, u64> = Default::default();
    for (k, n) in scanner.finish() {
        *cells.entry(k.name).or_default() += n;
    }
    charge_cells(&guard, cells, size, path)
}

/// Charges each key's cell count (and the dump's `size` in bytes) against
/// its decrypt limits; an error names the dump at `path`.
fn charge_cells(
    guard: &hsmseal::guard::Guard,
    cells: std::collections::BTreeMap<String, u64>,
    size: u64,
    path: &Path,
) -> Result<()> {
    for (key, n) in cells {
        guard
            .charge(
                &key,
                hsmseal::guard::Usage {
                    cells: n,
                    bytes: size,
                    ..Default::default()
                },
            )
            .map_err(|e| e.context(path.display().to_string()))?;
    }
    Ok(())
}

pub fn run(app: &App, cmd: ColumnsCommand) -> Result<i32> {
    let cmd = match cmd {
        ColumnsCommand::Index(a) => return index(app, &a),
        ColumnsCommand::Inspect(a) => return inspect(app, &a),
        cmd => cmd,
    };
    // Usage errors first: no PIN prompt or HSM login for a mistyped flag.
    if let ColumnsCommand::Encrypt(a) = &cmd {
        if !a.recipient.is_empty() {
            return Err(Error::usage(
                "columns encrypt takes AES keys only (--key), not --recipient: each cell token would grow by a public-key ciphertext per recipient (384 bytes for RSA-3072); seal the whole dump to a recipient with `hsmseal encrypt --recipient FILE` instead (docs/FORMAT.md section 3.4)",
            ));
        }
        if let Some(g) = &a.group {
            return Err(Error::usage(format!(
                "columns encrypt takes one AES key (--key), not --group {g}: a cell token holds one wrapped key, and recipients would grow each cell by a public-key ciphertext; seal the whole dump with `hsmseal encrypt --group {g}` instead (docs/FORMAT.md section 3.4)"
            )));
        }
    }
    let key_name = match &cmd {
        ColumnsCommand::Encrypt(ColumnsEncryptArgs { key, .. }) => {
            Some(app.key_name(key.as_deref())?)
        }
        // Like file `rewrap`: without --key each token stays with its own
        // key (the configured default key is for new encryptions).
        ColumnsCommand::Rewrap(ColumnsRewrapArgs { key: Some(k), .. }) => {
            hsmseal::backend::validate_key_name(k)?;
            Some(k.clone())
        }
        _ => None,
    };
    if let Some(dump) = dump_args(&cmd) {
        input_of(dump)?;
        let opts = command_options(&cmd, dump)?;
        parquet_output(dump)?;
        if opts.format == Format::Parquet {
            columns::parquet::refuse_flags(&opts)?;
        }
    }
    if let ColumnsCommand::Decrypt(a) = &cmd {
        charge_limits(app, a)?;
    }
    let backend = match &cmd {
        ColumnsCommand::Passthrough(_) => None,
        _ => Some(app.backend()?),
    };
    // 0: one worker per core (the global --jobs setting, once App has it).
    let (stats, keys) = execute_with_stats(backend.as_deref(), key_name, app.json, app.jobs, cmd)?;
    // For the audit entry: cells are the items; NULLs, and plaintext cells
    // or tokens left as they were on request, are skipped.
    app.stats.ok.fetch_add(stats.cells, Ordering::Relaxed);
    app.stats.skipped.fetch_add(
        stats.nulls + stats.plaintext + stats.tokens_skipped,
        Ordering::Relaxed,
    );
    app.stats.bytes.fetch_add(stats.bytes_in, Ordering::Relaxed);
    for k in keys {
        app.stats.add_key(k);
    }
    // Cells left as they were on request are said, so a partial result is
    // never mistaken for a complete one (with --json, by the summary's
    // `plaintext`, `tokens_skipped` and `nested` counts: it stays the last
    // line).
    if app.json {
        return Ok(0);
    }
    if stats.plaintext > 0 {
        app.info(format!(
            "hsmseal: note: --allow-plaintext: {}",
            cells(
                stats.plaintext,
                "was not a token and was copied unchanged",
                "were not tokens and were copied unchanged"
            )
        ));
    }
    if stats.tokens_skipped > 0 {
        app.info(format!(
            "hsmseal: note: --skip-tokens: {}",
            cells(
                stats.tokens_skipped,
                "was already a token and was left unchanged",
                "were already tokens and were left unchanged"
            )
        ));
    }
    if stats.nested > 0 {
        app.info(format!(
            "hsmseal: note: --nested: {}; every layer was decrypted",
            cells(
                stats.nested,
                "had been encrypted more than once",
                "had been encrypted more than once"
            )
        ));
    }
    Ok(0)
}

/// "1 selected cell was ...", "2 selected cells were ...": the count and
/// the verb agree.
fn cells(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 selected cell {one}")
    } else {
        format!("{n} selected cells {many}")
    }
}

/// The dump a subcommand reads (`None`: `columns index`, which reads one
/// value).
fn dump_args(cmd: &ColumnsCommand) -> Option<&DumpArgs> {
    match cmd {
        ColumnsCommand::Encrypt(a) => Some(&a.dump),
        ColumnsCommand::Decrypt(a) => Some(&a.dump),
        ColumnsCommand::Rewrap(a) => Some(&a.dump),
        ColumnsCommand::Passthrough(a) => Some(a),
        ColumnsCommand::Index(_) | ColumnsCommand::Inspect(_) => None,
    }
}

/// `columns inspect`'s arguments as the dump arguments the other `columns`
/// commands share (no output, no binding: inspect reads token headers only).
fn inspect_dump(a: &ColumnsInspectArgs) -> DumpArgs {
    DumpArgs {
        columns: a.columns.clone(),
        format: a.format,
        no_header: a.no_header,
        row_id: Vec::new(),
        context: String::new(),
        inputs: a.inputs.clone(),
        input: None,
        output: None,
        force: false,
        stats: false,
    }
}

/// `columns inspect`: per selected column, what its values are (NULL,
/// clear, tokens per key version, malformed), from token headers alone:
/// no backend is opened. One `column` line each (text), or one JSON line
/// each of type `column` with the fields of `pg status` (FORMAT §8).
fn inspect(app: &App, a: &ColumnsInspectArgs) -> Result<i32> {
    let dump = inspect_dump(a);
    let input_path = input_of(&dump)?;
    let mut opts = options(&dump)?;
    opts.jobs = app.jobs;
    let place = input_path.map_or_else(|| "stdin".to_string(), |p| p.display().to_string());
    let stats = match input_path {
        Some(p) if opts.format == Format::Parquet => columns::parquet::inspect(
            &opts,
            std::fs::File::open(p).map_err(|e| Error::io_at("cannot open", p.display(), &e))?,
        ),
        Some(p) => columns::inspect(
            &opts,
            std::fs::File::open(p).map_err(|e| Error::io_at("cannot open", p.display(), &e))?,
        ),
        None => columns::inspect(&opts, std::io::stdin()),
    }
    .map_err(|e| e.context(&place))?;
    for (id, c) in &stats.inspect {
        let column = match id {
            columns::token::ColumnId::Name(n) => serde_json::Value::from(n.as_str()),
            columns::token::ColumnId::Index(i) => serde_json::Value::from(*i),
        };
        if app.json {
            let mut m = c.to_json();
            m.insert("input".into(), place.clone().into());
            m.insert("column".into(), column);
            crate::report::emit("column", &m);
        } else {
            crate::report::print_line(format_args!("{place}: {id}: {}", c.summary()));
        }
        for k in c.key_refs() {
            app.stats.add_key(k);
        }
    }
    let malformed: u64 = stats.inspect.iter().map(|(_, c)| c.malformed).sum();
    if malformed > 0 {
        // Counted, not fatal: the report is what was asked; the exit code
        // says the dump holds values decrypt would refuse.
        app.info(format!(
            "hsmseal: {place}: {malformed} token-looking values do not parse (malformed): columns decrypt would fail on them"
        ));
        return Ok(1);
    }
    Ok(0)
}

/// `--blind-index COL[=TARGET]` with the run's bits and normalisation.
fn blind_indexes(a: &ColumnsEncryptArgs) -> Result<Vec<columns::BlindIndexSpec>> {
    a.blind_index
        .iter()
        .map(|s| {
            columns::BlindIndexSpec::parse(s, a.blind_index_bits, a.blind_index_normalize.into())
        })
        .collect()
}

/// Longest value `columns index` reads (the longest a cell can hold).
const MAX_INDEX_INPUT: usize = columns::MAX_VALUE;

/// `hsmseal columns index`: the blind index of one value read from stdin
/// (never argv), printed as the companion column stores it.
fn index(app: &App, a: &ColumnsIndexArgs) -> Result<i32> {
    // Usage errors before the PIN prompt.
    let key = app.key_name(a.key.as_deref())?;
    columns::blind_index::check_bits(a.bits)?;
    if a.column.is_empty() {
        return Err(Error::usage("--column is empty"));
    }
    let id = match a.column.strip_prefix('@') {
        Some(n) => columns::token::ColumnId::Index(
            n.parse().ok().filter(|&i: &u32| i >= 1).ok_or_else(|| {
                Error::usage(format!(
                    "--column {:?}: @ must be followed by a 1-based column position (@3)",
                    a.column
                ))
            })?,
        ),
        None => columns::token::ColumnId::Name(a.column.clone()),
    };
    let mut value = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_INDEX_INPUT as u64 + 3)
        .read_to_end(&mut value)
        .map_err(|e| Error::io(format!("reading the value from stdin: {e}")))?;
    if !a.raw {
        if value.ends_with(b"\r\n") {
            value.truncate(value.len() - 2);
        } else if value.ends_with(b"\n") {
            value.truncate(value.len() - 1);
        }
    }
    if value.len() > MAX_INDEX_INPUT {
        return Err(Error::usage(format!(
            "the value on stdin is longer than {} MiB, the longest a cell holds",
            MAX_INDEX_INPUT >> 20
        )));
    }
    let backend = app.backend()?;
    let indexer = columns::BlindIndexer::new(
        backend.as_ref(),
        &key,
        &a.context,
        &columns::blind_index::column_id(&id),
        a.bits,
        a.normalize.into(),
    )?;
    let mut out = Vec::with_capacity(usize::from(a.bits / 4) + 1);
    indexer.index(&value, &mut out)?;
    out.push(b'\n');
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&out)
        .and_then(|()| stdout.flush())
        .map_err(|e| Error::io(format!("writing the index to stdout: {e}")))?;
    app.stats.ok.fetch_add(1, Ordering::Relaxed);
    Ok(0)
}

/// The dump options of `cmd`: the shared dump flags ([`options`]) plus
/// the subcommand's own. Built once before login to refuse bad flags
/// (no PIN prompt for a mistyped run) and again for the run itself.
fn command_options(cmd: &ColumnsCommand, dump: &DumpArgs) -> Result<ColumnOptions> {
    let mut opts = options(dump)?;
    match cmd {
        ColumnsCommand::Encrypt(a) => {
            opts.batch_size = a.batch_size;
            opts.skip_tokens = a.skip_tokens;
            opts.blind_indexes = blind_indexes(a)?;
        }
        ColumnsCommand::Decrypt(a) => {
            opts.allow_plaintext = a.allow_plaintext;
            opts.token_formats = token_formats(a)?;
            opts.nested = a.nested;
        }
        ColumnsCommand::Rewrap(a) => opts.allow_plaintext = a.allow_plaintext,
        ColumnsCommand::Passthrough(_) | ColumnsCommand::Index(_) | ColumnsCommand::Inspect(_) => {}
    }
    Ok(opts)
}

/// Runs a `columns` subcommand with a given key backend (the HSM, or the
/// memory backend in the unit tests): `key_name` is the resolved key for
/// encrypt and rewrap (for rewrap, `None`: each token to its own key),
/// `json` selects the JSON summary, `jobs` the worker threads (0: one per
/// core). Returns the run's statistics and the key versions it encrypted or
/// rewrapped under.
pub fn execute_with_stats(
    backend: Option<&dyn KeyBackend>,
    key_name: Option<String>,
    json: bool,
    jobs: usize,
    cmd: ColumnsCommand,
) -> Result<(ColumnStats, Vec<KeyRef>)> {
    let op = match &cmd {
        ColumnsCommand::Encrypt(_) => "encrypt",
        ColumnsCommand::Decrypt(_) => "decrypt",
        ColumnsCommand::Rewrap(_) => "rotate",
        ColumnsCommand::Passthrough(_) => "passthrough",
        ColumnsCommand::Index(_) => "index",
        ColumnsCommand::Inspect(_) => "inspect",
    };
    let Some(dump) = dump_args(&cmd) else {
        return Err(Error::usage(format!("columns {op} reads no dump")));
    };
    let mut opts = command_options(&cmd, dump)?;
    opts.jobs = jobs;
    let backend = || backend.ok_or_else(|| Error::usage("no key backend for this command"));
    let input_path = input_of(dump)?;
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
    if opts.format == Format::Parquet {
        parquet_output(dump)?;
        let (Some(i), Some(o)) = (input_path, output_path) else {
            unreachable!("checked by options and parquet_output");
        };
        let place = i.display().to_string();
        let file =
            std::fs::File::open(i).map_err(|e| Error::io_at("cannot open", i.display(), &e))?;
        let real = match resolve_output(o, dump.force)? {
            Sink::File(real) => real,
            _ => return Err(parquet_stream_error(o)),
        };
        // Written in full to a temporary file, fsynced, then renamed: a
        // failed run leaves nothing under the output's name.
        let mut f = AtomicFile::create(&real, 0o600, dump.force)?;
        let given = target.as_ref();
        let stats = match &cmd {
            ColumnsCommand::Encrypt(_) => columns::parquet::encrypt(
                backend()?,
                given.ok_or_else(|| Error::usage("no key given: pass --key NAME"))?,
                &opts,
                file,
                &mut f,
            ),
            ColumnsCommand::Decrypt(_) => {
                columns::parquet::decrypt(backend()?, &opts, file, &mut f)
            }
            ColumnsCommand::Rewrap(_) => {
                columns::parquet::rewrap(backend()?, given, &opts, file, &mut f)
            }
            ColumnsCommand::Passthrough(_) => columns::parquet::passthrough(&opts, file, &mut f),
            ColumnsCommand::Index(_) | ColumnsCommand::Inspect(_) => {
                Err(Error::usage("columns index and inspect write no dump"))
            }
        }
        .map_err(|e| e.context(&place))?;
        f.commit()?;
        report(json, dump, op, opts.format, target.as_ref(), &stats);
        let keys = match &cmd {
            ColumnsCommand::Rewrap(_) => stats.targets.clone(),
            _ => target.into_iter().collect(),
        };
        return Ok((stats, keys));
    }
    let input: Box<dyn Read + Send> = match input_path {
        Some(p) => Box::new(
            std::fs::File::open(p).map_err(|e| Error::io_at("cannot open", p.display(), &e))?,
        ),
        None => Box::new(std::io::stdin()),
    };
    let place = input_path.map_or_else(|| "stdin".to_string(), |p| p.display().to_string());
    let go = |out: &mut dyn Write| -> Result<ColumnStats> {
        let given = target.as_ref();
        let target = || given.ok_or_else(|| Error::usage("no key given: pass --key NAME"));
        match &cmd {
            ColumnsCommand::Encrypt(_) => {
                columns::encrypt(backend()?, target()?, &opts, input, out)
            }
            ColumnsCommand::Decrypt(_) => columns::decrypt(backend()?, &opts, input, out),
            ColumnsCommand::Rewrap(_) => columns::rewrap(backend()?, given, &opts, input, out),
            ColumnsCommand::Passthrough(_) => columns::passthrough(&opts, input, out),
            ColumnsCommand::Index(_) => Err(Error::usage("columns index reads no dump")),
            ColumnsCommand::Inspect(_) => Err(Error::usage("columns inspect writes no dump")),
        }
    };
    let sink = match output_path {
        Some(p) => resolve_output(p, dump.force)?,
        None => Sink::Stdout,
    };
    let stats = match sink {
        Sink::File(real) => {
            let mut f = AtomicFile::create(&real, 0o600, dump.force)?;
            let s = go(&mut f).map_err(|e| e.context(&place))?;
            f.commit()?;
            s
        }
        Sink::Stdout | Sink::Stream(_) => {
            if let Sink::Stream(p) = &sink {
                // A FIFO or device: the stream's descriptor from now on,
                // with the marker armed as for stdout.
                attach_stream(hsmseal::fs::open_stream(p)?);
            }
            // Unbuffered: the pipeline hands over whole blocks of records,
            // and each goes out in one piece (see `StreamSink`).
            let s = go(&mut StreamSink).map_err(|e| e.context(&place))?;
            finish_stdout();
            s
        }
    };
    report(json, dump, op, opts.format, target.as_ref(), &stats);
    let keys = match &cmd {
        ColumnsCommand::Rewrap(_) => stats.targets.clone(),
        _ => target.into_iter().collect(),
    };
    Ok((stats, keys))
}

/// The dump format: `--format`, else the input file's extension; never a
/// default. Reading a COPY text dump as CSV (the old default for stdin)
/// left values with a comma partly in clear (issue 9).
fn format_of(a: &DumpArgs) -> Result<Format> {
    if let Some(f) = a.format {
        return Ok(f.into());
    }
    const CHOICES: &str = "pass --format csv, tsv, jsonl, pgcopy or parquet";
    let input = input_of(a)?;
    let Some(input) = input else {
        return Err(Error::usage(format!(
            "the dump comes from stdin, which has no file name to tell its format by: {CHOICES}"
        )));
    };
    let format = Format::from_path(input).ok_or_else(|| {
        Error::usage(format!(
            "cannot tell the format of {} from its name: {CHOICES}",
            input.display()
        ))
    })?;
    // The output has the input's format: a differing name means the user
    // expects a conversion hsmseal does not do.
    let output = a.output.as_deref().filter(|p| *p != Path::new("-"));
    if let Some((o, of)) = output.and_then(|o| Some((o, Format::from_path(o)?))) {
        if of != format {
            return Err(Error::usage(format!(
                "{} is a {} dump by its name but the output {} says {}: the output has the input's format; rename it, or {CHOICES}",
                input.display(),
                format.name(),
                o.display(),
                of.name()
            )));
        }
    }
    Ok(format)
}

/// A Parquet run's output: a file (`-o FILE`), written whole and renamed
/// into place; never stdout or another stream, where a failed run could not
/// be taken back (Parquet has no abort marker a reader would see).
fn parquet_output(a: &DumpArgs) -> Result<()> {
    if format_of(a)? != Format::Parquet {
        return Ok(());
    }
    match a.output.as_deref().filter(|p| *p != Path::new("-")) {
        None => Err(Error::usage(
            "--format parquet writes a file, not standard output: pass -o FILE",
        )),
        Some(o) => match resolve_output(o, a.force)? {
            Sink::File(_) => Ok(()),
            _ => Err(parquet_stream_error(o)),
        },
    }
}

fn parquet_stream_error(o: &Path) -> Error {
    Error::usage(format!(
        "--format parquet writes a regular file, but {} is a stream (FIFO, device or stdout): pass -o FILE",
        o.display()
    ))
}

/// The input dump: the positional INPUT or `-i FILE` (clap refuses both);
/// `None` for stdin (absent or "-"). Several inputs are refused rather
/// than concatenated or given one output each: each dump has its own
/// header, so two on one stdout would not be one loadable dump, and there
/// is no output name to derive from a dump's name (a `columns` output is
/// no `.hseal` file). A loop in the shell says what it means.
fn input_of(a: &DumpArgs) -> Result<Option<&Path>> {
    let input = match (a.input.as_deref(), a.inputs.as_slice()) {
        (Some(p), _) => Some(p),
        (None, []) => None,
        (None, [p]) => Some(p.as_path()),
        (None, many) => {
            let names: Vec<String> = many.iter().map(|p| p.display().to_string()).collect();
            return Err(Error::usage(format!(
                "columns reads one dump per run, got {} inputs ({}): run hsmseal columns once per dump, each with its own -o",
                many.len(),
                names.join(", ")
            )));
        }
    };
    Ok(input.filter(|p| *p != Path::new("-")))
}

fn token_formats(a: &ColumnsDecryptArgs) -> Result<Vec<Format>> {
    Ok(a.token_format.iter().map(|&f| f.into()).collect())
}

fn options(a: &DumpArgs) -> Result<ColumnOptions> {
    let format = format_of(a)?;
    if format == Format::Parquet && input_of(a)?.is_none() {
        // Not spooled to a temporary file: Parquet keeps its index in a
        // footer at the end, and a copy of a large stdin is a surprise.
        return Err(Error::usage(
            "--format parquet reads a file (its index is at the end), not standard input: pass INPUT or -i FILE",
        ));
    }
    Ok(ColumnOptions {
        format,
        columns: names("--columns", &a.columns)?,
        header: !a.no_header,
        row_id: names("--row-id", &a.row_id)?,
        context: a.context.clone(),
        ..ColumnOptions::default()
    })
}

/// The column names of a repeatable, comma-separated list option: each
/// occurrence split at commas, CSV-style, so a name with a comma (or
/// leading/trailing blanks) is written in double quotes, a quote inside
/// doubled (`"a,b",c`). Unquoted names are trimmed; a quote inside an
/// unquoted name is an ordinary character (as before quoting existed).
fn names(flag: &str, args: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for arg in args {
        let mut rest = arg.as_str();
        loop {
            let t = rest.trim_start();
            if let Some(q) = t.strip_prefix('"') {
                let mut name = String::new();
                let mut chars = q.char_indices();
                let after = loop {
                    match chars.next() {
                        None => {
                            return Err(Error::usage(format!(
                                "{flag} {arg:?}: a quoted name has no closing quote (write a quote inside a name as \"\")"
                            )))
                        }
                        Some((i, '"')) if q[i + 1..].starts_with('"') => {
                            name.push('"');
                            chars.next();
                        }
                        Some((i, '"')) => break q[i + 1..].trim_start(),
                        Some((_, c)) => name.push(c),
                    }
                };
                out.push(name);
                match after.strip_prefix(',') {
                    Some(r) => rest = r,
                    None if after.is_empty() => break,
                    None => {
                        return Err(Error::usage(format!(
                            "{flag} {arg:?}: text after the closing quote of {:?} (quote the whole name)",
                            out.last().expect("pushed")
                        )))
                    }
                }
            } else {
                match t.split_once(',') {
                    Some((name, r)) => {
                        out.push(name.trim().to_string());
                        rest = r;
                    }
                    None => {
                        out.push(t.trim().to_string());
                        break;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The summary on stderr: a `summary` JSON line with `--json` (stderr is
/// then the JSON stream: `commands::run`), a human line with `--stats`
/// (asked for explicitly, so printed even with `--quiet`). Never both: the
/// two would mix on one stream.
fn report(json: bool, a: &DumpArgs, op: &str, fmt: Format, key: Option<&KeyRef>, s: &ColumnStats) {
    let key_json = |k: &KeyRef| serde_json::json!({"name": k.name, "version": k.version});
    if json {
        let op = if op == "rotate" { "rewrap" } else { op };
        let mut m = serde_json::Map::new();
        m.insert("action".into(), format!("columns {op}").into());
        m.insert("format".into(), serde_json::json!(fmt));
        m.insert("key".into(), serde_json::json!(key.map(key_json)));
        if let Ok(serde_json::Value::Object(stats)) = serde_json::to_value(s) {
            m.extend(stats);
        }
        // rewrap: the versions the tokens are under now (without --key,
        // one per key the dump's tokens were under).
        if op == "rewrap" {
            m.insert("keys".into(), s.targets.iter().map(key_json).collect());
        }
        crate::report::emit("summary", &m);
    } else if a.stats {
        eprintln!(
            "columns {op}: {}, {}, {}, {}, {}, {:.3} s ({:.0} cells/s)",
            count(s.rows, "row", "rows"),
            count(s.cells, "cell", "cells"),
            count(s.nulls, "null", "nulls"),
            count(s.batches, "batch", "batches"),
            count(s.hsm_calls, "HSM call", "HSM calls"),
            s.seconds,
            s.cells as f64 / s.seconds.max(1e-9)
        );
    }
}

/// The data stream of a `columns` command on stdout, shared by the thread
/// that writes it and the signal thread. This lock is what protects it: a
/// block of records is written while holding it, and the abort marker is
/// written under it, so the marker never lands inside a block and no block
/// follows the marker.
static STDOUT_STREAM: Mutex<Stream> = Mutex::new(Stream::Unarmed);

/// How long the signal thread waits for a block being written to stdout to
/// finish before exiting without the marker (a reader that stopped reading).
pub const SIGNAL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    /// Not a `columns` command writing to stdout (or stdout is a terminal).
    Unarmed,
    /// Data may follow; on failure the marker goes after what was written.
    Open {
        /// The stream is empty or ends with LF.
        at_line_start: bool,
        /// A failed write stopped inside a CSV quoted field.
        in_quotes: bool,
    },
    /// Finished, or ended with the marker, or the reader has gone.
    Closed,
}

/// Arms the abort marker for `cmd` if it is a `columns` command whose data
/// goes to stdout and stdout is not a terminal. `commands::run` holds the
/// guard for the whole run: if the run has not finished its stream when the
/// guard is dropped (any error, a usage error before the first byte
/// included), the stream ends with the marker.
pub fn guard_stdout(cmd: &crate::cli::Command) -> Option<StdoutGuard> {
    let crate::cli::Command::Columns(c) = cmd else {
        return None;
    };
    // A stop on a signal (or a closed stdout) ends the stream too.
    crate::signals::on_stop_end_stream(abort_stdout_for_exit);
    // `columns index` prints one value, no dump: nothing to end.
    let args = dump_args(c)?;
    // Parquet never writes to a stream (`parquet_output`): no marker.
    if matches!(format_of(args), Ok(Format::Parquet)) {
        return Some(StdoutGuard);
    }
    let to_stdout = match args.output.as_deref() {
        None => true,
        Some(p) if p == Path::new("-") => true,
        // `-o /dev/stdout` and the like are stdout too.
        Some(p) => matches!(resolve_output(p, args.force), Ok(Sink::Stdout)),
    };
    // A FIFO or device `-o` is armed when it is opened (`attach_stream`);
    // the guard still ends it with the marker if the run fails after that.
    if to_stdout && !std::io::stdout().is_terminal() {
        *lock_stream() = Stream::Open {
            at_line_start: true,
            in_quotes: false,
        };
    }
    Some(StdoutGuard)
}

/// The descriptor the stream goes to: 1 (stdout), or a FIFO or device
/// opened for `-o` (see [`attach_stream`]).
static STREAM_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(1);

/// Makes `f` (an `-o` FIFO or device) the stream's descriptor for the rest
/// of the process and arms the marker for it.
fn attach_stream(f: std::fs::File) {
    use std::os::fd::IntoRawFd;
    let mut s = lock_stream();
    // Never closed: the signal thread may write the marker to it until exit.
    STREAM_FD.store(f.into_raw_fd(), Ordering::SeqCst);
    *s = Stream::Open {
        at_line_start: true,
        in_quotes: false,
    };
}

/// See [`guard_stdout`].
pub struct StdoutGuard;

impl Drop for StdoutGuard {
    fn drop(&mut self) {
        abort_stream(&mut lock_stream());
    }
}

fn lock_stream() -> std::sync::MutexGuard<'static, Stream> {
    STDOUT_STREAM.lock().unwrap_or_else(|p| p.into_inner())
}

/// The run finished its stream: no marker.
fn finish_stdout() {
    let mut s = lock_stream();
    if matches!(*s, Stream::Open { .. }) {
        *s = Stream::Closed;
    }
}

/// Ends an open stream with the marker (best effort: stdout may be broken).
fn abort_stream(s: &mut Stream) {
    if let Stream::Open {
        at_line_start,
        in_quotes,
    } = *s
    {
        let mut m = Vec::with_capacity(abort::MARKER.len() + 2);
        abort::write_marker(&mut m, at_line_start, in_quotes);
        let _ = write_stream(&m);
        *s = Stream::Closed;
    }
}

/// Called by the signal thread before the process exits on SIGINT, SIGTERM
/// or a failed stdout: waits (at most [`SIGNAL_WAIT`]) for a block being
/// written to finish, ends the stream with the marker, and keeps the lock
/// so nothing more is written before the exit.
fn abort_stdout_for_exit() {
    let deadline = Instant::now() + SIGNAL_WAIT;
    let mut guard = loop {
        match STDOUT_STREAM.try_lock() {
            Ok(g) => break g,
            Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(std::sync::TryLockError::WouldBlock) => return,
        }
    };
    abort_stream(&mut guard);
    std::mem::forget(guard);
}

/// Writes all of `buf` to the stream's descriptor (stdout, or an `-o` FIFO
/// or device), bypassing std's stdout buffer (so what was written is on the
/// descriptor, not in a buffer a signal exit would drop). Returns how much
/// was written on failure.
fn write_stream(buf: &[u8]) -> std::result::Result<(), (usize, std::io::Error)> {
    use std::os::fd::FromRawFd;
    // SAFETY: the descriptor (1, or one `attach_stream` leaked) is open for
    // the life of the process; ManuallyDrop keeps this File from closing it.
    let fd = STREAM_FD.load(Ordering::SeqCst);
    let mut out = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    let mut done = 0;
    while done < buf.len() {
        match out.write(&buf[done..]) {
            Ok(0) => {
                return Err((done, std::io::ErrorKind::WriteZero.into()));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// The data writer for the stream. Each `write` is a whole block of records
/// (the pipeline writes nothing smaller) and goes out under the stream
/// lock. A closed reader stops the run quietly (exit 141, no marker).
struct StreamSink;

impl Write for StreamSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = lock_stream();
        if *s == Stream::Closed {
            return Err(std::io::Error::other("the output was already ended"));
        }
        match write_stream(buf) {
            Ok(()) => {
                if let (Stream::Open { at_line_start, .. }, Some(&last)) = (&mut *s, buf.last()) {
                    *at_line_start = last == b'\n';
                }
                Ok(buf.len())
            }
            Err((_, e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                *s = Stream::Closed;
                drop(s);
                crate::signals::stdout_closed()
            }
            Err((done, e)) => {
                // Cut inside this block, which began at a record boundary:
                // its written part says where the marker must start.
                if let (
                    Stream::Open {
                        at_line_start,
                        in_quotes,
                    },
                    Some(&last),
                ) = (&mut *s, buf[..done].last())
                {
                    *at_line_start = last == b'\n';
                    *in_quotes = buf[..done].iter().filter(|&&c| c == b'"').count() % 2 == 1;
                }
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
