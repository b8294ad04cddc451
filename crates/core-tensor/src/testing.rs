//! The workspace's one tolerance helper, for tests in every crate.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Largest absolute element-wise difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        return Err(Error::Shape {
            name: "compared tensor".into(),
            expected: a.dims().to_vec(),
            found: b.dims().to_vec(),
        });
    }
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?;
    if d.elem_count() == 0 {
        return Ok(0.0);
    }
    Ok(d.max(0)?.to_scalar::<f32>()?)
}

/// Checks that `a` and `b` agree within `tol` (max absolute difference), with an error that
/// says by how much they do not.
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f32) -> Result<()> {
    let d = max_abs_diff(a, b)?;
    if d.is_nan() || d > tol {
        return Err(Error::invalid("comparison", format!("max abs difference {d} exceeds tolerance {tol}")));
    }
    Ok(())
}
