//! `--runtime` and `--threads`: which `Runtime` a command runs its models on.

use std::sync::Arc;

use anyhow::bail;
use candle_core::Device;
use pare_core_tensor::{ReferenceRuntime, Runtime};
use pare_runtime_cpu::CpuRuntime;
use pare_runtime_gpu::{CudaRuntime, WgpuRuntime};

/// Runtime options shared by the commands that run models.
#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeOpts {
    /// Where models run: `cpu` (pare's SIMD kernels), `wgpu` (Vulkan/Metal/DX12 compute; build
    /// with `cargo xtask-wgpu`), `cuda` (candle's CUDA device; build with `--features cuda`) or
    /// `reference` (dequantize + candle, the semantics every runtime is tested against).
    #[arg(long, default_value = "cpu")]
    pub runtime: String,
    /// Worker threads for `--runtime cpu` (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl RuntimeOpts {
    /// The runtime these options name, checked before any long work.
    pub fn build(&self) -> anyhow::Result<Arc<dyn Runtime>> {
        match self.runtime.as_str() {
            "cpu" => {
                let threads =
                    self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
                Ok(Arc::new(CpuRuntime::new(threads)?))
            }
            "reference" => {
                if self.threads.is_some() {
                    bail!("--threads applies to --runtime cpu; the reference runtime uses candle's own threads");
                }
                Ok(ReferenceRuntime::shared(Device::Cpu))
            }
            "wgpu" | "cuda" if self.threads.is_some() => {
                bail!("--threads applies to --runtime cpu, not to the {} runtime", self.runtime)
            }
            "wgpu" => {
                // The runtime logs its adapter, and warns when it is a software rasteriser.
                Ok(Arc::new(WgpuRuntime::new().map_err(|e| anyhow::anyhow!("--runtime wgpu: {e}"))?))
            }
            "cuda" => Ok(Arc::new(CudaRuntime::new(0).map_err(|e| anyhow::anyhow!("--runtime cuda: {e}"))?)),
            other => bail!("--runtime: expected cpu, wgpu, cuda or reference, found `{other}`"),
        }
    }
}
