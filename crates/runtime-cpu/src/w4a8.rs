//! W4A8: weight-only linear codes of at most 4 bits (per-tensor, per-channel or per-group scales,
//! symmetric or with zero points) × activations quantized on the fly by the layer's
//! [`ActQuant`] (8-bit or narrower codes, per token, per tensor or static) — what candle's
//! `QMatMul` and llama.cpp do with `Q4_0 × Q8_0`, here with the layer's own activation spec
//! and its reference semantics `y = Q(x)·Ŵᵀ + b`.
//!
//! For at most [`INTEGER_MAX_ROWS`] rows the products are exact integers: with weight codes
//! `c`, offsets `e` (`Ŵ = S·(c − e)`), centred activation codes `a` and `z'` (the row's zero
//! point in the same centring, 0 when symmetric),
//!
//! ```text
//! Σ_{p∈g} (c − e)(a − z') = D − z'·C − e·(A − z'·|g|),   D = Σ c·a,  C = Σ c,  A = Σ a,
//! y = s_x · Σ_g S_g · t_g + b,   t_g = fma(−e, f32(A − z'·|g|), f32(D − z'·C)),
//! ```
//!
//! the group sums folded in group order by fused multiply-adds. On AVX2, `D` comes from
//! `vpmaddubsw` (the 4-bit codes are the unsigned operand, the 8-bit activation codes the
//! signed one) over four reduction indices per 32-bit lane, summed in i16 for up to eight
//! steps and widened by `vpmaddwd`: about a third of the vector operations per weight of the
//! float kernel ([`crate::wq`]), which must turn every code into a float. NEON sums with
//! `smlal`. The integer sums are exact and the float epilogue is the same sequence of
//! operations at every level, so every SIMD level and every thread count gives the same bits.
//! The weights stay in [`QuantPanels`]' nibble layout (no second copy); the AVX2 kernel
//! rearranges four indices' 32 bytes in registers.
//!
//! More rows (where pare's float GEMM is faster), or a group size that is not a multiple of
//! four, run the float kernels on the fake-quantized input `s_x·(a − z')` instead (the same
//! semantics, rounded as the float GEMM rounds).

use std::sync::Arc;

use candle_core::Tensor;
use pare_core_tensor::{ActQuant, ActRange, Activation, Error, Mapping, PreparedOp, QuantizedTensor, Result};
use rayon::prelude::*;

use crate::gemm::{MR, NR};
use crate::nonlinear::Act;
use crate::simd::SimdLevel;
use crate::wq::QuantPanels;

/// Whether `q` is a weight the W4A8 op takes: what [`crate::wq::fits`] takes, with linear codes
/// of at most 4 bits.
pub fn fits(q: &QuantizedTensor) -> bool {
    let s = q.scheme();
    crate::wq::fits(q) && s.mapping == Mapping::Linear && s.bits <= 4
}

/// The most rows the integer kernel takes; more run the float kernels on the fake-quantized
/// input. Measured crossover (2 threads, Zen 3; integer against float time, 4-bit groups of
/// 32 at MiniLM's FFN shapes and 4096 × 4096): 1.8–2.2× faster at 8 rows, 1.3–1.8× at 12,
/// 1.1–1.5× at 16, 0.9–1.3× at 24, 0.6–1.1× from 64 rows on, where the float GEMM's 6 × 16
/// FMA tiles win over six rows of `vpmaddubsw` + `vpmaddwd` per step.
pub const INTEGER_MAX_ROWS: usize = 16;

/// The longest reduction the integer kernel takes: `|D| ≤ k·15·128` stays within i32.
const MAX_K: usize = 1 << 20;

/// A linear layer with 4-bit (or narrower) weights and quantized inputs.
#[derive(Debug)]
pub struct W4A8Linear {
    layer: String,
    w: QuantPanels,
    /// `C = Σ c` per panel, group and column (`[panel][group][NR]`), kept only when the input's
    /// codes have a zero point (asymmetric activations).
    csum: Vec<i32>,
    /// Whether the integer kernel takes this layout: one group, or groups of a multiple of four
    /// indices (so four consecutive indices never straddle two), and `k ≤ MAX_K`.
    integer: bool,
    bias: Option<Vec<f32>>,
    act: ActQuant,
    level: SimdLevel,
    pool: Arc<rayon::ThreadPool>,
}

