//! The non-linear work of a transformer, fused and threaded: multi-head attention (scores,
//! masked softmax and the weighted sum of values in one pass per head, straight from the
//! `[batch, seq, hidden]` projections, no transposed copies), GELU (exact, through an erf with
//! 1.5e-7 absolute error, and its tanh form), ReLU/SiLU, and layer normalisation fused with the
//! residual addition.
//!
//! Each has a scalar twin; rows and heads are split across the pool, each computed whole by one
//! task, so the bits do not depend on the thread count.

use pare_core_tensor::AttentionPrecision;
use rayon::prelude::*;

use crate::simd::SimdLevel;

/// Element-wise activations with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// max(0, x).
    Relu,
    /// x·Φ(x), Φ through erf.
    Gelu,
    /// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
    GeluTanh,
    /// x·sigmoid(x).
    Silu,
}

impl Act {
    /// The kernel for a layer activation, `None` for those without one here (they run on the
    /// reference).
    pub fn of(act: pare_core_tensor::Activation) -> Option<Self> {
        use pare_core_tensor::Activation as A;
        match act {
            A::Relu => Some(Act::Relu),
            A::Gelu => Some(Act::Gelu),
            A::GeluTanh => Some(Act::GeluTanh),
            A::Silu => Some(Act::Silu),
            _ => None,
        }
    }
}

/// `y = act(y)` in place on one task's slice, on the calling thread: per element the same bits
/// as [`activation`] gives, wherever the slice starts and ends (a partial vector is padded
/// and computed whole, as at the end of a buffer), so a kernel can apply it to each tile it
/// writes while the tile is in cache.
pub fn activation_in_place(level: SimdLevel, act: Act, y: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        l if l.avx512() => {
            // SAFETY: AVX-512 F (with AVX2 and FMA) was detected just above.
            unsafe { avx512::activation_in_place(act, y) }
        }
        #[cfg(target_arch = "x86_64")]
        l if l.avx2() => {
            // SAFETY: AVX2 and FMA were detected just above.
            unsafe { avx2::activation_in_place(act, y) }
        }
        _ => y.iter_mut().for_each(|v| *v = scalar_act(act, *v)),
    }
}

/// `y = act(x)` element-wise, in chunks across `pool`.
pub fn activation(level: SimdLevel, pool: &rayon::ThreadPool, act: Act, x: &[f32], y: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    assert!(x.len() == y.len());
    pool.install(|| {
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| match level {
            #[cfg(target_arch = "x86_64")]
            l if l.avx512() => {
                // SAFETY: AVX-512 F (with AVX2 and FMA) was detected just above; equal lengths.
                unsafe { avx512::activation(act, x, y) }
            }
            #[cfg(target_arch = "x86_64")]
            l if l.avx2() => {
                // SAFETY: AVX2 and FMA were detected just above; x and y have equal lengths.
                unsafe { avx2::activation(act, x, y) }
            }
            _ => y.iter_mut().zip(x).for_each(|(y, &v)| *y = scalar_act(act, v)),
        })
    });
}

/// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7).
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6) * t;
    let y = 1.0 - poly * (-a * a).exp();
    y.copysign(x)
}

fn scalar_act(act: Act, v: f32) -> f32 {
    match act {
        Act::Relu => v.max(0.0),
        Act::Gelu => 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2)),
        Act::GeluTanh => {
            let u = 0.797_884_6 * (v + 0.044_715 * v * v * v);
            0.5 * v * (1.0 + u.tanh())
        }
        Act::Silu => v / (1.0 + (-v).exp()),
    }
}

/// Layer normalisation of each `dim`-long row of `x` (plus the same row of `residual`) into
/// `y`: `(s − mean)/sqrt(var + eps)·γ + β`, statistics in f32 as the reference computes them.
/// Each task writes its rows of `x` (plus the residual) into `y` itself, in one pass on the pool; `y` may
/// be uninitialised (every value is written: no serial zeroing pass before the kernel).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm(
    level: SimdLevel,
    pool: &rayon::ThreadPool,
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [std::mem::MaybeUninit<f32>],
) {
    assert!(x.len() == y.len() && residual.is_none_or(|r| r.len() == x.len()));
    let dim = gamma.len().max(1);
    let rows_per = (16384 / dim).max(1);
    pool.install(|| {
        y.par_chunks_mut(rows_per * dim).enumerate().for_each(|(c, chunk)| {
            for (r, row) in chunk.chunks_mut(dim).enumerate() {
                let at = (c * rows_per + r) * dim;
                let src = &x[at..at + row.len()];
                // The row's sum with the residual is written in the same pass that reads it
                // (a copy and then an add read and wrote the row twice).
                match residual {
                    Some(res) => {
                        for ((v, &a), &b) in row.iter_mut().zip(src).zip(&res[at..at + src.len()]) {
                            v.write(a + b);
                        }
                    }
                    None => {
                        for (v, &a) in row.iter_mut().zip(src) {
                            v.write(a);
                        }
                    }
                }
                // SAFETY: every value of `row` was written just above.
                let row = unsafe { std::slice::from_raw_parts_mut(row.as_mut_ptr().cast::<f32>(), row.len()) };
                let n = dim as f32;
                let mean = sum(level, row) / n;
                row.iter_mut().for_each(|v| *v -= mean);
                let var = sum_sq(level, row) / n;
                let inv = 1.0 / (var + eps).sqrt();
                for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
                    *v = *v * inv * g + b;
                }
            }
        })
    });
}

fn sum(level: SimdLevel, x: &[f32]) -> f32 {
    match level {
        #[cfg(target_arch = "x86_64")]
        l if l.avx2() => {
            // SAFETY: AVX2 was detected just above.
            unsafe { avx2::sum(x, false) }
        }
        _ => x.iter().sum(),
    }
}

fn sum_sq(level: SimdLevel, x: &[f32]) -> f32 {
    match level {
        #[cfg(target_arch = "x86_64")]
        l if l.avx2() => {
            // SAFETY: AVX2 was detected just above.
            unsafe { avx2::sum(x, true) }
        }
        _ => x.iter().map(|v| v * v).sum(),
    }
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Batch size.
    pub batch: usize,
    /// Sequence length (queries and keys).
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

/// Multi-head attention on `[batch, seq, heads·head_dim]` projections into `out` (same
/// layout, which may be uninitialised: the tasks write every value), with an optional
/// additive key mask `[batch, seq]`; one task per (batch, head).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    level: SimdLevel,
    pool: &rayon::ThreadPool,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    scale: f32,
    s: AttnShape,
    precision: AttentionPrecision,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let (t, d, hidden) = (s.seq, s.head_dim, s.heads * s.head_dim);
    assert!(q.len() == s.batch * t * hidden && k.len() == q.len() && v.len() == q.len() && out.len() == q.len());
    let dst = crate::gemm::OutPtr(out.as_mut_ptr().cast::<f32>());
    pool.install(|| {
        (0..s.batch * s.heads).into_par_iter().for_each_init(HeadScratch::default, |scratch, bh| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let base = b * t * hidden + h * d;
            let m = mask.map(|m| &m[b * t..(b + 1) * t]);
            // (b, h) owns columns h·d .. (h+1)·d of rows b·t .. (b+1)·t of `out` (length
            // batch·t·hidden, checked above); the tasks partition `out`, which outlives
            // `pool.install`. The head writes its rows there directly.
            let rows =
                OutRows { first: dst.get().wrapping_add(base), stride: hidden, d, t, _out: std::marker::PhantomData };
            let (q, k, v) = (&q[base..], &k[base..], &v[base..]);
            match precision {
                AttentionPrecision::F32 => head(level, q, k, v, hidden, m, scale, t, d, rows, scratch, false),
                AttentionPrecision::Bf16 => head_bf16(level, q, k, v, hidden, m, scale, t, d, rows, scratch),
            }
        })
    });
}

