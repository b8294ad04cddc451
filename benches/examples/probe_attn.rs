//! temp
use candle_core::{Device, Tensor};
use pare_core_tensor::Runtime;
use pare_runtime_cpu::CpuRuntime;
fn main() {
    let dev = Device::Cpu;
    let rt = CpuRuntime::new(1).unwrap();
    let x = Tensor::randn(0f32, 1.0, (32, 128, 384), &dev).unwrap();
    let mask = Tensor::zeros((32, 128), candle_core::DType::F32, &dev).unwrap();
    for _ in 0..20 { drop(rt.attention(&x, &x, &x, 12, Some(&mask), 0.17).unwrap()); }
}
