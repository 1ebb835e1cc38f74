//! The dump formats (`--format`): their names, the file extensions that
//! name them, and the two facts the parsers need. A format is never guessed
//! from the content (issue 9).

use crate::error::{Error, Result};
use std::path::Path;

/// The dump formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Tsv,
    Jsonl,
    #[serde(rename = "pgcopy")]
    PgCopy,
    /// A Parquet file (`super::parquet`): not a stream, not parsed by the
    /// pipeline's record parsers.
    Parquet,
}

impl Format {
    /// Parses a `--format` value.
    pub fn parse(s: &str) -> Result<Format> {
        match s.to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "tsv" => Ok(Format::Tsv),
            "jsonl" | "ndjson" => Ok(Format::Jsonl),
            "pgcopy" => Ok(Format::PgCopy),
            "parquet" => Ok(Format::Parquet),
            _ => Err(Error::usage(format!(
                "unknown format {s:?}: use csv, tsv, jsonl, pgcopy or parquet"
            ))),
        }
    }

    /// The format a file name suggests: `.csv`, `.tsv`/`.tab`,
    /// `.jsonl`/`.ndjson`, `.copy`/`.pgcopy`, `.parquet`.
    pub fn from_path(p: &Path) -> Option<Format> {
        let ext = p.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Format::Csv),
            "tsv" | "tab" => Some(Format::Tsv),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "copy" | "pgcopy" => Some(Format::PgCopy),
            "parquet" => Some(Format::Parquet),
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
            Format::Parquet => "parquet",
        }
    }

    /// CSV, TSV and pgcopy: records of fields, with a header (JSONL is not).
    pub(super) fn is_table(self) -> bool {
        self != Format::Jsonl
    }

    /// The field delimiter of a table format.
    pub(super) fn delim(self) -> u8 {
        match self {
            Format::Csv => b',',
            _ => b'\t',
        }
    }
}
