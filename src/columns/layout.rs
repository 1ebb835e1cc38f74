//! Which columns a run processes and where they are: the first record
//! (the header) read whole, `--columns` and `--row-id` resolved against it
//! (or against positions with `--no-header`, or JSON keys), and the shapes
//! the reader hands to the workers (a [`Block`] of whole records with the
//! span of every selected field). A header that does not match `--columns`
//! fails here, before any output.

use super::format::Format;
use super::options::ColumnOptions;
use super::token::{binding_prefix, ColumnId};
use super::{abort, csv, pgcopy, scan};
use crate::error::{Error, Result};
use std::io::Read;

/// Longest record (line, or CSV record with embedded newlines).
pub const MAX_RECORD: usize = 64 << 20;

/// Input read size.
pub(super) const READ_CHUNK: usize = 4 << 20;

/// A selected column.
pub(super) struct Selected {
    pub(super) id: ColumnId,
    /// Its index in [`Layout::selected`] (per-column counts).
    pub(super) index: usize,
    /// 0-based field position (tables only).
    pub(super) pos: usize,
    /// Binding prefix (everything but the row id).
    pub(super) prefix: Vec<u8>,
}

/// A blind index written by this run (`--blind-index`).
pub(super) struct BlindCol {
    /// Index in `Layout::selected` of the column whose plaintext is indexed.
    pub(super) source: usize,
    /// The target's 0-based field position (tables).
    pub(super) pos: usize,
    /// The target's key (JSONL).
    pub(super) key: String,
}

/// A field a worker rewrites, in field order.
#[derive(Clone, Copy)]
pub(super) enum Slot {
    /// `Layout::selected[j]`.
    Selected(usize),
    /// `Layout::bidx[i]`.
    Bidx(usize),
}

/// Where the selected columns are, resolved from the header or positions.
pub(super) struct Layout {
    pub(super) fmt: Format,
    /// Tables: in field order. JSONL: in `--columns` order.
    pub(super) selected: Vec<Selected>,
    /// The `--row-id` columns, in `--row-id` order (the binding's order).
    pub(super) row_id: Vec<(ColumnId, usize)>,
    /// Fields per record (tables).
    pub(super) nfields: usize,
    /// Field position -> index in `selected` + 1 (0: not selected); the
    /// i-th row id column maps to `selected.len() + 1 + i`, the i-th blind
    /// index target to `selected.len() + row_id.len() + 1 + i`.
    pub(super) selected_at: Vec<u32>,
    /// The blind-index targets, in `--blind-index` order.
    pub(super) bidx: Vec<BlindCol>,
    /// The selected columns and blind-index targets, in field order
    /// (tables); what a worker walks through per record.
    pub(super) slots: Vec<Slot>,
    /// One per `bidx` entry, made by the encrypt run once the key is known
    /// (one HSM call each); empty otherwise.
    pub(super) indexers: Vec<super::blind_index::BlindIndexer>,
}

impl Layout {
    /// Field spans recorded per record.
    pub(super) fn width(&self) -> usize {
        self.selected.len() + self.row_id.len() + self.bidx.len()
    }
}

/// Most `--row-id` columns (the count is one byte in the binding).
pub const MAX_ROW_ID_COLUMNS: usize = 255;

/// Starts the binding's encoding of a row id made of `k` column values
/// (docs/FORMAT.md section 6): `u8(0)` for none, `u8(1)` then the value for
/// one (the version-1 encoding, unchanged), `u8(2) || u8(k)` then the
/// values for k >= 2. Append each value with [`row_id_part`], in `--row-id`
/// order. `hsmseal pg` encodes a table's key the same way, so a token can
/// move between a table and its dumps.
pub fn row_id_start(out: &mut Vec<u8>, k: usize) {
    assert!(k <= MAX_ROW_ID_COLUMNS, "checked when --row-id is parsed");
    out.clear();
    match k {
        0 => out.push(0),
        1 => out.push(1),
        _ => out.extend_from_slice(&[2, k as u8]),
    }
}

