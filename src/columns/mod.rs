//! Column dumps: per-record encryption of selected columns in CSV, TSV,
//! JSON Lines and PostgreSQL `COPY` text dumps (`hsmseal columns ...`).
//!
//! Every selected, non-NULL value becomes a self-contained token (see
//! [`token`] and docs/FORMAT.md (section 6)) with its own random DEK; DEKs are
//! protected by batch keys, and only batch keys go to the HSM, so HSM calls
//! grow with batches, not rows.
//!
//! Files: this one holds the four entry points ([`encrypt`], [`decrypt`],
//! [`rewrap`], [`passthrough`]); `format` the dump formats, `options` what a
//! run is asked and reports, `layout` the header and which columns,
//! `pipeline` the reader, worker and writer threads (constant memory, order
//! kept, all cores busy), `cells` the per-cell crypto; [`token`] the token
//! format, [`csv`], [`pgcopy`], [`jsonl`] the field parsers, [`abort`] the
//! marker that ends a failed stream.
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
pub mod blind_index;
mod cells;
pub mod csv;
mod format;
pub mod inspect;
pub mod jsonl;
mod layout;
mod options;
pub mod parquet;
pub mod pgcopy;
mod pipeline;
mod scan;
pub mod token;

pub use blind_index::{BlindIndexSpec, BlindIndexer, Normalize};
pub use format::Format;
pub use layout::{encode_row_id, row_id_part, row_id_start, MAX_RECORD, MAX_ROW_ID_COLUMNS};
pub use options::{ColumnOptions, ColumnStats};
pub use token::{DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE, MAX_VALUE};

use crate::backend::{KeyBackend, KeyRef};
use crate::error::{Error, Result};
use cells::Mode;
use std::io::{Read, Write};

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
    pipeline::run(Mode::Encrypt(backend, key), opts, input, output)
}

/// Decrypts the tokens in the selected columns of `input`.
pub fn decrypt(
    backend: &dyn KeyBackend,
    opts: &ColumnOptions,
    input: impl Read + Send + 'static,
    output: impl Write,
) -> Result<ColumnStats> {
    pipeline::run(Mode::Decrypt(backend), opts, input, output)
}

/// Rewraps the batch key of every token in the selected columns to `target`
/// (a current KWK version), or with `None` each to the current version of
/// the key it is under now, without touching the encrypted records.
/// [`ColumnStats::targets`] lists the versions the tokens went to.
pub fn rewrap(
    backend: &dyn KeyBackend,
    target: Option<&KeyRef>,
    opts: &ColumnOptions,
    input: impl Read + Send + 'static,
    output: impl Write,
) -> Result<ColumnStats> {
    pipeline::run(Mode::Rewrap(backend, target), opts, input, output)
}

/// Counts, per selected column of `input`, NULLs, clear values, tokens per
/// key version and malformed tokens ([`inspect`], in
/// [`ColumnStats::inspect`]): no key is used, nothing is written.
pub fn inspect(opts: &ColumnOptions, input: impl Read + Send + 'static) -> Result<ColumnStats> {
    pipeline::run(Mode::Inspect, opts, input, std::io::sink())
}

/// Parses and rewrites the selected columns without any cryptography: the
/// speed ceiling the benchmark compares against.
pub fn passthrough(
    opts: &ColumnOptions,
    input: impl Read + Send + 'static,
    output: impl Write,
) -> Result<ColumnStats> {
    pipeline::run(Mode::Passthrough, opts, input, output)
}
