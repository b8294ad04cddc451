//! W8A8: int8 weights (or narrower, down to 2 bits) with per-output-channel scales ×
//! activations quantized on the fly (per token, per tensor or static, symmetric or with a zero
//! point) → i32 accumulators, with a fused epilogue `y = s_x·s_w·(acc − Z_x·Σ_k w) + b` (and an
//! optional activation). The products run on `vpmaddwd` over code pairs widened to i16 (AVX2),
//! `smlal` (NEON) or over u8 × i8 code quads — VNNI's `vpdpbusd` (AVX-512), and AVX2's
//! `vpmaddubsw` + `vpmaddwd` when every weight code lies in −64..=63 (7-bit weights), where no
//! i16 pair sum can saturate — with the activation codes shifted by 128 and the shift's
//! `128·Σ_k w` removed per column before the epilogue.
//!
//! The integer sums are exact, so every SIMD level and every thread count gives the same bits;
//! against the reference (fake-quantized activations × dequantized weights in f32) the only
//! difference is the rounding of the float accumulation.

use candle_core::{DType, Tensor};
use pare_core_tensor::{
    ActQuant, ActRange, Activation, Error, Granularity, Mapping, PreparedOp, QuantizedTensor, Result,
};
use rayon::prelude::*;

use crate::nonlinear::Act;
use crate::simd::{Aligned, SimdLevel};

/// Weights repacked for the kernel: signed codes row-major `[n, k]` (the scalar twin's), the
/// panels of the op's SIMD level (i8 pairs for AVX2/NEON, i8 quads for VNNI), scales, row
/// sums.
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

/// Whether `q` is the weight format the W8A8 kernel takes: signed symmetric linear codes of
/// 2 to 8 bits (held as i8) with one scale per output channel of a `[n, k]` matrix.
pub fn fits(q: &QuantizedTensor) -> bool {
    let s = q.scheme();
    (2..=8).contains(&s.bits)
        && s.signed
        && s.symmetric
        && s.mapping == Mapping::Linear
        && s.granularity == Granularity::PerChannel { axis: 0 }
        && q.shape().len() == 2
}

/// Rows of output a task quantizes and computes (a multiple of the micro-kernel's 6 rows).
const ROWS: usize = 48;

