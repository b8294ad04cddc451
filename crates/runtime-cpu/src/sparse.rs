//! Sparse linear weights: unstructured (CSR), semi-structured N:M (2:4, 4:8) and block-sparse
//! weights, all run by one row-sparse kernel that touches only stored values: for a tile of
//! input rows transposed into `[k][L]` lanes, each output accumulates `value · x[col]` over its
//! nonzeros, `L` rows per fused multiply-add.
//!
//! A sparse weight pays off only below a density: [`SPARSE_MAX_DENSITY`] is the crossover
//! measured against pare's dense GEMM (`cargo bench -p pare-benches --bench sparse`); denser
//! weights are densified at `prepare` and run on the dense kernel.
//!
//! 2:4 weights run here too. A dedicated 2:4 kernel in the dense GEMM's layout (outputs in
//! the lanes, each row's four inputs of a group broadcast to every 128-bit lane, each
//! output's two picked by `vpermilps`, two FMAs) was tried and measured slower on Zen 4:
//! 47 ms against this kernel's 33 ms at 4096×384×1536 on one core, with AVX-512 or AVX2,
//! because each useful FMA needs a permute and the permutes share the FMA pipes. Without a
//! permute, skipping the zeros takes a load per FMA (this kernel), which holds it to 0.4–0.6
//! of the FMA peak: about 1.3× the dense GEMM at 50% density on Zen 4 rather than 2×, and
//! no more than the dense GEMM's speed on Zen 3 (whose dense kernel reaches 0.75–0.8).

use rayon::prelude::*;

use crate::gemm::OutPtr;
use crate::simd::{Aligned, SimdLevel};

/// The density (stored nonzeros / elements) above which the dense GEMM is at least as fast as
/// this kernel: the crossover the `sparse` bench measures at MiniLM's 4096×384×1536. Zen 3,
/// AVX2, since the dense GEMM prefetches its output tiles (2026-11-28): sparse 1.61× dense at
/// 30%, 1.26× at 40%, 0.97–1.05× at 50% unstructured and 1.01–1.02× for 2:4, 0.66–0.71× at
/// 60–70% (before that change: 1.21× at 50%, 1.02× at 60%); Zen 4, AVX-512 (no output
/// prefetch in its 12×16 kernel): 1.8× at 30%, 1.3× at 50%, 1.0× at 70%. So 2:4 weights (at
/// most 50%) run sparse, and unstructured ones just above half dense. One threshold for every
/// level, so a weight takes the same kernel, and gives the same bits, on every CPU.
pub const SPARSE_MAX_DENSITY: f64 = 0.5;

/// Reduction indices per slice: a pass over one or more slices of a tile's transposed inputs
/// (`KC × lanes` floats per slice) stays in L1 while every output of a chunk reads its
/// nonzeros' columns from it; partial sums carry over between passes.
const KC: usize = 64;

/// Slices per pass at `lanes` rows: as many as keep a pass's transposed inputs within 32 KiB
/// (two at 64 lanes, one at AVX-512's 128), and one wherever several accumulator sets share
/// the work (below 64 lanes), because there merging slices would change the order of
/// additions. Longer passes pay where outputs have few nonzeros per slice: each pass ends in
/// a mispredicted loop exit and a store of the partial sums. On Zen 3 (AVX2, 64 lanes, `K`
/// = 384, 2 threads; an in-process A/B, the median ratio of 61 alternating pairs) two slices
/// per pass ran 7% faster at 10% density, 9% at 40%, 6% at 50% unstructured and the same for
/// 2:4.
fn slices_per_pass(lanes: usize) -> usize {
    if lanes == 64 { 2 } else { 1 }
}
/// Outputs per chunk (their transposed sums, `CHUNK × lanes` floats, stay in L1 across the
/// slices).
const CHUNK: usize = 64;

/// Rows per tile for `m` input rows below AVX-512's 128 (eight registers per nonzero there):
/// 64 (eight AVX2 registers per nonzero, so the loads of the
/// index and value are shared by eight FMAs, and the weights stream once per 64 rows) when the
/// batch allows, else 32, 16 or 8.
fn lanes_for(m: usize) -> usize {
    match m {
        64.. => 64,
        32.. => 32,
        16.. => 16,
        _ => 8,
    }
}

/// Interleaved accumulator sets at `lanes` rows: at least eight independent FMA chains (the
/// FMA latency × throughput), twelve where the registers allow.
const fn sets_for(lanes: usize) -> usize {
    if lanes >= 64 { 1 } else { 96 / lanes }
}

