//! Bulk runs: the loop that processes a command's items (`crate::select`)
//! on `--jobs` worker threads, the progress bar, and the summary.
//!
//! - Workers: `min(jobs, items)` threads take items in turn; each borrows its
//!   own HSM session from the pool while it wraps or unwraps. With one worker
//!   (one item, or `--jobs 1`) a file's payload crypto uses `jobs` threads
//!   instead, so a single big file still uses every core.
//! - Output: what a run writes does not depend on the number of workers:
//!   every item's output file depends on that item alone, and the per-item
//!   lines (`--json` objects, stdout results, stderr notes and errors) are
//!   printed in input order, each as soon as every item before it is done.
//!   With `--json` a final `{"type":"summary", ...}` line follows them (on
//!   stderr instead of stdout when the command's data goes to stdout; stderr
//!   then carries JSON lines only).
//! - Failures: a failed item is reported and the run goes on; the exit code
//!   is 1 if any failed. A run of exactly one item exits with that item's
//!   own error code instead (as if it had been run alone). An error that
//!   would be the same for every item (the HSM could not be opened: module
//!   missing, token not found, wrong PIN: `App::hsm_failure`) is not an
//!   item's: no new item starts, items after it are not reported, and the
//!   run ends with that error and its own exit code, said once.
//! - Progress: a bar on stderr when stderr is a terminal and `--quiet` is not
//!   given (bytes/s, items done and failed, ETA); nothing otherwise.