/// Whether `v` holds `t` rows of `d` values starting `stride` apart.
fn values_fit(v: &[f32], t: usize, stride: usize, d: usize) -> bool {
    t == 0 || (stride >= d && v.len() >= (t - 1) * stride + d)
}

/// A task's buffers for [`head`], reused across its heads (allocating and zeroing them per
/// head, with a copy of the values and of the output, was an eighth of the kernel's time).
#[derive(Default)]
struct HeadScratch {
    /// The keys transposed, `d × t` padded to whole registers.
    kt: Vec<f32>,
    /// Score rows.
    p: Vec<f32>,
    /// Output rows for the repeated last row of a partial pass.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    spare: Vec<f32>,
    /// bf16 pairs (two values of one row in a 32-bit lane, the even one low): the keys by
    /// row, then transposed, the values by pairs of rows, the queries and scores of a pass.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pairs: [Vec<u32>; 5],
    /// A head's queries, keys and values rounded to bf16, for bf16 attention on the f32
    /// kernels (CPUs without AVX-512 BF16).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    rounded: Vec<f32>,
}

/// `x` rounded to bf16 (to nearest, ties to even) and back: what [`AttentionPrecision::Bf16`]
/// does to attention's operands.
fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// [`bf16_round`] by the carry trick, which the compiler vectorises (a NaN is kept as it is).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
fn bf16_round_bits(v: f32) -> f32 {
    let b = v.to_bits();
    let r = f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000);
    if b & 0x7fff_ffff > 0x7f80_0000 { v } else { r }
}

/// [`bf16_round`] of every value in place.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn round_bf16_in_place(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = bf16_round_bits(*v));
}

/// [`head`] at [`AttentionPrecision::Bf16`] (the semantics of
/// [`pare_core_tensor::attention_reference_bf16`]): with AVX-512 BF16 the products run on
/// `vdpbf16ps`; with AVX2 the f32 kernels run on rounded operands (as fast as f32
/// attention); elsewhere the semantics one value at a time.
#[allow(clippy::too_many_arguments)]
fn head_bf16(
    level: SimdLevel,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    mask: Option<&[f32]>,
    scale: f32,
    t: usize,
    d: usize,
    out: OutRows<'_>,
    sc: &mut HeadScratch,
) {
    assert!(values_fit(q, t, stride, d) && values_fit(k, t, stride, d) && values_fit(v, t, stride, d));
    #[cfg(target_arch = "x86_64")]
    if level.avx512_bf16() && d.is_multiple_of(16) && t > 0 {
        use avx512bf16::ROWS;
        let (t16, dp, t2) = (t.div_ceil(16) * 16, d / 2, t.div_ceil(2));
        let [kr, kp, vp, qp, pp] = &mut sc.pairs;
        kr.resize(t * dp, 0);
        kp.resize(dp * t16, 0);
        vp.resize(t2 * d, 0);
        qp.resize(ROWS * dp, 0);
        pp.resize(ROWS * t16 / 2, 0);
        sc.p.resize(ROWS * t16, 0.0);
        sc.spare.resize((ROWS - 1) * d, 0.0);
        // SAFETY: AVX-512 F/BW and BF16 were detected just above; k and v hold t rows of d
        // (a multiple of 16) `stride` apart, kr holds t·d/2 pairs and vp ⌈t/2⌉·d.
        unsafe {
            avx512bf16::pack_rows(k, stride, t, d, kr);
            avx512bf16::pack_value_pairs(v, stride, t, d, vp);
        }
        // The key pairs transposed to [d/2][t16] as 32-bit lanes: the transpose only moves
        // bits, so it takes them as f32.
        // SAFETY: u32 and f32 have the same size and alignment; the views cover the vectors.
        let (src, dst) = unsafe {
            (
                std::slice::from_raw_parts(kr.as_ptr().cast::<f32>(), kr.len()),
                std::slice::from_raw_parts_mut(kp.as_mut_ptr().cast::<f32>(), kp.len()),
            )
        };
        crate::simd::transpose(level, src, dp, t, dp, dst, t16);
        let mut i = 0;
        while i < t {
            let rows = (t - i).min(ROWS);
            let qs: [&[f32]; ROWS] = std::array::from_fn(|r| {
                let at = (i + r.min(rows - 1)) * stride;
                &q[at..at + d]
            });
            // SAFETY: rows i .. i + rows are distinct, each taken once.
            let mut mine = (i..i + rows).map(|r| unsafe { out.row(r) });
            let mut spare = sc.spare.chunks_mut(d);
            let outs: [&mut [f32]; ROWS] =
                std::array::from_fn(|_| mine.next().or_else(|| spare.next()).expect("four rows"));
            // SAFETY: AVX-512 BF16 was detected; kp is d/2 × t16 pairs, vp ⌈t/2⌉ × d pairs,
            // qp holds 4·d/2, pp 4·t16/2, p 4·t16; every q and out row holds d.
            unsafe { avx512bf16::attend_rows(qs, kp, vp, mask, scale, t, t16, qp, &mut sc.p, pp, outs) };
            i += rows;
        }
        return;
    }
    // Without AVX-512 BF16, the f32 kernels on operands rounded to bf16 here, the numerators
    // rounded inside: the same semantics at the f32 kernels' speed.
    #[cfg(target_arch = "x86_64")]
    if level.avx2() && d.is_multiple_of(8) {
        let mut rounded = std::mem::take(&mut sc.rounded);
        rounded.clear();
        for x in [q, k, v] {
            for j in 0..t {
                rounded.extend(x[j * stride..j * stride + d].iter().map(|&a| bf16_round_bits(a)));
            }
        }
        let (qr, rest) = rounded.split_at(t * d);
        let (kr, vr) = rest.split_at(t * d);
        head(level, qr, kr, vr, d, mask, scale, t, d, out, sc, true);
        sc.rounded = rounded;
        return;
    }
    let _ = (level, sc);
    let mut p = vec![0f32; t];
    for i in 0..t {
        let qi: Vec<f32> = q[i * stride..i * stride + d].iter().map(|&x| bf16_round(x)).collect();
        for (j, pj) in p.iter_mut().enumerate() {
            let kj = &k[j * stride..j * stride + d];
            let dot: f32 = qi.iter().zip(kj).map(|(&a, &b)| a * bf16_round(b)).sum();
            *pj = dot * scale + mask.map_or(0.0, |m| m[j]);
        }
        let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for e in &mut p {
            *e = (*e - max).exp();
            total += *e;
        }
        // SAFETY: row i is taken once, for this iteration only.
        let out = unsafe { out.row(i) };
        out.iter_mut().for_each(|o| *o = 0.0);
        for (j, &e) in p.iter().enumerate() {
            let w = bf16_round(e);
            for (o, &x) in out.iter_mut().zip(&v[j * stride..j * stride + d]) {
                *o += w * bf16_round(x);
            }
        }
        let inv = 1.0 / total;
        out.iter_mut().for_each(|o| *o *= inv);
    }
}

