//! pare's 4-bit GEMV alone (1 × 4096 · 4096 × n, symmetric codes, groups of 32 or `G`): weight bytes
//! streamed per second with the weights in L2 (n = 128) and out of cache (n = 4096, four
//! copies used in turn), on `T` threads (2 by default), to read the kernel's decode rate apart
//! from memory bandwidth. `A8=1` gives the layers int8 dynamic per-token activations (the W4A8
//! integer kernel) instead of f32 ones.
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pare_core_tensor::{ActQuant, ActRange, Granularity, Mapping, QuantScheme, QuantizedTensor, Runtime, Weight};
use pare_runtime_cpu::CpuRuntime;

fn main() {
    let threads: usize = std::env::var("T").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    // LEVEL=avx2 (or scalar) forces a lower SIMD level than the CPU's best.
    let rt: Arc<dyn Runtime> = match std::env::var("LEVEL").as_deref() {
        Ok("avx2") => Arc::new(CpuRuntime::with_level(threads, pare_runtime_cpu::SimdLevel::Avx2).unwrap()),
        Ok("scalar") => Arc::new(CpuRuntime::with_level(threads, pare_runtime_cpu::SimdLevel::Scalar).unwrap()),
        _ => Arc::new(CpuRuntime::new(threads).unwrap()),
    };
    let k = 4096;
    let x = Tensor::randn(0f32, 1.0, (1, k), &Device::Cpu).unwrap();
    // G=… sets the group size (32 by default).
    let group: usize = std::env::var("G").ok().and_then(|v| v.parse().ok()).unwrap_or(32);
    let only: Option<usize> = std::env::var("N").ok().and_then(|v| v.parse().ok());
    for (n, copies) in [(128usize, 1usize), (512, 1), (4096, 4), (4096, 10)] {
        if only.is_some_and(|o| o != n) {
            continue;
        }
        let scheme = QuantScheme {
            bits: 4,
            signed: true,
            symmetric: true,
            mapping: Mapping::Linear,
            granularity: Granularity::PerGroup { size: group },
        };
        let ops: Vec<_> = (0..copies)
            .map(|c| {
                let codes: Vec<u8> = (0..n * k).map(|i| ((i * 7 + c) % 16) as u8).collect();
                let q = QuantizedTensor::from_codes(
                    &codes,
                    scheme,
                    vec![0.01; n * k / group],
                    None,
                    None,
                    vec![n, k],
                    DType::F32,
                )
                .unwrap();
                let bytes = q.storage_bytes();
                let w = Weight::Quantized(q);
                let op = if std::env::var("A8").is_ok() {
                    let act = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
                    rt.prepare_linear_quantized_input("fc", &w, None, &act).unwrap()
                } else {
                    rt.prepare_linear("fc", &w, None).unwrap()
                };
                (op, bytes)
            })
            .collect();
        let mut best = f64::MAX;
        for i in 0..if n < 4096 { 20000 } else { 200 } {
            let t = std::time::Instant::now();
            drop(ops[i % copies].0.forward(&x).unwrap());
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("n {n}: {:.3} ms, {:.1} GB/s", best * 1e3, ops[0].1 as f64 / best / 1e9);
        if n == 4096 && copies == 4 && std::env::var("INTERFERE").is_ok() {
            let w = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu).unwrap();
            let wts: Vec<Tensor> =
                (0..2).map(|_| Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap().t().unwrap()).collect();
            let (mut tp, mut tc) = (Vec::new(), Vec::new());
            for r in 0..15 {
                let t = std::time::Instant::now();
                for j in 0..20 {
                    drop(ops[(r * 20 + j) % copies].0.forward(&x).unwrap());
                }
                tp.push(t.elapsed().as_secs_f64() / 20.0);
                let t = std::time::Instant::now();
                for j in 0..20 {
                    drop(x.matmul(&wts[j % 2]).unwrap());
                }
                tc.push(t.elapsed().as_secs_f64() / 20.0);
            }
            tp.sort_by(f64::total_cmp);
            tc.sort_by(f64::total_cmp);
            println!(
                "  blocks of 20 alternating with candle f32 (transposed): pare {:.3} ms, candle {:.3} ms",
                tp[7] * 1e3,
                tc[7] * 1e3
            );
            let mut ts = Vec::new();
            for r in 0..30 {
                let t = std::time::Instant::now();
                for j in 0..20 {
                    drop(ops[(r * 20 + j) % copies].0.forward(&x).unwrap());
                }
                ts.push(t.elapsed().as_secs_f64() / 20.0);
            }
            ts.sort_by(f64::total_cmp);
            println!("  blocks of 20, pare alone: median {:.3} ms", ts[15] * 1e3);
            for after in [1usize, 2, 4, 8] {
                let mut ts = Vec::new();
                for r in 0..15 {
                    for j in 0..20 {
                        drop(x.matmul(&wts[j % 2]).unwrap());
                    }
                    let mut t = std::time::Instant::now();
                    for b in 0..after {
                        t = std::time::Instant::now();
                        for j in 0..20 {
                            drop(ops[(r * 20 + j + b) % copies].0.forward(&x).unwrap());
                        }
                    }
                    ts.push(t.elapsed().as_secs_f64() / 20.0);
                }
                ts.sort_by(f64::total_cmp);
                println!("  block {after} of 20 after 20 candle f32 calls: median {:.3} ms", ts[7] * 1e3);
            }
            for pause in [0u64, 2, 20] {
                let mut ts = Vec::new();
                for i in 0..40 {
                    drop(x.matmul(&w).unwrap());
                    std::thread::sleep(std::time::Duration::from_millis(pause));
                    let t = std::time::Instant::now();
                    for j in 0..5 {
                        drop(ops[(i + j) % copies].0.forward(&x).unwrap());
                    }
                    ts.push(t.elapsed().as_secs_f64() / 5.0);
                }
                ts.sort_by(f64::total_cmp);
                println!("  after candle f32 + {pause} ms pause: median {:.3} ms", ts[ts.len() / 2] * 1e3);
            }
        }
    }
}