/// The per-row values a kernel call needs for its rows (a chunk of a [`Rows`]).
#[derive(Clone, Copy)]
struct RowVals<'a> {
    /// `f32(A − z'·|g|)` per row and group.
    e2: &'a [f32],
    /// `z'` per row.
    zp: &'a [i32],
}

/// One call's rows quantized for the integer kernel.
struct Rows {
    /// Centred codes `a` (`[row][k4]`, zero past `k`).
    codes: Vec<i8>,
    k4: usize,
    /// `f32(A − z'·|g|)` per row and group.
    e2: Vec<f32>,
    /// `z'` per row.
    zp: Vec<i32>,
    /// `s_x` per row.
    scale: Vec<f32>,
}

impl W4A8Linear {
    /// Repacks `q` (which must satisfy [`fits`]) for inputs quantized by `act`.
    pub fn new(
        layer: &str,
        q: &QuantizedTensor,
        bias: Option<&Tensor>,
        act: &ActQuant,
        level: SimdLevel,
        pool: Arc<rayon::ThreadPool>,
    ) -> Result<Self> {
        if !fits(q) {
            return Err(Error::invalid(
                format!("W4A8 kernel for `{layer}`"),
                format!("expected 2-D linear weight codes of at most 4 bits, found {:?}", q.scheme()),
            ));
        }
        act.validate(layer)?;
        let w = QuantPanels::pack(q);
        if let Some(s) = &act.smooth
            && s.len() != w.k
        {
            return Err(Error::Shape {
                name: format!("{layer} smoothing factors"),
                expected: vec![w.k],
                found: vec![s.len()],
            });
        }
        let bias = crate::linear::bias_values(layer, bias, w.n)?;
        let integer = (w.groups == 1 || w.group.is_multiple_of(4)) && w.k <= MAX_K;
        let csum = if integer && !act.symmetric { column_sums(&w) } else { Vec::new() };
        Ok(Self { layer: layer.to_string(), w, csum, integer, bias, act: act.clone(), level, pool })
    }

    /// Quantizes the rows of `x` (`m` rows of `k`): the codes centred to i8, each row's scale
    /// and `z'`, and per group `A − z'·|g|`; `None` when a row's own range met a value that is
    /// not finite.
    fn quantize(&self, x: &[f32], m: usize) -> Option<Rows> {
        let (k, groups, group) = (self.w.k, self.w.groups, self.w.group);
        let k4 = k.div_ceil(4) * 4;
        let offset = crate::w8a8::code_offset(&self.act);
        let global = crate::w8a8::global_range(self.level, &self.act, k, x, m);
        let bounded = !matches!(self.act.range, ActRange::Static { .. });
        let mut rows = Rows {
            codes: vec![0i8; m * k4],
            k4,
            e2: Vec::with_capacity(m * groups),
            zp: Vec::with_capacity(m),
            scale: Vec::with_capacity(m),
        };
        let mut buf = vec![0i16; k];
        for (r, row) in x.chunks_exact(k.max(1)).take(m).enumerate() {
            let (s, z) = self.row_range(global, row)?;
            crate::w8a8::quantize_row(
                self.level,
                row,
                self.act.smooth.as_deref(),
                (s, z),
                &self.act,
                &mut buf,
                bounded,
            );
            let zp = z - offset;
            let dst = &mut rows.codes[r * k4..r * k4 + k];
            for (d, &c) in dst.iter_mut().zip(&buf) {
                // Centred codes lie in −128..=127 (`code_offset`).
                *d = c as i8;
            }
            for g in 0..groups {
                let (g0, g1) = (g * group, ((g + 1) * group).min(k));
                let a: i32 = buf[g0..g1].iter().map(|&c| i32::from(c)).sum();
                rows.e2.push((a - zp * (g1 - g0) as i32) as f32);
            }
            rows.zp.push(zp);
            rows.scale.push(s);
        }
        Some(rows)
    }

