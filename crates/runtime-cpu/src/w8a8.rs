//! W8A8: int8 weights with per-output-channel scales × activations quantized on the fly (per
//! token, per tensor or static, symmetric or with a zero point) → i32 accumulators, with a fused
//! epilogue `y = s_x·s_w·(acc − Z_x·Σ_k w) + b`.
//!
//! The integer sums are exact, so every SIMD level and every thread count gives the same bits;
//! against the reference (fake-quantized activations × dequantized weights in f32) the only
//! difference is the rounding of the float accumulation.

use candle_core::Tensor;
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
        let bias = crate::linear::bias_values(layer, bias, n)?;
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
                // Codes centred to fit i8 (see `code_offset`).
                let mut xq = vec![0i8; rows * k];
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
                let offset = code_offset(&self.act);
                let mut acc = vec![0i32; rows * n];
                gemm(level, &xq, rows, k, &self.w, &self.panel, &mut acc);
                let zeros;
                let bias = match &self.bias {
                    Some(b) => b.as_slice(),
                    None => {
                        zeros = vec![0f32; n];
                        &zeros
                    }
                };
                for (r, &(sx, zx)) in units.iter().enumerate() {
                    let zx = zx - offset;
                    let (a, o) = (&acc[r * n..(r + 1) * n], &mut out[r * n..(r + 1) * n]);
                    for ((((o, &a), &ws), &sc), &b) in o.iter_mut().zip(a).zip(&self.w_sum).zip(&self.w_scale).zip(bias)
                    {
                        *o = (a - zx * ws) as f32 * (sx * sc) + b;
                    }
                }
            });
        });
        y
    }

    /// Minimum and maximum of `x` divided by the smoothing factors (if any).
    fn extremes(&self, x: &[f32]) -> (f32, f32) {
        #[cfg(target_arch = "x86_64")]
        if self.act.smooth.is_none() && self.level == SimdLevel::Avx2 && SimdLevel::detect() >= SimdLevel::Avx2 {
            // SAFETY: AVX2 was detected just above. Min and max are exact, so the lanes give
            // the scalar loop's answer for the finite inputs `forward` admits.
            return unsafe { avx2::extremes(x) };
        }
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

/// Codes of one row, `clamp(round_half_even(x/s_k / S) + Z)` exactly as
/// `ActQuant::quantize_slice` computes them, stored centred to i8 ([`code_offset`]).
fn quantize_row(
    level: SimdLevel,
    x: &[f32],
    smooth: Option<&[f32]>,
    (s, z): (f32, i32),
    act: &ActQuant,
    out: &mut [i8],
) {
    let (q_min, q_max) = (act.q_min(), act.q_max());
    let offset = code_offset(act);
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if SimdLevel::detect() >= SimdLevel::Avx2 && smooth.is_none() => {
            // SAFETY: AVX2 was detected just above; out.len() == x.len().
            unsafe { avx2::quantize_row(x, s, z, (q_min, q_max), offset, out) }
        }
        _ => {
            for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
                let v = match smooth {
                    Some(f) => v / f[i],
                    None => v,
                };
                *o = (((v / s).round_ties_even() as i32).saturating_add(z).clamp(q_min, q_max) - offset) as i8;
            }
        }
    }
}

/// What 8-bit codes are shifted by to fit i8 (unsigned codes `q` become `q − 128`; the zero
/// point moves with them).
fn code_offset(act: &ActQuant) -> i32 {
    if act.symmetric { 0 } else { 128 }
}

/// Weights packed for the AVX2 micro-kernel: blocks of 8 output columns; within a block, for
/// each quad of reduction indices `4q .. 4q+4`, each column's four codes side by side (32
/// bytes, one `vpmaddubsw` operand), zero-padded to whole blocks and quads. Codes of −128 are
/// stored as −127 (so `vpsignb` can negate them) and listed in `low`, whose exact products
/// the kernel adds back.
#[derive(Debug, Clone)]
pub struct Panel {
    data: Vec<i8>,
    quads: usize,
    blocks: usize,
    /// The `(column, reduction index)` of every weight code −128.
    low: Vec<(u32, u32)>,
    /// The codes transposed, `[k][n]`, for the correction of input codes −128.
    wt: Vec<i8>,
}

