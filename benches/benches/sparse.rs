//! Sparse linear kernels (pare-runtime-cpu, 2 threads) against pare's own dense f32 GEMM on the
//! same shape, in the same run (issue 4, goal 4): 2:4 semi-structured (goal ≥ 1.5×) and CSR at
//! 90% sparsity (goal ≥ 4×), at MiniLM's FFN shape with `PARE_BENCH_M` tokens (4096 by
//! default), then a density sweep that locates the crossover where the dense kernel wins
//! (`SPARSE_MAX_DENSITY` in runtime-cpu is set from it).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use pare_benches::{Comparison, median_pair, quick};
use pare_core_tensor::{Runtime, SparseTensor, Weight};
use pare_runtime_cpu::gemm::{PackedF32, gemm};
use pare_runtime_cpu::sparse::SparseRows;
use pare_runtime_cpu::{CpuRuntime, SimdLevel};

/// Pseudo-random `[n, k]` values, `keep` of them nonzero; with `nm`, exactly 2 of every 4
/// (at pseudo-random positions).
fn weights(n: usize, k: usize, keep: f64, nm: bool) -> Vec<f32> {
    (0..n * k)
        .map(|i| {
            let h = (i as u64).wrapping_mul(0x9E3779B97F4A7C15) >> 11;
            let v = ((h % 2001) as f32 - 1000.0) * 1e-4;
            let kept = if nm {
                // One of the six 2-of-4 patterns per group, as a magnitude prune leaves them.
                const PAIRS: [[usize; 2]; 6] = [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]];
                let g = ((i / 4) as u64).wrapping_mul(0xD1B54A32D192ED03) >> 40;
                PAIRS[(g % 6) as usize].contains(&(i % 4))
            } else {
                ((h >> 20) % 1000) as f64 / 1000.0 < keep
            };
            if kept && v != 0.0 {
                v
            } else if kept {
                1e-4
            } else {
                0.0
            }
        })
        .collect()
}

fn main() {
    let quick = quick();
    let m: usize = std::env::var("PARE_BENCH_M").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    let dev = Device::Cpu;
    let threads = 2;
    let rt: Arc<dyn Runtime> = Arc::new(CpuRuntime::new(threads).expect("runtime"));
    let reps = if quick { 3 } else { 7 };
    let (k, n) = (384usize, 1536usize);
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
    let dense_w = Tensor::from_vec(weights(n, k, 1.0, false), (n, k), &dev).unwrap();
    let dense = rt.prepare_linear("fc", &Weight::Dense(dense_w), None).unwrap();
    let shape = format!("{m}x{k}x{n}");
    for (name, values, goal) in
        [("2:4 sparse gemm", weights(n, k, 0.5, true), 1.5), ("csr 90% sparse gemm", weights(n, k, 0.1, false), 4.0)]
    {
        let t = Tensor::from_vec(values, (n, k), &dev).unwrap();
        let w = if name.starts_with("2:4") {
            SparseTensor::nm_from_dense(&t, 2, 4, "fc").unwrap()
        } else {
            SparseTensor::csr_from_dense(&t, "fc").unwrap()
        };
        let op = rt.prepare_linear("fc", &Weight::Sparse(w), None).unwrap();
        let (t_sparse, t_dense) =
            median_pair(reps, || drop(op.forward(&x).unwrap()), || drop(dense.forward(&x).unwrap()));
        Comparison {
            name,
            shape: shape.clone(),
            pare: t_sparse * 1e3,
            peer: "pare dense f32 gemm",
            peer_value: t_dense * 1e3,
            unit: "ms",
            higher_is_better: false,
            goal,
        }
        .report();
    }
    // The crossover: the sparse kernel forced at each density against the dense GEMM.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let level = SimdLevel::detect();
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut y = vec![0f32; m * n];
    let densities: &[f64] = if quick { &[0.3, 0.5, 0.7] } else { &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8] };
    for &d in densities {
        let w = weights(n, k, d, false);
        let (sp, de) = (SparseRows::from_dense(&w, n, k), PackedF32::pack(&w, n, k));
        let mut y2 = vec![0f32; m * n];
        let (ts, td) = median_pair(
            reps,
            || sp.run(level, &pool, &xv, None, &mut y),
            || gemm(level, &pool, &xv, m, &de, None, &mut y2),
        );
        println!(
            "NOTE sparse crossover {shape} density {:.2}: sparse {:.2} ms, dense {:.2} ms, sparse/dense speed {:.2}x",
            sp.density(),
            ts * 1e3,
            td * 1e3,
            td / ts
        );
    }
}
