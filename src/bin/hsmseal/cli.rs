//! Command-line definitions (clap derive). No logic lives here: each
//! subcommand's arguments are turned into work by `crate::commands`.
//!
//! This file imports nothing from the rest of the binary (only clap, std and
//! the `hsmseal` library), so `examples/gen-docs.rs` and the tests include
//! it with `#[path]` to generate and check the help, completions and man
//! pages from the very definitions the binary parses.
//!
//! There is deliberately no flag that takes a PIN value: command lines are
//! visible to other users in `ps` and kept in shell history.
//!
//! Environment variables are declared with clap's `env` attribute, so
//! `--help` lists them from the definition itself. The binary keeps only the
//! values given on the command line as flags and lets `config` resolve the
//! rest (environment, then hsmseal.toml, then default), so `config show`
//! can say where each value came from (see `main.rs`).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    some items of a bulk run failed (each is reported)
  2    usage or configuration error (bad flags, refused overwrite, -r DIR with nothing to process)
  3    authentication failed: data tampered, truncated, reordered or wrongly keyed
  4    key error: key or version not found, disabled or destroyed, or its attributes are too weak
  5    token error: PKCS#11 module or token not found or failing
  6    PIN error: wrong or missing PIN (a wrong PIN is never retried)
  7    I/O error
  8    input is not in the expected format
  9    the work was done, but its audit entry could not be written (e.g. full disk)
  130  interrupted by SIGINT (143: SIGTERM); temporary files are removed
  141  stdout was closed by its reader (e.g. `| head`); stopped quietly";

#[derive(Parser, Debug)]
#[command(
    name = "hsmseal",
    version,
    about = "Envelope encryption at rest with key-wrapping keys held in a PKCS#11 HSM",
    long_about = "Envelope encryption at rest with key-wrapping keys held in a PKCS#11 HSM.\n\n\
Every file gets its own random data key; data keys are wrapped by a key that never leaves the HSM.\n\
Settings come from flags, then HSMSEAL_* environment variables, then hsmseal.toml\n\
(in the working directory or at HSMSEAL_CONFIG). The PIN comes from HSMSEAL_PIN,\n\
--pin-file, or a prompt on a terminal; never from the command line.",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// The heading the global options are listed under in every `--help`.
pub const GLOBAL_HEADING: &str = "Global options";

/// Options every command takes (before or after the subcommand's name).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = GLOBAL_HEADING)]
pub struct GlobalArgs {
    /// PKCS#11 module (shared library)
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "HSMSEAL_PKCS11_MODULE",
        hide_env_values = true
    )]
    pub module: Option<PathBuf>,
    /// Token label, or an RFC 7512 pkcs11: URI to tell tokens apart, e.g. 'pkcs11:token=prod;serial=1a2b3c' (token, serial, manufacturer, model, slot-id; no PIN)
    #[arg(
        long,
        global = true,
        value_name = "LABEL|URI",
        env = "HSMSEAL_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// File holding the token PIN (the PIN itself: HSMSEAL_PIN, or a prompt)
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "HSMSEAL_PIN_FILE",
        hide_env_values = true
    )]
    pub pin_file: Option<PathBuf>,
    /// JSON lines, each an object with a "type" (item, summary, error, ...), on stdout (stderr when the data goes to stdout)
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress or informational messages on stderr
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Workers: files processed at once, each with its own HSM session; a single file's payload uses N threads (default: number of cores; for `pg` writing runs, key ranges on their own connections, default 2)
    #[arg(long, short = 'j', global = true, value_name = "N", env = "HSMSEAL_JOBS", hide_env_values = true, value_parser = parse_jobs)]
    pub jobs: Option<usize>,
    /// Append an audit entry for this run to this log
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "HSMSEAL_AUDIT_LOG",
        hide_env_values = true
    )]
    pub audit_log: Option<PathBuf>,
}

/// `--jobs` / `HSMSEAL_JOBS`: a positive whole number. The message names
/// both, since the value may come from either.
fn parse_jobs(s: &str) -> std::result::Result<usize, String> {
    s.parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| "not a positive whole number (from --jobs or HSMSEAL_JOBS)".to_string())
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a local SoftHSM2 token and hsmseal.toml to try hsmseal out
    ///
    /// Writes DIR/softhsm2.conf, DIR/tokens/, DIR/user-pin and DIR/so-pin (0600)
    /// and ./hsmseal.toml. This is a software token: for development only.
    #[command(after_help = EX_INIT)]
    Init(InitArgs),
    /// Create, rotate, disable, destroy and purge key-wrapping keys in the HSM (never touches files)
    #[command(subcommand, after_help = EX_KEY)]
    Key(KeyCommand),
    /// Encrypt files (or stdin) under a key held in the HSM
    ///
    /// Writes INPUT.hseal next to each input (or -o OUT, or stdout for stdin;
    /// --output-dir DIR mirrors the tree under DIR). Each file gets a fresh data
    /// key, wrapped by the HSM key. The input is never modified (--in-place
    /// removes it only once its ciphertext is durable and decrypts back to it).
    /// Files that already are hsmseal files are skipped and reported.
    ///
    /// Bulk runs (-r DIR, several inputs): --jobs workers, each with its own HSM
    /// session; a progress bar on a terminal (stderr); with --json one line per
    /// item, in input order, then a {"type":"summary", ...} line. A failed item is
    /// reported and the run goes on, then exits 1.
    #[command(after_help = EX_ENCRYPT)]
    Encrypt(EncryptArgs),
    /// Decrypt hsmseal files (or stdin)
    ///
    /// Writes INPUT without its .hseal suffix (or -o OUT, or stdout), mode 0600.
    /// A file output appears only once the whole input has authenticated;
    /// stdout receives only authenticated chunks and the exit code is non-zero at the first failure.
    /// Under -r DIR only hsmseal files are taken. Bulk runs, --output-dir and
    /// --in-place work as for encrypt.
    #[command(after_help = EX_DECRYPT)]
    Decrypt(DecryptArgs),
    /// Authenticate hsmseal files completely; writes nothing, prints nothing secret
    ///
    /// Under -r DIR only hsmseal files are taken. Bulk runs work as for encrypt.
    #[command(after_help = EX_VERIFY)]
    Verify(VerifyArgs),
    /// Show format version, key name and version, and sizes (no HSM access, no secrets)
    ///
    /// With -r DIR, summarise which key versions the files under DIR depend on
    /// (what a `key purge` would make unreadable). With --deps, also count the
    /// column tokens in dumps, plain or sealed (sealed ones are decrypted in
    /// memory, which needs the HSM). Changes nothing.
    #[command(after_help = EX_INSPECT)]
    Inspect(InspectArgs),
    /// Rewrap files' data keys under the current key version, in place
    ///
    /// Changes on disk: only the 1024-byte header of each file that is not
    /// already on the current version; the payload is neither read nor moved,
    /// so any file is rewrapped in the same time. A file already on the
    /// current version is reported unchanged from its header alone (no HSM
    /// call; not authenticated: `verify` does that). Crash-safe: killed at any
    /// point, each file decrypts under the old or the new version. With
    /// --reencrypt, a new data key and payload replace the file atomically.
    /// Changes in the HSM: none. Files that fail authentication are left
    /// untouched and reported; the run goes on and exits 1.
    ///
    /// `rotate` is another name for this command (its earlier name; Vault
    /// calls the operation rewrap). `key rotate` is what rotates a key.
    #[command(visible_alias = "rotate", after_help = EX_REWRAP)]
    Rewrap(RewrapArgs),
    /// Report the PKCS#11 module, token, mechanisms and key attributes
    #[command(after_help = EX_DOCTOR)]
    Doctor,
    /// Show resolved settings
    #[command(subcommand, after_help = EX_CONFIG)]
    Config(ConfigCommand),
    /// Encrypt, decrypt or rewrap selected columns of CSV, TSV, JSONL or PostgreSQL COPY dumps
    #[command(subcommand, after_help = EX_COLUMNS)]
    Columns(ColumnsCommand),
    /// Set up and check the tamper-evident audit log
    #[command(subcommand, after_help = EX_AUDIT)]
    Audit(AuditCommand),
    /// Encrypt, decrypt, rotate, verify or count selected columns of a PostgreSQL table in place
    ///
    /// Walks the table in primary-key order in short transactions (chunks),
    /// keeping its place in hsmseal.progress: a killed run resumes where it
    /// stopped, and a re-run changes nothing twice. Writing runs walk
    /// --jobs key ranges at once (default 2), each on its own connection
    /// with its own cursor; --atomic walks them in one transaction. Tokens are those of
    /// `columns --format pgcopy --context SCHEMA.TABLE --row-id PK` on a
    /// COPY dump of the table. The password comes from PGPASSWORD or
    /// ~/.pgpass (PGPASSFILE), never from --dsn.
    #[command(subcommand, after_help = EX_PG)]
    Pg(PgCommand),
}

