//! pare's fused attention alone at MiniLM's shape (batch 32 × 128 tokens, 12 heads of 32), best
//! of 15 runs, in GFLOP/s of its two products (QKᵀ and PV), at every SIMD level this CPU has:
//! to read the kernel's rate against the FMA peak, in f32 and with bf16 products (`vdpbf16ps`
//! with AVX-512 BF16; the f32 kernels on rounded operands at AVX2). `T=1` for one thread.
use pare_core_tensor::AttentionPrecision;
use pare_runtime_cpu::SimdLevel;
use pare_runtime_cpu::nonlinear::{AttnShape, attention};

fn main() {
    let threads: usize = std::env::var("T").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let s = AttnShape { batch: 32, seq: 128, heads: 12, head_dim: 32 };
    let len = s.batch * s.seq * s.heads * s.head_dim;
    let x: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
    let mask = vec![0f32; s.batch * s.seq];
    let mut out = vec![std::mem::MaybeUninit::new(0f32); len];
    let flops = 2.0 * 2.0 * (s.batch * s.heads * s.seq * s.seq * s.head_dim) as f64;
    for level in SimdLevel::available().into_iter().skip(1) {
        for precision in [AttentionPrecision::F32, AttentionPrecision::Bf16] {
            let mut best = f64::MAX;
            for _ in 0..15 {
                let t = std::time::Instant::now();
                attention(level, &pool, &x, &x, &x, Some(&mask), 0.17, s, precision, &mut out);
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{level:?}, {} products, {threads} thread(s): {:.2} ms, {:.1} GFLOP/s",
                precision.name(),
                best * 1e3,
                flops / best / 1e9
            );
        }
    }
}
