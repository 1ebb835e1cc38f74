//! The audit log against an HMAC key and head records in memory: line
//! layout, tampering classified, torn tails repaired, concurrent appends.

use super::line::{MAC_SUFFIX_LEN, MAX_LINE};
use super::log::absolute;
use super::*;
use hmac::{Hmac, Mac};
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::path::Path;
use std::sync::Mutex;

/// The HSM's part in memory: an HMAC key and a map of heads.
struct Memory {
    key: [u8; 32],
    heads: Mutex<HashMap<String, Head>>,
}

impl Memory {
    fn new(key: u8) -> Memory {
        Memory {
            key: [key; 32],
            heads: Mutex::new(HashMap::new()),
        }
    }
}

impl AuditBackend for Memory {
    fn check_audit_key(&self) -> Result<()> {
        Ok(())
    }
    fn audit_mac(&self, data: &[u8]) -> Result<[u8; 32]> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.key).unwrap();
        m.update(data);
        Ok(m.finalize().into_bytes().into())
    }
    fn audit_check_mac(&self, data: &[u8], mac: &[u8; 32]) -> Result<bool> {
        Ok(self.audit_mac(data)? == *mac)
    }
    fn audit_head(&self, log_id: &str) -> Result<Option<Head>> {
        Ok(self.heads.lock().unwrap().get(log_id).cloned())
    }
    fn set_audit_head(&self, log_id: &str, head: &Head) -> Result<()> {
        self.heads
            .lock()
            .unwrap()
            .insert(log_id.to_string(), head.clone());
        Ok(())
    }
    fn audit_heads_for_path(&self, path: &str) -> Result<Vec<(String, Head)>> {
        Ok(self
            .heads
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, h)| h.path == path)
            .map(|(id, h)| (id.clone(), h.clone()))
            .collect())
    }
}

fn rec(command: &str) -> Record {
    Record {
        command: command.into(),
        keys: vec!["k v1".into(), "weird \"name\"\n v2".into()],
        ok: 2,
        bytes: 10,
        result: "ok",
        error: Some("a.hseal: authentication failed\nsecond line".into()),
        ..Default::default()
    }
}

fn log_of(n: usize) -> (Memory, tempfile::TempDir, std::path::PathBuf) {
    let m = Memory::new(7);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.log");
    for i in 0..n {
        assert_eq!(
            append(&m, &p, &rec(&format!("c{i}")), false).unwrap(),
            i as u64
        );
    }
    (m, dir, p)
}

fn problem_of(m: &Memory, p: &Path) -> Option<(usize, ProblemKind)> {
    let r = verify(m, p).unwrap();
    assert_eq!(r.intact, r.problem.is_none());
    r.problem.map(|p| (p.line, p.kind))
}

fn rewrite(p: &Path, f: impl FnOnce(&mut Vec<String>)) {
    let mut l: Vec<String> = fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    f(&mut l);
    let mut t = l.join("\n");
    t.push('\n');
    fs::write(p, t).unwrap();
}

#[test]
fn lines_have_the_fixed_layout_and_the_mac_covers_everything_before_it() {
    let (m, _d, p) = log_of(2);
    let text = fs::read_to_string(&p).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("{\"v\":1,\"log\":\""), "{}", lines[0]);
    assert!(lines[0].contains(&format!("\"prev\":\"{}\"", "0".repeat(64))));
    let at = lines[1].find(",\"mac\":\"").unwrap();
    assert_eq!(at, lines[1].len() - MAC_SUFFIX_LEN);
    let mac = m.audit_mac(&lines[1].as_bytes()[..at]).unwrap();
    assert!(lines[1].ends_with(&format!("\"mac\":\"{}\"}}", hex(&mac))));
    assert!(lines[1].contains(&format!(
        "\"prev\":\"{}\"",
        hex(&sha256(lines[0].as_bytes()))
    )));
    // Newlines in values are escaped: one entry, one line.
    assert_eq!(lines.len(), 2);
    let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(v["keys"][1], "weird \"name\"\n v2");
    let order: Vec<&str> = [
        "v",
        "log",
        "seq",
        "time",
        "user",
        "host",
        "pid",
        "command",
        "keys",
        "items",
        "bytes",
        "hsm_calls",
        "seconds",
        "result",
        "exit_code",
        "error",
        "prev",
        "mac",
    ]
    .to_vec();
    let mut pos = 0;
    for f in order {
        let i = lines[1][pos..]
            .find(&format!("\"{f}\":"))
            .unwrap_or_else(|| panic!("{f} out of order"));
        pos += i;
    }
    assert_eq!(problem_of(&m, &p), None);
}

