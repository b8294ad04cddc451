//! pare-models: architectures built from core-tensor layers, so every transform and runtime
//! works on them.
//!
//! - [`digits`]: an MLP and a small CNN for the 8×8 digits, trainable with core-tensor's trainer
//!   and saved as safetensors with their architecture in the metadata;
//! - [`bert`]: a BERT encoder that loads Hugging Face checkpoints (all-MiniLM-L6-v2) and a
//!   [`bert::SentenceEncoder`] that returns mean-pooled, L2-normalised sentence embeddings.
//!
//! ```
//! use pare_models::digits::{DigitsArch, DigitsNet};
//! use pare_core_tensor::Module;
//! use candle_core::{Device, Tensor, DType};
//!
//! let vars = candle_nn::VarMap::new();
//! let net = DigitsNet::init(DigitsArch::default_cnn(), 7, &Device::Cpu, &vars)?;
//! let logits = net.forward(&Tensor::zeros((2, 64), DType::F32, &Device::Cpu)?)?;
//! assert_eq!(logits.dims(), &[2, 10]);
//! assert!(net.layer("conv1").is_ok());
//! # Ok::<(), pare_models::Error>(())
//! ```

pub mod bert;
pub mod digits;
mod error;

pub use error::{Error, Result};

/// A linear layer `[o, i]` with bias, its parameters `PATH.weight` and `PATH.bias` from `src`.
fn linear(
    src: &mut dyn pare_core_tensor::WeightSource,
    path: &str,
    i: usize,
    o: usize,
    w_init: pare_core_tensor::Init,
    b_init: pare_core_tensor::Init,
) -> Result<pare_core_tensor::Linear> {
    let w = src.weight(&format!("{path}.weight"), &[o, i], w_init)?;
    let b = src.tensor(&format!("{path}.bias"), &[o], b_init)?;
    Ok(pare_core_tensor::Linear::new(path, w, Some(b))?)
}
