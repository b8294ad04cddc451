//! pare's W8A8 linear alone at MiniLM's shapes (M = 4096), best of 15 runs, in GMAC/s: for
//! `perf record` and for reading the kernel's rate against the `vpmaddwd` loop ceiling, at
//! every SIMD level this CPU has (so AVX2 and VNNI compare in one run). `T=1` for one thread.
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pare_core_tensor::{ActQuant, ActRange, Granularity, Mapping, QuantScheme, QuantizedTensor, Runtime, Weight};
use pare_runtime_cpu::{CpuRuntime, SimdLevel};

fn main() {
    let m = 4096;
    let threads: usize = std::env::var("T").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    for level in SimdLevel::available().into_iter().skip(1) {
        println!("{level:?}, {threads} thread(s)");
        let rt: Arc<dyn Runtime> = Arc::new(CpuRuntime::with_level(threads, level).unwrap());
        run(&rt, m);
    }
}

fn run(rt: &Arc<dyn Runtime>, m: usize) {
    let act = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    // (384, 1152): the query, key and value projections as one weight.
    for (k, n) in [(384usize, 384usize), (384, 1152), (384, 1536), (1536, 384)] {
        let scheme = QuantScheme {
            bits: 8,
            signed: true,
            symmetric: true,
            mapping: Mapping::Linear,
            granularity: Granularity::PerChannel { axis: 0 },
        };
        let codes: Vec<u8> = (0..n * k).map(|i| (i as u64).wrapping_mul(2654435761) as u8).collect();
        let q = QuantizedTensor::from_codes(&codes, scheme, vec![0.01; n], None, None, vec![n, k], DType::F32).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let op = rt.prepare_linear_quantized_input("fc", &Weight::Quantized(q), None, &act).unwrap();
        let mut best = f64::MAX;
        for _ in 0..15 {
            let t = std::time::Instant::now();
            drop(op.forward(&x).unwrap());
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{m}x{k}x{n}: {:.2} ms, {:.1} GMAC/s", best * 1e3, (m * k * n) as f64 / best / 1e9);
    }
}
