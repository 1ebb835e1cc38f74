//! Column dumps: per-record encryption of selected columns in CSV, TSV,
//! JSON Lines and PostgreSQL `COPY` text dumps (`hsmseal columns ...`).
//!
//! Every selected, non-NULL value becomes a self-contained token (see
//! [`token`] and docs/FORMAT.md (section 6)) with its own random DEK; DEKs are
//! protected by batch keys, and only batch keys go to the HSM, so HSM calls
//! grow with batches, not rows.
//!
//! Pipeline (constant memory, order kept, all cores busy):
//! - a reader thread splits the input into blocks of whole records and
//!   records the raw span of every selected field;
//! - `jobs` worker threads turn blocks into output bytes (each with its own
//!   CSPRNG seeded once from the OS, and its own current batch key);
//! - the calling thread writes finished blocks in sequence order.
//!
//! A fixed number of block slots circulates from the writer back to the
//! reader, which bounds the memory in flight whatever the input size.
//!
//! Invariants: bytes outside selected fields are copied as they are; NULLs
//! stay NULL; a header that does not match `--columns` fails before any
//! output; every error names its row (1-based, counting the header line) and
//! column. Output is handed to the writer in blocks of whole records, and
//! the first failure stops it: what was written is a prefix of the right
//! output ending at a record boundary (the caller ends a stream with
//! [`abort::MARKER`] then). Never silently wrong (issue 9): encrypt refuses
//! a value that already is a token, decrypt a value that is not one, a
//! token made from another dump format, and a value that decrypts to a
//! token, unless the option for each says otherwise (and the cells are
//! counted); input containing the abort marker is refused.

pub mod abort;
pub mod csv;
pub mod jsonl;
pub mod pgcopy;
mod scan;
pub mod token;

use crate::backend::{KeyBackend, KeyRef};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use token::{
    binding, binding_prefix, looks_like_token, BatchCache, ColumnId, Opener, RewrapCache,
    Rewrapper, Sealer, FLAG_JSON, FLAG_QUOTED, PREFIX,
};

pub use token::{DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE, MAX_VALUE};

/// Records per block handed to a worker.
const BLOCK_ROWS: usize = 4096;
/// Bytes after which a block is handed over even if it has fewer rows.
const BLOCK_BYTES: usize = 4 << 20;
/// Longest record (line, or CSV record with embedded newlines).
pub const MAX_RECORD: usize = 64 << 20;
/// Input read size.
const READ_CHUNK: usize = 4 << 20;
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The dump formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Tsv,
    Jsonl,
    #[serde(rename = "pgcopy")]
    PgCopy,
}

impl Format {
    /// Parses a `--format` value.
    pub fn parse(s: &str) -> Result<Format> {
        match s.to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "tsv" => Ok(Format::Tsv),
            "jsonl" | "ndjson" => Ok(Format::Jsonl),
            "pgcopy" => Ok(Format::PgCopy),
            _ => Err(Error::usage(format!(
                "unknown format {s:?}: use csv, tsv, jsonl or pgcopy"
            ))),
        }
    }

    /// The format a file name suggests: `.csv`, `.tsv`/`.tab`,
    /// `.jsonl`/`.ndjson`, `.copy`/`.pgcopy`.
    pub fn from_path(p: &Path) -> Option<Format> {
        let ext = p.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Format::Csv),
            "tsv" | "tab" => Some(Format::Tsv),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "copy" | "pgcopy" => Some(Format::PgCopy),
            _ => None,
        }
    }

    /// The `--format` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Tsv => "tsv",
            Format::Jsonl => "jsonl",
            Format::PgCopy => "pgcopy",
        }
    }

    fn is_table(self) -> bool {
        self != Format::Jsonl
    }

    fn delim(self) -> u8 {
        match self {
            Format::Csv => b',',
            _ => b'\t',
        }
    }
}

/// What to do with the selected columns.
#[derive(Debug, Clone)]
pub struct ColumnOptions {
    pub format: Format,
    /// Header names (JSON keys for JSONL), or 1-based positions when
    /// `header` is false.
    pub columns: Vec<String>,
    /// The first record is a header (CSV, TSV, pgcopy). Ignored for JSONL.
    pub header: bool,
    /// Column whose value binds each token to its row.
    pub row_id: Option<String>,
    /// Bound into every token, e.g. `app.users`. Empty by default.
    pub context: String,
    /// Records per batch key.
    pub batch_size: u64,
    /// On decrypt, copy selected values that are not tokens instead of
    /// failing.
    pub allow_plaintext: bool,
    /// On encrypt, copy selected values that already are tokens instead of
    /// failing.
    pub skip_tokens: bool,
    /// On decrypt, also accept tokens made from dumps of these formats; the
    /// value is then written the way `format` writes it. Tokens made before
    /// formats were bound record none and are accepted in any format.
    pub token_formats: Vec<Format>,
    /// On decrypt, open a value that decrypts to a token again (a cell
    /// encrypted twice) down to the plaintext, instead of failing.
    pub nested: bool,
    /// Worker threads (0: one per core).
    pub jobs: usize,
}

impl Default for ColumnOptions {
    fn default() -> Self {
        ColumnOptions {
            format: Format::Csv,
            columns: Vec::new(),
            header: true,
            row_id: None,
            context: String::new(),
            batch_size: DEFAULT_BATCH_SIZE,
            allow_plaintext: false,
            skip_tokens: false,
            token_formats: Vec::new(),
            nested: false,
            jobs: 0,
        }
    }
}

/// The summary of a run (`--stats` / `--json`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ColumnStats {
    /// Data records (the header and blank lines not counted).
    pub rows: u64,
    /// Cells encrypted, decrypted or rewrapped.
    pub cells: u64,
    /// Selected cells that were NULL and left as they were.
    pub nulls: u64,
    /// Selected cells copied as plaintext (`--allow-plaintext`).
    pub plaintext: u64,
    /// Selected cells that already were tokens, copied as they were
    /// (`encrypt --skip-tokens`).
    pub tokens_skipped: u64,
    /// Cells that had been encrypted more than once and were opened down to
    /// the plaintext (`decrypt --nested`).
    pub nested: u64,
    /// Distinct batch keys made, opened or rewrapped.
    pub batches: u64,
    /// Calls into the key backend (HSM).
    pub hsm_calls: u64,
    pub seconds: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Encrypts the selected columns of `input` under the KWK `key`.
