//! Bulk-decrypt guardrails (issue 12, item 5): per-key limits on how much
//! one run may decrypt, checked before anything is released.
//!
//! A [`Guard`] holds the configured [`Limits`] per key name and what the
//! run has been charged so far. Callers charge *before* releasing: a whole
//! plan up front where the amounts are known ([`Guard::charge`] with every
//! file of a run, before the first is opened), or per unit as they go for
//! streams. A charge that would pass a limit is refused as a whole and
//! charges nothing, so what was released never exceeds a limit. With
//! `overridden` the limits are reported but not enforced; the caller logs
//! that the override was used (the audit entry's command names it).
//!
//! Invariants: counters only grow; a charge is atomic against other
//! threads of the run (one mutex); a key with no configured limits is
//! never refused. This is a brake on mistakes and scripted misuse of the
//! CLI, not a security boundary: whoever holds the PIN can call PKCS#11
//! directly (docs/SECURITY.md, "Bulk-decrypt limits").

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The most one run may decrypt under one key; `None`: no limit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Files (or streams) decrypted.
    pub max_items: Option<u64>,
    /// Column cells decrypted.
    pub max_cells: Option<u64>,
    /// Bytes of decrypted output (for files, the ciphertext size is
    /// charged: an upper bound known before decrypting).
    pub max_bytes: Option<u64>,
}

/// An amount charged to one key.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub items: u64,
    pub cells: u64,
    pub bytes: u64,
}

/// The limits of a run and what it was charged.
#[derive(Debug, Default)]
pub struct Guard {
    limits: BTreeMap<String, Limits>,
    overridden: bool,
    used: Mutex<BTreeMap<String, Usage>>,
    /// Charges that passed a limit and went through only because of the
    /// override.
    exceeded: Mutex<Vec<String>>,
}

impl Guard {
    /// `limits` per key name; `overridden`: report, do not enforce.
    pub fn new(limits: BTreeMap<String, Limits>, overridden: bool) -> Guard {
        Guard {
            limits,
            overridden,
            ..Guard::default()
        }
    }

    /// True if any key has a limit.
    pub fn is_active(&self) -> bool {
        self.limits.values().any(|l| *l != Limits::default())
    }

    /// Charges `amount` to `key` if that keeps it within its limits; else
    /// refuses (charging nothing) with a one-line error naming the key, the
    /// limit, the amount and the override; with the override, charges it
    /// and records the excess instead.
    pub fn charge(&self, key: &str, amount: Usage) -> Result<()> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let now = used.get(key).copied().unwrap_or_default();
        let after = Usage {
            items: now.items.saturating_add(amount.items),
            cells: now.cells.saturating_add(amount.cells),
            bytes: now.bytes.saturating_add(amount.bytes),
        };
        if let Some(over) = self.over(key, &after) {
            if !self.overridden {
                return Err(Error::usage(format!(
                    "refusing to decrypt: this run would decrypt {over} under key {key}, over its limit in hsmseal.toml [limits.{key}]; nothing more was decrypted. If this is intended, run again with --override-limits (the audit log records it)"
                )));
            }
            self.exceeded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("key {key}: {over}"));
        }
        used.insert(key.to_string(), after);
        Ok(())
    }

    /// What passes a limit of `key` at `u`, in words.
    fn over(&self, key: &str, u: &Usage) -> Option<String> {
        let l = self.limits.get(key)?;
        let mut parts = Vec::new();
        for (what, value, max) in [
            ("items", u.items, l.max_items),
            ("cells", u.cells, l.max_cells),
            ("bytes", u.bytes, l.max_bytes),
        ] {
            if let Some(max) = max {
                if value > max {
                    parts.push(format!("{value} {what} (max_{what} = {max})"));
                }
            }
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    /// The limits of `key` (default: none).
    pub fn limits(&self, key: &str) -> Limits {
        self.limits.get(key).copied().unwrap_or_default()
    }

    /// What was charged, per key.
    pub fn used(&self) -> BTreeMap<String, Usage> {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The charges the override let through (empty without override, or
    /// if nothing passed a limit).
    pub fn exceeded(&self) -> Vec<String> {
        self.exceeded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn overridden(&self) -> bool {
        self.overridden
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(overridden: bool) -> Guard {
        let mut m = BTreeMap::new();
        m.insert(
            "pii".to_string(),
            Limits {
                max_items: Some(2),
                max_cells: None,
                max_bytes: Some(100),
            },
        );
        Guard::new(m, overridden)
    }

    fn items(n: u64, bytes: u64) -> Usage {
        Usage {
            items: n,
            bytes,
            ..Usage::default()
        }
    }

    #[test]
    fn a_charge_over_a_limit_is_refused_whole_and_charges_nothing() {
        let g = guard(false);
        assert!(g.is_active());
        g.charge("pii", items(1, 60)).unwrap();
        let e = g.charge("pii", items(1, 41)).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Usage);
        assert!(
            e.message().contains("101 bytes (max_bytes = 100)"),
            "{}",
            e.message()
        );
        assert!(e.message().contains("[limits.pii]"), "{}", e.message());
        assert!(!e.message().contains('\n'));
        // Nothing was charged by the refusal: a smaller one still fits.
        g.charge("pii", items(1, 40)).unwrap();
        assert!(g.charge("pii", items(1, 0)).is_err(), "a third item");
        assert_eq!(g.used()["pii"], items(2, 100));
        // Keys without limits are never refused.
        g.charge("other", items(1_000, u64::MAX)).unwrap();
        g.charge("other", items(1, 1)).unwrap();
        assert!(g.exceeded().is_empty());
    }

    #[test]
    fn the_override_charges_and_records_the_excess() {
        let g = guard(true);
        g.charge("pii", items(3, 10)).unwrap();
        assert_eq!(g.exceeded(), ["key pii: 3 items (max_items = 2)"]);
        assert!(g.overridden());
        assert!(!Guard::new(BTreeMap::new(), false).is_active());
    }

    #[test]
    fn concurrent_charges_never_pass_a_limit() {
        let mut m = BTreeMap::new();
        m.insert(
            "k".to_string(),
            Limits {
                max_cells: Some(1000),
                ..Limits::default()
            },
        );
        let g = Guard::new(m, false);
        let ok = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..400 {
                        let cells = Usage {
                            cells: 1,
                            ..Usage::default()
                        };
                        if g.charge("k", cells).is_ok() {
                            ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(ok.into_inner(), 1000);
        assert_eq!(g.used()["k"].cells, 1000);
    }
}
