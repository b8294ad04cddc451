//! W8A8: int8 weights with per-output-channel scales × activations quantized on the fly (per
//! token, per tensor or static, symmetric or with a zero point) → i32 accumulators, with a fused
//! epilogue `y = s_x·s_w·(acc − Z_x·Σ_k w) + b`.
//!
//! The integer sums are exact, so every SIMD level and every thread count gives the same bits;
//! against the reference (fake-quantized activations × dequantized weights in f32) the only
//! difference is the rounding of the float accumulation.

use candle_core::{DType, Tensor};
use pare_core_tensor::{ActQuant, ActRange, Error, Granularity, Mapping, PreparedOp, QuantizedTensor, Result};
use rayon::prelude::*;

use crate::simd::SimdLevel;

/// Weights repacked for the kernel: signed codes row-major `[n, k]`, scales, row sums.
#[derive(Debug)]
pub struct W8A8Linear {
    layer: String,
    n: usize,
    k: usize,
    w: Vec<i8>,
    panel: Panel,
    w_scale: Vec<f32>,
    w_sum: Vec<i32>,
    bias: Option<Vec<f32>>,
    act: ActQuant,
    level: SimdLevel,
    pool: std::sync::Arc<rayon::ThreadPool>,
}

/// Whether `q` is the weight format the W8A8 kernel takes: 8-bit signed symmetric linear codes
/// with one scale per output channel of a `[n, k]` matrix.
pub fn fits(q: &QuantizedTensor) -> bool {
    let s = q.scheme();
    s.bits == 8
        && s.signed
        && s.symmetric
        && s.mapping == Mapping::Linear
        && s.granularity == Granularity::PerChannel { axis: 0 }
        && q.shape().len() == 2
}

impl W8A8Linear {
    /// Repacks `q` (which must satisfy [`fits`]) for inputs quantized by `act` (8-bit).
    pub fn new(
        layer: &str,
        q: &QuantizedTensor,
        bias: Option<&Tensor>,
        act: &ActQuant,
        level: SimdLevel,
        pool: std::sync::Arc<rayon::ThreadPool>,
    ) -> Result<Self> {
        if !fits(q) || act.bits != 8 {
            return Err(Error::invalid(
                format!("W8A8 kernel for `{layer}`"),
                "expected int8 symmetric per-channel weights and 8-bit activations",
            ));
        }
        act.validate(layer)?;
        let (n, k) = (q.shape()[0], q.shape()[1]);
        let w: Vec<i8> = q.codes().iter().map(|&c| (i32::from(c) - 128) as i8).collect();
        let w_sum = w.chunks(k.max(1)).map(|r| r.iter().map(|&v| i32::from(v)).sum()).collect();
        let bias = bias.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
        if let Some(b) = &bias
            && b.len() != n
        {
            return Err(Error::Shape { name: format!("{layer}.bias"), expected: vec![n], found: vec![b.len()] });
        }
        if let Some(s) = &act.smooth
            && s.len() != k
        {
            return Err(Error::Shape {
                name: format!("{layer} smoothing factors"),
                expected: vec![k],
                found: vec![s.len()],
            });
        }
        let panel = Panel::pack(&w, n, k);
        Ok(Self {
            layer: layer.to_string(),
            n,
            k,
            panel,
            w,
            w_scale: q.scales().to_vec(),
            w_sum,
            bias,
            act: act.clone(),
            level,
            pool,
        })
    }

    /// `y[m, n]` for `x` row-major `[m, k]` (f32), computed at this op's SIMD level.
    pub fn run(&self, x: &[f32]) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let m = x.len() / k.max(1);
        // One range for the whole input needs the global extremes first (of the smoothed
        // values, as the reference quantizes them).
        let global = match self.act.range {
            ActRange::Static { scale, zero_point } => Some((scale, zero_point)),
            ActRange::Dynamic { per_token: false } => {
                let (lo, hi) = self.extremes(x);
                Some(self.act.scale_zero(lo, hi))
            }
            ActRange::Dynamic { per_token: true } if m <= 1 => {
                let (lo, hi) = self.extremes(x);
                Some(self.act.scale_zero(lo, hi))
            }
            ActRange::Dynamic { per_token: true } => None,
        };
        let mut y = vec![0f32; m * n];
        let level = self.level;
        // Each task owns ROWS whole output rows: the integer sums are exact and quantization
        // and the epilogue are per element, so the bits do not depend on the split.
        const ROWS: usize = 128;
        self.pool.install(|| {
            y.par_chunks_mut((ROWS * n).max(1)).enumerate().for_each(|(c, out)| {
                let r0 = c * ROWS;
                let rows = out.len() / n.max(1);
                let xs = &x[r0 * k..(r0 + rows) * k];
                let mut xq = vec![0i16; rows * k];
                let mut units = Vec::with_capacity(rows);
                for r in 0..rows {
                    let row = &xs[r * k..(r + 1) * k];
                    let unit = global.unwrap_or_else(|| {
                        let (lo, hi) = self.extremes(row);
                        self.act.scale_zero(lo, hi)
                    });
                    quantize_row(level, row, self.act.smooth.as_deref(), unit, &self.act, &mut xq[r * k..(r + 1) * k]);
                    units.push(unit);
                }
                let mut acc = vec![0i32; rows * n];
                gemm(level, &xq, rows, k, &self.w, &self.panel, &mut acc);
                for (r, &(sx, zx)) in units.iter().enumerate() {
                    for j in 0..n {
                        let a = acc[r * n + j] - zx * self.w_sum[j];
                        let mut val = a as f32 * (sx * self.w_scale[j]);
                        if let Some(b) = &self.bias {
                            val += b[j];
                        }
                        out[r * n + j] = val;
                    }
                }
            });
        });
        y
    }

    /// Minimum and maximum of `x` divided by the smoothing factors (if any).
    fn extremes(&self, x: &[f32]) -> (f32, f32) {
        let k = self.k.max(1);
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for (i, &v) in x.iter().enumerate() {
            let v = match &self.act.smooth {
                Some(s) => v / s[i % k],
                None => v,
            };
            lo = lo.min(v);
            hi = hi.max(v);
        }
        (lo, hi)
    }
}

