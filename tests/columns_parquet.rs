//! `hsmseal columns … --format parquet` through the binary against a real
//! SoftHSM2 token of its own (issue 15 item 1). Files are written and read
//! with the arrow-rs `parquet` crate in the test: every supported type with
//! NULLs (bit-exact floats), schema/field/file metadata and row-group sizes
//! survive encrypt → rotate → decrypt; unselected columns are untouched;
//! tampered, swapped, re-typed, wrongly bound or corrupt inputs are refused
//! with their documented exit code and leave no output; two runs writing
//! one output at once leave one complete file.

mod support;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type};
use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float32Array,
    Float64Array, Int16Array, Int32Array, Int64Array, Int8Array, LargeBinaryArray,
    LargeStringArray, RecordBatch, StringArray, TimestampMillisecondArray,
    TimestampNanosecondArray, UInt16Array, UInt32Array, UInt64Array, UInt8Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
use parquet::arrow::arrow_writer::compute_leaves;
use parquet::arrow::{ArrowWriter, ARROW_SCHEMA_META_KEY};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use support::{code, stderr as err, Cli};

const META_KEY: &str = "hsmseal.columns";

/// The columns the tests encrypt: one of every supported type.
const TYPED: [&str; 20] = [
    "s", "ls", "b", "lb", "ok", "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64", "f32", "f64",
    "day", "ts_ms", "ts_ns", "dec", "dec9",
];

/// Rows of the typed test file (in row groups of `GROUPS` rows).
const ROWS: usize = 10;

/// Every supported type, NULLs at different rows in each column, NaN
/// payloads and -0.0 in the floats, extremes in the integers; `id` and
/// `note` stay clear. Field `s` and the schema carry metadata.
fn typed_batch() -> RecordBatch {
    fn opt<T: Clone>(v: Vec<T>, null_every: usize, shift: usize) -> Vec<Option<T>> {
        v.into_iter()
            .enumerate()
            .map(|(i, x)| (!(i + shift).is_multiple_of(null_every)).then_some(x))
            .collect()
    }
    let n = ROWS;
    let r = |k: i64| (0..n as i64).map(move |i| i * k);
    let f64s = vec![
        -0.0,
        f64::from_bits(0x7ff8_0000_0000_1234),
        f64::from_bits(0xfff0_0000_0000_0001),
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::MIN_POSITIVE,
        1.5,
        f64::MAX,
        0.0,
        -2.25,
    ];
    let f32s: Vec<f32> = vec![
        -0.0,
        f32::from_bits(0x7fc0_0abc),
        f32::from_bits(0xff80_0001),
        f32::INFINITY,
        1e-45,
        3.5,
        f32::MIN,
        0.0,
        -1.0,
        7.0,
    ];
    let strs: Vec<String> = (0..n).map(|i| format!("välue {i} \u{1F512}")).collect();
    let bins: Vec<Vec<u8>> = (0..n).map(|i| vec![0u8, 255, i as u8, 10]).collect();
    let cols: Vec<(&str, ArrayRef, bool)> = vec![
        ("id", Arc::new(Int64Array::from_iter_values(r(1))), false),
        (
            "s",
            Arc::new(StringArray::from(opt(strs.clone(), 4, 1))),
            true,
        ),
        (
            "ls",
            Arc::new(LargeStringArray::from(opt(strs.clone(), 3, 0))),
            true,
        ),
        (
            "b",
            Arc::new(BinaryArray::from(
                opt(bins.clone(), 5, 2)
                    .iter()
                    .map(|o| o.as_deref())
                    .collect::<Vec<_>>(),
            )),
            true,
        ),
        (
            "lb",
            Arc::new(LargeBinaryArray::from(
                opt(bins.clone(), 3, 1)
                    .iter()
                    .map(|o| o.as_deref())
                    .collect::<Vec<_>>(),
            )),
            true,
        ),
        (
            "ok",
            Arc::new(BooleanArray::from(opt(
                (0..n).map(|i| i % 2 == 0).collect(),
                4,
                0,
            ))),
            true,
        ),
        (
            "i8",
            Arc::new(Int8Array::from(opt(
                (0..n).map(|i| [i8::MIN, i8::MAX, -1][i % 3]).collect(),
                4,
                3,
            ))),
            true,
        ),
        (
            "i16",
            Arc::new(Int16Array::from(opt(
                (0..n).map(|i| [i16::MIN, i16::MAX, -1][i % 3]).collect(),
                4,
                2,
            ))),
            true,
        ),
        (
            "i32",
            Arc::new(Int32Array::from(opt(
                (0..n).map(|i| [i32::MIN, i32::MAX, -7][i % 3]).collect(),
                5,
                1,
            ))),
            true,
        ),
        (
            "i64",
            Arc::new(Int64Array::from(opt(
                (0..n).map(|i| [i64::MIN, i64::MAX, -7][i % 3]).collect(),
                5,
                4,
            ))),
            true,
        ),
        (
            "u8",
            Arc::new(UInt8Array::from(opt(
                (0..n).map(|i| [0, u8::MAX, 7][i % 3]).collect(),
                4,
                1,
            ))),
            true,
        ),
        (
            "u16",
            Arc::new(UInt16Array::from(opt(
                (0..n).map(|i| [0, u16::MAX, 7][i % 3]).collect(),
                4,
                2,
            ))),
            true,
        ),
        (
            "u32",
            Arc::new(UInt32Array::from(opt(
                (0..n).map(|i| [0, u32::MAX, 7][i % 3]).collect(),
                4,
                3,
            ))),
            true,
        ),
        (
            "u64",
            Arc::new(UInt64Array::from(opt(
                (0..n).map(|i| [0, u64::MAX, 7][i % 3]).collect(),
                4,
                0,
            ))),
            true,
        ),
        ("f32", Arc::new(Float32Array::from(opt(f32s, 6, 5))), true),
        ("f64", Arc::new(Float64Array::from(opt(f64s, 6, 3))), true),
        (
            "day",
            Arc::new(Date32Array::from(opt(
                r(-3000).map(|x| x as i32).collect(),
                4,
                1,
            ))),
            true,
        ),
        (
            "ts_ms",
            Arc::new(
                TimestampMillisecondArray::from(opt(r(86_400_123).collect(), 4, 2))
                    .with_timezone("Europe/Paris"),
            ),
            true,
        ),
        (
            "ts_ns",
            Arc::new(TimestampNanosecondArray::from(opt(
                r(-1_000_000_007).collect(),
                3,
                2,
            ))),
            true,
        ),
        (
            "dec",
            Arc::new(
                Decimal128Array::from(opt(
                    (0..n as i128)
                        .map(|i| (i - 5) * 10i128.pow(37) + i)
                        .collect(),
                    4,
                    3,
                ))
                .with_precision_and_scale(38, 10)
                .unwrap(),
            ),
            true,
        ),
        (
            "dec9",
            Arc::new(
                Decimal128Array::from(opt(r(-12_345).map(i128::from).collect(), 5, 0))
                    .with_precision_and_scale(9, 3)
                    .unwrap(),
            ),
            true,
        ),
        (
            "note",
            Arc::new(StringArray::from(opt(
                (0..n).map(|i| format!("clear {i}")).collect(),
                4,
                0,
            ))),
            true,
        ),
    ];
    let fields: Vec<Field> = cols
        .iter()
        .map(|(name, a, nullable)| {
            let f = Field::new(*name, a.data_type().clone(), *nullable);
            if *name == "s" {
                f.with_metadata(HashMap::from([("comment".into(), "the s field".into())]))
            } else {
                f
            }
        })
        .collect();
    let schema =
        Schema::new_with_metadata(fields, HashMap::from([("owner".into(), "team-a".into())]));
    RecordBatch::try_new(
        Arc::new(schema),
        cols.into_iter().map(|(_, a, _)| a).collect(),
    )
    .unwrap()
}

