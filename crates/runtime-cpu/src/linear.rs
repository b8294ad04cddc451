//! The prepared linear op over any [`Panels`] format: shape and finiteness checks, then pare's
//! GEMM (or a format's fused small-M kernel) on the runtime's pool.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use pare_core_tensor::{Error, PreparedOp, Result};

use crate::gemm::{self, Panels};
use crate::simd::SimdLevel;

/// `y = x·Wᵀ + b` with `W` held in a packed [`Panels`] format.
#[derive(Debug)]
pub struct PanelLinear {
    layer: String,
    w: Box<dyn Panels>,
    bias: Option<Vec<f32>>,
    level: SimdLevel,
    pool: Arc<rayon::ThreadPool>,
}

impl PanelLinear {
    /// Wraps packed weights; `bias`, when given, must have one value per output.
    pub fn new(
        layer: &str,
        w: Box<dyn Panels>,
        bias: Option<&Tensor>,
        level: SimdLevel,
        pool: Arc<rayon::ThreadPool>,
    ) -> Result<Self> {
        let bias = bias.map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()).transpose()?;
        if let Some(b) = &bias
            && b.len() != w.n()
        {
            return Err(Error::Shape { name: format!("{layer}.bias"), expected: vec![w.n()], found: vec![b.len()] });
        }
        Ok(Self { layer: layer.to_string(), w, bias, level, pool })
    }

    /// `y[m, n]` for row-major `x[m, k]`.
    pub fn run(&self, x: &[f32]) -> Vec<f32> {
        let m = x.len() / self.w.k().max(1);
        let mut y = vec![0f32; m * self.w.n()];
        gemm::gemm(self.level, &self.pool, x, m, self.w.as_ref(), self.bias.as_deref(), &mut y);
        y
    }
}

/// The input of `layer` as f32 values, after checking its last dimension is `k` and that
/// every value is finite.
pub(crate) fn input_values(layer: &str, x: &Tensor, k: usize) -> Result<Vec<f32>> {
    let dims = x.dims();
    if dims.last() != Some(&k) {
        return Err(Error::Shape {
            name: format!("input of `{layer}`"),
            expected: vec![k],
            found: dims.last().map(|d| vec![*d]).unwrap_or_default(),
        });
    }
    let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = v.iter().position(|f| !f.is_finite()) {
        return Err(Error::NonFinite {
            name: format!("input of `{layer}`"),
            count: v.iter().filter(|f| !f.is_finite()).count(),
            first: i,
        });
    }
    Ok(v)
}

/// The output tensor for values `y` of an op mapping `x`'s last dimension to `n`.
pub(crate) fn output(x: &Tensor, y: Vec<f32>, n: usize) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1 checked by input_values") = n;
    Ok(Tensor::from_vec(y, dims, x.device())?.to_dtype(x.dtype())?)
}

impl PreparedOp for PanelLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let v = input_values(&self.layer, x, self.w.k())?;
        output(x, self.run(&v), self.w.n())
    }
}
