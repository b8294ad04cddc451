//! Reading a weight's values for quantization: f32, row-major, all finite; pruned sparse
//! weights expanded with their zeros.

use candle_core::{DType, Tensor};

use crate::Result;

/// The values of `t` as f32 in row-major order, refusing NaN and infinity with an error that
/// names `name`, how many there are and where the first is.
pub fn finite_values(name: &str, t: &Tensor) -> Result<Vec<f32>> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(first) = v.iter().position(|x| !x.is_finite()) {
        let count = v.iter().filter(|x| !x.is_finite()).count();
        return Err(pare_core_tensor::Error::NonFinite { name: name.to_string(), count, first }.into());
    }
    Ok(v)
}

/// The float values a weight stands for, as the tensor to quantize: a dense weight as it is, a
/// pruned sparse one (CSR, N:M) expanded with its zeros (every scheme maps 0 to exactly 0, so
/// the pruned weights stay pruned). An already quantized weight is an error naming `name`.
pub fn float_weight(name: &str, w: &pare_core_tensor::Weight, what: &str) -> Result<Tensor> {
    match w {
        pare_core_tensor::Weight::Dense(t) => Ok(t.clone()),
        pare_core_tensor::Weight::Sparse(s) => Ok(s.to_dense(&candle_core::Device::Cpu)?),
        other => Err(crate::error::option(name, format!("{what}, found {}", other.describe()))),
    }
}
