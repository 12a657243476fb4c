//! The optional TOML configuration file. Every key mirrors a CLI flag; flags win over the file,
//! the file wins over built-in defaults. Secrets never live here by value: the LLM section
//! names environment variables that hold keys.

use crate::input::Columns;
use crate::{Error, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: Option<String>,
    pub device: Option<String>,
    pub threads: Option<usize>,
    pub include_system_turns: Option<bool>,
    pub columns: Option<Columns>,
    /// `--max-line-bytes`.
    pub max_line_bytes: Option<usize>,
    pub classify: ClassifySection,
    /// Path of the LLM tier's configuration (see `semtel llm --help`).
    pub llm: Option<String>,
    /// `semtel serve`: each key mirrors its flag.
    pub serve: ServeSection,
}

/// The `[serve]` section: keys named like `semtel serve`'s flags (with `_` for `-`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeSection {
    pub index: Option<String>,
    /// `NAME=INDEX_DIR` entries, like `--also`.
    pub also: Option<Vec<String>>,
    pub addr: Option<String>,
    pub results: Option<String>,
    pub grow: Option<bool>,
    pub grow_min_confidence: Option<f32>,
    pub max_batch_tokens: Option<usize>,
    pub max_batch_wait_ms: Option<u64>,
    pub max_concurrent_requests: Option<usize>,
    pub max_queue: Option<usize>,
    pub max_body_bytes: Option<usize>,
    pub max_items: Option<usize>,
    pub max_text_bytes: Option<usize>,
    pub escalate_timeout_ms: Option<u64>,
    pub max_connections: Option<usize>,
    pub header_timeout_ms: Option<u64>,
    pub body_timeout_ms: Option<u64>,
    pub shutdown_timeout_ms: Option<u64>,
    pub fair_step_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifySection {
    pub k: Option<usize>,
    pub threshold: Option<f32>,
    pub signal: Option<String>,
    pub passthrough: Option<Vec<String>>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }
}
