//! `hsmseal pg encrypt|decrypt|rotate|verify|status`: columns of a live
//! PostgreSQL table, in place, through the `postgres` client.
//!
//! Invariants:
//! - Tokens are the ones `columns encrypt --format pgcopy --context
//!   SCHEMA.TABLE --row-id PK` makes from a COPY text dump of the table:
//!   column id `Name(column)`, the pgcopy format code in the flags, the
//!   value the column's text (what COPY text decodes to), the row id the
//!   key columns' text (composite keys: [`row_binding`]). So a table done
//!   here can be dumped and decrypted by `columns decrypt`, and back.
//!   bytea is the exception: its tokens hold the raw bytes (see FORMAT §6.9).
//! - The walk goes in key order in chunks, each its own transaction:
//!   `SELECT … WHERE (key) > (last) ORDER BY key LIMIT n FOR UPDATE`, the
//!   UPDATE of the changed rows, and the cursor in `hsmseal.progress`, all
//!   committed together. A killed run loses at most its open chunk, which
//!   rolls back, and resumes after the last committed one.
//! - `--jobs N` (default 2) splits the key space at quantiles into N
//!   disjoint ranges, each walked as above on its own connection with its
//!   own cursor row; the ranges' bounds are stored before the first chunk,
//!   so a resumed run walks the same ranges whatever the table or --jobs
//!   say then. `--atomic` walks them one after another in its one
//!   transaction.
//! - One thread owns the connection. The cells of a chunk are sealed,
//!   opened or rewrapped on a worker thread ([`CellWork`]) from rows
//!   already read under the chunk's locks, part by part, while the main
//!   thread sends the UPDATE of the part before; nothing is committed
//!   until every part of the chunk is back, so the chunk stays one
//!   transaction.
//! - A value is changed at most once: encrypt leaves a value that is already
//!   a token of this cell alone (and fails on one that is not: moved from
//!   another row), decrypt leaves clear values alone, rotate leaves tokens
//!   already under the target version alone. A re-run changes nothing.
//! - Writers of one table are serialised by a session advisory lock on its
//!   name (docs/SECURITY.md, "Concurrency and failure model"): a second run
//!   waits, then finds nothing left to do.
//! - Only `text` columns are touched; any other type is an error naming it
//!   unless `--alter`, which records the type in `hsmseal.columns` and
//!   makes the column text; decrypt restores the type when no token is left.
//! - No password on argv: a password in `--dsn` is refused; PGPASSWORD or
//!   the passfile supply it; errors name user@host:port/db, never the DSN.

use crate::app::App;
use crate::cli::{PgArgs, PgCommand};
use hsmseal::backend::{KeyBackend, KeyRef};
use hsmseal::columns::inspect::ColumnCounts;
use hsmseal::columns::token::{
    self, binding_prefix, looks_like_token, BatchCache, ColumnId, Opener, RewrapCache, Rewrapper,
    Sealer, MIN_TOKEN_LEN, PREFIX, PREFIX_V2,
};
use hsmseal::columns::{self, BlindIndexSpec, BlindIndexer, Format};
use hsmseal::error::{Error, Result};
use postgres::{Client, NoTls};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod rewrite;

/// What a walk does to each cell.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Encrypt,
    Decrypt,
    Rotate,
    Verify,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Rotate => "rotate",
            Op::Verify => "verify",
        }
    }
    fn writes(self) -> bool {
        self != Op::Verify
    }
}

/// Runs a `pg` subcommand; returns the exit code.
pub fn run(app: &App, cmd: PgCommand) -> Result<i32> {
    let mut bidx = Vec::new();
    let mut limits = None;
    let (op, args, key) = match cmd {
        PgCommand::Encrypt(a) => {
            for s in &a.blind_index {
                bidx.push(BlindIndexSpec::parse(
                    s,
                    a.blind_index_bits,
                    a.blind_index_normalize.into(),
                )?);
            }
            (Op::Encrypt, a.target, Some(app.key_name(a.key.as_deref())?))
        }
        PgCommand::Decrypt(a) => {
            let guard = hsmseal::guard::Guard::new(app.settings.limits.clone(), a.override_limits);
            limits = Some(guard);
            (Op::Decrypt, a.target, None)
        }
        PgCommand::Rotate(a) => {
            if let Some(k) = &a.key {
                hsmseal::backend::validate_key_name(k)?;
            }
            (Op::Rotate, a.target, a.key)
        }
        PgCommand::Verify(a) => (Op::Verify, a, None),
        PgCommand::Status(a) => {
            refuse_rewrite(&a, "status")?;
            return status(app, &a);
        }
    };
    if op == Op::Verify {
        refuse_rewrite(&args, "verify")?;
    }
    check_args(&args)?;
    let mut client = connect(&args.dsn)?;
    let mut t = Table::load(&mut client, &args, op == Op::Encrypt)?;
    t.blind_targets(&mut client, &args, bidx)?;
    if let Some(guard) = limits.filter(|g| g.is_active()) {
        if !args.dry_run {
            charge_limits(&mut client, &t, &guard)?;
        }
    }
    if args.rewrite {
        // Checked before anything is read or locked, --dry-run included,
        // and again under the table's lock before it is truncated.
        rewrite::refusals(&mut client, &t)?;
    }
    if args.dry_run && op.writes() {
        return walk(app, &mut client, &t, &args, op, key, true);
    }
    walk(app, &mut client, &t, &args, op, key, false)
}

fn refuse_rewrite(a: &PgArgs, what: &str) -> Result<()> {
    if a.rewrite {
        return Err(Error::usage(format!(
            "--rewrite rewrites the table and applies to pg encrypt, decrypt and rotate; pg {what} writes nothing"
        )));
    }
    Ok(())
}

fn check_args(a: &PgArgs) -> Result<()> {
    if a.chunk_rows == 0 || a.chunk_rows > 1_000_000 {
        return Err(Error::usage("--chunk-rows must be 1 to 1000000"));
    }
    if a.columns.iter().any(|c| c.is_empty()) {
        return Err(Error::usage("--columns holds an empty name"));
    }
    Ok(())
}

// ---- Connection -----------------------------------------------------------

/// Connects with `dsn` (URL or key=value), completed from PGHOST, PGPORT,
/// PGUSER, PGDATABASE, and the password from PGPASSWORD or the passfile.
fn connect(dsn: &str) -> Result<Client> {
    let mut cfg: postgres::Config = dsn.parse().map_err(|_| {
        // The parser's message may quote the DSN, password included: not shown.
        Error::usage(
            "--dsn is not a PostgreSQL URL (postgresql://user@host:port/db) or key=value string",
        )
    })?;
    if cfg.get_password().is_some() {
        return Err(Error::usage(
            "--dsn holds a password, which other users can read on the command line: remove it and set PGPASSWORD or use ~/.pgpass (PGPASSFILE)",
        ));
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if cfg.get_hosts().is_empty() {
        match env("PGHOST") {
            Some(h) if h.starts_with('/') => cfg.host_path(h),
            Some(h) => cfg.host(&h),
            None => cfg.host("localhost"),
        };
    }
    if cfg.get_ports().is_empty() {
        let port = match env("PGPORT") {
            Some(p) => p
                .parse()
                .map_err(|_| Error::usage(format!("PGPORT {p:?} is not a port number")))?,
            None => 5432,
        };
        cfg.port(port);
    }
    if cfg.get_user().is_none() {
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".into());
        cfg.user(&user);
    }
    let user = cfg.get_user().unwrap_or_default().to_string();
    if cfg.get_dbname().is_none() {
        cfg.dbname(&env("PGDATABASE").unwrap_or_else(|| user.clone()));
    }
    let db = cfg.get_dbname().unwrap_or_default().to_string();
    let host = match &cfg.get_hosts()[0] {
        postgres::config::Host::Tcp(h) => h.clone(),
        postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    let port = cfg.get_ports()[0];
    // pgpass names a Unix socket "localhost", as libpq does.
    let pass_host = if host.starts_with('/') {
        "localhost"
    } else {
        &host
    };
    if let Some(pw) = env("PGPASSWORD").or_else(|| pgpass(pass_host, port, &db, &user)) {
        cfg.password(pw);
    }
    cfg.application_name("hsmseal");
    cfg.connect_timeout(Duration::from_secs(30));
    let place = format!("{user}@{host}:{port}/{db}");
    let mut c = cfg.connect(NoTls).map_err(|e| {
        Error::io(format!(
            "cannot connect to PostgreSQL {place}: {}",
            pg_msg(&e)
        ))
    })?;
    // bytea as `\x` hex text whatever the server's default: what encrypt
    // decodes (FORMAT §6.9).
    // synchronous_commit off: a chunk's commit does not wait for its WAL
    // flush. A server crash may then lose the last chunks, but each with its
    // cursor (one transaction), so the resumed run redoes exactly those.
    c.batch_execute("SET bytea_output = 'hex'; SET synchronous_commit = off")
        .map_err(db_err("cannot set bytea_output"))?;
    Ok(c)
}

/// The password for host:port:db:user from PGPASSFILE or ~/.pgpass (the
/// libpq rules: first match wins, `*` matches anything, `\` escapes `:`
/// and `\`). The file is ignored, as by libpq, if others may read it.
fn pgpass(host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".pgpass")))?;
    let meta = std::fs::metadata(&path).ok()?;
    if !meta.is_file() || meta.permissions().mode() & 0o077 != 0 {
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let want = [
        host.to_string(),
        port.to_string(),
        db.to_string(),
        user.to_string(),
    ];
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                _ => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() == 5
            && fields[..4]
                .iter()
                .zip(&want)
                .all(|(f, w)| f == "*" || f == w)
        {
            return Some(fields.pop().expect("five fields"));
        }
    }
    None
}

