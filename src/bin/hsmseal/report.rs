//! What a run reports on stdout: one [`ItemReport`] per item of a bulk run
//! (its `--json` line, or its human line), and the writers that stop the
//! run quietly when stdout's reader has gone away (`| head`: exit 141)
//! instead of failing with an error: [`outln!`](crate::outln) for result lines,
//! [`PipeAware`] for data.

use crate::signals;
use serde::Serialize;

/// One line of `--json` output per item.
#[derive(Serialize, Debug, Default)]
pub struct ItemReport {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why an item was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Informational line for stderr (unless --quiet), printed in input order.
    #[serde(skip)]
    pub note: Option<String>,
    /// Human-readable result for stdout (without --json), printed in input order.
    #[serde(skip)]
    pub text: Option<String>,
    /// Replaces the serialised report as the item's --json line.
    #[serde(skip)]
    pub json_line: Option<String>,
}

/// Writes one line to stdout (the `outln!` macro). A closed stdout stops
/// the run (`stdout_closed`); any other write error is reported and stops
/// it with exit code 7 (I/O), never a panic.
pub fn print_line(args: std::fmt::Arguments) {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.write_all(b"\n")) {
        drop(out);
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            signals::stdout_closed();
        }
        eprintln!("hsmseal: error: writing stdout: {e}");
        signals::stdout_failed();
    }
}

/// `println!` for hsmseal's results: see [`print_line`].
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::report::print_line(format_args!($($arg)*))
    };
}

/// A writer to stdout for data (decrypted bytes, dumps) that stops the run
/// quietly when the reader has gone away instead of failing with an error.
pub struct PipeAware<W>(pub W);

impl<W: std::io::Write> std::io::Write for PipeAware<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => signals::stdout_closed(),
            r => r,
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => signals::stdout_closed(),
            r => r,
        }
    }
}
