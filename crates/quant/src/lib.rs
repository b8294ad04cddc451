//! pare-quant: quantization algorithms.
//!
//! The formats live in core-tensor (`QuantizedTensor`, `QuantScheme`); this crate computes
//! them from float tensors:
//!
//! - [`linear`]: affine range mapping at 2–8 bits, symmetric or asymmetric, per tensor, per
//!   channel (any axis), per group along the reduction axis, or per token;
//! - [`float`]: narrowing to FP16, BF16, FP8 E4M3 and E5M2 (round-to-nearest-even, saturating);
//! - [`codebook`]: non-linear mappings — NF4, quantile (equal-population bins) and seeded
//!   k-means codebooks;
//! - [`weight_only`]: layer selection by glob and weight-only quantization of whole models
//!   (round to nearest, clipping search, GPTQ) with per-layer error reports;
//! - [`gptq`]: GPTQ's Hessian-based error compensation and the clipping search;
//! - [`observer`] and [`ptq`]: activation quantization — dynamic per token, or static ranges
//!   from min-max, moving-average, percentile, MSE and entropy (KL) observers;
//! - [`smooth`]: SmoothQuant's migration of activation outliers into the weights;
//! - [`qat`]: quantization-aware training with learned step sizes, converted to integers;
//! - [`gguf`]: llama.cpp block types through candle, and GGUF export.
//!
//! Still to come (issue 3): compressed-tensors export.
//!
//! ```
//! use pare_quant::linear::{LinearSpec, quantize_linear};
//! use pare_core_tensor::Granularity;
//! use candle_core::{Device, Tensor};
//!
//! let w = Tensor::new(&[[0.5f32, -1.0, 0.25, 2.0]], &Device::Cpu)?;
//! let spec = LinearSpec { bits: 8, symmetric: true, granularity: Granularity::PerChannel { axis: 0 } };
//! let q = quantize_linear("fc.weight", &w, spec)?;
//! let back = q.dequantize_f32();
//! assert!(back.iter().zip([0.5, -1.0, 0.25, 2.0]).all(|(a, b)| (a - b).abs() <= q.scales()[0] / 2.0));
//! # Ok::<(), pare_quant::Error>(())
//! ```

pub mod codebook;
mod error;
pub mod float;
pub mod gguf;
pub mod gptq;
pub mod linear;
pub mod observer;
pub mod ptq;
pub mod qat;
pub mod smooth;
mod values;
pub mod weight_only;

pub use error::{Error, Result};
pub use values::{finite_values, float_weight};