/// A PostgreSQL error on one line (a server error's DETAIL and HINT
/// follow after "; ").
fn pg_msg(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            let mut m = d.message().to_string();
            if let Some(x) = d.detail() {
                m = format!("{m}; {x}");
            }
            if let Some(x) = d.hint() {
                m = format!("{m}; hint: {x}");
            }
            m.replace('\n', " ")
        }
        None => e.to_string().replace('\n', " "),
    }
}

fn db_err(what: &str) -> impl Fn(postgres::Error) -> Error + '_ {
    move |e| Error::io(format!("{what}: {}", pg_msg(&e)))
}

// ---- The table --------------------------------------------------------------

/// A SQL identifier, quoted.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

struct KeyCol {
    name: String,
    /// `format_type()`: what the cursor's text values are cast back to.
    ty: String,
}

struct Col {
    name: String,
    /// The type recorded by `--alter` (`hsmseal.columns`), if any.
    original: Option<String>,
}

impl Col {
    fn bytea(&self) -> bool {
        self.original.as_deref() == Some("bytea")
    }
}

struct Table {
    /// pg_class oid.
    oid: i64,
    /// SCHEMA.TABLE as given: the default context, the progress and lock key.
    label: String,
    /// The quoted name for SQL.
    sql: String,
    key: Vec<KeyCol>,
    cols: Vec<Col>,
    /// Columns that are not text yet and will be altered (`--alter`).
    to_alter: Vec<(String, String)>,
    /// `--blind-index`: (index into `cols`, spec, whether TARGET must be
    /// added by `--alter`).
    bidx: Vec<(usize, BlindIndexSpec, bool)>,
}

const STATE_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS hsmseal;
CREATE TABLE IF NOT EXISTS hsmseal.progress (
    table_name text NOT NULL,
    columns    text NOT NULL,
    op         text NOT NULL,
    last_key   text[] NOT NULL,
    rows_done  bigint NOT NULL,
    started    timestamptz NOT NULL,
    updated    timestamptz NOT NULL,
    PRIMARY KEY (table_name, columns, op));
-- Key ranges walked at once (--jobs): one cursor row per range, keyed by
-- part. Databases from before get the columns once; their rows keep their
-- meaning (part 0 of 1, open-ended, not done: one cursor as before).
DO $$
DECLARE pk text;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'hsmseal.progress'::regclass
                  AND attname = 'part' AND NOT attisdropped) THEN
    SELECT conname INTO pk FROM pg_constraint
     WHERE conrelid = 'hsmseal.progress'::regclass AND contype = 'p';
    ALTER TABLE hsmseal.progress
      ADD COLUMN part int NOT NULL DEFAULT 0,
      ADD COLUMN parts int NOT NULL DEFAULT 1,
      ADD COLUMN hi_key text[],
      ADD COLUMN done boolean NOT NULL DEFAULT false,
      ALTER COLUMN last_key DROP NOT NULL;
    EXECUTE format('ALTER TABLE hsmseal.progress DROP CONSTRAINT %I', pk);
    ALTER TABLE hsmseal.progress ADD PRIMARY KEY (table_name, columns, op, part);
  END IF;
END $$;
CREATE TABLE IF NOT EXISTS hsmseal.columns (
    table_name    text NOT NULL,
    column_name   text NOT NULL,
    original_type text NOT NULL,
    altered       timestamptz NOT NULL,
    PRIMARY KEY (table_name, column_name));";

/// Advisory lock keys: one for hsmseal's own schema, one per table.
const STATE_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended('hsmseal state', 0))";

impl Table {
    fn load(c: &mut Client, a: &PgArgs, encrypting: bool) -> Result<Table> {
        let (schema, name) = a.table.split_once('.').ok_or_else(|| {
            Error::usage(format!(
                "--table {:?} has no schema: write SCHEMA.TABLE, e.g. public.{}",
                a.table, a.table
            ))
        })?;
        let q = "SELECT c.oid::int8 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')";
        let rows = c
            .query(q, &[&schema, &name])
            .map_err(db_err("cannot look the table up"))?;
        let oid: i64 = rows
            .first()
            .ok_or_else(|| Error::usage(format!("no table {schema}.{name} in this database")))?
            .get(0);
        let attrs = c
            .query(
                "SELECT attname::text, format_type(atttypid, atttypmod), atttypid::int8, attnotnull
                   FROM pg_attribute WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped",
                &[&oid],
            )
            .map_err(db_err("cannot read the table's columns"))?;
        let attr = |n: &str| attrs.iter().find(|r| r.get::<_, &str>(0) == n);
        let pk: Vec<String> = c
            .query(
                "SELECT a.attname::text FROM pg_index i
                   JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                  WHERE i.indrelid = $1::int8::oid AND i.indisprimary ORDER BY k.ord",
                &[&oid],
            )
            .map_err(db_err("cannot read the primary key"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let label = format!("{schema}.{name}");
        let key_names: Vec<String> = if !a.row_id.is_empty() {
            a.row_id.iter().map(|s| s.trim().to_string()).collect()
        } else if !pk.is_empty() {
            pk
        } else {
            return Err(Error::usage(format!(
                "{label} has no primary key: pass --row-id COL[,COL...] naming unique, non-NULL columns to bind each token to its row"
            )));
        };
        let mut key = Vec::new();
        for k in &key_names {
            let r = attr(k)
                .ok_or_else(|| Error::usage(format!("--row-id: {label} has no column {k:?}")))?;
            if a.columns.iter().any(|c| c == k) {
                return Err(Error::usage(format!(
                    "column {k:?} is the row id and cannot be encrypted: a token is bound to it"
                )));
            }
            key.push(KeyCol {
                name: k.clone(),
                ty: r.get(1),
            });
        }
        if !a.row_id.is_empty() {
            // The walk pages by these columns: without uniqueness rows
            // sharing a value at a chunk boundary would be skipped.
            let uniq = c
                .query(
                    "SELECT 1 FROM pg_index i WHERE i.indrelid = $1::int8::oid AND i.indisunique
                        AND i.indpred IS NULL AND i.indexprs IS NULL
                        AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
                               FROM pg_attribute a WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey))
                          = (SELECT array_agg(x ORDER BY x) FROM unnest($2::text[]) x)",
                    &[&oid, &key_names],
                )
                .map_err(db_err("cannot read the table's indexes"))?;
            if uniq.is_empty() {
                return Err(Error::usage(format!(
                    "--row-id {}: {label} has no unique index on exactly these columns; the walk needs one to page through the table (CREATE UNIQUE INDEX ... ON {label} ({}))",
                    key_names.join(","),
                    key_names.join(", ")
                )));
            }
        }
        let recorded: BTreeMap<String, String> = match c.query(
            "SELECT column_name, original_type FROM hsmseal.columns WHERE table_name = $1",
            &[&label],
        ) {
            Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            // No hsmseal schema yet: nothing recorded.
            Err(e) if e.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) => {
                BTreeMap::new()
            }
            Err(e) => return Err(db_err("cannot read hsmseal.columns")(e)),
        };
        let mut cols = Vec::new();
        let mut to_alter = Vec::new();
        for name in &a.columns {
            let r = attr(name)
                .ok_or_else(|| Error::usage(format!("{label} has no column {name:?}")))?;
            let ty: String = r.get(1);
            let typid: i64 = r.get(2);
            if cols.iter().any(|c: &Col| &c.name == name) {
                return Err(Error::usage(format!("--columns names {name:?} twice")));
            }
            let mut original = recorded.get(name).cloned();
            // A column that is not text holds no tokens: decrypt, rotate,
            // verify and status count its values as clear (a re-run after
            // decrypt restored the type changes nothing).
            if typid != 25 && encrypting {
                if !a.alter {
                    return Err(Error::usage(format!(
                        "column {name:?} of {label} is {ty}, not text: a token is text, so pass --alter to change the column to text (its type is recorded in hsmseal.columns and restored by pg decrypt), or leave it out of --columns"
                    )));
                }
                to_alter.push((name.clone(), ty.clone()));
                original = Some(ty);
            }
            cols.push(Col {
                name: name.clone(),
                original,
            });
        }
        Ok(Table {
            oid,
            sql: format!("{}.{}", ident(schema), ident(name)),
            label,
            key,
            cols,
            to_alter,
            bidx: Vec::new(),
        })
    }

    /// Checks each `--blind-index` against the table: COL is encrypted by
    /// this run, TARGET is a text column that is neither a key nor an
    /// encrypted column, or is missing and `--alter` adds it. Exit 2 (usage)
    /// otherwise, naming the column.
    fn blind_targets(
        &mut self,
        c: &mut Client,
        a: &PgArgs,
        specs: Vec<BlindIndexSpec>,
    ) -> Result<()> {
        for spec in specs {
            let (col, target) = (&spec.column, &spec.target);
            let j = self.cols.iter().position(|c| &c.name == col).ok_or_else(|| {
                Error::usage(format!(
                    "--blind-index {col:?}: not one of the encrypted --columns (an index is computed from the plaintext of a column this run encrypts); add it to --columns"
                ))
            })?;
            if self.cols.iter().any(|c| &c.name == target)
                || self.key.iter().any(|k| &k.name == target)
            {
                return Err(Error::usage(format!(
                    "--blind-index {col}: its target {target:?} is encrypted by this run or is the row id; an index goes into a column of its own"
                )));
            }
            if self.bidx.iter().any(|(_, s, _)| &s.target == target) {
                return Err(Error::usage(format!(
                    "--blind-index: target {target:?} is named twice"
                )));
            }
            let ty: Option<String> = c
                .query_opt(
                    "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
                      WHERE attrelid = $1::text::regclass AND attname = $2 AND attnum > 0 AND NOT attisdropped",
                    &[&self.sql, target],
                )
                .map_err(db_err("cannot read the table's columns"))?
                .map(|r| r.get(0));
            let add = match ty.as_deref() {
                Some("text") => false,
                Some(ty) => {
                    return Err(Error::usage(format!(
                        "--blind-index {col}: target column {target:?} of {} is {ty}; an index is text: drop it or name another with --blind-index {col}=COLUMN",
                        self.label
                    )))
                }
                None if a.alter => true,
                None => {
                    return Err(Error::usage(format!(
                        "--blind-index {col}: {} has no column {target:?}: pass --alter to add it as text, add it yourself (ALTER TABLE {} ADD COLUMN {} text), or name another with --blind-index {col}=COLUMN",
                        self.label,
                        self.label,
                        ident(target)
                    )))
                }
            };
            self.bidx.push((j, spec, add));
        }
        Ok(())
    }

    /// `(k1, k2)` in SQL, prefixed with `t.` or not.
    fn key_names(&self) -> Vec<&str> {
        self.key.iter().map(|k| k.name.as_str()).collect()
    }

    fn key_list(&self, prefix: &str) -> String {
        let v: Vec<String> = self
            .key
            .iter()
            .map(|k| format!("{prefix}{}", ident(&k.name)))
            .collect();
        v.join(", ")
    }
}