/// `y[r][j] = bias[j] + yt[j − c0][r − r0]` for rows `r0..r1`, outputs `c0..c1`: the
/// transposed tile back into row-major output, 8 × 8 blocks at a time on AVX2.
///
/// # Safety
/// `y` must be valid for writes of rows `r0..r1` (row stride `n`) at columns `c0..c1`, and
/// no other thread may touch them during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn write_back(
    level: SimdLevel,
    yt: &[f32],
    lanes: usize,
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
    bias: Option<&[f32]>,
    y: *mut f32,
    n: usize,
) {
    // The whole 8 × 8 blocks done in registers (none without AVX2).
    let (rb, cb) = match level {
        #[cfg(target_arch = "x86_64")]
        l if l.avx2() => {
            let (rb, cb) = ((r1 - r0) / 8 * 8, (c1 - c0) / 8 * 8);
            // SAFETY: AVX2 was detected; the blocks lie within the caller's rows and columns.
            unsafe { avx2::write_back_blocks(yt, lanes, r0, rb, c0, cb, bias, y, n) };
            (rb, cb)
        }
        _ => (0, 0),
    };
    // The rest: the columns right of the blocks in their rows, then the rows below them (a
    // loop over the whole tile that skipped the blocks cost 12% of a 10%-dense layer's time).
    let rest = (r0..r0 + rb).flat_map(|r| (c0 + cb..c1).map(move |j| (r, j)));
    for (r, j) in rest.chain((r0 + rb..r1).flat_map(|r| (c0..c1).map(move |j| (r, j)))) {
        // SAFETY: (r, j) is inside the caller's block.
        unsafe { *y.add(r * n + j) = bias.map_or(0.0, |b| b[j]) + yt[(j - c0) * lanes + (r - r0)] };
    }
}

/// A weight `[n, k]` as its nonzeros, output by output (each output's at ascending input
/// columns `cols`, values `vals`); `split` marks where each output's nonzeros start and
/// cross into the next slice of `KC` (64) columns.
#[derive(Debug, Clone)]
pub struct SparseRows {
    n: usize,
    k: usize,
    cols: Vec<u32>,
    vals: Vec<f32>,
    /// `split[j·(slices + 1) + s]`: output j's first nonzero at column ≥ s·KC.
    split: Vec<u32>,
}

impl SparseRows {
    /// The nonzeros of row-major dense values `w` (`[n, k]`). Stored zeros of a sparse format
    /// (an N:M slot that holds 0) are dropped: they contribute nothing for finite inputs.
    pub fn from_dense(w: &[f32], n: usize, k: usize) -> Self {
        assert!(w.len() == n * k);
        let mut ptr = Vec::with_capacity(n + 1);
        let (mut cols, mut vals) = (Vec::new(), Vec::new());
        ptr.push(0);
        for row in w.chunks(k.max(1)).take(n) {
            for (c, &v) in row.iter().enumerate() {
                if v != 0.0 {
                    cols.push(c as u32);
                    vals.push(v);
                }
            }
            ptr.push(vals.len() as u32);
        }
        let slices = k.div_ceil(KC);
        let mut split = Vec::with_capacity(n * (slices + 1));
        for j in 0..n {
            let (a, b) = (ptr[j] as usize, ptr[j + 1] as usize);
            for s in 0..=slices {
                split.push((a + cols[a..b].partition_point(|&c| (c as usize) < s * KC)) as u32);
            }
        }
        Self { n, k, cols, vals, split }
    }

