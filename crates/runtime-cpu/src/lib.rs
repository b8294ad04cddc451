//! pare-runtime-cpu: fast CPU kernels behind core-tensor's `Runtime` trait.
//!
//! [`CpuRuntime`] prepares each layer once for the fastest kernel that takes its format and
//! falls back to `ReferenceRuntime` (dequantize + candle) for the rest. Kernels have a scalar
//! twin and SIMD paths chosen at run time ([`SimdLevel::detect`]), run on a rayon pool of a
//! configurable size, and give the same bits whatever the thread count.
//!
//! Built so far (issue 4 is in progress): the W8A8 linear kernel ([`w8a8`]) — int8 per-channel
//! weights × activations quantized on the fly, i32 accumulation, fused dequantize + bias — with
//! scalar and AVX2 paths. Still to come: 4/8-bit weight-only GEMV/GEMM, FP16/BF16 weights,
//! sparse CSR/2:4/block kernels, pare's own f32 GEMM and the non-linear ops.
//!
//! ```
//! use std::sync::Arc;
//! use pare_core_tensor::Runtime;
//! use pare_runtime_cpu::CpuRuntime;
//!
//! let rt: Arc<dyn Runtime> = Arc::new(CpuRuntime::new(2)?);
//! assert_eq!(rt.name(), "cpu");
//! assert!(CpuRuntime::new(0).is_err());
//! # Ok::<(), pare_core_tensor::Error>(())
//! ```

pub mod gemm;
pub mod halfw;
pub mod linear;
pub mod probe;
pub mod simd;
pub mod w8a8;
pub mod wq;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pare_core_tensor::{ActQuant, Conv2dParams, Error, PreparedOp, ReferenceRuntime, Result, Runtime, Weight};

use crate::gemm::{PackedF32, Panels};
use crate::halfw::HalfPanels;
use crate::linear::PanelLinear;
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

impl CpuRuntime {
    /// A runtime on `threads` threads (≥ 1) at the fastest SIMD level this CPU has.
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_level(threads, SimdLevel::detect())
    }

    /// A runtime forced to `level` (tests run every level against the scalar twin). A level
    /// this CPU lacks is an error.
    pub fn with_level(threads: usize, level: SimdLevel) -> Result<Self> {
        if threads == 0 {
            return Err(Error::invalid("CPU runtime", "thread count must be at least 1, found 0"));
        }
        if level > SimdLevel::detect() {
            return Err(Error::invalid(
                "CPU runtime",
                format!("SIMD level {level:?} is not available on this CPU (best: {:?})", SimdLevel::detect()),
            ));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("pare-cpu-{i}"))
            .build()
            .map_err(|e| Error::invalid("CPU runtime", format!("cannot start {threads} threads: {e}")))?;
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

impl CpuRuntime {
    /// `weight` packed for pare's GEMM when a kernel takes its format (dense f32/f16/bf16,
    /// weight-only quantized), `None` when the reference must run it.
    fn panels(&self, layer: &str, weight: &Weight) -> Result<Option<Box<dyn Panels>>> {
        let shape = weight.shape();
        if shape.len() != 2 {
            return Err(Error::invalid(format!("linear layer `{layer}`"), format!("weight must be 2-D, found {shape:?}")));
        }
        let (n, k) = (shape[0], shape[1]);
        Ok(match weight {
            Weight::Dense(t) => match t.dtype() {
                DType::F32 => Some(Box::new(PackedF32::pack(&t.flatten_all()?.to_vec1::<f32>()?, n, k))),
                DType::F16 => {
                    let bits: Vec<u16> = t.flatten_all()?.to_vec1::<::half::f16>()?.iter().map(|v| v.to_bits()).collect();
                    Some(Box::new(HalfPanels::pack(&bits, n, k, DType::F16)))
                }
                DType::BF16 => {
                    let bits: Vec<u16> =
                        t.flatten_all()?.to_vec1::<::half::bf16>()?.iter().map(|v| v.to_bits()).collect();
                    Some(Box::new(HalfPanels::pack(&bits, n, k, DType::BF16)))
                }
                _ => None,
            },
            Weight::Quantized(q) if wq::fits(q) => Some(Box::new(QuantPanels::pack(q))),
            _ => None,
        })
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
        match self.panels(layer, weight)? {
            Some(w) => Ok(Arc::new(PanelLinear::new(layer, w, bias, self.level, self.pool.clone())?)),
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
        self.reference.prepare_conv2d(layer, weight, bias, params)
    }

    fn prepare_embedding(&self, layer: &str, weight: &Weight) -> Result<Arc<dyn PreparedOp>> {
        self.reference.prepare_embedding(layer, weight)
    }

    fn prepare_linear_quantized_input(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
        input: &ActQuant,
    ) -> Result<Arc<dyn PreparedOp>> {
        match weight {
            Weight::Quantized(q) if w8a8::fits(q) && input.bits == 8 => {
                Ok(Arc::new(w8a8::W8A8Linear::new(layer, q, bias, input, self.level, self.pool.clone())?))
            }
            _ => self.reference.prepare_linear_quantized_input(layer, weight, bias, input),
        }
    }
}

#[cfg(test)]
mod testkit;