#[derive(Debug, clap::Subcommand)]
pub enum PgCommand {
    /// Encrypt the selected columns: each non-NULL value becomes a token.
    #[command(after_help = EX_PG_ENCRYPT)]
    Encrypt(PgEncryptArgs),
    /// Decrypt the tokens in the selected columns (and restore the types
    /// --alter recorded once no token is left).
    #[command(after_help = EX_PG_DECRYPT)]
    Decrypt(PgDecryptArgs),
    /// Rewrap tokens to the current version of their key (or of --key);
    /// tokens already there are left alone.
    #[command(after_help = EX_PG_ROTATE)]
    Rotate(PgRotateArgs),
    /// Check that every token in the selected columns opens; writes nothing.
    #[command(after_help = EX_PG_VERIFY)]
    Verify(PgArgs),
    /// Count, per column, NULLs, clear values and tokens per key version
    /// (no HSM call, writes nothing).
    #[command(after_help = EX_PG_STATUS)]
    Status(PgArgs),
}

/// What every `pg` subcommand shares.
#[derive(Debug, Clone, clap::Args)]
pub struct PgArgs {
    /// The database: a URL (postgresql://user@host:port/db?sslmode=disable)
    /// or libpq key=value string, without a password (refused: see
    /// PGPASSWORD, ~/.pgpass). Missing parts come from PGHOST, PGPORT,
    /// PGUSER, PGDATABASE. No TLS: sslmode=prefer connects without it,
    /// sslmode=require fails.
    #[arg(
        long,
        env = "HSMSEAL_PG_DSN",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub dsn: String,
    /// The table, as SCHEMA.TABLE.
    #[arg(long, value_name = "SCHEMA.TABLE")]
    pub table: String,
    /// Columns to process (text columns; see --alter).
    #[arg(long, short = 'c', value_delimiter = ',', required = true)]
    pub columns: Vec<String>,
    /// Bound into every token. Default: SCHEMA.TABLE.
    #[arg(long)]
    pub context: Option<String>,
    /// Bind tokens to these columns instead of the primary key (needed for
    /// a table without one; they need a unique index).
    #[arg(long, value_delimiter = ',', value_name = "COL")]
    pub row_id: Vec<String>,
    /// Rows per chunk (one short transaction each), 1 to 1000000.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub chunk_rows: u32,
    /// One transaction for the whole table instead of one per chunk.
    #[arg(long)]
    pub atomic: bool,
    /// encrypt, decrypt, rotate: rewrite the whole table offline, in one
    /// transaction (about 2x faster; no dead row versions left)
    ///
    /// Takes an ACCESS EXCLUSIVE lock (readers and writers wait), COPYs the
    /// table into an encrypted scratch file in TMPDIR, TRUNCATEs it and
    /// COPYs the rows back with their cells changed; any error or kill
    /// rolls it all back. Refused for tables with triggers, rules,
    /// row-level security, inheritance or partitions, or that a foreign
    /// key references. TRUNCATE is not MVCC-safe: a REPEATABLE READ
    /// transaction older than the COMMIT (pg_dump's) that reads the table
    /// afterwards sees it empty; do not run it while a backup starts.
    #[arg(long)]
    pub rewrite: bool,
    /// encrypt: change selected columns that are not text to text first,
    /// recording their type in hsmseal.columns (pg decrypt restores it).
    /// Without it such a column is an error.
    #[arg(long)]
    pub alter: bool,
    /// Count what would change; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, clap::Args)]
pub struct PgEncryptArgs {
    #[command(flatten)]
    pub target: PgArgs,
    /// Key (KWK) name; default from the configuration.
    #[arg(long, short = 'k', env = "HSMSEAL_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Also write a blind index (a keyed, truncated hash) of COL's
    /// plaintext into column TARGET (default COL_bidx), in the same UPDATE
    /// as the token, for equality lookups (see `hsmseal columns index`,
    /// with --context SCHEMA.TABLE). COL must be one of --columns; a missing
    /// TARGET is added as text with --alter (without it: an error). Values
    /// that already are tokens keep their index. Repeatable. Equal values
    /// get equal indexes: read docs/SECURITY.md, "Blind indexes: what they
    /// leak".
    #[arg(long, value_name = "COL[=TARGET]")]
    pub blind_index: Vec<String>,
    /// Blind-index length in bits: a multiple of 8 from 16 to 256.
    #[arg(long, value_name = "N", default_value_t = hsmseal::columns::blind_index::DEFAULT_BITS)]
    pub blind_index_bits: u16,
    /// How values are normalised before their blind index is computed.
    #[arg(long, value_enum, value_name = "MODE", default_value = "none")]
    pub blind_index_normalize: NormalizeArg,
}

#[derive(Debug, clap::Args)]
pub struct PgDecryptArgs {
    #[command(flatten)]
    pub target: PgArgs,
    /// Decrypt even past the per-key limits of hsmseal.toml [limits.KEY]
    /// (the audit entry records the override)
    #[arg(long)]
    pub override_limits: bool,
}

#[derive(Debug, clap::Args)]
pub struct PgRotateArgs {
    #[command(flatten)]
    pub target: PgArgs,
    /// Move tokens to this key's current version (default: each token's own key).
    #[arg(long, short = 'k')]
    pub key: Option<String>,
}

/// The audit log (--audit-log, HSMSEAL_AUDIT_LOG or audit_log in
/// hsmseal.toml): one HSM-authenticated, hash-chained JSON line per run of a
/// command that touches keys or data (docs/FORMAT.md section 7).
#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Create the audit HMAC key in the HSM (if absent) and start the log
    ///
    /// Changes in the HSM: creates one 32-byte generic secret key labelled
    /// hsmseal-audit-hmac (sensitive, never extractable, sign/verify with
    /// CKM_SHA256_HMAC only) unless it exists; creates or updates the log's
    /// head record (a CKO_DATA object) when it appends.
    ///
    /// Changes on disk: appends an `audit init` entry to the configured log,
    /// if one is configured (a missing or empty log starts afresh).
    #[command(after_help = EX_AUDIT_INIT)]
    Init,
    /// Check a log: chain, MACs (in the HSM) and the HSM head record
    ///
    /// Reports the first edited, deleted, inserted, reordered or truncated
    /// entry and exits 3; exits 0 with "N entries, chain intact, head matches
    /// the HSM" otherwise; 4 if the token has no audit key. Changes nothing.
    #[command(after_help = EX_AUDIT_VERIFY)]
    Verify {
        /// The log (default: the configured audit log)
        log: Option<PathBuf>,
    },
    /// Summarise what was decrypted: items, cells and bytes per user, host, key and command
    ///
    /// Verifies the log first (as `audit verify`: exit 3 if it is not
    /// intact), then sums the decrypt runs (decrypt, columns decrypt, pg
    /// decrypt) of the last DURATION. A run naming several keys counts in
    /// full under each. Runs that used --override-limits are listed.
    /// With --alert-over N, exits 1 if any user on one host decrypted more
    /// than N items and cells together, all keys (for cron or CI). Changes
    /// nothing.
    #[command(after_help = EX_AUDIT_REPORT)]
    Report {
        /// The log (default: the configured audit log)
        log: Option<PathBuf>,
        /// Window: a whole number and a unit, s m h d or w (24h, 7d)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "24h")]
        since: u64,
        /// Exit 1 if a user on one host decrypted more than N items and cells
        /// together in the window
        #[arg(long, value_name = "N")]
        alert_over: Option<u64>,
    },
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Create a SoftHSM2 development token (the only mode today)
    #[arg(long, required = true)]
    pub dev: bool,
    /// Directory for the token, its config and PIN files
    #[arg(default_value = ".hsmseal")]
    pub dir: PathBuf,
    /// Token label
    #[arg(long = "label", default_value = "hsmseal-dev")]
    pub label: String,
    /// Overwrite an existing hsmseal.toml
    #[arg(long)]
    pub force: bool,
}