/// Appends one row id value, length-prefixed (`lp`), after [`row_id_start`].
pub fn row_id_part(out: &mut Vec<u8>, value: &[u8]) {
    // Values are capped far below 4 GiB (records at 64 MiB), so u32 is exact.
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

/// The binding's encoding of a row id made of `parts` (see [`row_id_start`]).
pub fn encode_row_id(out: &mut Vec<u8>, parts: &[&[u8]]) {
    row_id_start(out, parts.len());
    for p in parts {
        row_id_part(out, p);
    }
}

/// A field's raw span in its block, quotes included.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Field {
    pub(super) start: u32,
    pub(super) end: u32,
    pub(super) quoted: bool,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Rec {
    /// End of the record in the block, terminator included; it starts where
    /// the previous one ends.
    pub(super) end: u32,
    /// Copied as it is (pgcopy `\.`, blank JSONL line).
    pub(super) raw: bool,
}

/// Whole records cut from the input by the reader, with the span of each
/// selected field (and the row id) per record.
pub(super) struct Block {
    pub(super) seq: u64,
    pub(super) first_row: u64,
    pub(super) data: Vec<u8>,
    pub(super) recs: Vec<Rec>,
    /// `layout.width()` fields per record (tables).
    pub(super) fields: Vec<Field>,
}

/// Buffered input with the unconsumed part at `buf[pos..]`.
pub(super) struct Source<R> {
    pub(super) input: R,
    pub(super) buf: Vec<u8>,
    pub(super) pos: usize,
    pub(super) eof: bool,
}

impl<R: Read> Source<R> {
    /// Drops `buf[..pos]` and reads more: at least a chunk, and as much as
    /// is already buffered so re-scanning a long record stays linear.
    pub(super) fn more(&mut self) -> Result<()> {
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
pub(super) fn parse_one(
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
        // `pipeline::run` refuses Parquet before any parsing.
        Format::Parquet => Err(Error::usage("a Parquet file has no records to parse")),
    }
}

pub(super) fn row_err(row: u64, e: Error) -> Error {
    e.context(format!("row {row}"))
}

/// Reads the first record fully: `(raw bytes incl. terminator, decoded fields)`.
pub(super) fn first_record<R: Read>(
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

pub(super) fn too_long() -> Error {
    Error::format(format!(
        "record longer than {} MiB (no record terminator?)",
        MAX_RECORD >> 20
    ))
}

/// Checks `--columns`/`--row-id` and resolves them against the header (or
/// the first record's width with `--no-header`). `width` is `None` when
/// there is no record at all (or for JSONL).
pub(super) fn layout(
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
        if opts.row_id.contains(c) {
            return Err(Error::usage(format!(
                "column {c:?} is the --row-id column and cannot also be encrypted"
            )));
        }
    }
    if opts.row_id.len() > MAX_ROW_ID_COLUMNS {
        return Err(Error::usage(format!(
            "--row-id names {} columns; at most {MAX_ROW_ID_COLUMNS} are allowed",
            opts.row_id.len()
        )));
    }
    for (i, c) in opts.row_id.iter().enumerate() {
        if c.is_empty() {
            return Err(Error::usage("--row-id has an empty column name"));
        }
        if opts.row_id[..i].contains(c) {
            return Err(Error::usage(format!("--row-id names column {c:?} twice")));
        }
    }
    let by_index = fmt.is_table() && !opts.header;
    let resolve = |name: &str| -> Result<(ColumnId, usize)> {
        if !fmt.is_table() {
            return Ok((ColumnId::Name(name.to_string()), 0));
        }
        // `@N` selects and binds by position even with a header, so tokens
        // made from a headerless dump (bound to positions) open in the same
        // table exported with a header (docs/FORMAT.md section 6).
        let at = name.strip_prefix('@');
        if by_index || at.is_some() {
            let num = at.unwrap_or(name);
            let i: usize = num.parse().ok().filter(|&i| i >= 1).ok_or_else(|| {
                Error::usage(if by_index {
                    format!("with --no-header, columns are 1-based positions: {name:?} is not one")
                } else {
                    format!("{name:?}: @ must be followed by a 1-based column position (@3)")
                })
            })?;
            let width = if by_index {
                width
            } else {
                header.map(<[_]>::len)
            };
            if let Some(width) = width.filter(|&w| i > w) {
                return Err(Error::usage(format!(
                    "row 1: column {i} selected but the row has only {}",
                    crate::error::count(width as u64, "field", "fields")
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
                "column {name:?} is not in the header ({}); if the input has no header, pass --no-header and 1-based positions",
                crate::error::count(names.len() as u64, "column", "columns")
            ))),
            n => Err(Error::format(format!(
                "column {name:?} appears {n} times in the header"
            ))),
        }
    };
    let mut selected = Vec::new();
    for c in &opts.columns {
        let (id, pos) = resolve(c)?;
        selected.push(Selected {
            prefix: binding_prefix(&opts.context, &id),
            id,
            pos,
            index: 0,
        });
    }
    let row_id = opts
        .row_id
        .iter()
        .map(|c| resolve(c))
        .collect::<Result<Vec<_>>>()?;
    if fmt.is_table() {
        selected.sort_by_key(|s| s.pos);
        // Names were compared as written; positions can still collide
        // ("1" and "01").
        if let Some(w) = selected.windows(2).find(|w| w[0].pos == w[1].pos) {
            return Err(Error::usage(format!("{} is selected twice", w[0].id)));
        }
        for (i, (id, p)) in row_id.iter().enumerate() {
            if selected.iter().any(|s| s.pos == *p) {
                return Err(Error::usage(format!(
                    "{id} is the --row-id column and cannot also be encrypted"
                )));
            }
            if row_id[..i].iter().any(|(_, q)| q == p) {
                return Err(Error::usage(format!("--row-id names {id} twice")));
            }
        }
    }
    for (j, s) in selected.iter_mut().enumerate() {
        s.index = j;
    }
    let bidx = blind_cols(opts, header, &selected, &row_id, &resolve)?;
    let width = width.unwrap_or(0);
    let mut selected_at = vec![0u32; if fmt.is_table() { width } else { 0 }];
    for (j, s) in selected.iter().enumerate() {
        if let Some(x) = selected_at.get_mut(s.pos) {
            *x = j as u32 + 1;
        }
    }
    for (i, (_, p)) in row_id.iter().enumerate() {
        if let Some(x) = selected_at.get_mut(*p) {
            *x = (selected.len() + 1 + i) as u32;
        }
    }
    for (i, b) in bidx.iter().enumerate() {
        if let Some(x) = selected_at.get_mut(b.pos) {
            *x = (selected.len() + row_id.len() + 1 + i) as u32;
        }
    }
    let mut slots: Vec<(usize, Slot)> = selected
        .iter()
        .enumerate()
        .map(|(j, s)| (s.pos, Slot::Selected(j)))
        .chain(bidx.iter().enumerate().map(|(i, b)| (b.pos, Slot::Bidx(i))))
        .collect();
    if fmt.is_table() {
        slots.sort_by_key(|(p, _)| *p);
    }
    Ok(Layout {
        fmt,
        selected,
        row_id,
        nfields: width,
        selected_at,
        bidx,
        slots: slots.into_iter().map(|(_, s)| s).collect(),
        indexers: Vec::new(),
    })
}

/// Resolves `--blind-index COL[=TARGET]`: COL must be one of the encrypted
/// columns, TARGET an existing column that is neither encrypted, a row id
/// nor another index's target.
fn blind_cols(
    opts: &ColumnOptions,
    header: Option<&[Vec<u8>]>,
    selected: &[Selected],
    row_id: &[(ColumnId, usize)],
    resolve: &dyn Fn(&str) -> Result<(ColumnId, usize)>,
) -> Result<Vec<BlindCol>> {
    let mut out: Vec<BlindCol> = Vec::new();
    for spec in &opts.blind_indexes {
        let (col, target) = (&spec.column, &spec.target);
        if !opts.columns.contains(col) {
            return Err(Error::usage(format!(
                "--blind-index {col:?}: not one of the encrypted --columns (an index is computed from the plaintext of a column this run encrypts); add it to --columns"
            )));
        }
        if !opts.format.is_table() {
            // JSONL: keys, in --columns order.
            let source = selected
                .iter()
                .position(|s| s.id == ColumnId::Name(col.clone()))
                .expect("an encrypted key is selected");
            if opts.columns.contains(target) || opts.row_id.contains(target) {
                return Err(Error::usage(format!(
                    "--blind-index {col}: its target key {target:?} is encrypted or a --row-id key; an index goes into a key of its own"
                )));
            }
            if out.iter().any(|b| b.key == *target) {
                return Err(Error::usage(format!(
                    "--blind-index: key {target:?} is the target of two indexes"
                )));
            }
            out.push(BlindCol {
                source,
                pos: 0,
                key: target.clone(),
            });
            continue;
        }
        let (_, src_pos) = resolve(col)?;
        let source = selected
            .iter()
            .position(|s| s.pos == src_pos)
            .expect("an encrypted column is selected");
        let named = !target.starts_with('@') && opts.header;
        let in_header = header.is_some_and(|h| h.iter().any(|n| n == target.as_bytes()));
        if named && !in_header {
            return Err(Error::usage(format!(
                "--blind-index {col}: its target column {target:?} is not in the header: add it to the dump (its values are replaced by the index), or name another with --blind-index {col}=COLUMN"
            )));
        }
        let (id, pos) = resolve(target)
            .map_err(|e| Error::usage(format!("--blind-index {col}: target: {e}")))?;
        if selected.iter().any(|s| s.pos == pos) {
            return Err(Error::usage(format!(
                "--blind-index {col}: its target {id} is encrypted by this run; an index goes into a column of its own"
            )));
        }
        if row_id.iter().any(|(_, p)| *p == pos) {
            return Err(Error::usage(format!(
                "--blind-index {col}: its target {id} is a --row-id column"
            )));
        }
        if out.iter().any(|b| b.pos == pos) {
            return Err(Error::usage(format!(
                "--blind-index: {id} is the target of two indexes"
            )));
        }
        out.push(BlindCol {
            source,
            pos,
            key: String::new(),
        });
    }
    Ok(out)
}