/// Writes `batch` as a Parquet file with row groups of `groups` rows (0
/// included: `ArrowWriter::flush` would skip an empty group, the
/// row-group writer API does not) and the file key-value metadata `kv`.
fn write_groups(path: &Path, batch: &RecordBatch, groups: &[usize], kv: Vec<KeyValue>) {
    assert_eq!(groups.iter().sum::<usize>(), batch.num_rows());
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(kv))
        .build();
    let (mut w, factory) =
        ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), Some(props))
            .unwrap()
            .into_serialized_writer()
            .unwrap();
    let mut at = 0;
    for (g, &n) in groups.iter().enumerate() {
        let part = batch.slice(at, n);
        at += n;
        let mut writers = factory.create_column_writers(g).unwrap();
        let mut it = writers.iter_mut();
        for (f, a) in part.schema().fields().iter().zip(part.columns()) {
            for leaf in compute_leaves(f, a).unwrap() {
                it.next().unwrap().write(&leaf).unwrap();
            }
        }
        let mut rg = w.next_row_group().unwrap();
        for cw in writers {
            cw.close().unwrap().append_to_row_group(&mut rg).unwrap();
        }
        rg.close().unwrap();
    }
    w.close().unwrap();
}

/// Writes `batch` in row groups of `rg` rows.
fn write_file(path: &Path, batch: &RecordBatch, rg: usize, kv: Vec<KeyValue>) {
    let mut groups = vec![rg; batch.num_rows() / rg];
    if !batch.num_rows().is_multiple_of(rg) {
        groups.push(batch.num_rows() % rg);
    }
    write_groups(path, batch, &groups, kv);
}

