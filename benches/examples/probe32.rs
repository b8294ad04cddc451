//! temp
use candle_core::{DType, Device, Tensor};
use pare_core_tensor::{Granularity, Mapping, QuantScheme, QuantizedTensor, Runtime, Weight};
use pare_runtime_cpu::CpuRuntime;
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    for threads in [1, 2] {
        let rt = CpuRuntime::new(threads).unwrap();
        for (n, k) in [(512usize, 4096usize), (4096, 4096)] {
            let scheme = QuantScheme { bits: 4, signed: true, symmetric: true, mapping: Mapping::Linear, granularity: Granularity::PerGroup { size: 32 } };
            let q = QuantizedTensor::from_codes(&vec![3u8; n * k], scheme, vec![0.1; n * k / 32], None, None, vec![n, k], DType::F32).unwrap();
            let bytes = q.storage_bytes();
            let qo = rt.prepare_linear("q", &Weight::Quantized(q), None).unwrap();
            let x = Tensor::randn(0f32, 1.0, (1, k), &dev).unwrap();
            qo.forward(&x).unwrap();
            let reps = 200;
            let t = Instant::now();
            for _ in 0..reps { drop(qo.forward(&x).unwrap()); }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!("threads {threads} n {n} k {k}: {:.3} ms, {:.1} GB/s, {:.2} Gweights/s", s * 1e3, bytes as f64 / s / 1e9, (n * k) as f64 / s / 1e9);
        }
    }
}
