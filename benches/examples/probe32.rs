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
            let qos: Vec<_> = (0..6).map(|_| rt.prepare_linear("q", &Weight::Quantized(q.clone()), None).unwrap()).collect();
            let qo = &qos[0];
            let x = Tensor::randn(0f32, 1.0, (1, k), &dev).unwrap();
            qo.forward(&x).unwrap();
            let reps = 200;
            let t = Instant::now();
            for i in 0..reps { drop(qos[i % 6].forward(&x).unwrap()); }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            let wf = Tensor::randn(0f32, 1.0, (k, n), &dev).unwrap();
            let mut tot = 0.0;
            for i in 0..50 { drop(x.matmul(&wf).unwrap()); let t = Instant::now(); drop(qos[i % 6].forward(&x).unwrap()); tot += t.elapsed().as_secs_f64(); }
            let mut tot2 = 0.0;
            for i in 0..50 { drop(x.matmul(&wf).unwrap()); std::thread::sleep(std::time::Duration::from_millis(3)); let t = Instant::now(); drop(qos[i % 6].forward(&x).unwrap()); tot2 += t.elapsed().as_secs_f64(); }
            println!("  after candle: {:.3} ms; after candle + 3 ms sleep: {:.3} ms", tot / 50.0 * 1e3, tot2 / 50.0 * 1e3);
            println!("threads {threads} n {n} k {k}: {:.3} ms, {:.1} GB/s, {:.2} Gweights/s", s * 1e3, bytes as f64 / s / 1e9, (n * k) as f64 / s / 1e9);
        }
    }
}
