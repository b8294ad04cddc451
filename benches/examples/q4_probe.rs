//! pare's 4-bit weight-only linear alone at M = 32 (or `M`) on MiniLM's FFN shapes (symmetric
//! codes, groups of 32) against pare's f32 GEMM on the same values and candle's f32 matmul,
//! best of many runs, on `T` threads (2 by default): for `perf record`.
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use pare_core_tensor::{Granularity, Mapping, QuantScheme, QuantizedTensor, Runtime, Weight};
use pare_runtime_cpu::CpuRuntime;

fn main() {
    let threads: usize = std::env::var("T").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let m: usize = std::env::var("M").ok().and_then(|v| v.parse().ok()).unwrap_or(32);
    let rt: Arc<dyn Runtime> = Arc::new(CpuRuntime::new(threads).unwrap());
    for (k, n) in [(384usize, 1536usize), (1536, 384)] {
        let scheme = QuantScheme {
            bits: 4,
            signed: true,
            symmetric: true,
            mapping: Mapping::Linear,
            granularity: Granularity::PerGroup { size: 32 },
        };
        let codes: Vec<u8> = (0..n * k).map(|i| (i * 7 % 16) as u8).collect();
        let q = QuantizedTensor::from_codes(&codes, scheme, vec![0.01; n * k / 32], None, None, vec![n, k], DType::F32)
            .unwrap();
        let dense = rt.prepare_linear("fc", &Weight::Dense(q.dequantize(&Device::Cpu).unwrap()), None).unwrap();
        let op = rt.prepare_linear("fc", &Weight::Quantized(q), None).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu).unwrap();
        let (mut best, mut best_c, mut best_d) = (f64::MAX, f64::MAX, f64::MAX);
        let reps = if m > 256 { 15 } else { 300 };
        for _ in 0..reps {
            let t = std::time::Instant::now();
            drop(op.forward(&x).unwrap());
            best = best.min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            drop(dense.forward(&x).unwrap());
            best_d = best_d.min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            drop(x.matmul(&w).unwrap());
            best_c = best_c.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{m}x{k}x{n}: pare q4 {:.3} ms ({:.1} GMAC/s), pare f32 {:.3} ms, candle f32 {:.3} ms",
            best * 1e3,
            (m * k * n) as f64 / best / 1e9,
            best_d * 1e3,
            best_c * 1e3
        );
        if m > 256 {
            continue; // the medians below take minutes at this size
        }
        let mut alone: Vec<f64> = (0..100)
            .map(|_| {
                let t = std::time::Instant::now();
                for _ in 0..10 {
                    drop(op.forward(&x).unwrap());
                }
                t.elapsed().as_secs_f64() / 10.0
            })
            .collect();
        alone.sort_by(f64::total_cmp);
        let q40 = candle_core::quantized::QMatMul::from_qtensor(
            candle_core::quantized::QTensor::quantize(
                &w.t().unwrap().contiguous().unwrap(),
                candle_core::quantized::GgmlDType::Q4_0,
            )
            .unwrap(),
        )
        .unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            let t = std::time::Instant::now();
            for _ in 0..10 {
                drop(op.forward(&x).unwrap());
            }
            a.push(t.elapsed().as_secs_f64() / 10.0);
            let t = std::time::Instant::now();
            for _ in 0..10 {
                drop(q40.forward(&x).unwrap());
            }
            b.push(t.elapsed().as_secs_f64() / 10.0);
        }
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        println!(
            "  median of blocks of 10 alone {:.3} ms; alternating with Q4_0: pare {:.3} ms, Q4_0 {:.3} ms",
            alone[50] * 1e3,
            a[7] * 1e3,
            b[7] * 1e3
        );
    }
}
