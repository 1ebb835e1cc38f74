//! `hsmseal inspect`: what a file is and which key it depends on, from the
//! header alone. No HSM access, no secrets, nothing authenticated: the
//! output says so, and `verify` is the command that authenticates.
//! `--deps` is the exception (`super::deps`): it decrypts sealed files in
//! memory, through the HSM, to find the column tokens inside.

use crate::app::App;
use crate::bulk::{for_each_item, Spec};
use crate::cli::InspectArgs;
use crate::input::{read_header_locked, Input};
use crate::report::ItemReport;
use crate::select::{self, Want};
use hsmseal::envelope::file;
use hsmseal::envelope::slots::SlotKind;
use hsmseal::error::{count, Error, Result};
use serde::Serialize;

#[derive(Serialize)]
struct Inspection {
    path: String,
    action: &'static str,
    status: &'static str,
    format_version: u16,
    header_bytes: usize,
    payload: &'static str,
    key: String,
    key_version: u32,
    /// Which of the header's two envelopes is in force (0 or 1). The JSON
    /// name is kept from before "slot" came to mean only a PKCS#11 slot.
    envelope_slot: usize,
    envelope_sequence: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    file_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunks: Option<u64>,
    authenticated: bool,
    /// Every key slot in force, in order (a v1 file: its one envelope).
    slots: Vec<SlotInfo>,
}

#[derive(Serialize)]
struct SlotInfo {
    key: String,
    version: u32,
    /// "aes", "rsa-oaep" or "ec-p256".
    r#type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    oaep_hash: Option<&'static str>,
    /// `sha256:` and the hex SHA-256 of the public key's SPKI DER.
    #[serde(skip_serializing_if = "Option::is_none")]
    fingerprint: Option<String>,
}

pub fn run(app: &App, args: InspectArgs) -> Result<i32> {
    if args.deps {
        return super::deps::run_inspect(app, &args.inputs, &args.select, args.headers_only);
    }
    if !args.select.recursive.is_empty() {
        return summarise(app, &args.select);
    }
    let items = select::select(&args.inputs, &args.select, Want::Sealed, false)?.items;
    let spec = Spec {
        action: "inspect",
        json_summary: true,
        ..Default::default()
    };
    for_each_item(app, &spec, &items, |_, item, _| {
        let input = &item.input;
        let (h, _) = input.open_sealed()?;
        let (place, seq) = match &h {
            file::AnyHeader::V1(v) => (v.active().0, v.active().1.seq),
            file::AnyHeader::V2(v) => (v.active().0, v.active().1.seq),
        };
        let slots: Vec<SlotInfo> = h
            .slots()
            .iter()
            .map(|s| SlotInfo {
                key: s.kwk.name.clone(),
                version: s.kwk.version,
                r#type: s.kind.name(),
                oaep_hash: s.oaep.map(|o| o.name()),
                fingerprint: (s.kind != SlotKind::Aes)
                    .then(|| format!("sha256:{}", hsmseal::envelope::slots::hex(&s.fingerprint))),
            })
            .collect();
        let first = &slots[0];
        let file_bytes = match input {
            Input::File(p) => Some(
                std::fs::metadata(p)
                    .map_err(|e| Error::io(format!("cannot stat: {e}")))?
                    .len(),
            ),
            Input::Stdin => None,
        };
        let plaintext_bytes = match file_bytes {
            Some(len) => Some(file::plaintext_len_after(&h, len).ok_or_else(|| {
                Error::integrity(format!(
                    "file length {len} is impossible for an hsmseal file: truncated or extended"
                ))
            })?),
            None => None,
        };
        let info = Inspection {
            path: input.display(),
            action: "inspect",
            status: "ok",
            format_version: h.format_version(),
            header_bytes: h.len(),
            payload: "c2sp.org/chunked-encryption@v1 Cobblestone-256 (AES-256-GCM, HKDF-SHA-512, 16 KiB chunks)",
            key: first.key.clone(),
            key_version: first.version,
            envelope_slot: place,
            envelope_sequence: seq,
            file_bytes,
            plaintext_bytes,
            chunks: plaintext_bytes.map(|p| p / hsmseal::stream::CHUNK_SIZE as u64 + 1),
            authenticated: false,
            slots,
        };
        let json_line = crate::report::typed("item", &info);
        let mut text = format!(
            "{}\n  format:      hsmseal v{} ({} byte header)\n  payload:     {}",
            info.path, info.format_version, info.header_bytes, info.payload,
        );
        if info.format_version == 1 {
            text.push_str(&format!(
                "\n  key:         {} v{} (envelope {}, sequence {})",
                info.key, info.key_version, place, seq
            ));
        } else {
            text.push_str(&format!(
                "\n  slots:       {} (place {}, sequence {})",
                info.slots.len(),
                if place == 0 { "A" } else { "B" },
                seq
            ));
            for (i, s) in info.slots.iter().enumerate() {
                text.push_str(&format!(
                    "\n  slot {i}:      {} v{} ({}{})",
                    s.key,
                    s.version,
                    s.r#type,
                    s.fingerprint
                        .as_ref()
                        .map(|f| format!(", oaep {}, {f}", s.oaep_hash.unwrap_or("?")))
                        .unwrap_or_default()
                ));
            }
        }
        if let (Some(f), Some(p), Some(c)) = (info.file_bytes, info.plaintext_bytes, info.chunks) {
            text.push_str(&format!(
                "\n  size:        {} ({} of plaintext in {})",
                count(f, "byte", "bytes"),
                count(p, "byte", "bytes"),
                count(c, "chunk", "chunks")
            ));
        }
        text.push_str(
            "\n  note:        not authenticated; run `hsmseal verify` to check every byte",
        );
        Ok(ItemReport {
            path: info.path.clone(),
            action: "inspect",
            key: Some(info.key.clone()),
            version: Some(info.key_version),
            status: "ok",
            text: Some(text),
            json_line: Some(json_line),
            ..Default::default()
        })
    })
}

