//! Progress reporting on stderr: a bar with rate and ETA when stderr is a terminal, silence
//! otherwise (logs and CI stay clean). Must never write to stdout, which carries results.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new(total: Option<u64>, what: &str, quiet: bool) -> Self {
        let bar = match total {
            Some(t) => ProgressBar::new(t),
            None => ProgressBar::no_length(),
        };
        if quiet || !std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        let template = if total.is_some() {
            "{prefix} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows  {per_sec}  ETA {eta}"
        } else {
            "{prefix} [{elapsed_precise}] {human_pos} rows  {per_sec}"
        };
        bar.set_style(ProgressStyle::with_template(template).unwrap());
        bar.set_prefix(what.to_string());
        Progress { bar }
    }

    /// A bar over optimizer steps with a message (the loss) and ETA; `reset` starts a new phase.
    pub fn steps(what: &str, quiet: bool) -> Self {
        let bar = ProgressBar::new(0);
        if quiet || !std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} steps  {msg}  ETA {eta}",
            )
            .unwrap(),
        );
        bar.set_prefix(what.to_string());
        Progress { bar }
    }

    /// Moves a step bar: phase name, position, length and message.
    pub fn set_step(&self, phase: &str, pos: u64, len: u64, msg: String) {
        if self.bar.length() != Some(len) || pos < self.bar.position() {
            self.bar.reset();
            self.bar.set_length(len);
            self.bar.set_prefix(phase.to_string());
        }
        self.bar.set_position(pos);
        self.bar.set_message(msg);
    }

    pub fn hidden() -> Self {
        Progress::new(None, "", true)
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
