//! The application layer: one handle per user-level job, assembled from the stages. The CLI,
//! the Python binding and a future server call these; none of them assembles a job itself.
//!
//! | job | handle |
//! |---|---|
//! | classify a file (resumable, LLM tier, `--grow`, `--also`) | [`classify::ClassifyJob`] |
//! | classify Arrow record batches (Python, Spark, Polars, Ray) | [`arrow::ArrowJob`] |
//! | build or extend an index | [`index::build_index_with`], [`index::add_exemplars`] |
//! | calibrate (cross-validation or held-out rows) | [`calibrate::run`] |
//! | evaluate on a labelled split | [`eval::evaluate`], [`eval::evaluate_multi`] |
//! | embed a file to Parquet | [`embed::embed_file`] |
//! | the bundled demo | [`demo::run`] |
//! | clusters of what the taxonomy misses, named by the LLM, as a proposed taxonomy | [`discover::run`] |
//! | cold start: taxonomy + LLM + unlabelled rows → calibrated index | [`bootstrap::run`] |
//! | fine-tune the encoder on the exemplars, re-embed, re-calibrate | [`tune::run`] |
//! | two LLM configurations on the same rows (agreement, kappa, cost) | [`compare::run`] |
//! | the encoders semtel knows, present here or not, and their speed here | [`models::list`] |
//! | personal data replaced by typed placeholders in a whole file | [`redact::run`] |
//! | the live service: micro-batched classify/embed, escalation per request, result log, reload | [`serve::Service`] |
//!
//! This layer must never print, parse flags or read environment variables for options: it takes
//! resolved, typed options and returns typed reports; adapters decide how to show them.

pub mod arrow;
pub mod bootstrap;
pub mod calibrate;
pub mod classify;
pub mod compare;
pub mod demo;
pub mod discover;
pub mod embed;
pub mod eval;
pub mod index;
pub mod models;
pub mod monitor;
pub mod redact;
pub mod serve;
pub mod tune;
