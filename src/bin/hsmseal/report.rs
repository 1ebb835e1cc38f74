//! What a run reports: one [`ItemReport`] per item of a bulk run (its
//! `--json` line, or its human line), the `--json` line schema shared by
//! every command ([`emit`], [`error`], [`diag`]), and the writers that stop the
//! run quietly when stdout's reader has gone away (`| head`: exit 141)
//! instead of failing with an error: [`outln!`](crate::outln) for result lines,
//! [`PipeAware`] for data.

use crate::signals;
use hsmseal::error::Error;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};

// ---- --json: one JSON-lines schema for every command ----
//
// Every line hsmseal writes with --json is one JSON object whose first
// field is `type` (README "JSON output"): `item`, `summary`, `error`,
// `note`, `key`, `key_change`, `purge`, `dependency`, `audit`, `doctor`,
// `config`, `init`. The lines go to stdout, or to stderr when the command
// writes its data to stdout (then stderr carries JSON lines only: a
// human diagnostic becomes a `note` line). Fields are only ever added.

/// `--json` was given (set once by `commands::run`, before any output).
static JSON: AtomicBool = AtomicBool::new(false);
/// The JSON lines go to stderr: the command's data is on stdout.
static JSON_ON_STDERR: AtomicBool = AtomicBool::new(false);

/// Turns `--json` output on for this run.
pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

/// The command writes its data to stdout: JSON lines (and the final
/// `error`, if any) go to stderr from now on, never mixed into the data.
pub fn json_on_stderr() {
    JSON_ON_STDERR.store(true, Ordering::Relaxed);
}

/// Stderr carries JSON lines, so no human line may be written there.
pub fn stderr_is_json() -> bool {
    JSON.load(Ordering::Relaxed) && JSON_ON_STDERR.load(Ordering::Relaxed)
}

/// `v` (a struct or map) as one JSON line with `"type": ty` first.
pub fn typed(ty: &str, v: &impl Serialize) -> String {
    let body = serde_json::to_string(v).expect("serialisable");
    match body.strip_prefix('{') {
        Some("}") => format!("{{\"type\":\"{ty}\"}}"),
        Some(rest) => format!("{{\"type\":\"{ty}\",{rest}"),
        // Not an object: wrapped, so the line still has its type.
        None => format!("{{\"type\":\"{ty}\",\"value\":{body}}}"),
    }
}

/// Writes one typed JSON line to the JSON stream (stdout, or stderr when
/// the data is on stdout).
pub fn emit(ty: &str, v: &impl Serialize) {
    let line = typed(ty, v);
    if JSON_ON_STDERR.load(Ordering::Relaxed) {
        eprintln!("{line}");
    } else {
        print_line(format_args!("{line}"));
    }
}

/// The `error` line: what stopped the run, with its exit code.
#[derive(Serialize)]
pub struct ErrorLine<'a> {
    /// `usage`, `integrity`, `key`, `token`, `pin`, `io`, `format`,
    /// `interrupted`, `unaudited`.
    pub kind: String,
    pub exit_code: i32,
    pub message: &'a str,
}

/// Reports the error that ends the run: with `--json` as an `error` line
/// on the JSON stream, plus the human line on stderr unless stderr is the
/// JSON stream; without `--json` the human line only.
pub fn error(e: &Error) {
    if JSON.load(Ordering::Relaxed) {
        let message = e.to_string();
        emit(
            "error",
            &ErrorLine {
                kind: format!("{:?}", e.kind()).to_ascii_lowercase(),
                exit_code: e.exit_code(),
                message: &message,
            },
        );
    }
    if !stderr_is_json() {
        eprintln!("hsmseal: error: {e}");
    }
}

#[derive(Serialize)]
struct Note<'a> {
    message: &'a str,
}

/// A human diagnostic for stderr (a note, a warning, a skipped item). When
/// stderr is the JSON stream it becomes a `note` line instead.
pub fn diag(msg: impl std::fmt::Display) {
    let msg = msg.to_string();
    if stderr_is_json() {
        let m = msg.strip_prefix("hsmseal: ").unwrap_or(&msg);
        eprintln!("{}", typed("note", &Note { message: m }));
    } else {
        eprintln!("{msg}");
    }
}

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

#[cfg(test)]
mod tests {
    use super::typed;

    /// `type` comes first, the object's own fields follow in their order,
    /// and a value that is not an object is wrapped, so every line is an
    /// object with a type.
    #[test]
    fn typed_lines_start_with_their_type() {
        #[derive(serde::Serialize)]
        struct S {
            z: u8,
            a: &'static str,
        }
        assert_eq!(
            typed("item", &S { z: 1, a: "x" }),
            r#"{"type":"item","z":1,"a":"x"}"#
        );
        assert_eq!(
            typed("summary", &serde_json::json!({})),
            r#"{"type":"summary"}"#
        );
        assert_eq!(typed("key", &vec![1, 2]), r#"{"type":"key","value":[1,2]}"#);
    }
}
