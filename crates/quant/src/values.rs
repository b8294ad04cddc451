//! Reading a tensor's values for quantization: f32, row-major, all finite.

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