/// Codes of one row, `clamp(round_half_even(x/s_k / S) + Z)`, exactly as
/// `ActQuant::quantize_slice` computes them.
fn quantize_row(
    level: SimdLevel,
    x: &[f32],
    smooth: Option<&[f32]>,
    (s, z): (f32, i32),
    act: &ActQuant,
    out: &mut [i16],
) {
    let (q_min, q_max) = (act.q_min(), act.q_max());
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if SimdLevel::detect() >= SimdLevel::Avx2 && smooth.is_none() => {
            // SAFETY: AVX2 was detected just above; out.len() == x.len().
            unsafe { avx2::quantize_row(x, s, z, q_min, q_max, out) }
        }
        _ => {
            for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
                let v = match smooth {
                    Some(f) => v / f[i],
                    None => v,
                };
                *o = ((v / s).round_ties_even() as i32).saturating_add(z).clamp(q_min, q_max) as i16;
            }
        }
    }
}

/// Weights packed for the AVX2 micro-kernel: blocks of 16 output columns; within a block, for
/// each pair of reduction indices `(2p, 2p+1)`, the 16 columns' two values side by side
/// (`[c0k0, c0k1, c1k0, c1k1, ...]`, 32 `i16`), zero-padded to whole blocks and pairs.
#[derive(Debug, Clone)]
pub struct Panel {
    data: Vec<i16>,
    pairs: usize,
    blocks: usize,
}

impl Panel {
    /// Packs row-major `[n, k]` int8 weights.
    pub fn pack(w: &[i8], n: usize, k: usize) -> Self {
        let (pairs, blocks) = (k.div_ceil(2), n.div_ceil(16));
        let mut data = vec![0i16; blocks * pairs * 32];
        for j in 0..n {
            let (b, c) = (j / 16, j % 16);
            for t in 0..k {
                data[(b * pairs + t / 2) * 32 + c * 2 + t % 2] = i16::from(w[j * k + t]);
            }
        }
        Self { data, pairs, blocks }
    }
}

/// `acc[r, j] = Σ_t x[r, t]·w[j, t]` for `m` rows of `x` (`[m, k]` codes) against the `n`
/// weight rows, at `level` (the scalar twin uses row-major `w`, AVX2 the packed `panel`).
pub fn gemm(level: SimdLevel, x: &[i16], m: usize, k: usize, w: &[i8], panel: &Panel, acc: &mut [i32]) {
    let n = acc.len() / m.max(1);
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if SimdLevel::detect() >= SimdLevel::Avx2 => {
            // SAFETY: AVX2 was detected on this CPU just above; shapes are consistent by
            // construction (x: m·k, panel packed from n×k, acc: m·n).
            unsafe { avx2::gemm(x, m, k, panel, n, acc) }
        }
        _ => {
            for r in 0..m {
                dot_rows_scalar(&x[r * k..(r + 1) * k], w, k, &mut acc[r * n..(r + 1) * n]);
            }
        }
    }
}

impl PreparedOp for W8A8Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = crate::linear::with_input(&self.layer, x, self.k, |v| self.run(v))?;
        crate::linear::output(x, y, self.n)
    }
}