pub fn encrypt(
    backend: &dyn KeyBackend,
    key: &KeyRef,
    opts: &ColumnOptions,
    input: impl Read + Send + 'static,
    output: impl Write,
) -> Result<ColumnStats> {
    if opts.batch_size == 0 || opts.batch_size > MAX_BATCH_SIZE {
        return Err(Error::usage(format!(
            "--batch-size must be between 1 and {MAX_BATCH_SIZE}"
        )));
    }
    run(Mode::Encrypt(backend, key), opts, input, output)
}

/// Decrypts the tokens in the selected columns of `input`.
pub fn decrypt(
    backend: &dyn KeyBackend,
    opts: &ColumnOptions,
    input: impl Read + Send + 'static,
    output: impl Write,
) -> Result<ColumnStats> {
    run(Mode::Decrypt(backend), opts, input, output)
}

/// Rewraps the batch key of every token in the selected columns to `target`
/// (the current KWK version) without touching the encrypted records.
pub fn rotate(
    backend: &dyn KeyBackend,
    target: &KeyRef,
    opts: &ColumnOptions,
    input: impl Read + Send + 'static,
    output: impl Write,
) -> Result<ColumnStats> {
    run(Mode::Rotate(backend, target), opts, input, output)
}

/// Parses and rewrites the selected columns without any cryptography: the
/// speed ceiling the benchmark compares against.
pub fn passthrough(
    opts: &ColumnOptions,
    input: impl Read + Send + 'static,
    output: impl Write,
) -> Result<ColumnStats> {
    run(Mode::Passthrough, opts, input, output)
}

#[derive(Clone, Copy)]
enum Mode<'a> {
    Encrypt(&'a dyn KeyBackend, &'a KeyRef),
    Decrypt(&'a dyn KeyBackend),
    Rotate(&'a dyn KeyBackend, &'a KeyRef),
    Passthrough,
}

/// A selected column.
struct Slot {
    id: ColumnId,
    /// 0-based field position (tables only).
    pos: usize,
    /// Binding prefix (everything but the row id).
    prefix: Vec<u8>,
}

/// Where the selected columns are, resolved from the header or positions.
struct Layout {
    fmt: Format,
    /// Tables: in field order. JSONL: in `--columns` order.
    slots: Vec<Slot>,
    row_id: Option<(ColumnId, usize)>,
    /// Fields per record (tables).
    nfields: usize,
    /// Field position -> slot index + 1 (0: not selected); the row id
    /// column maps to `slots.len() + 1`.
    slot_of: Vec<u32>,
}

impl Layout {
    /// Field spans recorded per record.
    fn width(&self) -> usize {
        self.slots.len() + usize::from(self.row_id.is_some())
    }
}

/// A field's raw span in its block, quotes included.
#[derive(Debug, Clone, Copy, Default)]
struct Field {
    start: u32,
    end: u32,
    quoted: bool,
}

#[derive(Debug, Clone, Copy)]
struct Rec {
    /// End of the record in the block, terminator included; it starts where
    /// the previous one ends.
    end: u32,
    /// Copied as it is (pgcopy `\.`, blank JSONL line).
    raw: bool,
}

struct Block {
    seq: u64,
    first_row: u64,
    data: Vec<u8>,
    recs: Vec<Rec>,
    /// `layout.width()` fields per record (tables).
    fields: Vec<Field>,
}

enum Done {
    Ok(u64, Vec<u8>),
    Err(u64, Error),
}

/// Recycled byte buffers, so blocks do not fault in fresh pages. Input and
/// output buffers are kept apart: their sizes differ several times over.
#[derive(Default)]
struct Pool {
    inputs: Mutex<Vec<Vec<u8>>>,
    outputs: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    fn take(list: &Mutex<Vec<Vec<u8>>>) -> Vec<u8> {
        list.lock().expect("pool lock").pop().unwrap_or_default()
    }
    fn give(list: &Mutex<Vec<Vec<u8>>>, mut v: Vec<u8>) {
        v.clear();
        let mut p = list.lock().expect("pool lock");
        if p.len() < 32 {
            p.push(v);
        }
    }
}

/// How a run ends early.
struct Halt {
    /// Everyone should leave: the writer is done, or a worker could not start.
    over: AtomicBool,
    /// The lowest block sequence number that failed: blocks after it need
    /// not be made; blocks before it still must, they are written first.
    error_at: AtomicU64,
}

impl Halt {
    fn new() -> Self {
        Halt {
            over: AtomicBool::new(false),
            error_at: AtomicU64::new(u64::MAX),
        }
    }
    fn end(&self) {
        self.over.store(true, Ordering::Relaxed);
    }
    fn fail(&self, seq: u64) {
        self.error_at.fetch_min(seq, Ordering::Relaxed);
    }
    fn is_over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }
    /// True if no more blocks should be read.
    fn stop_reading(&self) -> bool {
        self.is_over() || self.error_at.load(Ordering::Relaxed) != u64::MAX
    }
    fn skip(&self, seq: u64) -> bool {
        seq > self.error_at.load(Ordering::Relaxed)
    }
}

/// Buffered input with the unconsumed part at `buf[pos..]`.
struct Source<R> {
    input: R,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
}

impl<R: Read> Source<R> {
    /// Drops `buf[..pos]` and reads more: at least a chunk, and as much as
    /// is already buffered so re-scanning a long record stays linear.
    fn more(&mut self) -> Result<()> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let want = READ_CHUNK.max(self.buf.len());
        let n = (&mut self.input)
            .take(want as u64)
            .read_to_end(&mut self.buf)
            .map_err(|e| Error::io(format!("reading the input: {e}")))?;
        if n == 0 {
            self.eof = true;
        }
        Ok(())
    }
}

/// Parses one record of any format at the start of `buf`.
fn parse_one(
    fmt: Format,
    buf: &[u8],
    eof: bool,
    on_field: impl FnMut(usize, usize, usize, bool) -> Result<()>,
) -> Result<Option<(usize, usize)>> {
    match fmt {
        Format::Csv | Format::Tsv => csv::parse_record(buf, eof, fmt.delim(), on_field),
        Format::PgCopy => pgcopy::parse_record(buf, eof, on_field),
        Format::Jsonl => Ok(match scan::find1(buf, b'\n') {
            Some(p) => Some((p + 1, 0)),
            None if eof => Some((buf.len(), 0)),
            None => None,
        }),
    }
}