impl W8A8Linear {
    /// Repacks `q` (which must satisfy [`fits`]) for inputs quantized by `act` (8-bit).
    ///
    /// Weights of at most 7 bits (codes in −64..=63, ONNX Runtime's `reduce_range`) take the
    /// AVX2 kernel's faster exact path (`vpmaddubsw` on unsigned activation bytes × weight
    /// bytes, whose i16 pair sums cannot saturate there); the bits are the same.
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
                "expected signed symmetric per-channel weights of 2 to 8 bits and 8-bit activations",
            ));
        }
        act.validate(layer)?;
        let (n, k) = (q.shape()[0], q.shape()[1]);
        // Signed codes are stored as c + 2^(bits−1) (QuantScheme::signed).
        let half = 1i32 << (q.scheme().bits - 1);
        let w: Vec<i8> = q.codes().iter().map(|&c| (i32::from(c) - half) as i8).collect();
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
        let panel = Panel::pack(level, &w, n, k);
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

    /// Whether [`W8A8Linear::run_activated`] looks at every value of an `m`-row input on its
    /// own (each row's range is taken per token), so that it can screen them for NaN and
    /// infinities instead of a separate pass.
    fn screens(&self, m: usize) -> bool {
        matches!(self.act.range, ActRange::Dynamic { per_token: true }) && m > 1 && self.n > 0
    }

    /// `y[m, n]` for `x` row-major `[m, k]` (f32), computed at this op's SIMD level, then
    /// `act` (if any) applied by each task to its rectangle of the output once the epilogue
    /// has written it, while it is in cache. `None` when the rows' ranges met a value that is
    /// not finite (only when the ranges are per token and there are several rows; other inputs
    /// must be checked beforehand).
    pub fn run_activated(&self, x: &[f32], act: Option<Act>) -> Option<Vec<f32>> {
        self.run_group(&[self], x, act).map(|mut ys| ys.pop().expect("one op, one output"))
    }

    /// Whether `other` quantizes its input exactly as this op does (same width, activation
    /// quantization and SIMD level, so the same codes in the same row layout): then both can
    /// run on one quantized copy of a shared input ([`W8A8Linear::run_group`]).
    pub fn shares_input_quantization(&self, other: &W8A8Linear) -> bool {
        self.k == other.k
            && self.act == other.act
            && self.level == other.level
            && std::mem::discriminant(&self.panel.data) == std::mem::discriminant(&other.panel.data)
    }

    /// [`W8A8Linear::run_activated`] for several ops on the same input `x` (this op's
    /// quantization, which every op must share: [`W8A8Linear::shares_input_quantization`]):
    /// each row chunk is quantized once and multiplied by every op's weight while its codes
    /// are in cache. The outputs, one per op in order, are the bits each op's own run gives.
    pub fn run_group(&self, ops: &[&W8A8Linear], x: &[f32], act: Option<Act>) -> Option<Vec<Vec<f32>>> {
        assert!(ops.iter().all(|o| self.shares_input_quantization(o)), "ops of a group share their input quantization");
        let k = self.k;
        let m = x.len() / k.max(1);
        let global = self.global_range(x, m);
        if m == 0 || ops.iter().all(|o| o.n == 0) {
            return Some(ops.iter().map(|o| vec![0f32; m * o.n]).collect());
        }
        let non_finite = std::sync::atomic::AtomicBool::new(false);
        // Every element is written by exactly one task below before the length is set, so the
        // buffers are not zeroed first (that pass cost about 4% of MiniLM's time).
        let mut ys: Vec<Vec<f32>> = ops.iter().map(|o| Vec::with_capacity(m * o.n)).collect();
        let outs: Vec<crate::gemm::OutPtr> = ys.iter_mut().map(|y| crate::gemm::OutPtr(y.as_mut_ptr())).collect();
        let level = self.level;
        let biases: Vec<std::borrow::Cow<'_, [f32]>> = ops.iter().map(|o| o.bias_or_zeros()).collect();
        // Tasks own whole output elements (rows r0..r1 × blocks b0..b1 of one op): the
        // integer sums are exact and quantization and the epilogue are per element, so the
        // bits do not depend on the split. With few row chunks the columns are split too, and
        // the rows are quantized once beforehand (at one chunk of 16 tokens, re-quantizing
        // them in each of eight column tasks cost more than the products).
        let chunks = m.div_ceil(ROWS);
        let splits: Vec<(usize, usize)> =
            ops.iter().map(|o| crate::gemm::column_split(&self.pool, chunks, o.panel.blocks)).collect();
        let quantize = |ci: usize| {
            let (r0, r1) = (ci * ROWS, ((ci + 1) * ROWS).min(m));
            self.quantize_rows(&x[r0 * k..r1 * k], global, &non_finite)
        };
        let task = |o: usize, ci: usize, cj: usize, (xq, units): &(Rows, Vec<(f32, i32)>)| {
            let (op, per, n) = (ops[o], splits[o].1, ops[o].n);
            let (b0, b1) = (cj * per, ((cj + 1) * per).min(op.panel.blocks));
            if b0 >= b1 {
                return;
            }
            let out = outs[o];
            let sink = Sink::F32 {
                // SAFETY (of the writes through it): this task's rows ci·ROWS.. × the columns
                // of blocks b0..b1 (clipped to n) of op o's output are its own; the outputs
                // outlive `pool.install`.
                out: out.get().wrapping_add(ci * ROWS * n),
                n,
                units,
                w_sum: &op.w_sum,
                w_scale: &op.w_scale,
                bias: &biases[o],
            };
            products(level, xq, k, &op.w, &op.panel, b0..b1, &sink);
            if let Some(act) = act {
                let (c0, c1) = (b0 * NR, (b1 * NR).min(n));
                for r in ci * ROWS..ci * ROWS + units.len() {
                    // SAFETY: row r, columns c0..c1 are this task's (see the sink), written above.
                    let row = unsafe { std::slice::from_raw_parts_mut(out.get().add(r * n + c0), c1 - c0) };
                    crate::nonlinear::activation_in_place(level, act, row);
                }
            }
        };
        self.pool.install(|| {
            if splits.iter().all(|s| s.0 == 1) {
                (0..chunks).into_par_iter().for_each(|ci| {
                    let rows = quantize(ci);
                    for o in 0..ops.len() {
                        task(o, ci, 0, &rows);
                    }
                });
            } else {
                let rows: Vec<_> = (0..chunks).into_par_iter().map(quantize).collect();
                let splits = &splits;
                let jobs: Vec<(usize, usize, usize)> = (0..chunks)
                    .flat_map(|ci| (0..ops.len()).flat_map(move |o| (0..splits[o].0).map(move |cj| (o, ci, cj))))
                    .collect();
                jobs.into_par_iter().for_each(|(o, ci, cj)| task(o, ci, cj, &rows[ci]));
            }
        });
        for (y, o) in ys.iter_mut().zip(ops) {
            // SAFETY: each op's tasks' rectangles (row chunks × block ranges, column_split
            // covering every block) partition its m × n output and `products` writes every
            // row and column of its rectangle through the sink, so all m·n values are set.
            unsafe { y.set_len(m * o.n) };
        }
        (!non_finite.into_inner()).then_some(ys)
    }

    /// Whether [`W8A8Linear::run_chain`] can feed this op's output straight into `next`:
    /// `next` takes this op's outputs as its inputs, runs at the same SIMD level, and
    /// quantizes each token on its own (a range over the whole intermediate would need all of
    /// it first).
    pub fn chains_with(&self, next: &W8A8Linear) -> bool {
        next.k == self.n
            && next.level == self.level
            && matches!(next.act.range, ActRange::Dynamic { per_token: true })
            && self.n > 0
            && next.n > 0
    }

    /// Whether an `m`-row input has row chunks enough to keep every thread busy without
    /// splitting columns, as [`W8A8Linear::run_chain`] needs (each task owns whole rows).
    fn chain_pays(&self, next: &W8A8Linear, m: usize) -> bool {
        let chunks = m.div_ceil(ROWS);
        m > 1 && [self, next].iter().all(|o| crate::gemm::column_split(&self.pool, chunks, o.panel.blocks).0 == 1)
    }

    /// `next(act(self(x)))` for `x` row-major `[m, k]`, each task taking a chunk of rows
    /// through both ops: its `[rows, n]` intermediate (this op's output, activated) stays in
    /// the task's cache-sized scratch, is quantized there for `next` and never written out, so
    /// a feed-forward block does not stream its `[tokens, 4·hidden]` activations to memory and
    /// back. Every step is the one [`W8A8Linear::run_activated`] takes per row (the whole row
    /// activated at once, as an unsplit task does), so the bits equal the two ops run one after
    /// the other. The outer `None`: a value of `x` that is not finite (when this op screens
    /// its rows, see [`W8A8Linear::run_activated`]); the inner `None`: an intermediate value
    /// that is not finite (the caller then runs the ops one by one, whose checks name it).
    ///
    /// # Panics
    /// When `next` does not chain with this op ([`W8A8Linear::chains_with`]).
    pub fn run_chain(&self, act: Option<Act>, next: &W8A8Linear, x: &[f32]) -> Option<Option<Vec<f32>>> {
        assert!(self.chains_with(next), "`{}` cannot feed `{}` directly", self.layer, next.layer);
        let (k, n, m) = (self.k, self.n, x.len() / self.k.max(1));
        let global = self.global_range(x, m);
        let bad_input = std::sync::atomic::AtomicBool::new(false);
        let bad_mid = std::sync::atomic::AtomicBool::new(false);
        let mut y: Vec<f32> = Vec::with_capacity(m * next.n);
        let out = crate::gemm::OutPtr(y.as_mut_ptr());
        let (bias, next_bias) = (self.bias_or_zeros(), next.bias_or_zeros());
        let level = self.level;
        self.pool.install(|| {
            (0..m.div_ceil(ROWS)).into_par_iter().for_each_init(
                || vec![0f32; ROWS * n],
                |mid, ci| {
                    let (r0, r1) = (ci * ROWS, ((ci + 1) * ROWS).min(m));
                    let (xq, units) = self.quantize_rows(&x[r0 * k..r1 * k], global, &bad_input);
                    let mid = &mut mid[..(r1 - r0) * n];
                    let sink = Sink::F32 {
                        out: mid.as_mut_ptr(),
                        n,
                        units: &units,
                        w_sum: &self.w_sum,
                        w_scale: &self.w_scale,
                        bias: &bias,
                    };
                    products(level, &xq, k, &self.w, &self.panel, 0..self.panel.blocks, &sink);
                    if let Some(act) = act {
                        mid.chunks_exact_mut(n).for_each(|row| crate::nonlinear::activation_in_place(level, act, row));
                    }
                    let (hq, hunits) = next.quantize_rows(mid, None, &bad_mid);
                    let sink = Sink::F32 {
                        // SAFETY (of the writes through it): rows r0..r1 of the output are this
                        // task's alone, and `y` outlives `pool.install`.
                        out: out.get().wrapping_add(r0 * next.n),
                        n: next.n,
                        units: &hunits,
                        w_sum: &next.w_sum,
                        w_scale: &next.w_scale,
                        bias: &next_bias,
                    };
                    products(level, &hq, n, &next.w, &next.panel, 0..next.panel.blocks, &sink);
                },
            )
        });
        if bad_input.into_inner() {
            return None;
        }
        if bad_mid.into_inner() {
            return Some(None);
        }
        // SAFETY: the tasks' row chunks partition 0..m and `products` writes every column of
        // every row of its chunk through the sink, so all m · next.n values are set.
        unsafe { y.set_len(m * next.n) };
        Some(Some(y))
    }

    /// The one quantization range of the whole input `x` (`m` rows) where this op takes one
    /// (static, per tensor, or per token on a single row: of the smoothed values, as the
    /// reference quantizes them); `None` when every row takes its own.
    fn global_range(&self, x: &[f32], m: usize) -> Option<(f32, i32)> {
        global_range(self.level, &self.act, self.k, x, m)
    }

    /// The codes of the rows of `x` (`k` values each) in the kernel's layout, with each row's
    /// scale and zero point (less the codes' offset), quantized by `global` or, without it, by
    /// each row's own range; a row with a value that is not finite sets `non_finite`.
    fn quantize_rows(
        &self,
        x: &[f32],
        global: Option<(f32, i32)>,
        non_finite: &std::sync::atomic::AtomicBool,
    ) -> (Rows, Vec<(f32, i32)>) {
        let k = self.k;
        let rows = x.len() / k.max(1);
        let offset = code_offset(&self.act);
        let mut xq = self.panel.rows(rows);
        let mut codes = vec![0i16; k];
        let mut units = Vec::with_capacity(rows);
        // A range taken from the values themselves bounds every quotient x/S by 255.
        let bounded = !matches!(self.act.range, ActRange::Static { .. });
        for row in x.chunks_exact(k.max(1)) {
            let (sx, zx) = global.unwrap_or_else(|| {
                let (lo, hi, finite) = self.extremes(row);
                if !finite {
                    non_finite.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                self.act.scale_zero(lo, hi)
            });
            quantize_row(self.level, row, self.act.smooth.as_deref(), (sx, zx), &self.act, &mut codes, bounded);
            xq.set_row(units.len(), &codes);
            units.push((sx, zx - offset));
        }
        (xq, units)
    }

    /// The bias, or zeros for an op without one (the epilogue always adds a bias).
    fn bias_or_zeros(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.bias {
            Some(b) => std::borrow::Cow::Borrowed(b),
            None => std::borrow::Cow::Owned(vec![0f32; self.n]),
        }
    }

    /// Minimum and maximum of `x` divided by the smoothing factors (if any), and whether every
    /// value of `x` is finite (the extremes are those of the finite inputs `forward` admits).
    fn extremes(&self, x: &[f32]) -> (f32, f32, bool) {
        extremes(self.level, &self.act, self.k, x)
    }

    /// [`W8A8Linear::forward_values`] for a group of ops sharing this op's input
    /// quantization ([`W8A8Linear::run_group`]).
    fn forward_group(&self, ops: &[&W8A8Linear], x: &Tensor, act: Option<Act>) -> Result<Vec<Vec<f32>>> {
        let m = x.elem_count() / self.k.max(1);
        crate::linear::with_input_screened(&self.layer, &self.pool, x, self.k, self.screens(m), |v| {
            self.run_group(ops, v, act)
        })
    }

    /// The op's output values for `x`, activated by `act`: the input's shape is checked, and
    /// its values are screened for NaN and infinities by the per-token ranges where the kernel
    /// takes them (by a separate pass otherwise).
    fn forward_values(&self, x: &Tensor, act: Option<Act>) -> Result<Vec<f32>> {
        let mut ys = self.forward_group(&[self], x, act)?;
        Ok(ys.pop().expect("one op, one output"))
    }
}

/// The one quantization range `act` gives the whole input `x` (`m` rows of `k`) where it takes
/// one (static, per tensor, or per token on a single row: of the smoothed values, as the
/// reference quantizes them); `None` when every row takes its own.
pub(crate) fn global_range(level: SimdLevel, act: &ActQuant, k: usize, x: &[f32], m: usize) -> Option<(f32, i32)> {
    match act.range {
        ActRange::Static { scale, zero_point } => Some((scale, zero_point)),
        ActRange::Dynamic { per_token } if !per_token || m <= 1 => {
            let (lo, hi, _) = extremes(level, act, k, x);
            Some(act.scale_zero(lo, hi))
        }
        ActRange::Dynamic { .. } => None,
    }
}

