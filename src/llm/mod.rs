//! The LLM tier: escalated rows are labelled by OpenAI-compatible chat endpoints (see
//! [`tier`]), with Prompty prompts ([`prompty`]), strict parsing back to the schema ([`parse`]),
//! per-endpoint flow control ([`limiter`]), a response cache ([`cache`]), the OpenAI Batch API
//! path ([`batch`]) and a loopback simulator for tests and benchmarks ([`simulator`]).

pub mod batch;
pub mod cache;
pub mod client;
pub mod config;
pub mod limiter;
pub mod parse;
pub mod prompty;
pub mod redact;
#[cfg(feature = "dev-tools")]
pub mod simulator;
pub mod tier;

pub use config::LlmConfig;
pub use tier::{LlmStats, LlmTier};
