//! pare's f32 GEMM at MiniLM's shapes (M = 4096), one and two threads: GFLOP/s as the median
//! of `REPS` calls per shape (for A/B runs of builds that differ in a blocking constant).
use std::time::Instant;

fn main() {
    let reps: usize = std::env::var("REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(9);
    let level = pare_runtime_cpu::SimdLevel::detect();
    let mut out = Vec::new();
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
        for (m, k, n) in [(4096usize, 384usize, 384usize), (4096, 384, 1536), (4096, 1536, 384)] {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 97) as f32 * 1e-2).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i % 89) as f32 * 1e-3).collect();
            let packed = pare_runtime_cpu::gemm::PackedF32::pack(&w, n, k);
            let mut y = vec![0f32; m * n];
            let mut ts: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    pare_runtime_cpu::gemm::gemm(level, &pool, &x, m, &packed, None, &mut y);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            ts.sort_by(f64::total_cmp);
            out.push(format!("{:.1}", (2 * m * k * n) as f64 / ts[reps / 2] * 1e-9));
        }
    }
    println!("{}", out.join(" "));
}
