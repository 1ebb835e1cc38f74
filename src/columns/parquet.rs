//! Parquet column dumps (`--format parquet`, docs/FORMAT.md section 6,
//! "Parquet"): the selected top-level columns are replaced by UTF8 columns
//! of tokens; every other column, the row groups (same rows per group) and
//! the file's key-value metadata are kept. The original type of each
//! encrypted column is recorded in the key-value metadata under
//! [`META_KEY`], so decrypt rebuilds the exact schema and values.
//!
//! Invariants:
//! - Parquet is not a stream: the input is a file (its footer comes last),
//!   and the output is written whole by the caller into a temporary file
//!   renamed only after it is complete (`fs::AtomicFile`).
//! - Memory is bounded by one row group: row groups are read, transformed
//!   and written one at a time (the writer buffers the current group only).
//! - Row group k of the output holds the rows of row group k of the input,
//!   an empty group included.
//! - A malformed input is an error (exit 8), never a panic: every call
//!   into the parquet crate's reader goes through [`reading`].
//! - NULLs stay NULL (never a token); a non-NULL cell's plaintext is the
//!   byte encoding of [`plain`], and the column's type string is bound into
//!   every token (the column id of the binding), so a changed type in the
//!   metadata fails authentication instead of decoding to wrong values.
//! - Every error names its row (1-based within the file) and column.
//! - No statistics, dictionary or bloom filter of a selected column's
//!   plaintext reaches an encrypted file: the columns are rewritten from
//!   their tokens, nothing is copied from the input's column chunks.

