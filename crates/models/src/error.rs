//! The error type of pare-models.

use std::path::PathBuf;

/// Errors raised by pare-models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error from core-tensor (formats, I/O, layers).
    #[error(transparent)]
    Core(#[from] pare_core_tensor::Error),
    /// A tensor operation in candle failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A model folder or file lacks something it needs.
    #[error("model `{path}`: {detail}")]
    Model {
        /// The folder or file.
        path: PathBuf,
        /// What is missing or wrong.
        detail: String,
    },
    /// A configuration is impossible (zero widths, heads not dividing the hidden size, ...).
    #[error("invalid {what} config: {detail}")]
    Config {
        /// Which config.
        what: &'static str,
        /// Expected vs found.
        detail: String,
    },
    /// An error raised by a caller's callback inside a forward pass (a tensor-parallel
    /// all-reduce in pare-parallel), carried through unchanged so the caller can take it back.
    #[error(transparent)]
    External(Box<dyn std::error::Error + Send + Sync>),
    /// The tokenizer failed.
    #[error("tokenizer `{path}`: {detail}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokenizer's message.
        detail: String,
    },
}

impl Error {
    /// Converts to core-tensor's error, for code that runs a model inside core-tensor's
    /// trainer (whose tasks return core errors).
    pub fn into_core(self) -> pare_core_tensor::Error {
        match self {
            Error::Core(c) => c,
            Error::Candle(c) => pare_core_tensor::Error::Candle(c),
            other => pare_core_tensor::Error::invalid("model", other.to_string()),
        }
    }
}

/// The result type of pare-models.
pub type Result<T> = std::result::Result<T, Error>;
