//! One module per command: each resolves its options through [`crate::options::Ctx`], calls
//! the library (`semtel::app`, or the dev-tools modules for `bench` and `llm`), and prints.

pub mod accuracy_cost;
pub mod bench;
pub mod bootstrap;
pub mod calibrate;
pub mod classify;
pub mod demo;
pub mod discover;
pub mod eval;
pub mod index;
pub mod llm;
pub mod models;
pub mod monitor;
pub mod redact;
pub mod serve;
pub mod tune;

/// A run that finished and wrote every row, but some rows hit internal failures: exit code 3,
/// so scripts can tell it from a run that stopped (exit 1).
#[derive(Debug)]
pub struct RunHadErrors(pub String);

impl std::fmt::Display for RunHadErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RunHadErrors {}

/// `; redacted before sending: EMAIL 3, PHONE 1` (empty when nothing was).
pub fn redacted_note(c: &semtel::pii::Counts) -> String {
    if c.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = c.0.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!("; redacted before sending: {}", parts.join(", "))
}

/// `--also NAME=INDEX_DIR` values as (name, folder) pairs.
pub fn parse_also(specs: &[String]) -> anyhow::Result<Vec<(String, std::path::PathBuf)>> {
    use anyhow::Context;
    specs
        .iter()
        .map(|spec| {
            spec.split_once('=')
                .map(|(n, d)| (n.to_string(), std::path::PathBuf::from(d)))
                .with_context(|| format!("--also {spec}: expected NAME=INDEX_DIR"))
        })
        .collect()
}
