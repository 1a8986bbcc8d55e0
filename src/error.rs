//! Library error type. Every variant renders as one line that names what went wrong and where.

use std::path::PathBuf;

/// Errors returned by the fer-cam library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A dataset file that does not parse: file, 1-based line, what is wrong.
    #[error("{path}:{line}: {msg}")]
    Data {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// A file (image, cache, …) that cannot be used, with the reason.
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    /// A model directory, config or weight file that is missing, corrupt or mismatched.
    #[error("{path}: {msg}")]
    Model { path: PathBuf, msg: String },
    /// A configuration value outside its allowed range.
    #[error("invalid config: {0}")]
    Config(String),
    /// A tensor operation failed (shape bugs, device errors).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// Anything else with a message.
    #[error("{0}")]
    Msg(String),
}

/// Library result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an `io::Error` with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A file error naming the file.
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// A model-file error naming the file.
    pub fn model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
