//! The prepared linear op over any weight kernel — packed [`Panels`] for pare's GEMM (or a
//! format's fused small-M kernel), or [`SparseRows`] — with the shape and finiteness checks
//! every CPU op shares, on the runtime's pool.

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Storage, Tensor};
use pare_core_tensor::{Activation, Error, PreparedOp, Result};

use crate::gemm::{self, Panels};
use crate::nonlinear::Act;
use crate::simd::SimdLevel;
use crate::sparse::SparseRows;

/// The weights of a [`LinearOp`] in the layout of the kernel that runs them.
#[derive(Debug)]
pub enum LinearKernel {
    /// Column panels for pare's GEMM (dense, half or weight-only quantized).
    Panels(Box<dyn Panels>),
    /// The nonzeros, for the sparse kernel.
    Sparse(SparseRows),
}

impl LinearKernel {
    /// Output features.
    pub fn n(&self) -> usize {
        match self {
            LinearKernel::Panels(w) => w.n(),
            LinearKernel::Sparse(w) => w.n(),
        }
    }

    /// Input features.
    pub fn k(&self) -> usize {
        match self {
            LinearKernel::Panels(w) => w.k(),
            LinearKernel::Sparse(w) => w.k(),
        }
    }

    /// `y[m, n] = act(x[m, k]·Wᵀ + bias)` (no activation when `act` is `None`) into `m·n`
    /// floats at `y`, which may be uninitialised: both kernels write every output element
    /// before reading it, and activate each tile in place once it is final.
    ///
    /// # Safety
    /// `y` must be valid for reads and writes of `m·n` floats that nothing else touches during
    /// the call.
    pub(crate) unsafe fn run_raw(
        &self,
        level: SimdLevel,
        pool: &rayon::ThreadPool,
        x: &[f32],
        bias: Option<&[f32]>,
        y: *mut f32,
        act: Option<Act>,
    ) -> bool {
        let m = x.len() / self.k().max(1);
        // SAFETY: forwarded to the kernels under the caller's contract.
        unsafe {
            match self {
                LinearKernel::Panels(w) => gemm::gemm_raw(level, pool, x, m, w.as_ref(), bias, y, act),
                LinearKernel::Sparse(w) => w.run_raw(level, pool, x, bias, y, act),
            }
        }
    }

    /// Whether [`LinearKernel::run_raw`] looks at every input value and reports one that is
    /// not finite (its `false`), so callers need no pass of their own before it: both kernels
    /// do (the GEMM while packing, the sparse kernel while transposing its tiles).
    pub(crate) fn screens(&self) -> bool {
        match self {
            LinearKernel::Panels(_) | LinearKernel::Sparse(_) => true,
        }
    }

    /// [`LinearKernel::run_raw`] into a new vector, with its finiteness report.
    pub(crate) fn run(
        &self,
        level: SimdLevel,
        pool: &rayon::ThreadPool,
        x: &[f32],
        bias: Option<&[f32]>,
        act: Option<Act>,
    ) -> (Vec<f32>, bool) {
        let m = x.len() / self.k().max(1);
        let mut y: Vec<f32> = Vec::with_capacity(m * self.n());
        // SAFETY: y has capacity for the m·n outputs, which the kernels write in full before
        // the length is set; nothing else holds the buffer.
        unsafe {
            let finite = self.run_raw(level, pool, x, bias, y.as_mut_ptr(), act);
            y.set_len(m * self.n());
            (y, finite)
        }
    }
}

/// `y = x·Wᵀ + b` with `W` in a [`LinearKernel`] layout.
#[derive(Debug)]
pub struct LinearOp {
    layer: String,
    w: LinearKernel,
    bias: Option<Vec<f32>>,
    level: SimdLevel,
    pool: Arc<rayon::ThreadPool>,
}

impl LinearOp {
    /// Wraps prepared weights; `bias`, when given, must have one value per output.
    pub fn new(
        layer: &str,
        w: LinearKernel,
        bias: Option<&Tensor>,
        level: SimdLevel,
        pool: Arc<rayon::ThreadPool>,
    ) -> Result<Self> {
        let bias = bias_values(layer, bias, w.n())?;
        Ok(Self { layer: layer.to_string(), w, bias, level, pool })
    }

    /// `y[m, n]` for row-major `x[m, k]`.
    pub fn run(&self, x: &[f32]) -> Vec<f32> {
        self.w.run(self.level, &self.pool, x, self.bias.as_deref(), None).0
    }

