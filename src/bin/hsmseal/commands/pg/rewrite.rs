//! `pg encrypt|decrypt|rotate --rewrite`: the whole table, offline, in one
//! transaction: read it, TRUNCATE it, COPY it back.
//!
//! Why: an in-place UPDATE writes a new version of every row, a new index
//! entry and its WAL, and leaves the old versions for VACUUM; on the
//! benchmark machine a bare `UPDATE` of three columns of 1 M rows costs
//! the server ~3× a whole `COPY TO | COPY FROM` of the table before
//! hsmseal does anything (docs/PERFORMANCE.md). A rewrite costs a COPY.
//!
//! Invariants:
//! - Nothing is lost: `LOCK TABLE … ACCESS EXCLUSIVE` is taken first, so
//!   no other session reads or writes the table until COMMIT (their
//!   statements wait, then see the rewritten table); the rows read are the
//!   rows written back (the COPY's row count is checked before COMMIT);
//!   and TRUNCATE is transactional, so a failure or kill -9 at any point
//!   before COMMIT leaves the table exactly as it was.
//! - Cells are changed by the walk's own [`CellWork`], so a rewrite makes
//!   the same tokens, refusals and counts as the online walk, and a re-run
//!   changes nothing: with no cell to change, the table is not rewritten.
//! - Tables where TRUNCATE + COPY is not the same as rewriting each row
//!   are refused before anything is read ([`refusals`]): triggers or rules
//!   (COPY fires INSERT triggers, TRUNCATE its own), row-level security
//!   (rows this role cannot see would be truncated), inheritance and
//!   partitions, and foreign keys from other tables (TRUNCATE refuses).
//!   Generated columns are not copied: COPY computes them again.
//! - Between reading and writing, the table is held in a [`Spool`]: an
//!   unlinked file sealed under a key that exists only in this process.
//!
//! The order, for speed: `COPY TO` the spool as it is (the server's
//! cheapest read), TRUNCATE, then the spool through the cell workers into
//! `COPY FROM`, so the cryptography overlaps the server's writing. A cell
//! that fails (a moved token, a wrong key) fails the COPY, and the whole
//! transaction rolls back, TRUNCATE included.

use super::{
    db_err, ident, token_pred, CellWork, Counts, Op, Part, Table, TextRow, Trace, WalkCtx,
    PARTS_PER_CHUNK,
};
use crate::app::App;
use hsmseal::columns::pgcopy;
use hsmseal::error::{Error, Result};
use hsmseal::fs::spool::Spool;
use postgres::Client;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Why this table cannot be rewritten by TRUNCATE + COPY, if it cannot:
/// a usage error (exit 2) naming the cause and the way out.
pub(super) fn refusals(c: &mut Client, t: &Table) -> Result<()> {
    let r = c
        .query_one(
            "SELECT c.relkind::text, c.relrowsecurity,
                    (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid OR i.inhrelid = c.oid),
                    (SELECT string_agg(g.tgname::text, ', ' ORDER BY g.tgname)
                       FROM pg_trigger g WHERE g.tgrelid = c.oid AND NOT g.tgisinternal),
                    (SELECT count(*) FROM pg_rewrite w WHERE w.ev_class = c.oid),
                    (SELECT string_agg(f.conrelid::regclass::text, ', ' ORDER BY f.conrelid::regclass::text)
                       FROM pg_constraint f
                      WHERE f.confrelid = c.oid AND f.contype = 'f' AND f.conrelid <> c.oid)
               FROM pg_class c WHERE c.oid = $1::int8::oid",
            &[&t.oid],
        )
        .map_err(db_err("cannot read the table's definition"))?;
    let why = |what: String| {
        Err(Error::usage(format!(
            "cannot --rewrite {}: {what}; run without --rewrite (the online walk updates rows in place)",
            t.label
        )))
    };
    let relkind: String = r.get(0);
    if relkind != "r" {
        return why("it is partitioned (rewrite its partitions one by one)".into());
    }
    if r.get::<_, bool>(1) {
        return why(
            "row-level security is enabled, so rows this role cannot see would be truncated".into(),
        );
    }
    if r.get::<_, i64>(2) > 0 {
        return why("it has a parent or children by inheritance".into());
    }
    if let Some(tg) = r.get::<_, Option<String>>(3) {
        return why(format!(
            "it has triggers ({tg}), which TRUNCATE and COPY would fire for every row"
        ));
    }
    if r.get::<_, i64>(4) > 0 {
        return why("it has rules, which COPY would bypass".into());
    }
    if let Some(refs) = r.get::<_, Option<String>>(5) {
        return why(format!(
            "foreign keys of {refs} reference it, so it cannot be truncated"
        ));
    }
    Ok(())
}

