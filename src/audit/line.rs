//! One audit line: its fixed field order, what the MAC covers (every byte
//! before `,"mac":"`, always the last 74 bytes before the `\n`), and the
//! parser, which checks the syntax only (never the MAC or the chain).

use super::{hex, unhex, unhex32, Record};
use serde::Deserialize;

/// Format version in every line's `v`.
pub const VERSION: u32 = 1;
/// `,"mac":"` + 64 hex digits + `"}`: the fixed tail of every line.
pub(super) const MAC_SUFFIX_LEN: usize = 8 + 64 + 2;
pub(super) const MAC_PREFIX: &[u8] = b",\"mac\":\"";
/// A line longer than this is not one hsmseal wrote.
pub(super) const MAX_LINE: usize = 64 * 1024;

/// The fields of a line as parsed (the order on disk is fixed by [`signed_part`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Entry {
    v: u32,
    log: String,
    seq: u64,
    time: String,
    user: String,
    host: String,
    pid: u32,
    command: String,
    keys: Vec<String>,
    items: Items,
    bytes: u64,
    hsm_calls: u64,
    seconds: f64,
    result: String,
    exit_code: i32,
    error: Option<String>,
    prev: String,
    mac: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Items {
    ok: u64,
    failed: u64,
    skipped: u64,
}

/// One line, parsed and split into what the MAC covers and the MAC.
#[derive(Debug)]
pub struct Parsed {
    pub(super) log: String,
    pub(super) seq: u64,
    pub(super) prev: [u8; 32],
    pub(super) signed_len: usize,
    pub(super) mac: [u8; 32],
    pub(super) command: String,
    pub(super) bytes: u64,
    pub(super) error: Option<String>,
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// Everything of a line that the MAC covers, in the fixed field order.
#[allow(clippy::too_many_arguments)]
pub(super) fn signed_part(
    log_id: &str,
    seq: u64,
    time: &str,
    user: &str,
    host: &str,
    pid: u32,
    r: &Record,
    prev: &[u8; 32],
) -> String {
    let keys: Vec<String> = r.keys.iter().map(|k| json_str(k)).collect();
    let seconds = if r.seconds.is_finite() && r.seconds >= 0.0 {
        r.seconds
    } else {
        0.0
    };
    format!(
        "{{\"v\":{VERSION},\"log\":{},\"seq\":{seq},\"time\":{},\"user\":{},\"host\":{},\"pid\":{pid},\"command\":{},\"keys\":[{}],\"items\":{{\"ok\":{},\"failed\":{},\"skipped\":{}}},\"bytes\":{},\"hsm_calls\":{},\"seconds\":{seconds:.3},\"result\":{},\"exit_code\":{},\"error\":{},\"prev\":\"{}\"",
        json_str(log_id),
        json_str(time),
        json_str(user),
        json_str(host),
        json_str(&r.command),
        keys.join(","),
        r.ok,
        r.failed,
        r.skipped,
        r.bytes,
        r.hsm_calls,
        json_str(r.result),
        r.exit_code,
        r.error.as_deref().map_or_else(|| "null".to_string(), json_str),
        hex(prev),
    )
}

/// The complete line (without `\n`) for `signed` and its MAC.
pub(super) fn finish_line(signed: &str, mac: &[u8; 32]) -> String {
    format!("{signed},\"mac\":\"{}\"}}", hex(mac))
}

/// Splits and parses one line (without `\n`); `Err` says why it is not an
/// entry. Checks the syntax only, never the MAC or the chain. (Public for
/// the fuzz target of the line parser.)
pub fn parse_line(line: &[u8]) -> std::result::Result<Parsed, String> {
    if line.len() > MAX_LINE {
        return Err(format!("longer than {MAX_LINE} bytes"));
    }
    if line.len() < MAC_SUFFIX_LEN + 2 {
        return Err("too short".into());
    }
    let signed_len = line.len() - MAC_SUFFIX_LEN;
    let tail = &line[signed_len..];
    if &tail[..MAC_PREFIX.len()] != MAC_PREFIX || &tail[MAC_SUFFIX_LEN - 2..] != b"\"}" {
        return Err("does not end with the \"mac\" field".into());
    }
    let mac = unhex32(&tail[MAC_PREFIX.len()..MAC_PREFIX.len() + 64])
        .ok_or("the mac is not 64 lowercase hex digits")?;
    let e: Entry = serde_json::from_slice(line).map_err(|e| format!("not an audit entry: {e}"))?;
    if e.v != VERSION {
        return Err(format!("unsupported version {}", e.v));
    }
    if e.log.len() != 32 || unhex(e.log.as_bytes()).is_none() {
        return Err("the log id is not 32 lowercase hex digits".into());
    }
    let prev = unhex32(e.prev.as_bytes()).ok_or("prev is not 64 lowercase hex digits")?;
    Ok(Parsed {
        log: e.log,
        seq: e.seq,
        prev,
        signed_len,
        mac,
        command: e.command,
        bytes: e.bytes,
        error: e.error,
    })
}
