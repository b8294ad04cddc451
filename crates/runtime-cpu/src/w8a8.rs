//! W8A8: int8 weights with per-output-channel scales × activations quantized on the fly (per
//! token, per tensor or static, symmetric or with a zero point) → i32 accumulators, with a fused
//! epilogue `y = s_x·s_w·(acc − Z_x·Σ_k w) + b`.
//!
//! The integer sums are exact, so every SIMD level and every thread count gives the same bits;
//! against the reference (fake-quantized activations × dequantized weights in f32) the only
//! difference is the rounding of the float accumulation.

use candle_core::{DType, Tensor};
use pare_core_tensor::{ActQuant, Error, Granularity, Mapping, PreparedOp, QuantizedTensor, Result};
use rayon::prelude::*;

use crate::simd::SimdLevel;

/// Weights repacked for the kernel: signed codes row-major `[n, k]`, scales, row sums.
#[derive(Debug)]
pub struct W8A8Linear {
    layer: String,
    n: usize,
    k: usize,
    w: Vec<i8>,
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
        Ok(Self {
            layer: layer.to_string(),
            n,
            k,
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
        let mut v = x.to_vec();
        if let Some(s) = &self.act.smooth {
            v.iter_mut().enumerate().for_each(|(i, x)| *x /= s[i % k]);
        }
        let (codes, units) = self.act.quantize_slice(&v, k);
        let xq: Vec<i16> = codes.iter().map(|&c| c as i16).collect();
        let per_row = units.len() > 1;
        let mut y = vec![0f32; m * n];
        let level = self.level;
        self.pool.install(|| {
            y.par_chunks_mut(n.max(1)).enumerate().for_each(|(r, out)| {
                let (sx, zx) = units[if per_row { r } else { 0 }];
                let xr = &xq[r * k..(r + 1) * k];
                let mut acc = vec![0i32; n];
                dot_rows(level, xr, &self.w, k, &mut acc);
                for j in 0..n {
                    let a = acc[j] - zx * self.w_sum[j];
                    let mut val = a as f32 * (sx * self.w_scale[j]);
                    if let Some(b) = &self.bias {
                        val += b[j];
                    }
                    out[j] = val;
                }
            });
        });
        y
    }
}

impl PreparedOp for W8A8Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.last() != Some(&self.k) {
            return Err(Error::Shape {
                name: format!("input of `{}`", self.layer),
                expected: vec![self.k],
                found: dims.last().map(|d| vec![*d]).unwrap_or_default(),
            });
        }
        let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(i) = v.iter().position(|f| !f.is_finite()) {
            return Err(Error::NonFinite {
                name: format!("input of `{}`", self.layer),
                count: v.iter().filter(|f| !f.is_finite()).count(),
                first: i,
            });
        }
        let y = self.run(&v);
        let mut out = dims;
        *out.last_mut().expect("rank ≥ 1") = self.n;
        Ok(Tensor::from_vec(y, out, x.device())?.to_dtype(x.dtype())?)
    }
}

/// `acc[j] = Σ_k x[k]·w[j·k..]` for every weight row `j`.
pub fn dot_rows(level: SimdLevel, x: &[i16], w: &[i8], k: usize, acc: &mut [i32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if SimdLevel::detect() >= SimdLevel::Avx2 => {
            // SAFETY: AVX2 and FMA were detected on this CPU just above.
            unsafe { avx2::dot_rows(x, w, k, acc) }
        }
        _ => dot_rows_scalar(x, w, k, acc),
    }
}

/// The scalar twin of every SIMD `dot_rows`.
pub fn dot_rows_scalar(x: &[i16], w: &[i8], k: usize, acc: &mut [i32]) {
    for (j, a) in acc.iter_mut().enumerate() {
        let row = &w[j * k..(j + 1) * k];
        *a = x.iter().zip(row).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Four weight rows at a time: each 16-element step loads 16 activations (i16) once and
    /// 16 int8 weights of each row, widens them in registers and multiply-adds pairs into i32
    /// lanes (`vpmaddwd`); tails that are not multiples of 16 run scalar.
    ///
    /// # Safety
    /// The CPU must support AVX2. `x.len() == k`, `w.len() ≥ acc.len()·k`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows(x: &[i16], w: &[i8], k: usize, acc: &mut [i32]) {
        let n = acc.len();
        assert!(x.len() == k && w.len() >= n * k, "dot_rows: x has {} of {k}, w {} of {}", x.len(), w.len(), n * k);
        let body = k - k % 16;
        let mut j = 0;
        while j + 4 <= n {
            let mut s = [_mm256_setzero_si256(); 4];
            let mut i = 0;
            while i < body {
                // SAFETY: i + 16 ≤ body ≤ k = x.len(); row (j + r)·k + i + 16 ≤ n·k ≤ w.len().
                let xv = unsafe { _mm256_loadu_si256(x.as_ptr().add(i) as *const __m256i) };
                for (r, sr) in s.iter_mut().enumerate() {
                    let wp = unsafe { w.as_ptr().add((j + r) * k + i) } as *const __m128i;
                    let wv = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(wp) });
                    *sr = _mm256_add_epi32(*sr, _mm256_madd_epi16(xv, wv));
                }
                i += 16;
            }
            for (r, sr) in s.iter().enumerate() {
                let tail: i32 = (body..k).map(|t| i32::from(x[t]) * i32::from(w[(j + r) * k + t])).sum();
                acc[j + r] = hsum(*sr) + tail;
            }
            j += 4;
        }
        while j < n {
            let mut sr = _mm256_setzero_si256();
            let mut i = 0;
            while i < body {
                // SAFETY: as above.
                let xv = unsafe { _mm256_loadu_si256(x.as_ptr().add(i) as *const __m256i) };
                let wv = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(w.as_ptr().add(j * k + i) as *const __m128i) });
                sr = _mm256_add_epi32(sr, _mm256_madd_epi16(xv, wv));
                i += 16;
            }
            let tail: i32 = (body..k).map(|t| i32::from(x[t]) * i32::from(w[j * k + t])).sum();
            acc[j] = hsum(sr) + tail;
            j += 1;
        }
    }

    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256i) -> i32 {
        let lo = _mm256_castsi256_si128(v);
        let hi = _mm256_extracti128_si256(v, 1);
        let s = _mm_add_epi32(lo, hi);
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }
}

#[cfg(test)]
mod tests;