/// Row groups of the typed file: an empty one among them (issue 15: the
/// row groups are kept).
const GROUPS: [usize; 6] = [3, 0, 3, 3, 1, 0];

/// The typed file `name` in `c`'s working directory, with file metadata.
fn typed_file(c: &Cli, name: &str) -> RecordBatch {
    let b = typed_batch();
    write_groups(
        &c.path(name),
        &b,
        &GROUPS,
        vec![
            KeyValue::new("app".into(), "v1".to_string()),
            KeyValue::new("empty".into(), None),
        ],
    );
    b
}

/// What the tests compare of a Parquet file.
struct Read {
    schema: SchemaRef,
    batch: RecordBatch,
    /// The file's key-value metadata but the embedded Arrow schema.
    kv: BTreeMap<String, Option<String>>,
    groups: Vec<i64>,
}

fn read(path: &Path) -> Read {
    let m = ArrowReaderMetadata::load(&File::open(path).unwrap(), Default::default()).unwrap();
    let kv = m
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|k| k.key != ARROW_SCHEMA_META_KEY)
        .map(|k| (k.key, k.value))
        .collect();
    let groups = m
        .metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows())
        .collect();
    let schema = m.schema().clone();
    let r = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let parts: Vec<RecordBatch> = r.map(|b| b.unwrap()).collect();
    let batch = arrow_select::concat::concat_batches(&schema, &parts).unwrap();
    Read {
        schema,
        batch,
        kv,
        groups,
    }
}

/// Asserts the two batches hold the same schema and values, floats
/// compared by their bits (NaN payloads, -0.0).
/// (Schema metadata is compared between files: a reader adds the file's
/// key-value pairs to it.)
fn assert_same(got: &RecordBatch, want: &RecordBatch) {
    assert_eq!(got.schema().fields(), want.schema().fields(), "fields");
    assert_eq!(got.num_rows(), want.num_rows());
    for (c, f) in want.schema().fields().iter().enumerate() {
        let (g, w) = (got.column(c), want.column(c));
        assert_eq!(g.to_data(), w.to_data(), "column {}", f.name());
        match f.data_type() {
            DataType::Float64 => {
                let (g, w) = (
                    g.as_primitive::<Float64Type>(),
                    w.as_primitive::<Float64Type>(),
                );
                for i in 0..w.len() {
                    assert_eq!(g.is_null(i), w.is_null(i));
                    if w.is_valid(i) {
                        assert_eq!(g.value(i).to_bits(), w.value(i).to_bits(), "f64 row {i}");
                    }
                }
            }
            DataType::Float32 => {
                let (g, w) = (
                    g.as_primitive::<Float32Type>(),
                    w.as_primitive::<Float32Type>(),
                );
                for i in 0..w.len() {
                    assert_eq!(g.is_null(i), w.is_null(i));
                    if w.is_valid(i) {
                        assert_eq!(g.value(i).to_bits(), w.value(i).to_bits(), "f32 row {i}");
                    }
                }
            }
            _ => {}
        }
    }
}

fn cols() -> String {
    TYPED.join(",")
}

fn encrypt(c: &Cli, input: &str, output: &str, extra: &[&str]) -> Output {
    let cols = cols();
    let mut a = vec![
        "columns",
        "encrypt",
        "--key",
        "k",
        "--format",
        "parquet",
        "--columns",
        &cols,
        "--context",
        "app.t",
        input,
        "-o",
        output,
    ];
    a.extend_from_slice(extra);
    c.run(&a)
}

fn decrypt(c: &Cli, input: &str, output: &str, extra: &[&str]) -> Output {
    let cols = cols();
    let mut a = vec![
        "columns",
        "decrypt",
        "--format",
        "parquet",
        "--columns",
        &cols,
        "--context",
        "app.t",
        input,
        "-o",
        output,
    ];
    a.extend_from_slice(extra);
    c.run(&a)
}

fn ok(o: &Output) {
    assert_eq!(code(o), 0, "{}", err(o));
}