/// Whether a rewrite would change any cell: encrypt, a non-NULL value
/// that is not a token; decrypt, a token; rotate, always (which version a
/// token is under is not told by SQL cheaply). When not, the caller walks
/// the table online instead, which writes nothing and still opens every
/// token encrypt leaves alone: a re-run does not rewrite the table.
pub(super) fn has_work(c: &mut Client, t: &Table, op: Op) -> Result<bool> {
    if op == Op::Rotate {
        return Ok(true);
    }
    let conds: Vec<String> = t
        .cols
        .iter()
        .map(|col| {
            let q = format!("t.{}::text", ident(&col.name));
            match op {
                Op::Encrypt => format!("({q} IS NOT NULL AND NOT {})", token_pred(&q)),
                _ => token_pred(&q),
            }
        })
        .collect();
    let q = format!(
        "SELECT EXISTS (SELECT 1 FROM {} AS t WHERE {})",
        t.sql,
        conds.join(" OR ")
    );
    c.query_one(&q, &[])
        .map(|r| r.get(0))
        .map_err(db_err(&format!("cannot read {}", t.label)))
}

/// TRUNCATE is not MVCC-safe: a REPEATABLE READ or SERIALIZABLE
/// transaction whose snapshot predates this one's COMMIT and that reads
/// the table only afterwards (pg_dump does: snapshot first, then a lock
/// per table) sees it empty. Said, not refused: the sessions listed may
/// be harmless (READ COMMITTED, another table), and waiting for them under
/// the lock could wait for ever. docs/SECURITY.md says when to run it.
fn warn_older_snapshots(c: &mut Client, t: &Table) -> Result<()> {
    let older: Option<String> = c
        .query_one(
            "SELECT string_agg(a.pid::text, ', ' ORDER BY a.pid)
               FROM pg_stat_activity a, pg_stat_activity me
              WHERE me.pid = pg_backend_pid() AND a.pid <> me.pid
                AND a.datname = current_database() AND a.backend_type = 'client backend'
                AND a.backend_xmin IS NOT NULL AND a.xact_start < me.xact_start",
            &[],
        )
        .map_err(db_err("cannot read pg_stat_activity"))?
        .get(0);
    if let Some(pids) = older {
        crate::report::diag(format!(
            "hsmseal: warning: transactions older than this rewrite are open (pids {pids}); one in REPEATABLE READ or SERIALIZABLE (a pg_dump) that reads {} only after the COMMIT will see it empty, as after any TRUNCATE (docs/SECURITY.md)",
            t.label
        ));
    }
    Ok(())
}

/// Every column COPY reads and writes (not dropped, not generated), in
/// the table's order, and where the walk's columns are among them.
struct Layout {
    names: Vec<String>,
    /// For the walk's row index `i` (keys, selected columns, ctid): the
    /// COPY field holding it (`None` for the ctid, which COPY has not).
    walk_field: Vec<Option<usize>>,
    /// For each COPY field: the selected column it is, if one.
    sel: Vec<Option<usize>>,
    /// For each COPY field: the blind index it is the target of, if one.
    bidx: Vec<Option<usize>>,
}