/// The binding of one cell: the column's prefix and the row id, `u8(1) ||
/// lp(id)` for one key column (what `columns --row-id COL` binds), `u8(2) ||
/// u8(k) || lp(v1) || … || lp(vk)` for k ≥ 2: the dump path's own encoder
/// ([`columns::encode_row_id`], FORMAT §6), so tokens move between a table
/// and its COPY dump.
fn row_binding(out: &mut Vec<u8>, prefix: &[u8], ids: &[&[u8]], rid: &mut Vec<u8>) {
    rid.clear();
    columns::encode_row_id(rid, ids);
    token::binding_encoded(out, prefix, rid);
}

fn hex_decode(s: &[u8]) -> Option<Vec<u8>> {
    let h = s.strip_prefix(b"\\x")?;
    if h.len() % 2 != 0 {
        return None;
    }
    let d = |c: u8| (c as char).to_digit(16);
    h.chunks(2)
        .map(|p| Some((d(p[0])? * 16 + d(p[1])?) as u8))
        .collect()
}

fn hex_encode(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + b.len() * 2);
    s.push_str("\\x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

// ---- The walk --------------------------------------------------------------

/// Counts of one walk (the `--json` summary's fields).
#[derive(Default, serde::Serialize)]
struct Counts {
    rows: u64,
    cells: u64,
    changed: u64,
    nulls: u64,
    /// Clear values: left alone by decrypt, rotate and verify.
    clear: u64,
    /// Tokens left alone: encrypt (already tokens of this cell), rotate
    /// (already under the target version).
    unchanged_tokens: u64,
    chunks: u64,
}

/// Per-cell cryptography of one walk.
enum Engine<'a> {
    Seal(Box<Sealer<'a>>, Opener<'a>),
    Open(Opener<'a>),
    Rewrap(Rewrapper<'a>),
}

#[allow(clippy::too_many_arguments)]
fn walk(
    app: &App,
    client: &mut Client,
    t: &Table,
    a: &PgArgs,
    op: Op,
    key_name: Option<String>,
    dry_run: bool,
) -> Result<i32> {
    let started = Instant::now();
    let backend = app.backend()?;
    let backend: &dyn KeyBackend = &*backend;
    let target = match &key_name {
        Some(n) => Some(KeyRef {
            name: n.clone(),
            version: backend.current_version(n)?,
        }),
        None => None,
    };
    let context = a.context.clone().unwrap_or_else(|| t.label.clone());
    let cols_key = serde_json::to_string(&a.columns).expect("strings serialise");
    let writes = op.writes() && !dry_run;
    if writes {
        let mut tx = client.transaction().map_err(db_err("cannot begin"))?;
        tx.batch_execute(STATE_LOCK)
            .and_then(|_| tx.batch_execute(STATE_SQL))
            .map_err(db_err(
                "cannot create hsmseal's state tables (schema hsmseal)",
            ))?;
        tx.commit()
            .map_err(db_err("cannot create hsmseal's state tables"))?;
        lock_table(app, client, &t.label)?;
    }
    if writes && !t.to_alter.is_empty() {
        if op != Op::Encrypt {
            let (c, ty) = &t.to_alter[0];
            return Err(Error::usage(format!(
                "column {c:?} of {} is {ty}, not text, and holds no tokens",
                t.label
            )));
        }
        alter_to_text(client, t)?;
    }
    if writes {
        for (_, spec, add) in &t.bidx {
            if *add {
                // `--alter`: the blind index's column, added once.
                client
                    .batch_execute(&format!(
                        "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} text",
                        t.sql,
                        ident(&spec.target)
                    ))
                    .map_err(db_err(&format!("cannot add column {:?}", spec.target)))?;
            }
        }
    }
    let batch_cache = BatchCache::new();
    let rewrap_cache = RewrapCache::new();
    let prefixes: Vec<Vec<u8>> = t
        .cols
        .iter()
        .map(|c| binding_prefix(&context, &ColumnId::Name(c.name.clone())))
        .collect();
    // One CellWork per key range walked at once: its own sealer (batch) and
    // blind indexers (one HSM call each), the caches shared.
    let new_work = || -> Result<CellWork> {
        let engine = match op {
            Op::Encrypt if !dry_run => {
                let k = target.as_ref().expect("encrypt has a key");
                Engine::Seal(
                    Box::new(Sealer::new(backend, k, token::DEFAULT_BATCH_SIZE)?),
                    Opener::new(backend, &batch_cache),
                )
            }
            Op::Encrypt => Engine::Open(Opener::new(backend, &batch_cache)),
            Op::Decrypt | Op::Verify => Engine::Open(Opener::new(backend, &batch_cache)),
            Op::Rotate => Engine::Rewrap(Rewrapper::new(backend, target.as_ref(), &rewrap_cache)),
        };
        // One indexer per --blind-index, for encrypt only: the column id
        // is the token binding's, ColumnId::Name(column).
        let indexers: Vec<(usize, BlindIndexer)> = match (&engine, &key_name) {
            (Engine::Seal(..), Some(k)) => t
                .bidx
                .iter()
                .map(|(j, spec, _)| {
                    BlindIndexer::new(
                        backend,
                        k,
                        &context,
                        &columns::blind_index::column_id(&ColumnId::Name(spec.column.clone())),
                        spec.bits,
                        spec.normalize,
                    )
                    .map(|ix| (*j, ix))
                })
                .collect::<Result<_>>()?,
            _ => Vec::new(),
        };
        Ok(CellWork {
            t,
            op,
            writes,
            engine,
            indexers,
            prefixes: prefixes.clone(),
            fmt_flags: token::format_flags(Format::PgCopy),
            aad: Vec::with_capacity(256),
            out: Vec::with_capacity(512),
            rid: Vec::with_capacity(64),
            ids_in_upd: true,
        })
    };
    let atomic = a.atomic && writes;
    // --rewrite: one transaction under the table's exclusive lock, no
    // cursors (rewrite.rs); when no cell would change, the online walk,
    // which then writes nothing.
    let rewrite = a.rewrite && writes && rewrite::has_work(client, t, op)?;
    if a.rewrite && writes && !rewrite {
        app.info(format!(
            "hsmseal: nothing in {} for pg {} to change: checking it in place, not rewriting it",
            t.label,
            op.name()
        ));
    }
    // The key ranges: those of an interrupted run of this op on these
    // columns (whatever --jobs says now: the bounds were stored so a resumed
    // run walks exactly the ranges whose cursors it finds), else new ones.
    // A cursor of another op is stale once this one runs: dropped.
    let mut ranges = vec![Range::all()];
    let mut resumed = 0i64;
    if writes {
        client
            .execute(
                "DELETE FROM hsmseal.progress WHERE table_name = $1 AND op <> $2",
                &[&t.label, &op.name()],
            )
            .map_err(db_err("cannot read hsmseal.progress"))?;
        let interrupted = if rewrite {
            None
        } else {
            load_ranges(client, t, &cols_key, op)?
        };
        match interrupted {
            Some((r, done)) => {
                resumed = done;
                app.info(format!(
                    "hsmseal: resuming pg {} of {} after {resumed} rows ({} of {} key ranges left, hsmseal.progress)",
                    op.name(),
                    t.label,
                    r.iter().filter(|r| !r.done).count(),
                    r.len()
                ));
                ranges = r;
            }
            // --atomic: one transaction, rolled back whole if killed, so
            // nothing to resume: no cursor row is stored.
            None if atomic || rewrite => {}
            None => {
                ranges = split_ranges(client, t, pg_jobs(app))?;
                save_ranges(client, t, &cols_key, op, &ranges)?;
            }
        }
    }
    let bar = progress_bar(app, client, t)?;
    if let Some(pb) = &bar {
        pb.set_position(resumed as u64);
    }
    // Blind indexes are written by encrypt only (not its --dry-run).
    let nb = if op == Op::Encrypt && !dry_run {
        t.bidx.len()
    } else {
        0
    };
    let ctx = WalkCtx::new(t, a, op, writes, atomic, &cols_key, nb);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let todo: Vec<&Range> = ranges.iter().filter(|r| !r.done).collect();
    let mut counts = Counts::default();
    let mut trace = Trace::default();
    let mut sealer_calls = 0u64;
    let mut add = |(c, w, tr): (Counts, CellWork, Trace)| {
        counts.add(&c);
        trace.add(&tr);
        if let Engine::Seal(s, _) = &w.engine {
            sealer_calls += s.hsm_calls;
        }
    };
    let done_sql =
        "DELETE FROM hsmseal.progress WHERE table_name = $1 AND columns = $2 AND op = $3";
    let sql = |c: &mut Client, q: &str| c.batch_execute(q).map_err(db_err("transaction control"));
    if rewrite {
        // The cells on --jobs worker threads; the server's side is one
        // connection (one transaction).
        let works: Vec<CellWork> = (0..pg_jobs(app))
            .map(|_| {
                new_work().map(|mut w| {
                    w.ids_in_upd = false;
                    w
                })
            })
            .collect::<Result<_>>()?;
        for out in rewrite::rewrite(app, client, &ctx, works, bar.as_ref())? {
            add(out);
        }
    } else if atomic || todo.len() <= 1 {
        // One connection: this one (--atomic: all ranges in its one
        // transaction, the cursors removed before its COMMIT).
        if atomic {
            sql(client, "BEGIN")?;
        }
        for r in &todo {
            let w = new_work()?;
            let out = walk_range(client, &ctx, r, w, bar.as_ref(), &stop)?;
            add(out.expect("nothing else stops a lone walker"));
        }
        if writes {
            client
                .execute(done_sql, &[&t.label, &cols_key, &op.name()])
                .map_err(db_err("cannot update hsmseal.progress"))?;
        }
        if atomic {
            sql(client, "COMMIT").map_err(|e| e.context("committing the --atomic transaction"))?;
        }
    } else {
        // Parallel: one connection and walker per key range, the first on
        // this connection (which holds the table's advisory lock), the
        // others on their own. Each range commits chunk by chunk with its
        // own cursor row, exactly as a lone walker does, so kill -9 and
        // resume are per range. On an error the others stop at their next
        // chunk; the ranges' cursors stay for the resumed run.
        let works: Vec<CellWork> = todo.iter().map(|_| new_work()).collect::<Result<_>>()?;
        let ctx = &ctx;
        let (stop, bar) = (&stop, bar.as_ref());
        let results: Vec<Result<Option<(Counts, CellWork, Trace)>>> = std::thread::scope(|s| {
            let mut handles = Vec::new();
            let mut main = Some(&mut *client);
            for (r, w) in todo.iter().copied().zip(works) {
                let mine = main.take();
                let h = std::thread::Builder::new()
                    .name(format!("pg-range-{}", r.part))
                    .spawn_scoped(s, move || {
                        let res = match mine {
                            Some(c) => walk_range(c, ctx, r, w, bar, stop),
                            None => connect(&a.dsn)
                                .and_then(|mut c| walk_range(&mut c, ctx, r, w, bar, stop)),
                        };
                        if res.is_err() {
                            stop.store(true, Ordering::Relaxed);
                        }
                        res
                    });
                handles.push(h);
            }
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err(Error::io("a walker thread panicked"))),
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        Err(Error::io(format!("cannot start a walker thread: {e}")))
                    }
                })
                .collect()
        });
        let mut first_err = None;
        let mut stopped = false;
        for r in results {
            match r {
                Ok(Some(out)) => add(out),
                Ok(None) => stopped = true,
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if stopped {
            return Err(Error::io("a walker of the walk stopped without an error"));
        }
        client
            .execute(done_sql, &[&t.label, &cols_key, &op.name()])
            .map_err(db_err("cannot update hsmseal.progress"))?;
    }
    if std::env::var_os("HSMSEAL_PG_TRACE").is_some() {
        // A diagnostic (docs/PERFORMANCE.md): the connections' time per
        // statement kind, summed over the ranges walked.
        let (s, u, c, w) = (
            trace.select.as_secs_f64(),
            trace.update.as_secs_f64(),
            trace.commit.as_secs_f64(),
            trace.wait.as_secs_f64(),
        );
        app.info(if rewrite {
            format!("hsmseal: pg trace: rewrite, lock + COPY TO the spool {s:.2} s, TRUNCATE + cells + COPY FROM {u:.2} s, COMMIT {c:.2} s")
        } else {
            format!(
                "hsmseal: pg trace: {} ranges, SELECT ... FOR UPDATE {s:.2} s, UPDATE {u:.2} s, cursor + COMMIT {c:.2} s, waiting for sealed parts {w:.2} s",
                todo.len()
            )
        });
    }
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    if op == Op::Decrypt && writes {
        restore_types(app, client, t)?;
    }
    let hsm_calls = sealer_calls
        + match op {
            Op::Rotate => rewrap_cache.hsm_calls(),
            _ => batch_cache.hsm_calls(),
        };
    // Audit entry: cells changed (or checked) are the items.
    let done = if op == Op::Verify {
        counts.cells - counts.clear
    } else {
        counts.changed
    };
    app.stats.ok.fetch_add(done, Ordering::Relaxed);
    app.stats
        .skipped
        .fetch_add(counts.cells - done + counts.nulls, Ordering::Relaxed);
    let keys: Vec<KeyRef> = match op {
        Op::Rotate if target.is_none() => rewrap_cache.targets(),
        _ => target.iter().cloned().collect(),
    };
    for k in &keys {
        app.stats.add_key(k.clone());
    }
    let secs = started.elapsed().as_secs_f64();
    if app.json {
        let mut m = serde_json::Map::new();
        m.insert("action".into(), format!("pg {}", op.name()).into());
        m.insert("table".into(), t.label.clone().into());
        m.insert("columns".into(), serde_json::json!(a.columns));
        m.insert("context".into(), context.into());
        let names: Vec<&str> = t.key.iter().map(|k| k.name.as_str()).collect();
        m.insert("row_id".into(), serde_json::json!(names));
        m.insert(
            "keys".into(),
            keys.iter()
                .map(|k| serde_json::json!({"name": k.name, "version": k.version}))
                .collect(),
        );
        m.insert("dry_run".into(), dry_run.into());
        m.insert("resumed_after_rows".into(), resumed.into());
        if let Ok(serde_json::Value::Object(c)) = serde_json::to_value(&counts) {
            m.extend(c);
        }
        m.insert("hsm_calls".into(), hsm_calls.into());
        m.insert("seconds".into(), secs.into());
        crate::report::emit("summary", &m);
    } else {
        let verb = match (op, dry_run) {
            (Op::Verify, _) => "tokens open",
            (_, true) => "would change",
            _ => "changed",
        };
        let n = if op == Op::Verify {
            done
        } else {
            counts.changed
        };
        app.info(format!(
            "pg {}{}: {} of {}: {n} cells {verb}, {} rows, {} NULL, {} clear, {} tokens left as they were, {} chunks, {} HSM calls, {secs:.1} s",
            op.name(),
            if dry_run { " --dry-run" } else { "" },
            a.columns.join(","),
            t.label,
            counts.rows,
            counts.nulls,
            counts.clear,
            counts.unchanged_tokens,
            counts.chunks,
            hsm_calls,
        ));
    }
    Ok(0)
}

