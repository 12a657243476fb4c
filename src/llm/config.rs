//! The LLM tier's configuration (TOML): endpoints with their limits and prices, the prompt,
//! batching, retries and the response cache. API keys are *named* here (environment variables)
//! and read from the environment when a client is built; they are never stored, printed or
//! logged by semtel.

use crate::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    /// OpenAI and every server speaking its API (vLLM, llama.cpp server, Ollama, …):
    /// `POST {url}/chat/completions` with `Authorization: Bearer <key>`.
    #[default]
    Openai,
    /// Azure OpenAI: `POST {url}/openai/deployments/{deployment}/chat/completions?api-version=…`
    /// with an `api-key` header.
    Azure,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub name: String,
    #[serde(default)]
    pub kind: EndpointKind,
    /// Base URL: `https://api.openai.com/v1`, `http://127.0.0.1:8000/v1`, or for Azure the
    /// resource endpoint `https://<resource>.openai.azure.com`.
    pub url: String,
    /// Model name sent in the request (for Azure, informative: the deployment decides).
    pub model: String,
    /// Azure deployment name.
    pub deployment: Option<String>,
    /// Azure API version.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Environment variable holding the API key (none for local servers).
    pub api_key_env: Option<String>,
    #[serde(default = "one")]
    pub weight: f64,
    /// Requests per minute allowed (0: unlimited).
    #[serde(default)]
    pub rpm: u64,
    /// Tokens per minute allowed (0: unlimited).
    #[serde(default)]
    pub tpm: u64,
    /// USD per 1,000 input tokens.
    #[serde(default)]
    pub price_in_per_1k: f64,
    /// USD per 1,000 output tokens.
    #[serde(default)]
    pub price_out_per_1k: f64,
    /// Upper bound of the adaptive concurrency.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
}

fn default_api_version() -> String {
    "2024-10-21".into()
}
fn one() -> f64 {
    1.0
}
fn default_max_concurrency() -> usize {
    64
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// A .prompty file; default: the shipped prompts/classify.prompty.
    pub prompt: Option<PathBuf>,
    /// Conversations per call.
    pub items_per_call: usize,
    /// Narrow each item's candidate labels to its neighbours' labels (plus an escape label)
    /// when the schema has more labels than this; 0 disables narrowing.
    pub narrow_above: usize,
    /// Labelled neighbours shown per item as few-shot examples.
    pub examples_per_item: usize,
    /// Characters of each conversation sent to the LLM (head and tail kept).
    pub max_item_chars: usize,
    /// Characters of each few-shot example.
    pub max_example_chars: usize,
    /// Attempts per call before its items are retried one by one / given up.
    pub max_attempts: u32,
    /// Attempts per item (across calls) before it is reported as failed.
    pub max_item_attempts: u32,
    /// Ceiling of a call's deadline: base seconds plus seconds per 1,000 expected tokens.
    /// Once an endpoint has answered a few calls, its deadline follows the latencies it shows
    /// (a few times their 95th percentile), never above this.
    pub timeout_base_s: f64,
    pub timeout_per_1k_tokens_s: f64,
    /// Send a second copy of a call that runs far past the endpoint's usual latency (to another
    /// endpoint when there is one); the first answer wins. At most ~10 % extra calls.
    pub hedge: bool,
    /// Longest wait a `Retry-After` may impose; longer ones are cut to this.
    pub max_retry_after_s: f64,
    /// Longest an item may wait for an answer while its endpoints are down, rate limited or
    /// failing, from its first send; then it stays `escalate` with the reason (retry it later
    /// with `classify --resume --retry-escalated`).
    pub max_item_wait_s: f64,
    /// Backoff: first delay and cap, seconds (full jitter).
    pub backoff_base_s: f64,
    pub backoff_max_s: f64,
    /// Response cache (JSONL); default `~/.cache/semtel/llm-cache.jsonl`. "off" disables it.
    pub cache: Option<String>,
    /// Items accepted from the kNN stage before `classify` waits for the LLM tier.
    pub max_pending: usize,
    /// Adaptive flow control: pacing learned from rate-limit headers and 429s (capped by
    /// `rpm`/`tpm`), additive concurrency that shrinks only on queueing, latency-based
    /// deadlines, hedging. `false` sends at a fixed concurrency of `max_concurrency` and only
    /// backs off exponentially on errors: the naive baseline the benchmark compares against.
    pub adaptive: bool,
    /// Personal data removed from every conversation and example before it is sent:
    /// `off`, `standard` (the default) or `strict` (see [`crate::pii`]); `--redact` overrides.
    pub redact: crate::pii::Level,
    /// `[redaction]`: allow and deny lists, custom patterns, redaction before embedding, phone
    /// regions.
    pub redaction: crate::pii::Rules,
    /// Append every request body exactly as sent to this local file (JSON Lines; no headers,
    /// so no key), to see and prove what left the machine. `--show-sent` sets it.
    pub show_sent: Option<PathBuf>,
    /// Label descriptions shown in the prompt (label → description).
    pub labels: BTreeMap<String, String>,
    pub endpoints: Vec<EndpointConfig>,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            prompt: None,
            items_per_call: 8,
            narrow_above: 20,
            examples_per_item: 2,
            max_item_chars: 3000,
            max_example_chars: 300,
            max_attempts: 6,
            max_item_attempts: 3,
            timeout_base_s: 20.0,
            timeout_per_1k_tokens_s: 10.0,
            hedge: true,
            max_retry_after_s: 60.0,
            max_item_wait_s: 600.0,
            backoff_base_s: 0.5,
            backoff_max_s: 30.0,
            cache: None,
            max_pending: 4096,
            adaptive: true,
            redact: crate::pii::Level::Standard,
            redaction: crate::pii::Rules::default(),
            show_sent: None,
            labels: BTreeMap::new(),
            endpoints: Vec::new(),
        }
    }
}

