//! One module per subcommand. Each exposes its clap arguments and a `run`
//! that returns the process exit code.
pub mod columns;
