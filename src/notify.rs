//! The library's one way to tell the person running it something that is
//! not an error while it works: a wait on another process (a file's lock,
//! a FIFO without a reader yet) or a clean-up (a stale temporary file of a
//! killed run removed).
//!
//! Invariants: the library never prints; a program installs a notifier
//! with [`set_notifier`] (the `hsmseal` binary prints each notice on stderr
//! unless `--quiet`), and without one notices are dropped. A notice names
//! files and processes only, never a secret. The notifier runs on the
//! thread that waits, while the library holds no lock of its own, so it
//! may take as long as it likes but must not call back into the library.

use std::sync::RwLock;

type Notifier = Box<dyn Fn(&str) + Send + Sync>;

static NOTIFIER: RwLock<Option<Notifier>> = RwLock::new(None);

/// Makes `f` receive every notice from now on (replacing any notifier).
/// Messages are one line without a program-name prefix, e.g. `waiting for
/// a.hseal: another process is changing it (it holds the file's lock)`.
pub fn set_notifier(f: impl Fn(&str) + Send + Sync + 'static) {
    *NOTIFIER.write().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(f));
}

/// Drops notices from now on.
pub fn clear_notifier() {
    *NOTIFIER.write().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Hands `msg` to the notifier, if one is installed.
pub(crate) fn notice(msg: &str) {
    if let Some(f) = NOTIFIER.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
        f(msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    /// The notifier is process-wide: these tests take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn notices_reach_the_notifier_and_none_without_one() {
        let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        set_notifier(move |m| sink.lock().unwrap().push(m.to_string()));
        notice("one");
        clear_notifier();
        notice("two");
        let seen = seen.lock().unwrap();
        assert!(seen.iter().any(|m| m == "one"), "{seen:?}");
        assert!(!seen.iter().any(|m| m == "two"), "{seen:?}");
    }

    /// Worker threads give notices while the notifier is being replaced:
    /// every notice reaches exactly one notifier (the lock makes the swap
    /// and the calls exclusive), none is lost or doubled.
    #[test]
    fn notices_from_many_threads_while_the_notifier_changes() {
        let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let count = Arc::new(AtomicUsize::new(0));
        let install = |count: &Arc<AtomicUsize>| {
            let c = count.clone();
            set_notifier(move |m| {
                if m == "tick" {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        install(&count);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..500 {
                        notice("tick");
                    }
                });
            }
            for _ in 0..200 {
                install(&count);
            }
        });
        clear_notifier();
        assert_eq!(count.load(Ordering::Relaxed), 2000);
    }
}
