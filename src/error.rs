//! Library error type. Every variant says what went wrong *and what to do next*, because these
//! messages reach users unchanged through the CLI and the Python binding.
//! This module must never print or log: callers decide how errors are shown.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("model: {0}")]
    Model(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("embedding failed: {0}")]
    Embed(String),

    #[error("index {path}: {msg}")]
    Index { path: PathBuf, msg: String },

    #[error("input {path}: {msg}")]
    Input { path: PathBuf, msg: String },

    #[error("output {path}: {msg}")]
    Output { path: PathBuf, msg: String },

    #[error("config: {0}")]
    Config(String),

    #[error("llm: {0}")]
    Llm(String),

    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn index(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Index {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn input(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Input {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn output(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Output {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Embed(e.to_string())
    }
}
