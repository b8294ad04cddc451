//! The error type of pare-quant.

/// Errors raised by pare-quant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error from core-tensor (formats, I/O, layers).
    #[error(transparent)]
    Core(#[from] pare_core_tensor::Error),
    /// A tensor operation in candle failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An option is impossible for this tensor (bits out of range, group size not dividing the row).
    #[error("cannot quantize `{tensor}`: {detail}")]
    Option {
        /// The tensor or layer.
        tensor: String,
        /// Expected vs found.
        detail: String,
    },
}

/// The result type of pare-quant.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn option(tensor: &str, detail: impl Into<String>) -> Error {
    Error::Option { tensor: tensor.to_string(), detail: detail.into() }
}

impl From<pare_models::Error> for Error {
    fn from(e: pare_models::Error) -> Self {
        Error::Core(e.into_core())
    }
}