/// Key lifecycle commands. None of them reads or writes a file: they change
/// (or describe) key objects in the HSM only. Each says what it changed.
#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Create version 1 of a new key-wrapping key inside the HSM
    ///
    /// Changes in the HSM: creates one AES-256 secret key object on the token:
    /// sensitive, never extractable, encrypt/decrypt only (no wrap/unwrap),
    /// CKM_AES_GCM only; its CKA_ID records its creation time.
    ///
    /// Changes on disk: none.
    #[command(after_help = EX_KEY_CREATE)]
    Create {
        /// Key name: 1-64 characters from A-Z a-z 0-9 . _ -
        name: String,
        /// Make it backup-capable: extractable, but only wrapped by a key the
        /// token's security officer marked trusted (`key backup`); still
        /// sensitive. Versions made by `key rotate` keep this
        #[arg(long)]
        backup: bool,
        /// Key type: aes (AES-256, the default), rsa-oaep (an RSA key pair:
        /// the private key decrypt-only in the HSM, the public key exported
        /// with `key export-public` for `encrypt --recipient`) or ec-p256 (a
        /// P-256 key pair, the private key derive-only (ECDH), exported the
        /// same way)
        #[arg(long = "type", value_name = "TYPE", default_value = "aes", value_parser = ["aes", "rsa-oaep", "ec-p256"])]
        key_type: String,
        /// RSA modulus size for --type rsa-oaep: 3072 or 4096
        #[arg(long, value_name = "BITS", default_value_t = 3072, value_parser = clap::builder::TypedValueParser::map(clap::builder::PossibleValuesParser::new(["3072", "4096"]), |s: String| s.parse::<u64>().unwrap_or(3072)))]
        bits: u64,
    },
    /// Write the recipient file of an rsa-oaep or ec-p256 key to stdout
    ///
    /// The recipient file (docs/FORMAT.md section 3.4: name, version,
    /// algorithm, OAEP hash, public key, fingerprint) is not secret: hosts
    /// with it run `hsmseal encrypt --recipient FILE` without the token or
    /// PIN. Changes in the HSM and on disk: none.
    #[command(name = "export-public", after_help = EX_KEY_EXPORT_PUBLIC)]
    ExportPublic {
        /// Key name
        name: String,
        /// Key version (default 1)
        #[arg(long, value_name = "N")]
        version: Option<u32>,
    },
    /// Create version N+1 of a key and make it the one new encryptions use
    ///
    /// Changes in the HSM: creates one new key object (same attributes as
    /// `key create`), numbered one above the highest version ever issued.
    /// Older versions stay on the token, decrypt-only.
    ///
    /// Changes on disk: none; existing files stay under their old version until
    /// `hsmseal rewrap` rewraps them.
    ///
    /// With --if-older-than DURATION (for a nightly job): rotates only if
    /// the current version was created at or before now - DURATION, or the
    /// key has no usable current version, or its creation time is unknown;
    /// says which, and exits 0 either way (--json: "rotated": true/false).
    #[command(after_help = EX_KEY_ROTATE)]
    Rotate {
        /// Key name
        name: String,
        /// Rotate only if the current version is at least this old: a whole
        /// number and a unit, s m h d or w (30d, 12h, 2w)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        if_older_than: Option<u64>,
        /// Make the new version backup-capable (see `key create --backup`);
        /// without it, it is backup-capable if the newest version is
        #[arg(long)]
        backup: bool,
    },
    /// List hsmseal keys on the token: every version with its state and creation time
    ///
    /// States: active (the current version, used by new encryptions),
    /// decrypt-only (older versions), disabled (`key disable`: the HSM refuses
    /// it), destroyed (`key destroy`/`key purge`: gone). Changes nothing.
    #[command(after_help = EX_KEY_LIST)]
    List,
    /// Show every version of a key with its state, creation time and attributes
    ///
    /// Changes nothing. --json adds each version's PKCS#11 attributes.
    #[command(after_help = EX_KEY_INFO)]
    Info {
        /// Key name
        name: String,
    },
    /// Disable one version: the HSM refuses to encrypt or decrypt with it
    ///
    /// Changes in the HSM: sets CKA_ENCRYPT and CKA_DECRYPT of that version's
    /// key object to false; the token itself then refuses it, for hsmseal and
    /// every other client. Data under it cannot be decrypted until
    /// `key enable`. If it was the current version, new encryptions use the
    /// highest remaining enabled version (none: encryption fails).
    ///
    /// Changes on disk: none.
    #[command(after_help = EX_KEY_DISABLE)]
    Disable {
        /// Key name
        name: String,
        /// Version to disable
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        version: u32,
    },
    /// Re-enable a version turned off by `key disable`
    ///
    /// Changes in the HSM: sets CKA_ENCRYPT and CKA_DECRYPT of that version's
    /// key object back to true.
    ///
    /// Changes on disk: none.
    #[command(after_help = EX_KEY_ENABLE)]
    Enable {
        /// Key name
        name: String,
        /// Version to enable
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        version: u32,
    },
    /// Destroy one version for good (crypto-shredding); irreversible
    ///
    /// Changes in the HSM: deletes that version's key object from the token
    /// (C_DestroyObject). Everything encrypted under it — files, column
    /// values, every backup copy — can never be decrypted again. Destroying
    /// the newest version also stores a small CKO_DATA record of its number
    /// so version numbers are never reused.
    ///
    /// Changes on disk: none. Requires --yes; the current version also --force.
    #[command(after_help = EX_KEY_DESTROY)]
    Destroy {
        /// Key name
        name: String,
        /// Version to destroy
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        version: u32,
        /// Confirm: destroy it
        #[arg(long)]
        yes: bool,
        /// Allow destroying the current version (new encryptions use it)
        #[arg(long)]
        force: bool,
        /// Refuse if data under PATH (files, or trees, searched like
        /// `inspect --deps`) still needs this version
        #[arg(long, value_name = "PATH", num_args = 1..)]
        check: Vec<PathBuf>,
    },
    /// Retention: destroy every non-current version created before a cutoff
    ///
    /// Changes in the HSM: deletes the key object of every version that is not
    /// the current one and was created at or before now - DURATION; data
    /// still under those versions becomes unreadable everywhere, backups
    /// included (crypto-shredding). Spared: the current version, newer
    /// versions, and versions whose creation time is unknown.
    ///
    /// With --check PATH..., the files and trees named are searched first
    /// (as `inspect --deps` does: file envelopes, and column tokens in plain
    /// and sealed dumps): a version still needed there is spared and the
    /// run exits 1; if any file there cannot be read, nothing is destroyed.
    ///
    /// Changes on disk: none. Requires --yes unless --dry-run.
    #[command(after_help = EX_KEY_PURGE)]
    Purge {
        /// Key name
        name: String,
        /// Age limit: a whole number and a unit, s m h d or w (400d, 12h, 2w)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        older_than: u64,
        /// Report what would be destroyed; change nothing
        #[arg(long)]
        dry_run: bool,
        /// Confirm: destroy them
        #[arg(long)]
        yes: bool,
        /// Spare every version that data under PATH still needs (files or
        /// trees, searched like `inspect --deps`)
        #[arg(long, value_name = "PATH", num_args = 1..)]
        check: Vec<PathBuf>,
    },
    /// Backup ceremony, on the recovery token: make a transport key to receive backups
    ///
    /// Changes in the HSM: generates an RSA-3072 key pair; the private key
    /// stays on this token (sensitive, never extractable, CKA_UNWRAP only,
    /// labelled hsmseal-transport:NAME). Changes on disk: writes the public
    /// key to FILE (a text file with its fingerprint; not secret).
    #[command(name = "backup-target", after_help = EX_KEY_BACKUP)]
    BackupTarget {
        /// Transport key name
        name: String,
        /// Public key file to write (must not exist)
        #[arg(long, short = 'o', value_name = "FILE")]
        output: PathBuf,
    },
    /// Backup ceremony, on the source token, as its security officer: trust a transport key
    ///
    /// Changes in the HSM: imports the public key in FILE as a CKA_TRUSTED,
    /// wrap-only public key object. Only the security officer can set
    /// CKA_TRUSTED: the SO PIN comes from HSMSEAL_SO_PIN or --so-pin-file,
    /// never the command line. Changes on disk: none.
    #[command(name = "backup-trust", after_help = EX_KEY_BACKUP)]
    BackupTrust {
        /// Transport public key file (from `key backup-target`)
        file: PathBuf,
        /// File holding the security officer PIN (else HSMSEAL_SO_PIN)
        #[arg(long, value_name = "FILE")]
        so_pin_file: Option<PathBuf>,
    },
    /// Backup ceremony, on the source token: wrap a key version for the recovery token
    ///
    /// Wraps the version (default: the current one) and its key-derivation
    /// key under the trusted transport key (C_WrapKey, RSA-OAEP); the token
    /// refuses unless the key was made with --backup and the transport key
    /// is trusted. Changes in the HSM: none. Changes on disk: writes the
    /// backup file (mode 0600, atomically); it opens only on the token
    /// holding the transport private key.
    #[command(after_help = EX_KEY_BACKUP)]
    Backup {
        /// Key name
        name: String,
        /// Version to back up (default: the current version)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        version: Option<u32>,
        /// Transport public key file (from `key backup-target`)
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// Backup file to write (must not exist)
        #[arg(long, short = 'o', value_name = "FILE")]
        output: PathBuf,
    },
    /// Backup ceremony, on the recovery token: restore a key version from a backup file
    ///
    /// Changes in the HSM: unwraps the key version and its key-derivation
    /// key with the transport private key into objects with the same labels
    /// and IDs (not extractable unless --backup), after checking them
    /// against the file; refuses a version that already exists here.
    /// Changes on disk: none.
    #[command(after_help = EX_KEY_BACKUP)]
    Restore {
        /// Backup file (from `key backup`)
        file: PathBuf,
        /// Keep the restored version backup-capable (to copy it on again)
        #[arg(long)]
        backup: bool,
    },
}