/// Minimum and maximum of `x` (rows of `k` values) divided by `act`'s smoothing factors (if
/// any), and whether every value of `x` is finite (the extremes are those of the finite inputs
/// `forward` admits).
pub(crate) fn extremes(level: SimdLevel, act: &ActQuant, k: usize, x: &[f32]) -> (f32, f32, bool) {
    #[cfg(target_arch = "x86_64")]
    if act.smooth.is_none() && level.avx2() {
        // SAFETY: AVX2 was detected just above. Min and max are exact, so the lanes give
        // the scalar loop's answer for finite inputs.
        return unsafe { avx2::extremes(x) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = level;
    let k = k.max(1);
    let (mut lo, mut hi, mut finite) = (f32::INFINITY, f32::NEG_INFINITY, true);
    for (i, &v) in x.iter().enumerate() {
        finite &= v.is_finite();
        let v = match &act.smooth {
            Some(s) => v / s[i % k],
            None => v,
        };
        lo = lo.min(v);
        hi = hi.max(v);
    }
    (lo, hi, finite)
}

/// Codes of one row, `clamp(round_half_even(x/s_k / S) + Z)` exactly as
/// `ActQuant::quantize_slice` computes them, stored centred to the i8 range ([`code_offset`]).
/// `bounded`: every quotient `x/S` is known to be finite (the range was taken from the values),
/// which lets the SIMD path divide by a reciprocal and one correction (see
/// [`avx2::quantize_row`]).
pub(crate) fn quantize_row(
    level: SimdLevel,
    x: &[f32],
    smooth: Option<&[f32]>,
    (s, z): (f32, i32),
    act: &ActQuant,
    out: &mut [i16],
    bounded: bool,
) {
    let (q_min, q_max) = (act.q_min(), act.q_max());
    let offset = code_offset(act);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bounded;
    match level {
        #[cfg(target_arch = "x86_64")]
        l if l.avx2() && smooth.is_none() => {
            let recip = Some(1.0 / s).filter(|y| bounded && y.is_normal() && s.is_normal());
            // SAFETY: AVX2 was detected just above; out.len() == x.len().
            unsafe { avx2::quantize_row(x, s, recip, z, (q_min, q_max), offset, out) }
        }
        _ => {
            for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
                let v = match smooth {
                    Some(f) => v / f[i],
                    None => v,
                };
                *o = (((v / s).round_ties_even() as i32).saturating_add(z).clamp(q_min, q_max) - offset) as i16;
            }
        }
    }
}

/// What 8-bit codes are shifted by to fit i8 (unsigned codes `q` become `q − 128`; the zero
/// point moves with them).
pub(crate) fn code_offset(act: &ActQuant) -> i32 {
    if act.symmetric { 0 } else { 128 }
}

/// Output columns per panel block (two 8-lane i32 accumulators per row on AVX2, one 16-lane
/// register on AVX-512).
const NR: usize = 16;

/// Rows per tile of the AVX2 and NEON micro-kernels (pairs layout).
const MR_PAIRS: usize = 6;
/// Rows per tile of the VNNI micro-kernel (quads layout).
const MR_QUADS: usize = 8;

/// Weights packed for the micro-kernel of the level they were packed for, in blocks of 16
/// output columns, zero-padded to whole blocks and reduction groups.
#[derive(Debug, Clone)]
pub struct Panel {
    k: usize,
    blocks: usize,
    data: PanelData,
}

#[derive(Debug, Clone)]
enum PanelData {
    /// i8 for `vpmaddwd` (which multiplies i16 pairs into i32 sums exactly, the code −128
    /// included) and NEON's `smlal`, each widening the codes to i16 as it loads them: within
    /// a block, for each pair of reduction indices `2p, 2p+1`, columns 0–7 then 8–15, each
    /// column's two codes side by side (32 bytes). One byte per weight, not the two that i16
    /// panels took: a small batch streams every weight once per call, so it reads half the
    /// bytes (MiniLM's encoder: 10.6 MB instead of 21), and the sign extension (`vpmovsxbw`
    /// from memory) ran as fast as a plain load in the 6 × 16 loop on Zen 3.
    Pairs(Aligned<i8>),
    /// i8 for VNNI's `vpdpbusd` (unsigned activation bytes × signed weight bytes, four
    /// products summed into each i32 lane) and, for weights whose codes all lie in −64..=63
    /// (7 bits or fewer), AVX2's `vpmaddubsw` (the same bytes, pairs of products summed into
    /// i16 lanes, which saturate past ±32767: 255·64 twice, 32640, cannot; 255·128 twice could) then
    /// `vpmaddwd` by ones into i32: three instructions per 32 products where the i16 pairs
    /// take four. Within a block, for each quad of reduction indices `4q..4q+4`, the 16
    /// columns' four codes side by side (64 bytes: one AVX-512 register, two AVX2 ones).
    /// The activations are stored shifted to unsigned (code + 128), so the sums come out
    /// `128·Σ_t w` too large: `shift` holds that per column, subtracted before the sink.
    // Only x86-64 reads the fields (elsewhere the level never packs this layout).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Quads {
        data: Aligned<i8>,
        shift: Vec<i32>,
        /// Whether every code lies in −64..=63, so that the AVX2 kernel may run them.
        narrow: bool,
    },
}

impl Panel {
    /// Packs row-major `[n, k]` int8 weights for `level`'s micro-kernel: quads for
    /// [`SimdLevel::Avx512Vnni`] on a CPU that has it and for AVX2 when every code lies in
    /// −64..=63, pairs otherwise (the scalar twin reads the row-major weights and takes
    /// either).
    pub fn pack(level: SimdLevel, w: &[i8], n: usize, k: usize) -> Self {
        assert!(w.len() == n * k);
        let blocks = n.div_ceil(NR);
        let narrow = w.iter().all(|&v| (-64..=63).contains(&v));
        let data = if level.avx512() || (level.avx2() && narrow) {
            let quads = k.div_ceil(4);
            let mut data = Aligned::new(blocks * quads * 4 * NR);
            let mut shift = vec![0i32; blocks * NR];
            for j in 0..n {
                let (b, c) = (j / NR, j % NR);
                for t in 0..k {
                    data[(b * quads + t / 4) * 4 * NR + c * 4 + t % 4] = w[j * k + t];
                }
                shift[j] = 128 * w[j * k..(j + 1) * k].iter().map(|&v| i32::from(v)).sum::<i32>();
            }
            PanelData::Quads { data, shift, narrow }
        } else {
            let pairs = k.div_ceil(2);
            let mut data = Aligned::new(blocks * pairs * 2 * NR);
            for j in 0..n {
                let (b, h, c) = (j / NR, j % NR / 8, j % 8);
                for t in 0..k {
                    data[(b * pairs + t / 2) * 2 * NR + h * 16 + c * 2 + t % 2] = w[j * k + t];
                }
            }
            PanelData::Pairs(data)
        };
        Self { k, blocks, data }
    }

    /// `m` zero rows of activation codes in the layout this panel's micro-kernel reads.
    pub fn rows(&self, m: usize) -> Rows {
        match self.data {
            PanelData::Pairs(_) => {
                let groups = self.k.div_ceil(2);
                Rows { data: RowData::Pairs(vec![0; m * groups * 2]), m, groups }
            }
            PanelData::Quads { .. } => {
                let groups = self.k.div_ceil(4);
                Rows { data: RowData::Quads(vec![0; m * groups * 4]), m, groups }
            }
        }
    }
}

/// Rows of activation codes laid out for the micro-kernel (made by [`Panel::rows`]): tiles
/// of rows (the last one smaller), within a tile the rows' reduction groups interleaved group
/// by group, so one pointer walks every row's next group; zero-padded to whole groups.
#[derive(Debug)]
pub struct Rows {
    data: RowData,
    m: usize,
    /// Reduction groups per row (pairs or quads).
    groups: usize,
}

#[derive(Debug)]
enum RowData {
    /// Centred codes as i16, tiles of 6 rows, groups of 2 (row i's pair p is the i32 at tile
    /// index `p·mr + i`).
    Pairs(Vec<i16>),
    /// Centred codes + 128 as u8, tiles of 8 rows, groups of 4 (row i's quad q is the i32 at
    /// tile index `q·mr + i`).
    Quads(Vec<u8>),
}

/// Stores the four 32-bit lanes of `v` at `d`, `d + stride`, `d + 2·stride` and `d + 3·stride`
/// bytes: one row's next four code groups in a [`Rows`] tile.
///
/// # Safety
/// The four 4-byte spans must be writable.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn scatter_dwords(v: std::arch::x86_64::__m128i, d: *mut u8, stride: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for the four spans; the stores are unaligned.
    unsafe {
        (d as *mut i32).write_unaligned(_mm_cvtsi128_si32(v));
        (d.add(stride) as *mut i32).write_unaligned(_mm_cvtsi128_si32(_mm_srli_si128::<4>(v)));
        (d.add(2 * stride) as *mut i32).write_unaligned(_mm_cvtsi128_si32(_mm_srli_si128::<8>(v)));
        (d.add(3 * stride) as *mut i32).write_unaligned(_mm_cvtsi128_si32(_mm_srli_si128::<12>(v)));
    }
}

impl Rows {
    /// Values per group and rows per tile.
    fn geometry(&self) -> (usize, usize) {
        match self.data {
            RowData::Pairs(_) => (2, MR_PAIRS),
            RowData::Quads(_) => (4, MR_QUADS),
        }
    }