fn row_err(row: u64, e: Error) -> Error {
    e.context(format!("row {row}"))
}

/// Reads the first record fully: `(raw bytes incl. terminator, decoded fields)`.
fn first_record<R: Read>(
    src: &mut Source<R>,
    fmt: Format,
) -> Result<Option<(usize, Vec<Vec<u8>>)>> {
    loop {
        if src.pos == src.buf.len() && src.eof {
            return Ok(None);
        }
        if src.pos < src.buf.len() {
            let buf = &src.buf[src.pos..];
            let mut spans = Vec::new();
            let parsed = parse_one(fmt, buf, src.eof, |_, s, e, q| {
                spans.push((s, e, q));
                Ok(())
            });
            // Checked on errors too: the marker's second line is an
            // unterminated CSV quoted field.
            if (parsed.is_err() || matches!(parsed, Ok(Some(_)))) && abort::begins_with_marker(buf)
            {
                return Err(row_err(1, abort::found()));
            }
            if let Some((len, _)) = parsed.map_err(|e| row_err(1, e))? {
                let mut scratch = Vec::new();
                let fields = spans
                    .into_iter()
                    .map(|(s, e, q)| match fmt {
                        Format::PgCopy => pgcopy::decode(&buf[s..e], &mut scratch).to_vec(),
                        _ => csv::unquote(&buf[s..e], q, &mut scratch).to_vec(),
                    })
                    .collect();
                return Ok(Some((len, fields)));
            }
            if src.buf.len() - src.pos > MAX_RECORD {
                return Err(row_err(1, too_long()));
            }
        }
        src.more()?;
    }
}

fn too_long() -> Error {
    Error::format(format!(
        "record longer than {} MiB (no record terminator?)",
        MAX_RECORD >> 20
    ))
}

/// Checks `--columns`/`--row-id` and resolves them against the header (or
/// the first record's width with `--no-header`). `width` is `None` when
/// there is no record at all (or for JSONL).
fn layout(
    opts: &ColumnOptions,
    header: Option<&[Vec<u8>]>,
    width: Option<usize>,
) -> Result<Layout> {
    let fmt = opts.format;
    if opts.columns.is_empty() {
        return Err(Error::usage("no columns selected: pass --columns a,b"));
    }
    for (i, c) in opts.columns.iter().enumerate() {
        if c.is_empty() {
            return Err(Error::usage("--columns has an empty column name"));
        }
        if opts.columns[..i].contains(c) {
            return Err(Error::usage(format!("column {c:?} is selected twice")));
        }
        if opts.row_id.as_deref() == Some(c) {
            return Err(Error::usage(format!(
                "column {c:?} is the --row-id column and cannot also be encrypted"
            )));
        }
    }
    let by_index = fmt.is_table() && !opts.header;
    let resolve = |name: &str| -> Result<(ColumnId, usize)> {
        if !fmt.is_table() {
            return Ok((ColumnId::Name(name.to_string()), 0));
        }
        if by_index {
            let i: usize = name.parse().ok().filter(|&i| i >= 1).ok_or_else(|| {
                Error::usage(format!(
                    "with --no-header, columns are 1-based positions: {name:?} is not one"
                ))
            })?;
            if let Some(width) = width.filter(|&w| i > w) {
                return Err(Error::usage(format!(
                    "row 1: column {i} selected but the row has only {width} fields"
                )));
            }
            return Ok((ColumnId::Index(i as u32), i - 1));
        }
        let names = header.unwrap_or_default();
        let hits: Vec<usize> = (0..names.len())
            .filter(|&i| names[i] == name.as_bytes())
            .collect();
        match hits.len() {
            1 => Ok((ColumnId::Name(name.to_string()), hits[0])),
            // The header's names are not listed: if the first line is in
            // fact data, they would put plaintext into an error message.
            0 => Err(Error::usage(format!(
                "column {name:?} is not in the header ({} columns); if the input has no header, pass --no-header and 1-based positions",
                names.len()
            ))),
            n => Err(Error::format(format!(
                "column {name:?} appears {n} times in the header"
            ))),
        }
    };
    let mut slots = Vec::new();
    for c in &opts.columns {
        let (id, pos) = resolve(c)?;
        slots.push(Slot {
            prefix: binding_prefix(&opts.context, &id),
            id,
            pos,
        });
    }
    let row_id = opts.row_id.as_deref().map(resolve).transpose()?;
    if fmt.is_table() {
        slots.sort_by_key(|s| s.pos);
        // Names were compared as written; positions can still collide
        // ("1" and "01").
        if let Some(w) = slots.windows(2).find(|w| w[0].pos == w[1].pos) {
            return Err(Error::usage(format!("{} is selected twice", w[0].id)));
        }
        if let Some((id, p)) = &row_id {
            if slots.iter().any(|s| s.pos == *p) {
                return Err(Error::usage(format!(
                    "{id} is the --row-id column and cannot also be encrypted"
                )));
            }
        }
    }
    let width = width.unwrap_or(0);
    let mut slot_of = vec![0u32; if fmt.is_table() { width } else { 0 }];
    for (j, s) in slots.iter().enumerate() {
        if let Some(x) = slot_of.get_mut(s.pos) {
            *x = j as u32 + 1;
        }
    }
    if let Some(x) = row_id.as_ref().and_then(|(_, p)| slot_of.get_mut(*p)) {
        *x = slots.len() as u32 + 1;
    }
    Ok(Layout {
        fmt,
        slots,
        row_id,
        nfields: width,
        slot_of,
    })
}