#[derive(Args, Debug)]
pub struct EncryptArgs {
    /// Key to encrypt under (default: default_key from hsmseal.toml); give
    /// it several times for a file that opens under any of the keys
    /// (format v2, one key slot per key)
    #[arg(long, short = 'k', env = "HSMSEAL_KEY", hide_env_values = true)]
    pub key: Vec<String>,
    /// Encrypt to every key of [groups.NAME] in hsmseal.toml (format v2)
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Encrypt to the rsa-oaep or ec-p256 key in this recipient file (from `hsmseal
    /// key export-public`), repeatable; with recipients only, no PKCS#11
    /// module, token or PIN is used (format v2)
    #[arg(long, value_name = "FILE")]
    pub recipient: Vec<PathBuf>,
    #[command(flatten)]
    pub io: OutputArgs,
}

#[derive(Args, Debug)]
pub struct DecryptArgs {
    #[command(flatten)]
    pub io: OutputArgs,
    /// Decrypt even past the per-key limits of hsmseal.toml [limits.KEY]
    /// (the audit entry records the override)
    #[arg(long)]
    pub override_limits: bool,
}

/// Inputs and where their outputs go, shared by encrypt and decrypt.
#[derive(Args, Debug, Clone, Default)]
pub struct OutputArgs {
    /// Output file ("-" for stdout); only with a single input
    #[arg(long, short = 'o', value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Write outputs under DIR, mirroring each input's path relative to its
    /// -r directory (a file named directly goes to DIR/NAME); directories are
    /// created as needed
    #[arg(long, value_name = "DIR", conflicts_with = "output")]
    pub output_dir: Option<PathBuf>,
    /// Replace each input by its output: the original is removed only after the
    /// output is written, fsynced and read back and checked against it; a
    /// failing item keeps its original
    #[arg(long, conflicts_with_all = ["output", "output_dir"])]
    pub in_place: bool,
    /// Overwrite an existing output, if it is a regular file (a symbolic link
    /// to one: its target). A FIFO or character device (/dev/null) is written
    /// into without --force; nothing else is ever replaced
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Input files ("-" or none for stdin)
    pub inputs: Vec<PathBuf>,
}