#[test]
fn tampering_is_classified() {
    type Edit = fn(&mut Vec<String>);
    let cases: [(Edit, usize, ProblemKind); 9] = [
        (
            |l| l[2] = l[2].replace("\"bytes\":10", "\"bytes\":12"),
            3,
            ProblemKind::Edited,
        ),
        (
            |l| l[0] = l[0].replace("\"c0\"", "\"cX\""),
            1,
            ProblemKind::Edited,
        ),
        (|l| drop(l.remove(2)), 3, ProblemKind::Deleted),
        (|l| drop(l.drain(1..3)), 2, ProblemKind::Deleted),
        (|l| l.insert(3, l[1].clone()), 4, ProblemKind::Inserted),
        (|l| l.push(l[0].clone()), 6, ProblemKind::Inserted),
        (|l| l.swap(1, 2), 2, ProblemKind::Reordered),
        (|l| drop(l.pop()), 5, ProblemKind::Truncated),
        (|l| l[3] = "garbage".into(), 4, ProblemKind::Edited),
    ];
    for (i, (edit, line, kind)) in cases.into_iter().enumerate() {
        let (m, _d, p) = log_of(5);
        rewrite(&p, edit);
        assert_eq!(problem_of(&m, &p), Some((line, kind)), "case {i}");
        // Appending checks only the end of the log against the head
        // (a full check would cost an HSM call per line): a log whose
        // end changed is refused, a change in the middle is left to
        // `audit verify`.
        if line < 5 {
            continue;
        }
        let before = fs::read(&p).unwrap();
        let e = append(&m, &p, &rec("x"), false).unwrap_err();
        assert_eq!(
            e.kind(),
            crate::error::ErrorKind::Integrity,
            "case {i}: {e}"
        );
        assert!(e.message().contains("hsmseal audit verify"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), before);
    }
}

#[test]
fn a_line_cut_short_and_a_log_from_another_key() {
    let (m, _d, p) = log_of(3);
    let text = fs::read(&p).unwrap();
    fs::write(&p, &text[..text.len() - 10]).unwrap();
    assert_eq!(problem_of(&m, &p), Some((3, ProblemKind::Truncated)));
    fs::write(&p, &text).unwrap();
    let other = Memory::new(8);
    *other.heads.lock().unwrap() = m.heads.lock().unwrap().clone();
    assert_eq!(problem_of(&other, &p), Some((1, ProblemKind::Edited)));
    // The head gone: not intact either.
    m.heads.lock().unwrap().clear();
    assert_eq!(problem_of(&m, &p), Some((3, ProblemKind::NoHead)));
}

#[test]
fn the_crash_window_between_line_and_head_is_accepted_once() {
    let (m, _d, p) = log_of(3);
    let id = m.heads.lock().unwrap().keys().next().unwrap().clone();
    // As if the run that wrote line 3 died before updating the head.
    let lines: Vec<String> = fs::read_to_string(&p)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let behind = Head {
        seq: 1,
        hash: sha256(lines[1].as_bytes()),
        path: absolute(&p).unwrap(),
    };
    m.set_audit_head(&id, &behind).unwrap();
    let r = verify(&m, &p).unwrap();
    assert!(r.intact && r.note.is_some(), "{r:?}");
    // The next append accepts it and brings the head up to date.
    assert_eq!(append(&m, &p, &rec("after"), false).unwrap(), 3);
    let r = verify(&m, &p).unwrap();
    assert!(r.intact && r.note.is_none(), "{r:?}");
    // Two behind is not a crash: refused.
    let two_behind = Head { seq: 1, ..behind };
    m.set_audit_head(&id, &two_behind).unwrap();
    assert_eq!(problem_of(&m, &p), Some((3, ProblemKind::Inserted)));
    assert!(append(&m, &p, &rec("x"), false).is_err());
}

#[test]
fn a_deleted_log_is_not_silently_restarted() {
    let (m, _d, p) = log_of(2);
    fs::remove_file(&p).unwrap();
    assert_eq!(problem_of(&m, &p), Some((1, ProblemKind::Truncated)));
    assert!(check(&m, &p).is_err());
    assert!(append(&m, &p, &rec("x"), false).is_err());
    // `audit init` (new_log_ok) starts a new log with a new id.
    assert_eq!(append(&m, &p, &rec("audit init"), true).unwrap(), 0);
    assert_eq!(problem_of(&m, &p), None);
    assert_eq!(m.heads.lock().unwrap().len(), 2);
}