/// A failure with exit `want`: one line on stderr, and no `output` file.
fn refused(c: &Cli, o: &Output, want: i32, output: &str) -> String {
    let e = err(o);
    assert_eq!(code(o), want, "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(!c.path(output).exists(), "{output} left behind: {e}");
    let temps: Vec<String> = c
        .files()
        .into_iter()
        .filter(|f| f.contains(".hsmseal-tmp-"))
        .collect();
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
    e
}

#[test]
fn every_supported_type_round_trips_through_rotate_with_metadata_and_row_groups() {
    let c = Cli::with_key();
    let orig = typed_file(&c, "in.parquet");
    let before = read(&c.path("in.parquet"));
    ok(&encrypt(&c, "in.parquet", "enc.parquet", &[]));

    // Encrypted: selected columns are utf8 tokens, every other column, the
    // row groups and the file metadata as they were.
    let enc = read(&c.path("enc.parquet"));
    assert_eq!(enc.groups, vec![3, 0, 3, 3, 1, 0]);
    assert_eq!(enc.groups, before.groups);
    assert_eq!(enc.kv.get("app"), Some(&Some("v1".into())));
    assert_eq!(enc.kv.get("empty"), Some(&None));
    let meta: serde_json::Value =
        serde_json::from_str(enc.kv[META_KEY].as_deref().unwrap()).unwrap();
    assert_eq!(meta["columns"].as_array().unwrap().len(), TYPED.len());
    assert_eq!(meta["columns"][18]["type"], "decimal128(38,10)");
    assert_eq!(meta["columns"][17]["type"], "timestamp[ns]");
    assert_eq!(meta["columns"][16]["type"], "timestamp[ms,tz=Europe/Paris]");
    let mut tokens = std::collections::HashSet::new();
    for (i, f) in orig.schema().fields().iter().enumerate() {
        let got = enc.batch.column(i);
        if TYPED.contains(&f.name().as_str()) {
            assert_eq!(got.data_type(), &DataType::Utf8, "{}", f.name());
            assert_eq!(
                enc.schema.field(i).metadata(),
                f.metadata(),
                "field metadata"
            );
            // NULL stays NULL, every value a distinct token.
            let s = got.as_string::<i32>();
            for r in 0..ROWS {
                assert_eq!(
                    s.is_null(r),
                    orig.column(i).is_null(r),
                    "{} row {r}",
                    f.name()
                );
                if s.is_valid(r) {
                    assert!(s.value(r).starts_with("hsc2."), "{}", s.value(r));
                    assert!(tokens.insert(s.value(r).to_string()), "repeated token");
                }
            }
        } else {
            assert_eq!(
                got.to_data(),
                orig.column(i).to_data(),
                "{} untouched",
                f.name()
            );
        }
    }

    // Inspect counts the tokens per column, without the token.
    let o = c.run(&[
        "--json",
        "columns",
        "inspect",
        "--format",
        "parquet",
        "--columns",
        "s,f64,note",
        "enc.parquet",
    ]);
    ok(&o);
    let lines = support::json_of_type(&o.stdout, "column");
    assert_eq!(lines.len(), 3);
    let by: HashMap<String, &serde_json::Value> = lines
        .iter()
        .map(|l| (l["column"].as_str().unwrap().to_string(), l))
        .collect();
    assert_eq!(
        (by["s"]["rows"].as_u64(), by["s"]["nulls"].as_u64()),
        (Some(10), Some(2))
    );
    assert_eq!(by["s"]["tokens"], 8);
    assert_eq!(by["s"]["keys"][0]["name"], "k");
    assert_eq!(by["s"]["keys"][0]["version"], 1);
    assert_eq!(
        (by["f64"]["tokens"].as_u64(), by["f64"]["nulls"].as_u64()),
        (Some(8), Some(2))
    );
    assert_eq!(
        (by["note"]["clear"].as_u64(), by["note"]["tokens"].as_u64()),
        (Some(7), Some(0))
    );

    // Rotate to a new key version, then decrypt: the original file.
    c.ok(&["key", "rotate", "k"]);
    let cols = cols();
    let o = c.run(&[
        "columns",
        "rotate",
        "--format",
        "parquet",
        "--columns",
        &cols,
        "--context",
        "app.t",
        "enc.parquet",
        "-o",
        "rot.parquet",
    ]);
    ok(&o);
    let rot = read(&c.path("rot.parquet"));
    assert_eq!(rot.groups, before.groups);
    let o = c.run(&[
        "--json",
        "columns",
        "inspect",
        "--format",
        "parquet",
        "--columns",
        "s",
        "rot.parquet",
    ]);
    ok(&o);
    let l = support::json_one(&o.stdout, "column");
    assert_eq!(l["keys"][0]["version"], 2, "{l}");
    assert_eq!(l["tokens"], 8);
    ok(&decrypt(&c, "rot.parquet", "dec.parquet", &[]));
    let dec = read(&c.path("dec.parquet"));
    assert_same(&dec.batch, &orig);
    assert_eq!(
        dec.schema, before.schema,
        "schema with field and schema metadata"
    );
    assert_eq!(dec.kv, before.kv, "file key-value metadata");
    assert_eq!(dec.groups, before.groups, "row groups");
    // The first encrypted file decrypts too (old version still on the token).
    ok(&decrypt(&c, "enc.parquet", "dec1.parquet", &[]));
    assert_same(&read(&c.path("dec1.parquet")).batch, &orig);
}

#[test]
fn refusals_are_one_line_usage_errors_naming_the_column() {
    let c = Cli::with_key();
    // A nested column and a date64 next to a supported one.
    let list =
        arrow_array::ListArray::from_iter_primitive::<arrow_array::types::Int32Type, _, _>(vec![
            Some(vec![Some(1)]),
            None,
        ]);
    let b = RecordBatch::try_from_iter(vec![
        ("id", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
        ("tags", Arc::new(list) as ArrayRef),
        (
            "half",
            Arc::new(arrow_array::Date64Array::from(vec![1, 2])) as ArrayRef,
        ),
        ("s", Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef),
    ])
    .unwrap();
    write_file(&c.path("n.parquet"), &b, 10, vec![]);
    let run = |cols: &str, extra: &[&str]| {
        let mut a = vec![
            "columns",
            "encrypt",
            "--key",
            "k",
            "--format",
            "parquet",
            "--columns",
            cols,
        ];
        a.extend_from_slice(extra);
        c.run(&a)
    };
    for col in ["tags", "half"] {
        let o = run(col, &["n.parquet", "-o", "out.parquet"]);
        let e = refused(&c, &o, 2, "out.parquet");
        assert!(e.contains(&format!("column \"{col}\"")), "{e}");
        assert!(e.contains("does not encrypt"), "{e}");
    }
    // An unselected nested column is carried over as it is.
    ok(&run("s", &["n.parquet", "-o", "out.parquet"]));
    let got = read(&c.path("out.parquet"));
    assert_eq!(got.batch.column(1).to_data(), b.column(1).to_data());
    assert_eq!(got.batch.column(2).to_data(), b.column(2).to_data());
    std::fs::remove_file(c.path("out.parquet")).unwrap();
    // A column the file does not have.
    let o = run("nope", &["n.parquet", "-o", "out.parquet"]);
    let e = refused(&c, &o, 2, "out.parquet");
    assert!(
        e.contains("\"nope\"") && e.contains("id, tags, half, s"),
        "{e}"
    );
    // Standard input and standard output.
    let o = c.run_in(
        &[
            "columns",
            "encrypt",
            "--key",
            "k",
            "--format",
            "parquet",
            "--columns",
            "s",
            "-o",
            "out.parquet",
        ],
        &std::fs::read(c.path("n.parquet")).unwrap(),
    );
    let e = refused(&c, &o, 2, "out.parquet");
    assert!(e.contains("not standard input"), "{e}");
    let o = run("s", &["n.parquet"]);
    assert!(o.stdout.is_empty());
    let e = refused(&c, &o, 2, "out.parquet");
    assert!(e.contains("pass -o FILE"), "{e}");
    let o = run("s", &["n.parquet", "-o", "-"]);
    assert!(o.stdout.is_empty());
    refused(&c, &o, 2, "out.parquet");
    // Decrypting a column that was never encrypted.
    let o = c.run(&[
        "columns",
        "decrypt",
        "--format",
        "parquet",
        "--columns",
        "s",
        "n.parquet",
        "-o",
        "out.parquet",
    ]);
    let e = refused(&c, &o, 2, "out.parquet");
    assert!(e.contains("is not encrypted"), "{e}");
    // Dump flags Parquet has no use for are refused before any token is
    // touched: with the module pointing nowhere the refusal is still the
    // usage error, not the module's.
    let no_module = [("HSMSEAL_PKCS11_MODULE", "/nonexistent/libnone.so")];
    for (sub, flag) in [
        ("encrypt", vec!["--key", "k", "--blind-index", "s"]),
        ("encrypt", vec!["--key", "k", "--skip-tokens"]),
        ("decrypt", vec!["--allow-plaintext"]),
        ("decrypt", vec!["--token-format", "csv"]),
    ] {
        let mut a = vec!["columns", sub, "--format", "parquet", "--columns", "s"];
        a.extend_from_slice(&flag);
        a.extend_from_slice(&["n.parquet", "-o", "out.parquet"]);
        let o = c.run_with(&a, None, &no_module);
        let e = refused(&c, &o, 2, "out.parquet");
        assert!(
            e.contains("does not apply to --format parquet"),
            "{flag:?}: {e}"
        );
    }
    // Encrypting a column twice.
    ok(&run("s", &["n.parquet", "-o", "e.parquet"]));
    let o = run("s", &["e.parquet", "-o", "out.parquet"]);
    let e = refused(&c, &o, 2, "out.parquet");
    assert!(e.contains("already encrypted"), "{e}");
}

/// Rewrites the Parquet file `src` to `dst` after `edit` changed its
/// columns (`cols`, in schema order) or its file metadata (`kv`, without
/// the embedded Arrow schema). Row groups are kept.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<ArrayRef>, &mut BTreeMap<String, Option<String>>),
) {
    let r = read(src);
    let mut cols = r.batch.columns().to_vec();
    let mut kv = r.kv.clone();
    edit(&mut cols, &mut kv);
    // The embedded Arrow schema's metadata follows the edited file metadata.
    let mut md = r.schema.metadata().clone();
    if let Some(Some(v)) = kv.get(META_KEY) {
        md.insert(META_KEY.into(), v.clone());
    }
    let schema = Arc::new(Schema::new_with_metadata(r.schema.fields().clone(), md));
    let batch = RecordBatch::try_new(schema, cols).unwrap();
    let groups: Vec<usize> = r.groups.iter().map(|&g| g as usize).collect();
    write_groups(
        dst,
        &batch,
        &groups,
        kv.into_iter()
            .map(|(k, v)| KeyValue { key: k, value: v })
            .collect(),
    );
}

/// Column `name`'s index in the typed file.
fn index(name: &str) -> usize {
    typed_batch().schema().index_of(name).unwrap()
}

/// A copy of string array `a` with `set` applied to its values.
fn edit_strings(a: &ArrayRef, set: impl Fn(usize, Option<&str>) -> Option<String>) -> ArrayRef {
    let s = a.as_string::<i32>();
    Arc::new(StringArray::from(
        (0..s.len())
            .map(|i| set(i, s.is_valid(i).then(|| s.value(i))))
            .collect::<Vec<_>>(),
    ))
}

#[test]
fn tampered_swapped_retyped_and_wrongly_bound_tokens_fail_authentication() {
    let c = Cli::with_key();
    let orig = typed_file(&c, "in.parquet");
    ok(&encrypt(&c, "in.parquet", "enc.parquet", &[]));
    let enc = read(&c.path("enc.parquet"));
    let s = index("s");
    let tok = |col: &str, row: usize| {
        enc.batch
            .column(index(col))
            .as_string::<i32>()
            .value(row)
            .to_string()
    };
    // The untampered rewrite decrypts: the edits below are what fails.
    rewrite(&c.path("enc.parquet"), &c.path("same.parquet"), |_, _| {});
    ok(&decrypt(&c, "same.parquet", "dec.parquet", &[]));
    assert_same(&read(&c.path("dec.parquet")).batch, &orig);

    type Edit = Box<dyn Fn(&mut Vec<ArrayRef>, &mut BTreeMap<String, Option<String>>)>;
    // (what, the 1-based row the error names, the edit)
    let cases: Vec<(&str, u32, Edit)> = vec![
        (
            "a changed character in a token",
            2,
            Box::new(move |cols, _| {
                cols[s] = edit_strings(&cols[s], |i, v| {
                    let v = v.map(str::to_string);
                    if i == 1 {
                        let mut t = v.unwrap().into_bytes();
                        let k = t.len() - 5;
                        t[k] = if t[k] == b'A' { b'B' } else { b'A' };
                        Some(String::from_utf8(t).unwrap())
                    } else {
                        v
                    }
                })
            }),
        ),
        (
            "two cells of a column swapped between rows",
            2,
            Box::new({
                let (t1, t2) = (tok("s", 1), tok("s", 2));
                move |cols, _| {
                    cols[s] = edit_strings(&cols[s], |i, v| match i {
                        1 => Some(t2.clone()),
                        2 => Some(t1.clone()),
                        _ => v.map(str::to_string),
                    })
                }
            }),
        ),
        (
            "a cell moved to another column of the same row (same type)",
            2,
            Box::new({
                let t = tok("ls", 1);
                move |cols, _| {
                    cols[s] = edit_strings(&cols[s], |i, v| {
                        if i == 1 {
                            Some(t.clone())
                        } else {
                            v.map(str::to_string)
                        }
                    })
                }
            }),
        ),
        (
            "a cell moved between two int columns of the same width",
            3,
            Box::new({
                let t = tok("u32", 2);
                let i32c = index("i32");
                move |cols, _| {
                    cols[i32c] = edit_strings(&cols[i32c], |i, v| {
                        if i == 2 {
                            Some(t.clone())
                        } else {
                            v.map(str::to_string)
                        }
                    })
                }
            }),
        ),
        (
            "a recorded type edited (int32 -> uint32, same width)",
            1,
            Box::new(|_, kv| {
                let v = kv[META_KEY].clone().unwrap();
                let e = v.replacen(
                    r#"{"name":"i32","type":"int32"}"#,
                    r#"{"name":"i32","type":"uint32"}"#,
                    1,
                );
                assert_ne!(v, e, "{v}");
                kv.insert(META_KEY.into(), Some(e));
            }),
        ),
        (
            "a recorded type edited (timestamp time zone)",
            1,
            Box::new(|_, kv| {
                let v = kv[META_KEY].clone().unwrap();
                let e = v.replacen("tz=Europe/Paris", "tz=UTC", 1);
                assert_ne!(v, e, "{v}");
                kv.insert(META_KEY.into(), Some(e));
            }),
        ),
    ];
    for (what, row, edit) in cases {
        rewrite(&c.path("enc.parquet"), &c.path("bad.parquet"), edit);
        let o = decrypt(&c, "bad.parquet", "out.parquet", &[]);
        let e = refused(&c, &o, 3, "out.parquet");
        assert!(
            e.contains("bad.parquet") && e.contains(&format!("row {row},")),
            "{what}: {e}"
        );
    }
    // A wrong context.
    let cols = cols();
    let o = c.run(&[
        "columns",
        "decrypt",
        "--format",
        "parquet",
        "--columns",
        &cols,
        "--context",
        "app.other",
        "enc.parquet",
        "-o",
        "out.parquet",
    ]);
    let e = refused(&c, &o, 3, "out.parquet");
    assert!(e.contains("row 1"), "{e}");
    // A tampered token through rotate is refused, there or at decrypt.
    rewrite(&c.path("enc.parquet"), &c.path("bad.parquet"), |cols, _| {
        cols[s] = edit_strings(&cols[s], |i, v| {
            if i == 2 {
                Some(format!("{}A", v.unwrap()))
            } else {
                v.map(str::to_string)
            }
        })
    });
    let o = c.run(&[
        "columns",
        "rotate",
        "--format",
        "parquet",
        "--columns",
        &cols,
        "--context",
        "app.t",
        "bad.parquet",
        "-o",
        "out.parquet",
    ]);
    match code(&o) {
        // Rewrap replaces batch envelopes and need not open every cell:
        // the tampered cell is then carried over, and decrypt refuses it.
        0 => {
            let d = decrypt(&c, "out.parquet", "dec2.parquet", &[]);
            let x = code(&d);
            assert!(x == 3 || x == 8, "{}", err(&d));
            refused(&c, &d, x, "dec2.parquet");
        }
        x => {
            assert!(x == 3 || x == 8, "{}", err(&o));
            refused(&c, &o, x, "out.parquet");
        }
    }
}

#[test]
fn row_id_binds_tokens_to_their_row_not_their_position() {
    let c = Cli::with_key();
    let orig = typed_file(&c, "in.parquet");
    ok(&encrypt(
        &c,
        "in.parquet",
        "rid.parquet",
        &["--row-id", "id"],
    ));
    ok(&encrypt(&c, "in.parquet", "pos.parquet", &[]));
    // Whole rows in reverse order: a row id moves with its row.
    let reverse = |cols: &mut Vec<ArrayRef>, _: &mut BTreeMap<String, Option<String>>| {
        let idx = arrow_array::UInt32Array::from_iter_values((0..ROWS as u32).rev());
        for a in cols.iter_mut() {
            *a = arrow_select::take::take(a.as_ref(), &idx, None).unwrap();
        }
    };
    rewrite(&c.path("rid.parquet"), &c.path("rid_rev.parquet"), reverse);
    rewrite(&c.path("pos.parquet"), &c.path("pos_rev.parquet"), reverse);
    ok(&decrypt(
        &c,
        "rid_rev.parquet",
        "dec.parquet",
        &["--row-id", "id"],
    ));
    let idx = arrow_array::UInt32Array::from_iter_values((0..ROWS as u32).rev());
    let want = RecordBatch::try_new(
        orig.schema(),
        orig.columns()
            .iter()
            .map(|a| arrow_select::take::take(a.as_ref(), &idx, None).unwrap())
            .collect(),
    )
    .unwrap();
    assert_same(&read(&c.path("dec.parquet")).batch, &want);
    // Bound to positions, the same reordering fails.
    let o = decrypt(&c, "pos_rev.parquet", "out.parquet", &[]);
    refused(&c, &o, 3, "out.parquet");
    // Without --row-id (or with another id) the row-bound file fails.
    let o = decrypt(&c, "rid.parquet", "out.parquet", &[]);
    refused(&c, &o, 3, "out.parquet");
    // A changed id is a moved cell.
    rewrite(
        &c.path("rid.parquet"),
        &c.path("rid_id.parquet"),
        |cols, _| {
            cols[0] = Arc::new(Int64Array::from_iter_values((0..ROWS as i64).map(|i| {
                if i == 4 {
                    99
                } else {
                    i
                }
            })));
        },
    );
    let o = decrypt(&c, "rid_id.parquet", "out.parquet", &["--row-id", "id"]);
    let e = refused(&c, &o, 3, "out.parquet");
    assert!(e.contains("row 5"), "{e}");
}

#[test]
fn truncated_and_corrupt_files_are_refused_without_output_or_panic() {
    let c = Cli::with_key();
    typed_file(&c, "in.parquet");
    ok(&encrypt(&c, "in.parquet", "enc.parquet", &[]));
    let plain = std::fs::read(c.path("in.parquet")).unwrap();
    let enc = std::fs::read(c.path("enc.parquet")).unwrap();
    // Truncations and a file that is no Parquet at all: exit 8.
    for (what, bytes) in [
        ("half", plain[..plain.len() / 2].to_vec()),
        ("no footer magic", plain[..plain.len() - 1].to_vec()),
        ("empty", Vec::new()),
        ("text", b"id,s\n1,a\n".to_vec()),
    ] {
        support::write(&c.path("bad.parquet"), &bytes);
        let o = encrypt(&c, "bad.parquet", "out.parquet", &[]);
        let e = refused(&c, &o, 8, "out.parquet");
        assert!(e.contains("bad.parquet"), "{what}: {e}");
        let o = decrypt(&c, "bad.parquet", "out.parquet", &[]);
        refused(&c, &o, 8, "out.parquet");
    }
    support::write(&c.path("cut.parquet"), &enc[..enc.len() - 100]);
    let o = decrypt(&c, "cut.parquet", "out.parquet", &[]);
    refused(&c, &o, 8, "out.parquet");
    // Fuzz-style: single-byte corruptions all through both files. Every
    // run ends with a documented code and one line, never a panic; a
    // failed run leaves no output.
    for (name, bytes, enc_side) in [("p.parquet", &plain, true), ("e.parquet", &enc, false)] {
        let step = (bytes.len() / 97).max(1);
        for (n, at) in (0..bytes.len()).step_by(step).enumerate() {
            let mut b = bytes.clone();
            b[at] ^= [0xff, 0x01, 0x80, 0x7f][n % 4];
            support::write(&c.path(name), &b);
            let o = if enc_side {
                encrypt(&c, name, "out.parquet", &[])
            } else {
                decrypt(&c, name, "out.parquet", &[])
            };
            let e = err(&o);
            assert!(!e.contains("panicked"), "byte {at} of {name}: {e}");
            match code(&o) {
                // Bytes no reader checks (unselected values, padding).
                0 => std::fs::remove_file(c.path("out.parquet")).unwrap(),
                // 4: a flipped key name or version names no key.
                3 | 4 | 8 => {
                    refused(&c, &o, code(&o), "out.parquet");
                }
                x => panic!("byte {at} of {name}: exit {x}: {e}"),
            }
        }
    }
}

#[test]
fn two_runs_writing_one_output_at_once_leave_one_complete_file() {
    let c = Cli::with_key();
    let orig = typed_file(&c, "in.parquet");
    for round in 0..4 {
        let force = round % 2 == 0;
        let spawn = || {
            let cols = cols();
            let mut cmd = c.cmd();
            cmd.args([
                "columns",
                "encrypt",
                "--key",
                "k",
                "--format",
                "parquet",
                "--columns",
                &cols,
                "--context",
                "app.t",
                "in.parquet",
                "-o",
                "out.parquet",
            ]);
            if force {
                cmd.arg("--force");
            }
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let codes = [code(&a), code(&b)];
        if force {
            assert_eq!(codes, [0, 0], "{} / {}", err(&a), err(&b));
        } else {
            // Without --force the loser is told the output exists.
            assert!(codes.contains(&0), "{codes:?}: {} / {}", err(&a), err(&b));
            assert!(
                codes.iter().all(|&x| x == 0 || x == 2),
                "{codes:?}: {} / {}",
                err(&a),
                err(&b)
            );
        }
        ok(&decrypt(&c, "out.parquet", "dec.parquet", &[]));
        assert_same(&read(&c.path("dec.parquet")).batch, &orig);
        let left: Vec<String> = c
            .files()
            .into_iter()
            .filter(|f| f.contains(".hsmseal-tmp-"))
            .collect();
        assert!(left.is_empty(), "round {round}: {left:?}");
        for f in ["out.parquet", "dec.parquet"] {
            std::fs::remove_file(c.path(f)).unwrap();
        }
    }
}

#[test]
fn decrypt_limits_count_the_tokens_of_a_parquet_file_before_decrypting() {
    let c = Cli::with_key();
    typed_file(&c, "in.parquet");
    ok(&encrypt(&c, "in.parquet", "enc.parquet", &[]));
    // Snappy or not, the tokens are counted from the columns read, not from
    // a byte scan: every non-NULL cell of the 20 encrypted columns.
    support::write(&c.path("hsmseal.toml"), b"[limits.k]\nmax_cells = 5\n");
    let o = decrypt(&c, "dec.parquet", "out.parquet", &[]);
    assert_eq!(code(&o), 7, "a missing input first: {}", err(&o));
    let o = decrypt(&c, "enc.parquet", "out.parquet", &[]);
    let e = refused(&c, &o, 2, "out.parquet");
    assert!(e.contains("cells (max_cells = 5)"), "{e}");
    support::write(&c.path("hsmseal.toml"), b"[limits.k]\nmax_cells = 1000\n");
    ok(&decrypt(&c, "enc.parquet", "out.parquet", &[]));
}