/// Key ranges walked at once, each on its own connection: `--jobs` (or
/// HSMSEAL_JOBS, hsmseal.toml) if given, else 2 (1 on one core). Not the
/// number of cores, the default of file runs: each range is a server
/// backend writing at full speed, and the table stays online.
fn pg_jobs(app: &App) -> u32 {
    let j = &app.settings.jobs;
    let n = match j.source {
        crate::config::Source::Default => j.value.min(2),
        _ => j.value,
    };
    u32::try_from(n).unwrap_or(u32::MAX).max(1)
}

/// One key range of a walk: the rows after `lo` (exclusive; `None`: from
/// the first row) up to `hi` (inclusive; `None`: to the last), with cursor
/// row `part` in hsmseal.progress (`lo` is that row's `last_key`, moved
/// forward by each committed chunk).
#[derive(Clone, Debug)]
struct Range {
    part: i32,
    lo: Option<Vec<String>>,
    hi: Option<Vec<String>>,
    /// Finished by an interrupted run (its cursor row says so).
    done: bool,
}

impl Range {
    fn all() -> Range {
        Range {
            part: 0,
            lo: None,
            hi: None,
            done: false,
        }
    }
}

/// The key ranges an interrupted run of `op` on these columns stored, and
/// the rows it did, or `None` if there is none. Cursor rows are server data
/// anyone with the rights can edit: a set that is not one row per range
/// 0..parts, or a key with a NULL element or one per key column too many
/// or too few, is refused with the fix, never taken as a place to resume.
fn load_ranges(
    c: &mut Client,
    t: &Table,
    cols_key: &str,
    op: Op,
) -> Result<Option<(Vec<Range>, i64)>> {
    let rows = c
        .query(
            "SELECT part, parts, last_key, hi_key, rows_done, done FROM hsmseal.progress
              WHERE table_name = $1 AND columns = $2 AND op = $3 ORDER BY part",
            &[&t.label, &cols_key, &op.name()],
        )
        .map_err(db_err("cannot read hsmseal.progress"))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let bad = || {
        Error::format(format!(
            "hsmseal.progress holds cursors for pg {} of {} that are not one row per key range with one value per key column ({}): delete them (DELETE FROM hsmseal.progress WHERE table_name = '{}') and run again; rows already done are left as they are",
            op.name(),
            t.label,
            t.key_names().join(", "),
            t.label.replace('\'', "''")
        ))
    };
    let key = |v: Option<Vec<Option<String>>>| -> Result<Option<Vec<String>>> {
        match v {
            None => Ok(None),
            Some(k) if k.len() == t.key.len() => k
                .into_iter()
                .collect::<Option<_>>()
                .map(Some)
                .ok_or_else(bad),
            Some(_) => Err(bad()),
        }
    };
    let mut ranges = Vec::new();
    let mut done_rows = 0i64;
    for (i, r) in rows.iter().enumerate() {
        let (part, parts): (i32, i32) = (r.get(0), r.get(1));
        if part != i as i32 || parts != rows.len() as i32 {
            return Err(bad());
        }
        let lo = key(r.try_get(2).map_err(|_| bad())?)?;
        let hi = key(r.try_get(3).map_err(|_| bad())?)?;
        // Only the last range is open-ended.
        if hi.is_none() != (i + 1 == rows.len()) {
            return Err(bad());
        }
        done_rows += r.try_get::<_, i64>(4).unwrap_or(0).max(0);
        ranges.push(Range {
            part,
            lo,
            hi,
            done: r.get(5),
        });
    }
    Ok(Some((ranges, done_rows)))
}