fn layout(c: &mut Client, t: &Table) -> Result<Layout> {
    let names: Vec<String> = c
        .query(
            "SELECT attname::text FROM pg_attribute
              WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
              ORDER BY attnum",
            &[&t.oid],
        )
        .map_err(db_err("cannot read the table's columns"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The walk's columns (keys, then selected) among them; a generated one
    // is not in a COPY (and cannot be encrypted or bind a token anyway).
    let mut walk_field: Vec<Option<usize>> = Vec::new();
    let walked = t
        .key
        .iter()
        .map(|k| &k.name)
        .chain(t.cols.iter().map(|c| &c.name));
    for name in walked {
        let f = names.iter().position(|x| x == name).ok_or_else(|| {
            Error::usage(format!(
                "cannot --rewrite {}: column {name:?} is generated",
                t.label
            ))
        })?;
        walk_field.push(Some(f));
    }
    walk_field.push(None);
    let sel = names
        .iter()
        .map(|n| t.cols.iter().position(|c| &c.name == n))
        .collect();
    let bidx = names
        .iter()
        .map(|n| t.bidx.iter().position(|(_, s, _)| &s.target == n))
        .collect();
    Ok(Layout {
        names,
        walk_field,
        sel,
        bidx,
    })
}

/// A part of the spool: COPY text lines in one buffer, each line's raw
/// fields, and the walk's cells decoded, all in flat arrays (a rewrite
/// of a million rows allocates per part, not per row or cell).
#[derive(Default)]
struct CopyPart {
    /// The lines, without their newlines, one after another.
    text: Vec<u8>,
    /// Raw field ranges in `text`, one per column, row after row.
    fields: Vec<(usize, usize)>,
    /// The walk's cells, row after row: ranges in `dec`, `None` for NULL
    /// (and for the ctid, which a COPY line has not).
    cells: Vec<Option<(usize, usize)>>,
    dec: Vec<u8>,
    scratch: Vec<u8>,
    rows: usize,
}

impl CopyPart {
    /// Splits the line at the end of `text` (from `start`) into fields and
    /// decodes the walk's cells.
    fn add_line(&mut self, start: usize, lay: &Layout) -> Result<()> {
        let first = self.fields.len();
        let mut at = start;
        for (i, b) in self.text[start..].iter().enumerate() {
            if *b == b'\t' {
                self.fields.push((at, start + i));
                at = start + i + 1;
            }
        }
        self.fields.push((at, self.text.len()));
        let n = self.fields.len() - first;
        if n != lay.names.len() {
            return Err(Error::integrity(format!(
                "a COPY line read back has {n} fields where the table has {} columns",
                lay.names.len()
            )));
        }
        for f in &lay.walk_field {
            let Some(f) = *f else {
                self.cells.push(None);
                continue;
            };
            let (a, b) = self.fields[first + f];
            let raw = &self.text[a..b];
            if pgcopy::is_null(raw) {
                self.cells.push(None);
                continue;
            }
            let v = pgcopy::decode(raw, &mut self.scratch);
            let from = self.dec.len();
            self.dec.extend_from_slice(v);
            self.cells.push(Some((from, self.dec.len())));
        }
        self.rows += 1;
        Ok(())
    }

    fn rows(&self) -> Vec<CopyRow<'_>> {
        (0..self.rows).map(|i| CopyRow { p: self, i }).collect()
    }
}

/// Row `i` of a [`CopyPart`], as the walk reads it.
struct CopyRow<'p> {
    p: &'p CopyPart,
    i: usize,
}

impl TextRow for CopyRow<'_> {
    fn text(&self, i: usize) -> Result<Option<&str>> {
        let per_row = self.p.cells.len() / self.p.rows;
        match self.p.cells[self.i * per_row + i] {
            None => Ok(None),
            Some((a, b)) => std::str::from_utf8(&self.p.dec[a..b])
                .map(Some)
                .map_err(|_| Error::format("a value read back is not UTF-8 text")),
        }
    }
}

/// Appends the part's rows as COPY text lines: each field as it was
/// read, or the walk's new value where it changed one.
fn encode(cp: &CopyPart, part: &Part, t: &Table, lay: &Layout, out: &mut Vec<u8>) {
    let (nk, nc) = (t.key.len(), t.cols.len());
    // Blind indexes in the part (encrypt, not --dry-run).
    let nb = part.upd.len() - nk - nc - 1;
    let nf = lay.names.len();
    let mut changed = part.changed.iter().copied().enumerate().peekable();
    for ri in 0..cp.rows {
        let p = changed.next_if(|&(_, r)| r == ri).map(|(p, _)| p);
        for (f, &(a, b)) in cp.fields[ri * nf..(ri + 1) * nf].iter().enumerate() {
            if f > 0 {
                out.push(b'\t');
            }
            let new = p.and_then(|p| {
                lay.sel[f]
                    .and_then(|j| part.upd[nk + j][p].as_deref())
                    .or_else(|| {
                        lay.bidx[f]
                            .filter(|&i| i < nb)
                            .and_then(|i| part.upd[nk + nc + i][p].as_deref())
                    })
            });
            match new {
                Some(v) => pgcopy::encode(v.as_bytes(), out),
                None => out.extend_from_slice(&cp.text[a..b]),
            }
        }
        out.push(b'\n');
    }
}

