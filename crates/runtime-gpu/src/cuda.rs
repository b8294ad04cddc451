//! The CUDA runtime: core-tensor's `Runtime` on candle's CUDA device.
//!
//! Activations and weights live on the device, so a whole model runs there with no copies
//! between layers (candle's CUDA ops do the element-wise work). Weights in a format candle's
//! quantized matmul takes (int8 or int4, signed, symmetric, groups of 32: GGML's Q8_0 and Q4_0)
//! are repacked into its blocks and run by `QMatMul`; every other format is dequantized once at
//! `prepare` and runs as a dense matmul.
//!
//! The code is device-generic: [`CudaRuntime::on_device`] runs the same paths on any candle
//! device, which is how they are tested on machines without a GPU. Note that `QMatMul`'s
//! semantics are candle's: f16 block scales and (on the CPU) activations quantized to 8 bits
//! per block of 32, so it agrees with the reference within those roundings, not bit for bit.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use pare_core_tensor::{Conv2dParams, Error, PreparedOp, ReferenceRuntime, Result, Runtime, Weight};

use crate::GpuError;

/// core-tensor's `Runtime` on a candle device: CUDA with the `cuda` feature, any device for tests.
#[derive(Debug, Clone)]
pub struct CudaRuntime {
    reference: ReferenceRuntime,
    device: Device,
}

impl CudaRuntime {
    /// The runtime on CUDA device `ordinal`: [`GpuError::NotCompiled`] without the `cuda`
    /// feature, [`GpuError::NoDevice`] (with the driver's message) when the device cannot be
    /// opened.
    pub fn new(ordinal: usize) -> std::result::Result<Self, GpuError> {
        #[cfg(feature = "cuda")]
        {
            match Device::new_cuda(ordinal) {
                Ok(d) => Ok(Self::on_device(d)),
                Err(e) => {
                    Err(GpuError::NoDevice { backend: format!("CUDA device {ordinal}"), found: vec![e.to_string()] })
                }
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(GpuError::NotCompiled { feature: "cuda" })
        }
    }

    /// The same runtime on any candle device (the CPU for tests, Metal, CUDA).
    pub fn on_device(device: Device) -> Self {
        Self { reference: ReferenceRuntime::new(device.clone()), device }
    }
}

#[derive(Debug)]
struct QLinear {
    layer: String,
    mm: QMatMul,
    bias: Option<Tensor>,
    k: usize,
}

impl PreparedOp for QLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dims().last() != Some(&self.k) {
            return Err(Error::Shape {
                name: format!("input of `{}`", self.layer),
                expected: vec![self.k],
                found: x.dims().to_vec(),
            });
        }
        let dtype = x.dtype();
        let y = self.mm.forward(&x.to_dtype(DType::F32)?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        Ok(if dtype == DType::F32 { y } else { y.to_dtype(dtype)? })
    }
}

impl Runtime for CudaRuntime {
    fn name(&self) -> &str {
        "cuda"
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn prepare_linear(&self, layer: &str, weight: &Weight, bias: Option<&Tensor>) -> Result<Arc<dyn PreparedOp>> {
        if let Weight::Quantized(q) = weight
            && let Some((ty, blocks)) = q.ggml_blocks()
        {
            let [n, k] = q.shape()[..] else { unreachable!("ggml_type checks the rank") };
            if let Some(b) = bias
                && b.dims() != [n]
            {
                return Err(Error::Shape {
                    name: format!("{layer}.bias"),
                    expected: vec![n],
                    found: b.dims().to_vec(),
                });
            }
            let storage = QStorage::from_data(Cow::Owned(blocks), &self.device, ty)?;
            let mm = QMatMul::from_qtensor(QTensor::new(storage, (n, k))?)?;
            let bias = bias.map(|b| b.to_dtype(DType::F32)?.to_device(&self.device)).transpose()?;
            return Ok(Arc::new(QLinear { layer: layer.to_string(), mm, bias, k }));
        }
        self.reference.prepare_linear(layer, weight, bias.map(|b| b.to_device(&self.device)).transpose()?.as_ref())
    }

    fn prepare_conv2d(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
        params: Conv2dParams,
    ) -> Result<Arc<dyn PreparedOp>> {
        let bias = bias.map(|b| b.to_device(&self.device)).transpose()?;
        self.reference.prepare_conv2d(layer, weight, bias.as_ref(), params)
    }

    fn prepare_embedding(&self, layer: &str, weight: &Weight) -> Result<Arc<dyn PreparedOp>> {
        self.reference.prepare_embedding(layer, weight)
    }
}