/// `jobs` key ranges of about equal row counts, cut at quantiles of the
/// key (one scan of it); fewer if the table has fewer rows.
fn split_ranges(c: &mut Client, t: &Table, jobs: u32) -> Result<Vec<Range>> {
    if jobs <= 1 {
        return Ok(vec![Range::all()]);
    }
    let keys = t.key_list("");
    let desc: Vec<String> = t
        .key
        .iter()
        .map(|k| format!("{} DESC", ident(&k.name)))
        .collect();
    let texts: Vec<String> = t
        .key
        .iter()
        .map(|k| format!("{}::text", ident(&k.name)))
        .collect();
    // The last key of each tile but the last: the ranges' upper bounds.
    let q = format!(
        "SELECT {} FROM (SELECT DISTINCT ON (q) {keys}, q FROM
           (SELECT {keys}, ntile({jobs}) OVER (ORDER BY {keys}) AS q FROM {}) x
           ORDER BY q, {}) y WHERE q < {jobs} ORDER BY q",
        texts.join(", "),
        t.sql,
        desc.join(", ")
    );
    let bounds: Vec<Vec<String>> = c
        .query(&q, &[])
        .map_err(db_err(&format!("cannot split {} into key ranges", t.label)))?
        .iter()
        .map(|r| (0..t.key.len()).map(|i| r.get(i)).collect())
        .collect();
    let mut ranges = Vec::new();
    let mut lo = None;
    for (i, b) in bounds.iter().enumerate() {
        ranges.push(Range {
            part: i as i32,
            lo: lo.take(),
            hi: Some(b.clone()),
            done: false,
        });
        lo = Some(b.clone());
    }
    ranges.push(Range {
        part: ranges.len() as i32,
        lo,
        hi: None,
        done: false,
    });
    Ok(ranges)
}

/// Stores new ranges' cursor rows, all in one transaction, before any is
/// walked: a resumed run finds all of them or none.
fn save_ranges(c: &mut Client, t: &Table, cols_key: &str, op: Op, ranges: &[Range]) -> Result<()> {
    let mut tx = c.transaction().map_err(db_err("cannot begin"))?;
    for r in ranges {
        tx.execute(
            "INSERT INTO hsmseal.progress (table_name, columns, op, part, parts, last_key, hi_key, rows_done, done, started, updated)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, false, now(), now())",
            &[&t.label, &cols_key, &op.name(), &r.part, &(ranges.len() as i32), &r.lo, &r.hi],
        )
        .map_err(db_err("cannot write hsmseal.progress"))?;
    }
    tx.commit().map_err(db_err("cannot write hsmseal.progress"))
}

/// Time a walker's connection spent per kind of statement
/// (`HSMSEAL_PG_TRACE`), and waiting for the worker's sealed parts.
#[derive(Default)]
struct Trace {
    select: Duration,
    update: Duration,
    commit: Duration,
    wait: Duration,
}

impl Trace {
    fn add(&mut self, o: &Trace) {
        self.select += o.select;
        self.update += o.update;
        self.commit += o.commit;
        self.wait += o.wait;
    }
}

/// What every walker of one walk shares: the table, the op, and the SQL
/// it prepares on its connection.
struct WalkCtx<'t> {
    t: &'t Table,
    op: Op,
    writes: bool,
    atomic: bool,
    chunk_rows: u32,
    cols_key: &'t str,
    /// Key columns, then the selected columns, then the ctid, as text.
    sel_cols: String,
    update: String,
}

impl<'t> WalkCtx<'t> {
    fn new(
        t: &'t Table,
        a: &PgArgs,
        op: Op,
        writes: bool,
        atomic: bool,
        cols_key: &'t str,
        nb: usize,
    ) -> WalkCtx<'t> {
        let nk = t.key.len();
        let sel_cols: Vec<String> = t
            .key
            .iter()
            .map(|k| format!("t.{}::text", ident(&k.name)))
            .chain(t.cols.iter().map(|c| format!("t.{}::text", ident(&c.name))))
            // The row's physical address, last: the UPDATE finds the row by it
            // (a TID scan) instead of descending the key's index once more.
            .chain(std::iter::once("t.ctid::text".to_string()))
            .collect();
        // The chunk's UPDATE: the changed rows from arrays, NULL meaning "keep".
        // Rows are found by ctid (measured: a third less server time per chunk
        // than a join on the key, docs/PERFORMANCE.md). The ctid cannot change
        // between the SELECT and the UPDATE: the row is locked FOR UPDATE by
        // this transaction, and VACUUM never moves a tuple. The key columns
        // are still compared, so a wrong ctid could only update nothing.
        let vals: Vec<String> = (0..nk + t.cols.len() + nb + 1)
            .map(|i| format!("${}::text[]", i + 1))
            .collect();
        let names: Vec<String> = (0..nk)
            .map(|i| format!("k{i}"))
            .chain((0..t.cols.len()).map(|i| format!("v{i}")))
            .chain((0..nb).map(|i| format!("b{i}")))
            .chain(std::iter::once("tid".to_string()))
            .collect();
        let sets: Vec<String> = t
            .cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "{} = COALESCE(v.v{i}, t.{})",
                    ident(&c.name),
                    ident(&c.name)
                )
            })
            // A blind index changes only with its value's token: NULL keeps it.
            .chain(t.bidx.iter().take(nb).enumerate().map(|(i, (_, spec, _))| {
                format!(
                    "{} = COALESCE(v.b{i}, t.{})",
                    ident(&spec.target),
                    ident(&spec.target)
                )
            }))
            .collect();
        let matches: Vec<String> = t
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("t.{} = v.k{i}::{}", ident(&k.name), k.ty))
            .collect();
        let update = format!(
            "UPDATE {} AS t SET {} FROM unnest({}) AS v({}) WHERE t.ctid = v.tid::tid AND {}",
            t.sql,
            sets.join(", "),
            vals.join(", "),
            names.join(", "),
            matches.join(" AND ")
        );
        WalkCtx {
            t,
            op,
            writes,
            atomic,
            chunk_rows: a.chunk_rows,
            cols_key,
            sel_cols: sel_cols.join(", "),
            update,
        }
    }

    /// A chunk's SELECT: after the cursor (`$1..$k`) if `after`, up to and
    /// including the range's upper bound (the next `$`s) if `upto`.
    fn select(&self, after: bool, upto: bool) -> String {
        let t = self.t;
        // Qualified: a bare name in ORDER BY would pick the `::text` output
        // column of the same name and sort as text.
        let keys_t = t.key_list("t.");
        let bound = |from: usize| -> String {
            let v: Vec<String> = t
                .key
                .iter()
                .enumerate()
                .map(|(i, k)| format!("${}::text::{}", from + i, k.ty))
                .collect();
            v.join(", ")
        };
        let mut conds = Vec::new();
        if after {
            conds.push(format!("({keys_t}) > ({})", bound(1)));
        }
        if upto {
            let from = if after { t.key.len() + 1 } else { 1 };
            conds.push(format!("({keys_t}) <= ({})", bound(from)));
        }
        let filter = if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        };
        format!(
            "SELECT {} FROM {} AS t{filter} ORDER BY {keys_t} LIMIT {}{}",
            self.sel_cols,
            t.sql,
            self.chunk_rows,
            if self.writes { " FOR UPDATE" } else { "" }
        )
    }
}

