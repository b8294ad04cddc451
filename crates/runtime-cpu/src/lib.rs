//! pare-runtime-cpu: fast CPU kernels behind core-tensor's `Runtime` trait.
//!
//! [`CpuRuntime`] prepares each layer once for the fastest kernel that takes its format and
//! falls back to `ReferenceRuntime` (dequantize + candle) for the rest. Kernels have a scalar
//! twin and SIMD paths chosen at run time ([`SimdLevel::detect`]), run on a rayon pool of a
//! configurable size, and give the same bits whatever the thread count.
//!
//! | weight / op | kernel |
//! |---|---|
//! | dense f32, FP16, BF16 | [`gemm`] (blocked, 6×16 AVX2 micro-kernel), half weights widened per panel ([`halfw`]) |
//! | 1–8-bit linear codes, ≤ 4-bit codebooks (NF4), any granularity but per input channel | [`wq`]: decoded per panel for the GEMM, in registers for ≤ 6 rows |
//! | int8 (or 5–7-bit) per-channel weights × 8-bit activations (W8A8) | [`w8a8`]: exact `vpmaddwd` kernel (i8 code pairs widened as they load, 6×16 register tiles; `vpmaddubsw` on u8 × i8 quads for 7-bit weights, whose pair sums cannot saturate; `vpdpbusd` on the same quads with AVX-512 VNNI), epilogue from the registers, activations quantized on the fly; a feed-forward pair as one chain whose intermediate stays in cache |
//! | ≤ 4-bit linear codes × 8-bit (or narrower) activations (W4A8) | [`w4a8`]: exact `vpmaddubsw` dot products per group on the nibble panels for ≤ 16 rows, one float epilogue per group; more rows run [`wq`] on the fake-quantized input |
//! | CSR / N:M / block sparse, or dense with ≤ 45% nonzeros | [`sparse`] (denser weights run on the dense GEMM, which is faster) |
//! | one-group convolutions | [`conv`]: im2col + the GEMM, every format above |
//! | attention (f32, or bf16 products: `vdpbf16ps` with AVX-512 BF16), GELU/SiLU/ReLU, residual + layer norm | [`nonlinear`] |
//! | everything else | `ReferenceRuntime` |
//!
//! The runtime is for inference: `prepare` copies a layer's weights into the kernel's layout,
//! so gradients do not flow through it (train on the reference runtime, then prepare here).
//! [`probe`] holds the FMA-peak and bandwidth loops the benchmarks quote their goals against.
//!
//! ```
//! use std::sync::Arc;
//! use candle_core::{Device, Tensor};
//! use pare_core_tensor::{Runtime, Weight};
//! use pare_runtime_cpu::CpuRuntime;
//!
//! let rt: Arc<dyn Runtime> = Arc::new(CpuRuntime::new(2)?);
//! assert_eq!(rt.name(), "cpu");
//! let w = Weight::Dense(Tensor::ones((3, 4), candle_core::DType::F32, &Device::Cpu)?);
//! let y = rt.prepare_linear("fc", &w, None)?.forward(&Tensor::ones((2, 4), candle_core::DType::F32, &Device::Cpu)?)?;
//! assert_eq!(y.to_vec2::<f32>()?, vec![vec![4.0; 3]; 2]);
//! assert!(CpuRuntime::new(0).is_err());
//! # Ok::<(), pare_core_tensor::Error>(())
//! ```

pub mod conv;
pub mod gemm;
pub mod halfw;
pub mod linear;
pub mod nonlinear;
pub mod probe;
pub mod simd;
pub mod sparse;
pub mod w4a8;
pub mod w8a8;
pub mod wq;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pare_core_tensor::{
    ActQuant, Activation, AttentionPrecision, Conv2dParams, Error, PreparedOp, ReferenceRuntime, Result, Runtime,
    Weight,
};

use crate::gemm::PackedF32;
use crate::halfw::HalfPanels;
use crate::linear::{LinearKernel, LinearOp, with_f32};
use crate::sparse::SparseRows;
use crate::wq::QuantPanels;

