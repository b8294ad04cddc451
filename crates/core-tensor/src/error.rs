//! The error type of pare-core-tensor: every message names the thing and expected vs found.

use std::path::PathBuf;

/// Errors raised by pare-core-tensor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation in candle failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An I/O operation on a named file failed.
    // The cause is part of the message and deliberately not a `#[source]`, so error chains
    // printed with `{:#}` do not repeat it.
    #[error("{action} `{path}`: {cause}")]
    Io {
        /// What pare was doing ("open", "write", "rename", ...).
        action: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The operating system's error.
        cause: std::io::Error,
    },

    /// A safetensors file is malformed; `what` says exactly how.
    #[error("malformed safetensors file `{path}`: {what}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The problem, with expected and found values.
        what: String,
    },

    /// Refused to write onto a path that is also an input of the run.
    #[error("refusing to overwrite input file `{path}`: choose another output path")]
    OverwriteInput {
        /// The output path that is also an input.
        path: PathBuf,
    },

    /// A tensor or parameter has the wrong shape.
    #[error("`{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// The tensor, layer or parameter.
        name: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape that was found.
        found: Vec<usize>,
    },

    /// A tensor has the wrong dtype.
    #[error("`{name}`: expected dtype {expected}, found {found}")]
    DType {
        /// The tensor, layer or parameter.
        name: String,
        /// The expected dtype.
        expected: String,
        /// The dtype that was found.
        found: String,
    },

    /// A tensor that must hold finite numbers holds NaN or infinity.
    #[error("`{name}` holds {count} non-finite values (NaN or infinity), first at flat index {first}")]
    NonFinite {
        /// The tensor.
        name: String,
        /// How many values are non-finite.
        count: usize,
        /// The flat index of the first one.
        first: usize,
    },

    /// A tensor, layer or parameter path does not exist.
    #[error("unknown {kind} `{name}`{}", suggestion_suffix(.suggestions))]
    Unknown {
        /// What kind of thing was looked up ("layer", "tensor", ...).
        kind: &'static str,
        /// The name that was asked for.
        name: String,
        /// The closest existing names.
        suggestions: Vec<String>,
    },

    /// A format or option is internally inconsistent (bits out of range, index out of bounds, ...).
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// The thing that is invalid ("quant scheme", "CSR tensor `w`", ...).
        what: String,
        /// Expected vs found.
        detail: String,
    },

    /// A data set or calibration set is empty or unusable.
    #[error("data set `{name}`: {detail}")]
    Data {
        /// The data set.
        name: String,
        /// What is wrong with it.
        detail: String,
    },

    /// A runtime's device failed or refused the work (a GPU that is absent, a shader that does
    /// not compile, a buffer over the adapter's limits). `cause` is the runtime's own typed
    /// error (for example `pare_runtime_gpu::GpuError`), to downcast where the kind matters.
    #[error("{runtime} runtime: {cause}")]
    Runtime {
        /// The runtime's name (`wgpu`, `cuda`).
        runtime: &'static str,
        /// The runtime's typed error.
        cause: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A JSON document (config, checkpoint state) could not be parsed.
    #[error("cannot parse `{path}` as JSON: {cause}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error, with line and column.
        cause: serde_json::Error,
    },
}

fn suggestion_suffix(s: &[String]) -> String {
    if s.is_empty() { String::new() } else { format!(" (closest: {})", s.join(", ")) }
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Invalid { what: what.into(), detail: detail.into() }
    }

    /// Builds [`Error::Unknown`], suggesting up to three of `known` that share the longest
    /// prefix with `name`.
    pub fn unknown<'a>(kind: &'static str, name: &str, known: impl IntoIterator<Item = &'a str>) -> Self {
        let mut scored: Vec<(usize, &str)> =
            known.into_iter().map(|k| (k.bytes().zip(name.bytes()).take_while(|(a, b)| a == b).count(), k)).collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        let suggestions = scored.into_iter().take(3).map(|(_, k)| k.to_string()).collect();
        Error::Unknown { kind, name: name.to_string(), suggestions }
    }

    /// Wraps an I/O error with what was being done to which file.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io { action, path: path.into(), cause }
    }
}

/// The result type of pare-core-tensor.
pub type Result<T> = std::result::Result<T, Error>;