/// Walks one key range on `client`, chunk by chunk, until its end; returns
/// its counts, its cell work (for the HSM call count) and its trace, or
/// `None` if `stop` was set (another range failed) before its end.
///
/// Transactions by hand: per chunk BEGIN … COMMIT, or with --atomic a
/// savepoint per chunk inside the caller's BEGIN … COMMIT. On an error the
/// connection is dropped with the transaction open: the server rolls it
/// back.
#[allow(clippy::type_complexity)]
fn walk_range<'a, 't>(
    client: &mut Client,
    ctx: &WalkCtx<'t>,
    range: &Range,
    work: CellWork<'a, 't>,
    bar: Option<&indicatif::ProgressBar>,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Option<(Counts, CellWork<'a, 't>, Trace)>> {
    let t = ctx.t;
    let chunk_rows = ctx.chunk_rows as usize;
    // Prepared once: each chunk then costs no parse or plan round trip.
    let prep = |c: &mut Client, q: &str| c.prepare(q).map_err(db_err("cannot prepare a statement"));
    let upto = range.hi.is_some();
    let select_first = prep(client, &ctx.select(false, upto))?;
    let select_next = prep(client, &ctx.select(true, upto))?;
    // The range's cursor row moves with each chunk, in its transaction;
    // `done` once its last chunk is in.
    let save = if ctx.writes {
        Some(prep(
            client,
            "UPDATE hsmseal.progress SET last_key = COALESCE($4, last_key), rows_done = rows_done + $5,
                    done = $6, updated = clock_timestamp()
              WHERE table_name = $1 AND columns = $2 AND op = $3 AND part = $7",
        )?)
    } else {
        None
    };
    // The UPDATE is prepared when first needed: a column that is not text
    // (a decrypt re-run after the type was restored) holds no token, is
    // never updated, and would not type-check in it.
    let mut update_stmt: Option<postgres::Statement> = None;
    let sql = |c: &mut Client, q: &str| c.batch_execute(q).map_err(db_err("transaction control"));
    let mut last = range.lo.clone();
    let mut counts = Counts::default();
    let mut trace = Trace::default();
    // Pipelining: the cryptography of a chunk runs on a worker thread, part
    // by part, while this thread, which alone owns the connection, sends
    // the UPDATE of the part before (the server's time, measured as most of
    // a walk, then overlaps hsmseal's). Only the work moved: each chunk's
    // rows are still read, updated and committed with its cursor in one
    // transaction by this thread, so resume and kill -9 behave as before.
    // The worker gets a chunk's parts in order and returns each, in order,
    // through a channel of depth 2 (at most two sealed parts wait).
    let part_rows = chunk_rows.div_ceil(PARTS_PER_CHUNK).max(1);
    std::thread::scope(|s| -> Result<Option<(Counts, CellWork, Trace)>> {
        let (to_worker, parts_in) = std::sync::mpsc::channel::<Vec<postgres::Row>>();
        let (parts_out, from_worker) = std::sync::mpsc::sync_channel::<Result<Part>>(2);
        let mut work = work;
        let worker = std::thread::Builder::new()
            .name("pg-cells".into())
            .spawn_scoped(s, move || {
                for rows in parts_in {
                    let r = work.part(&rows);
                    let failed = r.is_err();
                    // A closed channel: the walk stopped on an error.
                    if parts_out.send(r).is_err() || failed {
                        break;
                    }
                }
                work
            })
            .map_err(|e| Error::io(format!("cannot start a worker thread: {e}")))?;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let t0 = Instant::now();
            sql(
                client,
                if ctx.atomic {
                    "SAVEPOINT hsmseal_chunk"
                } else {
                    "BEGIN"
                },
            )?;
            let mut p: Vec<&(dyn postgres::types::ToSql + Sync)> = Vec::new();
            if let Some(l) = &last {
                p.extend(l.iter().map(|s| s as &(dyn postgres::types::ToSql + Sync)));
            }
            if let Some(h) = &range.hi {
                p.extend(h.iter().map(|s| s as &(dyn postgres::types::ToSql + Sync)));
            }
            let stmt = if last.is_some() {
                &select_next
            } else {
                &select_first
            };
            let mut rows = client
                .query(stmt, &p)
                .map_err(db_err(&format!("cannot read {}", t.label)))?;
            trace.select += t0.elapsed();
            let n = rows.len();
            let mut parts = 0;
            while !rows.is_empty() {
                let rest = rows.split_off(part_rows.min(rows.len()));
                // The worker only stops early after an error, which the
                // receive below reports.
                let _ = to_worker.send(std::mem::replace(&mut rows, rest));
                parts += 1;
            }
            for _ in 0..parts {
                let t0 = Instant::now();
                let part = from_worker
                    .recv()
                    .map_err(|_| Error::io("the worker thread of the walk stopped"))??;
                trace.wait += t0.elapsed();
                counts.add(&part.counts);
                if part.last.is_some() {
                    last = part.last;
                }
                if save.is_some() && !part.upd[0].is_empty() {
                    let t0 = Instant::now();
                    if update_stmt.is_none() {
                        update_stmt = Some(prep(client, &ctx.update)?);
                    }
                    let update = update_stmt.as_ref().expect("prepared above");
                    let p: Vec<&(dyn postgres::types::ToSql + Sync)> = part
                        .upd
                        .iter()
                        .map(|v| v as &(dyn postgres::types::ToSql + Sync))
                        .collect();
                    client
                        .execute(update, &p)
                        .map_err(db_err(&format!("cannot update {}", t.label)))?;
                    trace.update += t0.elapsed();
                }
            }
            let t0 = Instant::now();
            let end = n < chunk_rows;
            if let Some(save) = &save {
                client
                    .execute(
                        save,
                        &[
                            &t.label,
                            &ctx.cols_key,
                            &ctx.op.name(),
                            &last,
                            &(n as i64),
                            &end,
                            &range.part,
                        ],
                    )
                    .map_err(db_err("cannot update hsmseal.progress"))?;
            }
            sql(
                client,
                if ctx.atomic {
                    "RELEASE SAVEPOINT hsmseal_chunk"
                } else {
                    "COMMIT"
                },
            )
            .map_err(|e| e.context(format!("committing a chunk of {}", t.label)))?;
            trace.commit += t0.elapsed();
            counts.chunks += 1;
            if let Some(pb) = bar {
                pb.inc(n as u64);
            }
            if end {
                break;
            }
        }
        drop(to_worker);
        let work = worker
            .join()
            .map_err(|_| Error::io("the worker thread of the walk panicked"))?;
        Ok(Some((counts, work, trace)))
    })
}

/// A chunk is handed to the worker thread in this many parts, so the
/// server's UPDATE of one part overlaps the cryptography of the next.
const PARTS_PER_CHUNK: usize = 4;

/// What the worker returns for one part of a chunk: the UPDATE's arrays
/// (key columns, new values, new blind indexes, ctid; NULL keeps a value),
/// the part's counts and the key of its last row.
struct Part {
    upd: Vec<Vec<Option<String>>>,
    /// For each row in `upd`, its index in the part's rows.
    changed: Vec<usize>,
    counts: Counts,
    last: Option<Vec<String>>,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.rows += o.rows;
        self.cells += o.cells;
        self.changed += o.changed;
        self.nulls += o.nulls;
        self.clear += o.clear;
        self.unchanged_tokens += o.unchanged_tokens;
        self.chunks += o.chunks;
    }
}

/// The per-cell work of a walk, owned by its worker thread: it never
/// touches the connection, only rows already read under the chunk's lock.
struct CellWork<'a, 't> {
    t: &'t Table,
    op: Op,
    writes: bool,
    engine: Engine<'a>,
    indexers: Vec<(usize, BlindIndexer)>,
    prefixes: Vec<Vec<u8>>,
    fmt_flags: u8,
    aad: Vec<u8>,
    out: Vec<u8>,
    rid: Vec<u8>,
    /// The UPDATE's arrays carry each changed row's key and ctid (the
    /// online walk); a rewrite writes whole lines and needs only the values.
    ids_in_upd: bool,
}

