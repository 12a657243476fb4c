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

    /// The disk filled up. Everything written before stays valid: `--resume` continues once
    /// space is back.
    #[error(
        "no space left on device at {path}; free some space, then rerun with --resume to continue"
    )]
    DiskFull {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Another process holds the output (or index) this run wants to write.
    #[error("{path} is being written by another semtel process ({holder}); wait for it to finish or choose another output")]
    Locked { path: PathBuf, holder: String },

    /// The writer thread stopped; the real cause is the writer's own error, reported instead.
    #[error("the output writer stopped")]
    WriterStopped,

    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if is_disk_full(&source) {
            return Error::DiskFull {
                path: path.into(),
                source,
            };
        }
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A Parquet/Arrow writer error at `path`: a full disk keeps its own message.
    pub fn write_failed(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        let msg = e.to_string();
        if msg.contains("No space left on device") || msg.contains("os error 28") {
            return Error::DiskFull {
                path: path.into(),
                source: std::io::Error::from_raw_os_error(28),
            };
        }
        Error::output(path, msg)
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

fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || e.raw_os_error() == Some(28)
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Embed(e.to_string())
    }
}