    /// The output values for `x`, activated by `act`: the input's shape is checked, and its
    /// values are screened for NaN and infinities by the kernel where it looks at each one
    /// anyway ([`LinearKernel::screens`]), by a separate pass otherwise.
    fn forward_values(&self, x: &Tensor, act: Option<Act>) -> Result<Vec<f32>> {
        with_input_screened(&self.layer, &self.pool, x, self.w.k(), self.w.screens(), |v| {
            let (y, finite) = self.w.run(self.level, &self.pool, v, self.bias.as_deref(), act);
            finite.then_some(y)
        })
    }
}

/// Runs `run` on `layer`'s input `x` (last dimension checked to be `k`), which screens the
/// values itself when `screens` (and returns `None` when one is not finite), else after a
/// separate [`check_finite`] pass; on `None`, the error names the bad values.
pub(crate) fn with_input_screened<R>(
    layer: &str,
    pool: &rayon::ThreadPool,
    x: &Tensor,
    k: usize,
    screens: bool,
    run: impl FnOnce(&[f32]) -> Option<R>,
) -> Result<R> {
    with_input_unchecked(layer, x, k, |v| {
        if !screens {
            check_finite(layer, pool, v)?;
        }
        match run(v) {
            Some(y) => Ok(y),
            None => {
                check_finite(layer, pool, v)?;
                Err(Error::invalid(format!("input of `{layer}`"), "a value that is not finite"))
            }
        }
    })?
}

/// A layer's bias as f32 values, checked to hold one value per output (`n`).
pub(crate) fn bias_values(layer: &str, bias: Option<&Tensor>, n: usize) -> Result<Option<Vec<f32>>> {
    pare_core_tensor::check_bias(layer, bias, n)?;
    Ok(bias.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?)
}

/// Calls `f` with the input of `layer` as f32 values (borrowed from the tensor's storage when
/// it is a contiguous f32 CPU tensor, converted otherwise), after checking that its last
/// dimension is `k` and that every value is finite.
pub(crate) fn with_input<R>(
    layer: &str,
    pool: &rayon::ThreadPool,
    x: &Tensor,
    k: usize,
    f: impl FnOnce(&[f32]) -> R,
) -> Result<R> {
    with_input_unchecked(layer, x, k, |v| check_finite(layer, pool, v).map(|()| f(v)))?
}

/// [`with_input`] without the finiteness check, for kernels that screen every value
/// themselves on a pass they make anyway (and call [`check_finite`] when one fails).
pub(crate) fn with_input_unchecked<R>(layer: &str, x: &Tensor, k: usize, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let dims = x.dims();
    if dims.last() != Some(&k) {
        return Err(Error::Shape {
            name: format!("input of `{layer}`"),
            expected: vec![k],
            found: dims.last().map(|d| vec![*d]).unwrap_or_default(),
        });
    }
    with_f32(x, f)
}

/// Ok when every value of `layer`'s input `v` is finite, else the error naming how many are
/// not and the first.
pub(crate) fn check_finite(layer: &str, pool: &rayon::ThreadPool, v: &[f32]) -> Result<()> {
    // A branch-free pass per chunk (vectorised) on the pool (a serial pass over MiniLM's
    // activations cost 2% of its int8 time while the other core waited), the slow search
    // only when one fails.
    let finite = |c: &[f32]| c.iter().fold(true, |ok, f| ok & f.is_finite());
    let ok = if v.len() < 1 << 15 {
        v.chunks(4096).all(finite)
    } else {
        use rayon::prelude::*;
        pool.install(|| v.par_chunks(1 << 14).all(finite))
    };
    if ok {
        return Ok(());
    }
    let first = v.iter().position(|f| !f.is_finite()).unwrap_or(0);
    Err(Error::NonFinite {
        name: format!("input of `{layer}`"),
        count: v.iter().filter(|f| !f.is_finite()).count(),
        first,
    })
}

/// Calls `f` with `t`'s values as f32, borrowed when `t` is a contiguous f32 CPU tensor,
/// converted otherwise.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() == DType::F32 && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let Storage::Cpu(CpuStorage::F32(all)) = &*storage {
            return Ok(f(&all[layout.start_offset()..layout.start_offset() + t.elem_count()]));
        }
    }
    Ok(f(&t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
}

/// The output tensor for values `y` of an op mapping `x`'s last dimension to `n`.
pub(crate) fn output(x: &Tensor, y: Vec<f32>, n: usize) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1 checked by with_input") = n;
    Ok(Tensor::from_vec(y, dims, x.device())?.to_dtype(x.dtype())?)
}

impl PreparedOp for LinearOp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_values(x, None)?;
        output(x, y, self.w.n())
    }

    fn forward_activated(&self, x: &Tensor, act: Activation) -> Option<Result<Tensor>> {
        let kernel = Act::of(act).filter(|_| x.dtype() == DType::F32)?;
        Some(self.forward_values(x, Some(kernel)).and_then(|y| output(x, y, self.w.n())))
    }
}
