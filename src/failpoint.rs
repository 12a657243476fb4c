//! Named crash points for the kill tests: `SEMTEL_ABORT_AT=NAME` aborts the process (as a
//! `kill -9` would: no unwinding, no destructors, no flushing) the first time the code passes
//! the point `NAME`; `SEMTEL_ABORT_AT=NAME:N` at its N-th passage. Tests use it to stop a run at
//! exactly the moments where a crash could lose or duplicate work, instead of racing a timer.
//!
//! Points: `batch-written` (output rows written and flushed), `part-closed` (a Parquet part
//! committed), `before-final-commit` / `final-commit` (either side of renaming the assembled
//! Parquet file into place), `llm-reply` (an LLM answer received, not yet recorded),
//! `index-save` (between the files of an index save: mid `index build`/`add`/`--grow` save),
//! `tune-checkpoint` (a fine-tuning checkpoint just written).
//!
//! `SEMTEL_SERVE_START_DELAY_MS=N` holds `semtel serve` for N ms after it starts listening and
//! before it loads the model, so a test can see the 503 it answers while starting.
//!
//! `SEMTEL_PANIC_ON_ROW=ID` makes classifying the row with that id panic, to test that a bug
//! costs one row (an error row) and never the run.
//!
//! Without the variables a passage costs one relaxed atomic load. This module must never be
//! used for anything but crash testing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Armed {
    name: String,
    at: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    // A process-wide setting by nature (it comes from the environment once); not state that
    // any result depends on.
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var("SEMTEL_ABORT_AT").ok()?;
            let (name, at) = match v.rsplit_once(':') {
                Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
                None => (v.clone(), 1),
            };
            Some(Armed {
                name,
                at: at.max(1),
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Passes the point `name`; aborts here when the kill test armed it.
pub fn hit(name: &str) {
    if let Some(a) = armed() {
        if a.name == name && a.seen.fetch_add(1, Ordering::Relaxed) + 1 == a.at {
            eprintln!("semtel: SEMTEL_ABORT_AT={name}: aborting");
            std::process::abort();
        }
    }
}

/// Panics when the test armed `SEMTEL_PANIC_ON_ROW` with this row's id.
pub fn panic_on_row(id: &str) {
    static ROW: OnceLock<Option<String>> = OnceLock::new();
    if ROW
        .get_or_init(|| std::env::var("SEMTEL_PANIC_ON_ROW").ok())
        .as_deref()
        == Some(id)
    {
        panic!("SEMTEL_PANIC_ON_ROW={id}: injected panic");
    }
}

/// Sleeps for `SEMTEL_SERVE_START_DELAY_MS` (when set) where `semtel serve` would load its model.
pub fn serve_start_delay() {
    if let Some(ms) = std::env::var("SEMTEL_SERVE_START_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