    /// Output `j`'s nonzeros in slices `s0..s1` (columns `s0·KC .. s1·KC`), as a range of
    /// `vals`.
    fn slice(&self, j: usize, (s0, s1): (usize, usize)) -> std::ops::Range<usize> {
        let at = j * (self.k.div_ceil(KC) + 1);
        self.split[at + s0] as usize..self.split[at + s1] as usize
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Stored nonzeros / elements.
    pub fn density(&self) -> f64 {
        self.vals.len() as f64 / (self.n * self.k).max(1) as f64
    }

    /// `y[m, n] = x[m, k]·Wᵀ + bias` on `pool`: row tiles (and output ranges when there are
    /// few tiles) split across tasks, each output element computed whole by one.
    pub fn run(&self, level: SimdLevel, pool: &rayon::ThreadPool, x: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
        assert!(y.len() == x.len() / self.k.max(1) * self.n);
        // SAFETY: y holds m·n floats (asserted).
        unsafe { self.run_raw(level, pool, x, bias, y.as_mut_ptr(), None) };
    }

    /// [`SparseRows::run`] into `m·n` floats at `y`, which may be uninitialised: each element
    /// is written once (then, with `act`, activated in place while in cache). Returns whether
    /// every input value is finite: the transposition into tiles reads each one and screens it
    /// on the way (a separate pass cost 4% at 10% density); the outputs are complete either way.
    ///
    /// # Safety
    /// `y` must be valid for writes of `m·n` floats that nothing else touches during the call.
    pub(crate) unsafe fn run_raw(
        &self,
        level: SimdLevel,
        pool: &rayon::ThreadPool,
        x: &[f32],
        bias: Option<&[f32]>,
        y: *mut f32,
        act: Option<crate::nonlinear::Act>,
    ) -> bool {
        let (n, k) = (self.n, self.k);
        let m = x.len() / k.max(1);
        assert!(x.len() == m * k);
        if m == 0 || n == 0 {
            return x.iter().all(|v| v.is_finite());
        }
        let lanes = if level.avx512() && m >= 128 { 128 } else { lanes_for(m) };
        let tiles = m.div_ceil(lanes);
        let (splits, per) = crate::gemm::column_split(pool, tiles, n);
        let out = OutPtr(y);
        let finite = std::sync::atomic::AtomicBool::new(true);
        pool.install(|| {
            // One pair of scratch tiles per worker job, not per task: at 128 lanes the
            // transposed input is 192 KiB, which malloc maps and unmaps each time (page
            // faults were a tenth of a 10%-dense layer's time).
            let scratch = || (Aligned::<f32>::new(k * lanes), Aligned::<f32>::new(CHUNK * lanes));
            (0..tiles * splits).into_par_iter().for_each_init(scratch, |(xt, yt), t| {
                let (ti, s) = (t / splits, t % splits);
                let (r0, r1) = (ti * lanes, ((ti + 1) * lanes).min(m));
                let (j0, j1) = ((s * per).min(n), ((s + 1) * per).min(n));
                if !crate::simd::transpose_screened(level, &x[r0 * k..r1 * k], k, r1 - r0, k, xt, lanes) {
                    finite.store(false, std::sync::atomic::Ordering::Relaxed);
                }
                if r1 - r0 < lanes {
                    // A last, partial tile: its unused lanes hold an earlier tile's inputs;
                    // zero them so every lane computes on defined values (lanes never mix).
                    for col in xt.chunks_exact_mut(lanes) {
                        col[r1 - r0..].fill(0.0);
                    }
                }
                for c0 in (j0..j1).step_by(CHUNK) {
                    let c1 = (c0 + CHUNK).min(j1);
                    let yt = &mut yt[..(c1 - c0) * lanes];
                    let (slices, step) = (k.div_ceil(KC), slices_per_pass(lanes));
                    for s0 in (0..slices).step_by(step) {
                        self.tile(level, xt, lanes, (c0, c1), (s0, (s0 + step).min(slices)), yt);
                    }
                    // SAFETY: task t owns rows r0..r1 × outputs j0..j1 of y; tasks partition
                    // y, which outlives `pool.install`.
                    unsafe { write_back(level, yt, lanes, (r0, r1), (c0, c1), bias, out.get(), n) };
                    if let Some(act) = act {
                        for r in r0..r1 {
                            // SAFETY: as above: row r, outputs c0..c1 are this task's.
                            let row = unsafe { std::slice::from_raw_parts_mut(out.get().add(r * n + c0), c1 - c0) };
                            crate::nonlinear::activation_in_place(level, act, row);
                        }
                    }
                }
            })
        });
        finite.into_inner()
    }

    /// Outputs `j0..j1`'s sums over slices `sl` (a range) of the transposed tile `xt`
    /// (`[k][lanes]`), added to `yt` (`[j][lanes]`; set on the first slice).
    ///
    /// Per output and lane the order of operations is fixed: [`sets_for`] accumulators, the
    /// first starting from the sum so far (zero on the first slice), take the pass's
    /// nonzeros in turn by fused multiply-add, and are then summed left to right.
    fn tile(
        &self,
        level: SimdLevel,
        xt: &[f32],
        lanes: usize,
        (j0, j1): (usize, usize),
        sl: (usize, usize),
        yt: &mut [f32],
    ) {
        assert!(xt.len() == self.k * lanes && yt.len() == (j1 - j0) * lanes && j1 <= self.n);
        match level {
            #[cfg(target_arch = "x86_64")]
            l if l.avx512() && lanes >= 64 => {
                // SAFETY: AVX-512 F was detected just above; every column index is < k (built
                // by `from_dense`), lengths asserted above.
                unsafe {
                    match lanes {
                        128 => avx512::tile::<8>(self, xt, (j0, j1), sl, yt),
                        _ => avx512::tile::<4>(self, xt, (j0, j1), sl, yt),
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            l if l.avx2() => {
                // SAFETY: AVX2 and FMA were detected just above; every column index is < k
                // (built by `from_dense`), lengths asserted above.
                unsafe {
                    match lanes {
                        64 => avx2::tile::<8, { sets_for(64) }>(self, xt, (j0, j1), sl, yt),
                        32 => avx2::tile::<4, { sets_for(32) }>(self, xt, (j0, j1), sl, yt),
                        16 => avx2::tile::<2, { sets_for(16) }>(self, xt, (j0, j1), sl, yt),
                        _ => avx2::tile::<1, { sets_for(8) }>(self, xt, (j0, j1), sl, yt),
                    }
                }
            }
            _ => {
                let sets = sets_for(lanes);
                let mut acc = vec![0f32; sets];
                for j in j0..j1 {
                    let nz = self.slice(j, sl);
                    for l in 0..lanes {
                        let y = &mut yt[(j - j0) * lanes + l];
                        acc.fill(0.0);
                        if sl.0 > 0 {
                            acc[0] = *y;
                        }
                        for (i, z) in nz.clone().enumerate() {
                            let (c, v) = (self.cols[z] as usize, self.vals[z]);
                            acc[i % sets] = v.mul_add(xt[c * lanes + l], acc[i % sets]);
                        }
                        *y = acc.iter().skip(1).fold(acc[0], |s, &a| s + a);
                    }
                }
            }
        }
    }
}

// Register-blocked kernels index parallel arrays of accumulators and operands by lane.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::SparseRows;
    use crate::simd::avx2::transpose8;

    /// [`super::write_back`] for the whole 8 × 8 blocks: rows `r0 .. r0 + rb`, outputs
    /// `c0 .. c0 + cb` (both multiples of 8), each block transposed in registers.
    ///
    /// # Safety
    /// AVX2; as [`super::write_back`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn write_back_blocks(
        yt: &[f32],
        lanes: usize,
        r0: usize,
        rb: usize,
        c0: usize,
        cb: usize,
        bias: Option<&[f32]>,
        y: *mut f32,
        n: usize,
    ) {
        assert!(cb * lanes <= yt.len() && rb <= lanes && bias.is_none_or(|b| b.len() >= c0 + cb));
        // Row blocks outer: each row's outputs c0..c0+cb are written left to right, whole
        // cache lines in a row, which ran 5% faster at 10% density than the column-block
        // order (Zen 3, in-process A/B): the stores' lines are fetched for ownership in
        // ascending order, which the L2 prefetcher follows.
        for ib in (0..rb).step_by(8) {
            for jb in (0..cb).step_by(8) {
                let b = match bias {
                    // SAFETY: c0 + jb + 8 ≤ c0 + cb ≤ bias.len() (one bias per output).
                    Some(b) => unsafe { _mm256_loadu_ps(b.as_ptr().add(c0 + jb)) },
                    None => _mm256_setzero_ps(),
                };
                // Rows of the block in yt are outputs (jb + i), columns are input rows.
                // SAFETY: (jb + i)·lanes + ib + 8 ≤ cb·lanes ≤ yt.len().
                let v: [__m256; 8] =
                    std::array::from_fn(|i| unsafe { _mm256_loadu_ps(yt.as_ptr().add((jb + i) * lanes + ib)) });
                let rows = transpose8(v);
                for (i, row) in rows.iter().enumerate() {
                    // SAFETY: row r0 + ib + i < r0 + rb, outputs c0 + jb .. + 8 < c0 + cb: in the
                    // caller's block.
                    unsafe { _mm256_storeu_ps(y.add((r0 + ib + i) * n + c0 + jb), _mm256_add_ps(b, *row)) };
                }
            }
        }
    }

    /// `V` registers (8·V rows) per nonzero, `S` accumulator sets taking the slice's nonzeros
    /// in turn (S·V FMA chains in flight), as [`SparseRows::tile`] describes.
    ///
    /// # Safety
    /// AVX2 and FMA; `xt` is `[k][8·V]`, `yt` holds `(j1 − j0)·8·V`, column indices `< k`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const V: usize, const S: usize>(
        w: &SparseRows,
        xt: &[f32],
        (j0, j1): (usize, usize),
        sl: (usize, usize),
        yt: &mut [f32],
    ) {
        let lanes = 8 * V;
        assert!(xt.len() == w.k * lanes && yt.len() == (j1 - j0) * lanes && j1 <= w.n);
        for j in j0..j1 {
            let nz = w.slice(j, sl);
            let (cols, vals) = (&w.cols[nz.clone()], &w.vals[nz]);
            let yp = (j - j0) * lanes;
            let mut acc = [[_mm256_setzero_ps(); V]; S];
            if sl.0 > 0 {
                for (q, a) in acc[0].iter_mut().enumerate() {
                    // SAFETY: yp + 8q + 8 ≤ (j1 − j0)·lanes = yt.len().
                    *a = unsafe { _mm256_loadu_ps(yt.as_ptr().add(yp + 8 * q)) };
                }
            }
            let step = |accs: &mut [__m256; V], c: u32, v: f32| {
                let c = c as usize;
                assert!(c < w.k);
                let v = _mm256_set1_ps(v);
                for (q, a) in accs.iter_mut().enumerate() {
                    // SAFETY: c < k, so c·lanes + 8q + 8 ≤ k·lanes = xt.len().
                    let xv = unsafe { _mm256_loadu_ps(xt.as_ptr().add(c * lanes + 8 * q)) };
                    *a = _mm256_fmadd_ps(v, xv, *a);
                }
            };
            let whole = cols.len() / S * S;
            for (cs, vs) in cols[..whole].chunks_exact(S).zip(vals[..whole].chunks_exact(S)) {
                for (set, accs) in acc.iter_mut().enumerate() {
                    step(accs, cs[set], vs[set]);
                }
            }
            for (set, accs) in acc.iter_mut().enumerate().take(cols.len() - whole) {
                step(accs, cols[whole + set], vals[whole + set]);
            }
            for q in 0..V {
                let mut s = acc[0][q];
                for a in &acc[1..] {
                    s = _mm256_add_ps(s, a[q]);
                }
                // SAFETY: yp + 8q + 8 ≤ yt.len().
                unsafe { _mm256_storeu_ps(yt.as_mut_ptr().add(yp + 8 * q), s) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::SparseRows;

    /// [`super::avx2::tile`] with one accumulator set (as at 64 lanes and more) and `V`
    /// sixteen-lane registers per nonzero: per lane the same fused multiply-adds in the same
    /// order, so the same bits; at 128 lanes eight independent chains cover the FMA latency.
    ///
    /// # Safety
    /// AVX-512 F; `xt` is `[k][16·V]`, `yt` holds `(j1 − j0)·16·V`, column indices `< k`.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn tile<const V: usize>(
        w: &SparseRows,
        xt: &[f32],
        (j0, j1): (usize, usize),
        sl: (usize, usize),
        yt: &mut [f32],
    ) {
        let lanes = 16 * V;
        assert!(xt.len() == w.k * lanes && yt.len() == (j1 - j0) * lanes && j1 <= w.n);
        for j in j0..j1 {
            let nz = w.slice(j, sl);
            let (cols, vals) = (&w.cols[nz.clone()], &w.vals[nz]);
            let yp = (j - j0) * lanes;
            let mut acc = [_mm512_setzero_ps(); V];
            if sl.0 > 0 {
                for (q, a) in acc.iter_mut().enumerate() {
                    // SAFETY: yp + 16q + 16 ≤ (j1 − j0)·lanes = yt.len().
                    *a = unsafe { _mm512_loadu_ps(yt.as_ptr().add(yp + 16 * q)) };
                }
            }
            for (&c, &v) in cols.iter().zip(vals) {
                let c = c as usize;
                assert!(c < w.k);
                let v = _mm512_set1_ps(v);
                for (q, a) in acc.iter_mut().enumerate() {
                    // SAFETY: c < k, so c·lanes + 16q + 16 ≤ k·lanes = xt.len().
                    let xv = unsafe { _mm512_loadu_ps(xt.as_ptr().add(c * lanes + 16 * q)) };
                    *a = _mm512_fmadd_ps(v, xv, *a);
                }
            }
            for (q, a) in acc.iter().enumerate() {
                // SAFETY: yp + 16q + 16 ≤ yt.len().
                unsafe { _mm512_storeu_ps(yt.as_mut_ptr().add(yp + 16 * q), *a) };
            }
        }
    }
}

#[cfg(test)]
mod tests;
