//! pare-runtime-gpu: core-tensor's `Runtime` on GPUs.
//!
//! - [`WgpuRuntime`] (feature `wgpu`): WGSL compute shaders on Vulkan, Metal or DX12 — the GPUs
//!   of phones and edge boxes as much as servers. Dense f32/f16/bf16 weights, 1–8-bit
//!   linear and codebook (NF4) codes at any granularity, and CSR/N:M/block sparse weights are
//!   uploaded once in their stored format and decoded inside the shaders; linear, convolution,
//!   embedding, activations, residual + layer norm and attention all run on the adapter. CI runs
//!   it on Mesa's lavapipe, a software Vulkan driver: its figures are a CPU rasteriser's.
//! - [`CudaRuntime`] (feature `cuda`): candle's CUDA device, with candle's quantized matmul for
//!   the formats GGML's Q8_0/Q4_0 blocks hold and dequantize-then-matmul for the rest.
//!
//! Neither feature is on by default. Without one, its constructor returns
//! [`GpuError::NotCompiled`]; with it but no usable device, [`GpuError::NoDevice`] listing what
//! was found. Inside `Runtime` calls, GPU failures arrive as `pare_core_tensor::Error::Runtime`
//! carrying a [`GpuError`] ([`gpu_error`] gets it back).
//!
//! Weights never move after `prepare`. The wgpu runtime is *resident*: models hand it their
//! whole forward as a core-tensor `Graph` (MiniLM's embeddings to its last layer norm, the
//! digits MLP and CNN), which it runs in one command buffer — inputs uploaded once, every activation
//! left on the adapter for the next kernel, outputs read back once — with the same kernels,
//! and so the same values, as op by op. Graphs with a step it cannot keep resident (an op
//! another runtime prepared, such as the fake-quantizing wrapper of W8A8 layers) and direct op calls cross as candle CPU
//! tensors, one upload and one read-back per op.
//!
//! ```
//! use pare_runtime_gpu::{CudaRuntime, GpuError};
//! # #[cfg(not(feature = "cuda"))]
//! assert!(matches!(CudaRuntime::new(0), Err(GpuError::NotCompiled { feature: "cuda" })));
//! ```

pub mod cuda;
mod error;
#[cfg(feature = "wgpu")]
mod wgpu;

pub use cuda::CudaRuntime;
pub use error::{GpuError, gpu_error};
#[cfg(not(feature = "wgpu"))]
pub use stub::{WgpuOptions, WgpuRuntime};
#[cfg(feature = "wgpu")]
pub use wgpu::{WgpuOptions, WgpuRuntime};

#[cfg(not(feature = "wgpu"))]
mod stub {
    //! Without the `wgpu` feature: the same names, whose constructors say so.

    use crate::GpuError;

    /// How [`WgpuRuntime::with_options`] picks an adapter (unused without the feature).
    #[derive(Debug, Clone, Default)]
    pub struct WgpuOptions {
        /// The adapter's name must contain this (case-insensitive).
        pub adapter: Option<String>,
        /// Run sparse embedding tables as dense ones.
        pub sparse_as_dense: bool,
        /// Caps the largest buffer below the adapter's own limit.
        pub max_buffer_bytes: Option<u64>,
    }

    /// The wgpu runtime; without the `wgpu` feature it cannot be built.
    #[derive(Debug, Clone)]
    pub struct WgpuRuntime {
        never: std::convert::Infallible,
    }

    impl WgpuRuntime {
        /// Always [`GpuError::NotCompiled`] without the `wgpu` feature.
        pub fn new() -> Result<Self, GpuError> {
            Self::with_options(WgpuOptions::default())
        }

        /// Always [`GpuError::NotCompiled`] without the `wgpu` feature.
        pub fn with_options(_options: WgpuOptions) -> Result<Self, GpuError> {
            Err(GpuError::NotCompiled { feature: "wgpu" })
        }

        /// The adapter's description (unreachable: no value of this type exists).
        pub fn adapter(&self) -> &str {
            match self.never {}
        }

        /// Whether the adapter is a software rasteriser (unreachable).
        pub fn is_software(&self) -> bool {
            match self.never {}
        }
    }

    impl pare_core_tensor::Runtime for WgpuRuntime {
        fn name(&self) -> &str {
            match self.never {}
        }
        fn device(&self) -> &candle_core::Device {
            match self.never {}
        }
        fn prepare_linear(
            &self,
            _: &str,
            _: &pare_core_tensor::Weight,
            _: Option<&candle_core::Tensor>,
        ) -> pare_core_tensor::Result<std::sync::Arc<dyn pare_core_tensor::PreparedOp>> {
            match self.never {}
        }
        fn prepare_conv2d(
            &self,
            _: &str,
            _: &pare_core_tensor::Weight,
            _: Option<&candle_core::Tensor>,
            _: pare_core_tensor::Conv2dParams,
        ) -> pare_core_tensor::Result<std::sync::Arc<dyn pare_core_tensor::PreparedOp>> {
            match self.never {}
        }
        fn prepare_embedding(
            &self,
            _: &str,
            _: &pare_core_tensor::Weight,
        ) -> pare_core_tensor::Result<std::sync::Arc<dyn pare_core_tensor::PreparedOp>> {
            match self.never {}
        }
    }
}

#[cfg(test)]
mod tests;