/// Rewrites the table: see the module's invariants. `works`: one cell
/// worker each (`--jobs`), returned with its counts. On an error the
/// transaction is left open and the caller drops the connection, which
/// rolls it back.
#[allow(clippy::type_complexity)]
pub(super) fn rewrite<'a, 't>(
    app: &App,
    client: &mut Client,
    ctx: &WalkCtx<'t>,
    works: Vec<CellWork<'a, 't>>,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<Vec<(Counts, CellWork<'a, 't>, Trace)>> {
    let t = ctx.t;
    let sql = |c: &mut Client, q: &str| c.batch_execute(q).map_err(db_err("transaction control"));
    let mut trace = Trace::default();
    sql(client, "BEGIN")?;
    let t0 = Instant::now();
    client
        .batch_execute(&format!(
            "LOCK TABLE ONLY {} IN ACCESS EXCLUSIVE MODE",
            t.sql
        ))
        .map_err(db_err(&format!("cannot lock {}", t.label)))?;
    // Again under the lock: nothing can have changed since.
    refusals(client, t)?;
    warn_older_snapshots(client, t)?;
    let lay = layout(client, t)?;
    let names: Vec<String> = lay.names.iter().map(|n| ident(n)).collect();
    let names = names.join(", ");
    // 1. The table as COPY text into the spool, as it is.
    let mut spool = Spool::new(None)?;
    {
        let mut r = client
            .copy_out(&format!("COPY {} ({names}) TO STDOUT", t.sql))
            .map_err(db_err(&format!("cannot read {}", t.label)))?;
        std::io::copy(&mut r, &mut spool)
            .map_err(|e| Error::io(format!("cannot read {} into the spool file: {e}", t.label)))?;
    }
    trace.select += t0.elapsed();
    // 2. Empty the table (transactional: undone by a rollback).
    let t0 = Instant::now();
    client
        .batch_execute(&format!("TRUNCATE ONLY {}", t.sql))
        .map_err(db_err(&format!("cannot truncate {}", t.label)))?;
    app.info(format!(
        "hsmseal: {} read ({:.1} MiB) and truncated in this transaction; writing it back (until COMMIT, an error or kill leaves it as it was)",
        t.label,
        spool.len() as f64 / 1048576.0
    ));
    // 3. The spool, line by line, through the cell workers into COPY FROM:
    // a reader thread cuts it into parts, the workers change their cells
    // and encode the lines, this thread (which owns the connection) sends
    // them (in any order: a rewritten heap has no order to keep). Bounded
    // channels keep memory flat whatever the table's size.
    let reader = spool.into_reader()?;
    let part_rows = (ctx.chunk_rows as usize).div_ceil(PARTS_PER_CHUNK).max(1);
    let (to_workers, parts_in) = std::sync::mpsc::sync_channel::<CopyPart>(4);
    // Shared by the workers and dropped with the last of them, so the
    // reader's send fails (and the reader ends) once no worker is left.
    let parts_in = std::sync::Arc::new(std::sync::Mutex::new(parts_in));
    let (to_sender, blocks) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(4);
    let failed = AtomicBool::new(false);
    let mut w = client
        .copy_in(&format!("COPY {} ({names}) FROM STDIN", t.sql))
        .map_err(db_err(&format!("cannot write {} back", t.label)))?;
    let outs = std::thread::scope(|s| -> Result<Vec<(Counts, CellWork, Trace)>> {
        let (failed, lay) = (&failed, &lay);
        let spawn = |name: &str| std::thread::Builder::new().name(name.into());
        let cut = spawn("pg-rewrite-read")
            .spawn_scoped(s, move || -> Result<()> {
                let mut lines = std::io::BufReader::with_capacity(1 << 20, reader);
                let mut part = CopyPart::default();
                loop {
                    let start = part.text.len();
                    let n = std::io::BufRead::read_until(&mut lines, b'\n', &mut part.text)
                        .map_err(|e| Error::integrity(e.to_string()))?;
                    if n > 0 {
                        if part.text.pop() != Some(b'\n') {
                            return Err(Error::integrity("the spool file ends inside a line"));
                        }
                        part.add_line(start, lay)?;
                    }
                    if part.rows == part_rows || (n == 0 && part.rows > 0) {
                        let full = std::mem::take(&mut part);
                        if failed.load(Ordering::Relaxed) || to_workers.send(full).is_err() {
                            return Ok(());
                        }
                    }
                    if n == 0 {
                        return Ok(());
                    }
                }
            })
            .map_err(|e| Error::io(format!("cannot start a worker thread: {e}")))?;
        let mut workers = Vec::new();
        for work in works {
            let to_sender = to_sender.clone();
            let parts_in = parts_in.clone();
            let h = spawn("pg-rewrite")
                .spawn_scoped(s, move || -> Result<(Counts, CellWork, Trace)> {
                    let mut work = work;
                    let mut counts = Counts::default();
                    // Until the parts end, or any thread failed.
                    while !failed.load(Ordering::Relaxed) {
                        let next = parts_in.lock().map(|r| r.recv());
                        let Ok(Ok(cp)) = next else { break };
                        let part = match work.part(&cp.rows()) {
                            Ok(p) => p,
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        };
                        counts.add(&part.counts);
                        let mut out = Vec::with_capacity(cp.text.len() * 3);
                        encode(&cp, &part, t, lay, &mut out);
                        if to_sender.send((cp.rows as u64, out)).is_err() {
                            break;
                        }
                    }
                    Ok((counts, work, Trace::default()))
                })
                .map_err(|e| Error::io(format!("cannot start a worker thread: {e}")))?;
            workers.push(h);
        }
        drop(to_sender);
        drop(parts_in);
        // Sending: until every worker is done (the channel closes) or the
        // server refuses; then the workers and the reader are joined.
        let mut sent = Ok(());
        for (n, block) in blocks.iter() {
            if let Err(e) = w.write_all(&block) {
                failed.store(true, Ordering::Relaxed);
                sent = Err(Error::io(format!("cannot write {} back: {e}", t.label)));
                break;
            }
            if let Some(pb) = bar {
                pb.inc(n);
            }
        }
        drop(blocks);
        let mut first_err = None;
        let mut outs = Vec::new();
        for h in workers {
            match h.join() {
                Ok(Ok(o)) => outs.push(o),
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(_) => {
                    first_err =
                        first_err.or(Some(Error::io("a worker thread of the rewrite panicked")))
                }
            }
        }
        match cut.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => first_err = first_err.or(Some(Error::io("the rewrite's reader panicked"))),
        }
        // A cell's own error says more than the broken pipe it caused.
        match first_err.map(Err).unwrap_or(sent) {
            Err(e) => Err(e),
            Ok(()) => Ok(outs),
        }
    })?;
    let written = w
        .finish()
        .map_err(db_err(&format!("cannot write {} back", t.label)))?;
    let mut counts = Counts::default();
    for (c, _, _) in &outs {
        counts.add(c);
    }
    if written != counts.rows {
        return Err(Error::integrity(format!(
            "{} rows of {} were read but {written} written back: rolled back, the table is as it was",
            counts.rows, t.label
        )));
    }
    trace.update += t0.elapsed();
    let t0 = Instant::now();
    // Cursors of an interrupted online walk of this op are moot now.
    client
        .execute(
            "DELETE FROM hsmseal.progress WHERE table_name = $1 AND columns = $2 AND op = $3",
            &[&t.label, &ctx.cols_key, &ctx.op.name()],
        )
        .map_err(db_err("cannot update hsmseal.progress"))?;
    sql(client, "COMMIT")
        .map_err(|e| e.context(format!("committing the rewrite of {}", t.label)))?;
    trace.commit += t0.elapsed();
    let mut outs = outs;
    // One transaction: one chunk.
    outs[0].0.chunks = 1;
    outs[0].2 = trace;
    Ok(outs)
}