    /// Row `r`'s tile: its first element and its row count.
    fn tile(&self, r: usize) -> (usize, usize) {
        let (g, tile) = self.geometry();
        let t = r / tile;
        (t * tile * self.groups * g, (self.m - t * tile).min(tile))
    }

    /// Stores centred `codes` (at most a row's worth; the rest stay zero) as row `r`.
    pub fn set_row(&mut self, r: usize, codes: &[i16]) {
        let (g, tile) = self.geometry();
        assert!(r < self.m && codes.len() <= self.groups * g);
        let (base, mr) = self.tile(r);
        let i = r % tile;
        // Row i's group p starts at tile element (p·mr + i)·g, the last one inside the tile.
        let end = base + self.groups * mr * g;
        match &mut self.data {
            RowData::Pairs(data) => {
                let tile = &mut data[base..end];
                let whole = codes.len() / 2 * 2;
                // Eight codes (four pairs) at a time: four 4-byte stores `2·mr` codes apart.
                #[cfg(target_arch = "x86_64")]
                let done = {
                    use std::arch::x86_64::*;
                    let wide = codes.len() / 8 * 8;
                    for (b, c) in codes[..wide].chunks_exact(8).enumerate() {
                        let at = (4 * b * mr + i) * 2;
                        assert!(at + 3 * mr * 2 + 2 <= tile.len());
                        // SAFETY: c holds 8 codes (one 16-byte load); the four stores at
                        // at + j·2·mr (j < 4) end within the tile (asserted).
                        unsafe {
                            let v = _mm_loadu_si128(c.as_ptr() as *const __m128i);
                            scatter_dwords(v, tile.as_mut_ptr().add(at).cast(), 4 * mr);
                        }
                    }
                    wide
                };
                #[cfg(not(target_arch = "x86_64"))]
                let done = 0;
                for (p, c) in codes[done..whole].chunks_exact(2).enumerate().map(|(p, c)| (p + done / 2, c)) {
                    let at = (p * mr + i) * 2;
                    tile[at..at + 2].copy_from_slice(c);
                }
                if whole < codes.len() {
                    tile[(whole / 2 * mr + i) * 2] = codes[whole];
                }
            }
            RowData::Quads(data) => {
                let tile = &mut data[base..end];
                // Centred codes lie in −128..=127: shifted, in 0..=255 (flipping the sign bit
                // of the low byte adds 128 modulo 256).
                let byte = |v: i16| (v as u8) ^ 0x80;
                let whole = codes.len() / 4 * 4;
                // Sixteen codes at a time: a saturating pack to bytes (exact for centred codes),
                // the sign-bit flip, then four 4-byte stores `4·mr` bytes apart. SSE2 is part of
                // x86-64, and only the VNNI kernel packs quads.
                #[cfg(target_arch = "x86_64")]
                let done = {
                    use std::arch::x86_64::*;
                    let wide = codes.len() / 16 * 16;
                    for (b, c) in codes[..wide].chunks_exact(16).enumerate() {
                        let at = (4 * b * mr + i) * 4;
                        assert!(at + 3 * mr * 4 + 4 <= tile.len());
                        // SAFETY: c holds 16 codes (two 16-byte loads); the four stores at
                        // at + j·4·mr (j < 4) end within the tile (asserted).
                        unsafe {
                            let lo = _mm_loadu_si128(c.as_ptr() as *const __m128i);
                            let hi = _mm_loadu_si128(c.as_ptr().add(8) as *const __m128i);
                            let v = _mm_xor_si128(_mm_packs_epi16(lo, hi), _mm_set1_epi8(-128));
                            scatter_dwords(v, tile.as_mut_ptr().add(at), 4 * mr);
                        }
                    }
                    wide
                };
                #[cfg(not(target_arch = "x86_64"))]
                let done = 0;
                for (q, c) in codes[done..whole].chunks_exact(4).enumerate().map(|(q, c)| (q + done / 4, c)) {
                    let at = (q * mr + i) * 4;
                    tile[at..at + 4].copy_from_slice(&[byte(c[0]), byte(c[1]), byte(c[2]), byte(c[3])]);
                }
                if whole < codes.len() {
                    let at = (whole / 4 * mr + i) * 4;
                    for (d, &v) in tile[at..].iter_mut().zip(&codes[whole..]) {
                        *d = byte(v);
                    }
                }
            }
        }
    }

    /// The centred code of row `r` at reduction index `t`.
    fn at(&self, r: usize, t: usize) -> i16 {
        let (g, tile) = self.geometry();
        let (base, mr) = self.tile(r);
        let at = base + ((t / g) * mr + r % tile) * g + t % g;
        match &self.data {
            RowData::Pairs(d) => d[at],
            RowData::Quads(d) => (i32::from(d[at]) - 128) as i16,
        }
    }
}

/// Where the micro-kernel's sums go, 16 columns (one panel block) at a time, clipped to `n`
/// columns. Row indices count from the pointer's row.
pub enum Sink<'a> {
    /// The raw i32 sums, row-major with `n` columns.
    I32 {
        /// The first row's first element.
        acc: *mut i32,
        /// Columns per row.
        n: usize,
    },
    /// The W8A8 epilogue `(acc − zx·w_sum) as f32 · (sx·w_scale) + bias`, row-major f32.
    F32 {
        /// The first row's first element.
        out: *mut f32,
        /// Columns per row.
        n: usize,
        /// Each row's `(sx, zx)`, the zero point already centred.
        units: &'a [(f32, i32)],
        /// Σ_k w per output column.
        w_sum: &'a [i32],
        /// Scale per output column.
        w_scale: &'a [f32],
        /// Bias per output column (zeros when the layer has none).
        bias: &'a [f32],
    },
}

impl Sink<'_> {
    /// Writes the scalar sums of row `r`, columns `j0..j0 + acc.len()` (clipped to `n`).
    ///
    /// # Safety
    /// Row `r`, columns `j0..min(j0 + 16, n)` of the sink's buffer are valid and written by
    /// no one else.
    unsafe fn put(&self, r: usize, j0: usize, acc: &[i32]) {
        match *self {
            Sink::I32 { acc: p, n } => {
                for (j, &a) in (j0..n).zip(acc) {
                    // SAFETY: the caller vouches for row r, columns j0..n.
                    unsafe { *p.add(r * n + j) = a };
                }
            }
            Sink::F32 { out, n, units, w_sum, w_scale, bias } => {
                let (sx, zx) = units[r];
                for (j, &a) in (j0..n).zip(acc) {
                    // SAFETY: as above.
                    unsafe { *out.add(r * n + j) = (a - zx * w_sum[j]) as f32 * (sx * w_scale[j]) + bias[j] };
                }
            }
        }
    }
}

/// `acc[r, j] = Σ_t x[r, t]·w[j, t]` for `m` rows of centred codes `x` (`[m, k]`) against the
/// `n` weight rows, exactly, at `level` (the scalar twin uses row-major `w`, the SIMD levels
/// the `panel`, which must have been packed for `level`).
pub fn gemm(level: SimdLevel, x: &[i8], m: usize, k: usize, w: &[i8], panel: &Panel, acc: &mut [i32]) {
    let n = acc.len() / m.max(1);
    assert!(x.len() == m * k && acc.len() == m * n && w.len() == n * k && panel.k == k);
    let mut xq = panel.rows(m);
    for r in 0..m {
        xq.set_row(r, &x[r * k..(r + 1) * k].iter().map(|&v| i16::from(v)).collect::<Vec<_>>());
    }
    products(level, &xq, k, w, panel, 0..panel.blocks, &Sink::I32 { acc: acc.as_mut_ptr(), n });
}