#[derive(Serialize, Default)]
struct KeyUse {
    key: String,
    version: u32,
    files: u64,
    bytes: u64,
}

/// `inspect -r DIR`: which key versions the hsmseal files under the
/// directories depend on, from their headers alone.
fn summarise(app: &App, sel: &crate::cli::SelectArgs) -> Result<i32> {
    let filter = crate::select::glob::Filter::new(&sel.include, &sel.exclude)?;
    use std::collections::BTreeMap;
    let mut uses: BTreeMap<(String, u32), KeyUse> = BTreeMap::new();
    let (mut files, mut other) = (0u64, 0u64);
    let mut damaged: Vec<serde_json::Value> = Vec::new();
    for dir in &sel.recursive {
        let files_before = files + damaged.len() as u64;
        for entry in crate::select::walk::entries_under(dir, &filter)? {
            let path = entry.path;
            if !matches!(entry.found, crate::select::walk::Found::File { .. }) {
                other += 1;
                continue;
            }
            // Same rule as the other commands under -r: a damaged hsmseal
            // file is reported (and makes the exit code 1), never counted
            // as some other file: this summary is what `key purge` relies on.
            let head = match crate::select::walk::sniff(&path) {
                Ok(h) => h,
                Err(e) => {
                    damaged.push(serde_json::json!({
                        "path": path.display().to_string(), "error": format!("cannot read: {e}")
                    }));
                    continue;
                }
            };
            match crate::select::walk::classify(&head, &path, &sel.suffix) {
                crate::select::walk::Kind::Sealed => {}
                crate::select::walk::Kind::Damaged(e) => {
                    damaged.push(serde_json::json!({
                        "path": path.display().to_string(), "error": e.message()
                    }));
                    continue;
                }
                crate::select::walk::Kind::Other => {
                    other += 1;
                    continue;
                }
            }
            files += 1;
            let parsed = std::fs::File::open(&path)
                .map_err(|e| Error::io(format!("cannot open: {e}")))
                .and_then(|f| read_header_locked(&f, &path));
            match parsed {
                Ok(h) => {
                    for k in &h.keys() {
                        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                        let u = uses
                            .entry((k.name.clone(), k.version))
                            .or_insert_with(|| KeyUse {
                                key: k.name.clone(),
                                version: k.version,
                                ..Default::default()
                            });
                        u.files += 1;
                        u.bytes += len;
                    }
                }
                Err(e) => damaged.push(serde_json::json!({
                    "path": path.display().to_string(), "error": e.message()
                })),
            }
        }
        if files + damaged.len() as u64 == files_before && !sel.allow_empty {
            return Err(Error::usage(format!(
                "-r {}: no hsmseal files; an empty or unmounted directory must not pass for one whose files need no key: check the path (and --include/--exclude), or pass --allow-empty if nothing there is expected",
                dir.display()
            )));
        }
    }
    let keys: Vec<&KeyUse> = uses.values().collect();
    if app.json {
        for u in &keys {
            crate::report::emit("dependency", u);
        }
        for d in &damaged {
            crate::report::emit(
                "item",
                &serde_json::json!({
                    "path": d["path"], "action": "inspect", "status": "failed",
                    "error": d["error"], "exit_code": hsmseal::error::ErrorKind::Format.exit_code(),
                }),
            );
        }
        crate::report::emit(
            "summary",
            &serde_json::json!({
                "action": "inspect",
                "hsmseal_files": files, "other_files": other, "damaged": damaged.len(),
                "versions": keys.len(), "authenticated": false,
            }),
        );
    } else {
        crate::outln!(
            "{} ({} skipped)",
            count(files, "hsmseal file", "hsmseal files"),
            count(other, "other file", "other files")
        );
        crate::outln!(
            "{:<24} {:>7} {:>10} {:>16}",
            "KEY",
            "VERSION",
            "FILES",
            "BYTES"
        );
        for u in &keys {
            crate::outln!(
                "{:<24} {:>7} {:>10} {:>16}",
                u.key,
                u.version,
                u.files,
                u.bytes
            );
        }
        for d in &damaged {
            crate::outln!(
                "damaged: {} ({})",
                d["path"].as_str().unwrap_or(""),
                d["error"].as_str().unwrap_or("")
            );
        }
    }
    Ok(if damaged.is_empty() { 0 } else { 1 })
}