pub use simd::SimdLevel;

/// The CPU runtime: SIMD kernels where a layer's format has one, the reference elsewhere.
#[derive(Debug, Clone)]
pub struct CpuRuntime {
    reference: ReferenceRuntime,
    level: SimdLevel,
    threads: usize,
    pool: Arc<rayon::ThreadPool>,
}

/// Asks the C allocator to keep freed buffers of up to 32 MiB in the heap for reuse instead
/// of returning them to the kernel (glibc on Linux; elsewhere nothing). A model's layers
/// allocate activations of a few MiB each; handed back and faulted in again, they cost about
/// a sixth of MiniLM's time at batch 32 × 128 on 2 cores (page faults and zeroing on every
/// layer). The thresholds alone do not cover the runtime's worker threads: their allocations
/// come from glibc's per-thread arenas, whose heaps are unmapped as soon as they empty
/// whatever the trim threshold, so MiniLM W8A8 still faulted in ~110 MB per forward (a tenth
/// of its time). A 64 MiB top pad keeps a grown heap's tail mapped across forwards.
/// [`CpuRuntime::new`] calls this once per process; the price is memory the process keeps
/// after a peak (at most the peak plus the pad per arena).
pub fn retain_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes glibc's allocation thresholds; both values are in the
        // ranges its manual documents (the mmap threshold's maximum is 32 MiB on 64-bit).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        }
    });
}

impl CpuRuntime {
    /// A runtime on `threads` threads (≥ 1) at the fastest SIMD level this CPU has. The first
    /// one also calls [`retain_freed_memory`].
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_level(threads, SimdLevel::detect())
    }

    /// A runtime forced to `level` (tests run every level against the scalar twin). A level
    /// this CPU lacks is an error.
    pub fn with_level(threads: usize, level: SimdLevel) -> Result<Self> {
        if threads == 0 {
            return Err(Error::invalid("CPU runtime", "thread count must be at least 1, found 0"));
        }
        if !SimdLevel::available().contains(&level) {
            return Err(Error::invalid(
                "CPU runtime",
                format!("SIMD level {level:?} is not available on this CPU (it has {:?})", SimdLevel::available()),
            ));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("pare-cpu-{i}"))
            .build()
            .map_err(|e| Error::invalid("CPU runtime", format!("cannot start {threads} threads: {e}")))?;
        retain_freed_memory();
        Ok(Self { reference: ReferenceRuntime::cpu(), level, threads, pool: Arc::new(pool) })
    }

    /// The SIMD level kernels run at.
    pub fn level(&self) -> SimdLevel {
        self.level
    }

    /// The number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// Whether every tensor is f32 on the CPU (what the non-linear kernels take).