impl Panel {
    /// Packs row-major `[n, k]` int8 weights.
    pub fn pack(w: &[i8], n: usize, k: usize) -> Self {
        let (quads, blocks) = (k.div_ceil(4), n.div_ceil(8));
        let mut data = vec![0i8; blocks * quads * 32];
        let mut low = Vec::new();
        let mut wt = vec![0i8; k * n];
        for j in 0..n {
            let (b, c) = (j / 8, j % 8);
            for t in 0..k {
                let v = w[j * k + t];
                if v == i8::MIN {
                    low.push((j as u32, t as u32));
                }
                data[(b * quads + t / 4) * 32 + c * 4 + t % 4] = v.max(-127);
                wt[t * n + j] = v;
            }
        }
        Self { data, quads, blocks, low, wt }
    }
}

/// `acc[r, j] = Σ_t x[r, t]·w[j, t]` for `m` rows of centred codes `x` (`[m, k]`) against the
/// `n` weight rows, exactly, at `level` (the scalar twin uses row-major `w`, AVX2 the packed
/// `panel`).
pub fn gemm(level: SimdLevel, x: &[i8], m: usize, k: usize, w: &[i8], panel: &Panel, acc: &mut [i32]) {
    let n = acc.len() / m.max(1);
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if SimdLevel::detect() >= SimdLevel::Avx2 => {
            // SAFETY: AVX2 was detected on this CPU just above; shapes are consistent by
            // construction (x: m·k, panel packed from n×k, acc: m·n).
            unsafe { avx2::gemm(x, m, k, panel, n, acc) };
            // The products the kernel took with −128 clamped to −127, made exact. An input code
            // −128 against weight w: −128·w − (−127)·max(w, −127). A weight code −128 against an
            // input x ≠ −128: x·(−128) − x·(−127) = −x.
            for r in 0..m {
                let xr = &x[r * k..(r + 1) * k];
                let row = &mut acc[r * n..(r + 1) * n];
                for (t, _) in xr.iter().enumerate().filter(|(_, v)| **v == i8::MIN) {
                    for (a, &wv) in row.iter_mut().zip(&panel.wt[t * n..(t + 1) * n]) {
                        *a += -128 * i32::from(wv) + 127 * i32::from(wv.max(-127));
                    }
                }
                for &(j, t) in &panel.low {
                    let xv = xr[t as usize];
                    if xv != i8::MIN {
                        row[j as usize] -= i32::from(xv);
                    }
                }
            }
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
pub fn dot_rows_scalar(x: &[i8], w: &[i8], k: usize, acc: &mut [i32]) {
    for (j, a) in acc.iter_mut().enumerate() {
        let row = &w[j * k..(j + 1) * k];
        *a = x.iter().zip(row).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Panel;

    /// 4 rows × 16 columns per step: for each quad of reduction indices, two panel loads;
    /// per row one broadcast of its four codes and their absolute values; per row and block of
    /// 8 columns `vpsignb` (the weights take the codes' signs), `vpmaddubsw` (|x|·±w pairs,
    /// exact as both are within ±127), `vpmaddwd` by ones and an add into i32. Rows past a
    /// multiple of 4 run one at a time, a last odd block of 8 columns alone.
    ///
    /// # Safety
    /// The CPU must support AVX2; `x.len() == m·k`, `acc.len() == m·n`, `panel` packed from
    /// `n × k` weights.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemm(x: &[i8], m: usize, k: usize, panel: &Panel, n: usize, acc: &mut [i32]) {
        assert!(
            x.len() == m * k && acc.len() == m * n && panel.quads == k.div_ceil(4) && panel.blocks == n.div_ceil(8)
        );
        // Row codes as i32 quads (zero-padded, −128 clamped), one broadcast per step.
        let quads = panel.quads;
        let xq: Vec<i32> = (0..m)
            .flat_map(|r| {
                (0..quads).map(move |q| {
                    let mut b = [0u8; 4];
                    for (i, v) in b.iter_mut().enumerate() {
                        if 4 * q + i < k {
                            *v = x[r * k + 4 * q + i].max(-127) as u8;
                        }
                    }
                    i32::from_le_bytes(b)
                })
            })
            .collect();
        let mut tile = [0i32; 64];
        let mut b = 0;
        while b < panel.blocks {
            let nb = (panel.blocks - b).min(2);
            let wb = &panel.data[b * quads * 32..(b + nb) * quads * 32];
            let cols = (n - b * 8).min(8 * nb);
            let mut r = 0;
            while r < m {
                let mr = if m - r >= 4 { 4 } else { 1 };
                let xs = &xq[r * quads..(r + mr) * quads];
                let a: [[__m256i; 2]; 4] = match (mr, nb) {
                    (4, 2) => micro::<4, 2>(xs, quads, wb),
                    (4, _) => pad(micro::<4, 1>(xs, quads, wb)),
                    (_, 2) => pad(micro::<1, 2>(xs, quads, wb)),
                    _ => pad(micro::<1, 1>(xs, quads, wb)),
                };
                for (i, ai) in a.iter().enumerate().take(mr) {
                    // SAFETY: tile has 64 = 4 rows × 16 lanes; i < 4.
                    unsafe {
                        _mm256_storeu_si256(tile.as_mut_ptr().add(i * 16) as *mut __m256i, ai[0]);
                        _mm256_storeu_si256(tile.as_mut_ptr().add(i * 16 + 8) as *mut __m256i, ai[1]);
                    }
                    acc[(r + i) * n + b * 8..(r + i) * n + b * 8 + cols].copy_from_slice(&tile[i * 16..i * 16 + cols]);
                }
                r += mr;
            }
            b += nb;
        }
    }

    /// A smaller micro-kernel result widened to 4 rows × 2 blocks (zeros elsewhere).
    fn pad<const MR: usize, const NB: usize>(a: [[__m256i; NB]; MR]) -> [[__m256i; 2]; 4] {
        // SAFETY: an all-zero bit pattern is a valid __m256i.
        let mut out = [[unsafe { std::mem::zeroed::<__m256i>() }; 2]; 4];
        for (o, ai) in out.iter_mut().zip(a) {
            o[..NB].copy_from_slice(&ai);
        }
        out
    }

    /// Minimum and maximum of `x`, eight lanes at a time.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn extremes(x: &[f32]) -> (f32, f32) {
        let body = x.len() / 8 * 8;
        let (mut lo, mut hi) = (_mm256_set1_ps(f32::INFINITY), _mm256_set1_ps(f32::NEG_INFINITY));
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 ≤ body ≤ x.len().
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            lo = _mm256_min_ps(lo, v);
            hi = _mm256_max_ps(hi, v);
        }
        let (mut l, mut h) = ([0f32; 8], [0f32; 8]);
        // SAFETY: both arrays hold 8 floats.
        unsafe {
            _mm256_storeu_ps(l.as_mut_ptr(), lo);
            _mm256_storeu_ps(h.as_mut_ptr(), hi);
        }
        let lo = l.iter().chain(&x[body..]).copied().fold(f32::INFINITY, f32::min);
        let hi = h.iter().chain(&x[body..]).copied().fold(f32::NEG_INFINITY, f32::max);
        (lo, hi)
    }

    /// [`super::quantize_row`] eight lanes at a time: IEEE division, round-half-even
    /// (`vroundps` to nearest), the same integer clamp.
    ///
    /// # Safety
    /// The CPU must support AVX2; `out.len() == x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_row(x: &[f32], s: f32, z: i32, (q_min, q_max): (i32, i32), offset: i32, out: &mut [i8]) {
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
                *o = (l - offset) as i8;
            }
            i += 8;
        }
        for t in body..x.len() {
            out[t] = (((x[t] / s).round_ties_even() as i32).saturating_add(z).clamp(q_min, q_max) - offset) as i8;
        }
    }

    /// `MR` rows (codes as i32 quads, `[MR, quads]`) against `NB` blocks of 8 columns: the
    /// accumulators are a fixed-size array, unrolled into registers.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn micro<const MR: usize, const NB: usize>(xq: &[i32], quads: usize, wb: &[i8]) -> [[__m256i; NB]; MR] {
        let mut a = [[_mm256_setzero_si256(); NB]; MR];
        assert!(xq.len() == MR * quads && wb.len() == NB * quads * 32);
        let ones = _mm256_set1_epi16(1);
        for q in 0..quads {
            // SAFETY: (b·quads + q)·32 + 32 ≤ NB·quads·32 = wb.len() (asserted above).
            let w: [__m256i; NB] = std::array::from_fn(|b| unsafe {
                _mm256_loadu_si256(wb.as_ptr().add((b * quads + q) * 32) as *const __m256i)
            });
            for (i, ai) in a.iter_mut().enumerate() {
                let xv = _mm256_set1_epi32(xq[i * quads + q]);
                let ax = _mm256_sign_epi8(xv, xv);
                for (acc, wv) in ai.iter_mut().zip(&w) {
                    let p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(*wv, xv));
                    *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(p, ones));
                }
            }
        }
        a
    }
}

#[cfg(test)]
mod tests;
