//! What a worker does to each selected cell: seal a value into a token,
//! open a token (checking the format it records, and layers with
//! `--nested`), rewrap a token's batch key, or copy (passthrough); and the
//! refusals that keep a run from being silently wrong (a value that already
//! is a token, plaintext where a token is expected). Bytes outside selected
//! fields are copied as they are; NULLs stay NULL.

use super::format::Format;
use super::layout::{row_err, row_id_part, row_id_start, Block, Layout, Selected, Slot};
use super::options::ColumnOptions;
use super::token::{
    self, binding_encoded, has_prefix, looks_like_token, BatchCache, ColumnId, Opener, RewrapCache,
    Rewrapper, Sealer, FLAG_JSON, FLAG_QUOTED,
};
use super::{csv, jsonl, pgcopy};
use crate::backend::{KeyBackend, KeyRef};
use crate::error::{Error, Result};

/// What a run does to the selected cells.
#[derive(Clone, Copy)]
pub(super) enum Mode<'a> {
    /// Seal each value into a token under this KWK version.
    Encrypt(&'a dyn KeyBackend, &'a KeyRef),
    /// Open each token.
    Decrypt(&'a dyn KeyBackend),
    /// Rewrap each token's batch key to this KWK version (`None`: to the
    /// current version of the token's own key).
    Rewrap(&'a dyn KeyBackend, Option<&'a KeyRef>),
    /// Parse and write back, no cryptography.
    Passthrough,
    /// Count what each value is (`columns inspect`): no key used.
    Inspect,
}

/// One worker's counts, summed into [`super::ColumnStats`] by the pipeline.
#[derive(Default)]
pub(super) struct WorkerStats {
    pub(super) rows: u64,
    pub(super) cells: u64,
    pub(super) nulls: u64,
    pub(super) plaintext: u64,
    pub(super) tokens_skipped: u64,
    pub(super) nested: u64,
    pub(super) batches: u64,
    pub(super) hsm_calls: u64,
    pub(super) bytes_in: u64,
    pub(super) seen: Vec<bool>,
    /// [`Mode::Inspect`]: per selected column, in layout order.
    pub(super) inspect: Vec<super::inspect::ColumnCounts>,
}