    /// A row's scale and zero point: the input's own range when it has one (static, per
    /// tensor, or a single row), else the row's; `None` when the row's range met a value that
    /// is not finite.
    fn row_range(&self, global: Option<(f32, i32)>, row: &[f32]) -> Option<(f32, i32)> {
        if global.is_some() {
            return global;
        }
        let (lo, hi, finite) = crate::w8a8::extremes(self.level, &self.act, self.w.k, row);
        finite.then(|| self.act.scale_zero(lo, hi))
    }

    /// The input as the reference quantizes and dequantizes it, `s_x·(q − Z)`, rows in
    /// parallel on the pool (for the float kernels); `None` when a row's own range met a value
    /// that is not finite.
    fn fake_quantized(&self, x: &[f32], m: usize) -> Option<Vec<f32>> {
        let k = self.w.k;
        if k == 0 {
            return Some(Vec::new());
        }
        let offset = crate::w8a8::code_offset(&self.act);
        let global = crate::w8a8::global_range(self.level, &self.act, k, x, m);
        let bounded = !matches!(self.act.range, ActRange::Static { .. });
        let level = self.level;
        let finite = std::sync::atomic::AtomicBool::new(true);
        // Not zeroed first: every row is written below (zeroing was 2% of a W4A8 MiniLM).
        let mut xq: Vec<f32> = Vec::with_capacity(m * k);
        self.pool.install(|| {
            x.par_chunks(k).zip(xq.spare_capacity_mut()[..m * k].par_chunks_mut(k)).with_min_len(8).for_each_init(
                || vec![0i16; k],
                |buf, (row, dst)| {
                    let Some((s, z)) = self.row_range(global, row) else {
                        // The whole input is refused; the row's values are never read.
                        finite.store(false, std::sync::atomic::Ordering::Relaxed);
                        return;
                    };
                    let smooth = self.act.smooth.as_deref();
                    crate::w8a8::quantize_row(level, row, smooth, (s, z), &self.act, buf, bounded);
                    for (d, &c) in dst.iter_mut().zip(buf.iter()) {
                        d.write(s * (i32::from(c) + offset - z) as f32);
                    }
                },
            )
        });
        // SAFETY: the m rows of k values were all written above.
        unsafe { xq.set_len(m * k) };
        finite.into_inner().then_some(xq)
    }

    /// Whether [`W4A8Linear::run`] screens an `m`-row input for NaN and infinities itself:
    /// per-token ranges look at every value of every row on the pass that takes them.
    fn screens(&self, m: usize) -> bool {
        matches!(self.act.range, ActRange::Dynamic { per_token: true }) && m > 1 && self.w.n > 0 && self.w.k > 0
    }

    /// `y[m, n]` for `x` row-major `[m, k]`, then `act` if any; `None` when a per-token range
    /// met a value that is not finite (other inputs must be checked beforehand, see
    /// `screens`).
    pub fn run(&self, x: &[f32], act: Option<Act>) -> Option<Vec<f32>> {
        let (n, k) = (self.w.n, self.w.k);
        let m = x.len() / k.max(1);
        if m == 0 || n == 0 {
            return Some(vec![0f32; m * n]);
        }
        if self.integer && m <= INTEGER_MAX_ROWS && k > 0 {
            let mut y = self.integer_rows(&self.quantize(x, m)?, m);
            if let Some(act) = act {
                crate::nonlinear::activation_in_place(self.level, act, &mut y);
            }
            return Some(y);
        }
        let xq = self.fake_quantized(x, m)?;
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        // SAFETY: y has capacity for the m·n outputs, which the GEMM writes in full (each
        // task activating its tile once final) before the length is set; nothing else holds
        // the buffer.
        unsafe {
            crate::gemm::gemm_raw(self.level, &self.pool, &xq, m, &self.w, self.bias.as_deref(), y.as_mut_ptr(), act);
            y.set_len(m * n);
        }
        Some(y)
    }

