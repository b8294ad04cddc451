//! pare-quant: quantization algorithms.
//!
//! The formats live in core-tensor (`QuantizedTensor`, `QuantScheme`); this crate computes
//! them from float tensors:
//!
//! - [`linear`]: affine range mapping at 2–8 bits, symmetric or asymmetric, per tensor, per
//!   channel (any axis), per group along the reduction axis, or per token;
//! - [`float`]: narrowing to FP16, BF16, FP8 E4M3 and E5M2 (round-to-nearest-even, saturating);
//! - [`codebook`]: non-linear mappings — NF4, quantile (equal-population bins) and seeded
//!   k-means codebooks.
//!
//! Still to come (issue 3): PTQ static observers, dynamic activation quantization, QAT,
//! GPTQ/AWQ/SmoothQuant, layer selection and export to GGUF / compressed-tensors.
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
pub mod smooth;
mod values;
pub mod weight_only;

pub use error::{Error, Result};
pub use values::finite_values;