/// What a worker does to one cell.
enum Crypto<'a> {
    Seal(Box<Sealer<'a>>),
    Open(Opener<'a>),
    Rewrap(Rewrapper<'a>),
    Copy,
    Inspect,
}

/// Per-worker state: the crypto engine and reused scratch buffers.
pub(super) struct Worker<'a> {
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
    /// This record's blind-index values, back to back.
    bidx_vals: Vec<u8>,
    /// Per blind index: its value's span in `bidx_vals`, or `None` to
    /// leave the target as it is (the source is a token left alone).
    bidx_out: Vec<Option<(usize, usize)>>,
    members: Vec<jsonl::Member>,
    found: Vec<Option<usize>>,
    stats: WorkerStats,
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

impl<'a> Worker<'a> {
    /// A worker's cell engine for `mode` (a `Sealer` draws its first batch
    /// key here, so an unusable key fails before any block).
    pub(super) fn new(
        mode: Mode<'a>,
        opts: &ColumnOptions,
        layout: &Layout,
        batch_cache: &'a BatchCache,
        rewrap_cache: &'a RewrapCache,
    ) -> Result<Worker<'a>> {
        let crypto = match mode {
            Mode::Encrypt(b, k) => Crypto::Seal(Box::new(Sealer::new(b, k, opts.batch_size)?)),
            Mode::Decrypt(b) => Crypto::Open(Opener::new(b, batch_cache)),
            Mode::Rewrap(b, k) => Crypto::Rewrap(Rewrapper::with_batch_size(
                b,
                k,
                rewrap_cache,
                opts.batch_size,
            )),
            Mode::Passthrough => Crypto::Copy,
            Mode::Inspect => Crypto::Inspect,
        };
        let accept = opts
            .token_formats
            .iter()
            .fold(1 | 1 << token::format_code(opts.format), |m, f| {
                m | 1 << token::format_code(*f)
            });
        Ok(Worker {
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
            bidx_vals: Vec::new(),
            bidx_out: Vec::new(),
            members: Vec::new(),
            found: Vec::new(),
            stats: WorkerStats {
                seen: vec![false; layout.selected.len()],
                inspect: vec![Default::default(); layout.selected.len()],
                ..Default::default()
            },
        })
    }

    /// Turns one block of records into output bytes, appended to `out`.
    pub(super) fn block(&mut self, layout: &Layout, b: &Block, out: &mut Vec<u8>) -> Result<()> {
        let r = if layout.fmt.is_table() {
            self.table_block(layout, b, out)
        } else {
            self.jsonl_block(layout, b, out)
        };
        self.stats.bytes_in += b.data.len() as u64;
        r
    }

    /// This worker's counts, once it has taken its last block.
    pub(super) fn finish(mut self) -> WorkerStats {
        if let Crypto::Seal(s) = &self.crypto {
            self.stats.batches = s.batches;
            self.stats.hsm_calls = s.hsm_calls;
        }
        self.stats
    }
}

impl Worker<'_> {
    /// CSV, TSV and pgcopy.
    fn table_block(&mut self, layout: &Layout, b: &Block, out: &mut Vec<u8>) -> Result<()> {
        let fmt = layout.fmt;
        let width = layout.width();
        let nselected = layout.selected.len();
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
            // The row id, encoded for the binding (`scratch` is free until
            // the cells below use it).
            let mut rid_buf = std::mem::take(&mut self.rid);
            row_id_start(&mut rid_buf, layout.row_id.len());
            for (i, (id, _)) in layout.row_id.iter().enumerate() {
                let f = fs[nselected + i];
                let raw = &data[f.start as usize..f.end as usize];
                if is_null(fmt, raw, f.quoted) {
                    return Err(cell_err(
                        row,
                        id,
                        Error::format("the --row-id value is NULL"),
                    ));
                }
                row_id_part(&mut rid_buf, decode(fmt, raw, f.quoted, &mut self.scratch));
            }
            let rid = &rid_buf[..];
            if !layout.bidx.is_empty() {
                self.blind_indexes(layout, fs, data, row)?;
            }
            let mut cur = start;
            for slot in &layout.slots {
                let j = match *slot {
                    Slot::Selected(j) => j,
                    Slot::Bidx(i) => {
                        let f = fs[nselected + layout.row_id.len() + i];
                        let (fs_, fe) = (f.start as usize, f.end as usize);
                        out.extend_from_slice(&data[cur..fs_]);
                        cur = fe;
                        match self.bidx_out[i] {
                            Some((a, b)) => out.extend_from_slice(&self.bidx_vals[a..b]),
                            None => out.extend_from_slice(&data[fs_..fe]),
                        }
                        continue;
                    }
                };
                let sel = &layout.selected[j];
                let f = fs[j];
                let (fs_, fe) = (f.start as usize, f.end as usize);
                out.extend_from_slice(&data[cur..fs_]);
                cur = fe;
                // A trailing CR in the last field must be quoted only where
                // a lone LF follows (bare, the two would read back as a
                // CRLF). Before a CRLF or at the end of input it reads back
                // as it is, so it stays bare and the dump round-trips (found
                // by fuzzing: fuzz/regressions/tsv/).
                let last = sel.pos + 1 == layout.nfields && &data[fe..end] == b"\n";
                self.table_cell(fmt, sel, &data[fs_..fe], f.quoted, rid, last, out)
                    .map_err(|e| cell_err(row, &sel.id, e))?;
            }
            out.extend_from_slice(&data[cur..end]);
            start = end;
            self.rid = rid_buf;
        }
        Ok(())
    }

    /// This record's blind-index values (into `bidx_vals`/`bidx_out`),
    /// computed from the plaintext of their source columns before any of
    /// the record is written (a target may come before its source). A NULL
    /// source gives a NULL index; a source that already is a token (left
    /// alone under `--skip-tokens`) leaves its target as it is: there is no
    /// plaintext to hash.
    fn blind_indexes(
        &mut self,
        layout: &Layout,
        fs: &[super::layout::Field],
        data: &[u8],
        row: u64,
    ) -> Result<()> {
        let fmt = layout.fmt;
        self.bidx_vals.clear();
        self.bidx_out.clear();
        for (b, indexer) in layout.bidx.iter().zip(&layout.indexers) {
            let f = fs[b.source];
            let raw = &data[f.start as usize..f.end as usize];
            let a = self.bidx_vals.len();
            if is_null(fmt, raw, f.quoted) {
                if fmt == Format::PgCopy {
                    self.bidx_vals.extend_from_slice(b"\\N");
                }
                self.bidx_out.push(Some((a, self.bidx_vals.len())));
                continue;
            }
            let value = decode(fmt, raw, f.quoted, &mut self.scratch);
            if looks_like_token(value) {
                self.bidx_out.push(None);
                continue;
            }
            indexer
                .index(value, &mut self.bidx_vals)
                .map_err(|e| cell_err(row, &layout.selected[b.source].id, e))?;
            self.bidx_out.push(Some((a, self.bidx_vals.len())));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn table_cell(
        &mut self,
        fmt: Format,
        sel: &Selected,
        raw: &[u8],
        quoted: bool,
        rid: &[u8],
        last: bool,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if is_null(fmt, raw, quoted) {
            self.stats.nulls += 1;
            if let Crypto::Inspect = self.crypto {
                self.stats.inspect[sel.index].add_null();
            }
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
            Crypto::Inspect => {
                self.stats.inspect[sel.index].add(value);
                out.extend_from_slice(raw);
            }
            Crypto::Seal(s) => {
                if looks_like_token(value) {
                    if !self.skip_tokens {
                        return Err(already_token_err());
                    }
                    self.stats.tokens_skipped += 1;
                    out.extend_from_slice(raw);
                    return Ok(());
                }
                binding_encoded(&mut self.aad, &sel.prefix, rid);
                let mut flags = self.fmt_flags;
                if quoted && fmt != Format::PgCopy {
                    flags |= FLAG_QUOTED;
                }
                s.seal(&self.aad, flags, value, out)?;
            }
            Crypto::Open(o) => {
                // Any value with the prefix must open, even with
                // --allow-plaintext: a damaged token is never "plaintext".
                if !has_prefix(value) {
                    if !self.allow_plaintext {
                        return Err(plaintext_err());
                    }
                    self.stats.plaintext += 1;
                    out.extend_from_slice(raw);
                    return Ok(());
                }
                binding_encoded(&mut self.aad, &sel.prefix, rid);
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
                if !has_prefix(value) {
                    if !self.allow_plaintext {
                        return Err(plaintext_err());
                    }
                    self.stats.plaintext += 1;
                    out.extend_from_slice(raw);
                    return Ok(());
                }
                binding_encoded(&mut self.aad, &sel.prefix, rid);
                if quoted {
                    out.push(b'"');
                }
                rw.rewrap(&self.aad, value, out)?;
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
        let nselected = layout.selected.len();
        let nrid = layout.row_id.len();
        self.found.clear();
        self.found
            .resize(nselected + nrid + layout.bidx.len(), None);
        for (mi, m) in members.iter().enumerate() {
            let key = &line[m.key.0..m.key.1];
            for (j, sel) in layout.selected.iter().enumerate() {
                if let ColumnId::Name(n) = &sel.id {
                    if jsonl::key_is(key, n) {
                        if self.found[j].is_some() {
                            return Err(cell_err(
                                row,
                                &sel.id,
                                Error::format("the key occurs twice in the object"),
                            ));
                        }
                        self.found[j] = Some(mi);
                        self.stats.seen[j] = true;
                    }
                }
            }
            for (i, b) in layout.bidx.iter().enumerate() {
                if jsonl::key_is(key, &b.key) {
                    if self.found[nselected + nrid + i].is_some() {
                        return Err(cell_err(
                            row,
                            &ColumnId::Name(b.key.clone()),
                            Error::format("the key occurs twice in the object"),
                        ));
                    }
                    self.found[nselected + nrid + i] = Some(mi);
                }
            }
            for (i, (id, _)) in layout.row_id.iter().enumerate() {
                if let ColumnId::Name(n) = id {
                    if jsonl::key_is(key, n) {
                        if self.found[nselected + i].is_some() {
                            return Err(cell_err(
                                row,
                                id,
                                Error::format("the key occurs twice in the object"),
                            ));
                        }
                        self.found[nselected + i] = Some(mi);
                    }
                }
            }
        }
        let mut rid_buf = std::mem::take(&mut self.rid);
        row_id_start(&mut rid_buf, layout.row_id.len());
        for (i, (id, _)) in layout.row_id.iter().enumerate() {
            let m = self.found[nselected + i]
                .ok_or_else(|| cell_err(row, id, Error::format("the --row-id key is missing")))?;
            let raw = &line[members[m].value.0..members[m].value.1];
            let part = match raw[0] {
                b'"' => jsonl::string_value(raw, &mut self.scratch)
                    .ok_or_else(|| cell_err(row, id, Error::format("invalid JSON string")))?,
                b'{' | b'[' | b'n' => {
                    return Err(cell_err(
                        row,
                        id,
                        Error::format("the --row-id value must be a string, number or boolean"),
                    ))
                }
                _ => raw,
            };
            row_id_part(&mut rid_buf, part);
        }
        let rid = &rid_buf[..];
        if !layout.bidx.is_empty() {
            self.json_blind_indexes(layout, line, &members, row)?;
        }
        let mut cur = 0;
        for (mi, m) in members.iter().enumerate() {
            if let Some(i) = self.found[nselected + nrid..]
                .iter()
                .position(|f| *f == Some(mi))
            {
                out.extend_from_slice(&line[cur..m.value.0]);
                cur = m.value.1;
                match self.bidx_out[i] {
                    Some((a, b)) => out.extend_from_slice(&self.bidx_vals[a..b]),
                    None => out.extend_from_slice(&line[m.value.0..m.value.1]),
                }
                continue;
            }
            let Some(j) = self.found[..nselected].iter().position(|f| *f == Some(mi)) else {
                continue;
            };
            let sel = &layout.selected[j];
            out.extend_from_slice(&line[cur..m.value.0]);
            cur = m.value.1;
            self.json_cell(sel, &line[m.value.0..m.value.1], rid, out)
                .map_err(|e| cell_err(row, &sel.id, e))?;
        }
        out.extend_from_slice(&line[cur..]);
        self.rid = rid_buf;
        self.members = members;
        Ok(())
    }

    /// [`Self::blind_indexes`] for a JSON object (members found in
    /// `self.found`): the index as a JSON string, `null` for a null or
    /// missing source, the target left as it is for a token. A string is
    /// indexed by its decoded text, another value by its JSON text. A
    /// missing target key is an error: the index has nowhere to go.
    fn json_blind_indexes(
        &mut self,
        layout: &Layout,
        line: &[u8],
        members: &[jsonl::Member],
        row: u64,
    ) -> Result<()> {
        let base = layout.selected.len() + layout.row_id.len();
        self.bidx_vals.clear();
        self.bidx_out.clear();
        for (i, (b, indexer)) in layout.bidx.iter().zip(&layout.indexers).enumerate() {
            if self.found[base + i].is_none() {
                return Err(cell_err(
                    row,
                    &ColumnId::Name(b.key.clone()),
                    Error::format(
                        "the --blind-index target key is missing from the object (add it, e.g. as null: its value is replaced)",
                    ),
                ));
            }
            let a = self.bidx_vals.len();
            let src = &layout.selected[b.source].id;
            let raw = match self.found[b.source] {
                Some(m) => &line[members[m].value.0..members[m].value.1],
                None => b"null".as_slice(),
            };
            if raw == b"null" {
                self.bidx_vals.extend_from_slice(b"null");
                self.bidx_out.push(Some((a, self.bidx_vals.len())));
                continue;
            }
            let value = if raw[0] == b'"' {
                let v = jsonl::string_value(raw, &mut self.scratch)
                    .ok_or_else(|| cell_err(row, src, Error::format("invalid JSON string")))?;
                if looks_like_token(v) {
                    self.bidx_out.push(None);
                    continue;
                }
                v
            } else {
                raw
            };
            self.bidx_vals.push(b'"');
            indexer
                .index(value, &mut self.bidx_vals)
                .map_err(|e| cell_err(row, src, e))?;
            self.bidx_vals.push(b'"');
            self.bidx_out.push(Some((a, self.bidx_vals.len())));
        }
        Ok(())
    }

    fn json_cell(
        &mut self,
        sel: &Selected,
        raw: &[u8],
        rid: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if raw == b"null" {
            self.stats.nulls += 1;
            if let Crypto::Inspect = self.crypto {
                self.stats.inspect[sel.index].add_null();
            }
            out.extend_from_slice(raw);
            return Ok(());
        }
        match &mut self.crypto {
            Crypto::Inspect => {
                // A token is a JSON string; any other JSON value is clear.
                match jsonl::plain(raw, &mut self.scratch)? {
                    jsonl::Plain::Str(v) => self.stats.inspect[sel.index].add(v),
                    _ => self.stats.inspect[sel.index].add(b""),
                }
                out.extend_from_slice(raw);
            }
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
                binding_encoded(&mut self.aad, &sel.prefix, rid);
                out.push(b'"');
                s.seal(&self.aad, flags | self.fmt_flags, v, out)?;
                out.push(b'"');
            }
            Crypto::Copy => match jsonl::plain(raw, &mut self.scratch)? {
                jsonl::Plain::Str(v) => jsonl::write_value(out, v, false)?,
                _ => out.extend_from_slice(raw),
            },
            Crypto::Open(o) => {
                let tok = jsonl::string_value(raw, &mut self.scratch).filter(|t| has_prefix(t));
                let Some(tok) = tok else {
                    if !self.allow_plaintext {
                        return Err(plaintext_err());
                    }
                    self.stats.plaintext += 1;
                    out.extend_from_slice(raw);
                    return Ok(());
                };
                binding_encoded(&mut self.aad, &sel.prefix, rid);
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
                let tok = jsonl::string_value(raw, &mut self.scratch).filter(|t| has_prefix(t));
                let Some(tok) = tok else {
                    if !self.allow_plaintext {
                        return Err(plaintext_err());
                    }
                    self.stats.plaintext += 1;
                    out.extend_from_slice(raw);
                    return Ok(());
                };
                binding_encoded(&mut self.aad, &sel.prefix, rid);
                out.push(b'"');
                rw.rewrap(&self.aad, tok, out)?;
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
