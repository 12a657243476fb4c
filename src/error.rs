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

    /// Every LLM endpoint refused the run in a way waiting cannot fix (a wrong key, an unknown
    /// model or deployment, an exhausted quota, requests it will not read).
    #[error("LLM endpoint `{endpoint}` {what}; fix that, then rerun with --resume: the rows already written are kept and the rest are classified")]
    LlmRefused { endpoint: String, what: String },

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

    /// The vector index library (usearch) failed.
    #[error("vector index: {context}: {source}")]
    VectorIndex {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A tensor operation outside the embedder failed (training the head, writing tables).
    #[error("{context}: {source}")]
    Tensor {
        context: String,
        #[source]
        source: candle_core::Error,
    },

    /// Arrow refused a batch semtel built.
    #[error("{context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: arrow_schema::ArrowError,
    },

    /// Plots and reports of the benchmarks.
    #[error("report {path}: {msg}")]
    Report { path: PathBuf, msg: String },

    /// Something inside semtel broke that input cannot explain: a bug.
    #[error("internal error: {0}; rerun with --resume where it applies, and please report this as a semtel bug")]
    Internal(String),
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

/// The text of a panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

thread_local! {
    /// Set while [`no_panic`] runs: a panic there is expected and handled, not a bug to show.
    static EXPECTED_PANIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into an error message (for third-party code that panics on
/// malformed input instead of returning an error, such as the parquet crate on damaged pages).
pub fn no_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let was = EXPECTED_PANIC.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    EXPECTED_PANIC.with(|q| q.set(was));
    r.map_err(|p| panic_message(&*p))
}

/// Keeps the default panic report (message and backtrace on stderr) for real bugs, but not for
/// panics [`no_panic`] catches on purpose: those become row errors that say what happened.
/// Programs call it once at start (the CLI and the Python module do).
pub fn quiet_expected_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !EXPECTED_PANIC.with(|q| q.get()) {
            previous(info);
        }
    }));
}

fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || e.raw_os_error() == Some(28)
}

impl Error {
    pub fn vector_index(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::VectorIndex {
            context: context.into(),
            source: Box::new(source),
        }
    }
    pub fn tensor(context: impl Into<String>) -> impl FnOnce(candle_core::Error) -> Self {
        let context = context.into();
        move |source| Error::Tensor { context, source }
    }
}

impl From<candle_core::Error> for Error {
    fn from(source: candle_core::Error) -> Self {
        Error::Tensor {
            context: "embedding failed".into(),
            source,
        }
    }
}
