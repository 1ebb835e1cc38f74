//! Concurrent appends to one audit log through the real SoftHSM2 token, in
//! one process: threads sharing one `Hsm` (one session pool) and threads
//! with an `Hsm` each (sessions of their own, as separate processes have).
//! The log's `flock` serialises them; every entry must be there once, in
//! one unbroken chain that matches the HSM head.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once per process, so this binary has one
//! token and one test.

mod support;

use hsmseal::audit::{self, Record};
use hsmseal::hsm::Hsm;
use hsmseal::secret::Pin;
use std::collections::BTreeSet;
use std::path::Path;
use support::TestToken;

fn open(t: &TestToken) -> Hsm {
    let h = Hsm::open(&t.module, &t.label).expect("open token");
    h.login(&Pin::new(t.pin.clone())).expect("login");
    h
}

fn rec(command: String) -> Record {
    Record {
        command,
        ok: 1,
        result: "ok",
        ..Default::default()
    }
}

#[test]
fn threads_appending_at_once_leave_every_entry_in_one_chain() {
    let t = TestToken::new_in(Path::new(env!("CARGO_TARGET_TMPDIR")));
    std::env::set_var("SOFTHSM2_CONF", &t.conf);
    let shared = open(&t);
    shared.create_audit_key().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    audit::append(&shared, &log, &rec("audit init".into()), true).unwrap();
    const PER_THREAD: usize = 25;
    std::thread::scope(|s| {
        for w in 0..4 {
            let (shared, log, t) = (&shared, &log, &t);
            s.spawn(move || {
                let own;
                let hsm = if w % 2 == 0 {
                    shared
                } else {
                    own = open(t);
                    &own
                };
                for i in 0..PER_THREAD {
                    audit::check(hsm, log).unwrap();
                    audit::append(hsm, log, &rec(format!("w{w}-{i}")), false).unwrap();
                }
            });
        }
    });
    let r = audit::verify(&shared, &log).unwrap();
    assert!(r.intact && r.note.is_none(), "{r:?}");
    assert_eq!(r.entries, 1 + 4 * PER_THREAD);
    assert_eq!(r.head_seq, Some((4 * PER_THREAD) as u64));
    let commands: BTreeSet<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["command"].as_str().unwrap().to_string()
        })
        .collect();
    let want: BTreeSet<String> = (0..4)
        .flat_map(|w| (0..PER_THREAD).map(move |i| format!("w{w}-{i}")))
        .chain(["audit init".to_string()])
        .collect();
    assert_eq!(commands, want);
}
