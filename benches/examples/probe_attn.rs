//! temp
use pare_runtime_cpu::w8a8::{Panel, gemm};
use pare_runtime_cpu::SimdLevel;
use std::time::Instant;
fn main() {
    let (m, k, n) = (128, 384, 384);
    let w: Vec<i8> = (0..n * k).map(|i| ((i * 37) % 255) as i8).collect();
    let x: Vec<i8> = (0..m * k).map(|i| ((i * 13) % 250) as i8).collect();
    let p = Panel::pack(&w, n, k);
    let mut acc = vec![0i32; m * n];
    let reps = 200;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps { gemm(SimdLevel::Avx2, &x, m, k, &w, &p, &mut acc); }
        let s = t.elapsed().as_secs_f64();
        println!("w8a8 gemm: {:.1} GMAC/s (1 thread)", (reps * m * n * k) as f64 / s / 1e9);
    }
}