/// One head's output rows inside the attention output: `t` rows of `d` values, `stride`
/// apart, starting at `first`, owned by the task that holds this.
struct OutRows<'a> {
    first: *mut f32,
    stride: usize,
    d: usize,
    t: usize,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> OutRows<'a> {
    /// Row `i`.
    ///
    /// # Safety
    /// No other live slice from this `OutRows` may be row `i`.
    unsafe fn row(&self, i: usize) -> &'a mut [f32] {
        assert!(i < self.t);
        // SAFETY: rows 0..t of d values `stride` apart from `first` are this task's (see
        // `attention`); the caller holds no other reference to row i.
        unsafe { std::slice::from_raw_parts_mut(self.first.add(i * self.stride), self.d) }
    }
}

/// One head: `q`, `k`, `v` start at the head's first value, rows `stride` apart; its output
/// rows go to `out`. `round`: the softmax numerators are rounded to bf16 before they weigh
/// the values (bf16 attention on operands the caller has rounded already).
#[allow(clippy::too_many_arguments)]
fn head(
    level: SimdLevel,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    mask: Option<&[f32]>,
    scale: f32,
    t: usize,
    d: usize,
    out: OutRows<'_>,
    sc: &mut HeadScratch,
    round: bool,
) {
    assert!(values_fit(q, t, stride, d) && values_fit(k, t, stride, d) && values_fit(v, t, stride, d));
    // Keys transposed to [d][t8] (t8 = t rounded up to 8); values read in place.
    let t8 = t.div_ceil(8) * 8;
    #[cfg(target_arch = "x86_64")]
    if level.avx512() && d.is_multiple_of(16) {
        // Keys padded to whole 16-lane registers (the padding's scores are never read).
        let t16 = t.div_ceil(16) * 16;
        sc.kt.resize(d * t16, 0.0);
        crate::simd::transpose(level, k, stride, t, d, &mut sc.kt[..d * t16], t16);
        sc.p.resize(avx512::ROWS * t16, 0.0);
        sc.spare.resize((avx512::ROWS - 1) * d, 0.0);
        let mut i = 0;
        while i < t {
            let rows = (t - i).min(avx512::ROWS);
            let qs: [&[f32]; avx512::ROWS] = std::array::from_fn(|r| {
                let at = (i + r.min(rows - 1)) * stride;
                &q[at..at + d]
            });
            // Rows past the last are computed again (as the last row) into scratch rows.
            // SAFETY: rows i .. i + rows are distinct, each taken once.
            let mut mine = (i..i + rows).map(|r| unsafe { out.row(r) });
            let mut spare = sc.spare.chunks_mut(d);
            let outs: [&mut [f32]; avx512::ROWS] =
                std::array::from_fn(|_| mine.next().or_else(|| spare.next()).expect("four rows"));
            // SAFETY: AVX-512 F was detected just above; kt is d × t16, v holds t rows of d
            // `stride` apart, p holds 4·t16 floats, every q and out row holds d, a multiple
            // of 16.
            unsafe {
                avx512::attend_rows(qs, &sc.kt[..d * t16], v, stride, mask, scale, t, t16, &mut sc.p[..], outs, round)
            };
            i += rows;
        }
        return;
    }
    // The AVX-512 path above transposes into its own 16-padded layout.
    sc.kt.resize(d * t8, 0.0);
    let kt = &mut sc.kt[..d * t8];
    crate::simd::transpose(level, k, stride, t, d, kt, t8);
    sc.p.resize(2 * t8, 0.0);
    let p = &mut sc.p[..2 * t8];
    #[cfg(target_arch = "x86_64")]
    if level.avx2() && d.is_multiple_of(8) {
        sc.spare.resize(d, 0.0);
        let mut i = 0;
        while i < t {
            let rows = (t - i).min(2);
            let qs: [&[f32]; 2] = std::array::from_fn(|r| {
                let at = (i + r.min(rows - 1)) * stride;
                &q[at..at + d]
            });
            // SAFETY: rows i and i + 1 are distinct, each taken once; with one row left, row
            // 0 is computed twice and the second copy written to a scratch row.
            let outs: [&mut [f32]; 2] =
                unsafe { [out.row(i), if rows == 2 { out.row(i + 1) } else { &mut sc.spare[..d] }] };
            // SAFETY: AVX2 and FMA were detected just above; kt is d × t8, v holds t rows of d
            // `stride` apart, p holds 2·t8 floats, d is a multiple of 8.
            unsafe { avx2::attend_rows(qs, kt, v, stride, mask, scale, t, t8, p, outs, round) };
            i += rows;
        }
        return;
    }
    for i in 0..t {
        let qi = &q[i * stride..i * stride + d];
        // SAFETY: row i is taken once, for this iteration only.
        let out = unsafe { out.row(i) };
        for j in 0..t {
            let dot: f32 = (0..d).map(|c| qi[c] * kt[c * t8 + j]).sum();
            p[j] = dot * scale + mask.map_or(0.0, |m| m[j]);
        }
        let max = p[..t].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for e in &mut p[..t] {
            *e = (*e - max).exp();
            total += *e;
        }
        out.iter_mut().for_each(|o| *o = 0.0);
        for j in 0..t {
            let w = if round { bf16_round(p[j]) } else { p[j] } / total;
            for c in 0..d {
                out[c] += w * v[j * stride + c];
            }
        }
    }
}

