//! Sparse linear weights: unstructured (CSR), semi-structured N:M (2:4, 4:8) and block-sparse
//! weights, all run by one row-sparse kernel that touches only stored values: for a tile of
//! input rows transposed into `[k][L]` lanes, each output accumulates `value · x[col]` over its
//! nonzeros, `L` rows per fused multiply-add.
//!
//! A sparse weight pays off only below a density: [`SPARSE_MAX_DENSITY`] is the crossover
//! measured against pare's dense GEMM (`cargo bench -p pare-benches --bench sparse`); denser
//! weights are densified at `prepare` and run on the dense kernel.

use rayon::prelude::*;

use crate::gemm::OutPtr;
use crate::simd::SimdLevel;

/// The density (stored nonzeros / elements) above which the dense GEMM is faster than this
/// kernel: the crossover the `sparse` bench measures at MiniLM's 4096×384×1536 on AVX2 (sparse
/// 1.1× dense at 30%, 0.76× at 50%), so 2:4 weights (50%) run densified for now.
pub const SPARSE_MAX_DENSITY: f64 = 0.3;

/// Rows of `x` per tile in the wide kernel (two AVX2 registers; a tile of MiniLM's 384 inputs
/// is 24 KiB, inside L1, where the nonzeros' scattered column reads must hit).
const WIDE: usize = 16;
/// Interleaved accumulator sets (consecutive nonzeros go to different sets, so enough FMA
/// chains are in flight).
const SETS: usize = 4;
/// Rows per tile when the batch is small.
const NARROW: usize = 8;

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
    let (mut rb, mut cb) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if level == SimdLevel::Avx2 && SimdLevel::detect() >= SimdLevel::Avx2 {
        (rb, cb) = ((r1 - r0) / 8 * 8, (c1 - c0) / 8 * 8);
        // SAFETY: AVX2 was detected; the blocks lie within the caller's rows and columns.
        unsafe { avx2::write_back_blocks(yt, lanes, r0, rb, c0, cb, bias, y, n) };
    }
    for r in r0..r1 {
        for j in c0..c1 {
            if r - r0 < rb && j - c0 < cb {
                continue;
            }
            // SAFETY: (r, j) is inside the caller's block.
            unsafe { *y.add(r * n + j) = bias.map_or(0.0, |b| b[j]) + yt[(j - c0) * lanes + (r - r0)] };
        }
    }
}