fn run(
    mode: Mode<'_>,
    opts: &ColumnOptions,
    input: impl Read + Send + 'static,
    mut output: impl Write,
) -> Result<ColumnStats> {
    let t0 = Instant::now();
    let fmt = opts.format;
    if fmt == Format::Jsonl && !opts.header {
        return Err(Error::usage(
            "--no-header does not apply to JSONL: --columns names top-level keys",
        ));
    }
    let mut src = Source {
        input,
        buf: Vec::with_capacity(READ_CHUNK * 2),
        pos: 0,
        eof: false,
    };
    while src.buf.len() < UTF8_BOM.len() && !src.eof {
        src.more()?;
    }
    let mut head = Vec::new();
    if src.buf.starts_with(UTF8_BOM) {
        head.extend_from_slice(UTF8_BOM);
        src.pos = UTF8_BOM.len();
    }
    let mut first_row = 1;
    let layout = if fmt.is_table() {
        match first_record(&mut src, fmt)? {
            // Empty input. With a header expected, that is an error (there
            // is no header to find the columns in); without, an empty dump
            // just stays empty.
            None if opts.header => layout(opts, Some(&[]), Some(0))?,
            None => layout(opts, None, None)?,
            Some((len, fields)) if opts.header => {
                let l = layout(opts, Some(&fields), Some(fields.len()))?;
                head.extend_from_slice(&src.buf[src.pos..src.pos + len]);
                src.pos += len;
                first_row = 2;
                l
            }
            Some((_, fields)) => layout(opts, None, Some(fields.len()))?,
        }
    } else {
        layout(opts, None, None)?
    };
    output
        .write_all(&head)
        .map_err(|e| Error::io(format!("writing the output: {e}")))?;
    let mut stats = ColumnStats {
        bytes_out: head.len() as u64,
        ..Default::default()
    };
    let jobs = if opts.jobs == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.jobs
    };
    let batch_cache = BatchCache::new();
    let rewrap_cache = RewrapCache::new();
    let pool = Arc::new(Pool::default());
    let stop = Arc::new(Halt::new());
    let in_flight = jobs * 3 + 2;
    let (work_tx, work_rx) = mpsc::channel::<Block>();
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    let (slot_tx, slot_rx) = mpsc::sync_channel::<()>(in_flight);
    for _ in 0..in_flight {
        slot_tx.send(()).expect("slot channel has room");
    }
    let layout = Arc::new(layout);
    stats.bytes_in = src.pos as u64;
    // The reader is detached (not scoped): if the writer stops on an error
    // while the reader is blocked reading a pipe, the run still returns.
    {
        let (layout, pool, stop, done_tx) =
            (layout.clone(), pool.clone(), stop.clone(), done_tx.clone());
        std::thread::Builder::new()
            .name("hsmseal-columns-reader".into())
            .spawn(move || {
                let r = read_blocks(
                    &mut src, &layout, first_row, &work_tx, &slot_rx, &pool, &stop,
                );
                if let Err((seq, e)) = r {
                    stop.fail(seq);
                    let _ = done_tx.send(Done::Err(seq, e));
                }
            })
            .map_err(|e| Error::io(format!("cannot start the reader thread: {e}")))?;
    }
    let worker_totals = std::thread::scope(|scope| -> Result<Vec<WorkerStats>> {
        let mut handles = Vec::new();
        for _ in 0..jobs {
            let (layout, pool, stop, done_tx, work_rx) =
                (&*layout, &*pool, &*stop, done_tx.clone(), &work_rx);
            let (batch_cache, rewrap_cache) = (&batch_cache, &rewrap_cache);
            let h = std::thread::Builder::new()
                .name("hsmseal-columns-worker".into())
                .spawn_scoped(scope, move || {
                    worker(
                        mode,
                        opts,
                        layout,
                        batch_cache,
                        rewrap_cache,
                        work_rx,
                        &done_tx,
                        pool,
                        stop,
                    )
                })
                .map_err(|e| {
                    stop.end();
                    Error::io(format!("cannot start a worker thread: {e}"))
                })?;
            handles.push(h);
        }
        drop(done_tx);
        let written = write_in_order(&done_rx, &slot_tx, &pool, &mut output, &stop);
        // Let idle workers and the reader see the end (or the error).
        stop.end();
        drop(slot_tx);
        let mut totals = Vec::new();
        for h in handles {
            totals.push(h.join().unwrap_or_else(|_| {
                Err(Error::format("internal error: a worker thread panicked"))
            })?);
        }
        let out_bytes = written?;
        stats.bytes_out += out_bytes;
        Ok(totals)
    })?;
    output
        .flush()
        .map_err(|e| Error::io(format!("writing the output: {e}")))?;
    let mut seen = vec![false; layout.slots.len()];
    for w in &worker_totals {
        stats.rows += w.rows;
        stats.cells += w.cells;
        stats.nulls += w.nulls;
        stats.plaintext += w.plaintext;
        stats.tokens_skipped += w.tokens_skipped;
        stats.nested += w.nested;
        stats.batches += w.batches;
        stats.hsm_calls += w.hsm_calls;
        stats.bytes_in += w.bytes_in;
        for (s, w) in seen.iter_mut().zip(&w.seen) {
            *s |= *w;
        }
    }
    match mode {
        Mode::Decrypt(_) => {
            stats.hsm_calls += batch_cache.hsm_calls();
            stats.batches = batch_cache.hsm_calls();
        }
        Mode::Rotate(..) => {
            stats.hsm_calls += rewrap_cache.hsm_calls();
            stats.batches = rewrap_cache.hsm_calls() / 2;
        }
        _ => {}
    }
    if fmt == Format::Jsonl && stats.rows > 0 {
        if let Some(s) = layout.slots.iter().zip(&seen).find(|(_, &seen)| !seen) {
            return Err(Error::format(format!(
                "key {:?} does not occur in any row: check --columns",
                match &s.0.id {
                    ColumnId::Name(n) => n.clone(),
                    ColumnId::Index(i) => i.to_string(),
                }
            )));
        }
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok(stats)
}

