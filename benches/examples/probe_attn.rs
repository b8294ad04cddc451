//! temp
use pare_runtime_cpu::SimdLevel;
use pare_runtime_cpu::sparse::SparseRows;
fn main() {
    let (m, k, n) = (4096, 384, 1536);
    let w: Vec<f32> = (0..n * k).map(|i| if (i * 7919) % 10 == 0 { 0.5 } else { 0.0 }).collect();
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32).collect();
    let sp = SparseRows::from_dense(&w, n, k);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let mut y = vec![0f32; m * n];
    for _ in 0..5 {
        sp.run(SimdLevel::Avx2, &pool, &x, None, &mut y);
    }
}
