//! The prepared linear op over any [`Panels`] format: shape and finiteness checks, then pare's
//! GEMM (or a format's fused small-M kernel) on the runtime's pool.

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Storage, Tensor};
use pare_core_tensor::{Error, PreparedOp, Result};

use crate::gemm::{self, Panels};
use crate::simd::SimdLevel;
use crate::sparse::SparseRows;

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
        let bias = bias_values(layer, bias, w.n())?;
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

/// A layer's bias as f32 values, checked to hold one value per output (`n`).
pub(crate) fn bias_values(layer: &str, bias: Option<&Tensor>, n: usize) -> Result<Option<Vec<f32>>> {
    let bias = bias.map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()).transpose()?;
    match &bias {
        Some(b) if b.len() != n => {
            Err(Error::Shape { name: format!("{layer}.bias"), expected: vec![n], found: vec![b.len()] })
        }
        _ => Ok(bias),
    }
}

/// Calls `f` with the input of `layer` as f32 values (borrowed from the tensor's storage when
/// it is a contiguous f32 CPU tensor, converted otherwise), after checking that its last
/// dimension is `k` and that every value is finite.
pub(crate) fn with_input<R>(layer: &str, x: &Tensor, k: usize, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let dims = x.dims();
    if dims.last() != Some(&k) {
        return Err(Error::Shape {
            name: format!("input of `{layer}`"),
            expected: vec![k],
            found: dims.last().map(|d| vec![*d]).unwrap_or_default(),
        });
    }
    let check = |v: &[f32]| {
        // A branch-free pass per chunk (vectorised), the slow search only when one fails.
        if v.chunks(4096).all(|c| c.iter().fold(true, |ok, f| ok & f.is_finite())) {
            return Ok(());
        }
        let first = v.iter().position(|f| !f.is_finite()).unwrap_or(0);
        Err(Error::NonFinite {
            name: format!("input of `{layer}`"),
            count: v.iter().filter(|f| !f.is_finite()).count(),
            first,
        })
    };
    if x.dtype() == DType::F32 && x.is_contiguous() {
        let (storage, layout) = x.storage_and_layout();
        if let Storage::Cpu(CpuStorage::F32(all)) = &*storage {
            let v = &all[layout.start_offset()..layout.start_offset() + x.elem_count()];
            check(v)?;
            return Ok(f(v));
        }
    }
    let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    check(&v)?;
    Ok(f(&v))
}

/// The output tensor for values `y` of an op mapping `x`'s last dimension to `n`.
pub(crate) fn output(x: &Tensor, y: Vec<f32>, n: usize) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1 checked by with_input") = n;
    Ok(Tensor::from_vec(y, dims, x.device())?.to_dtype(x.dtype())?)
}

impl PreparedOp for PanelLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = with_input(&self.layer, x, self.w.k(), |v| self.run(v))?;
        output(x, y, self.w.n())
    }
}

/// `y = x·Wᵀ + b` with `W` held as its nonzeros ([`SparseRows`]).
#[derive(Debug)]
pub struct SparseLinear {
    layer: String,
    w: SparseRows,
    bias: Option<Vec<f32>>,
    level: SimdLevel,
    pool: Arc<rayon::ThreadPool>,
}

impl SparseLinear {
    /// Wraps sparse weights; `bias`, when given, must have one value per output.
    pub fn new(
        layer: &str,
        w: SparseRows,
        bias: Option<&Tensor>,
        level: SimdLevel,
        pool: Arc<rayon::ThreadPool>,
    ) -> Result<Self> {
        let bias = bias_values(layer, bias, w.n())?;
        Ok(Self { layer: layer.to_string(), w, bias, level, pool })
    }
}

impl PreparedOp for SparseLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = with_input(&self.layer, x, self.w.k(), |v| {
            let mut y = vec![0f32; v.len() / self.w.k().max(1) * self.w.n()];
            self.w.run(self.level, &self.pool, v, self.bias.as_deref(), &mut y);
            y
        })?;
        output(x, y, self.w.n())
    }
}