impl CellWork<'_, '_> {
    /// Seals, opens or rewraps the cells of `rows` (key columns, then the
    /// selected columns, then the ctid, all as text).
    fn part<R: TextRow>(&mut self, rows: &[R]) -> Result<Part> {
        let t = self.t;
        let (op, writes) = (self.op, self.writes);
        let nk = t.key.len();
        let nb = self.indexers.len();
        let mut counts = Counts::default();
        let mut last = None;
        let mut upd: Vec<Vec<Option<String>>> = vec![Vec::new(); nk + t.cols.len() + nb + 1];
        let mut changed = Vec::new();
        let (aad, out, rid) = (&mut self.aad, &mut self.out, &mut self.rid);
        for (ri, row) in rows.iter().enumerate() {
            counts.rows += 1;
            let mut kv: Vec<String> = Vec::with_capacity(nk);
            for i in 0..nk {
                let v: Option<String> = row.text(i)?.map(str::to_string);
                kv.push(v.ok_or_else(|| {
                    Error::format(format!(
                        "row id column {:?} is NULL in a row of {}: each row needs a non-NULL id",
                        t.key[i].name, t.label
                    ))
                })?);
            }
            let place = || {
                let names: Vec<&str> = t.key.iter().map(|k| k.name.as_str()).collect();
                format!("row ({}) = ({})", names.join(", "), kv.join(", "))
            };
            let ids: Vec<&[u8]> = kv.iter().map(|s| s.as_bytes()).collect();
            let mut changed_row = false;
            let mut new_vals: Vec<Option<String>> = vec![None; t.cols.len()];
            let mut new_bidx: Vec<Option<String>> = vec![None; nb];
            for (j, col) in t.cols.iter().enumerate() {
                let v: Option<&str> = row.text(nk + j)?;
                let Some(v) = v else {
                    counts.nulls += 1;
                    continue;
                };
                counts.cells += 1;
                let cell_err = |e: Error| {
                    e.context(format!("{}, {}, column {:?}", t.label, place(), col.name))
                };
                row_binding(aad, &self.prefixes[j], &ids, rid);
                let is_token = looks_like_token(v.as_bytes());
                match (&mut self.engine, op) {
                    (Engine::Seal(s, o), _) => {
                        if is_token {
                            // Already encrypted (a re-run or resumed run):
                            // it must be this cell's token, else it was moved.
                            o.open(aad, v.as_bytes()).map_err(cell_err)?;
                            counts.unchanged_tokens += 1;
                            continue;
                        }
                        let raw;
                        let value: &[u8] = if col.bytea() {
                            raw = hex_decode(v.as_bytes()).ok_or_else(|| {
                                cell_err(Error::format("a bytea value in text form should start with \\x and hold hex digits"))
                            })?;
                            &raw
                        } else {
                            v.as_bytes()
                        };
                        for (i, (_, ix)) in self
                            .indexers
                            .iter()
                            .enumerate()
                            .filter(|(_, (c, _))| *c == j)
                        {
                            out.clear();
                            ix.index(value, out).map_err(cell_err)?;
                            new_bidx[i] = Some(ascii(out));
                        }
                        out.clear();
                        s.seal(aad, self.fmt_flags, value, out).map_err(cell_err)?;
                        new_vals[j] = Some(ascii(out));
                    }
                    (Engine::Open(o), Op::Encrypt) => {
                        // --dry-run of encrypt: what would be sealed.
                        if is_token {
                            o.open(aad, v.as_bytes()).map_err(cell_err)?;
                            counts.unchanged_tokens += 1;
                            continue;
                        }
                    }
                    (Engine::Open(o), _) => {
                        if !is_token {
                            counts.clear += 1;
                            continue;
                        }
                        let (_, value) = o.open(aad, v.as_bytes()).map_err(cell_err)?;
                        if op == Op::Decrypt {
                            let text = if col.bytea() {
                                hex_encode(value)
                            } else {
                                String::from_utf8(value.to_vec()).map_err(|_| {
                                    cell_err(Error::format(
                                        "the decrypted value is not UTF-8 text, so it cannot go into a text column (a bytea value? its column's type record is missing from hsmseal.columns)",
                                    ))
                                })?
                            };
                            new_vals[j] = Some(text);
                        } else {
                            // verify: opened, nothing written.
                            continue;
                        }
                    }
                    (Engine::Rewrap(r), _) => {
                        if !is_token {
                            counts.clear += 1;
                            continue;
                        }
                        out.clear();
                        if !r.rewrap(aad, v.as_bytes(), out).map_err(cell_err)? {
                            counts.unchanged_tokens += 1;
                            continue;
                        }
                        new_vals[j] = Some(ascii(out));
                    }
                }
                counts.changed += 1;
                changed_row = true;
            }
            if changed_row && writes {
                if self.ids_in_upd {
                    for (i, k) in kv.iter().enumerate() {
                        upd[i].push(Some(k.clone()));
                    }
                    let tid = row.text(nk + t.cols.len())?.unwrap_or_default();
                    upd[nk + t.cols.len() + nb].push(Some(tid.to_string()));
                }
                for (j, v) in new_vals.into_iter().enumerate() {
                    upd[nk + j].push(v);
                }
                for (i, v) in new_bidx.into_iter().enumerate() {
                    upd[nk + t.cols.len() + i].push(v);
                }
                changed.push(ri);
            }
            last = Some(kv);
        }
        Ok(Part {
            upd,
            changed,
            counts,
            last,
        })
    }
}

/// A row as the walk reads it: the text of its key columns (`0..k`), of
/// the selected columns (`k..k+n`), then of its ctid (`k+n`), `None` for
/// NULL: from a SELECT ([`postgres::Row`]) or a COPY line (a rewrite).
trait TextRow {
    fn text(&self, i: usize) -> Result<Option<&str>>;
}

impl TextRow for postgres::Row {
    fn text(&self, i: usize) -> Result<Option<&str>> {
        self.try_get(i).map_err(db_err("cannot read a value"))
    }
}