    /// The integer kernel (at most [`INTEGER_MAX_ROWS`] rows): ranges of panels split over the
    /// pool, each panel multiplied by the rows [`MR`] at a time while it stays in L1.
    fn integer_rows(&self, rows: &Rows, m: usize) -> Vec<f32> {
        let (n, groups) = (self.w.n, self.w.groups);
        let panels = n.div_ceil(NR);
        let (col_tiles, per) = crate::gemm::column_split(&self.pool, 1, panels);
        let xs: Vec<&[i8]> = rows.codes.chunks_exact(rows.k4).collect();
        let mut y = vec![0f32; m * n];
        let out = crate::gemm::OutPtr(y.as_mut_ptr());
        self.pool.install(|| {
            (0..col_tiles).into_par_iter().for_each(|tj| {
                let (p0, p1) = (tj * per, ((tj + 1) * per).min(panels));
                let mut acc = [[0f32; NR]; MR];
                for jb in p0..p1 {
                    let cols = NR.min(n - jb * NR);
                    for c0 in (0..m).step_by(MR) {
                        let c1 = (c0 + MR).min(m);
                        let acc = &mut acc[..c1 - c0];
                        acc.iter_mut().for_each(|a| *a = [0.0; NR]);
                        let vals = RowVals { e2: &rows.e2[c0 * groups..c1 * groups], zp: &rows.zp[c0..c1] };
                        self.panel_rows(jb, &xs[c0..c1], vals, acc);
                        for (r, a) in (c0..c1).zip(acc.iter()) {
                            for (c, &v) in a.iter().enumerate().take(cols) {
                                let j = jb * NR + c;
                                let b = self.bias.as_ref().map_or(0.0, |b| b[j]);
                                // SAFETY: row r < m, column j < n of this task's panels
                                // p0..p1 (the ranges partition the columns), inside y, which
                                // outlives the pool scope.
                                unsafe { *out.get().add(r * n + j) = rows.scale[r].mul_add(v, b) };
                            }
                        }
                    }
                }
            })
        });
        y
    }

    /// `Σ_g S_g·t_g` (see the module documentation) of panel `jb` for every row, into `out`.
    fn panel_rows(&self, jb: usize, xs: &[&[i8]], rows: RowVals<'_>, out: &mut [[f32; NR]]) {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            l if l.avx2() => {
                // SAFETY: AVX2 was detected (the level is one this CPU has); the rows hold k4
                // codes each and the e2 / zp values of every row (built by `quantize`).
                unsafe { avx2::panel_rows(self, jb, xs, rows, out) }
            }
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon if SimdLevel::detect() == SimdLevel::Neon => {
                let w = &self.w;
                let mut d = vec![[0i32; NR]; xs.len()];
                for g in 0..w.groups {
                    let (g0, g1) = (g * w.group, ((g + 1) * w.group).min(w.k));
                    // SAFETY: NEON was detected just above; g1 ≤ k and the rows hold k4 ≥ k
                    // codes.
                    unsafe { neon::group_dots(w, jb, g0, g1, xs, &mut d) };
                    self.epilogue(jb, g, rows, &d, out);
                }
            }
            _ => self.panel_rows_scalar(jb, xs, rows, out),
        }
    }

    /// The scalar twin: exact integer sums per group, then the float epilogue.
    fn panel_rows_scalar(&self, jb: usize, xs: &[&[i8]], rows: RowVals<'_>, out: &mut [[f32; NR]]) {
        let w = &self.w;
        let mut d = vec![[0i32; NR]; xs.len()];
        for g in 0..w.groups {
            let (g0, g1) = (g * w.group, ((g + 1) * w.group).min(w.k));
            d.iter_mut().for_each(|dr| *dr = [0; NR]);
            for p in g0..g1 {
                let codes = w.codes_at(jb, p);
                for (dr, xr) in d.iter_mut().zip(xs) {
                    for c in 0..NR {
                        dr[c] += i32::from(codes[c]) * i32::from(xr[p]);
                    }
                }
            }
            self.epilogue(jb, g, rows, &d, out);
        }
    }

    /// Folds group `g`'s exact sums `D` (per row, natural column order) into `out`:
    /// `out += S·fma(−e, A − z'·|g|, D − z'·C)`, as the AVX2 kernel does in its registers.
    fn epilogue(&self, jb: usize, g: usize, rows: RowVals<'_>, d: &[[i32; NR]], out: &mut [[f32; NR]]) {
        let w = &self.w;
        let (s, e) = (w.lanes(&w.scale, jb, g), w.offsets(jb, g));
        for (r, o) in out.iter_mut().enumerate() {
            let (zp, e2) = (rows.zp[r], rows.e2[r * w.groups + g]);
            for c in 0..NR {
                let mut di = d[r][c];
                if !self.csum.is_empty() {
                    di -= zp * self.csum[(jb * w.groups + g) * NR + c];
                }
                let t = (-e[c]).mul_add(e2, di as f32);
                o[c] = s[c].mul_add(t, o[c]);
            }
        }
    }

    /// The op's output values for `x`, activated by `act`, after the shape check; the values
    /// are screened for NaN and infinities by the per-token ranges where the op takes them, by a
    /// separate pass otherwise.
    fn forward_values(&self, x: &Tensor, act: Option<Act>) -> Result<Vec<f32>> {
        let m = x.elem_count() / self.w.k.max(1);
        crate::linear::with_input_screened(&self.layer, &self.pool, x, self.w.k, self.screens(m), |v| self.run(v, act))
    }
}