use crate::app::App;
use crate::report::ItemReport;
use crate::select::{Item, Verdict};
use hsmseal::error::{Error, Result};
use hsmseal::stream::StreamOptions;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// What the summary says besides the common counts.
#[derive(Default)]
pub struct Spec {
    /// `encrypt`, `decrypt`, ...
    pub action: &'static str,
    /// The progress bar counts payload bytes (else items).
    pub bytes_progress: bool,
    /// Print the `--json` summary line (inspect prints its own objects only).
    pub json_summary: bool,
    /// Show a progress bar (on a terminal, without --quiet).
    pub bar: bool,
    /// The command writes its data to stdout (`-o -`, stdin to stdout): the
    /// `--json` lines then go to stderr so they never mix with the data.
    pub data_on_stdout: bool,
    /// Summary keys counting items by status: (key, status).
    pub status_counts: &'static [(&'static str, &'static str)],
    /// Further summary fields.
    pub extra: Vec<(&'static str, serde_json::Value)>,
}

/// Runs `work` on every item (see the module documentation). `work` gets
/// the stream options for the item's payload (thread count, progress
/// counter) with the item and its index, and returns the item's report. Returns the exit code: 0, 1 if
/// some items failed, or the single item's error.
pub fn for_each_item(
    app: &App,
    spec: &Spec,
    items: &[Item],
    work: impl Fn(usize, &Item, &StreamOptions) -> Result<ItemReport> + Sync,
) -> Result<i32> {
    if spec.data_on_stdout {
        crate::report::json_on_stderr();
    }
    let workers = app.jobs.max(1).min(items.len()).max(1);
    let progress_bytes = AtomicU64::new(0);
    let opts = StreamOptions {
        threads: if workers > 1 { 1 } else { app.jobs },
        progress: Some(&progress_bytes),
    };
    if items.is_empty() && !app.quiet {
        crate::report::diag(format!("hsmseal: {}: no files selected", spec.action));
    }
    let bar = Bar::new(app, spec, items);
    let mut tally = Tally::default();
    let mut single_error = None;
    let mut run_error = None;
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel::<(usize, Result<ItemReport>)>();
    std::thread::scope(|s| {
        for w in 0..workers {
            let tx = tx.clone();
            let (next, work, opts) = (&next, &work, &opts);
            std::thread::Builder::new()
                .name(format!("hsmseal-worker-{w}"))
                .spawn_scoped(s, move || loop {
                    if app.hsm_failure().is_some() {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = match &item.verdict {
                        None => work(i, item, opts),
                        Some(Verdict::Fail(e)) => Err(e.clone()),
                        Some(Verdict::Skip(why)) => Ok(ItemReport {
                            path: item.display(),
                            action: spec.action,
                            status: "skipped",
                            reason: Some(why.clone()),
                            ..Default::default()
                        }),
                    };
                    // Counted as soon as it is done, not when its report is
                    // printed in order: an interrupted run's audit entry
                    // must count every output already in place.
                    let run_wide = matches!(&r, Err(e) if app.is_hsm_failure(e));
                    match &r {
                        Ok(report) => app.stats.record(report),
                        Err(_) if run_wide => {}
                        Err(_) => {
                            app.stats.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if tx.send((i, r)).is_err() || run_wide {
                        break;
                    }
                })
                .expect("spawn a worker thread");
        }
        drop(tx);
        // Collect on this thread; print in input order.
        let mut pending = BTreeMap::new();
        let mut next_out = 0;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok((i, r)) => {
                    pending.insert(i, r);
                    while let Some(r) = pending.remove(&next_out) {
                        let item = &items[next_out];
                        next_out += 1;
                        if run_error.is_some() {
                            // The run has stopped: later items go unsaid.
                            continue;
                        }
                        match r {
                            Err(e) if app.is_hsm_failure(&e) => run_error = Some(e),
                            r => {
                                if let Some(e) =
                                    finish(app, spec, item, r, items.len(), &mut tally, &bar)
                                {
                                    single_error = Some(e);
                                }
                            }
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            bar.update(&tally, progress_bytes.load(Ordering::Relaxed));
        }
    });
    bar.finish();
    if let Some(e) = run_error {
        return Err(e);
    }
    summary(app, spec, items.len(), workers, &tally);
    if let Some(e) = single_error {
        return Err(e);
    }
    if tally.failed == 0 {
        Ok(0)
    } else {
        // With --json the summary line says it.
        if !crate::report::stderr_is_json() {
            eprintln!("hsmseal: {} of {} items failed", tally.failed, items.len());
        }
        Ok(1)
    }
}

#[derive(Default)]
struct Tally {
    done: u64,
    ok: u64,
    skipped: u64,
    failed: u64,
    bytes: u64,
    statuses: BTreeMap<&'static str, u64>,
}

/// Reports one finished item. Returns its error for a single-item run.
fn finish(
    app: &App,
    spec: &Spec,
    item: &Item,
    r: Result<ItemReport>,
    n_items: usize,
    tally: &mut Tally,
    bar: &Bar,
) -> Option<Error> {
    tally.done += 1;
    match r {
        Ok(mut report) => {
            if report.status == "skipped" || report.status == "unchanged" {
                tally.skipped += 1;
            } else {
                tally.ok += 1;
            }
            *tally.statuses.entry(report.status).or_default() += 1;
            tally.bytes += report.bytes.unwrap_or(0);
            if report.status == "skipped" && report.note.is_none() {
                if let Some(why) = &report.reason {
                    report.note = Some(format!("hsmseal: skipped {}: {why}", report.path));
                }
            }
            if let Some(note) = &report.note {
                if !app.quiet {
                    bar.eprintln(note);
                }
            }
            if app.json {
                let line = match report.json_line.take() {
                    Some(l) => l,
                    None => crate::report::typed("item", &report),
                };
                bar.report(&line);
            } else if let Some(text) = &report.text {
                bar.println(text);
            }
            None
        }
        Err(e) => {
            let e = e.context(item.display());
            tally.failed += 1;
            if app.json {
                let report = ItemReport {
                    path: item.display(),
                    action: spec.action,
                    status: "failed",
                    error: Some(e.message().to_string()),
                    exit_code: Some(e.exit_code()),
                    ..Default::default()
                };
                bar.report(&crate::report::typed("item", &report));
            }
            if n_items == 1 {
                return Some(e);
            }
            // With --json on stderr, the item line above says it.
            if !crate::report::stderr_is_json() {
                bar.eprintln(&format!("hsmseal: error: {e}"));
            }
            None
        }
    }
}

/// The `--json` summary line, or a human one on stderr for a multi-item run.
fn summary(app: &App, spec: &Spec, n_items: usize, workers: usize, t: &Tally) {
    let seconds = app.started.elapsed().as_secs_f64();
    let hsm_calls = app.hsm_calls();
    if app.json {
        if !spec.json_summary {
            return;
        }
        let mut m = serde_json::Map::new();
        m.insert("action".into(), spec.action.into());
        m.insert("items".into(), n_items.into());
        m.insert("ok".into(), t.ok.into());
        m.insert("skipped".into(), t.skipped.into());
        m.insert("failed".into(), t.failed.into());
        for (key, status) in spec.status_counts {
            let n = t.statuses.get(status).copied().unwrap_or(0);
            m.insert((*key).into(), n.into());
        }
        for (k, v) in &spec.extra {
            m.insert((*k).into(), v.clone());
        }
        m.insert("bytes".into(), t.bytes.into());
        m.insert("seconds".into(), seconds.into());
        m.insert("hsm_calls".into(), hsm_calls.into());
        m.insert("jobs".into(), workers.into());
        crate::report::emit("summary", &m);
    } else if !app.quiet && n_items > 1 {
        let mut parts = vec![format!("{} ok", t.ok)];
        for (key, status) in spec.status_counts {
            if let Some(n) = t.statuses.get(status) {
                parts.push(format!("{n} {}", key.replace('_', " ")));
            }
        }
        parts.push(format!("{} skipped", t.skipped));
        parts.push(format!("{} failed", t.failed));
        let mib = t.bytes as f64 / (1024.0 * 1024.0);
        eprintln!(
            "{}: {n_items} items: {}; {mib:.1} MiB in {seconds:.2} s ({:.1} MiB/s), {}, {}",
            spec.action,
            parts.join(", "),
            if seconds > 0.0 { mib / seconds } else { 0.0 },
            hsmseal::error::count(hsm_calls, "HSM call", "HSM calls"),
            hsmseal::error::count(workers as u64, "job", "jobs"),
        );
    }
}

/// The progress bar, or nothing when stderr is not a terminal or with --quiet.
struct Bar {
    json_to_stderr: bool,
    pb: Option<ProgressBar>,
    bytes: bool,
    items: usize,
}

impl Bar {
    fn new(app: &App, spec: &Spec, items: &[Item]) -> Bar {
        if !spec.bar || app.quiet || !std::io::stderr().is_terminal() {
            return Bar {
                json_to_stderr: spec.data_on_stdout,
                pb: None,
                bytes: false,
                items: 0,
            };
        }
        let (len, template) = if spec.bytes_progress {
            (
                items.iter().filter_map(|i| i.len).sum::<u64>(),
                "{spinner} {elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
        } else {
            (
                items.len() as u64,
                "{spinner} {elapsed_precise} [{wide_bar}] {per_sec} ETA {eta} {msg}",
            )
        };
        // Unknown sizes (stdin): bytes and rate without a total or ETA.
        let (len, template) = if spec.bytes_progress && len == 0 {
            (
                None,
                "{spinner} {elapsed_precise} {bytes} {binary_bytes_per_sec} {msg}",
            )
        } else {
            (Some(len), template)
        };
        let pb = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(template) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(format!("0/{} items", items.len()));
        pb.enable_steady_tick(Duration::from_millis(200));
        Bar {
            json_to_stderr: spec.data_on_stdout,
            pb: Some(pb),
            bytes: spec.bytes_progress,
            items: items.len(),
        }
    }

    fn update(&self, t: &Tally, bytes: u64) {
        if let Some(pb) = &self.pb {
            pb.set_position(if self.bytes { bytes } else { t.done });
            pb.set_message(if t.failed > 0 {
                format!("{}/{} items, {} failed", t.done, self.items, t.failed)
            } else {
                format!("{}/{} items", t.done, self.items)
            });
        }
    }

    /// A `--json` line: on stdout, or stderr if the data goes to stdout.
    fn report(&self, line: &str) {
        if self.json_to_stderr {
            self.raw_eprintln(line)
        } else {
            self.println(line)
        }
    }

    /// A line for stdout that does not tear the bar.
    fn println(&self, line: &str) {
        match &self.pb {
            Some(pb) => pb.suspend(|| crate::outln!("{line}")),
            None => crate::outln!("{line}"),
        }
    }

    /// A line for stderr, above the bar (a human one becomes a `note`
    /// line when stderr carries the JSON lines).
    fn eprintln(&self, line: &str) {
        if crate::report::stderr_is_json() {
            crate::report::diag(line)
        } else {
            self.raw_eprintln(line)
        }
    }

    fn raw_eprintln(&self, line: &str) {
        match &self.pb {
            Some(pb) => pb.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(pb) = &self.pb {
            pb.finish_and_clear();
        }
    }
}