/// The exact integer products of the rows `x` (made by `panel.rows`) with the weight blocks
/// `blocks` (columns `16·blocks.start .. min(16·blocks.end, n)`), handed to `sink`: on the
/// micro-kernel the panel was packed for, or the scalar twin at [`SimdLevel::Scalar`].
///
/// The sink must own those rows and columns of its buffer.
fn products(
    level: SimdLevel,
    x: &Rows,
    k: usize,
    w: &[i8],
    panel: &Panel,
    blocks: std::ops::Range<usize>,
    sink: &Sink,
) {
    assert!(panel.k == k && blocks.end <= panel.blocks);
    let n = w.len() / k.max(1);
    match (level, &panel.data, &x.data) {
        #[cfg(target_arch = "x86_64")]
        (l, PanelData::Quads { data, shift, .. }, RowData::Quads(xd)) if l.avx512() => {
            assert!(x.groups == k.div_ceil(4) && xd.len() == x.m * x.groups * 4);
            // SAFETY: AVX-512 F/BW/VL + VNNI were detected on this CPU just above; layouts
            // asserted; the sink's region is the caller's.
            unsafe { vnni::products(xd, x.m, x.groups, data, shift, blocks, n, sink) }
        }
        #[cfg(target_arch = "x86_64")]
        (l, PanelData::Quads { data, shift, narrow: true }, RowData::Quads(xd)) if l.avx2() => {
            assert!(x.groups == k.div_ceil(4) && xd.len() == x.m * x.groups * 4);
            // SAFETY: AVX2 was detected on this CPU just above; layouts asserted, and every
            // weight code lies in −64..=63 (`narrow`, set by `pack`), so no i16 pair sum
            // saturates; the sink's region is the caller's.
            unsafe { avx2::products_quads(xd, x.m, x.groups, data, shift, blocks, n, sink) }
        }
        #[cfg(target_arch = "x86_64")]
        (l, PanelData::Pairs(data), RowData::Pairs(xd)) if l.avx2() => {
            assert!(x.groups == k.div_ceil(2) && xd.len() == x.m * x.groups * 2);
            // SAFETY: AVX2 was detected on this CPU just above; layouts asserted; the sink's
            // region is the caller's.
            unsafe { avx2::products(xd, x.m, x.groups, data, blocks, n, sink) }
        }
        #[cfg(target_arch = "aarch64")]
        (SimdLevel::Neon, PanelData::Pairs(data), RowData::Pairs(xd)) if SimdLevel::detect() == SimdLevel::Neon => {
            assert!(x.groups == k.div_ceil(2) && xd.len() == x.m * x.groups * 2);
            // SAFETY: NEON was detected on this CPU just above; layouts asserted; the sink's
            // region is the caller's.
            unsafe { neon::products(xd, x.m, x.groups, data, blocks, n, sink) }
        }
        _ => {
            let mut acc = [0i32; NR];
            for b in blocks {
                let (j0, j1) = (b * NR, ((b + 1) * NR).min(n));
                for r in 0..x.m {
                    acc.fill(0);
                    for (a, j) in acc.iter_mut().zip(j0..j1) {
                        *a = (0..k).map(|t| i32::from(x.at(r, t)) * i32::from(w[j * k + t])).sum();
                    }
                    // SAFETY: row r, columns j0..j1 belong to the sink (caller's contract).
                    unsafe { sink.put(r, j0, &acc[..j1 - j0]) };
                }
            }
        }
    }
}