/// A weight `[n, k]` as its nonzeros, output by output: output `j`'s values are
/// `vals[ptr[j]..ptr[j+1]]` at input columns `cols[..]` (ascending).
#[derive(Debug, Clone)]
pub struct SparseRows {
    n: usize,
    k: usize,
    ptr: Vec<u32>,
    cols: Vec<u32>,
    vals: Vec<f32>,
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
        Self { n, k, ptr, cols, vals }
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
        let (n, k) = (self.n, self.k);
        let m = x.len() / k.max(1);
        assert!(x.len() == m * k && y.len() == m * n);
        if m == 0 || n == 0 {
            return;
        }
        let lanes = if m >= WIDE { WIDE } else { NARROW };
        let tiles = m.div_ceil(lanes);
        let (splits, per) = crate::gemm::column_split(pool, tiles, n);
        let out = OutPtr(y.as_mut_ptr());
        pool.install(|| {
            (0..tiles * splits).into_par_iter().for_each(|t| {
                let (ti, s) = (t / splits, t % splits);
                let (r0, r1) = (ti * lanes, ((ti + 1) * lanes).min(m));
                let (j0, j1) = ((s * per).min(n), ((s + 1) * per).min(n));
                let mut xt = vec![0f32; k * lanes];
                for r in r0..r1 {
                    for (c, &v) in x[r * k..(r + 1) * k].iter().enumerate() {
                        xt[c * lanes + (r - r0)] = v;
                    }
                }
                // Outputs in chunks small enough for L1, written back as soon as computed.
                const CHUNK: usize = 64;
                let mut yt = vec![0f32; CHUNK * lanes];
                for c0 in (j0..j1).step_by(CHUNK) {
                    let c1 = (c0 + CHUNK).min(j1);
                    let yt = &mut yt[..(c1 - c0) * lanes];
                    self.tile(level, &xt, lanes, c0, c1, yt);
                    // SAFETY: task t owns rows r0..r1 × outputs j0..j1 of y; tasks partition
                    // y, which outlives `pool.install`.
                    unsafe { write_back(level, yt, lanes, (r0, r1), (c0, c1), bias, out.get(), n) };
                }
            })
        });
    }

    /// Outputs `j0..j1` for one transposed tile `xt` (`[k][lanes]`) into `yt` (`[j][lanes]`).
    fn tile(&self, level: SimdLevel, xt: &[f32], lanes: usize, j0: usize, j1: usize, yt: &mut [f32]) {
        match level {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 if SimdLevel::detect() >= SimdLevel::Avx2 => {
                // SAFETY: AVX2 and FMA were detected just above; every column index is < k
                // (built by `from_dense`), xt holds k·lanes and yt (j1 − j0)·lanes floats.
                unsafe {
                    if lanes == WIDE {
                        avx2::tile::<{ WIDE / 8 }>(self, xt, j0, j1, yt)
                    } else {
                        avx2::tile::<{ NARROW / 8 }>(self, xt, j0, j1, yt)
                    }
                }
            }
            _ => {
                // The same interleaved accumulator sets per lane as the AVX2 path, summed in
                // the same order.
                for j in j0..j1 {
                    let mut acc = vec![[0f32; SETS]; lanes];
                    for (i, nz) in (self.ptr[j] as usize..self.ptr[j + 1] as usize).enumerate() {
                        let (c, v) = (self.cols[nz] as usize, self.vals[nz]);
                        for (l, a) in acc.iter_mut().enumerate() {
                            a[i % SETS] = v.mul_add(xt[c * lanes + l], a[i % SETS]);
                        }
                    }
                    for (l, a) in acc.iter().enumerate() {
                        yt[(j - j0) * lanes + l] = (a[0] + a[1]) + (a[2] + a[3]);
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

    use super::{SETS, SparseRows};

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
        for jb in (0..cb).step_by(8) {
            let b = match bias {
                // SAFETY: c0 + jb + 8 ≤ c0 + cb ≤ bias.len() (one bias per output).
                Some(b) => unsafe { _mm256_loadu_ps(b.as_ptr().add(c0 + jb)) },
                None => _mm256_setzero_ps(),
            };
            for ib in (0..rb).step_by(8) {
                // Rows of the block in yt are outputs (jb + i), columns are input rows.
                // SAFETY: (jb + i)·lanes + ib + 8 ≤ cb·lanes ≤ yt.len().
                let v: [__m256; 8] =
                    std::array::from_fn(|i| unsafe { _mm256_loadu_ps(yt.as_ptr().add((jb + i) * lanes + ib)) });
                let t0 = _mm256_unpacklo_ps(v[0], v[1]);
                let t1 = _mm256_unpackhi_ps(v[0], v[1]);
                let t2 = _mm256_unpacklo_ps(v[2], v[3]);
                let t3 = _mm256_unpackhi_ps(v[2], v[3]);
                let t4 = _mm256_unpacklo_ps(v[4], v[5]);
                let t5 = _mm256_unpackhi_ps(v[4], v[5]);
                let t6 = _mm256_unpacklo_ps(v[6], v[7]);
                let t7 = _mm256_unpackhi_ps(v[6], v[7]);
                let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let rows = [
                    _mm256_permute2f128_ps::<0x20>(s0, s4),
                    _mm256_permute2f128_ps::<0x20>(s1, s5),
                    _mm256_permute2f128_ps::<0x20>(s2, s6),
                    _mm256_permute2f128_ps::<0x20>(s3, s7),
                    _mm256_permute2f128_ps::<0x31>(s0, s4),
                    _mm256_permute2f128_ps::<0x31>(s1, s5),
                    _mm256_permute2f128_ps::<0x31>(s2, s6),
                    _mm256_permute2f128_ps::<0x31>(s3, s7),
                ];
                for (i, row) in rows.iter().enumerate() {
                    // SAFETY: row r0 + ib + i < r0 + rb, outputs c0 + jb .. + 8 < c0 + cb: in the
                    // caller's block.
                    unsafe { _mm256_storeu_ps(y.add((r0 + ib + i) * n + c0 + jb), _mm256_add_ps(b, *row)) };
                }
            }
        }
    }

    /// `V` registers (8·V rows) per nonzero; [`SETS`] accumulator sets take consecutive
    /// nonzeros in turn, so 4·V FMA chains are in flight.
    ///
    /// # Safety
    /// AVX2 and FMA; `xt` is `[k][8·V]`, `yt` holds `(j1 − j0)·8·V`, column indices `< k`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const V: usize>(w: &SparseRows, xt: &[f32], j0: usize, j1: usize, yt: &mut [f32]) {
        let lanes = 8 * V;
        assert!(xt.len() == w.k * lanes && yt.len() == (j1 - j0) * lanes && j1 <= w.n);
        for j in j0..j1 {
            let (a, b) = (w.ptr[j] as usize, w.ptr[j + 1] as usize);
            let (cols, vals) = (&w.cols[a..b], &w.vals[a..b]);
            let mut acc = [[_mm256_setzero_ps(); V]; SETS];
            let mut i = 0;
            while i + SETS <= cols.len() {
                for (set, accs) in acc.iter_mut().enumerate() {
                    let c = cols[i + set] as usize;
                    assert!(c < w.k);
                    let v = _mm256_set1_ps(vals[i + set]);
                    for (q, a) in accs.iter_mut().enumerate() {
                        // SAFETY: c < k, so c·lanes + 8q + 8 ≤ k·lanes = xt.len().
                        let xv = unsafe { _mm256_loadu_ps(xt.as_ptr().add(c * lanes + 8 * q)) };
                        *a = _mm256_fmadd_ps(v, xv, *a);
                    }
                }
                i += SETS;
            }
            for (set, accs) in acc.iter_mut().enumerate().take(cols.len() - i) {
                let c = cols[i + set] as usize;
                assert!(c < w.k);
                let v = _mm256_set1_ps(vals[i + set]);
                for (q, a) in accs.iter_mut().enumerate() {
                    // SAFETY: as above.
                    let xv = unsafe { _mm256_loadu_ps(xt.as_ptr().add(c * lanes + 8 * q)) };
                    *a = _mm256_fmadd_ps(v, xv, *a);
                }
            }
            for q in 0..V {
                let s = _mm256_add_ps(_mm256_add_ps(acc[0][q], acc[1][q]), _mm256_add_ps(acc[2][q], acc[3][q]));
                // SAFETY: (j − j0)·lanes + 8q + 8 ≤ yt.len().
                unsafe { _mm256_storeu_ps(yt.as_mut_ptr().add((j - j0) * lanes + 8 * q), s) };
            }
        }
    }
}

#[cfg(test)]
mod tests;