/// The reader thread: cuts `src` into blocks. An error is returned with the
/// sequence number it takes in the output.
fn read_blocks<R: Read>(
    src: &mut Source<R>,
    layout: &Layout,
    first_row: u64,
    work_tx: &mpsc::Sender<Block>,
    slot_rx: &mpsc::Receiver<()>,
    pool: &Pool,
    stop: &Halt,
) -> std::result::Result<(), (u64, Error)> {
    let fmt = layout.fmt;
    let width = layout.width();
    let table = fmt.is_table();
    let mut seq = 0u64;
    let mut row = first_row;
    loop {
        let mut recs = Vec::with_capacity(BLOCK_ROWS);
        let mut fields = Vec::with_capacity(if table { BLOCK_ROWS * width } else { 0 });
        let block_row = row;
        let mut blk = src.pos;
        let mut p = src.pos;
        loop {
            if recs.len() >= BLOCK_ROWS || p - blk >= BLOCK_BYTES {
                break;
            }
            if p == src.buf.len() {
                // Hand over what we have before reading: refilling with a
                // block pending would move the whole block in memory.
                if src.eof || !recs.is_empty() {
                    break;
                }
                src.pos = blk;
                let rel = p - blk;
                src.more().map_err(|e| (seq, e))?;
                blk = 0;
                p = rel;
                continue;
            }
            let off = p - blk;
            let base = fields.len();
            if table {
                fields.resize(base + width, Field::default());
            }
            let slot_of = &layout.slot_of;
            let parsed = parse_one(fmt, &src.buf[p..], src.eof, |idx, s, e, q| {
                if let Some(&k) = slot_of.get(idx) {
                    if k != 0 {
                        fields[base + k as usize - 1] = Field {
                            start: (off + s) as u32,
                            end: (off + e) as u32,
                            quoted: q,
                        };
                    }
                }
                Ok(())
            });
            // The abort marker of a failed hsmseal run upstream: refused, not
            // encrypted into a token or copied (one byte compare per record).
            if (parsed.is_err() || matches!(parsed, Ok(Some(_))))
                && abort::begins_with_marker(&src.buf[p..])
            {
                return Err((seq, row_err(row, abort::found())));
            }
            let parsed = parsed.map_err(|e| (seq, row_err(row, e)))?;
            match parsed {
                None => {
                    fields.truncate(base);
                    if src.buf.len() - p > MAX_RECORD {
                        return Err((seq, row_err(row, too_long())));
                    }
                    if !recs.is_empty() {
                        break;
                    }
                    src.pos = blk;
                    let rel = p - blk;
                    src.more().map_err(|e| (seq, e))?;
                    blk = 0;
                    p = rel;
                }
                Some((len, nf)) => {
                    let line = &src.buf[p..p + len];
                    let raw = match fmt {
                        Format::PgCopy => nf == 1 && pgcopy::is_end_marker(trim_terminator(line)),
                        Format::Jsonl => line.iter().all(u8::is_ascii_whitespace),
                        _ => false,
                    };
                    if table && !raw && nf != layout.nfields {
                        return Err((
                            seq,
                            Error::format(format!(
                                "row {row}: has {nf} fields, expected {} (ragged row)",
                                layout.nfields
                            )),
                        ));
                    }
                    p += len;
                    recs.push(Rec {
                        end: (p - blk) as u32,
                        raw,
                    });
                    row += 1;
                }
            }
        }
        if recs.is_empty() {
            return Ok(());
        }
        // Wait for a free slot: this is what bounds memory. Poll `stop` so
        // a run that failed elsewhere never leaves the reader waiting.
        loop {
            if stop.stop_reading() {
                return Ok(());
            }
            match slot_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
        let mut data = Pool::take(&pool.inputs);
        data.extend_from_slice(&src.buf[blk..p]);
        src.pos = p;
        let block = Block {
            seq,
            first_row: block_row,
            data,
            recs,
            fields,
        };
        if work_tx.send(block).is_err() {
            return Ok(());
        }
        seq += 1;
    }
}

/// Writes finished blocks in sequence order; returns the bytes written or
/// the first error in input order.
fn write_in_order(
    done_rx: &mpsc::Receiver<Done>,
    slot_tx: &mpsc::SyncSender<()>,
    pool: &Pool,
    output: &mut impl Write,
    stop: &Halt,
) -> Result<u64> {
    let mut pending: BTreeMap<u64, std::result::Result<Vec<u8>, Error>> = BTreeMap::new();
    let mut next = 0u64;
    let mut written = 0u64;
    while let Ok(d) = done_rx.recv() {
        match d {
            Done::Ok(seq, buf) => pending.insert(seq, Ok(buf)),
            Done::Err(seq, e) => {
                // Later blocks no longer matter; earlier ones still get written.
                stop.fail(seq);
                pending.insert(seq, Err(e))
            }
        };
        while let Some(r) = pending.remove(&next) {
            let buf = r?;
            output
                .write_all(&buf)
                .map_err(|e| Error::io(format!("writing the output: {e}")))?;
            written += buf.len() as u64;
            Pool::give(&pool.outputs, buf);
            next += 1;
            let _ = slot_tx.try_send(());
        }
    }
    // All senders gone: anything left is behind a gap left by an error that
    // was already returned, or an internal bug.
    if let Some((_, r)) = pending.into_iter().next() {
        r?;
        return Err(Error::format("internal error: output block missing"));
    }
    Ok(written)
}

#[derive(Default)]
struct WorkerStats {
    rows: u64,
    cells: u64,
    nulls: u64,
    plaintext: u64,
    tokens_skipped: u64,
    nested: u64,
    batches: u64,
    hsm_calls: u64,
    bytes_in: u64,
    seen: Vec<bool>,
}

/// What a worker does to one cell.
enum Crypto<'a> {
    Seal(Box<Sealer<'a>>),
    Open(Opener<'a>),
    Rewrap(Rewrapper<'a>),
    Copy,
}

/// Per-worker state: the crypto engine and reused scratch buffers.
struct Worker<'a> {
    crypto: Crypto<'a>,
    allow_plaintext: bool,
    skip_tokens: bool,
    nested: bool,
    /// The format the dump is read as.
    fmt: Format,
    /// Encrypt: the format bits of every token's flags.
    fmt_flags: u8,
    /// Decrypt: bit `c` set if tokens with format code `c` are accepted
    /// (bit 0, tokens that record none, always).
    accept: u8,
    aad: Vec<u8>,
    scratch: Vec<u8>,
    /// An inner token being opened (`--nested`).
    inner: Vec<u8>,
    /// A JSON string value decoded for a table format.
    conv: Vec<u8>,
    rid: Vec<u8>,
    members: Vec<jsonl::Member>,
    found: Vec<Option<usize>>,
    stats: WorkerStats,
}

#[allow(clippy::too_many_arguments)]
fn worker(
    mode: Mode<'_>,
    opts: &ColumnOptions,
    layout: &Layout,
    batch_cache: &BatchCache,
    rewrap_cache: &RewrapCache,
    work_rx: &Mutex<mpsc::Receiver<Block>>,
    done_tx: &mpsc::Sender<Done>,
    pool: &Pool,
    stop: &Halt,
) -> Result<WorkerStats> {
    // A panic (a bug) must not leave the reader and writer waiting for this
    // worker's block forever.
    struct EndOnPanic<'a>(&'a Halt);
    impl Drop for EndOnPanic<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.end();
            }
        }
    }
    let _guard = EndOnPanic(stop);
    let crypto = match mode {
        Mode::Encrypt(b, k) => match Sealer::new(b, k, opts.batch_size) {
            Ok(s) => Crypto::Seal(Box::new(s)),
            Err(e) => {
                // Without this worker the run cannot finish: end it.
                stop.end();
                return Err(e);
            }
        },
        Mode::Decrypt(b) => Crypto::Open(Opener::new(b, batch_cache)),
        Mode::Rotate(b, k) => Crypto::Rewrap(Rewrapper::new(b, k, rewrap_cache)),
        Mode::Passthrough => Crypto::Copy,
    };
    let accept = opts
        .token_formats
        .iter()
        .fold(1 | 1 << token::format_code(opts.format), |m, f| {
            m | 1 << token::format_code(*f)
        });
    let mut w = Worker {
        crypto,
        allow_plaintext: opts.allow_plaintext,
        skip_tokens: opts.skip_tokens,
        nested: opts.nested,
        fmt: opts.format,
        fmt_flags: token::format_flags(opts.format),
        accept,
        aad: Vec::with_capacity(128),
        scratch: Vec::new(),
        inner: Vec::new(),
        conv: Vec::new(),
        rid: Vec::new(),
        members: Vec::new(),
        found: Vec::new(),
        stats: WorkerStats {
            seen: vec![false; layout.slots.len()],
            ..Default::default()
        },
    };
    loop {
        let next = {
            let rx = work_rx.lock().expect("work queue lock");
            rx.recv_timeout(Duration::from_millis(50))
        };
        let block = match next {
            Ok(b) => b,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if stop.is_over() {
                    break;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if stop.skip(block.seq) {
            // An earlier block failed: this one will never be written.
            let _ = done_tx.send(Done::Err(block.seq, Error::format("stopped")));
            continue;
        }
        let mut out = Pool::take(&pool.outputs);
        // Encrypting turns each cell into a ~200-byte token: reserve for it
        // so the buffer is not regrown (and copied) while filling.
        let cells = block.recs.len() * layout.slots.len();
        out.reserve(match mode {
            Mode::Encrypt(..) => block.data.len() + cells * 224,
            _ => block.data.len(),
        });
        let r = if layout.fmt.is_table() {
            w.table_block(layout, &block, &mut out)
        } else {
            w.jsonl_block(layout, &block, &mut out)
        };
        w.stats.bytes_in += block.data.len() as u64;
        Pool::give(&pool.inputs, block.data);
        let msg = match r {
            Ok(()) => Done::Ok(block.seq, out),
            Err(e) => {
                stop.fail(block.seq);
                Done::Err(block.seq, e)
            }
        };
        if done_tx.send(msg).is_err() {
            break;
        }
    }
    if let Crypto::Seal(s) = &w.crypto {
        w.stats.batches = s.batches;
        w.stats.hsm_calls = s.hsm_calls;
    }
    Ok(w.stats)
}

fn cell_err(row: u64, col: &ColumnId, e: Error) -> Error {
    e.context(format!("row {row}, {col}"))
}

fn plaintext_err() -> Error {
    Error::format(
        "expected an hsmseal token but found a plaintext value (pass --allow-plaintext to copy such values)",
    )
}

fn already_token_err() -> Error {
    Error::format(
        "the value already is an hsmseal token (is this dump partly encrypted?); pass --skip-tokens to leave such values as they are",
    )
}

/// Most layers `--nested` opens: a cell encrypted more often than this is
/// not a leftover of re-running encrypt.
const MAX_NESTING: u32 = 8;

/// Opens the token `text` under binding `aad` and checks the format it
/// records; with `nested`, opens a value that is itself a token again
/// (counted in `layers`). The value is then `o.last_value()`.
#[allow(clippy::too_many_arguments)]
fn open_cell(
    o: &mut Opener<'_>,
    aad: &[u8],
    text: &[u8],
    fmt: Format,
    accept: u8,
    nested: bool,
    inner: &mut Vec<u8>,
    layers: &mut u64,
) -> Result<u8> {
    let mut flags = o.open(aad, text)?.0;
    check_format(flags, fmt, accept)?;
    let mut depth = 0;
    while looks_like_token(o.last_value()) {
        if !nested {
            return Err(Error::format(
                "the value decrypts to another hsmseal token: it was encrypted twice (by a columns encrypt that did not refuse tokens yet); pass --nested to decrypt every layer",
            ));
        }
        depth += 1;
        if depth > MAX_NESTING {
            return Err(Error::format(format!(
                "the value is encrypted more than {MAX_NESTING} times over"
            )));
        }
        inner.clear();
        inner.extend_from_slice(o.last_value());
        flags = o
            .open(aad, inner)
            .map_err(|e| e.context(format!("inner token (layer {})", depth + 1)))?
            .0;
        check_format(flags, fmt, accept)?;
        *layers += 1;
    }
    Ok(flags)
}

/// Refuses a token whose recorded dump format is not accepted: its value
/// was decoded under another dialect's rules, and writing it back under
/// this one's is wrong if the dump was read with the wrong `--format`.
fn check_format(flags: u8, fmt: Format, accept: u8) -> Result<()> {
    let Some(made) = token::token_format(flags) else {
        return Ok(());
    };
    if accept & 1 << token::format_code(made) != 0 {
        return Ok(());
    }
    Err(Error::format(format!(
        "the token was made from a {made} dump but this dump is read as {fmt}, so its value would be written with {fmt}'s escaping: check --format; if the tokens were moved on purpose (e.g. a CSV dump loaded into PostgreSQL and exported with COPY), pass --token-format {made}",
        made = made.name(),
        fmt = fmt.name(),
    )))
}

/// A decrypted value as text for a table format: a JSON-flagged string
/// (from a JSONL dump) is decoded to its characters, so a cross-format
/// move never writes JSON escapes into a CSV or COPY field; other JSON
/// values (numbers, booleans, objects, arrays) are their JSON text.
fn table_text<'v>(v: &'v [u8], flags: u8, conv: &'v mut Vec<u8>) -> Result<&'v [u8]> {
    if flags & FLAG_JSON == 0 || v.first() != Some(&b'"') {
        return Ok(v);
    }
    let s = serde_json::from_slice::<String>(v).map_err(|_| {
        Error::format(
            "the value is a JSON string that cannot be written as text (a lone surrogate escape)",
        )
    })?;
    conv.clear();
    conv.extend_from_slice(s.as_bytes());
    Ok(conv)
}

impl Worker<'_> {
    /// CSV, TSV and pgcopy.
    fn table_block(&mut self, layout: &Layout, b: &Block, out: &mut Vec<u8>) -> Result<()> {
        let fmt = layout.fmt;
        let width = layout.width();
        let nslots = layout.slots.len();
        let data = &b.data[..];
        let mut start = 0usize;
        for (r, rec) in b.recs.iter().enumerate() {
            let end = rec.end as usize;
            if rec.raw {
                out.extend_from_slice(&data[start..end]);
                start = end;
                continue;
            }
            let row = b.first_row + r as u64;
            self.stats.rows += 1;
            let fs = &b.fields[r * width..(r + 1) * width];
            let mut rid_buf = std::mem::take(&mut self.rid);
            let rid = match &layout.row_id {
                None => None,
                Some((id, _)) => {
                    let f = fs[nslots];
                    let raw = &data[f.start as usize..f.end as usize];
                    if is_null(fmt, raw, f.quoted) {
                        return Err(cell_err(
                            row,
                            id,
                            Error::format("the --row-id value is NULL"),
                        ));
                    }
                    Some(decode(fmt, raw, f.quoted, &mut rid_buf))
                }
            };
            let mut cur = start;
            for (j, slot) in layout.slots.iter().enumerate() {
                let f = fs[j];
                let (fs_, fe) = (f.start as usize, f.end as usize);
                out.extend_from_slice(&data[cur..fs_]);
                cur = fe;
                // A trailing CR in the last field must be quoted only where
                // a lone LF follows (bare, the two would read back as a
                // CRLF). Before a CRLF or at the end of input it reads back
                // as it is, so it stays bare and the dump round-trips (found
                // by fuzzing: fuzz/regressions/tsv/).
                let last = slot.pos + 1 == layout.nfields && &data[fe..end] == b"\n";
                self.table_cell(fmt, slot, &data[fs_..fe], f.quoted, rid, last, out)
                    .map_err(|e| cell_err(row, &slot.id, e))?;
            }
            out.extend_from_slice(&data[cur..end]);
            start = end;
            self.rid = rid_buf;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn table_cell(
        &mut self,
        fmt: Format,
        slot: &Slot,
        raw: &[u8],
        quoted: bool,
        rid: Option<&[u8]>,
        last: bool,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if is_null(fmt, raw, quoted) {
            self.stats.nulls += 1;
            out.extend_from_slice(raw);
            return Ok(());
        }
        let value = decode(fmt, raw, quoted, &mut self.scratch);
        let write = |out: &mut Vec<u8>, v: &[u8], quoted: bool| match fmt {
            Format::PgCopy => pgcopy::encode(v, out),
            _ => csv::write_field(out, v, quoted, fmt.delim(), last),
        };
        match &mut self.crypto {
            Crypto::Copy => write(out, value, quoted),
            Crypto::Seal(s) => {
                if looks_like_token(value) {
                    if !self.skip_tokens {
                        return Err(already_token_err());
                    }
                    self.stats.tokens_skipped += 1;
                    out.extend_from_slice(raw);
                    return Ok(());
                }
                binding(&mut self.aad, &slot.prefix, rid);
                let mut flags = self.fmt_flags;
                if quoted && fmt != Format::PgCopy {
                    flags |= FLAG_QUOTED;
                }
                s.seal(&self.aad, flags, value, out)?;
            }
            Crypto::Open(o) => {
                // Any value with the prefix must open, even with
                // --allow-plaintext: a damaged token is never "plaintext".
                if !value.starts_with(PREFIX) {
                    if !self.allow_plaintext {
                        return Err(plaintext_err());
                    }
                    self.stats.plaintext += 1;
                    out.extend_from_slice(raw);
                    return Ok(());
                }
                binding(&mut self.aad, &slot.prefix, rid);
                let flags = open_cell(
                    o,
                    &self.aad,
                    value,
                    self.fmt,
                    self.accept,
                    self.nested,
                    &mut self.inner,
                    &mut self.stats.nested,
                )?;
                let v = table_text(o.last_value(), flags, &mut self.conv)?;
                write(out, v, flags & FLAG_QUOTED != 0);
            }
            Crypto::Rewrap(rw) => {
                if !value.starts_with(PREFIX) {
                    if !self.allow_plaintext {
                        return Err(plaintext_err());
                    }
                    self.stats.plaintext += 1;
                    out.extend_from_slice(raw);
                    return Ok(());
                }
                if quoted {
                    out.push(b'"');
                }
                rw.rewrap(value, out)?;
                if quoted {
                    out.push(b'"');
                }
            }
        }
        self.stats.cells += 1;
        Ok(())
    }

    fn jsonl_block(&mut self, layout: &Layout, b: &Block, out: &mut Vec<u8>) -> Result<()> {
        let data = &b.data[..];
        let mut start = 0usize;
        for (r, rec) in b.recs.iter().enumerate() {
            let end = rec.end as usize;
            let row = b.first_row + r as u64;
            if rec.raw {
                out.extend_from_slice(&data[start..end]);
                start = end;
                continue;
            }
            self.stats.rows += 1;
            let mut line_end = end;
            if line_end > start && data[line_end - 1] == b'\n' {
                line_end -= 1;
                if line_end > start && data[line_end - 1] == b'\r' {
                    line_end -= 1;
                }
            }
            let line = &data[start..line_end];
            self.jsonl_line(layout, line, row, out)?;
            out.extend_from_slice(&data[line_end..end]);
            start = end;
        }
        Ok(())
    }

    fn jsonl_line(
        &mut self,
        layout: &Layout,
        line: &[u8],
        row: u64,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if let Err(e) = std::str::from_utf8(line) {
            return Err(Error::format(format!(
                "row {row}: invalid UTF-8 at byte {} of the line (JSON must be UTF-8)",
                e.valid_up_to() + 1
            )));
        }
        let mut members = std::mem::take(&mut self.members);
        jsonl::parse_object(line, &mut members).map_err(|e| row_err(row, e))?;
        let nslots = layout.slots.len();
        self.found.clear();
        self.found.resize(nslots + 1, None);
        for (mi, m) in members.iter().enumerate() {
            let key = &line[m.key.0..m.key.1];
            for (j, slot) in layout.slots.iter().enumerate() {
                if let ColumnId::Name(n) = &slot.id {
                    if jsonl::key_is(key, n) {
                        if self.found[j].is_some() {
                            return Err(cell_err(
                                row,
                                &slot.id,
                                Error::format("the key occurs twice in the object"),
                            ));
                        }
                        self.found[j] = Some(mi);
                        self.stats.seen[j] = true;
                    }
                }
            }
            if let Some((ColumnId::Name(n), _)) = &layout.row_id {
                if jsonl::key_is(key, n) {
                    if self.found[nslots].is_some() {
                        return Err(cell_err(
                            row,
                            &layout.row_id.as_ref().expect("some").0,
                            Error::format("the key occurs twice in the object"),
                        ));
                    }
                    self.found[nslots] = Some(mi);
                }
            }
        }
        let mut rid_buf = std::mem::take(&mut self.rid);
        let rid: Option<&[u8]> = match &layout.row_id {
            None => None,
            Some((id, _)) => {
                let m = self.found[nslots].ok_or_else(|| {
                    cell_err(row, id, Error::format("the --row-id key is missing"))
                })?;
                let raw = &line[members[m].value.0..members[m].value.1];
                match raw[0] {
                    b'"' => {
                        Some(jsonl::string_value(raw, &mut rid_buf).ok_or_else(|| {
                            cell_err(row, id, Error::format("invalid JSON string"))
                        })?)
                    }
                    b'{' | b'[' | b'n' => {
                        return Err(cell_err(
                            row,
                            id,
                            Error::format("the --row-id value must be a string, number or boolean"),
                        ))
                    }
                    _ => Some(raw),
                }
            }
        };
        let mut cur = 0;
        for (mi, m) in members.iter().enumerate() {
            let Some(j) = self.found[..nslots].iter().position(|f| *f == Some(mi)) else {
                continue;
            };
            let slot = &layout.slots[j];
            out.extend_from_slice(&line[cur..m.value.0]);
            cur = m.value.1;
            self.json_cell(slot, &line[m.value.0..m.value.1], rid, out)
                .map_err(|e| cell_err(row, &slot.id, e))?;
        }
        out.extend_from_slice(&line[cur..]);
        self.rid = rid_buf;
        self.members = members;
        Ok(())
    }

    fn json_cell(
        &mut self,
        slot: &Slot,
        raw: &[u8],
        rid: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if raw == b"null" {
            self.stats.nulls += 1;
            out.extend_from_slice(raw);
            return Ok(());
        }
        match &mut self.crypto {
            Crypto::Seal(s) => {
                let (flags, v) = match jsonl::plain(raw, &mut self.scratch)? {
                    jsonl::Plain::Str(v) => (0, v),
                    jsonl::Plain::Json(v) => (FLAG_JSON, v),
                    jsonl::Plain::Null => unreachable!("null handled above"),
                };
                if flags == 0 && looks_like_token(v) {
                    if !self.skip_tokens {
                        return Err(already_token_err());
                    }
                    self.stats.tokens_skipped += 1;
                    out.extend_from_slice(raw);
                    return Ok(());
                }
                binding(&mut self.aad, &slot.prefix, rid);
                out.push(b'"');
                s.seal(&self.aad, flags | self.fmt_flags, v, out)?;
                out.push(b'"');
            }
            Crypto::Copy => match jsonl::plain(raw, &mut self.scratch)? {
                jsonl::Plain::Str(v) => jsonl::write_value(out, v, false)?,
                _ => out.extend_from_slice(raw),
            },
            Crypto::Open(o) => {
                let tok =
                    jsonl::string_value(raw, &mut self.scratch).filter(|t| t.starts_with(PREFIX));
                let Some(tok) = tok else {
                    if !self.allow_plaintext {
                        return Err(plaintext_err());
                    }
                    self.stats.plaintext += 1;
                    out.extend_from_slice(raw);
                    return Ok(());
                };
                binding(&mut self.aad, &slot.prefix, rid);
                // `tok` may live in `scratch`; `inner` is free for nesting.
                let flags = open_cell(
                    o,
                    &self.aad,
                    tok,
                    self.fmt,
                    self.accept,
                    self.nested,
                    &mut self.inner,
                    &mut self.stats.nested,
                )?;
                jsonl::write_value(out, o.last_value(), flags & FLAG_JSON != 0)?;
            }
            Crypto::Rewrap(rw) => {
                let tok =
                    jsonl::string_value(raw, &mut self.scratch).filter(|t| t.starts_with(PREFIX));
                let Some(tok) = tok else {
                    if !self.allow_plaintext {
                        return Err(plaintext_err());
                    }
                    self.stats.plaintext += 1;
                    out.extend_from_slice(raw);
                    return Ok(());
                };
                out.push(b'"');
                rw.rewrap(tok, out)?;
                out.push(b'"');
            }
        }
        self.stats.cells += 1;
        Ok(())
    }
}

/// NULL in a table format: an unquoted empty field (CSV/TSV) or `\N`.
fn is_null(fmt: Format, raw: &[u8], quoted: bool) -> bool {
    match fmt {
        Format::PgCopy => pgcopy::is_null(raw),
        _ => raw.is_empty() && !quoted,
    }
}

/// The value of a raw, non-NULL field.
fn decode<'a>(fmt: Format, raw: &'a [u8], quoted: bool, scratch: &'a mut Vec<u8>) -> &'a [u8] {
    match fmt {
        Format::PgCopy => pgcopy::decode(raw, scratch),
        _ => csv::unquote(raw, quoted, scratch),
    }
}

/// A record without its LF or CRLF terminator.
fn trim_terminator(rec: &[u8]) -> &[u8] {
    let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
    rec.strip_suffix(b"\r").unwrap_or(rec)
}
