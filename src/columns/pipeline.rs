//! The pipeline of a `columns` run (constant memory, order kept, all cores
//! busy):
//! - a reader thread splits the input into blocks of whole records and
//!   records the raw span of every selected field (`super::layout`);
//! - `jobs` worker threads turn blocks into output bytes (`super::cells`:
//!   each with its own CSPRNG seeded once from the OS, and its own current
//!   batch key);
//! - the calling thread writes finished blocks in sequence order.
//!
//! A fixed number of permits circulates from the writer back to the reader,
//! which bounds the memory in flight whatever the input size. The first
//! failure stops the run: what was written is a prefix of the right output
//! ending at a record boundary.

use super::abort;
use super::blind_index::{self, BlindIndexer};
use super::cells::{Mode, Worker, WorkerStats};
use super::format::Format;
use super::layout::{
    first_record, layout, parse_one, row_err, too_long, Block, Field, Layout, Rec, Source,
    MAX_RECORD, READ_CHUNK,
};
use super::options::{ColumnOptions, ColumnStats};
use super::pgcopy;
use super::token::{BatchCache, ColumnId, RewrapCache};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Records per block handed to a worker.
const BLOCK_ROWS: usize = 4096;
/// Bytes after which a block is handed over even if it has fewer rows.
const BLOCK_BYTES: usize = 4 << 20;
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

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

pub(super) fn run(
    mode: Mode<'_>,
    opts: &ColumnOptions,
    input: impl Read + Send + 'static,
    mut output: impl Write,
) -> Result<ColumnStats> {
    let t0 = Instant::now();
    let fmt = opts.format;
    if fmt == Format::Parquet {
        // Parquet's footer comes last: it is read from a file
        // (`super::parquet`), never as a stream.
        return Err(Error::usage(
            "--format parquet needs the input as a file (INPUT or -i FILE), not a stream",
        ));
    }
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
    let mut layout = layout;
    if !layout.bidx.is_empty() {
        // One HSM call per index column per run, before any output: an
        // unusable or weak index key fails the run here.
        let Mode::Encrypt(backend, key) = mode else {
            return Err(Error::usage(
                "--blind-index applies to columns encrypt only",
            ));
        };
        for b in &layout.bidx {
            let spec = &opts.blind_indexes[layout.indexers.len()];
            let id = blind_index::column_id(&layout.selected[b.source].id);
            layout.indexers.push(BlindIndexer::new(
                backend,
                &key.name,
                &opts.context,
                &id,
                spec.bits,
                spec.normalize,
            )?);
        }
    }
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
    let (permit_tx, permit_rx) = mpsc::sync_channel::<()>(in_flight);
    for _ in 0..in_flight {
        permit_tx.send(()).expect("permit channel has room");
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
                    &mut src, &layout, first_row, &work_tx, &permit_rx, &pool, &stop,
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
        let written = write_in_order(&done_rx, &permit_tx, &pool, &mut output, &stop);
        // Let idle workers and the reader see the end (or the error).
        stop.end();
        drop(permit_tx);
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
    let mut seen = vec![false; layout.selected.len()];
    if matches!(mode, Mode::Inspect) {
        // Every selected column is listed, also with no rows.
        stats.inspect = layout
            .selected
            .iter()
            .map(|s| (s.id.clone(), Default::default()))
            .collect();
    }
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
        if matches!(mode, Mode::Inspect) {
            for (s, w) in stats.inspect.iter_mut().zip(&w.inspect) {
                s.1.merge(w);
            }
        }
    }
    match mode {
        Mode::Decrypt(_) => {
            stats.hsm_calls += batch_cache.hsm_calls();
            stats.batches = batch_cache.hsm_calls();
        }
        Mode::Rewrap(_, target) => {
            stats.hsm_calls += rewrap_cache.hsm_calls();
            stats.batches = rewrap_cache.hsm_calls() / 2;
            stats.targets = match target {
                Some(t) => vec![t.clone()],
                None => rewrap_cache.targets(),
            };
        }
        _ => {}
    }
    if fmt == Format::Jsonl && stats.rows > 0 {
        if let Some(s) = layout.selected.iter().zip(&seen).find(|(_, &seen)| !seen) {
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
    permit_rx: &mpsc::Receiver<()>,
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
            let selected_at = &layout.selected_at;
            let parsed = parse_one(fmt, &src.buf[p..], src.eof, |idx, s, e, q| {
                if let Some(&k) = selected_at.get(idx) {
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
                                "row {row}: has {}, expected {} (ragged row)",
                                crate::error::count(nf as u64, "field", "fields"),
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
        // Wait for a permit: this is what bounds memory. Poll `stop` so
        // a run that failed elsewhere never leaves the reader waiting.
        loop {
            if stop.stop_reading() {
                return Ok(());
            }
            match permit_rx.recv_timeout(Duration::from_millis(50)) {
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
    permit_tx: &mpsc::SyncSender<()>,
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
            let _ = permit_tx.try_send(());
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

/// One worker thread: takes blocks until the reader is done or the run
/// stops, and returns its counts.
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
    let mut w = match Worker::new(mode, opts, layout, batch_cache, rewrap_cache) {
        Ok(w) => w,
        Err(e) => {
            // Without this worker the run cannot finish: end it.
            stop.end();
            return Err(e);
        }
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
        let cells = block.recs.len() * layout.selected.len();
        out.reserve(match mode {
            Mode::Encrypt(..) => block.data.len() + cells * 224,
            _ => block.data.len(),
        });
        let r = w.block(layout, &block, &mut out);
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
    Ok(w.finish())
}

/// A record without its LF or CRLF terminator.
fn trim_terminator(rec: &[u8]) -> &[u8] {
    let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
    rec.strip_suffix(b"\r").unwrap_or(rec)
}
