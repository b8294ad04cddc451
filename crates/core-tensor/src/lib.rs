//! pare-core-tensor: the vocabulary every pare crate speaks.
//!
//! - weight formats, the contract between transforms and kernels: [`Weight`] is dense,
//!   [`QuantizedTensor`] (packed 1–8-bit codes with a [`QuantScheme`]) or [`SparseTensor`]
//!   (CSR, N:M, block), each with `dequantize()`/`to_dense()` as its reference semantics;
//! - layers that hold weights and know their parameter paths ([`Linear`], [`Conv2d`],
//!   [`Embedding`], [`LayerNorm`], [`Activation`]) and the [`Module`] trait over them;
//! - the [`Runtime`] trait (prepare a layer once, run it many times) and [`ReferenceRuntime`];
//!   a model's whole forward as a [`Graph`] of runtime calls, for runtimes whose activations
//!   stay on their device ([`Runtime::resident`]);
//! - calibration [`hooks`], safetensors [`io`], real [`data`], [`metrics`] and the shared
//!   [`train`]er.
//!
//! ```
//! use pare_core_tensor::{Linear, Weight, QuantizedTensor, QuantScheme, Mapping, Granularity};
//! use candle_core::{DType, Device, Tensor};
//!
//! // A 2×4 int4 weight, symmetric per output channel: r = S·(c − 8).
//! let scheme = QuantScheme { bits: 4, signed: true, symmetric: true, mapping: Mapping::Linear,
//!                            granularity: Granularity::PerChannel { axis: 0 } };
//! let codes = [8, 9, 10, 15, 8, 7, 6, 0];
//! let q = QuantizedTensor::from_codes(&codes, scheme, vec![0.5, 0.25], None, None, vec![2, 4], DType::F32)?;
//! assert_eq!(q.dequantize_f32(), [0.0, 0.5, 1.0, 3.5, 0.0, -0.25, -0.5, -2.0]);
//!
//! let layer = Linear::new("fc", Weight::Quantized(q), None)?;
//! let y = layer.forward(&Tensor::ones((1, 4), DType::F32, &Device::Cpu)?)?;
//! assert_eq!(y.to_vec2::<f32>()?, [[5.0, -2.75]]);
//! # Ok::<(), pare_core_tensor::Error>(())
//! ```

pub mod act;
pub mod calib;
pub mod data;
mod error;
pub mod graph;
pub mod hooks;
pub mod io;
mod layers;
pub mod metrics;
mod module;
mod quant;
mod runtime;
pub mod select;
mod sparse;
pub mod testing;
pub mod train;
mod weight;

pub use act::{ActQuant, ActRange};
pub use error::{Error, Result};
pub use graph::{Graph, Step, Value};
pub use hooks::{Hooks, LayerKind, Observer, Site};
pub use layers::{Activation, Conv2d, Embedding, LayerNorm, Linear};
pub use module::{Init, InitWeights, LayerMut, LayerRef, LoadedWeights, Module, WeightSource};
pub use quant::{
    Granularity, Mapping, QuantScheme, QuantizedTensor, affine_scale_zero, pack_codes, packed_len, unpack_codes,
};
pub use runtime::{
    AttentionPrecision, Conv2dParams, PreparedOp, ReferenceRuntime, Runtime, attention_reference,
    attention_reference_bf16, check_attention, check_bias, conv2d_forward, in_runtime, layer_norm_reference,
    linear_forward,
};
pub use sparse::{SparseLayout, SparseTensor};
pub use weight::Weight;

/// pare's version, recorded in every file it writes.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The number of elements of `shape`, or `None` when it overflows `usize` (a malformed file).
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d))
}