impl PreparedOp for W8A8Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_values(x, None)?;
        crate::linear::output(x, y, self.n)
    }

    fn forward_activated(&self, x: &Tensor, act: Activation) -> Option<Result<Tensor>> {
        let kernel = Act::of(act).filter(|_| x.dtype() == DType::F32)?;
        Some(self.forward_values(x, Some(kernel)).and_then(|y| crate::linear::output(x, y, self.n)))
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    /// A following W8A8 op that quantizes each token on its own takes this op's activated
    /// rows straight from each task's cache ([`W8A8Linear::run_chain`]) when the input has
    /// row chunks enough for every thread; otherwise, or when the intermediate holds a value
    /// that is not finite, it declines and the caller runs the two ops, whose checks report it.
    fn forward_chain(&self, act: Activation, next: &dyn PreparedOp, x: &Tensor) -> Option<Result<Tensor>> {
        let next = next.as_any()?.downcast_ref::<W8A8Linear>()?;
        let kernel = Act::of(act)?;
        let m = x.elem_count() / self.k.max(1);
        if x.dtype() != DType::F32 || !self.chains_with(next) || !self.chain_pays(next, m) {
            return None;
        }
        let run = crate::linear::with_input_screened(&self.layer, &self.pool, x, self.k, self.screens(m), |v| {
            self.run_chain(Some(kernel), next, v)
        });
        match run {
            Ok(Some(y)) => Some(crate::linear::output(x, y, next.n)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Other W8A8 ops that quantize their input as this one does share one quantized copy
    /// of `x` ([`W8A8Linear::run_group`]); any other op makes it decline.
    fn forward_shared(&self, others: &[&dyn PreparedOp], x: &Tensor) -> Option<Result<Vec<Tensor>>> {
        let mut ops = vec![self];
        for o in others {
            let w = o.as_any()?.downcast_ref::<W8A8Linear>()?;
            if !self.shares_input_quantization(w) {
                return None;
            }
            ops.push(w);
        }
        Some(
            self.forward_group(&ops, x, None)
                .and_then(|ys| ys.into_iter().zip(&ops).map(|(y, o)| crate::linear::output(x, y, o.n)).collect()),
        )
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{MR_PAIRS, NR, Sink};

    /// Each of `blocks` against every 6-row tile of `x`: per pair of reduction indices, the
    /// block's 32 panel codes deinterleaved by one `vld2q` load into the two indices' values
    /// of its 16 columns and widened to i16, then per row eight widening multiply-adds
    /// (`smlal`) into the i32 sums, which stay in registers over the whole reduction (24 of
    /// the 32) and go through the sink's scalar epilogue.
    ///
    /// # Safety
    /// The CPU must support NEON; `x` holds `m` rows of `pairs` pairs (the pairs layout),
    /// `panel` whole blocks of as many pairs, `blocks.end` of them at least; the sink owns
    /// rows `0..m` × columns `16·blocks.start .. min(16·blocks.end, n)`.
    #[target_feature(enable = "neon")]
    pub unsafe fn products(
        x: &[i16],
        m: usize,
        pairs: usize,
        panel: &[i8],
        blocks: std::ops::Range<usize>,
        n: usize,
        sink: &Sink,
    ) {
        assert!(x.len() == m * pairs * 2 && blocks.end * pairs * 2 * NR <= panel.len());
        for b in blocks {
            let wb = &panel[b * pairs * 2 * NR..(b + 1) * pairs * 2 * NR];
            let j0 = b * NR;
            let mut r = 0;
            while r < m {
                let mr = (m - r).min(MR_PAIRS);
                let xs = &x[r * pairs * 2..(r + mr) * pairs * 2];
                macro_rules! tile {
                    ($mr:literal) => {{
                        let a = tile::<$mr>(xs, pairs, wb);
                        for (i, ai) in a.iter().enumerate() {
                            let mut acc = [0i32; NR];
                            for (q, v) in ai.iter().enumerate() {
                                // SAFETY: acc holds 16 lanes: 4q + 4 ≤ 16.
                                unsafe { vst1q_s32(acc.as_mut_ptr().add(4 * q), *v) };
                            }
                            let cols = NR.min(n - j0);
                            // SAFETY: row r + i, columns j0..j0 + cols are the sink's (caller's
                            // contract).
                            unsafe { sink.put(r + i, j0, &acc[..cols]) };
                        }
                    }};
                }
                match mr {
                    6 => tile!(6),
                    5 => tile!(5),
                    4 => tile!(4),
                    3 => tile!(3),
                    2 => tile!(2),
                    _ => tile!(1),
                }
                r += mr;
            }
        }
    }

    /// The exact i32 sums of `MR` pair-interleaved rows against one 16-column block.
    #[target_feature(enable = "neon")]
    #[inline]
    fn tile<const MR: usize>(x: &[i16], pairs: usize, wb: &[i8]) -> [[int32x4_t; 4]; MR] {
        assert!(x.len() == MR * pairs * 2 && wb.len() == pairs * 32);
        let mut a = [[vdupq_n_s32(0); 4]; MR];
        for p in 0..pairs {
            // SAFETY: p·32 + 32 ≤ wb.len(); row i's pair p sits at (p·MR + i)·2 < x.len().
            unsafe {
                // Columns 0–7 then 8–15, each column's two codes side by side: the even
                // bytes are index 2p's codes of the 16 columns, the odd ones 2p + 1's.
                let d = vld2q_s8(wb.as_ptr().add(p * 32));
                let lo = int16x8x2_t(vmovl_s8(vget_low_s8(d.0)), vmovl_s8(vget_low_s8(d.1)));
                let hi = int16x8x2_t(vmovl_high_s8(d.0), vmovl_high_s8(d.1));
                for (i, ai) in a.iter_mut().enumerate() {
                    let x0 = *x.get_unchecked((p * MR + i) * 2);
                    let x1 = *x.get_unchecked((p * MR + i) * 2 + 1);
                    ai[0] = vmlal_n_s16(vmlal_n_s16(ai[0], vget_low_s16(lo.0), x0), vget_low_s16(lo.1), x1);
                    ai[1] = vmlal_high_n_s16(vmlal_high_n_s16(ai[1], lo.0, x0), lo.1, x1);
                    ai[2] = vmlal_n_s16(vmlal_n_s16(ai[2], vget_low_s16(hi.0), x0), vget_low_s16(hi.1), x1);
                    ai[3] = vmlal_high_n_s16(vmlal_high_n_s16(ai[3], hi.0, x0), hi.1, x1);
                }
            }
        }
        a
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{MR_PAIRS, MR_QUADS, NR, Sink};

    /// Each of `blocks` against every 6-row tile of `x` (the last one smaller): the sums of
    /// one tile and block stay in twelve registers over the whole reduction and go through
    /// the sink's epilogue straight from them.
    ///
    /// # Safety
    /// The CPU must support AVX2; `x` holds `m` rows of `pairs` pairs (the pairs layout),
    /// `panel` whole blocks of as many pairs, `blocks.end` of them at least; the sink owns
    /// rows `0..m` × columns `16·blocks.start .. min(16·blocks.end, n)`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn products(
        x: &[i16],
        m: usize,
        pairs: usize,
        panel: &[i8],
        blocks: std::ops::Range<usize>,
        n: usize,
        sink: &Sink,
    ) {
        assert!(x.len() == m * pairs * 2 && blocks.end * pairs * 2 * NR <= panel.len());
        // Reductions longer than KC pairs run in slices, so a block's panel slice (8 KB)
        // stays in L1 across the row tiles; the partial sums between slices wait in `part`.
        let slices = pairs.div_ceil(KC).max(1);
        let cols = (blocks.end - blocks.start) * NR;
        let mut part = if slices > 1 { vec![0i32; m * cols] } else { Vec::new() };
        for s in 0..slices {
            let (p0, p1) = (s * KC, ((s + 1) * KC).min(pairs));
            let last = s + 1 == slices;
            for b in blocks.clone() {
                let wb = &panel[(b * pairs + p0) * 2 * NR..(b * pairs + p1) * 2 * NR];
                let pc = (b - blocks.start) * NR;
                let mut r = 0;
                while r < m {
                    let mr = (m - r).min(MR_PAIRS);
                    let xs = &x[(r * pairs + p0 * mr) * 2..(r * pairs + p1 * mr) * 2];
                    macro_rules! tile {
                        ($mr:literal) => {{
                            if last {
                                prefetch_out(sink, r, $mr, b * NR);
                            }
                            let init = (s > 0).then(|| load::<$mr>(&part, r, pc, cols));
                            let a = micro::<$mr>(xs, p1 - p0, wb, init);
                            if last {
                                // SAFETY: rows r..r + mr, block b's columns are the sink's
                                // (caller's contract).
                                unsafe { store(sink, r, b * NR, n, a) }
                            } else {
                                keep::<$mr>(&mut part, r, pc, cols, a)
                            }
                        }};
                    }
                    match mr {
                        6 => tile!(6),
                        5 => tile!(5),
                        4 => tile!(4),
                        3 => tile!(3),
                        2 => tile!(2),
                        _ => tile!(1),
                    }
                    r += mr;
                }
            }
        }
    }

    /// [`products`] for the quads layout (weights of at most 7 bits, see
    /// [`super::PanelData::Quads`]): each of `blocks` against every 8-row tile of `x`, in two
    /// halves of at most four rows; per quad of reduction indices two panel loads, per row
    /// one broadcast of its four unsigned codes, then per register `vpmaddubsw`, `vpmaddwd`
    /// by ones and an add into the i32 sums, which stay in registers over a slice of the
    /// reduction. After the last slice the sums lose their `shift` (the unsigned
    /// activations' excess) and go through the sink's epilogue, so the bits equal every
    /// other level's.
    ///
    /// # Safety
    /// The CPU must support AVX2; every weight code in `panel` lies in −64..=63 (otherwise
    /// an i16 pair sum may saturate: wrong sums, though no memory error); `x` holds `m` rows
    /// of `quads` quads (the quads layout), `panel` whole blocks of as many quads and `shift`
    /// 16 per block, `blocks.end` of them at least; the sink owns rows `0..m` × columns
    /// `16·blocks.start .. min(16·blocks.end, n)`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn products_quads(
        x: &[u8],
        m: usize,
        quads: usize,
        panel: &[i8],
        shift: &[i32],
        blocks: std::ops::Range<usize>,
        n: usize,
        sink: &Sink,
    ) {
        assert!(x.len() == m * quads * 4 && blocks.end * quads * 4 * NR <= panel.len());
        assert!(blocks.end * NR <= shift.len());
        // Slices of KC_QUADS quads: a block's panel slice (8 KB) and a tile's codes (4 KB)
        // stay in L1 across the row tiles.
        let slices = quads.div_ceil(KC_QUADS).max(1);
        let cols = (blocks.end - blocks.start) * NR;
        let mut part = if slices > 1 { vec![0i32; m * cols] } else { Vec::new() };
        for s in 0..slices {
            let (q0, q1) = (s * KC_QUADS, ((s + 1) * KC_QUADS).min(quads));
            let last = s + 1 == slices;
            for b in blocks.clone() {
                let wb = &panel[(b * quads + q0) * 4 * NR..(b * quads + q1) * 4 * NR];
                let pc = (b - blocks.start) * NR;
                let mut r = 0;
                while r < m {
                    let mr = (m - r).min(MR_QUADS);
                    let xs = &x[(r * quads + q0 * mr) * 4..(r * quads + q1 * mr) * 4];
                    let mut h0 = 0;
                    while h0 < mr {
                        let hr = (mr - h0).min(4);
                        let r0 = r + h0;
                        macro_rules! half {
                            ($hr:literal) => {{
                                if last {
                                    prefetch_out(sink, r0, $hr, b * NR);
                                }
                                let init = (s > 0).then(|| load::<$hr>(&part, r0, pc, cols));
                                let a = micro_quads::<$hr>(xs, mr, h0, q1 - q0, wb, init);
                                if last {
                                    // SAFETY: 16·b + 16 ≤ 16·blocks.end ≤ shift.len()
                                    // (asserted above).
                                    let sh = unsafe {
                                        let p = shift.as_ptr().add(b * NR) as *const __m256i;
                                        [_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1))]
                                    };
                                    let a =
                                        a.map(|ai| [_mm256_sub_epi32(ai[0], sh[0]), _mm256_sub_epi32(ai[1], sh[1])]);
                                    // SAFETY: rows r0..r0 + hr, block b's columns are the
                                    // sink's (caller's contract).
                                    unsafe { store(sink, r0, b * NR, n, a) }
                                } else {
                                    keep::<$hr>(&mut part, r0, pc, cols, a)
                                }
                            }};
                        }
                        match hr {
                            4 => half!(4),
                            3 => half!(3),
                            2 => half!(2),
                            _ => half!(1),
                        }
                        h0 += hr;
                    }
                    r += mr;
                }
            }
        }
    }

    /// Reduction quads per slice of [`products_quads`]: 128, as VNNI's, rather than 256
    /// (16 KB of panel and 8 KB of codes in L1): at 4096 × 1536 × 384 on one Zen 3 core,
    /// 65–69 against 53–57 GMAC/s in three alternating runs of the two builds
    /// (`BITS=7 T=1 w8a8_probe`), the other shapes within noise.
    const KC_QUADS: usize = 128;

    /// Rows `h0..h0 + HR` of an `mr`-row tile of u8 codes (quad-interleaved: row i's quad q
    /// is the i32 at `q·mr + i`) against one block of 16 columns, on top of `init`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn micro_quads<const HR: usize>(
        x: &[u8],
        mr: usize,
        h0: usize,
        quads: usize,
        wb: &[i8],
        init: Option<[[__m256i; 2]; HR]>,
    ) -> [[__m256i; 2]; HR] {
        let mut a = init.unwrap_or([[_mm256_setzero_si256(); 2]; HR]);
        assert!(h0 + HR <= mr && x.len() == mr * quads * 4 && wb.len() == quads * 64);
        let (xp, wp) = (x.as_ptr() as *const i32, wb.as_ptr());
        let ones = _mm256_set1_epi16(1);
        for q in 0..quads {
            // SAFETY: q·64 + 64 ≤ quads·64 = wb.len(), and row h0 + i's quad q is the i32 at
            // q·mr + h0 + i < mr·quads = x.len() / 4 (asserted above).
            unsafe {
                let w0 = _mm256_loadu_si256(wp.add(q * 64) as *const __m256i);
                let w1 = _mm256_loadu_si256(wp.add(q * 64 + 32) as *const __m256i);
                for (i, ai) in a.iter_mut().enumerate() {
                    let xv = _mm256_set1_epi32(xp.add(q * mr + h0 + i).read_unaligned());
                    ai[0] = _mm256_add_epi32(ai[0], _mm256_madd_epi16(_mm256_maddubs_epi16(xv, w0), ones));
                    ai[1] = _mm256_add_epi32(ai[1], _mm256_madd_epi16(_mm256_maddubs_epi16(xv, w1), ones));
                }
            }
        }
        a
    }

    /// Reduction pairs per slice of [`products`].
    const KC: usize = 256;

    /// Partial sums of rows `r..r + MR`, columns `c..c + 16` of `part` (`cols` per row).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn load<const MR: usize>(part: &[i32], r: usize, c: usize, cols: usize) -> [[__m256i; 2]; MR] {
        assert!((r + MR - 1) * cols + c + NR <= part.len());
        // SAFETY: every row's 16 lanes lie inside `part` (asserted for the last row).
        std::array::from_fn(|i| unsafe {
            let p = part.as_ptr().add((r + i) * cols + c) as *const __m256i;
            [_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1))]
        })
    }

    /// Stores partial sums where [`load`] reads them.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn keep<const MR: usize>(part: &mut [i32], r: usize, c: usize, cols: usize, a: [[__m256i; 2]; MR]) {
        assert!((r + MR - 1) * cols + c + NR <= part.len());
        for (i, ai) in a.iter().enumerate() {
            // SAFETY: as in `load`.
            unsafe {
                let p = part.as_mut_ptr().add((r + i) * cols + c) as *mut __m256i;
                _mm256_storeu_si256(p, ai[0]);
                _mm256_storeu_si256(p.add(1), ai[1]);
            }
        }
    }

    /// Asks for the lines of rows `r0..r0 + rows`, columns `j0..j0 + 16` of the sink's buffer
    /// ahead of [`store`] (see `simd::avx2::prefetch_tile16`). On Zen 3 (in-process A/B, medians of 15 alternating pairs at
    /// M = 4096, two threads) 2–5% faster with 8-bit weights and 2–10% with 7-bit ones at
    /// K = 384, within noise at K = 1536.
    #[inline]
    pub(super) fn prefetch_out(sink: &Sink, r0: usize, rows: usize, j0: usize) {
        // Both sinks hold 4-byte elements, so one element pointer type serves.
        let (base, n) = match *sink {
            Sink::I32 { acc, n } => (acc.cast::<f32>().cast_const(), n),
            Sink::F32 { out, n, .. } => (out.cast_const(), n),
        };
        crate::simd::avx2::prefetch_tile16(base.wrapping_add(r0 * n + j0), n, rows);
    }

    /// Rows `r0..r0 + MR`, columns `j0..j0 + 16` of the sums, through the sink: whole
    /// blocks straight from the registers (the F32 epilogue in them), a clipped last block
    /// through the scalar twin of the sink.
    ///
    /// # Safety
    /// The CPU must support AVX2; the sink owns those rows and columns `j0..min(j0 + 16, n)`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn store<const MR: usize>(sink: &Sink, r0: usize, j0: usize, n: usize, a: [[__m256i; 2]; MR]) {
        if j0 + NR > n {
            let mut tile = [0i32; NR];
            for (i, ai) in a.iter().enumerate() {
                // SAFETY: tile holds 16 lanes.
                unsafe {
                    _mm256_storeu_si256(tile.as_mut_ptr() as *mut __m256i, ai[0]);
                    _mm256_storeu_si256(tile.as_mut_ptr().add(8) as *mut __m256i, ai[1]);
                    sink.put(r0 + i, j0, &tile[..n - j0]);
                }
            }
            return;
        }
        match *sink {
            Sink::I32 { acc, n } => {
                for (i, ai) in a.iter().enumerate() {
                    // SAFETY: row r0 + i, columns j0..j0 + 16 ≤ n are the sink's.
                    unsafe {
                        let p = acc.add((r0 + i) * n + j0);
                        _mm256_storeu_si256(p as *mut __m256i, ai[0]);
                        _mm256_storeu_si256(p.add(8) as *mut __m256i, ai[1]);
                    }
                }
            }
            Sink::F32 { out, n, units, w_sum, w_scale, bias } => {
                assert!(j0 + NR <= w_sum.len().min(w_scale.len()).min(bias.len()) && r0 + MR <= units.len());
                // SAFETY: j0 + 16 ≤ the length of every per-column slice (asserted).
                let (ws, sc, bs) = unsafe {
                    let ld = |p: *const f32| [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))];
                    let wsp = w_sum.as_ptr().add(j0) as *const __m256i;
                    (
                        [_mm256_loadu_si256(wsp), _mm256_loadu_si256(wsp.add(1))],
                        ld(w_scale.as_ptr().add(j0)),
                        ld(bias.as_ptr().add(j0)),
                    )
                };
                for (i, ai) in a.iter().enumerate() {
                    let (sx, zx) = units[r0 + i];
                    let (sv, zv) = (_mm256_set1_ps(sx), _mm256_set1_epi32(zx));
                    for h in 0..2 {
                        // The scalar twin's operations in its order: the i32 difference, its
                        // conversion, the product of the scales, a multiply, then an add. A
                        // zero point of 0 (symmetric codes) leaves the sums as they are: the
                        // slow 32-bit multiply is skipped.
                        let d = if zx == 0 { ai[h] } else { _mm256_sub_epi32(ai[h], _mm256_mullo_epi32(zv, ws[h])) };
                        let t = _mm256_cvtepi32_ps(d);
                        let o = _mm256_add_ps(_mm256_mul_ps(t, _mm256_mul_ps(sv, sc[h])), bs[h]);
                        // SAFETY: row r0 + i, columns j0 + 8h .. + 8 ≤ n are the sink's.
                        unsafe { _mm256_storeu_ps(out.add((r0 + i) * n + j0 + 8 * h), o) };
                    }
                }
            }
        }
    }

    /// Minimum and maximum of `x`, eight lanes at a time, and whether every value is finite
    /// (NaN is tracked on its own: `vminps` drops it once a later value arrives).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn extremes(x: &[f32]) -> (f32, f32, bool) {
        let body = x.len() / 8 * 8;
        let (mut lo, mut hi) = (_mm256_set1_ps(f32::INFINITY), _mm256_set1_ps(f32::NEG_INFINITY));
        let mut nan = _mm256_setzero_ps();
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 ≤ body ≤ x.len().
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            lo = _mm256_min_ps(lo, v);
            hi = _mm256_max_ps(hi, v);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        }
        let (mut l, mut h) = ([0f32; 8], [0f32; 8]);
        // SAFETY: both arrays hold 8 floats.
        unsafe {
            _mm256_storeu_ps(l.as_mut_ptr(), lo);
            _mm256_storeu_ps(h.as_mut_ptr(), hi);
        }
        let tail = &x[body..];
        let lo = l.iter().chain(tail).copied().fold(f32::INFINITY, f32::min);
        let hi = h.iter().chain(tail).copied().fold(f32::NEG_INFINITY, f32::max);
        let finite =
            _mm256_movemask_ps(nan) == 0 && lo.is_finite() && hi.is_finite() && tail.iter().all(|v| !v.is_nan());
        (lo, hi, finite)
    }

    /// [`super::quantize_row`] eight lanes at a time: the IEEE quotient `x/s`, round-half-even
    /// (`vroundps` to nearest), the same integer clamp.
    ///
    /// With `recip = Some(1/s)` (rounded, a normal number, and every quotient finite) the
    /// quotient comes from Markstein's correction instead of `vdivps`, whose throughput held
    /// the quantization of a feed-forward block's 1536-wide rows: `q = x·y`, the exact
    /// remainder `r = x − q·s` (one FMA), `q' = q + r·y` (another) is the correctly rounded
    /// `x/s` when `y` is within half an ulp of `1/s` and `q` within an ulp of `x/s` (Markstein
    /// 1990; the handbook of floating-point arithmetic, theorem 4.9). The scalar twin divides;
    /// the tests compare them bit for bit, and 3·10⁹ random pairs over 200 binades (half of
    /// them within a few ulps of a rounding tie) matched IEEE division everywhere the quotient
    /// is finite.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `out.len() == x.len()`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_row(
        x: &[f32],
        s: f32,
        recip: Option<f32>,
        z: i32,
        (q_min, q_max): (i32, i32),
        offset: i32,
        out: &mut [i16],
    ) {
        assert!(out.len() == x.len());
        let body = x.len() - x.len() % 8;
        let (sv, zv) = (_mm256_set1_ps(s), _mm256_set1_epi32(z));
        let yv = _mm256_set1_ps(recip.unwrap_or(0.0));
        let quotient = |v: __m256| match recip {
            Some(_) => {
                let q = _mm256_mul_ps(v, yv);
                _mm256_fmadd_ps(_mm256_fnmadd_ps(q, sv, v), yv, q)
            }
            None => _mm256_div_ps(v, sv),
        };
        let (lo, hi) = (_mm256_set1_epi32(q_min), _mm256_set1_epi32(q_max));
        let (flo, fhi) = (_mm256_set1_ps((q_min - z) as f32), _mm256_set1_ps((q_max - z) as f32));
        let ov = _mm256_set1_epi32(offset);
        let mut i = 0;
        while i < body {
            // SAFETY: i + 8 ≤ body ≤ x.len() = out.len().
            unsafe {
                let v = _mm256_loadu_ps(x.as_ptr().add(i));
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(quotient(v));
                // Clamp in float first, so values past i32's range saturate as the scalar
                // path's `as i32` + clamp does (the bounds are integers, so in-range results
                // are equal).
                let r = _mm256_min_ps(_mm256_max_ps(r, flo), fhi);
                let q = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(r), zv), lo), hi);
                // Centred codes lie in −128..=127, so the saturating pack is exact.
                let c = _mm256_sub_epi32(q, ov);
                let packed = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256::<1>(c));
                _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, packed);
            }
            i += 8;
        }
        for t in body..x.len() {
            out[t] = (((x[t] / s).round_ties_even() as i32).saturating_add(z).clamp(q_min, q_max) - offset) as i16;
        }
    }

    /// A tile of `MR` rows of i16 codes (pair-interleaved, see [`Rows`]) against one block
    /// of 16 columns, on top of `init` (zeros when `None`): per pair of reduction indices two
    /// panel loads that widen the i8 codes to i16 (`vpmovsxbw`), per row one broadcast of its
    /// two codes, two `vpmaddwd` and two adds into the i32 sums, which stay in registers
    /// throughout.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn micro<const MR: usize>(
        x: &[i16],
        pairs: usize,
        wb: &[i8],
        init: Option<[[__m256i; 2]; MR]>,
    ) -> [[__m256i; 2]; MR] {
        let mut a = init.unwrap_or([[_mm256_setzero_si256(); 2]; MR]);
        assert!(x.len() == MR * pairs * 2 && wb.len() == pairs * 32);
        let (xp, wp) = (x.as_ptr() as *const i32, wb.as_ptr());
        for p in 0..pairs {
            // SAFETY: p·32 + 32 ≤ pairs·32 = wb.len(), and row i's pair p is the i32 at
            // p·MR + i < MR·pairs = x.len() / 2 (asserted above).
            unsafe {
                let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp.add(p * 32) as *const __m128i));
                let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp.add(p * 32 + 16) as *const __m128i));
                for (i, ai) in a.iter_mut().enumerate() {
                    let xv = _mm256_set1_epi32(xp.add(p * MR + i).read_unaligned());
                    ai[0] = _mm256_add_epi32(ai[0], _mm256_madd_epi16(xv, w0));
                    ai[1] = _mm256_add_epi32(ai[1], _mm256_madd_epi16(xv, w1));
                }
            }
        }
        a
    }
}