/// Which files a bulk run takes, shared by the file commands.
#[derive(Args, Debug, Clone, Default)]
pub struct SelectArgs {
    /// Every file under this directory, recursively (repeatable). Symbolic
    /// links inside are not followed (reported as skipped; a broken one as
    /// failed). decrypt, verify, rewrap and inspect take only hsmseal files,
    /// and report files that look like damaged ones as failed
    #[arg(long, short = 'r', value_name = "DIR")]
    pub recursive: Vec<PathBuf>,
    /// Under -r, take only files matching GLOB (repeatable). A GLOB with a "/"
    /// is matched against the path relative to the -r directory, one without
    /// against the file name; * and ? stop at "/", ** does not, [a-z] classes,
    /// {txt,log} alternatives
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Under -r, leave out files matching GLOB (repeatable; same rules as
    /// --include, e.g. '*.tmp' or 'cache/**'); wins over --include
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Suffix of encrypted file names: added by encrypt, removed by decrypt.
    /// Under -r, a file with this suffix that is not a readable hsmseal file
    /// is reported as failed, never passed over
    #[arg(long, value_name = "SUFFIX", default_value = ".hseal")]
    pub suffix: String,
    /// Let an -r directory hold nothing to process (by default that fails:
    /// an empty or unmounted directory must not pass for a clean run)
    #[arg(long)]
    pub allow_empty: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    /// Files to authenticate ("-" for stdin)
    #[arg(required_unless_present = "recursive")]
    pub inputs: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// With -r: a summary of which key versions the files depend on
    #[command(flatten)]
    pub select: SelectArgs,
    /// List the key versions the data under the inputs needs, from hsmseal
    /// file envelopes and from column tokens in plain and sealed dumps
    /// (sealed files are decrypted in memory to find them: needs the HSM).
    /// Inputs may be directories (searched recursively)
    #[arg(long)]
    pub deps: bool,
    /// With --deps: read headers only; do not decrypt sealed files to look
    /// for column tokens inside (no HSM needed)
    #[arg(long, requires = "deps")]
    pub headers_only: bool,
    /// Files to describe ("-" for stdin)
    #[arg(required_unless_present = "recursive")]
    pub inputs: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RewrapArgs {
    /// Move files to this key's current version (default: each file's own key)
    #[arg(long, short = 'k')]
    pub key: Option<String>,
    /// Draw a new data key and re-encrypt the payload (after a suspected data key exposure)
    #[arg(long)]
    pub reencrypt: bool,
    /// Report what would change; change nothing
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Files to rewrap in place
    pub inputs: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print each resolved setting and where it came from (secrets redacted)
    #[command(after_help = EX_CONFIG)]
    Show,
}

#[derive(Debug, clap::Subcommand)]
pub enum ColumnsCommand {
    /// Encrypt the selected columns: each non-NULL value becomes a token.
    #[command(after_help = EX_COLUMNS_ENCRYPT)]
    Encrypt(ColumnsEncryptArgs),
    /// Decrypt the tokens in the selected columns.
    #[command(after_help = EX_COLUMNS_DECRYPT)]
    Decrypt(ColumnsDecryptArgs),
    /// Move every token to the current version of its key (or of --key).
    ///
    /// Version-2 tokens have no separate envelope: they are re-encrypted
    /// (opened under their row, column and context, then sealed again).
    /// Version-1 tokens are upgraded to v2 when the target version has a
    /// key-derivation key; under an older target only their batch key is
    /// rewrapped.
    ///
    /// `rotate` is another name for this command (its earlier name).
    #[command(visible_alias = "rotate", after_help = EX_COLUMNS_REWRAP)]
    Rewrap(ColumnsRewrapArgs),
    /// Count, per selected column of a dump, NULLs, clear values, tokens per
    /// key version and token format, and malformed tokens.
    ///
    /// Reads only the token headers: no HSM, no key, nothing decrypted
    /// (whether a token opens is `columns decrypt`'s question). Use it
    /// before `key purge` to see which key versions a dump still needs.
    #[command(after_help = EX_COLUMNS_INSPECT)]
    Inspect(ColumnsInspectArgs),
    /// Print the blind index of a value read from stdin, exactly as
    /// `columns encrypt --blind-index` stores it, for an equality lookup
    /// (WHERE email_bidx = '<printed value>').
    ///
    /// The value is read from stdin, never from the command line (argv is
    /// visible to other users and kept in shell history); one trailing
    /// newline (LF or CRLF) is removed unless --raw. --key, --column,
    /// --context, --bits and --normalize must be those of the encrypt run.
    #[command(after_help = EX_COLUMNS_INDEX)]
    Index(ColumnsIndexArgs),
    /// Parse and rewrite the selected columns without cryptography (the
    /// benchmark's speed ceiling).
    #[command(hide = true)]
    Passthrough(DumpArgs),
}

/// `--blind-index-normalize` / `--normalize`: how a value is normalised
/// before its blind index is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NormalizeArg {
    /// The exact bytes
    None,
    /// UTF-8: Unicode white space trimmed at both ends, then lower-cased
    LowerTrim,
}

impl From<NormalizeArg> for hsmseal::columns::Normalize {
    fn from(n: NormalizeArg) -> Self {
        match n {
            NormalizeArg::None => Self::None,
            NormalizeArg::LowerTrim => Self::LowerTrim,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ColumnsIndexArgs {
    /// Key (KWK) name the dump was encrypted under; default from the
    /// configuration. Its blind-index key (one per key name) is used.
    #[arg(long, short = 'k', env = "HSMSEAL_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// The encrypted column the index was computed from: its header name
    /// (JSON key), or @N for position N (as given to --columns).
    #[arg(long, short = 'c', value_name = "COL")]
    pub column: String,
    /// The --context of the encrypt run. Default: empty.
    #[arg(long, default_value = "")]
    pub context: String,
    /// Index length in bits, as given to --blind-index-bits.
    #[arg(long, value_name = "N", default_value_t = hsmseal::columns::blind_index::DEFAULT_BITS)]
    pub bits: u16,
    /// Normalisation, as given to --blind-index-normalize.
    #[arg(long, value_enum, value_name = "MODE", default_value = "none")]
    pub normalize: NormalizeArg,
    /// Use stdin exactly as read (no trailing newline removed).
    #[arg(long)]
    pub raw: bool,
}

/// What every `columns` subcommand shares.
#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// Columns to process: header names (JSON keys for jsonl), or 1-based
    /// positions with --no-header; @N is position N with a header too (for
    /// tokens made from a headerless dump, which are bound to positions).
    /// Comma-separated, repeatable; a name that contains a comma is written
    /// in double quotes as in CSV ("a,b",c; a quote inside is doubled).
    #[arg(long, short = 'c', value_name = "COLS", required = true)]
    pub columns: Vec<String>,
    /// The dump's format. Required when reading stdin; otherwise taken from
    /// the input file's extension (.csv, .tsv/.tab, .jsonl/.ndjson,
    /// .copy/.pgcopy, .parquet) if it has one of these.
    #[arg(long, short = 'f', value_enum, ignore_case = true)]
    pub format: Option<DumpFormat>,
    /// The first record is data, not a header: --columns are positions.
    #[arg(long)]
    pub no_header: bool,
    /// Bind each token to its row's value of this column (a unique id), so a
    /// token moved to another row fails to decrypt. A composite key is
    /// several columns in key order (tenant_id,cust_id), written like
    /// --columns; decrypt must name the same columns in the same order.
    #[arg(long, value_name = "COLS")]
    pub row_id: Vec<String>,
    /// Bound into every token, e.g. the table `app.users`; decrypt must be
    /// given the same. Default: empty.
    #[arg(long, default_value = "")]
    pub context: String,
    /// The dump to read ("-" or absent: stdin). One per run: a dump has
    /// its own header and its own output, so several are refused (run
    /// hsmseal once per dump).
    #[arg(value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// The same as INPUT (its earlier spelling, kept for scripts).
    #[arg(long, short = 'i', value_name = "FILE", conflicts_with = "inputs")]
    pub input: Option<PathBuf>,
    /// Output file, written atomically with mode 0600 ("-" or absent: stdout).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print a summary (rows, cells, batches, HSM calls, seconds) on stderr
    /// (with --json there always is one: the `summary` line, on stderr like
    /// every --json line of `columns`, which then carries nothing else).
    #[arg(long)]
    pub stats: bool,
}

/// `--format` and `--token-format`: the dump formats, a closed set, so
/// `--help` lists them and clap refuses anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DumpFormat {
    /// Comma-separated values (RFC 4180)
    Csv,
    /// Tab-separated values
    Tsv,
    /// One JSON object per line
    #[value(alias = "ndjson")]
    Jsonl,
    /// PostgreSQL COPY text format
    Pgcopy,
    /// Apache Parquet (a file: INPUT and -o FILE, never a stream)
    Parquet,
}

impl From<DumpFormat> for hsmseal::columns::Format {
    fn from(f: DumpFormat) -> Self {
        match f {
            DumpFormat::Csv => Self::Csv,
            DumpFormat::Tsv => Self::Tsv,
            DumpFormat::Jsonl => Self::Jsonl,
            DumpFormat::Pgcopy => Self::PgCopy,
            DumpFormat::Parquet => Self::Parquet,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ColumnsEncryptArgs {
    #[command(flatten)]
    pub dump: DumpArgs,
    /// Key (KWK) name; default from the configuration.
    #[arg(long, short = 'k', env = "HSMSEAL_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Cells per batch key, not rows: each selected non-NULL value is one
    /// cell, so a row with two encrypted columns uses two. One HSM call per
    /// batch key; each worker (--jobs) draws its own, so a run makes
    /// ceil(cells / N) batch keys, plus at most one partial one per worker
    /// beyond the first. 1 to 1000000.
    #[arg(long, value_name = "N", default_value_t = hsmseal::columns::DEFAULT_BATCH_SIZE)]
    pub batch_size: u64,
    /// Leave selected values that already are tokens as they are (counted
    /// and reported), e.g. to finish a half-encrypted dump. Without it such
    /// a value is an error: it would be encrypted twice.
    #[arg(long)]
    pub skip_tokens: bool,
    /// Also write a blind index (a keyed, truncated hash) of COL's
    /// plaintext into TARGET (default COL_bidx), for equality lookups; see
    /// `hsmseal columns index`. COL must be one of --columns; TARGET must
    /// be a column of the dump (a key of every JSONL object): its values are
    /// replaced.
    /// NULL gives NULL. Repeatable. Equal values get equal indexes: read
    /// docs/SECURITY.md, "Blind indexes: what they leak".
    #[arg(long, value_name = "COL[=TARGET]")]
    pub blind_index: Vec<String>,
    /// Blind-index length in bits: a multiple of 8 from 16 to 256. Longer
    /// means fewer false matches per lookup, shorter less to learn from.
    #[arg(long, value_name = "N", default_value_t = hsmseal::columns::blind_index::DEFAULT_BITS)]
    pub blind_index_bits: u16,
    /// How values are normalised before their blind index is computed.
    #[arg(long, value_enum, value_name = "MODE", default_value = "none")]
    pub blind_index_normalize: NormalizeArg,
    /// Not supported (hidden): accepted only to refuse it with the reason
    /// (cells take AES keys only), instead of clap's unknown-argument error.
    #[arg(long, value_name = "FILE", hide = true)]
    pub recipient: Vec<PathBuf>,
    /// Not supported (hidden), as --recipient: a cell has one key.
    #[arg(long, value_name = "NAME", hide = true)]
    pub group: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ColumnsDecryptArgs {
    #[command(flatten)]
    pub dump: DumpArgs,
    /// Copy selected values that are not tokens instead of failing (counted
    /// and reported). A value starting with "hsc1." or "hsc2." must still be a
    /// valid token.
    #[arg(long)]
    pub allow_plaintext: bool,
    /// Also accept tokens made from dumps of these formats, e.g. tokens
    /// encrypted in a CSV dump, loaded into PostgreSQL and exported with
    /// COPY: their values are written the way --format writes them. Without
    /// it such a token is an error.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "FORMAT",
        value_enum,
        ignore_case = true
    )]
    pub token_format: Vec<DumpFormat>,
    /// Decrypt values that were encrypted more than once (by a columns
    /// encrypt run over an already encrypted dump) down to the plaintext,
    /// instead of failing on them.
    #[arg(long)]
    pub nested: bool,
    /// Decrypt even past the per-key limits of hsmseal.toml [limits.KEY]
    /// (the audit entry records the override)
    #[arg(long)]
    pub override_limits: bool,
}

#[derive(Debug, clap::Args)]
pub struct ColumnsInspectArgs {
    /// Columns to count, written as for `columns decrypt` (names, or
    /// 1-based positions with --no-header; comma-separated, repeatable).
    #[arg(long, short = 'c', value_name = "COLS", required = true)]
    pub columns: Vec<String>,
    /// The dump's format. Required when reading stdin; otherwise taken from
    /// the input file's extension as for `columns decrypt`.
    #[arg(long, short = 'f', value_enum, ignore_case = true)]
    pub format: Option<DumpFormat>,
    /// The first record is data, not a header: --columns are positions.
    #[arg(long)]
    pub no_header: bool,
    /// The dump to read ("-" or absent: stdin).
    #[arg(value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ColumnsRewrapArgs {
    #[command(flatten)]
    pub dump: DumpArgs,
    /// Move tokens to this key's current version (default: each token's
    /// own key, as for file rewrap; the configured default key is not used).
    #[arg(long, short = 'k')]
    pub key: Option<String>,
    /// Copy selected values that are not tokens instead of failing.
    #[arg(long)]
    pub allow_plaintext: bool,
}

// ---- Examples shown at the end of each subcommand's --help ----
// Each is a command a user can adapt as it stands; `hsmseal help` and the
// man pages carry them too (examples/gen-docs.rs).

const EX_COLUMNS_INDEX: &str = "\
Examples:
  hsmseal columns encrypt -c email,ssn --row-id id -k pii --context app.users --blind-index email users.csv -o users.enc.csv
  printf %s \"$email\" | hsmseal columns index -k pii --column email --context app.users
  # then: SELECT * FROM users WHERE email_bidx = '<printed value>'";

const EX_PG: &str = "\
Examples:
  # Password from PGPASSWORD or ~/.pgpass, never in --dsn
  hsmseal pg status  --dsn postgresql://app@db:5432/prod --table public.users -c email,ssn
  hsmseal pg encrypt --dsn postgresql://app@db:5432/prod --table public.users -c email,ssn --key pii
  hsmseal pg decrypt --dsn postgresql://app@db:5432/prod --table public.users -c email,ssn";

const EX_PG_ENCRYPT: &str = "\
Examples:
  export PGPASSWORD=...   # or ~/.pgpass; never in --dsn
  hsmseal pg encrypt --dsn postgresql://app@db/prod --table public.users -c email,ssn --key pii
  # A jsonb column: changed to text, its type recorded for pg decrypt
  hsmseal pg encrypt --dsn postgresql://app@db/prod --table public.users -c profile --key pii --alter
  # In a maintenance window: offline, one transaction, no dead rows left
  hsmseal pg encrypt --dsn postgresql://app@db/prod --table public.users -c email,ssn --key pii --rewrite";

const EX_PG_DECRYPT: &str = "\
Examples:
  hsmseal pg decrypt --dsn postgresql://app@db/prod --table public.users -c email,ssn";

const EX_PG_ROTATE: &str = "\
Examples:
  hsmseal key rotate pii
  hsmseal pg rotate --dsn postgresql://app@db/prod --table public.users -c email,ssn";

const EX_PG_VERIFY: &str = "\
Examples:
  hsmseal pg verify --dsn postgresql://app@db/prod --table public.users -c email,ssn";

const EX_PG_STATUS: &str = "\
Examples:
  # Which key versions the table depends on, before a key purge
  hsmseal --json pg status --dsn postgresql://app@db/prod --table public.users -c email,ssn";

const EX_INIT: &str = "\
Examples:
  # A software token in ./.hsmseal and ./hsmseal.toml, then a first key
  hsmseal init --dev && hsmseal key create demo
  # Elsewhere, with another label
  hsmseal init --dev /tmp/hsm-test --label test";

const EX_KEY: &str = "\
Examples:
  hsmseal key create backups
  hsmseal key rotate backups && hsmseal rewrap -r /srv/backups
  hsmseal key list --json";

const EX_KEY_BACKUP: &str = "\
Examples:
  # README \"Disaster recovery\". On the recovery token B
  hsmseal --token dr key backup-target dr1 -o dr1.pub
  # on the source token A: the security officer, then the key holder
  hsmseal --token prod key backup-trust dr1.pub --so-pin-file so.pin
  hsmseal --token prod key backup pii --to dr1.pub -o pii-v3.hsbackup
  # on B
  hsmseal --token dr key restore pii-v3.hsbackup";

const EX_KEY_EXPORT_PUBLIC: &str = "\
Examples:
  # README \"Deploying: backup hosts without the PIN\". On the token
  hsmseal key create backups-dr --type rsa-oaep
  hsmseal key export-public backups-dr > backups-dr.pub
  # on a backup host: no module, token or PIN
  hsmseal encrypt --recipient backups-dr.pub dump.sql";

const EX_KEY_CREATE: &str = "\
Examples:
  hsmseal key create backups
  hsmseal --token prod key create pii
  hsmseal key create pii --backup   # can be copied to a recovery HSM";

const EX_KEY_ROTATE: &str = "\
Examples:
  hsmseal key rotate backups
  # Then move existing files to the new version (a header rewrite each)
  hsmseal rewrap -r /srv/backups
  # Nightly, idempotent: a new version only when the current one is 90 days old
  hsmseal key rotate backups --if-older-than 90d";

const EX_KEY_LIST: &str = "\
Examples:
  hsmseal key list
  hsmseal key list --json";

const EX_KEY_INFO: &str = "\
Examples:
  hsmseal key info backups
  hsmseal key info backups --json";

const EX_KEY_DISABLE: &str = "\
Examples:
  hsmseal key disable backups --version 2
  # Undo
  hsmseal key enable backups --version 2";

const EX_KEY_ENABLE: &str = "\
Examples:
  hsmseal key enable backups --version 2";

const EX_KEY_DESTROY: &str = "\
Examples:
  # Refused if anything under /srv/backups still needs version 1
  hsmseal key destroy backups --version 1 --check /srv/backups --yes";

const EX_KEY_PURGE: &str = "\
Examples:
  hsmseal key purge backups --older-than 400d --dry-run
  hsmseal key purge backups --older-than 400d --check /srv/backups --yes";

const EX_ENCRYPT: &str = "\
Examples:
  # Writes db.dump.hseal next to db.dump
  hsmseal encrypt -k backups db.dump
  # A tree, mirrored under /srv/sealed, one JSON line per file
  hsmseal encrypt -k backups -r /srv/exports --include '*.csv' --output-dir /srv/sealed --json
  # A stream
  pg_dump app | hsmseal encrypt -k backups > app.sql.hseal";

const EX_DECRYPT: &str = "\
Examples:
  # Writes db.dump next to db.dump.hseal
  hsmseal decrypt db.dump.hseal
  hsmseal decrypt -o - app.sql.hseal | psql app
  hsmseal decrypt -r /srv/sealed --output-dir /srv/restore";

const EX_VERIFY: &str = "\
Examples:
  hsmseal verify db.dump.hseal
  hsmseal verify -r /srv/backups --json";

const EX_INSPECT: &str = "\
Examples:
  hsmseal inspect db.dump.hseal
  # Which key versions do the files under /srv/backups need?
  hsmseal inspect -r /srv/backups
  hsmseal inspect --deps --headers-only /srv/backups /srv/exports";

const EX_REWRAP: &str = "\
Examples:
  # After `hsmseal key rotate backups`
  hsmseal rewrap -r /srv/backups
  hsmseal rewrap --dry-run -r /srv/backups --json
  # A data key may have leaked: new data key, payload re-encrypted
  hsmseal rewrap --reencrypt db.dump.hseal";

const EX_DOCTOR: &str = "\
Examples:
  hsmseal doctor
  hsmseal --module /usr/lib/x86_64-linux-gnu/pkcs11/yubihsm_pkcs11.so --token prod doctor --json";

const EX_CONFIG: &str = "\
Examples:
  hsmseal config show
  HSMSEAL_TOKEN=prod hsmseal config show --json";

const EX_COLUMNS: &str = "\
Examples:
  hsmseal columns encrypt -c ssn,email --row-id id -k pii users.csv -o users.enc.csv
  hsmseal columns decrypt -c ssn,email --row-id id users.enc.csv -o users.csv
  hsmseal columns rewrap -c ssn,email -k pii -i users.enc.csv -o users.rewrapped.csv";

const EX_COLUMNS_ENCRYPT: &str = "\
Examples:
  hsmseal columns encrypt -c ssn,email --row-id id -k pii users.csv -o users.enc.csv
  # A PostgreSQL COPY stream without a header: columns by position
  psql -c 'COPY users TO STDOUT' app | hsmseal columns encrypt -f pgcopy --no-header -c 3 --row-id 1 -k pii > users.copy";

const EX_COLUMNS_DECRYPT: &str = "\
Examples:
  hsmseal columns decrypt -c ssn,email --row-id id users.enc.csv -o users.csv
  hsmseal columns decrypt -f pgcopy --no-header -c 3 --row-id 1 --stats < users.copy > users.plain.copy";

const EX_COLUMNS_REWRAP: &str = "\
Examples:
  # After `hsmseal key rotate pii`: each token's batch key to its key's current version
  hsmseal columns rewrap -c ssn,email --row-id id users.enc.csv -o users.rewrapped.csv";

const EX_COLUMNS_INSPECT: &str = "\
Examples:
  hsmseal columns inspect -c ssn,email users.enc.csv
  psql -c '\\copy app.users TO STDOUT (HEADER)' | hsmseal columns inspect --json -f pgcopy -c ssn";

const EX_AUDIT: &str = "\
Examples:
  hsmseal --audit-log /var/log/hsmseal/audit.log audit init
  hsmseal audit verify /var/log/hsmseal/audit.log";

const EX_AUDIT_INIT: &str = "\
Examples:
  hsmseal --audit-log /var/log/hsmseal/audit.log audit init";

const EX_AUDIT_REPORT: &str = "\
Examples:
  hsmseal audit report --since 24h
  # nightly, from cron: mail when anyone decrypted more than 100000 items/cells
  hsmseal audit report --since 24h --alert-over 100000 --json";

const EX_AUDIT_VERIFY: &str = "\
Examples:
  # The configured log (--audit-log, HSMSEAL_AUDIT_LOG or hsmseal.toml)
  hsmseal audit verify
  hsmseal audit verify /var/log/hsmseal/audit.log";

/// Parses a retention age: a whole number followed by one unit, `s`, `m`,
/// `h`, `d` or `w` (`400d`, `12h`, `30m`, `90s`, `2w`), into seconds. One
/// unit only and no months or years: those have no fixed length, and a
/// purge cutoff must mean exactly one thing.
pub fn parse_duration(s: &str) -> std::result::Result<u64, String> {
    let bad = || {
        format!(
            "invalid duration {s:?}: use a whole number followed by s, m, h, d or w (e.g. 400d, 12h, 30m, 90s, 2w)"
        )
    };
    let unit = s.chars().last().ok_or_else(bad)?;
    let seconds: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        _ => return Err(bad()),
    };
    let digits = &s[..s.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(seconds)
        .ok_or_else(|| format!("invalid duration {s:?}: too long"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// "rotate" means only `key rotate`; for files and column dumps it is
    /// an alias of `rewrap`, shown as one in `--help`.
    #[test]
    fn rotate_is_an_alias_of_rewrap_except_for_keys() {
        for name in ["rewrap", "rotate"] {
            let cli = Cli::try_parse_from(["hsmseal", name, "a.hseal"]).unwrap();
            assert!(
                matches!(&cli.command, Command::Rewrap(a) if a.inputs == [PathBuf::from("a.hseal")]),
                "{name}"
            );
            let cli = Cli::try_parse_from(["hsmseal", "columns", name, "-c", "x"]).unwrap();
            assert!(
                matches!(cli.command, Command::Columns(ColumnsCommand::Rewrap(_))),
                "columns {name}"
            );
        }
        let cli = Cli::try_parse_from(["hsmseal", "key", "rotate", "k"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Key(KeyCommand::Rotate { .. })
        ));
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("[alias: rotate]"), "{help}");
    }

    #[test]
    fn durations_parse_to_seconds() {
        for (s, secs) in [
            ("0s", 0),
            ("90s", 90),
            ("30m", 1800),
            ("12h", 43_200),
            ("400d", 400 * 86_400),
            ("2w", 14 * 86_400),
            ("007d", 7 * 86_400),
        ] {
            assert_eq!(parse_duration(s), Ok(secs), "{s}");
        }
    }

    #[test]
    fn garbage_durations_are_rejected() {
        for bad in [
            "",
            "d",
            "400",
            "-1d",
            "+1d",
            "1.5d",
            "1 d",
            " 1d",
            "1d ",
            "1D",
            "1y",
            "1mo",
            "1d12h",
            "１d",
            "1µs",
            "99999999999999999999d",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.starts_with("invalid duration"), "{bad}: {e}");
        }
        assert!(parse_duration("18446744073709551615w")
            .unwrap_err()
            .contains("too long"));
    }
}