// Register-blocked kernels index parallel arrays of accumulators and operands by lane.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Act;

    /// e^x for eight lanes (Cephes' polynomial; x clamped to ±88.38).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.376_26)), _mm256_set1_ps(88.376_26));
        let fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.5)));
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_66, 0.5] {
            y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0));
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)));
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn erf(x: __m256) -> __m256 {
        let sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0));
        let a = _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
        let one = _mm256_set1_ps(1.0);
        let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.327_591_1), a, one));
        let mut poly = _mm256_set1_ps(1.061_405_4);
        for c in [-1.453_152_1, 1.421_413_8, -0.284_496_74, 0.254_829_6] {
            poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(c));
        }
        poly = _mm256_mul_ps(poly, t);
        let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
        _mm256_or_ps(_mm256_fnmadd_ps(poly, e, one), sign)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn act8(act: Act, v: __m256) -> __m256 {
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        match act {
            Act::Relu => _mm256_max_ps(v, _mm256_setzero_ps()),
            Act::Gelu => {
                let e = erf(_mm256_mul_ps(v, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2)));
                _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, e))
            }
            Act::GeluTanh => {
                let v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
                let u = _mm256_mul_ps(_mm256_set1_ps(0.797_884_6), _mm256_fmadd_ps(_mm256_set1_ps(0.044_715), v3, v));
                // tanh(u) = 1 − 2/(e^{2u} + 1)
                let e2 = exp(_mm256_add_ps(u, u));
                let th = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0), _mm256_add_ps(e2, one)));
                _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, th))
            }
            Act::Silu => {
                let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), v));
                _mm256_div_ps(v, _mm256_add_ps(one, e))
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `x.len() == y.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn activation(act: Act, x: &[f32], y: &mut [f32]) {
        assert!(x.len() == y.len());
        let body = x.len() / 8 * 8;
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 ≤ body ≤ x.len() = y.len().
            unsafe {
                let v = _mm256_loadu_ps(x.as_ptr().add(i));
                _mm256_storeu_ps(y.as_mut_ptr().add(i), act8(act, v));
            }
        }
        if body < x.len() {
            let mut tail = [0f32; 8];
            tail[..x.len() - body].copy_from_slice(&x[body..]);
            // SAFETY: tail holds 8 floats.
            unsafe { _mm256_storeu_ps(tail.as_mut_ptr(), act8(act, _mm256_loadu_ps(tail.as_ptr()))) };
            let n = x.len() - body;
            y[body..].copy_from_slice(&tail[..n]);
        }
    }

    /// [`activation`] in place.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn activation_in_place(act: Act, y: &mut [f32]) {
        let body = y.len() / 8 * 8;
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 ≤ body ≤ y.len().
            unsafe {
                let v = _mm256_loadu_ps(y.as_ptr().add(i));
                _mm256_storeu_ps(y.as_mut_ptr().add(i), act8(act, v));
            }
        }
        if body < y.len() {
            let mut tail = [0f32; 8];
            let n = y.len() - body;
            tail[..n].copy_from_slice(&y[body..]);
            // SAFETY: tail holds 8 floats.
            unsafe { _mm256_storeu_ps(tail.as_mut_ptr(), act8(act, _mm256_loadu_ps(tail.as_ptr()))) };
            y[body..].copy_from_slice(&tail[..n]);
        }
    }

    /// Σx (or Σx²) over eight lanes, then across them.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum(x: &[f32], square: bool) -> f32 {
        let body = x.len() / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 ≤ body ≤ x.len().
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            acc = if square { _mm256_fmadd_ps(v, v, acc) } else { _mm256_add_ps(acc, v) };
        }
        let mut lanes = [0f32; 8];
        // SAFETY: lanes holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        let mut s: f32 = lanes.iter().sum();
        for &v in &x[body..] {
            s += if square { v * v } else { v };
        }
        s
    }

    /// Two query rows at once (each loaded key and value vector feeds both): scores against
    /// every key, eight at a time from the transposed keys, masked softmax, then the
    /// probability-weighted sum of the values.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `kt` is `d × t8`, `vp` holds `t` value rows of `d`
    /// starting `vs` apart, `p` holds `2·t8` floats, every `q` and `out` row holds `d` (a
    /// multiple of 8). `round`: the numerators are rounded to bf16 before they weigh the values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn attend_rows(
        q: [&[f32]; 2],
        kt: &[f32],
        vp: &[f32],
        vs: usize,
        mask: Option<&[f32]>,
        scale: f32,
        t: usize,
        t8: usize,
        p: &mut [f32],
        mut out: [&mut [f32]; 2],
        round: bool,
    ) {
        let d = q[0].len();
        assert!(kt.len() == d * t8 && super::values_fit(vp, t, vs, d) && p.len() == 2 * t8 && d.is_multiple_of(8));
        assert!(q.iter().all(|r| r.len() == d) && out.iter().all(|r| r.len() == d));
        let sv = _mm256_set1_ps(scale);
        // Scores: four key blocks (32 keys) × two rows per pass, eight FMA chains in registers
        // (fixed-size blocks, so the accumulators are never spilled); eight keys at the tail.
        let mut jb = 0;
        while jb < t8 {
            // SAFETY: the blocks read kt[c·t8 + jb ..+ 8·NB] and write p[r·t8 + jb ..+ 8·NB],
            // within bounds as jb + 8·NB ≤ t8.
            unsafe {
                if t8 - jb >= 32 {
                    scores::<4>(q, kt, t8, jb, sv, p);
                    jb += 32;
                } else {
                    scores::<1>(q, kt, t8, jb, sv, p);
                    jb += 8;
                }
            }
        }
        let mut inv = [0f32; 2];
        for (r, inv) in inv.iter_mut().enumerate() {
            // SAFETY: AVX2 and FMA are enabled in this function.
            *inv = unsafe { normalise(&mut p[r * t8..r * t8 + t], mask) };
            if round {
                super::round_bf16_in_place(&mut p[r * t8..r * t8 + t]);
            }
        }
        // Weighted sum of values: four vectors of a row × two rows per pass (one at the tail).
        let vecs = d / 8;
        let mut o = 0;
        while o < vecs {
            // SAFETY: reads vp[j·vs + 8o ..+ 8·NV] and writes out[r][8o ..+ 8·NV], in bounds as
            // o + NV ≤ d/8.
            unsafe {
                if vecs - o >= 4 {
                    weighted::<4>(p, t, t8, vp, vs, d, o, inv, &mut out);
                    o += 4;
                } else {
                    weighted::<1>(p, t, t8, vp, vs, d, o, inv, &mut out);
                    o += 1;
                }
            }
        }
    }

    /// Scores of two query rows against keys `jb .. jb + 8·NB`, scaled, into `p[r·t8 + j]`.
    ///
    /// # Safety
    /// AVX2 and FMA; `kt` is `d × t8`, `p` holds `2·t8`, `jb + 8·NB ≤ t8`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn scores<const NB: usize>(q: [&[f32]; 2], kt: &[f32], t8: usize, jb: usize, sv: __m256, p: &mut [f32]) {
        let d = q[0].len();
        assert!(jb + 8 * NB <= t8 && kt.len() >= d * t8 && p.len() >= 2 * t8 && q[1].len() == d);
        let mut acc = [[_mm256_setzero_ps(); NB]; 2];
        for c in 0..d {
            let qv = [_mm256_set1_ps(q[0][c]), _mm256_set1_ps(q[1][c])];
            for b in 0..NB {
                // SAFETY: c·t8 + jb + 8b + 8 ≤ d·t8 (asserted bounds).
                let kv = unsafe { _mm256_loadu_ps(kt.as_ptr().add(c * t8 + jb + 8 * b)) };
                acc[0][b] = _mm256_fmadd_ps(qv[0], kv, acc[0][b]);
                acc[1][b] = _mm256_fmadd_ps(qv[1], kv, acc[1][b]);
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            for (b, a) in ar.iter().enumerate() {
                // SAFETY: r·t8 + jb + 8b + 8 ≤ 2·t8 ≤ p.len().
                unsafe { _mm256_storeu_ps(p.as_mut_ptr().add(r * t8 + jb + 8 * b), _mm256_mul_ps(*a, sv)) };
            }
        }
    }

    /// Output vectors `o .. o + NV` of two rows: `Σ_j p[r][j]·v[j]`, times `inv[r]`.
    ///
    /// # Safety
    /// AVX2 and FMA; `vp` holds `t` rows of `d` starting `vs` apart, `p` holds `2·t8`,
    /// `8·(o + NV) ≤ d`, each `out` row `d`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn weighted<const NV: usize>(
        p: &[f32],
        t: usize,
        t8: usize,
        vp: &[f32],
        vs: usize,
        d: usize,
        o: usize,
        inv: [f32; 2],
        out: &mut [&mut [f32]; 2],
    ) {
        assert!(
            8 * (o + NV) <= d
                && super::values_fit(vp, t, vs, d)
                && p.len() >= t8 + t
                && out.iter().all(|r| r.len() == d)
        );
        let mut acc = [[_mm256_setzero_ps(); NV]; 2];
        for j in 0..t {
            let w = [_mm256_set1_ps(p[j]), _mm256_set1_ps(p[t8 + j])];
            for x in 0..NV {
                // SAFETY: j·vs + 8(o + x) + 8 ≤ (t − 1)·vs + d ≤ vp.len().
                let vv = unsafe { _mm256_loadu_ps(vp.as_ptr().add(j * vs + 8 * (o + x))) };
                acc[0][x] = _mm256_fmadd_ps(w[0], vv, acc[0][x]);
                acc[1][x] = _mm256_fmadd_ps(w[1], vv, acc[1][x]);
            }
        }
        for r in 0..2 {
            for x in 0..NV {
                let v = _mm256_mul_ps(acc[r][x], _mm256_set1_ps(inv[r]));
                // SAFETY: 8(o + x) + 8 ≤ d = out[r].len().
                unsafe { _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * (o + x)), v) };
            }
        }
    }

    /// Adds the key mask (if any) to a row of scaled scores, replaces it by the softmax
    /// numerators `e^(x − max)` and returns the reciprocal of their sum.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; a mask holds as many values as the row.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn normalise(row: &mut [f32], mask: Option<&[f32]>) -> f32 {
        let t = row.len();
        if let Some(m) = mask {
            assert!(m.len() == t);
            let full = t / 8 * 8;
            for j in (0..full).step_by(8) {
                // SAFETY: j + 8 ≤ t = row.len() = m.len().
                unsafe {
                    let v = _mm256_add_ps(_mm256_loadu_ps(row.as_ptr().add(j)), _mm256_loadu_ps(m.as_ptr().add(j)));
                    _mm256_storeu_ps(row.as_mut_ptr().add(j), v);
                }
            }
            for j in full..t {
                row[j] += m[j];
            }
        }
        // SAFETY: AVX2 and FMA are enabled in this function.
        1.0 / unsafe { softmax_numerators(row) }
    }

    /// Replaces `row` by `e^(x − max)` and returns their sum.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn softmax_numerators(row: &mut [f32]) -> f32 {
        let t = row.len();
        let full = t / 8 * 8;
        let mut m8 = _mm256_set1_ps(f32::NEG_INFINITY);
        for j in (0..full).step_by(8) {
            // SAFETY: j + 8 ≤ t.
            m8 = _mm256_max_ps(m8, unsafe { _mm256_loadu_ps(row.as_ptr().add(j)) });
        }
        let mut lanes = [0f32; 8];
        // SAFETY: lanes holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m8) };
        let max = row[full..].iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max);
        let mx = _mm256_set1_ps(max);
        let mut total = _mm256_setzero_ps();
        for j in (0..full).step_by(8) {
            // SAFETY: j + 8 ≤ t.
            unsafe {
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(row.as_ptr().add(j)), mx));
                _mm256_storeu_ps(row.as_mut_ptr().add(j), e);
                total = _mm256_add_ps(total, e);
            }
        }
        // SAFETY: lanes holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
        let mut sum: f32 = lanes.iter().sum();
        if full < t {
            let mut tail = [f32::NEG_INFINITY; 8];
            tail[..t - full].copy_from_slice(&row[full..]);
            // SAFETY: tail holds 8 floats.
            unsafe { _mm256_storeu_ps(tail.as_mut_ptr(), exp(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), mx))) };
            for (j, e) in tail.iter().enumerate().take(t - full) {
                row[full + j] = *e;
                sum += *e;
            }
        }
        sum
    }
}

// Register-blocked kernels index parallel arrays of accumulators and operands by lane.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Act;

    /// [`super::avx2::exp`] on sixteen lanes: the same operations, so the same bits per lane.
    #[target_feature(enable = "avx2,fma,avx512f")]
    #[inline]
    fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.376_26)), _mm512_set1_ps(88.376_26));
        let fx = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
            _mm512_set1_ps(0.5),
        ));
        let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693_359_4), x);
        let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.121_944_4e-4), x);
        let mut y = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_66, 0.5] {
            y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(x, x), x), _mm512_set1_ps(1.0));
        let pow2 = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)));
        _mm512_mul_ps(y, _mm512_castsi512_ps(pow2))
    }

    /// [`super::avx2`]'s erf on sixteen lanes (the same operations).
    #[target_feature(enable = "avx2,fma,avx512f")]
    #[inline]
    fn erf(x: __m512) -> __m512 {
        let signbit = _mm512_set1_epi32(i32::MIN);
        let sign = _mm512_and_si512(_mm512_castps_si512(x), signbit);
        let a = _mm512_castsi512_ps(_mm512_andnot_si512(signbit, _mm512_castps_si512(x)));
        let one = _mm512_set1_ps(1.0);
        let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.327_591_1), a, one));
        let mut poly = _mm512_set1_ps(1.061_405_4);
        for c in [-1.453_152_1, 1.421_413_8, -0.284_496_74, 0.254_829_6] {
            poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(c));
        }
        poly = _mm512_mul_ps(poly, t);
        let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(_mm512_fnmadd_ps(poly, e, one)), sign))
    }

    /// [`super::avx2`]'s activation of eight lanes, on sixteen (the same operations).
    #[target_feature(enable = "avx2,fma,avx512f")]
    #[inline]
    fn act16(act: Act, v: __m512) -> __m512 {
        let half = _mm512_set1_ps(0.5);
        let one = _mm512_set1_ps(1.0);
        match act {
            Act::Relu => _mm512_max_ps(v, _mm512_setzero_ps()),
            Act::Gelu => {
                let e = erf(_mm512_mul_ps(v, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2)));
                _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, e))
            }
            Act::GeluTanh => {
                let v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
                let u = _mm512_mul_ps(_mm512_set1_ps(0.797_884_6), _mm512_fmadd_ps(_mm512_set1_ps(0.044_715), v3, v));
                let e2 = exp(_mm512_add_ps(u, u));
                let th = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(e2, one)));
                _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, th))
            }
            Act::Silu => {
                let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), v));
                _mm512_div_ps(v, _mm512_add_ps(one, e))
            }
        }
    }

    /// [`super::avx2::normalise`] of `R` score rows of one length, with the exponentials
    /// sixteen lanes at a time: the mask added and the maximum taken (both exact), each
    /// `e^(x − max)` by the same operations, and the sum accumulated as the AVX2 kernel does,
    /// eight lanes after eight, so the bits agree. The rows are interleaved: a row's
    /// exponentials and its running sum form one dependency chain, and `R` independent chains
    /// keep the vector units busier than one row at a time.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, AVX2 and FMA.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn normalise_rows<const R: usize>(mut rows: [&mut [f32]; R], mask: Option<&[f32]>) -> [f32; R] {
        let t = rows[0].len();
        assert!(rows.iter().all(|r| r.len() == t));
        if let Some(m) = mask {
            assert!(m.len() == t);
            for row in rows.iter_mut() {
                row.iter_mut().zip(m).for_each(|(v, m)| *v += m);
            }
        }
        let full = t / 8 * 8;
        let wide = t / 16 * 16;
        let max: [f32; R] = std::array::from_fn(|r| {
            let row = &rows[r];
            let mut m16 = _mm512_set1_ps(f32::NEG_INFINITY);
            for j in (0..wide).step_by(16) {
                // SAFETY: j + 16 ≤ t.
                m16 = _mm512_max_ps(m16, unsafe { _mm512_loadu_ps(row.as_ptr().add(j)) });
            }
            let mut lanes = [f32::NEG_INFINITY; 16];
            // SAFETY: lanes holds 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), m16) };
            row[wide..].iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max)
        });
        let mx: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps(max[r]));
        let mut total = [_mm256_setzero_ps(); R];
        for j in (0..wide).step_by(16) {
            for r in 0..R {
                // SAFETY: j + 16 ≤ t = every row's length.
                unsafe {
                    let e = exp(_mm512_sub_ps(_mm512_loadu_ps(rows[r].as_ptr().add(j)), mx[r]));
                    _mm512_storeu_ps(rows[r].as_mut_ptr().add(j), e);
                    total[r] = _mm256_add_ps(total[r], _mm512_castps512_ps256(e));
                    total[r] =
                        _mm256_add_ps(total[r], _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e))));
                }
            }
        }
        std::array::from_fn(|r| {
            let row = &mut rows[r];
            let mx8 = _mm256_set1_ps(max[r]);
            let mut total = total[r];
            if wide < full {
                // SAFETY: wide + 8 = full ≤ t.
                unsafe {
                    let e = super::avx2::exp(_mm256_sub_ps(_mm256_loadu_ps(row.as_ptr().add(wide)), mx8));
                    _mm256_storeu_ps(row.as_mut_ptr().add(wide), e);
                    total = _mm256_add_ps(total, e);
                }
            }
            let mut lanes = [0f32; 8];
            // SAFETY: lanes holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
            let mut sum: f32 = lanes.iter().sum();
            if full < t {
                let mut tail = [f32::NEG_INFINITY; 8];
                tail[..t - full].copy_from_slice(&row[full..]);
                // SAFETY: tail holds 8 floats.
                unsafe {
                    let e = super::avx2::exp(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), mx8));
                    _mm256_storeu_ps(tail.as_mut_ptr(), e);
                }
                for (j, e) in tail.iter().enumerate().take(t - full) {
                    row[full + j] = *e;
                    sum += *e;
                }
            }
            1.0 / sum
        })
    }

    /// `y = act(x)` sixteen lanes at a time, the tail padded and computed whole: per element
    /// the bits of the AVX2 kernel.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, AVX2 and FMA; `x.len() == y.len()`.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn activation(act: Act, x: &[f32], y: &mut [f32]) {
        assert!(x.len() == y.len());
        let body = x.len() / 16 * 16;
        for i in (0..body).step_by(16) {
            // SAFETY: i + 16 ≤ body ≤ x.len() = y.len().
            unsafe { _mm512_storeu_ps(y.as_mut_ptr().add(i), act16(act, _mm512_loadu_ps(x.as_ptr().add(i)))) };
        }
        if body < x.len() {
            let n = x.len() - body;
            let mut tail = [0f32; 16];
            tail[..n].copy_from_slice(&x[body..]);
            // SAFETY: tail holds 16 floats.
            unsafe { _mm512_storeu_ps(tail.as_mut_ptr(), act16(act, _mm512_loadu_ps(tail.as_ptr()))) };
            y[body..].copy_from_slice(&tail[..n]);
        }
    }

    /// [`activation`] in place.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, AVX2 and FMA.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn activation_in_place(act: Act, y: &mut [f32]) {
        let body = y.len() / 16 * 16;
        for i in (0..body).step_by(16) {
            // SAFETY: i + 16 ≤ body ≤ y.len().
            unsafe { _mm512_storeu_ps(y.as_mut_ptr().add(i), act16(act, _mm512_loadu_ps(y.as_ptr().add(i)))) };
        }
        if body < y.len() {
            let n = y.len() - body;
            let mut tail = [0f32; 16];
            tail[..n].copy_from_slice(&y[body..]);
            // SAFETY: tail holds 16 floats.
            unsafe { _mm512_storeu_ps(tail.as_mut_ptr(), act16(act, _mm512_loadu_ps(tail.as_ptr()))) };
            y[body..].copy_from_slice(&tail[..n]);
        }
    }

    /// Query rows per pass.
    pub const ROWS: usize = 4;

    /// [`super::avx2::attend_rows`] for four query rows at once, sixteen keys or values per
    /// register (32 registers hold the 16 score accumulators): every lane takes the same
    /// operations in the same order as there (scores as one FMA chain over the head's
    /// dimensions, then scaled; the same mask, softmax and reciprocal; the weighted sum as one
    /// FMA chain over the keys, then scaled), so the results are the same bits.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, AVX2 and FMA; `kt` is `d × t16` (`t16` a multiple of
    /// 16, at least `t`), `vp` holds `t` value rows of `d` starting `vs` apart, `p` holds
    /// `4·t16` floats, every `q` and `out` row holds `d` (a multiple of 16). `round`: the
    /// numerators are rounded to bf16 before they weigh the values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn attend_rows(
        q: [&[f32]; ROWS],
        kt: &[f32],
        vp: &[f32],
        vs: usize,
        mask: Option<&[f32]>,
        scale: f32,
        t: usize,
        t16: usize,
        p: &mut [f32],
        mut out: [&mut [f32]; ROWS],
        round: bool,
    ) {
        let d = q[0].len();
        assert!(t16.is_multiple_of(16) && t <= t16 && d.is_multiple_of(16));
        assert!(kt.len() == d * t16 && super::values_fit(vp, t, vs, d) && p.len() == ROWS * t16);
        assert!(q.iter().all(|r| r.len() == d) && out.iter().all(|r| r.len() == d));
        let sv = _mm512_set1_ps(scale);
        let mut jb = 0;
        while jb < t16 {
            if t16 - jb >= 64 {
                scores::<4>(q, kt, t16, jb, sv, p);
                jb += 64;
            } else {
                scores::<1>(q, kt, t16, jb, sv, p);
                jb += 16;
            }
        }
        let mut rows = p.chunks_mut(t16).map(|r| &mut r[..t]);
        let rows: [&mut [f32]; ROWS] = std::array::from_fn(|_| rows.next().expect("four score rows"));
        // SAFETY: AVX-512 F, AVX2 and FMA are enabled in this function; the mask (if any)
        // holds t.
        let inv = unsafe { normalise_rows(rows, mask) };
        if round {
            p.chunks_mut(t16).for_each(|r| super::round_bf16_in_place(&mut r[..t]));
        }
        let vecs = d / 16;
        let mut o = 0;
        while o < vecs {
            if vecs - o >= 2 {
                weighted::<2>(p, t, t16, vp, vs, d, o, inv, &mut out);
                o += 2;
            } else {
                weighted::<1>(p, t, t16, vp, vs, d, o, inv, &mut out);
                o += 1;
            }
        }
    }

    /// Scores of the rows against keys `jb .. jb + 16·NB`, scaled, into `p[r·t16 + j]`.
    #[target_feature(enable = "avx2,fma,avx512f")]
    #[inline]
    fn scores<const NB: usize>(q: [&[f32]; ROWS], kt: &[f32], t16: usize, jb: usize, sv: __m512, p: &mut [f32]) {
        let d = q[0].len();
        assert!(jb + 16 * NB <= t16 && kt.len() >= d * t16 && p.len() >= ROWS * t16);
        assert!(q.iter().all(|r| r.len() == d));
        let mut acc = [[_mm512_setzero_ps(); NB]; ROWS];
        for c in 0..d {
            // SAFETY: c < d = every row's length (asserted).
            let qv: [__m512; ROWS] = std::array::from_fn(|r| _mm512_set1_ps(unsafe { *q[r].get_unchecked(c) }));
            for b in 0..NB {
                // SAFETY: c·t16 + jb + 16b + 16 ≤ d·t16 ≤ kt.len() (asserted bounds).
                let kv = unsafe { _mm512_loadu_ps(kt.as_ptr().add(c * t16 + jb + 16 * b)) };
                for r in 0..ROWS {
                    acc[r][b] = _mm512_fmadd_ps(qv[r], kv, acc[r][b]);
                }
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            for (b, a) in ar.iter().enumerate() {
                // SAFETY: r·t16 + jb + 16b + 16 ≤ 4·t16 ≤ p.len().
                unsafe { _mm512_storeu_ps(p.as_mut_ptr().add(r * t16 + jb + 16 * b), _mm512_mul_ps(*a, sv)) };
            }
        }
    }

    /// Output registers `o .. o + NV` (16 values each) of the rows: `Σ_j p[r][j]·v[j]`, times
    /// `inv[r]`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,avx512f")]
    #[inline]
    fn weighted<const NV: usize>(
        p: &[f32],
        t: usize,
        t16: usize,
        vp: &[f32],
        vs: usize,
        d: usize,
        o: usize,
        inv: [f32; ROWS],
        out: &mut [&mut [f32]; ROWS],
    ) {
        assert!(16 * (o + NV) <= d && super::values_fit(vp, t, vs, d) && t <= t16 && p.len() >= ROWS * t16);
        assert!(out.iter().all(|r| r.len() == d));
        let mut acc = [[_mm512_setzero_ps(); NV]; ROWS];
        for j in 0..t {
            // SAFETY: r·t16 + j < 4·t16 ≤ p.len() (j < t ≤ t16).
            let w: [__m512; ROWS] = std::array::from_fn(|r| _mm512_set1_ps(unsafe { *p.get_unchecked(r * t16 + j) }));
            for x in 0..NV {
                // SAFETY: j·vs + 16(o + x) + 16 ≤ (t − 1)·vs + d ≤ vp.len().
                let vv = unsafe { _mm512_loadu_ps(vp.as_ptr().add(j * vs + 16 * (o + x))) };
                for r in 0..ROWS {
                    acc[r][x] = _mm512_fmadd_ps(w[r], vv, acc[r][x]);
                }
            }
        }
        for r in 0..ROWS {
            for x in 0..NV {
                let v = _mm512_mul_ps(acc[r][x], _mm512_set1_ps(inv[r]));
                // SAFETY: 16(o + x) + 16 ≤ d = out[r].len().
                unsafe { _mm512_storeu_ps(out[r].as_mut_ptr().add(16 * (o + x)), v) };
            }
        }
    }
}

/// Attention at [`AttentionPrecision::Bf16`] on AVX-512 BF16: both products on `vdpbf16ps`
/// (per 32-bit lane, `acc += a_odd·b_odd`, then `+= a_even·b_even`, each product exact and
/// each sum rounded), two reduction steps per instruction where the f32 kernel takes one.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512bf16 {
    use std::arch::x86_64::*;

    use super::values_fit;

    /// Query rows per pass.
    pub const ROWS: usize = 4;

    /// Sixteen floats as sixteen bf16 (to nearest even) in a 256-bit vector.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512bf16")]
    #[inline]
    fn bf16x16(v: __m512) -> __m256i {
        // SAFETY: __m256bh and __m256i are both 256 bits of plain data.
        unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)) }
    }

    /// Sixteen 32-bit lanes as bf16 pairs.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512bf16")]
    #[inline]
    fn pairs(v: __m512i) -> __m512bh {
        // SAFETY: __m512i and __m512bh are both 512 bits of plain data.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// Rows of `x` (`t` rows of `d` floats, `stride` apart) as rows of `d/2` bf16 pairs.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW and BF16; `d` is a multiple of 16.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512bf16")]
    pub unsafe fn pack_rows(x: &[f32], stride: usize, t: usize, d: usize, out: &mut [u32]) {
        assert!(d.is_multiple_of(16) && values_fit(x, t, stride, d) && out.len() >= t * d / 2);
        for j in 0..t {
            for c in (0..d).step_by(16) {
                // SAFETY: j·stride + c + 16 ≤ (t − 1)·stride + d ≤ x.len(); j·d/2 + c/2 + 8 ≤
                // t·d/2 ≤ out.len().
                unsafe {
                    let v = _mm512_loadu_ps(x.as_ptr().add(j * stride + c));
                    _mm256_storeu_si256(out.as_mut_ptr().add(j * d / 2 + c / 2).cast(), bf16x16(v));
                }
            }
        }
    }

    /// Value rows `2p` and `2p + 1` interleaved: `out[p·d + c]` holds `v[2p][c]` (low half)
    /// and `v[2p + 1][c]` (high half, zero past the last row), for `p < ⌈t/2⌉`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW and BF16; `d` is a multiple of 16.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512bf16")]
    pub unsafe fn pack_value_pairs(v: &[f32], stride: usize, t: usize, d: usize, out: &mut [u32]) {
        assert!(d.is_multiple_of(16) && values_fit(v, t, stride, d) && out.len() >= t.div_ceil(2) * d);
        for p in 0..t.div_ceil(2) {
            for c in (0..d).step_by(16) {
                // SAFETY: rows 2p and 2p + 1 (when < t) lie inside v (values_fit); p·d + c + 16
                // ≤ ⌈t/2⌉·d ≤ out.len().
                unsafe {
                    let row = |j: usize| bf16x16(_mm512_loadu_ps(v.as_ptr().add(j * stride + c)));
                    let lo = _mm512_cvtepu16_epi32(row(2 * p));
                    let hi = if 2 * p + 1 < t {
                        _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(row(2 * p + 1)))
                    } else {
                        _mm512_setzero_si512()
                    };
                    _mm512_storeu_si512(out.as_mut_ptr().add(p * d + c).cast(), _mm512_or_si512(lo, hi));
                }
            }
        }
    }

    /// Four query rows against every key: scores from the key pairs `kp` (`d/2 × t16`),
    /// scaled, the masked softmax numerators in f32 (the AVX-512 kernel's), rounded to bf16
    /// pairs over the keys, then their products with the value pairs `vp` (`⌈t/2⌉ × d`),
    /// times the reciprocal of the unrounded numerators' sum.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW and BF16; `d` (each `q` and `out` row's length) is a
    /// multiple of 16, `t ≤ t16` (a multiple of 16), `qp` holds `4·d/2`, `p` `4·t16`, `pp`
    /// `4·t16/2`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512bf16")]
    pub unsafe fn attend_rows(
        q: [&[f32]; ROWS],
        kp: &[u32],
        vp: &[u32],
        mask: Option<&[f32]>,
        scale: f32,
        t: usize,
        t16: usize,
        qp: &mut [u32],
        p: &mut [f32],
        pp: &mut [u32],
        mut out: [&mut [f32]; ROWS],
    ) {
        let d = q[0].len();
        let (dp, t2, h16) = (d / 2, t.div_ceil(2), t16 / 2);
        assert!(d.is_multiple_of(16) && t <= t16 && t16.is_multiple_of(16));
        assert!(kp.len() >= dp * t16 && vp.len() >= t2 * d && qp.len() >= ROWS * dp);
        assert!(p.len() >= ROWS * t16 && pp.len() >= ROWS * h16 && mask.is_none_or(|m| m.len() >= t));
        assert!(q.iter().all(|r| r.len() == d) && out.iter().all(|r| r.len() == d));
        for r in 0..ROWS {
            // SAFETY: q[r] holds d floats and qp row r d/2 pairs (asserted).
            unsafe { pack_rows(q[r], d, 1, d, &mut qp[r * dp..(r + 1) * dp]) };
        }
        let sv = _mm512_set1_ps(scale);
        let mut jb = 0;
        while jb < t16 {
            if t16 - jb >= 64 {
                scores::<4>(qp, dp, kp, t16, jb, sv, p);
                jb += 64;
            } else {
                scores::<1>(qp, dp, kp, t16, jb, sv, p);
                jb += 16;
            }
        }
        let mut rows = p.chunks_mut(t16).map(|r| &mut r[..t]);
        let rows: [&mut [f32]; ROWS] = std::array::from_fn(|_| rows.next().expect("four score rows"));
        // SAFETY: AVX-512 F, AVX2 and FMA are enabled here; the mask holds t.
        let inv = unsafe { super::avx512::normalise_rows(rows, mask) };
        for r in 0..ROWS {
            let row = &mut p[r * t16..(r + 1) * t16];
            // The padding keys' numerators are zero, so an odd last pair weighs one key.
            row[t..].iter_mut().for_each(|e| *e = 0.0);
            for c in (0..2 * t2).step_by(16) {
                // SAFETY: c + 16 ≤ t16 (2·t2 ≤ t16, both even steps of 16 from 0), and pp row
                // r holds t16/2 pairs.
                unsafe {
                    let e = _mm512_loadu_ps(row.as_ptr().add(c));
                    _mm256_storeu_si256(pp.as_mut_ptr().add(r * h16 + c / 2).cast(), bf16x16(e));
                }
            }
        }
        let vecs = d / 16;
        let mut o = 0;
        while o < vecs {
            if vecs - o >= 2 {
                weighted::<2>(pp, h16, t2, vp, d, o, inv, &mut out);
                o += 2;
            } else {
                weighted::<1>(pp, h16, t2, vp, d, o, inv, &mut out);
                o += 1;
            }
        }
    }

    /// Scores of the rows against keys `jb .. jb + 16·NB`, scaled, into `p[r·t16 + j]`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512bf16")]
    #[inline]
    fn scores<const NB: usize>(qp: &[u32], dp: usize, kp: &[u32], t16: usize, jb: usize, sv: __m512, p: &mut [f32]) {
        assert!(jb + 16 * NB <= t16 && kp.len() >= dp * t16 && qp.len() >= ROWS * dp && p.len() >= ROWS * t16);
        let mut acc = [[_mm512_setzero_ps(); NB]; ROWS];
        for c in 0..dp {
            // SAFETY: r·dp + c < 4·dp ≤ qp.len().
            let qv: [__m512bh; ROWS] =
                std::array::from_fn(|r| pairs(_mm512_set1_epi32(unsafe { *qp.get_unchecked(r * dp + c) } as i32)));
            for b in 0..NB {
                // SAFETY: c·t16 + jb + 16b + 16 ≤ dp·t16 ≤ kp.len().
                let kv = pairs(unsafe { _mm512_loadu_si512(kp.as_ptr().add(c * t16 + jb + 16 * b).cast()) });
                for r in 0..ROWS {
                    acc[r][b] = _mm512_dpbf16_ps(acc[r][b], qv[r], kv);
                }
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            for (b, a) in ar.iter().enumerate() {
                // SAFETY: r·t16 + jb + 16b + 16 ≤ 4·t16 ≤ p.len().
                unsafe { _mm512_storeu_ps(p.as_mut_ptr().add(r * t16 + jb + 16 * b), _mm512_mul_ps(*a, sv)) };
            }
        }
    }

    /// Output registers `o .. o + NV` of the rows: `Σ_p pp[r][p]·vp[p]` over the key pairs,
    /// times `inv[r]`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512bf16")]
    #[inline]
    fn weighted<const NV: usize>(
        pp: &[u32],
        h16: usize,
        t2: usize,
        vp: &[u32],
        d: usize,
        o: usize,
        inv: [f32; ROWS],
        out: &mut [&mut [f32]; ROWS],
    ) {
        assert!(16 * (o + NV) <= d && vp.len() >= t2 * d && t2 <= h16 && pp.len() >= ROWS * h16);
        assert!(out.iter().all(|r| r.len() == d));
        let mut acc = [[_mm512_setzero_ps(); NV]; ROWS];
        for j in 0..t2 {
            // SAFETY: r·h16 + j < 4·h16 ≤ pp.len() (j < t2 ≤ h16).
            let w: [__m512bh; ROWS] =
                std::array::from_fn(|r| pairs(_mm512_set1_epi32(unsafe { *pp.get_unchecked(r * h16 + j) } as i32)));
            for x in 0..NV {
                // SAFETY: j·d + 16(o + x) + 16 ≤ t2·d ≤ vp.len().
                let vv = pairs(unsafe { _mm512_loadu_si512(vp.as_ptr().add(j * d + 16 * (o + x)).cast()) });
                for r in 0..ROWS {
                    acc[r][x] = _mm512_dpbf16_ps(acc[r][x], w[r], vv);
                }
            }
        }
        for r in 0..ROWS {
            for x in 0..NV {
                let v = _mm512_mul_ps(acc[r][x], _mm512_set1_ps(inv[r]));
                // SAFETY: 16(o + x) + 16 ≤ d = out[r].len().
                unsafe { _mm512_storeu_ps(out[r].as_mut_ptr().add(16 * (o + x)), v) };
            }
        }
    }
}

#[cfg(test)]
mod tests;
