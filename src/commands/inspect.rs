//! `hsmseal inspect`: what a file is and which key it depends on, from the
//! header alone. No HSM access, no secrets, nothing authenticated: the
//! output says so, and `verify` is the command that authenticates.

use super::encrypt::read_up_to;
use super::paths::{for_each_item, Input};
use crate::app::App;
use crate::cli::InspectArgs;
use crate::envelope::{file, header};
use crate::error::{Error, Result};
use serde::Serialize;

#[derive(Serialize)]
struct Inspection {
    path: String,
    format_version: u16,
    header_bytes: usize,
    payload: &'static str,
    key: String,
    key_version: u32,
    envelope_slot: usize,
    envelope_sequence: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    file_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunks: Option<u64>,
    authenticated: bool,
}

pub fn run(app: &App, args: InspectArgs) -> Result<i32> {
    let inputs = Input::list(&args.inputs)?;
    for_each_item(app, &inputs, Input::display, |input| {
        let mut r = input.open()?;
        let mut buf = vec![0u8; header::HEADER_LEN];
        let n = read_up_to(&mut r, &mut buf)?;
        let h = header::Header::parse(&buf[..n])?;
        let (slot_index, slot) = h.active();
        let file_bytes = match input {
            Input::File(p) => Some(
                std::fs::metadata(p)
                    .map_err(|e| Error::io(format!("cannot stat: {e}")))?
                    .len(),
            ),
            Input::Stdin => None,
        };
        let plaintext_bytes = match file_bytes {
            Some(len) => Some(file::plaintext_len(len).ok_or_else(|| {
                Error::integrity(format!(
                    "file length {len} is impossible for an hsmseal file: truncated or extended"
                ))
            })?),
            None => None,
        };
        let info = Inspection {
            path: input.display(),
            format_version: header::FORMAT_VERSION,
            header_bytes: header::HEADER_LEN,
            payload: "c2sp.org/chunked-encryption@v1 Cobblestone-256 (AES-256-GCM, HKDF-SHA-512, 16 KiB chunks)",
            key: slot.kwk.name.clone(),
            key_version: slot.kwk.version,
            envelope_slot: slot_index,
            envelope_sequence: slot.seq,
            file_bytes,
            plaintext_bytes,
            chunks: plaintext_bytes.map(|p| p / crate::stream::CHUNK_SIZE as u64 + 1),
            authenticated: false,
        };
        if app.json {
            println!("{}", serde_json::to_string(&info).expect("serialisable"));
        } else {
            println!("{}", info.path);
            println!(
                "  format:      hsmseal v{} ({} byte header)",
                info.format_version, info.header_bytes
            );
            println!("  payload:     {}", info.payload);
            println!(
                "  key:         {} v{} (slot {}, sequence {})",
                info.key, info.key_version, slot_index, slot.seq
            );
            if let (Some(f), Some(p), Some(c)) =
                (info.file_bytes, info.plaintext_bytes, info.chunks)
            {
                println!("  size:        {f} bytes ({p} bytes of plaintext in {c} chunks)");
            }
            println!("  note:        not authenticated; run `hsmseal verify` to check every byte");
        }
        Ok(None)
    })
}
