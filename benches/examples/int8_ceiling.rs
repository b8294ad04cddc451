//! How fast can exact int8 products run on an AVX2 core without VNNI? On one thread, data in
//! L1: the f32 FMA loop (the peak), `vpmaddwd` alone, and the W8A8 kernel's 6 × 16 loop (per
//! pair of reduction indices two weight loads widening i8 codes to i16, per row one broadcast
//! of its two i16 codes, two `vpmaddwd` and two `vpaddd`). Each `vpmaddwd` does 16
//! multiply-adds, an f32 FMA 8, so the kernel's ceiling against f32 is 2 × (loop fraction of
//! `vpmaddwd`'s peak) × (`vpmaddwd` rate / FMA rate): the figure printed last. On the Zen 3 of
//! 2026-11-28 the loop ran at 0.57–0.72 of `vpmaddwd`'s rate (which equals the FMA's): 1.2–1.5×
//! the f32 loop's multiply-adds per cycle, every product needing an add beside it. Issue 4's
//! W8A8 goal of 1.8× candle's f32 matmul holds there only as far as candle runs below its own
//! FMA peak. Last, the loop of the kernel for 7-bit weights (4 rows × 16 columns, per quad of
//! indices two weight loads, per row a broadcast of four u8 codes, two `vpmaddubsw`, two
//! `vpmaddwd` by ones, two adds: three instructions per 32 products where the i16 pairs take
//! four), in multiply-adds per ns beside the W8A8 loop's: 76–79 against 51–54 on one Zen 3
//! core (2026-11-28).
//! `cargo run --release -p pare-benches --example int8_ceiling`.

#[cfg(target_arch = "x86_64")]
mod loops {
    use std::arch::x86_64::*;

    /// The W8A8 AVX2 kernel's inner loop: six rows, 16 columns, 64 pairs, `reps` times.
    #[target_feature(enable = "avx2,fma")]
    pub fn w8a8(x: &[i32], w: &[i8], reps: usize) -> i32 {
        assert!(x.len() == 64 * 6 && w.len() == 64 * 32);
        let mut a = [[_mm256_setzero_si256(); 2]; 6];
        for _ in 0..reps {
            for p in 0..64 {
                // SAFETY: p·32 + 32 ≤ w.len() (asserted); each load widens 16 i8 codes.
                let (w0, w1) = unsafe {
                    (
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(w.as_ptr().add(p * 32).cast())),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(w.as_ptr().add(p * 32 + 16).cast())),
                    )
                };
                for (i, ai) in a.iter_mut().enumerate() {
                    let xv = _mm256_set1_epi32(x[p * 6 + i]);
                    ai[0] = _mm256_add_epi32(ai[0], _mm256_madd_epi16(xv, w0));
                    ai[1] = _mm256_add_epi32(ai[1], _mm256_madd_epi16(xv, w1));
                }
            }
        }
        let mut out = [0i32; 8];
        let t = a.iter().fold(_mm256_setzero_si256(), |t, ai| _mm256_add_epi32(t, _mm256_add_epi32(ai[0], ai[1])));
        // SAFETY: out holds 8 lanes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), t) };
        out.iter().sum()
    }

    /// The 7-bit-weight kernel's inner loop: four rows, 16 columns, 64 quads, `reps` times.
    #[target_feature(enable = "avx2,fma")]
    pub fn w7a8(x: &[i32], w: &[i8], reps: usize) -> i32 {
        assert!(x.len() == 64 * 4 && w.len() == 64 * 64);
        let mut a = [[_mm256_setzero_si256(); 2]; 4];
        let ones = _mm256_set1_epi16(1);
        for _ in 0..reps {
            for q in 0..64 {
                // SAFETY: q·64 + 64 ≤ w.len() (asserted).
                let (w0, w1) = unsafe {
                    (
                        _mm256_loadu_si256(w.as_ptr().add(q * 64).cast()),
                        _mm256_loadu_si256(w.as_ptr().add(q * 64 + 32).cast()),
                    )
                };
                for (i, ai) in a.iter_mut().enumerate() {
                    let xv = _mm256_set1_epi32(x[q * 4 + i]);
                    ai[0] = _mm256_add_epi32(ai[0], _mm256_madd_epi16(_mm256_maddubs_epi16(xv, w0), ones));
                    ai[1] = _mm256_add_epi32(ai[1], _mm256_madd_epi16(_mm256_maddubs_epi16(xv, w1), ones));
                }
            }
        }
        let mut out = [0i32; 8];
        let t = a.iter().fold(_mm256_setzero_si256(), |t, ai| _mm256_add_epi32(t, _mm256_add_epi32(ai[0], ai[1])));
        // SAFETY: out holds 8 lanes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), t) };
        out.iter().sum()
    }

    /// Twelve independent `vpmaddwd` chains, `reps` rounds.
    #[target_feature(enable = "avx2,fma")]
    pub fn madd(reps: usize) -> i32 {
        let mut a = [_mm256_set1_epi16(1); 12];
        let v = _mm256_set1_epi16(3);
        for _ in 0..reps {
            for x in a.iter_mut() {
                *x = _mm256_madd_epi16(*x, v);
            }
        }
        let mut out = [0i32; 8];
        let t = a.iter().fold(_mm256_setzero_si256(), |t, x| _mm256_add_epi32(t, *x));
        // SAFETY: out holds 8 lanes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), t) };
        out.iter().sum()
    }
}

