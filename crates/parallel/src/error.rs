//! The error type of pare-parallel.

use std::time::Duration;

/// Errors raised by pare-parallel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation in candle failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error from core-tensor.
    #[error(transparent)]
    Core(#[from] pare_core_tensor::Error),
    /// An error from pare-models (a model that cannot be split, a bad input).
    #[error(transparent)]
    Model(pare_models::Error),
    /// A peer did not answer within the communicator's timeout: it hangs or has died.
    #[error("rank {rank}: {op} with rank {peer} timed out after {after:?} (is rank {peer} hung or dead?)")]
    Timeout {
        /// This worker's rank.
        rank: usize,
        /// The operation that waited (`recv`, `send`).
        op: &'static str,
        /// The peer waited for.
        peer: usize,
        /// The timeout.
        after: Duration,
    },
    /// A peer failed (returned an error, panicked or ended early) and said so.
    #[error("rank {rank}: rank {peer} failed: {reason}")]
    PeerFailed {
        /// This worker's rank.
        rank: usize,
        /// The failed peer.
        peer: usize,
        /// What the peer reported.
        reason: String,
    },
    /// A worker panicked (in-process workers only).
    #[error("rank {rank} panicked: {message}")]
    Panicked {
        /// The worker's rank.
        rank: usize,
        /// The panic message.
        message: String,
    },
    /// A message did not have the expected form (tag, tensor count, encoding).
    #[error("rank {rank}: malformed message from rank {peer}: {detail}")]
    Protocol {
        /// This worker's rank.
        rank: usize,
        /// The sender.
        peer: usize,
        /// Expected vs found.
        detail: String,
    },
    /// A setting or shape that cannot work, caught before work starts.
    #[error("invalid {what}: expected {expected}, found {found}")]
    Config {
        /// What was checked (`world size`, `rank`, `stage plan`, ...).
        what: &'static str,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// The communicator needs a cargo feature this build lacks.
    #[error("the {what} communicator is not compiled in: rebuild pare-parallel with `--features {feature}`")]
    NotCompiled {
        /// The communicator (`MPI`, `NCCL`).
        what: &'static str,
        /// The feature to enable.
        feature: &'static str,
    },
    /// Something this build does not do.
    #[error("{what} is not supported: {detail}")]
    Unsupported {
        /// What was asked for.
        what: &'static str,
        /// Why, and what to use instead.
        detail: String,
    },
    /// The batch a request was grouped into failed.
    #[error("the batch holding this request failed: {0}")]
    Batch(String),
    /// MPI could not start or failed.
    #[error("MPI: {0}")]
    Mpi(String),
}

impl From<pare_models::Error> for Error {
    /// Unwraps pare-parallel's own errors that travelled through a model's callback.
    fn from(e: pare_models::Error) -> Self {
        match e {
            pare_models::Error::External(inner) => match inner.downcast::<Error>() {
                Ok(ours) => *ours,
                Err(other) => Error::Model(pare_models::Error::External(other)),
            },
            other => Error::Model(other),
        }
    }
}

impl Error {
    /// A [`Error::Config`].
    pub fn config(what: &'static str, expected: impl ToString, found: impl ToString) -> Self {
        Error::Config { what, expected: expected.to_string(), found: found.to_string() }
    }

    /// Whether this error only reports another worker's failure (not a root cause).
    pub fn is_consequence(&self) -> bool {
        matches!(self, Error::PeerFailed { .. })
    }
}

/// The result type of pare-parallel.
pub type Result<T> = std::result::Result<T, Error>;