/// Tokens and blind indexes are base64url or hex: ASCII, so this copy
/// never loses a byte (a lossy conversion rather than a panic all the same).
fn ascii(b: &[u8]) -> String {
    // The checked conversion: a fast path for ASCII (the lossy one walked
    // every byte through its chunk iterator: 5 % of a rewrite's CPU).
    String::from_utf8(b.to_vec())
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Takes the table's session advisory lock: one writing hsmseal run per
/// table at a time; a second one waits (said on stderr) and then finds
/// nothing left to do. Released when the connection closes, also when the
/// process is killed.
fn lock_table(app: &App, c: &mut Client, label: &str) -> Result<()> {
    let key = format!("hsmseal table {label}");
    let got: bool = c
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
            &[&key],
        )
        .map_err(db_err("cannot take the table's advisory lock"))?
        .get(0);
    if !got {
        app.info(format!(
            "hsmseal: waiting for another hsmseal pg run on {label} to finish (advisory lock)"
        ));
        c.query_one("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&key])
            .map_err(db_err("cannot take the table's advisory lock"))?;
    }
    Ok(())
}

/// `--alter`: records each non-text column's type in `hsmseal.columns`
/// and changes the column to text, in one transaction (bytea as `\x` hex
/// text, which encrypt decodes back to the bytes).
fn alter_to_text(c: &mut Client, t: &Table) -> Result<()> {
    let mut tx = c.transaction().map_err(db_err("cannot begin"))?;
    tx.batch_execute("SET LOCAL bytea_output = 'hex'")
        .map_err(db_err("cannot set bytea_output"))?;
    for (name, ty) in &t.to_alter {
        tx.execute(
            "INSERT INTO hsmseal.columns (table_name, column_name, original_type, altered) VALUES ($1, $2, $3, now())",
            &[&t.label, name, ty],
        )
        .map_err(db_err("cannot record the column's type in hsmseal.columns"))?;
        tx.batch_execute(&format!(
            "ALTER TABLE {} ALTER COLUMN {} TYPE text USING {}::text",
            t.sql,
            ident(name),
            ident(name)
        ))
        .map_err(db_err(&format!("cannot change column {name:?} to text")))?;
    }
    tx.commit().map_err(db_err("cannot commit --alter"))
}

/// After a complete decrypt: columns whose type `--alter` recorded get it
/// back, if no token is left in them.
fn restore_types(app: &App, c: &mut Client, t: &Table) -> Result<()> {
    for col in &t.cols {
        let Some(ty) = &col.original else { continue };
        let mut tx = c.transaction().map_err(db_err("cannot begin"))?;
        let q = format!(
            "SELECT count(*) FROM {} WHERE {}",
            t.sql,
            token_pred(&ident(&col.name))
        );
        let left: i64 = tx
            .query_one(&q, &[])
            .map_err(db_err("cannot count tokens"))?
            .get(0);
        if left > 0 {
            app.info(format!(
                "hsmseal: column {:?} still holds {left} tokens: left as text (run pg decrypt again)",
                col.name
            ));
            continue;
        }
        let using = if col.bytea() {
            format!("decode(substr({0}, 3), 'hex')", ident(&col.name))
        } else {
            format!("{}::{ty}", ident(&col.name))
        };
        tx.batch_execute(&format!(
            "ALTER TABLE {} ALTER COLUMN {} TYPE {ty} USING {using}",
            t.sql,
            ident(&col.name)
        ))
        .map_err(db_err(&format!(
            "cannot change column {:?} back to {ty}",
            col.name
        )))?;
        tx.execute(
            "DELETE FROM hsmseal.columns WHERE table_name = $1 AND column_name = $2",
            &[&t.label, &col.name],
        )
        .map_err(db_err("cannot update hsmseal.columns"))?;
        tx.commit().map_err(db_err("cannot commit"))?;
    }
    Ok(())
}

/// SQL: the value of `col` has the shape of a token of either format
/// version ([`looks_like_token`]; `hsc1.` and `hsc2.` share their prefix
/// length and the head of their body: u8 n | key name | version).
fn token_pred(col: &str) -> String {
    debug_assert_eq!(PREFIX.len(), PREFIX_V2.len());
    format!("(length({col}) >= {MIN_TOKEN_LEN} AND {col} ~ '^hsc[12]\\.[A-Za-z0-9_-]*$')")
}

fn progress_bar(app: &App, c: &mut Client, t: &Table) -> Result<Option<indicatif::ProgressBar>> {
    if app.quiet || app.json || !std::io::stderr().is_terminal() {
        return Ok(None);
    }
    let n: i64 = c
        .query_one(&format!("SELECT count(*) FROM {}", t.sql), &[])
        .map_err(db_err("cannot count rows"))?
        .get(0);
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(n as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {elapsed_precise} [{wide_bar}] {pos}/{len} rows {per_sec} ETA {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.enable_steady_tick(Duration::from_millis(200));
    Ok(Some(pb))
}

// ---- status ----------------------------------------------------------------

/// `pg status`: per column, NULLs, clear values and tokens per key version
/// and token format version, counted by the server (nothing decrypted, no
/// HSM call, nothing written).
fn status(app: &App, a: &PgArgs) -> Result<i32> {
    check_args(a)?;
    let mut client = connect(&a.dsn)?;
    let args = a.clone();
    let t = Table::load(&mut client, &args, false)?;
    for col in &t.cols {
        let cc = count_column(&mut client, &t, &col.name)?;
        if app.json {
            let mut m = cc.to_json();
            m.insert("table".into(), t.label.clone().into());
            m.insert("column".into(), col.name.clone().into());
            m.insert("original_type".into(), serde_json::json!(col.original));
            crate::report::emit("pg_column", &m);
        } else {
            crate::report::print_line(format_args!(
                "{}.{}: {}{}",
                t.label,
                col.name,
                cc.summary(),
                match &col.original {
                    Some(ty) => format!(", was {ty}"),
                    None => String::new(),
                }
            ));
        }
        for k in cc.key_refs() {
            app.stats.add_key(k);
        }
    }
    if !app.json {
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
    Ok(0)
}

/// NULLs, clear values, malformed tokens and tokens per key version of one
/// column, counted by the server from the token headers (no HSM call); the
/// same counts `columns inspect` gives for a dump.
fn count_column(client: &mut Client, t: &Table, name: &str) -> Result<ColumnCounts> {
    let c = ident(name);
    // Clear: no token prefix; malformed: the prefix without a token's
    // shape (decrypt would refuse it), as `columns inspect` counts.
    let counts = client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE {c} IS NULL),
                        count(*) FILTER (WHERE {c} IS NOT NULL AND left({c}::text, {n}) NOT IN ('{p1}', '{p2}')),
                        count(*) FILTER (WHERE left({c}::text, {n}) IN ('{p1}', '{p2}') AND NOT {p}),
                        count(*) FROM {}",
                t.sql,
                n = PREFIX.len(),
                p1 = String::from_utf8_lossy(PREFIX),
                p2 = String::from_utf8_lossy(PREFIX_V2),
                p = token_pred(&format!("{c}::text"))
            ),
            &[],
        )
        .map_err(db_err(&format!("cannot count {}", t.label)))?;
    let (nulls, clear, malformed, total): (i64, i64, i64, i64) =
        (counts.get(0), counts.get(1), counts.get(2), counts.get(3));
    // The head of the body (u8 n | key name | version: u32be in v1, a
    // minimal LEB128 varint in v2), decoded from the base64 after the
    // prefix by the server: the first 4 * ceil((6 + n) / 3) characters
    // hold the 6 + n bytes the longest v1 or v2 version needs. A value too
    // short for them, or with a malformed version, counts as malformed
    // (version -1), as `columns inspect` counts it. The key name comes
    // back as bytes: the server's convert_from() would fail the whole count
    // on one name that is not UTF-8, where inspect counts that value as
    // malformed (decoded and checked below, as `token::key_ref_prefix` does).
    let q = format!(
        "WITH h AS (
           SELECT CASE WHEN n BETWEEN 1 AND 64 AND length(v) >= {p0} + 4 * ((6 + n + 2) / 3)
                       THEN decode(translate(substr(v, {s}, 4 * ((6 + n + 2) / 3)), '-_', '+/'), 'base64') END AS b,
                  n, substr(v, 4, 1)::int AS f
             FROM (SELECT {c}::text AS v,
                          get_byte(decode(translate(substr({c}::text, {s}, 4), '-_', '+/'), 'base64'), 0) AS n
                     FROM {} WHERE {p}) x)
         SELECT CASE WHEN b IS NULL THEN ''::bytea ELSE substring(b FROM 2 FOR n) END,
                CASE WHEN b IS NULL THEN -1
                     WHEN f = 1 THEN (get_byte(b, 1 + n)::int8 << 24) + (get_byte(b, 2 + n) << 16) + (get_byte(b, 3 + n) << 8) + get_byte(b, 4 + n)
                     ELSE {varint} END,
                f, count(*)
           FROM h GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        t.sql,
        s = PREFIX.len() + 1,
        p0 = PREFIX.len(),
        p = token_pred(&format!("{c}::text")),
        varint = sql_varint("b", "1 + n")
    );
    let by_key = client
        .query(&q, &[])
        .map_err(db_err(&format!("cannot count the tokens of {}", t.label)))?;
    // The same counts, JSON and line as `columns inspect` (FORMAT §8).
    let mut cc = ColumnCounts {
        rows: total as u64,
        nulls: nulls as u64,
        clear: clear as u64,
        malformed: malformed as u64,
        ..Default::default()
    };
    for r in &by_key {
        let (name, version, tv, n): (Vec<u8>, i64, i32, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        // A name inspect would refuse (not UTF-8, or not a valid key name):
        // malformed, as it counts it.
        let name = String::from_utf8(name)
            .ok()
            .filter(|s| hsmseal::backend::validate_key_name(s).is_ok());
        let (Some(name), Ok(version), Ok(tv)) = (name, u32::try_from(version), u8::try_from(tv))
        else {
            cc.malformed += n as u64;
            continue;
        };
        *cc.keys.entry((name, version, tv)).or_default() += n as u64;
    }
    Ok(cc)
}

/// SQL: the unsigned LEB128 varint at byte offset `at` of bytea `b` as an
/// int8, or -1 if it is longer than 5 bytes or not minimal (a last byte of
/// 0 after the first): the rule of `token::get_varint` (a value over
/// u32 is refused by the caller's conversion).
fn sql_varint(b: &str, at: &str) -> String {
    let byte = |i: usize| format!("get_byte({b}, {at} + {i})::int8");
    let mut sql = String::from("CASE");
    for last in 0..5 {
        let mut value = String::new();
        for i in 0..=last {
            if i > 0 {
                value.push_str(" + ");
            }
            value.push_str(&format!("(({} & 127) << {})", byte(i), 7 * i));
        }
        let minimal = if last == 0 {
            "TRUE".to_string()
        } else {
            format!("{} <> 0", byte(last))
        };
        sql.push_str(&format!(
            " WHEN {} < 128 THEN CASE WHEN {minimal} THEN {value} ELSE -1 END",
            byte(last)
        ));
    }
    sql.push_str(" ELSE -1 END");
    sql
}

/// The decrypt limits of hsmseal.toml ([limits.KEY]), charged before any
/// value is decrypted: each key its tokens in the selected columns (cells)
/// and the bytes of all their tokens (an upper bound of the plaintext, as
/// `columns decrypt` charges the whole dump). Over a limit: exit 2, nothing
/// written.
fn charge_limits(client: &mut Client, t: &Table, guard: &hsmseal::guard::Guard) -> Result<()> {
    let mut cells: std::collections::BTreeMap<String, u64> = Default::default();
    let mut bytes = 0u64;
    for col in &t.cols {
        let cc = count_column(client, t, &col.name)?;
        for ((name, _, _), n) in &cc.keys {
            *cells.entry(name.clone()).or_default() += n;
        }
        let c = ident(&col.name);
        let row = client
            .query_one(
                &format!(
                    "SELECT coalesce(sum(octet_length({c}::text)), 0)::int8 FROM {} WHERE {}",
                    t.sql,
                    token_pred(&format!("{c}::text"))
                ),
                &[],
            )
            .map_err(db_err(&format!("cannot count {}", t.label)))?;
        bytes += row.get::<_, i64>(0) as u64;
    }
    for (key, n) in cells {
        guard.charge(
            &key,
            hsmseal::guard::Usage {
                cells: n,
                bytes,
                ..Default::default()
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_binding_differs_from_single_and_by_split() {
        let pre = binding_prefix("s.t", &ColumnId::Name("c".into()));
        let (mut a, mut b, mut c, mut rid) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        row_binding(&mut a, &pre, &[b"1"], &mut rid);
        let mut d = Vec::new();
        token::binding(&mut d, &pre, Some(b"1"));
        assert_eq!(a, d, "one key column binds as --row-id COL does");
        row_binding(&mut b, &pre, &[b"1", b"23"], &mut rid);
        row_binding(&mut c, &pre, &[b"12", b"3"], &mut rid);
        assert_ne!(b, c);
        assert_eq!(&b[pre.len()..pre.len() + 2], &[2, 2]);
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(hex_decode(b"\\x00ff10").unwrap(), vec![0, 255, 16]);
        assert_eq!(hex_encode(&[0, 255, 16]), "\\x00ff10");
        assert!(hex_decode(b"00ff").is_none());
        assert!(hex_decode(b"\\x0").is_none());
        assert!(hex_decode(b"\\xzz").is_none());
    }

    #[test]
    fn pgpass_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pgpass");
        std::fs::write(
            &p,
            "# c\nother:*:*:*:no\n127.0.0.1:5432:db:u\\:x:pw\\:1\n*:*:*:*:any\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::env::set_var("PGPASSFILE", &p);
        assert_eq!(
            pgpass("127.0.0.1", 5432, "db", "u:x").as_deref(),
            Some("pw:1")
        );
        assert_eq!(pgpass("h", 1, "d", "u").as_deref(), Some("any"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            pgpass("h", 1, "d", "u"),
            None,
            "a world-readable passfile is ignored"
        );
        std::env::remove_var("PGPASSFILE");
    }
}
