//! semtel: embedding-first labelling of human–AI conversations.
//!
//! One data path, one direction:
//! read ([`input`]) → render/truncate ([`render`]) → embed ([`embed`]) → search ([`index`])
//! → decide ([`decide`]) → escalate (`llm`) → write ([`output`]), wired by [`pipeline`].
//! Each stage is a module with a small public type; the stages never reach into one another's
//! internals, and nothing here keeps global mutable state.

pub mod app;
#[cfg(feature = "dev-tools")]
pub mod bench;
pub mod calibrate;
pub mod center;
pub mod cluster;
pub mod config;
pub mod conversation;
pub mod decide;
pub mod embed;
pub mod error;
pub mod eval;
pub mod failpoint;
pub mod fsio;
pub mod grow;
pub mod guard;
pub mod hash;
pub mod head;
pub mod html;
pub mod index;
pub mod input;
pub mod lang;
pub mod llm;
pub mod model;
pub mod multilabel;
pub mod novelty;
pub mod output;
pub mod pii;
pub mod pipeline;
pub mod progress;
pub mod render;
#[cfg(feature = "dev-tools")]
pub mod report;
pub mod row;
pub mod sample;
#[cfg(feature = "serve")]
pub mod server;
pub mod sink;
pub mod tune;

pub use error::{Error, Result};

/// Version of this build, written into every index manifest.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