/// `acc[j] = Σ_t x[t]·w[j·k + t]` for every weight row `j`: the scalar twin of [`gemm`]'s
/// SIMD paths, one row of `x` at a time.
pub fn dot_rows_scalar(x: &[i16], w: &[i8], k: usize, acc: &mut [i32]) {
    for (j, a) in acc.iter_mut().enumerate() {
        let row = &w[j * k..(j + 1) * k];
        *a = x.iter().zip(row).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Panel;

    /// 4 rows × 16 columns per step: for each reduction pair, two panel loads, four broadcasts
    /// of a row's two codes, eight `vpmaddwd` into eight i32 accumulators. Rows past a multiple
    /// of 4 run one at a time.
    ///
    /// # Safety
    /// The CPU must support AVX2; `x.len() == m·k`, `acc.len() == m·n`, `panel` packed from
    /// `n × k` weights.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemm(x: &[i16], m: usize, k: usize, panel: &Panel, n: usize, acc: &mut [i32]) {
        assert!(
            x.len() == m * k && acc.len() == m * n && panel.pairs == k.div_ceil(2) && panel.blocks == n.div_ceil(16)
        );
        // Row codes as i32 pairs (zero-padded), so one broadcast feeds a vpmaddwd.
        let pairs = panel.pairs;
        let xp: Vec<i32> = (0..m)
            .flat_map(|r| {
                (0..pairs).map(move |p| {
                    let lo = x[r * k + 2 * p] as u16 as u32;
                    let hi = if 2 * p + 1 < k { x[r * k + 2 * p + 1] as u16 as u32 } else { 0 };
                    (lo | hi << 16) as i32
                })
            })
            .collect();
        let mut tile = [0i32; 64];
        for b in 0..panel.blocks {
            let wb = &panel.data[b * pairs * 32..(b + 1) * pairs * 32];
            let cols = (n - b * 16).min(16);
            let mut r = 0;
            while r < m {
                let mr = if m - r >= 4 { 4 } else { 1 };
                let a: [[__m256i; 2]; 4] = if mr == 4 {
                    // SAFETY: AVX2 is enabled for this function and so for its callees.
                    micro::<4>(&xp[r * pairs..(r + 4) * pairs], pairs, wb)
                } else {
                    let one = micro::<1>(&xp[r * pairs..(r + 1) * pairs], pairs, wb);
                    [one[0], [_mm256_setzero_si256(); 2], [_mm256_setzero_si256(); 2], [_mm256_setzero_si256(); 2]]
                };
                for (i, ai) in a.iter().enumerate().take(mr) {
                    // SAFETY: tile has 64 = 4 rows × 16 lanes; i < 4.
                    unsafe {
                        _mm256_storeu_si256(tile.as_mut_ptr().add(i * 16) as *mut __m256i, ai[0]);
                        _mm256_storeu_si256(tile.as_mut_ptr().add(i * 16 + 8) as *mut __m256i, ai[1]);
                    }
                    acc[(r + i) * n + b * 16..(r + i) * n + b * 16 + cols]
                        .copy_from_slice(&tile[i * 16..i * 16 + cols]);
                }
                r += mr;
            }
        }
    }

    /// [`super::quantize_row`] eight lanes at a time: IEEE division, round-half-even
    /// (`vroundps` to nearest), the same integer clamp.
    ///
    /// # Safety
    /// The CPU must support AVX2; `out.len() == x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_row(x: &[f32], s: f32, z: i32, q_min: i32, q_max: i32, out: &mut [i16]) {
        assert!(out.len() == x.len());
        let body = x.len() - x.len() % 8;
        let (sv, zv) = (_mm256_set1_ps(s), _mm256_set1_epi32(z));
        let (lo, hi) = (_mm256_set1_epi32(q_min), _mm256_set1_epi32(q_max));
        let (flo, fhi) = (_mm256_set1_ps((q_min - z) as f32), _mm256_set1_ps((q_max - z) as f32));
        let mut lanes = [0i32; 8];
        let mut i = 0;
        while i < body {
            // SAFETY: i + 8 ≤ body ≤ x.len().
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_div_ps(v, sv));
            // Clamp in float first, so values past i32's range saturate as the scalar path's
            // `as i32` + clamp does (the bounds are integers, so in-range results are equal).
            let r = _mm256_min_ps(_mm256_max_ps(r, flo), fhi);
            let q = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(r), zv), lo), hi);
            // SAFETY: lanes holds 8 i32.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, q) };
            for (o, l) in out[i..i + 8].iter_mut().zip(lanes) {
                *o = l as i16;
            }
            i += 8;
        }
        for t in body..x.len() {
            out[t] = ((x[t] / s).round_ties_even() as i32).saturating_add(z).clamp(q_min, q_max) as i16;
        }
    }

    /// `MR` rows (codes as i32 pairs, `[MR, pairs]`) against one 16-column panel block: the
    /// accumulators are a fixed-size array, unrolled into registers.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn micro<const MR: usize>(xp: &[i32], pairs: usize, wb: &[i16]) -> [[__m256i; 2]; MR] {
        let mut a = [[_mm256_setzero_si256(); 2]; MR];
        assert!(xp.len() == MR * pairs && wb.len() == pairs * 32);
        for p in 0..pairs {
            // SAFETY: p·32 + 32 ≤ pairs·32 = wb.len() (asserted above).
            let w0 = unsafe { _mm256_loadu_si256(wb.as_ptr().add(p * 32) as *const __m256i) };
            let w1 = unsafe { _mm256_loadu_si256(wb.as_ptr().add(p * 32 + 16) as *const __m256i) };
            for (i, ai) in a.iter_mut().enumerate() {
                let xv = _mm256_set1_epi32(xp[i * pairs + p]);
                ai[0] = _mm256_add_epi32(ai[0], _mm256_madd_epi16(xv, w0));
                ai[1] = _mm256_add_epi32(ai[1], _mm256_madd_epi16(xv, w1));
            }
        }
        a
    }
}

#[cfg(test)]
mod tests;
