//! `Weight`: the contract between transforms (which produce formats) and runtimes (which
//! consume them). Any layer's weight may be dense, quantized or sparse.

use candle_core::{DType, Device, Tensor};

use crate::{Granularity, Mapping, QuantizedTensor, Result, SparseLayout, SparseTensor};

/// A layer's weight in one of pare's formats.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A plain candle tensor (possibly a trainable `Var`).
    Dense(Tensor),
    /// Packed integer codes with their scheme.
    Quantized(QuantizedTensor),
    /// A sparse layout (CSR, N:M, block).
    Sparse(SparseTensor),
}

impl Weight {
    /// The logical shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Weight::Dense(t) => t.dims().to_vec(),
            Weight::Quantized(q) => q.shape().to_vec(),
            Weight::Sparse(s) => s.shape().to_vec(),
        }
    }

    /// The logical dtype (what `to_dense` returns).
    pub fn dtype(&self) -> DType {
        match self {
            Weight::Dense(t) => t.dtype(),
            Weight::Quantized(q) => q.dtype(),
            Weight::Sparse(s) => s.dtype(),
        }
    }

    /// The number of logical elements (parameters).
    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }

    /// The dense tensor this weight stands for: the reference semantics of every format.
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.to_device(device)?),
            Weight::Quantized(q) => q.dequantize(device),
            Weight::Sparse(s) => s.to_dense(device),
        }
    }

    /// Bytes the weight occupies in storage.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quantized(q) => q.storage_bytes(),
            Weight::Sparse(s) => s.storage_bytes(),
        }
    }

    /// A short human description of the format: `dense f32`, `int4 linear sym per-group(32)`,
    /// `sparse 2:4`, `sparse csr 12.5%`.
    pub fn describe(&self) -> String {
        match self {
            Weight::Dense(t) => format!("dense {:?}", t.dtype()).to_lowercase(),
            Weight::Quantized(q) => {
                let s = q.scheme();
                let map = match s.mapping {
                    Mapping::Linear if s.symmetric => "linear sym",
                    Mapping::Linear => "linear asym",
                    Mapping::Codebook => "codebook",
                };
                let gran = match s.granularity {
                    Granularity::PerTensor => "per-tensor".to_string(),
                    Granularity::PerChannel { axis } => format!("per-channel({axis})"),
                    Granularity::PerGroup { size } => format!("per-group({size})"),
                    Granularity::PerToken => "per-token".to_string(),
                };
                format!("{}{} {map} {gran}", if s.signed { "int" } else { "uint" }, s.bits)
            }
            Weight::Sparse(s) => {
                let density = 100.0 * s.stored() as f64 / s.numel().max(1) as f64;
                match s.layout() {
                    SparseLayout::Csr { .. } => format!("sparse csr {density:.1}% stored"),
                    SparseLayout::NM { n, m, .. } => format!("sparse {n}:{m}"),
                    SparseLayout::Block { block_rows, block_cols, .. } => {
                        format!("sparse block {block_rows}x{block_cols} {density:.1}% stored")
                    }
                }
            }
        }
    }
}