/// Command-line settings that win over the configuration file's (`--redact`, `--show-sent`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub redact: Option<crate::pii::Level>,
    pub show_sent: Option<PathBuf>,
}

impl Overrides {
    pub fn apply(&self, c: &mut LlmConfig) {
        if let Some(l) = self.redact {
            c.redact = l;
        }
        if let Some(p) = &self.show_sent {
            c.show_sent = Some(p.clone());
        }
    }
}

impl LlmConfig {
    /// [`load`](Self::load), then the command line's overrides.
    pub fn load_with(path: &Path, o: &Overrides) -> Result<LlmConfig> {
        let mut c = Self::load(path)?;
        o.apply(&mut c);
        Ok(c)
    }

    /// The redaction stage to run before embedding, when `[redaction] before_embedding` asks
    /// for it (and redaction is on).
    pub fn input_redactor(&self) -> Result<Option<std::sync::Arc<crate::pii::Redactor>>> {
        if !self.redaction.before_embedding || self.redact == crate::pii::Level::Off {
            return Ok(None);
        }
        Ok(Some(std::sync::Arc::new(crate::pii::Redactor::new(
            self.redact,
            &self.redaction,
        )?)))
    }

    pub fn load(path: &Path) -> Result<LlmConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut c: LlmConfig =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        // The redaction rules are checked now: a bad pattern stops before anything is sent.
        crate::pii::Redactor::new(c.redact, &c.redaction)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        // A relative prompt path is relative to the config file.
        if let (Some(p), Some(dir)) = (&c.prompt, path.parent()) {
            if p.is_relative() {
                c.prompt = Some(dir.join(p));
            }
        }
        c.validate()
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(c)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("no [[endpoints]]: add at least one (name, url, model)".into());
        }
        if self.items_per_call == 0 || self.items_per_call > 64 {
            return Err("items_per_call must be between 1 and 64".into());
        }
        for e in &self.endpoints {
            if e.kind == EndpointKind::Azure && e.deployment.is_none() {
                return Err(format!("endpoint `{}`: Azure needs `deployment`", e.name));
            }
            if !(e.url.starts_with("http://") || e.url.starts_with("https://")) {
                return Err(format!(
                    "endpoint `{}`: url must start with http:// or https://",
                    e.name
                ));
            }
            if e.weight <= 0.0 {
                return Err(format!("endpoint `{}`: weight must be positive", e.name));
            }
        }
        Ok(())
    }

    pub fn cache_path(&self) -> Option<PathBuf> {
        match self.cache.as_deref() {
            Some("off") | Some("") => None,
            Some(p) => Some(PathBuf::from(p)),
            None => {
                let base = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"))
                    })?;
                Some(base.join("semtel/llm-cache.jsonl"))
            }
        }
    }
}