#[test]
fn concurrent_appends_are_serialised_by_the_lock() {
    let (m, _d, p) = log_of(1);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (m, p) = (&m, &p);
            s.spawn(move || {
                for i in 0..10 {
                    append(m, p, &rec(&format!("t{t}-{i}")), false).unwrap();
                }
            });
        }
    });
    let r = verify(&m, &p).unwrap();
    assert!(r.intact, "{r:?}");
    assert_eq!(r.entries, 41);
}

#[test]
fn heads_round_trip() {
    let h = Head {
        seq: 42,
        hash: [0xab; 32],
        path: "/var/log/with space/audit.log".into(),
    };
    assert_eq!(Head::decode(&h.encode()), Some(h.clone()));
    assert_eq!(Head::decode(b"v2 1 00"), None);
    assert_eq!(Head::decode(b"v1 -1 00"), None);
}

fn log_id_of(m: &Memory) -> String {
    m.heads.lock().unwrap().keys().next().unwrap().clone()
}

fn append_bytes(p: &Path, b: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(p).unwrap();
    std::io::Write::write_all(&mut f, b).unwrap();
}

/// Line `i` (0-based) of the log, without its `\n`.
fn line_of(p: &Path, i: usize) -> Vec<u8> {
    fs::read(p)
        .unwrap()
        .split(|&b| b == b'\n')
        .nth(i)
        .unwrap()
        .to_vec()
}

#[test]
fn a_torn_tail_is_repaired_by_the_next_append_and_the_repair_is_logged() {
    let (m, _d, p) = log_of(3);
    let before = fs::read(&p).unwrap();
    // What a write cut short by a kill or a full disk leaves: the start
    // of the next line, no `\n`, the head still naming line 3.
    let torn = b"{\"v\":1,\"log\":\"0123456789abcdef\",\"seq\":3,\"ti";
    append_bytes(&p, torn);
    let r = verify(&m, &p).unwrap();
    assert!(r.intact && r.entries == 3, "{r:?}");
    let note = r.note.unwrap();
    assert!(
        note.contains("line 4 is an incomplete line of 43 bytes"),
        "{note}"
    );
    check(&m, &p).unwrap();
    assert_eq!(append(&m, &p, &rec("next"), false).unwrap(), 4);
    let after = fs::read(&p).unwrap();
    assert!(after.starts_with(&before) && after.ends_with(b"\n"));
    assert!(!after.windows(torn.len()).any(|w| w == torn));
    let r = verify(&m, &p).unwrap();
    assert!(r.intact && r.note.is_none() && r.entries == 5, "{r:?}");
    assert_eq!(r.repairs.len(), 1);
    assert_eq!((r.repairs[0].line, r.repairs[0].bytes), (4, 43));
    assert!(
        r.repairs[0].detail.contains(&hex(&sha256(torn))),
        "{:?}",
        r.repairs[0]
    );
    let v: serde_json::Value = serde_json::from_slice(&line_of(&p, 3)).unwrap();
    assert_eq!(v["command"], REPAIR_COMMAND);
    assert_eq!(v["result"], "repaired");
    assert_eq!(v["seq"], 3);
    // The head names the run's own line.
    let id = log_id_of(&m);
    assert_eq!(m.heads.lock().unwrap()[&id].seq, 4);
}

#[test]
fn a_torn_tail_after_the_crash_window_and_junk_are_repaired_too() {
    // Head one behind (a run killed after its fsync), then a torn tail.
    let (m, _d, p) = log_of(3);
    let id = log_id_of(&m);
    let behind = Head {
        seq: 1,
        hash: sha256(&line_of(&p, 1)),
        path: absolute(&p).unwrap(),
    };
    m.set_audit_head(&id, &behind).unwrap();
    append_bytes(&p, b"junk that is not a line");
    let r = verify(&m, &p).unwrap();
    assert!(r.intact, "{r:?}");
    let note = r.note.unwrap();
    assert!(
        note.contains("one entry behind") && note.contains("incomplete"),
        "{note}"
    );
    assert_eq!(append(&m, &p, &rec("next"), false).unwrap(), 4);
    let r = verify(&m, &p).unwrap();
    assert!(r.intact && r.note.is_none() && r.entries == 5, "{r:?}");
    assert_eq!(r.repairs.len(), 1);
}