use super::format::Format;
use super::inspect::ColumnCounts;
use super::layout::{row_id_part, row_id_start};
use super::options::{ColumnOptions, ColumnStats};
use super::token::{
    self, binding_encoded, binding_prefix, has_prefix, looks_like_token, BatchCache, ColumnId,
    Opener, RewrapCache, Rewrapper, Sealer,
};
use crate::backend::{KeyBackend, KeyRef};
use crate::error::{Error, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{make_array, Array, ArrayRef, BooleanArray, RecordBatch};
use arrow_buffer::{Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
use parquet::arrow::arrow_writer::compute_leaves;
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

/// The key-value metadata key that lists the encrypted columns and their
/// original types (JSON, see [`Meta`]).
pub const META_KEY: &str = "hsmseal.columns";

/// Rows per Arrow batch read from a row group (a row group is read in
/// several batches and written as one group).
const READ_BATCH: usize = 8192;

/// First byte of the binding's row id of a Parquet cell bound to its
/// position (no `--row-id`): the row id encodings of FORMAT section 6 use
/// 0, 1 and 2, so a position never reads as a row id value.
const ROW_POSITION_TAG: u8 = 3;

/// What the `hsmseal.columns` metadata value holds.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    /// 1 (this layout).
    version: u32,
    /// The encrypted columns, in the order they were encrypted.
    columns: Vec<MetaColumn>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MetaColumn {
    name: String,
    /// [`type_name`] of the original Arrow type.
    #[serde(rename = "type")]
    ty: String,
}

/// The canonical name of a supported Arrow type (FORMAT section 6,
/// "Parquet"); `None` for types hsmseal does not encrypt.
pub fn type_name(dt: &DataType) -> Option<String> {
    let unit = |u: &TimeUnit| match u {
        TimeUnit::Second => "s",
        TimeUnit::Millisecond => "ms",
        TimeUnit::Microsecond => "us",
        TimeUnit::Nanosecond => "ns",
    };
    Some(match dt {
        DataType::Utf8 => "utf8".into(),
        DataType::LargeUtf8 => "large_utf8".into(),
        DataType::Binary => "binary".into(),
        DataType::LargeBinary => "large_binary".into(),
        DataType::Boolean => "bool".into(),
        DataType::Int8 => "int8".into(),
        DataType::Int16 => "int16".into(),
        DataType::Int32 => "int32".into(),
        DataType::Int64 => "int64".into(),
        DataType::UInt8 => "uint8".into(),
        DataType::UInt16 => "uint16".into(),
        DataType::UInt32 => "uint32".into(),
        DataType::UInt64 => "uint64".into(),
        DataType::Float32 => "float32".into(),
        DataType::Float64 => "float64".into(),
        DataType::Date32 => "date32".into(),
        DataType::Timestamp(u, None) => format!("timestamp[{}]", unit(u)),
        DataType::Timestamp(u, Some(tz)) => format!("timestamp[{},tz={tz}]", unit(u)),
        DataType::Decimal128(p, s) => format!("decimal128({p},{s})"),
        _ => return None,
    })
}

/// The inverse of [`type_name`].
fn parse_type(s: &str) -> Option<DataType> {
    let unit = |u: &str| match u {
        "s" => Some(TimeUnit::Second),
        "ms" => Some(TimeUnit::Millisecond),
        "us" => Some(TimeUnit::Microsecond),
        "ns" => Some(TimeUnit::Nanosecond),
        _ => None,
    };
    let dt = match s {
        "utf8" => DataType::Utf8,
        "large_utf8" => DataType::LargeUtf8,
        "binary" => DataType::Binary,
        "large_binary" => DataType::LargeBinary,
        "bool" => DataType::Boolean,
        "int8" => DataType::Int8,
        "int16" => DataType::Int16,
        "int32" => DataType::Int32,
        "int64" => DataType::Int64,
        "uint8" => DataType::UInt8,
        "uint16" => DataType::UInt16,
        "uint32" => DataType::UInt32,
        "uint64" => DataType::UInt64,
        "float32" => DataType::Float32,
        "float64" => DataType::Float64,
        "date32" => DataType::Date32,
        _ => {
            if let Some(rest) = s
                .strip_prefix("timestamp[")
                .and_then(|r| r.strip_suffix(']'))
            {
                match rest.split_once(",tz=") {
                    Some((u, tz)) if !tz.is_empty() => {
                        DataType::Timestamp(unit(u)?, Some(tz.into()))
                    }
                    Some(_) => return None,
                    None => DataType::Timestamp(unit(rest)?, None),
                }
            } else if let Some(rest) = s
                .strip_prefix("decimal128(")
                .and_then(|r| r.strip_suffix(')'))
            {
                let (p, sc) = rest.split_once(',')?;
                let (p, sc): (u8, i8) = (p.parse().ok()?, sc.parse().ok()?);
                if p == 0 || p > 38 || i16::from(sc) > i16::from(p) {
                    return None;
                }
                DataType::Decimal128(p, sc)
            } else {
                return None;
            }
        }
    };
    // Canonical spelling only: one type, one name, one binding.
    (type_name(&dt).as_deref() == Some(s)).then_some(dt)
}

/// The column id bound into a Parquet cell's token: the column name, a NUL
/// byte and the type name (type names hold no NUL, so the pair is
/// unambiguous). A token moved to a column of another name or type, or a
/// type changed in the metadata, fails authentication.
fn bound_column(name: &str, ty: &str) -> ColumnId {
    ColumnId::Name(format!("{name}\0{ty}"))
}

/// Width in bytes of a fixed-width type's plaintext (`None`: variable).
fn fixed_width(dt: &DataType) -> Option<usize> {
    Some(match dt {
        DataType::Boolean | DataType::Int8 | DataType::UInt8 => 1,
        DataType::Int16 | DataType::UInt16 => 2,
        DataType::Int32 | DataType::UInt32 | DataType::Float32 | DataType::Date32 => 4,
        DataType::Int64 | DataType::UInt64 | DataType::Float64 | DataType::Timestamp(..) => 8,
        DataType::Decimal128(..) => 16,
        _ => return None,
    })
}

/// Appends the plaintext bytes of the non-NULL cell `i` of `a` (FORMAT
/// section 6): strings their UTF-8, binary its bytes, bool one byte 0/1,
/// numbers (integers, the IEEE 754 bits of floats, date32 days, timestamp
/// ticks, decimal128 unscaled) big-endian at their width.
fn plain(a: &dyn Array, i: usize, out: &mut Vec<u8>) {
    macro_rules! be {
        ($t:ty) => {
            out.extend_from_slice(&a.as_primitive::<$t>().value(i).to_be_bytes())
        };
    }
    match a.data_type() {
        DataType::Utf8 => out.extend_from_slice(a.as_string::<i32>().value(i).as_bytes()),
        DataType::LargeUtf8 => out.extend_from_slice(a.as_string::<i64>().value(i).as_bytes()),
        DataType::Binary => out.extend_from_slice(a.as_binary::<i32>().value(i)),
        DataType::LargeBinary => out.extend_from_slice(a.as_binary::<i64>().value(i)),
        DataType::Boolean => out.push(u8::from(a.as_boolean().value(i))),
        DataType::Int8 => be!(Int8Type),
        DataType::Int16 => be!(Int16Type),
        DataType::Int32 => be!(Int32Type),
        DataType::Int64 => be!(Int64Type),
        DataType::UInt8 => be!(UInt8Type),
        DataType::UInt16 => be!(UInt16Type),
        DataType::UInt32 => be!(UInt32Type),
        DataType::UInt64 => be!(UInt64Type),
        DataType::Float32 => out.extend_from_slice(
            &a.as_primitive::<Float32Type>()
                .value(i)
                .to_bits()
                .to_be_bytes(),
        ),
        DataType::Float64 => out.extend_from_slice(
            &a.as_primitive::<Float64Type>()
                .value(i)
                .to_bits()
                .to_be_bytes(),
        ),
        DataType::Date32 => be!(Date32Type),
        DataType::Timestamp(TimeUnit::Second, _) => be!(TimestampSecondType),
        DataType::Timestamp(TimeUnit::Millisecond, _) => be!(TimestampMillisecondType),
        DataType::Timestamp(TimeUnit::Microsecond, _) => be!(TimestampMicrosecondType),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => be!(TimestampNanosecondType),
        DataType::Decimal128(..) => be!(Decimal128Type),
        // Every selected column's type was checked by `type_name` first.
        t => unreachable!("unsupported type {t} reached plain()"),
    }
}

/// Plaintexts of one column of a batch, back to back, in the shape
/// [`rebuild`] turns into an Arrow array of the original type.
#[derive(Default)]
struct Plains {
    bytes: Vec<u8>,
    /// `ends[i]`: end of cell i in `bytes` (a NULL is empty).
    ends: Vec<usize>,
    valid: Vec<bool>,
}

impl Plains {
    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
        self.valid.clear();
    }
    fn null(&mut self) {
        self.ends.push(self.bytes.len());
        self.valid.push(false);
    }
    fn value(&mut self, v: &[u8]) {
        self.bytes.extend_from_slice(v);
        self.ends.push(self.bytes.len());
        self.valid.push(true);
    }
    fn cell(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }
}

/// Builds the array of type `dt` from decrypted plaintexts (`first_row`:
/// the 1-based file row of cell 0, for errors naming `name`).
fn rebuild(dt: &DataType, p: &Plains, first_row: u64, name: &str) -> Result<ArrayRef> {
    let n = p.valid.len();
    let nulls = NullBuffer::from(p.valid.clone());
    let nulls = (nulls.null_count() > 0).then_some(nulls);
    let cell_err = |i: usize, what: String| {
        Error::format(format!(
            "row {}, column {name:?}: {what}",
            first_row + i as u64
        ))
    };
    let offsets = |large: bool| -> Result<Buffer> {
        let mut ends = Vec::with_capacity(n + 1);
        ends.push(0usize);
        ends.extend_from_slice(&p.ends);
        if large {
            Ok(OffsetBuffer::<i64>::new(ScalarBuffer::from(
                ends.iter().map(|&e| e as i64).collect::<Vec<_>>(),
            ))
            .into_inner()
            .into_inner())
        } else {
            let v = ends
                .iter()
                .map(|&e| i32::try_from(e))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| {
                    Error::format(format!(
                        "column {name:?}: a batch of {n} values exceeds 2 GiB, the limit of its type"
                    ))
                })?;
            Ok(OffsetBuffer::<i32>::new(ScalarBuffer::from(v))
                .into_inner()
                .into_inner())
        }
    };
    let data = match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Binary | DataType::LargeBinary => {
            let large = matches!(dt, DataType::LargeUtf8 | DataType::LargeBinary);
            if matches!(dt, DataType::Utf8 | DataType::LargeUtf8) {
                for i in 0..n {
                    if std::str::from_utf8(p.cell(i)).is_err() {
                        return Err(cell_err(
                            i,
                            "the decrypted value is not UTF-8, as its type (a string) requires"
                                .into(),
                        ));
                    }
                }
            }
            arrow_data::ArrayData::builder(dt.clone())
                .len(n)
                .add_buffer(offsets(large)?)
                .add_buffer(Buffer::from_vec(p.bytes.clone()))
                .nulls(nulls)
                .build()
        }
        DataType::Boolean => {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                v.push(match (p.valid[i], p.cell(i)) {
                    (false, _) => None,
                    (true, [0]) => Some(false),
                    (true, [1]) => Some(true),
                    (true, c) => {
                        return Err(cell_err(
                            i,
                            format!(
                            "the decrypted value has {} bytes, not the one byte 0 or 1 of a bool",
                            c.len()
                        ),
                        ))
                    }
                });
            }
            return Ok(Arc::new(BooleanArray::from(v)));
        }
        _ => {
            let w = fixed_width(dt).expect("checked by parse_type");
            let mut values = vec![0u8; n * w];
            for i in 0..n {
                if !p.valid[i] {
                    continue;
                }
                let c = p.cell(i);
                if c.len() != w {
                    return Err(cell_err(
                        i,
                        format!(
                            "the decrypted value has {} bytes, not the {w} of {}",
                            c.len(),
                            type_name(dt).unwrap_or_default()
                        ),
                    ));
                }
                // Big-endian in the token, little-endian in Arrow.
                for (d, s) in values[i * w..(i + 1) * w].iter_mut().zip(c.iter().rev()) {
                    *d = *s;
                }
            }
            arrow_data::ArrayData::builder(dt.clone())
                .len(n)
                .add_buffer(Buffer::from_vec(values))
                .nulls(nulls)
                .build()
        }
    };
    let data = data.map_err(|e| Error::format(format!("column {name:?}: {e}")))?;
    Ok(make_array(data))
}