#[cfg(target_arch = "x86_64")]
// Register-blocked kernels index parallel arrays of accumulators by row and block.
#[allow(clippy::needless_range_loop)]
mod vnni {
    use std::arch::x86_64::*;

    use super::{MR_QUADS, NR, Sink};

    /// Reduction quads per slice of [`products`]: two blocks' panel slices (8 KB each) and a
    /// tile's activation slice (4 KB) stay in L1 across the row tiles.
    const KC: usize = 128;

    /// Blocks in pairs (32 columns, two registers per row) against every 8-row tile of `x`
    /// (the last ones smaller): per quad of reduction indices one panel load per block, per
    /// row one broadcast of its four codes and one `vpdpbusd` per block into the i32 sums,
    /// which stay in registers (up to 16 of the 32) over a slice of the reduction. After the
    /// last slice the sums lose their `shift` (the unsigned activations' excess) and go
    /// through the AVX2 sink epilogue, half a register at a time, so the bits equal the other
    /// levels'.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL and VNNI; `x` holds `m` rows of `quads` quads (the
    /// quads layout), `panel` whole blocks of as many quads and `shift` 16 per block,
    /// `blocks.end` of them at least; the sink owns rows `0..m` × columns
    /// `16·blocks.start .. min(16·blocks.end, n)`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn products(
        x: &[u8],
        m: usize,
        quads: usize,
        panel: &[i8],
        shift: &[i32],
        blocks: std::ops::Range<usize>,
        n: usize,
        sink: &Sink,
    ) {
        assert!(x.len() == m * quads * 4 && blocks.end * quads * 4 * NR <= panel.len());
        assert!(blocks.end * NR <= shift.len());
        let slices = quads.div_ceil(KC).max(1);
        let cols = (blocks.end - blocks.start) * NR;
        let mut part = if slices > 1 { vec![0i32; m * cols] } else { Vec::new() };
        for s in 0..slices {
            let (q0, q1) = (s * KC, ((s + 1) * KC).min(quads));
            let last = s + 1 == slices;
            let mut b = blocks.start;
            while b < blocks.end {
                let nb = (blocks.end - b).min(2);
                let wb = |b: usize| &panel[(b * quads + q0) * 4 * NR..(b * quads + q1) * 4 * NR];
                let w = [wb(b), wb(b + nb - 1)];
                let pc = (b - blocks.start) * NR;
                let mut r = 0;
                while r < m {
                    let mr = (m - r).min(MR_QUADS);
                    let xs = &x[(r * quads + q0 * mr) * 4..(r * quads + q1 * mr) * 4];
                    macro_rules! tile {
                        ($mr:literal, $nb:literal) => {{
                            let init = (s > 0).then(|| load::<$mr, $nb>(&part, r, pc, cols));
                            let a = micro::<$mr, $nb>(xs, q1 - q0, w, init);
                            if last {
                                // SAFETY: rows r..r + mr, blocks b..b + nb's columns are the
                                // sink's (caller's contract); the shifts lie within `shift`.
                                unsafe { finish::<$mr, $nb>(sink, r, b, n, shift, a) }
                            } else {
                                keep::<$mr, $nb>(&mut part, r, pc, cols, a)
                            }
                        }};
                    }
                    macro_rules! rows {
                        ($nb:literal) => {
                            match mr {
                                8 => tile!(8, $nb),
                                7 => tile!(7, $nb),
                                6 => tile!(6, $nb),
                                5 => tile!(5, $nb),
                                4 => tile!(4, $nb),
                                3 => tile!(3, $nb),
                                2 => tile!(2, $nb),
                                _ => tile!(1, $nb),
                            }
                        };
                    }
                    if nb == 2 {
                        rows!(2)
                    } else {
                        rows!(1)
                    }
                    r += mr;
                }
                b += nb;
            }
        }
    }

    /// Partial sums of rows `r..r + MR`, columns `c..c + 16·NB` of `part` (`cols` per row).
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    fn load<const MR: usize, const NB: usize>(part: &[i32], r: usize, c: usize, cols: usize) -> [[__m512i; NB]; MR] {
        assert!((r + MR - 1) * cols + c + NB * NR <= part.len());
        // SAFETY: every row's 16·NB lanes lie inside `part` (asserted for the last row).
        std::array::from_fn(|i| {
            std::array::from_fn(|h| unsafe {
                _mm512_loadu_si512(part.as_ptr().add((r + i) * cols + c + h * NR).cast())
            })
        })
    }

    /// Stores partial sums where [`load`] reads them.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    fn keep<const MR: usize, const NB: usize>(
        part: &mut [i32],
        r: usize,
        c: usize,
        cols: usize,
        a: [[__m512i; NB]; MR],
    ) {
        assert!((r + MR - 1) * cols + c + NB * NR <= part.len());
        for (i, ai) in a.iter().enumerate() {
            for (h, v) in ai.iter().enumerate() {
                // SAFETY: as in `load`.
                unsafe { _mm512_storeu_si512(part.as_mut_ptr().add((r + i) * cols + c + h * NR).cast(), *v) };
            }
        }
    }

    /// The exact sums of rows `r0..r0 + MR`, blocks `b..b + NB`: `a` less each column's
    /// shift, through the AVX2 store (its epilogue and its clipping of the last block).
    ///
    /// # Safety
    /// As [`products`]: the sink owns those rows and the blocks' columns (clipped to `n`),
    /// `shift` holds 16 per block.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn finish<const MR: usize, const NB: usize>(
        sink: &Sink,
        r0: usize,
        b: usize,
        n: usize,
        shift: &[i32],
        a: [[__m512i; NB]; MR],
    ) {
        assert!((b + NB) * NR <= shift.len());
        for h in 0..NB {
            let j0 = (b + h) * NR;
            // SAFETY: j0 + 16 ≤ shift.len() (asserted).
            let sh = unsafe { _mm512_loadu_si512(shift.as_ptr().add(j0).cast()) };
            let halves: [[__m256i; 2]; MR] = std::array::from_fn(|i| {
                let v = _mm512_sub_epi32(a[i][h], sh);
                [_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v)]
            });
            // SAFETY: the caller's rows and block b + h's columns (clipped by `store`).
            unsafe { super::avx2::store::<MR>(sink, r0, j0, n, halves) };
        }
    }

    /// A tile of `MR` rows of u8 codes (quad-interleaved) against `NB` blocks of 16 columns
    /// (`w[h]`, `quads · 64` bytes each; with one block both name it), on top of `init`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    fn micro<const MR: usize, const NB: usize>(
        x: &[u8],
        quads: usize,
        w: [&[i8]; 2],
        init: Option<[[__m512i; NB]; MR]>,
    ) -> [[__m512i; NB]; MR] {
        let mut a = init.unwrap_or([[_mm512_setzero_si512(); NB]; MR]);
        assert!(x.len() == MR * quads * 4 && w[0].len() == quads * 64 && w[1].len() == quads * 64);
        let xp = x.as_ptr() as *const i32;
        for q in 0..quads {
            // SAFETY: q·64 + 64 ≤ quads·64 = w[h].len(), and row i's quad q is the i32 at
            // q·MR + i < MR·quads = x.len() / 4 (asserted above).
            unsafe {
                let wv: [__m512i; NB] = std::array::from_fn(|h| _mm512_loadu_si512(w[h].as_ptr().add(q * 64).cast()));
                for (i, ai) in a.iter_mut().enumerate() {
                    let xv = _mm512_set1_epi32(xp.add(q * MR + i).read_unaligned());
                    for (acc, wh) in ai.iter_mut().zip(&wv) {
                        *acc = _mm512_dpbusd_epi32(*acc, xv, *wh);
                    }
                }
            }
        }
        a
    }
}

#[cfg(test)]
mod tests;
