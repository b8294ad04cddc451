//! Machine probes that benchmarks quote their goals against, measured in the same run: the f32
//! FMA peak (independent fused multiply-adds on registers) and the memory bandwidth a read-heavy
//! kernel can reach (a STREAM-style triad over arrays far larger than the last-level cache).

use std::time::Instant;

use rayon::prelude::*;

use crate::simd::SimdLevel;

/// The f32 FMA peak of a number of threads issuing independent FMAs (2 FLOPs each; the scalar
/// figure on CPUs without AVX2). Each [`FmaProbe::sample`] takes about 30 ms, so benchmarks can
/// interleave samples with the kernel they compare, and load from other processes falls on both.
#[derive(Debug)]
pub struct FmaProbe {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl FmaProbe {
    /// A probe on `threads` threads (at least 1).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        Self { pool: rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool"), threads }
    }

    /// One measurement, in GFLOP/s.
    pub fn sample(&self) -> f64 {
        let iters = 1_500_000_000u64;
        let start = Instant::now();
        let flops: u64 = self.pool.install(|| (0..self.threads).into_par_iter().map(|_| fma_loop(iters)).sum());
        flops as f64 / start.elapsed().as_secs_f64() / 1e9
    }
}

/// The best of a few [`FmaProbe`] samples on `threads` threads, in GFLOP/s.
pub fn fma_peak_gflops(threads: usize) -> f64 {
    let probe = FmaProbe::new(threads);
    (0..4).map(|_| probe.sample()).fold(0.0, f64::max)
}

fn fma_loop(iters: u64) -> u64 {
    match SimdLevel::detect() {
        #[cfg(target_arch = "x86_64")]
        l if l.avx2() => {
            // SAFETY: AVX2 and FMA were detected.
            unsafe { avx2::fma_loop(iters) }
        }
        _ => {
            let mut a = [1.0f32; 8];
            for _ in 0..iters / 8 {
                for v in &mut a {
                    *v = v.mul_add(0.999_999, 1e-7);
                }
            }
            std::hint::black_box(a);
            iters / 8 * 8 * 2
        }
    }
}

/// Memory bandwidth in GB/s of `threads` threads running `a[i] = b[i] + s·c[i]` over three
/// arrays of `mib` MiB each (counting 3 streams: two reads and one write), best of three.
pub fn triad_gbs(threads: usize, mib: usize) -> f64 {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build().expect("thread pool");
    let n = mib * (1 << 20) / 4;
    let (b, c) = (vec![1.0f32; n], vec![2.0f32; n]);
    let mut a = vec![0.0f32; n];
    let chunk = n.div_ceil(threads.max(1) * 8);
    let mut best = 0.0f64;
    for _ in 0..4 {
        let start = Instant::now();
        pool.install(|| {
            a.par_chunks_mut(chunk).zip(b.par_chunks(chunk)).zip(c.par_chunks(chunk)).for_each(|((a, b), c)| {
                for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                    *a = b + 0.5 * c;
                }
            })
        });
        best = best.max((3 * n * 4) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    std::hint::black_box(&a);
    best
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Twelve independent FMA chains (enough to cover latency × throughput on current cores).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_loop(iters: u64) -> u64 {
        let (m, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut a = [_mm256_set1_ps(1.0); 12];
        let rounds = iters / 96;
        for _ in 0..rounds {
            for v in &mut a {
                *v = _mm256_fmadd_ps(*v, m, c);
            }
        }
        std::hint::black_box(a);
        rounds * 96 * 2
    }
}
