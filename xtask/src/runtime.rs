//! `--runtime` and `--threads`: which `Runtime` a command runs its models on.

use std::sync::Arc;

use anyhow::bail;
use candle_core::Device;
use pare_core_tensor::{ReferenceRuntime, Runtime};
use pare_runtime_cpu::CpuRuntime;

/// Runtime options shared by the commands that run models.
#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeOpts {
    /// Where models run: `cpu` (pare's SIMD kernels) or `reference` (dequantize + candle, the
    /// semantics every runtime is tested against).
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
            "wgpu" | "cuda" => bail!(
                "--runtime {}: pare is not compiled with the `{}` feature (GPU runtimes are issue 9)",
                self.runtime,
                self.runtime
            ),
            other => bail!("--runtime: expected cpu or reference, found `{other}`"),
        }
    }
}