#[test]
fn a_line_missing_only_its_newline_is_completed_not_removed() {
    let (m, _d, p) = log_of(3);
    let id = log_id_of(&m);
    let full = fs::read(&p).unwrap();
    // Cut short just before the `\n`, in the crash window (head behind)
    // and after the head was set: both times the line is kept.
    for behind in [true, false] {
        fs::write(&p, &full[..full.len() - 1]).unwrap();
        if behind {
            let h = Head {
                seq: 1,
                hash: sha256(&line_of(&p, 1)),
                path: absolute(&p).unwrap(),
            };
            m.set_audit_head(&id, &h).unwrap();
        }
        let r = verify(&m, &p).unwrap();
        assert!(r.intact && r.entries == 3, "{r:?}");
        assert!(r.note.unwrap().contains("lacks its final newline"));
        check(&m, &p).unwrap();
        assert_eq!(append(&m, &p, &rec("next"), false).unwrap(), 3);
        let r = verify(&m, &p).unwrap();
        assert!(r.intact && r.note.is_none() && r.entries == 4, "{r:?}");
        assert!(r.repairs.is_empty());
        assert!(fs::read(&p).unwrap().starts_with(&full));
        fs::write(&p, &full).unwrap();
        let h = Head {
            seq: 2,
            hash: sha256(&line_of(&p, 2)),
            path: absolute(&p).unwrap(),
        };
        m.set_audit_head(&id, &h).unwrap();
    }
}

#[test]
fn repair_cannot_delete_an_authenticated_line() {
    let (m, _d, p) = log_of(3);
    let full = fs::read(&p).unwrap();
    let last_len = line_of(&p, 2).len();
    // The last line, which the head names, cut short by any amount:
    // that is truncation, never a torn tail to remove.
    for cut in [2, 10, last_len / 2, last_len] {
        fs::write(&p, &full[..full.len() - cut]).unwrap();
        assert_eq!(
            problem_of(&m, &p),
            Some((3, ProblemKind::Truncated)),
            "cut {cut}"
        );
        let e = check(&m, &p).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Integrity, "{e}");
        let e = append(&m, &p, &rec("x"), false).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Integrity, "{e}");
        assert_eq!(fs::read(&p).unwrap(), &full[..full.len() - cut]);
    }
    // An authenticated earlier line appended without its `\n`: it does
    // not carry on the chain, so it is junk to the repair, which records
    // its hash; nothing before it changes.
    fs::write(&p, &full).unwrap();
    let copy = line_of(&p, 1);
    append_bytes(&p, &copy);
    append(&m, &p, &rec("x"), false).unwrap();
    let r = verify(&m, &p).unwrap();
    assert!(r.intact && r.entries == 5, "{r:?}");
    assert!(r.repairs[0].detail.contains(&hex(&sha256(&copy))));
    assert!(fs::read(&p).unwrap().starts_with(&full));
    // More than a line without a `\n` is no torn line.
    let (m, _d, p) = log_of(3);
    append_bytes(&p, &vec![b'x'; MAX_LINE + 1]);
    assert_eq!(problem_of(&m, &p), Some((4, ProblemKind::Inserted)));
    assert!(check(&m, &p).is_err());
    assert!(append(&m, &p, &rec("x"), false).is_err());
}

#[test]
fn the_current_head_is_the_highest() {
    let h = |seq, b| Head {
        seq,
        hash: [b; 32],
        path: "/l".into(),
    };
    assert_eq!(current_head(vec![]), Ok(None));
    assert_eq!(current_head(vec![h(4, 1), h(5, 2)]), Ok(Some(h(5, 2))));
    assert_eq!(current_head(vec![h(5, 2), h(4, 1)]), Ok(Some(h(5, 2))));
    assert_eq!(current_head(vec![h(5, 2), h(5, 2)]), Ok(Some(h(5, 2))));
    assert!(current_head(vec![h(5, 2), h(5, 3), h(1, 1)]).is_err());
}

#[test]
fn a_run_with_too_many_keys_still_gets_one_line() {
    let (m, _d, p) = log_of(1);
    let mut r = rec("many");
    r.keys = (0..10_000).map(|i| format!("key-{i:05} v1")).collect();
    append(&m, &p, &r, false).unwrap();
    let line = line_of(&p, 1);
    assert!(line.len() <= MAX_LINE, "{}", line.len());
    let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
    let keys = v["keys"].as_array().unwrap();
    let kept = keys.len() - 1;
    assert!(kept > 100, "{kept}");
    assert_eq!(keys[kept], format!("+{} more", 10_000 - kept));
    assert_eq!(problem_of(&m, &p), None);
}