fn all_f32_cpu(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

impl CpuRuntime {
    /// `weight` (`[n, k]`) in the layout of the fastest kernel that takes its format, `None`
    /// when the reference must run it. Dense f32 and sparse weights take the sparse kernel when
    /// `sparse_ok` and their density is at most the measured crossover
    /// [`sparse::SPARSE_MAX_DENSITY`] (a pruned model saved dense included), pare's GEMM
    /// otherwise; FP16/BF16 and weight-only quantized weights take the GEMM's panels.
    fn kernel(&self, layer: &str, weight: &Weight, sparse_ok: bool) -> Result<Option<LinearKernel>> {
        let shape = weight.shape();
        if shape.len() != 2 {
            return Err(Error::invalid(
                format!("linear layer `{layer}`"),
                format!("weight must be 2-D, found {shape:?}"),
            ));
        }
        let (n, k) = (shape[0], shape[1]);
        let values = match weight {
            Weight::Dense(t) if t.dtype() == DType::F32 => t.flatten_all()?.to_vec1::<f32>()?,
            Weight::Sparse(s) => s.to_dense_f32(),
            Weight::Dense(t) if matches!(t.dtype(), DType::F16 | DType::BF16) => {
                let bits: Vec<u16> = if t.dtype() == DType::F16 {
                    t.flatten_all()?.to_vec1::<::half::f16>()?.iter().map(|v| v.to_bits()).collect()
                } else {
                    t.flatten_all()?.to_vec1::<::half::bf16>()?.iter().map(|v| v.to_bits()).collect()
                };
                return Ok(Some(LinearKernel::Panels(Box::new(HalfPanels::pack(&bits, n, k, t.dtype())))));
            }
            Weight::Quantized(q) if wq::fits(q) => {
                return Ok(Some(LinearKernel::Panels(Box::new(QuantPanels::pack(q)))));
            }
            _ => return Ok(None),
        };
        let nonzero = values.iter().filter(|v| **v != 0.0).count();
        let density = nonzero as f64 / values.len().max(1) as f64;
        Ok(Some(if sparse_ok && density <= sparse::SPARSE_MAX_DENSITY && !values.is_empty() {
            LinearKernel::Sparse(SparseRows::from_dense(&values, n, k))
        } else {
            LinearKernel::Panels(Box::new(PackedF32::pack(&values, n, k)))
        }))
    }
}

impl Runtime for CpuRuntime {
    fn name(&self) -> &str {
        "cpu"
    }

    fn device(&self) -> &Device {
        self.reference.device()
    }

    fn prepare_linear(&self, layer: &str, weight: &Weight, bias: Option<&Tensor>) -> Result<Arc<dyn PreparedOp>> {
        match self.kernel(layer, weight, true)? {
            Some(w) => Ok(Arc::new(LinearOp::new(layer, w, bias, self.level, self.pool.clone())?)),
            None => self.reference.prepare_linear(layer, weight, bias),
        }
    }

    fn prepare_conv2d(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
        params: Conv2dParams,
    ) -> Result<Arc<dyn PreparedOp>> {
        let shape = weight.shape();
        if shape.len() != 4 || params.groups != 1 || params.stride == 0 || params.dilation == 0 {
            return self.reference.prepare_conv2d(layer, weight, bias, params);
        }
        let (out, rest) = (shape[0], shape[1] * shape[2] * shape[3]);
        // The weight as the [out, in·kh·kw] matrix im2col multiplies (the same memory order).
        let flat = match weight {
            Weight::Dense(t) => Weight::Dense(t.reshape((out, rest))?),
            Weight::Quantized(q) => match q.clone().reshaped(vec![out, rest]) {
                Ok(q) => Weight::Quantized(q),
                Err(_) => return self.reference.prepare_conv2d(layer, weight, bias, params),
            },
            // Sparse filters flattened dense; `kernel` stores them sparse again below the crossover.
            Weight::Sparse(s) => Weight::Dense(s.to_dense(self.device())?.reshape((out, rest))?),
        };
        match self.kernel(layer, &flat, true)? {
            Some(w) => Ok(Arc::new(conv::Conv2dOp::new(
                layer,
                w,
                bias,
                (shape[1], shape[2], shape[3]),
                params,
                self.level,
                self.pool.clone(),
            )?)),
            None => self.reference.prepare_conv2d(layer, weight, bias, params),
        }
    }

    fn prepare_embedding(&self, layer: &str, weight: &Weight) -> Result<Arc<dyn PreparedOp>> {
        self.reference.prepare_embedding(layer, weight)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        mask: Option<&Tensor>,
        scale: f64,
    ) -> Result<Tensor> {
        self.attention_with(q, k, v, heads, mask, scale, AttentionPrecision::F32)
    }

    fn attention_with(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        mask: Option<&Tensor>,
        scale: f64,
        precision: AttentionPrecision,
    ) -> Result<Tensor> {
        pare_core_tensor::check_attention(q, k, v, heads, mask)?;
        if !all_f32_cpu(&[q, k, v]) {
            return match precision {
                AttentionPrecision::F32 => pare_core_tensor::attention_reference(q, k, v, heads, mask, scale),
                AttentionPrecision::Bf16 => pare_core_tensor::attention_reference_bf16(q, k, v, heads, mask, scale),
            };
        }
        let (batch, seq, hidden) = q.dims3()?;
        let shape = nonlinear::AttnShape { batch, seq, heads, head_dim: hidden / heads };
        let mask = mask.map(|m| m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()).transpose()?;
        // Not zeroed first: the kernel writes every value (a serial pass of 6 MB per layer at
        // MiniLM's 32 × 128 was about 1% of the whole model's time, with the other core idle).
        let mut out: Vec<f32> = Vec::with_capacity(q.elem_count());
        with_f32(q, |qv| {
            with_f32(k, |kv| {
                with_f32(v, |vv| {
                    let m = mask.as_deref();
                    let dst = &mut out.spare_capacity_mut()[..qv.len()];
                    nonlinear::attention(self.level, &self.pool, qv, kv, vv, m, scale as f32, shape, precision, dst)
                })
            })
        })???;
        // SAFETY: the kernel wrote all q.elem_count() values (one task per batch and head,
        // each writing its head's columns of every row of its batch).
        unsafe { out.set_len(q.elem_count()) };
        Ok(Tensor::from_vec(out, q.dims(), q.device())?)
    }

    fn activation(&self, act: Activation, x: &Tensor) -> Result<Tensor> {
        let Some(kernel) = nonlinear::Act::of(act) else { return act.forward(x) };
        if !all_f32_cpu(&[x]) {
            return act.forward(x);
        }
        let mut y = vec![0f32; x.elem_count()];
        with_f32(x, |xv| nonlinear::activation(self.level, &self.pool, kernel, xv, &mut y))?;
        Ok(Tensor::from_vec(y, x.dims(), x.device())?)
    }

    fn run_scoped(&self, f: &mut (dyn FnMut() + Send)) {
        self.pool.install(f)
    }

    fn layer_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
    ) -> Result<Tensor> {
        let dim = x.dims().last().copied().unwrap_or(0);
        let shapes_ok = residual.is_none_or(|r| r.dims() == x.dims()) && gamma.dims() == [dim] && beta.dims() == [dim];
        if !shapes_ok || !all_f32_cpu(&[x, gamma, beta]) || residual.is_some_and(|r| !all_f32_cpu(&[r])) {
            return pare_core_tensor::layer_norm_reference(x, residual, gamma, beta, eps);
        }
        // Not zeroed first: the kernel writes every value (see `attention`).
        let mut y: Vec<f32> = Vec::with_capacity(x.elem_count());
        let (g, b) = (gamma.to_vec1::<f32>()?, beta.to_vec1::<f32>()?);
        let (level, pool, eps) = (self.level, &self.pool, eps as f32);
        let dst = &mut y.spare_capacity_mut()[..x.elem_count()];
        with_f32(x, |xv| match residual {
            Some(r) => with_f32(r, |rv| nonlinear::layer_norm(level, pool, xv, Some(rv), &g, &b, eps, dst)),
            None => {
                nonlinear::layer_norm(level, pool, xv, None, &g, &b, eps, dst);
                Ok(())
            }
        })??;
        // SAFETY: the kernel copied every row of x into y before normalising it in place.
        unsafe { y.set_len(x.elem_count()) };
        Ok(Tensor::from_vec(y, x.dims(), x.device())?)
    }

    fn prepare_linear_quantized_input(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
        input: &ActQuant,
    ) -> Result<Arc<dyn PreparedOp>> {
        match weight {
            // Weights of 4 bits or fewer take the W4A8 kernel (packed nibbles, a float path for
            // large batches); up to 8 bits, the W8A8 one.
            Weight::Quantized(q) if w4a8::fits(q) => {
                Ok(Arc::new(w4a8::W4A8Linear::new(layer, q, bias, input, self.level, self.pool.clone())?))
            }
            Weight::Quantized(q) if w8a8::fits(q) && input.bits == 8 => {
                Ok(Arc::new(w8a8::W8A8Linear::new(layer, q, bias, input, self.level, self.pool.clone())?))
            }
            _ => self.reference.prepare_linear_quantized_input(layer, weight, bias, input),
        }
    }
}

#[cfg(test)]
mod testkit;