/// What a Parquet run does to the selected cells.
enum Op<'a> {
    Seal(Box<Sealer<'a>>),
    Open(Opener<'a>, &'a BatchCache),
    Rewrap(Rewrapper<'a>, &'a RewrapCache, Option<&'a KeyRef>),
    Copy,
    Inspect(Vec<ColumnCounts>),
}

/// One selected column.
struct Sel {
    name: String,
    /// Its index in the file's Arrow schema.
    index: usize,
    /// The type of its values (encrypt: the input's; decrypt: the one
    /// recorded in the metadata).
    ty: DataType,
    /// Binding prefix (context, column name and type).
    prefix: Vec<u8>,
}

fn pq_err(place: &str, e: impl std::fmt::Display) -> Error {
    Error::format(format!(
        "{place}: {e} (is it a complete Parquet file? supported compression: none, snappy)"
    ))
}

thread_local! {
    /// Set while [`reading`] runs a call into the parquet crate on this
    /// thread: a panic then is contained and becomes an error.
    static CONTAINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True while a panic on this thread is contained by [`reading`] (a
/// malformed file the parquet crate panics on rather than rejects): the
/// binary's panic hook stays silent then, the error says it all.
pub fn panic_is_contained() -> bool {
    CONTAINED.with(|c| c.get())
}

/// Runs `f`, a call into the parquet crate reading the input, turning its
/// error or its panic (some malformed files reach an `unwrap` inside the
/// crate: tests/columns_parquet.rs found one in the footer's thrift
/// decoder) into a format error (exit 8) naming `place`. Nothing of the
/// reader is used after a panic: it is dropped with the unwinding closure
/// or by the caller's early return.
fn reading<T, E: std::fmt::Display>(
    place: &str,
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> Result<T> {
    let was = CONTAINED.with(|c| c.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(was));
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(pq_err(place, e)),
        Err(_) => Err(pq_err(place, "the Parquet reader failed on malformed data")),
    }
}

/// Encrypts the selected columns of the Parquet file `input` to `output`.
pub fn encrypt(
    backend: &dyn KeyBackend,
    key: &KeyRef,
    opts: &ColumnOptions,
    input: File,
    output: &mut (dyn Write + Send),
) -> Result<ColumnStats> {
    if opts.batch_size == 0 || opts.batch_size > token::MAX_BATCH_SIZE {
        return Err(Error::usage(format!(
            "--batch-size must be between 1 and {}",
            token::MAX_BATCH_SIZE
        )));
    }
    let op = Op::Seal(Box::new(Sealer::new(backend, key, opts.batch_size)?));
    run(op, opts, input, output)
}

/// Decrypts the selected columns (each must be listed in [`META_KEY`]).
pub fn decrypt(
    backend: &dyn KeyBackend,
    opts: &ColumnOptions,
    input: File,
    output: &mut (dyn Write + Send),
) -> Result<ColumnStats> {
    let cache = BatchCache::new();
    run(
        Op::Open(Opener::new(backend, &cache), &cache),
        opts,
        input,
        output,
    )
}

/// Rewraps the batch keys of the selected columns' tokens (see
/// [`super::rewrap`]).
pub fn rewrap(
    backend: &dyn KeyBackend,
    target: Option<&KeyRef>,
    opts: &ColumnOptions,
    input: File,
    output: &mut (dyn Write + Send),
) -> Result<ColumnStats> {
    let cache = RewrapCache::new();
    let rw = Rewrapper::with_batch_size(backend, target, &cache, opts.batch_size);
    run(Op::Rewrap(rw, &cache, target), opts, input, output)
}

/// Reads and rewrites the file without cryptography, with the same reader
/// and writer settings: the benchmark's baseline.
pub fn passthrough(
    opts: &ColumnOptions,
    input: File,
    output: &mut (dyn Write + Send),
) -> Result<ColumnStats> {
    run(Op::Copy, opts, input, output)
}

/// Counts, per selected column, NULLs, clear values and tokens per key
/// ([`ColumnStats::inspect`]); nothing is written, no key is used.
pub fn inspect(opts: &ColumnOptions, input: File) -> Result<ColumnStats> {
    let n = opts.columns.len();
    let mut sink = std::io::sink();
    run(
        Op::Inspect(vec![ColumnCounts::default(); n]),
        opts,
        input,
        &mut sink,
    )
}

/// Refuses the dump flags that have no meaning for Parquet (exit 2). The
/// command line calls it before login too, so a mistyped run never asks
/// for the PIN.
pub fn refuse_flags(opts: &ColumnOptions) -> Result<()> {
    let unsupported = [
        (opts.allow_plaintext, "--allow-plaintext"),
        (opts.skip_tokens, "--skip-tokens"),
        (opts.nested, "--nested"),
        (!opts.token_formats.is_empty(), "--token-format"),
        (!opts.blind_indexes.is_empty(), "--blind-index"),
        (!opts.header, "--no-header"),
    ];
    if let Some((_, flag)) = unsupported.iter().find(|(on, _)| *on) {
        return Err(Error::usage(format!(
            "{flag} does not apply to --format parquet"
        )));
    }
    if opts.columns.is_empty() {
        return Err(Error::usage("--columns is empty"));
    }
    Ok(())
}

fn run(
    mut op: Op<'_>,
    opts: &ColumnOptions,
    input: File,
    output: &mut (dyn Write + Send),
) -> Result<ColumnStats> {
    let t0 = Instant::now();
    refuse_flags(opts)?;
    let size = input
        .metadata()
        .map_err(|e| Error::io(format!("cannot read the input's size: {e}")))?
        .len();
    let meta = reading("not a readable Parquet file", || {
        ArrowReaderMetadata::load(&input, Default::default())
    })?;
    let schema = meta.schema().clone();
    let file_meta = meta.metadata().file_metadata();
    let kv: Vec<KeyValue> = file_meta.key_value_metadata().cloned().unwrap_or_default();
    let recorded: Meta = match kv.iter().find(|k| k.key == META_KEY) {
        None => Meta {
            version: 1,
            columns: Vec::new(),
        },
        Some(k) => {
            let m: Meta = serde_json::from_str(k.value.as_deref().unwrap_or(""))
                .map_err(|e| Error::format(format!("the {META_KEY} metadata is not valid: {e}")))?;
            if m.version != 1 {
                return Err(Error::format(format!(
                    "the {META_KEY} metadata has version {}; this hsmseal reads version 1",
                    m.version
                )));
            }
            m
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut sels = Vec::new();
    for name in &opts.columns {
        if !seen.insert(name.as_str()) {
            return Err(Error::usage(format!("--columns names {name:?} twice")));
        }
        let index = schema.index_of(name).map_err(|_| {
            Error::usage(format!(
                "the Parquet file has no top-level column {name:?} (its columns: {})",
                schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let field = schema.field(index);
        let in_meta = recorded.columns.iter().find(|c| &c.name == name);
        let ty = match (&op, in_meta) {
            (Op::Seal(_), Some(_)) => {
                return Err(Error::usage(format!(
                "column {name:?} is already encrypted (listed in the file's {META_KEY} metadata)"
            )))
            }
            (Op::Seal(_) | Op::Copy, None) => match type_name(field.data_type()) {
                Some(_) => field.data_type().clone(),
                None => return Err(unsupported(name, field.data_type())),
            },
            (Op::Copy | Op::Inspect(_), _) => field.data_type().clone(),
            (_, None) => {
                return Err(Error::usage(format!(
                "column {name:?} is not encrypted: the file's {META_KEY} metadata does not list it"
            )))
            }
            (_, Some(c)) => parse_type(&c.ty).ok_or_else(|| {
                Error::format(format!(
                    "the {META_KEY} metadata gives column {name:?} the unknown type {:?}",
                    c.ty
                ))
            })?,
        };
        if !matches!(op, Op::Seal(_) | Op::Copy | Op::Inspect(_))
            && field.data_type() != &DataType::Utf8
        {
            return Err(Error::format(format!(
                "column {name:?} is {} in the file, not the utf8 of a token column",
                field.data_type()
            )));
        }
        let tn = type_name(&ty).unwrap_or_default();
        sels.push(Sel {
            name: name.clone(),
            index,
            prefix: binding_prefix(&opts.context, &bound_column(name, &tn)),
            ty,
        });
    }
    let mut rids = Vec::new();
    for name in &opts.row_id {
        let index = schema.index_of(name).map_err(|_| {
            Error::usage(format!(
                "--row-id: the Parquet file has no top-level column {name:?}"
            ))
        })?;
        if opts.columns.contains(name) {
            return Err(Error::usage(format!(
                "--row-id column {name:?} is also in --columns: a row id must stay readable to bind"
            )));
        }
        if type_name(schema.field(index).data_type()).is_none() {
            return Err(unsupported(name, schema.field(index).data_type()));
        }
        rids.push(index);
    }
    // The output schema: selected columns become utf8 (encrypt) or get
    // their recorded type back (decrypt); field metadata and nullability
    // are kept.
    let mut out_meta = recorded.clone();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    for s in &sels {
        let f = &fields[s.index];
        match op {
            Op::Seal(_) => {
                fields[s.index] = f.clone().with_data_type(DataType::Utf8);
                out_meta.columns.push(MetaColumn {
                    name: s.name.clone(),
                    ty: type_name(&s.ty).unwrap_or_default(),
                });
            }
            Op::Open(..) => {
                fields[s.index] = f.clone().with_data_type(s.ty.clone());
                out_meta.columns.retain(|c| c.name != s.name);
            }
            _ => {}
        }
    }
    let meta_value = (!out_meta.columns.is_empty())
        .then(|| serde_json::to_string(&out_meta).expect("serialisable"));
    // Schema-level metadata travels in the ARROW:schema the writer embeds;
    // the file's key-value pairs are carried over as they are.
    let mut schema_md: HashMap<String, String> = schema.metadata().clone();
    schema_md.remove(META_KEY);
    if let Some(v) = &meta_value {
        schema_md.insert(META_KEY.into(), v.clone());
    }
    let out_schema: SchemaRef = Arc::new(Schema::new_with_metadata(fields, schema_md));
    let mut out_kv: Vec<KeyValue> = kv
        .iter()
        .filter(|k| k.key != META_KEY && k.key != parquet::arrow::ARROW_SCHEMA_META_KEY)
        .cloned()
        .collect();
    if let Some(v) = meta_value {
        out_kv.push(KeyValue::new(META_KEY.into(), v));
    }
    let pq_meta = meta.metadata().clone();
    let mut props = WriterProperties::builder()
        // Row groups are ended by hand, one per input group.
        .set_max_row_group_size(usize::MAX)
        .set_key_value_metadata(Some(out_kv));
    if let Some(rg) = pq_meta.row_groups().first() {
        for c in rg.columns() {
            props = props.set_column_compression(c.column_path().clone(), c.compression());
        }
    }
    for s in &sels {
        if matches!(op, Op::Seal(_) | Op::Rewrap(..)) {
            // Tokens are unique: a dictionary would only cost memory.
            props = props.set_column_dictionary_enabled(ColumnPath::from(s.name.as_str()), false);
        }
    }
    let inspecting = matches!(op, Op::Inspect(_));
    // The low-level writer, so each input row group becomes one output row
    // group, an empty one included (`ArrowWriter::flush` skips a group with
    // no rows, which would drop the input's empty groups).
    let mut writer = if inspecting {
        None
    } else {
        Some(
            ArrowWriter::try_new(output, out_schema.clone(), Some(props.build()))
                .and_then(|w| w.into_serialized_writer())
                .map_err(|e| Error::format(format!("cannot write the Parquet output: {e}")))?,
        )
    };
    let write_err =
        |e: parquet::errors::ParquetError| Error::io(format!("writing the Parquet output: {e}"));
    let mut stats = ColumnStats {
        bytes_in: size,
        ..Default::default()
    };
    let mut st = State {
        aad: Vec::with_capacity(128),
        rid: Vec::new(),
        scratch: Vec::new(),
        tok: Vec::new(),
        plains: Plains::default(),
        stats: &mut stats,
    };
    let mut row: u64 = 0;
    for g in 0..pq_meta.num_row_groups() {
        let place = format!("row group {}", g + 1);
        let mut reader = reading(&place, || {
            ParquetRecordBatchReaderBuilder::new_with_metadata(
                input.try_clone().map_err(|e| e.to_string())?,
                meta.clone(),
            )
            .with_row_groups(vec![g])
            .with_batch_size(READ_BATCH)
            .build()
            .map_err(|e| e.to_string())
        })?;
        let mut columns = match &writer {
            Some((_, factory)) => Some(factory.create_column_writers(g).map_err(write_err)?),
            None => None,
        };
        while let Some(batch) = reading(&place, || reader.next().transpose())? {
            let out = st.batch(&mut op, &sels, &rids, &out_schema, &batch, row)?;
            row += batch.num_rows() as u64;
            if let Some(cw) = columns.as_mut() {
                let mut leaves = cw.iter_mut();
                for (field, array) in out_schema.fields().iter().zip(out.columns()) {
                    for leaf in compute_leaves(field, array).map_err(write_err)? {
                        leaves
                            .next()
                            .ok_or_else(|| {
                                Error::format("internal error: more leaf columns than writers")
                            })?
                            .write(&leaf)
                            .map_err(write_err)?;
                    }
                }
            }
        }
        if let (Some((w, _)), Some(cw)) = (writer.as_mut(), columns) {
            let mut rg = w.next_row_group().map_err(write_err)?;
            for c in cw {
                c.close()
                    .and_then(|chunk| chunk.append_to_row_group(&mut rg))
                    .map_err(write_err)?;
            }
            rg.close().map_err(write_err)?;
        }
    }
    if let Some((mut w, _)) = writer {
        w.finish().map_err(write_err)?;
        stats.bytes_out = w.bytes_written() as u64;
    }
    stats.rows = row;
    match op {
        Op::Seal(s) => {
            stats.batches = s.batches;
            stats.hsm_calls = s.hsm_calls;
        }
        Op::Open(_, cache) => {
            stats.hsm_calls = cache.hsm_calls();
            stats.batches = cache.hsm_calls();
        }
        Op::Rewrap(_, cache, target) => {
            stats.hsm_calls = cache.hsm_calls();
            stats.batches = cache.hsm_calls() / 2;
            stats.targets = match target {
                Some(t) => vec![t.clone()],
                None => cache.targets(),
            };
        }
        Op::Inspect(counts) => {
            stats.inspect = sels
                .iter()
                .zip(counts)
                .map(|(s, c)| (ColumnId::Name(s.name.clone()), c))
                .collect();
        }
        Op::Copy => {}
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok(stats)
}

fn unsupported(name: &str, dt: &DataType) -> Error {
    Error::usage(format!(
        "column {name:?} has type {dt}, which --format parquet does not encrypt (supported: utf8, large_utf8, binary, large_binary, bool, int8-64, uint8-64, float32, float64, date32, timestamp, decimal128; nested types never)"
    ))
}

/// Cell `i` of a token column for decrypt and rewrap: `None` for NULL,
/// else its token, whose binding (`prefix` and row id `rid`) is then in
/// `aad`. A value without the token prefix is a format error (the caller
/// adds row and column).
fn token_cell<'a>(
    sa: &'a arrow_array::StringArray,
    i: usize,
    prefix: &[u8],
    rid: &[u8],
    aad: &mut Vec<u8>,
) -> Result<Option<&'a [u8]>> {
    if sa.is_null(i) {
        return Ok(None);
    }
    let v = sa.value(i).as_bytes();
    if !has_prefix(v) {
        return Err(Error::format(
            "expected an hsmseal token but found a plaintext value",
        ));
    }
    binding_encoded(aad, prefix, rid);
    Ok(Some(v))
}

/// Per-run scratch buffers and counts.
struct State<'s> {
    aad: Vec<u8>,
    rid: Vec<u8>,
    scratch: Vec<u8>,
    tok: Vec<u8>,
    plains: Plains,
    stats: &'s mut ColumnStats,
}

impl State<'_> {
    /// Transforms one batch; `row0`: the 0-based file row of its first row.
    fn batch(
        &mut self,
        op: &mut Op<'_>,
        sels: &[Sel],
        rids: &[usize],
        out_schema: &SchemaRef,
        batch: &RecordBatch,
        row0: u64,
    ) -> Result<RecordBatch> {
        let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
        let n = batch.num_rows();
        // Row ids of the batch, encoded for the binding, back to back.
        let mut rid_all = Vec::new();
        let mut rid_ends = Vec::with_capacity(n);
        if !matches!(op, Op::Copy | Op::Inspect(_)) {
            for i in 0..n {
                if rids.is_empty() {
                    // Default binding: the row's 0-based position in the
                    // file, under its own tag: encoded as a one-column row
                    // id it would equal `--row-id ID` of an int64 ID equal
                    // to the position, and a token bound to one would open
                    // under the other.
                    self.rid.clear();
                    self.rid.push(ROW_POSITION_TAG);
                    self.rid.extend_from_slice(&(row0 + i as u64).to_be_bytes());
                } else {
                    row_id_start(&mut self.rid, rids.len());
                    for &c in rids {
                        let a = batch.column(c);
                        if a.is_null(i) {
                            return Err(Error::format(format!(
                                "row {}, column {:?}: the --row-id value is NULL",
                                row0 + i as u64 + 1,
                                batch.schema().field(c).name()
                            )));
                        }
                        self.scratch.clear();
                        plain(a.as_ref(), i, &mut self.scratch);
                        row_id_part(&mut self.rid, &self.scratch);
                    }
                }
                rid_all.extend_from_slice(&self.rid);
                rid_ends.push(rid_all.len());
            }
        }
        let rid_of = |i: usize| {
            let s = if i == 0 { 0 } else { rid_ends[i - 1] };
            &rid_all[s..rid_ends[i]]
        };
        for (k, s) in sels.iter().enumerate() {
            let a = batch.column(s.index).clone();
            let cell_err = |i: usize, e: Error| {
                e.context(format!("row {}, column {:?}", row0 + i as u64 + 1, s.name))
            };
            match op {
                Op::Copy => {}
                Op::Inspect(counts) => {
                    for i in 0..n {
                        if a.is_null(i) {
                            counts[k].add_null();
                            continue;
                        }
                        match a.data_type() {
                            DataType::Utf8 => {
                                counts[k].add(a.as_string::<i32>().value(i).as_bytes())
                            }
                            _ => counts[k].add(b""),
                        }
                    }
                    self.stats.nulls += a.null_count() as u64;
                }
                Op::Seal(sealer) => {
                    let mut b = arrow_array::builder::StringBuilder::with_capacity(n, n * 200);
                    for i in 0..n {
                        if a.is_null(i) {
                            b.append_null();
                            self.stats.nulls += 1;
                            continue;
                        }
                        self.scratch.clear();
                        plain(a.as_ref(), i, &mut self.scratch);
                        if matches!(s.ty, DataType::Utf8 | DataType::LargeUtf8)
                            && looks_like_token(&self.scratch)
                        {
                            return Err(cell_err(
                                i,
                                Error::format(
                                    "the value already is an hsmseal token (is this file partly encrypted?)",
                                ),
                            ));
                        }
                        binding_encoded(&mut self.aad, &s.prefix, rid_of(i));
                        self.tok.clear();
                        sealer
                            .seal(
                                &self.aad,
                                token::format_flags(Format::Parquet),
                                &self.scratch,
                                &mut self.tok,
                            )
                            .map_err(|e| cell_err(i, e))?;
                        b.append_value(std::str::from_utf8(&self.tok).expect("tokens are ASCII"));
                        self.stats.cells += 1;
                    }
                    cols[s.index] = Arc::new(b.finish());
                }
                Op::Open(opener, _) => {
                    let sa = a.as_string::<i32>();
                    self.plains.clear();
                    for i in 0..n {
                        let Some(v) = token_cell(sa, i, &s.prefix, rid_of(i), &mut self.aad)
                            .map_err(|e| cell_err(i, e))?
                        else {
                            self.plains.null();
                            self.stats.nulls += 1;
                            continue;
                        };
                        let (flags, value) =
                            opener.open(&self.aad, v).map_err(|e| cell_err(i, e))?;
                        if token::token_format(flags) != Some(Format::Parquet) {
                            return Err(cell_err(
                                i,
                                Error::format(
                                    "the token was not made from a Parquet file: its value has no Parquet type",
                                ),
                            ));
                        }
                        self.plains.value(value);
                        self.stats.cells += 1;
                    }
                    cols[s.index] = rebuild(&s.ty, &self.plains, row0 + 1, &s.name)?;
                }
                Op::Rewrap(rw, ..) => {
                    let sa = a.as_string::<i32>();
                    let mut b = arrow_array::builder::StringBuilder::with_capacity(n, n * 200);
                    for i in 0..n {
                        let Some(v) = token_cell(sa, i, &s.prefix, rid_of(i), &mut self.aad)
                            .map_err(|e| cell_err(i, e))?
                        else {
                            b.append_null();
                            self.stats.nulls += 1;
                            continue;
                        };
                        self.tok.clear();
                        rw.rewrap(&self.aad, v, &mut self.tok)
                            .map_err(|e| cell_err(i, e))?;
                        b.append_value(std::str::from_utf8(&self.tok).expect("tokens are ASCII"));
                        self.stats.cells += 1;
                    }
                    cols[s.index] = Arc::new(b.finish());
                }
            }
        }
        RecordBatch::try_new(out_schema.clone(), cols)
            .map_err(|e| Error::format(format!("internal error: rebuilding a batch: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_round_trip_and_are_canonical() {
        for s in [
            "utf8",
            "large_utf8",
            "binary",
            "large_binary",
            "bool",
            "int8",
            "uint64",
            "float32",
            "float64",
            "date32",
            "timestamp[ns]",
            "timestamp[us,tz=Europe/Paris]",
            "decimal128(38,10)",
            "decimal128(5,-2)",
        ] {
            let dt = parse_type(s).unwrap_or_else(|| panic!("{s}"));
            assert_eq!(type_name(&dt).as_deref(), Some(s));
        }
        for s in [
            "UTF8",
            "timestamp[xs]",
            "timestamp[us,tz=]",
            "decimal128(0,0)",
            "decimal128(39,0)",
            "decimal128(5,6)",
            "decimal128( 5,2)",
            "list<int32>",
        ] {
            assert!(parse_type(s).is_none(), "{s}");
        }
        assert!(type_name(&DataType::Float16).is_none());
    }

    /// A file with NULLs in every supported type family, through encrypt,
    /// decrypt (equal batches and metadata), wrong context (integrity) and
    /// rotate, with the in-memory key backend.
    #[test]
    fn round_trip_with_nulls_and_wrong_context() {
        use crate::backend::MemoryBackend;
        use crate::error::ErrorKind;
        let b = MemoryBackend::new();
        let v = b.add_version("pii");
        let key = KeyRef {
            name: "pii".into(),
            version: v,
        };
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("id", Arc::new(arrow_array::Int64Array::from(vec![1, 2, 3]))),
            (
                "s",
                Arc::new(arrow_array::StringArray::from(vec![
                    Some("a"),
                    None,
                    Some(""),
                ])),
            ),
            (
                "f",
                Arc::new(arrow_array::Float64Array::from(vec![
                    Some(-0.0),
                    Some(f64::NAN),
                    None,
                ])),
            ),
            (
                "bin",
                Arc::new(arrow_array::BinaryArray::from(vec![
                    Some(&[0u8, 255][..]),
                    None,
                    Some(b"x"),
                ])),
            ),
            (
                "ok",
                Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)])),
            ),
            (
                "d",
                Arc::new(
                    arrow_array::Decimal128Array::from(vec![Some(-12345i128), None, Some(1)])
                        .with_precision_and_scale(10, 2)
                        .unwrap(),
                ),
            ),
            (
                "ts",
                Arc::new(
                    arrow_array::TimestampMicrosecondArray::from(vec![Some(1i64), None, Some(-5)])
                        .with_timezone("UTC"),
                ),
            ),
        ];
        let batch = RecordBatch::try_from_iter(cols).unwrap();
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("in.parquet");
        let mut props = WriterProperties::builder().set_max_row_group_size(2);
        props =
            props.set_key_value_metadata(Some(vec![KeyValue::new("app".into(), "v1".to_string())]));
        let mut w = ArrowWriter::try_new(
            File::create(&src).unwrap(),
            batch.schema(),
            Some(props.build()),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let opts = ColumnOptions {
            format: Format::Parquet,
            columns: ["s", "f", "bin", "ok", "d", "ts"]
                .map(String::from)
                .to_vec(),
            context: "t".into(),
            ..Default::default()
        };
        let enc = d.path().join("enc.parquet");
        let mut out = File::create(&enc).unwrap();
        let st = encrypt(&b, &key, &opts, File::open(&src).unwrap(), &mut out).unwrap();
        assert_eq!((st.rows, st.cells, st.nulls), (3, 12, 6));
        let m = ArrowReaderMetadata::load(&File::open(&enc).unwrap(), Default::default()).unwrap();
        assert_eq!(m.metadata().num_row_groups(), 2, "row groups kept");
        let kv = m.metadata().file_metadata().key_value_metadata().unwrap();
        assert!(kv.iter().any(|k| k.key == "app"));
        assert!(kv.iter().any(|k| k.key == META_KEY));
        assert_eq!(m.schema().field(2).data_type(), &DataType::Utf8);
        // Wrong context: authentication fails, naming the row and column.
        let wrong = ColumnOptions {
            context: "u".into(),
            ..opts.clone()
        };
        let e = decrypt(&b, &wrong, File::open(&enc).unwrap(), &mut std::io::sink()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Integrity, "{e}");
        assert!(e.message().contains("row 1"), "{e}");
        // Rotate, then decrypt: the original batch and metadata.
        let v2 = b.add_version("pii");
        let rot = d.path().join("rot.parquet");
        let t2 = KeyRef {
            name: "pii".into(),
            version: v2,
        };
        rewrap(
            &b,
            Some(&t2),
            &opts,
            File::open(&enc).unwrap(),
            &mut File::create(&rot).unwrap(),
        )
        .unwrap();
        let dec = d.path().join("dec.parquet");
        decrypt(
            &b,
            &opts,
            File::open(&rot).unwrap(),
            &mut File::create(&dec).unwrap(),
        )
        .unwrap();
        let r = ParquetRecordBatchReaderBuilder::try_new(File::open(&dec).unwrap())
            .unwrap()
            .build()
            .unwrap();
        let got: Vec<RecordBatch> = r.map(|b| b.unwrap()).collect();
        let got = arrow_select_concat(&got);
        assert_eq!(got.schema().fields(), batch.schema().fields());
        for c in 0..batch.num_columns() {
            assert_eq!(
                got.column(c).to_data(),
                batch.column(c).to_data(),
                "column {c}"
            );
        }
        let m = ArrowReaderMetadata::load(&File::open(&dec).unwrap(), Default::default()).unwrap();
        let kv = m.metadata().file_metadata().key_value_metadata().unwrap();
        assert!(!kv.iter().any(|k| k.key == META_KEY));
        // An unsupported type is refused as a usage error.
        let bad = ColumnOptions {
            columns: vec!["nope".into()],
            ..opts.clone()
        };
        let e = encrypt(
            &b,
            &key,
            &bad,
            File::open(&src).unwrap(),
            &mut std::io::sink(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage);
        // A truncated file is a format error, not a panic.
        let cut = d.path().join("cut.parquet");
        let bytes = std::fs::read(&enc).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = decrypt(&b, &opts, File::open(&cut).unwrap(), &mut std::io::sink()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Format, "{e}");
    }

    /// The batches of a small file as one (their rows in order).
    fn arrow_select_concat(b: &[RecordBatch]) -> RecordBatch {
        let schema = b[0].schema();
        let cols = (0..schema.fields().len())
            .map(|c| {
                let parts: Vec<&dyn Array> = b.iter().map(|x| x.column(c).as_ref()).collect();
                arrow_select::concat::concat(&parts).unwrap()
            })
            .collect();
        RecordBatch::try_new(schema, cols).unwrap()
    }

    #[test]
    fn plain_is_big_endian_and_bit_exact() {
        let f = arrow_array::Float64Array::from(vec![f64::from_bits(0x7ff8_0000_0000_1234), -0.0]);
        let mut out = Vec::new();
        plain(&f, 0, &mut out);
        assert_eq!(out, 0x7ff8_0000_0000_1234u64.to_be_bytes());
        out.clear();
        plain(&f, 1, &mut out);
        assert_eq!(out, (-0.0f64).to_bits().to_be_bytes());
        let mut p = Plains::default();
        p.value(&0x7ff8_0000_0000_1234u64.to_be_bytes());
        p.null();
        let a = rebuild(&DataType::Float64, &p, 1, "x").unwrap();
        let a = a.as_primitive::<Float64Type>();
        assert_eq!(a.value(0).to_bits(), 0x7ff8_0000_0000_1234);
        assert!(a.is_null(1));
        // A wrong width is an error naming the row, not a panic.
        let mut p = Plains::default();
        p.null();
        p.value(&[1, 2, 3]);
        let e = rebuild(&DataType::Int32, &p, 10, "n").unwrap_err();
        assert!(e.message().contains("row 11, column \"n\""), "{e}");
    }
}
