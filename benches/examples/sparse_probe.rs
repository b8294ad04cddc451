//! pare's sparse kernel alone on one thread: nanoseconds per (nonzero × 32-row tile) at
//! MiniLM's K = 384 for several output counts and densities, to read the kernel's per-nonzero
//! cost apart from the weight stream (`perf record` it too; `N=1536 KEEP=0.1` runs one case).
use pare_runtime_cpu::SimdLevel;
use pare_runtime_cpu::sparse::SparseRows;

fn main() {
    pare_runtime_cpu::retain_freed_memory();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let (m, k) = (4096usize, 384usize);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
    let only = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<f64>().ok());
    for n in [64usize, 1536] {
        if only("N").is_some_and(|v| v as usize != n) {
            continue;
        }
        for keep in [0.1, 0.5] {
            if only("KEEP").is_some_and(|v| v != keep) {
                continue;
            }
            let w: Vec<f32> = (0..n * k)
                .map(|i| {
                    let h = (i as u64).wrapping_mul(0x9E3779B97F4A7C15) >> 11;
                    if ((h >> 20) % 1000) as f64 / 1000.0 < keep { 0.01 + (h % 100) as f32 * 1e-3 } else { 0.0 }
                })
                .collect();
            let sp = SparseRows::from_dense(&w, n, k);
            let mut y = vec![0f32; m * n];
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                sp.run(SimdLevel::detect(), &pool, &x, None, &mut y);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let steps = (m / 32) as f64 * (sp.density() * (n * k) as f64);
            println!(
                "n {n} density {:.2}: {:.2} ms, {:.3} ns per nonzero-tile",
                sp.density(),
                best * 1e3,
                best / steps * 1e9
            );
        }
    }
}