#[cfg(target_arch = "x86_64")]
fn main() {
    use std::hint::black_box;
    use std::time::Instant;
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        println!("this probe needs AVX2 and FMA");
        return;
    }
    let probe = pare_runtime_cpu::probe::FmaProbe::new(1);
    let x: Vec<i32> = (0..64 * 6).map(|i| i * 7 - 1000).collect();
    let w: Vec<i8> = (0..64 * 32).map(|i| (i % 255 - 127) as i8).collect();
    let x7: Vec<i32> = (0..64 * 4).map(|i| i * 7919).collect();
    let w7: Vec<i8> = (0..64 * 64).map(|i| (i % 127 - 63) as i8).collect();
    let mut best = (0f64, 0f64);
    for _ in 0..4 {
        // FMAs per second: the probe's GFLOP/s over 2 flops × 8 lanes.
        let fma = probe.sample() / 16.0;
        let t = Instant::now();
        // SAFETY (all three): AVX2 and FMA were detected above.
        black_box(unsafe { loops::madd(black_box(20_000_000)) });
        let madd = 12.0 * 20e6 / t.elapsed().as_secs_f64() * 1e-9;
        let t = Instant::now();
        black_box(unsafe { loops::w8a8(&x, &w, black_box(100_000)) });
        let kernel = 64.0 * 12.0 * 1e5 / t.elapsed().as_secs_f64() * 1e-9;
        let t = Instant::now();
        black_box(unsafe { loops::w7a8(&x7, &w7, black_box(100_000)) });
        let macs7 = 64.0 * 4.0 * 64.0 * 1e5 / t.elapsed().as_secs_f64() * 1e-9;
        println!(
            "per ns: f32 FMA {fma:.2}, vpmaddwd {madd:.2}, W8A8 loop's vpmaddwd {kernel:.2} ({:.2} of vpmaddwd's rate); \
             multiply-adds: W8A8 loop {:.1}, W7A8 loop {macs7:.1}",
            kernel / madd,
            kernel * 16.0
        );
        best = (best.0.max(kernel / madd), best.1.max(madd / fma));
    }
    println!("W8A8 loop against the f32 FMA loop, multiply-adds per cycle: at most {:.2}x", 2.0 * best.0 * best.1);
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("this probe measures x86-64 AVX2 loops");
}