/// `Σ c` per panel, group and column of `w`'s codes.
fn column_sums(w: &QuantPanels) -> Vec<i32> {
    let panels = w.n.div_ceil(NR);
    let mut sums = vec![0i32; panels * w.groups * NR];
    for jb in 0..panels {
        for p in 0..w.k {
            let g = p / w.group;
            for (c, &code) in w.codes_at(jb, p).iter().enumerate() {
                sums[(jb * w.groups + g) * NR + c] += i32::from(code);
            }
        }
    }
    sums
}

impl PreparedOp for W4A8Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_values(x, None)?;
        crate::linear::output(x, y, self.w.n)
    }

    fn forward_activated(&self, x: &Tensor, act: Activation) -> Option<Result<Tensor>> {
        let kernel = Act::of(act).filter(|_| x.dtype() == candle_core::DType::F32)?;
        Some(self.forward_values(x, Some(kernel)).and_then(|y| crate::linear::output(x, y, self.w.n)))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{NR, RowVals, W4A8Linear};

    /// Reduction steps (of four indices) summed in i16 before widening: one step adds at most
    /// `2·15·128 = 3840` to a lane, so eight stay below `i16::MAX` (and the remainder of a
    /// group, fewer than eight steps, too).
    const FLUSH: usize = 8;

    /// The codes of four consecutive indices (32 bytes: index `t`'s eight bytes at `8t`, see
    /// [`crate::wq`]'s nibble layout) rearranged for `vpmaddubsw`: 32-bit lane `L` holds byte
    /// `[0, 4, 2, 6, 1, 5, 3, 7][L]` of the four indices in index order, so its low nibbles are
    /// column `[0, 1, 8, 9, 4, 5, 12, 13][L]`'s four codes and its high nibbles column
    /// `[2, 3, 10, 11, 6, 7, 14, 15][L]`'s. Returns those two vectors of codes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn quad(v: __m256i) -> (__m256i, __m256i) {
        // Within each half (two indices): the even bytes 0, 4, 2, 6 of each, then the odd
        // bytes 1, 5, 3, 7 of each; then the halves' even parts together, and the odd parts.
        let split = _mm256_setr_epi8(
            0, 4, 2, 6, 8, 12, 10, 14, 1, 5, 3, 7, 9, 13, 11, 15, 0, 4, 2, 6, 8, 12, 10, 14, 1, 5, 3, 7, 9, 13, 11, 15,
        );
        let v = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(v, split));
        // A 4×4 byte transpose within each half: lane L gets byte L of each index's four.
        let transpose = _mm256_setr_epi8(
            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
        );
        let v = _mm256_shuffle_epi8(v, transpose);
        let m = _mm256_set1_epi8(0x0F);
        (_mm256_and_si256(v, m), _mm256_and_si256(_mm256_srli_epi16::<4>(v), m))
    }

    /// Natural-order columns `[0..8]`, `[8..16]` to the lane orders of [`quad`]'s two vectors.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn spread(v0: __m256, v1: __m256) -> [__m256; 2] {
        [_mm256_shuffle_ps::<0x44>(v0, v1), _mm256_shuffle_ps::<0xEE>(v0, v1)]
    }

    /// [`spread`] undone.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn gather(lo: __m256, hi: __m256) -> [__m256; 2] {
        [_mm256_shuffle_ps::<0x44>(lo, hi), _mm256_shuffle_ps::<0xEE>(lo, hi)]
    }

    /// [`super::W4A8Linear::panel_rows_scalar`] on AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `op.integer`; each of `xs` (at most `MR`) holds
    /// `rows.k4` codes; `rows` has every row's `e2` and `zp`; `out.len() == xs.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel_rows(op: &W4A8Linear, jb: usize, xs: &[&[i8]], rows: RowVals<'_>, out: &mut [[f32; NR]]) {
        // SAFETY: forwarded contract.
        unsafe {
            match xs.len() {
                1 => run::<1, FLUSH>(op, jb, xs, rows, out),
                2 => run::<2, FLUSH>(op, jb, xs, rows, out),
                3 => run::<3, 1>(op, jb, xs, rows, out),
                4 => run::<4, 1>(op, jb, xs, rows, out),
                5 => run::<5, 1>(op, jb, xs, rows, out),
                _ => run::<6, 1>(op, jb, xs, rows, out),
            }
        }
    }

    /// `R` rows; i16 sums widened every `F` steps (one or two rows keep eight i16 and eight
    /// i32 accumulators in registers; more rows widen every step).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<const R: usize, const F: usize>(
        op: &W4A8Linear,
        jb: usize,
        xs: &[&[i8]],
        rows: RowVals<'_>,
        out: &mut [[f32; NR]],
    ) {
        let w = &op.w;
        let k = w.k;
        assert!(w.nibbles && (w.groups == 1 || w.group.is_multiple_of(4)));
        assert!(xs.len() == R && out.len() == R && xs.iter().all(|x| x.len() >= k.div_ceil(4) * 4));
        assert!(rows.e2.len() >= R * w.groups && rows.zp.len() >= R);
        assert!((jb + 1) * k * 8 <= w.codes.len() && (jb + 1) * w.groups * NR <= w.scale.len());
        assert!(op.csum.is_empty() || (jb + 1) * w.groups * NR <= op.csum.len());
        // SAFETY: panel jb's k·8 code bytes start here (asserted).
        let codes = unsafe { w.codes.as_ptr().add(jb * k * 8) };
        let ones = _mm256_set1_epi16(1);
        let mut y = [[_mm256_setzero_ps(); 2]; R];
        let mut tail = [0u8; 32];
        for g in 0..w.groups {
            let (g0, g1) = (g * w.group, ((g + 1) * w.group).min(k));
            let next = w.scale.as_ptr().wrapping_add((jb * w.groups + g + crate::wq::PREFETCH_GROUPS) * NR);
            _mm_prefetch::<_MM_HINT_T0>(next.cast());
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            // g0 is a multiple of 4 (one group, or groups of a multiple of 4 indices).
            // One step: indices p..p + 4 (32 bytes at `v`) into the i16 sums.
            let step = |acc16: &mut [[__m256i; 2]; R], v: __m256i, p: usize| {
                let (lo, hi) = quad(v);
                for r in 0..R {
                    // SAFETY: p + 4 ≤ k rounded up to 4 ≤ the row's length (asserted).
                    let xv = _mm256_set1_epi32(unsafe { xs[r].as_ptr().add(p).cast::<i32>().read_unaligned() });
                    acc16[r][0] = _mm256_add_epi16(acc16[r][0], _mm256_maddubs_epi16(lo, xv));
                    acc16[r][1] = _mm256_add_epi16(acc16[r][1], _mm256_maddubs_epi16(hi, xv));
                }
            };
            let widen = |acc: &mut [[__m256i; 2]; R], acc16: [[__m256i; 2]; R]| {
                for r in 0..R {
                    for h in 0..2 {
                        acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(acc16[r][h], ones));
                    }
                }
            };
            // g0 is a multiple of 4 (one group, or groups of a multiple of 4 indices). Runs of
            // F whole steps first (a fixed count the compiler unrolls, one prefetch per cache
            // line they read), then the rest, the last step maybe partial.
            let mut p = g0;
            let whole = g1.min(k / 4 * 4);
            while p + 4 * F <= whole {
                for line in 0..(32 * F).div_ceil(64) {
                    let at = codes.wrapping_add(p * 8 + 64 * line + crate::wq::PREFETCH);
                    _mm_prefetch::<_MM_HINT_T0>(at.cast());
                }
                let mut acc16 = [[_mm256_setzero_si256(); 2]; R];
                for t in 0..F {
                    // SAFETY: indices p + 4t .. p + 4t + 4 ≤ k of panel jb: in bounds.
                    step(&mut acc16, unsafe { _mm256_loadu_si256(codes.add((p + 4 * t) * 8).cast()) }, p + 4 * t);
                }
                widen(&mut acc, acc16);
                p += 4 * F;
            }
            if p < g1 {
                let mut acc16 = [[_mm256_setzero_si256(); 2]; R];
                while p < g1 {
                    let v = if p + 4 <= k {
                        // SAFETY: indices p..p + 4 ≤ k of panel jb: 32 bytes in bounds.
                        unsafe { _mm256_loadu_si256(codes.add(p * 8).cast()) }
                    } else {
                        // The last, partial step: its indices' bytes, zeros after (their
                        // activation codes are zero too).
                        // SAFETY: (k − p)·8 < 32 bytes of panel jb from p, in bounds.
                        unsafe { std::ptr::copy_nonoverlapping(codes.add(p * 8), tail.as_mut_ptr(), (k - p) * 8) };
                        // SAFETY: 32 bytes.
                        unsafe { _mm256_loadu_si256(tail.as_ptr().cast()) }
                    };
                    step(&mut acc16, v, p);
                    p += 4;
                }
                widen(&mut acc, acc16);
            }
            let at = (jb * w.groups + g) * NR;
            // SAFETY: at + 16 ≤ scale.len() (asserted), and ≤ offset.len() when offsets are
            // stored (QuantPanels' layout), ≤ csum.len() when it is kept (asserted).
            let (s, e, csum) = unsafe {
                let s =
                    spread(_mm256_loadu_ps(w.scale.as_ptr().add(at)), _mm256_loadu_ps(w.scale.as_ptr().add(at + 8)));
                let e = match w.uniform {
                    Some(e) => [_mm256_set1_ps(e); 2],
                    None => spread(
                        _mm256_loadu_ps(w.offset.as_ptr().add(at)),
                        _mm256_loadu_ps(w.offset.as_ptr().add(at + 8)),
                    ),
                };
                let csum = (!op.csum.is_empty()).then(|| {
                    let c = op.csum.as_ptr().add(at);
                    let [a, b] = spread(_mm256_loadu_ps(c.cast()), _mm256_loadu_ps(c.add(8).cast()));
                    [_mm256_castps_si256(a), _mm256_castps_si256(b)]
                });
                (s, e, csum)
            };
            for r in 0..R {
                let e2 = _mm256_set1_ps(rows.e2[r * w.groups + g]);
                let zp = _mm256_set1_epi32(rows.zp[r]);
                for h in 0..2 {
                    let mut d = acc[r][h];
                    if let Some(c) = csum {
                        d = _mm256_sub_epi32(d, _mm256_mullo_epi32(zp, c[h]));
                    }
                    let t = _mm256_fnmadd_ps(e[h], e2, _mm256_cvtepi32_ps(d));
                    y[r][h] = _mm256_fmadd_ps(s[h], t, y[r][h]);
                }
            }
        }
        for (o, yr) in out.iter_mut().zip(y) {
            let [a, b] = gather(yr[0], yr[1]);
            // SAFETY: each output row holds 16 floats.
            unsafe {
                _mm256_storeu_ps(o.as_mut_ptr(), a);
                _mm256_storeu_ps(o.as_mut_ptr().add(8), b);
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{MR, NR, QuantPanels};

    /// Indices summed in i16 before widening: one adds at most `15·128 = 1920` to a lane.
    const FLUSH: usize = 16;

    /// The column whose code sits in lane `i` of the low (`i < 8`: byte `i`'s low nibble) and
    /// high (`i ≥ 8`: byte `i − 8`'s high nibble) halves (see [`crate::wq`]'s nibble layout).
    const COLUMN: [usize; NR] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

    /// `d[r][c] = Σ_{p ∈ g0..g1} c_{p,c}·x_r[p]` for panel `jb`, exactly: `smlal` of the codes
    /// (as i8) by each index's activation code into i16 for up to [`FLUSH`] indices, then
    /// widened into i32.
    ///
    /// # Safety
    /// NEON must be available; `g1 ≤ k`, every row of `xs` holds at least `g1` codes,
    /// `d.len() == xs.len() ≤ MR`.
    #[target_feature(enable = "neon")]
    pub unsafe fn group_dots(w: &QuantPanels, jb: usize, g0: usize, g1: usize, xs: &[&[i8]], d: &mut [[i32; NR]]) {
        let rows = xs.len();
        assert!(w.nibbles && g1 <= w.k && rows <= MR && d.len() == rows && xs.iter().all(|x| x.len() >= g1));
        assert!((jb + 1) * w.k * 8 <= w.codes.len());
        // SAFETY: panel jb's k·8 code bytes start here (asserted).
        let codes = unsafe { w.codes.as_ptr().add(jb * w.k * 8) };
        let mask = vdup_n_u8(0x0F);
        let mut acc = [[vdupq_n_s32(0); 4]; MR];
        let mut p = g0;
        while p < g1 {
            let end = (p + FLUSH).min(g1);
            let mut acc16 = [[vdupq_n_s16(0); 2]; MR];
            while p < end {
                // SAFETY: p < g1 ≤ k: 8 bytes of panel jb.
                let v = unsafe { vld1_u8(codes.add(p * 8)) };
                let (lo, hi) = (vreinterpret_s8_u8(vand_u8(v, mask)), vreinterpret_s8_u8(vshr_n_u8::<4>(v)));
                for r in 0..rows {
                    let x = vdup_n_s8(xs[r][p]);
                    acc16[r][0] = vmlal_s8(acc16[r][0], lo, x);
                    acc16[r][1] = vmlal_s8(acc16[r][1], hi, x);
                }
                p += 1;
            }
            for r in 0..rows {
                for h in 0..2 {
                    acc[r][2 * h] = vaddw_s16(acc[r][2 * h], vget_low_s16(acc16[r][h]));
                    acc[r][2 * h + 1] = vaddw_high_s16(acc[r][2 * h + 1], acc16[r][h]);
                }
            }
        }
        for (r, dr) in d.iter_mut().enumerate() {
            let mut lanes = [0i32; NR];
            for (i, v) in acc[r].iter().enumerate() {
                // SAFETY: four i32 lanes into lanes[4i..4i + 4].
                unsafe { vst1q_s32(lanes.as_mut_ptr().add(4 * i), *v) };
            }
            for (i, &c) in COLUMN.iter().enumerate() {
                dr[c] = lanes[i];
            }
        }
    }
}

#[cfg(test)]
mod tests;
