//! Command-line definitions (clap derive). No logic lives here: each
//! subcommand's arguments are turned into work by `crate::commands`.
//!
//! There is deliberately no flag that takes a PIN value: command lines are
//! visible to other users in `ps` and kept in shell history.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    some items of a bulk run failed (each is reported)
  2    usage or configuration error (bad flags, refused overwrite)
  3    authentication failed: data tampered, truncated, reordered or wrongly keyed
  4    key error: key or version not found, or its attributes are too weak
  5    token error: PKCS#11 module or token not found or failing
  6    PIN error: wrong or missing PIN (a wrong PIN is never retried)
  7    I/O error
  8    input is not in the expected format
  130  interrupted";

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

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// PKCS#11 module (shared library) [env: HSMSEAL_PKCS11_MODULE]
    #[arg(long, global = true, value_name = "PATH")]
    pub module: Option<PathBuf>,
    /// Token label [env: HSMSEAL_TOKEN]
    #[arg(long, global = true, value_name = "LABEL")]
    pub token: Option<String>,
    /// File holding the token PIN (instead of HSMSEAL_PIN or a prompt)
    #[arg(long, global = true, value_name = "FILE")]
    pub pin_file: Option<PathBuf>,
    /// Machine-readable JSON output on stdout
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress or informational messages on stderr
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Worker threads (default: number of cores) [env: HSMSEAL_JOBS]
    #[arg(long, short = 'j', global = true, value_name = "N")]
    pub jobs: Option<usize>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a local SoftHSM2 token and hsmseal.toml to try hsmseal out
    ///
    /// Writes DIR/softhsm2.conf, DIR/tokens/, DIR/user-pin and DIR/so-pin (0600)
    /// and ./hsmseal.toml. This is a software token: for development only.
    Init(InitArgs),
    /// Create and inspect key-wrapping keys in the HSM
    #[command(subcommand)]
    Key(KeyCommand),
    /// Encrypt files (or stdin) under a key held in the HSM
    ///
    /// Writes INPUT.hseal next to each input (or -o OUT, or stdout for stdin).
    /// Each file gets a fresh data key, wrapped by the HSM key. The input is never modified.
    Encrypt(EncryptArgs),
    /// Decrypt hsmseal files (or stdin)
    ///
    /// Writes INPUT without its .hseal suffix (or -o OUT, or stdout), mode 0600.
    /// A file output appears only once the whole input has authenticated;
    /// stdout receives only authenticated chunks and the exit code is non-zero at the first failure.
    Decrypt(DecryptArgs),
    /// Authenticate hsmseal files completely; writes nothing, prints nothing secret
    Verify(VerifyArgs),
    /// Show format version, key name and version, and sizes (no HSM access, no secrets)
    ///
    /// With -r DIR, summarise which key versions the files under DIR depend on
    /// (what a `key purge` would make unreadable). Changes nothing.
    Inspect(InspectArgs),
    /// Rewrap files' data keys under the current key version, in place
    ///
    /// Changes on disk: only the 1024-byte header of each file that is not
    /// already on the current version; the payload is neither read nor moved,
    /// so any file rotates in the same time. Crash-safe: killed at any point,
    /// each file decrypts under the old or the new version. With --reencrypt,
    /// a new data key and payload replace the file atomically. Changes in the
    /// HSM: none. Files that fail authentication are left untouched and
    /// reported; the run goes on and exits 1.
    Rotate(RotateArgs),
    /// Report the PKCS#11 module, token, mechanisms and key attributes
    Doctor,
    /// Show resolved settings
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Encrypt, decrypt or rotate selected columns of CSV, TSV, JSONL or PostgreSQL COPY dumps
    #[command(subcommand)]
    Columns(crate::commands::columns::ColumnsCommand),
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

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Create version 1 of a new key-wrapping key inside the HSM
    ///
    /// Creates one AES-256 secret key object on the token: sensitive, never
    /// extractable, encrypt/decrypt only (no wrap/unwrap), CKM_AES_GCM only.
    Create {
        /// Key name: 1-64 characters from A-Z a-z 0-9 . _ -
        name: String,
    },
    /// List hsmseal keys on the token
    List,
    /// Show every version of a key with its attributes
    Info { name: String },
}

#[derive(Args, Debug)]
pub struct EncryptArgs {
    /// Key to encrypt under (default: default_key from hsmseal.toml) [env: HSMSEAL_KEY]
    #[arg(long, short = 'k')]
    pub key: Option<String>,
    /// Output file ("-" for stdout); only with a single input
    #[arg(long, short = 'o', value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Overwrite existing outputs
    #[arg(long)]
    pub force: bool,
    /// Input files ("-" or none for stdin)
    pub inputs: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DecryptArgs {
    /// Output file ("-" for stdout); only with a single input
    #[arg(long, short = 'o', value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Overwrite existing outputs
    #[arg(long)]
    pub force: bool,
    /// Input files ("-" or none for stdin)
    pub inputs: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Files to authenticate ("-" for stdin)
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Summarise the hsmseal files under this directory (repeatable)
    #[arg(long, short = 'r', value_name = "DIR")]
    pub recursive: Vec<PathBuf>,
    /// Files to describe ("-" for stdin)
    #[arg(required_unless_present = "recursive")]
    pub inputs: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RotateArgs {
    /// Move files to this key's current version (default: each file's own key)
    #[arg(long, short = 'k')]
    pub key: Option<String>,
    /// Draw a new data key and re-encrypt the payload (after a suspected data key exposure)
    #[arg(long)]
    pub reencrypt: bool,
    /// Report what would change; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Rotate every hsmseal file under this directory (repeatable)
    #[arg(long, short = 'r', value_name = "DIR")]
    pub recursive: Vec<PathBuf>,
    /// Files to rotate in place
    pub inputs: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print each resolved setting and where it came from (secrets redacted)
    Show,
}
