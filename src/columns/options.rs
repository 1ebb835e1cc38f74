//! What a `columns` run is asked to do ([`ColumnOptions`]) and what it did
//! ([`ColumnStats`]).

use super::format::Format;
use super::token::DEFAULT_BATCH_SIZE;

/// What to do with the selected columns.
#[derive(Debug, Clone)]
pub struct ColumnOptions {
    pub format: Format,
    /// Header names (JSON keys for JSONL), or 1-based positions when
    /// `header` is false.
    pub columns: Vec<String>,
    /// The first record is a header (CSV, TSV, pgcopy). Ignored for JSONL.
    pub header: bool,
    /// Columns whose values bind each token to its row (a unique key,
    /// composite keys in key order). Empty: tokens are not bound to rows.
    pub row_id: Vec<String>,
    /// Bound into every token, e.g. `app.users`. Empty by default.
    pub context: String,
    /// Cells (selected non-NULL values, not rows) per batch key.
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
    /// On encrypt, the blind indexes to write (`--blind-index`): each
    /// source column must be one of `columns`, each target an existing
    /// column whose values are replaced by the index of the source's
    /// plaintext.
    pub blind_indexes: Vec<super::blind_index::BlindIndexSpec>,
}

impl Default for ColumnOptions {
    fn default() -> Self {
        ColumnOptions {
            format: Format::Csv,
            columns: Vec::new(),
            header: true,
            row_id: Vec::new(),
            context: String::new(),
            batch_size: DEFAULT_BATCH_SIZE,
            allow_plaintext: false,
            skip_tokens: false,
            token_formats: Vec::new(),
            nested: false,
            jobs: 0,
            blind_indexes: Vec::new(),
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
    /// `rewrap`: the key versions the tokens are under now (the given
    /// target, or each token's own key at its current version).
    #[serde(skip)]
    pub targets: Vec<crate::backend::KeyRef>,
    /// [`super::inspect`]: per selected column (layout order: field order
    /// for tables, `--columns` order for JSONL).
    #[serde(skip)]
    pub inspect: Vec<(super::token::ColumnId, super::inspect::ColumnCounts)>,
}
