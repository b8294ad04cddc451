//! pare's f32 GEMM: `y = x·Wᵀ + b` with `W` repacked once into column panels of [`NR`] outputs,
//! blocked BLIS-style (a [`KC`]-deep slice of one panel stays in L1 while [`MC`] rows of `x`,
//! packed into [`MR`]-row strips, stream past it from L2), with an AVX2+FMA 6×16 micro-kernel
//! (12×16 on AVX-512: two strips against one 16-lane panel register) and a scalar twin that
//! performs the same fused multiply-adds in the same order.
//!
//! The weight side is a [`Panels`] source, so the same driver runs dense f32 weights (borrowed
//! in place), FP16/BF16 weights and quantized weights (both decoded a panel slice at a time into
//! an L1 buffer, never into a whole float matrix).
//!
//! Every output element is `b + Σ_blocks (Σ_{p in block} fma-chain)`, summed over the K blocks in
//! order by one task, so the bits do not depend on the thread count or on how the output is
//! split into tiles, and the scalar twin matches the AVX2 path exactly.

use std::fmt::Debug;

use rayon::prelude::*;

use crate::simd::{Aligned, SimdLevel};

/// Rows of `x` per micro-kernel call.
pub const MR: usize = 6;
/// Output columns per panel (two AVX2 registers).
pub const NR: usize = 16;
/// Reduction depth of one block (a `KC × NR` panel slice is 24 KiB, in L1; MiniLM's 384-wide
/// layers take one block, so each output is written once).
pub const KC: usize = 384;
/// Rows of `x` per tile (a `MC × KC` packed block is 144 KiB, in L2).
pub const MC: usize = 96;

/// A weight matrix `[n, k]` (used as `Wᵀ`) served as column panels of [`NR`] outputs.
pub trait Panels: Send + Sync + Debug {
    /// Output features (rows of `W`).
    fn n(&self) -> usize;
    /// Input features (columns of `W`).
    fn k(&self) -> usize;
    /// The f32 values of panel `jb` (outputs `jb·NR ..`), reduction rows `k0..k1`, laid out
    /// `[p][NR]` with columns past `n` zero: either borrowed from the packed weights or
    /// decoded into `buf` (which holds at least `KC·NR` floats).
    fn panel<'a>(&'a self, level: SimdLevel, jb: usize, k0: usize, k1: usize, buf: &'a mut [f32]) -> &'a [f32];
    /// The per-call data a format's fused small-M kernel needs for rows `x` (at most [`MR`]),
    /// computed once per call and shared by every panel; `None` when the format has no fused
    /// kernel and the driver must run the blocked GEMM.
    fn fused_aux(&self, _x: &[&[f32]]) -> Option<Vec<f32>> {
        None
    }
    /// Whether [`Panels::panel`] decodes into `buf` (work repeated for every row tile) rather
    /// than borrowing stored f32 values.
    fn decoded(&self) -> bool {
        false
    }
    /// For at most [`MR`] rows: `out[r][c] = Σ_p x[r][p]·W[jb·NR + c][p]` computed straight from
    /// the stored format (weight bytes read once for all rows), given `aux` from
    /// [`Panels::fused_aux`]. Only called when `fused_aux` returned `Some`.
    fn fused_rows(&self, _level: SimdLevel, _jb: usize, _x: &[&[f32]], _aux: &[f32], _out: &mut [[f32; NR]]) {
        unreachable!("fused_rows without fused_aux")
    }
    /// Where [`Panels::panel`]'s values for panel `jb`, reduction rows from `k0`, are stored,
    /// so that the kernel can prefetch them while it multiplies the panel before; `None`
    /// (the default) where they are decoded instead, or `jb` is past the last panel. Only an
    /// address: it is never read through.
    fn stored_at(&self, _jb: usize, _k0: usize) -> Option<*const f32> {
        None
    }
}

/// Dense f32 weights packed `[panel][k][NR]`.
#[derive(Debug, Clone)]
pub struct PackedF32 {
    data: Aligned<f32>,
    n: usize,
    k: usize,
}

/// Row-major `w` (`[n, k]`) rearranged into column panels `[n/NR][k][NR]`, the last panel
/// padded with `T::default()`.
pub fn to_panels<T: Copy + Default>(w: &[T], n: usize, k: usize) -> Aligned<T> {
    assert!(w.len() == n * k);
    let mut data = Aligned::new(n.div_ceil(NR) * k * NR);
    for j in 0..n {
        let (jb, c) = (j / NR, j % NR);
        for (p, &v) in w[j * k..(j + 1) * k].iter().enumerate() {
            data[(jb * k + p) * NR + c] = v;
        }
    }
    data
}

impl PackedF32 {
    /// Packs row-major `w` (`[n, k]`).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        Self { data: to_panels(w, n, k), n, k }
    }
}

impl Panels for PackedF32 {
    fn n(&self) -> usize {
        self.n
    }
    fn k(&self) -> usize {
        self.k
    }
    fn panel<'a>(&'a self, _: SimdLevel, jb: usize, k0: usize, k1: usize, _: &'a mut [f32]) -> &'a [f32] {
        &self.data[(jb * self.k + k0) * NR..(jb * self.k + k1) * NR]
    }
    fn stored_at(&self, jb: usize, k0: usize) -> Option<*const f32> {
        (jb < self.n.div_ceil(NR) && k0 < self.k).then(|| self.data[(jb * self.k + k0) * NR..].as_ptr())
    }
}

/// A raw output pointer shared by tasks that write disjoint tiles of one buffer (pare's GEMM
/// and the sparse kernel split their output so).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every user splits the output into tiles that partition it, so no element is written
// by two threads, and the buffer outlives the pool scope the tasks run in.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `y[m, n] = x[m, k]·Wᵀ + bias` on `pool`, at `level`. Rows of `y` are split into tiles of
/// [`MC`] rows and, when there are too few of those to feed every thread, panels are split
/// too; either way each output element is computed whole by one task.
pub fn gemm(
    level: SimdLevel,
    pool: &rayon::ThreadPool,
    x: &[f32],
    m: usize,
    w: &dyn Panels,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    assert!(y.len() == m * w.n());
    // SAFETY: y holds m·n floats (asserted).
    unsafe { gemm_raw(level, pool, x, m, w, bias, y.as_mut_ptr(), None) };
}

/// [`gemm`] into `m·n` floats at `y`, which may be uninitialised: every element is written
/// (its first K block's value, or the bias when `k = 0`) before it is read. With `act`, each
/// task applies it to its tile once the tile is final, while it is in cache. Returns whether
/// every value of `x` is finite: the packing looks at each one anyway (a separate pass over
/// the input cost about 1% of MiniLM's f32 time), and the few rows of the fused kernel are
/// checked directly.
///
/// # Safety
/// `y` must be valid for reads and writes of `m·n` floats that nothing else touches during the
/// call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    level: SimdLevel,
    pool: &rayon::ThreadPool,
    x: &[f32],
    m: usize,
    w: &dyn Panels,
    bias: Option<&[f32]>,
    y: *mut f32,
    act: Option<crate::nonlinear::Act>,
) -> bool {
    let (n, k) = (w.n(), w.k());
    assert!(x.len() == m * k && bias.is_none_or(|b| b.len() == n));
    if m == 0 || n == 0 || k == 0 {
        if m > 0 && n > 0 {
            // k = 0: no products, every output is its bias.
            let mut tile = Tile { y, n, r0: 0, r1: m, c0: 0, c1: n };
            tile.init(bias);
        }
        return x.iter().all(|v| v.is_finite());
    }
    let panels = n.div_ceil(NR);
    let fused = m <= MR;
    // Panels decoded per tile (quantized, half) are decoded once per MC rows: twice the rows
    // halve that work, and 192 × KC floats of x still sit in L2.
    let mc = if w.decoded() { 2 * MC } else { MC };
    let row_tiles = if fused { 1 } else { m.div_ceil(mc) };
    if w.decoded() && row_tiles >= DECODE_ONCE_TILES && w.n().saturating_mul(w.k()) <= DECODE_ONCE_MAX {
        // Decoded per row tile, the weights would be decoded `row_tiles` times: decode every
        // panel once into f32 panels (n·k·4 bytes of scratch) and run pare's f32 GEMM on
        // them, which reads the same values in the same order (the same bits), so a 4-bit
        // layer is never slower than its float twin by more than one decode.
        let whole = decode_all(level, pool, w);
        // SAFETY: forwarded contract; `whole` has w's n and k.
        return unsafe { gemm_raw(level, pool, x, m, &whole, bias, y, act) };
    }
    let (col_tiles, per) = column_split(pool, row_tiles, panels);
    // Per-call work every task would otherwise repeat: the fused kernel's aux data (for at
    // most MR rows), or, when the columns are split, each row tile's packed strips.
    let rows: Vec<&[f32]> = if fused { (0..m).map(|r| &x[r * k..(r + 1) * k]).collect() } else { Vec::new() };
    let aux = if fused { w.fused_aux(&rows) } else { None };
    // Cleared by any packing that meets a value that is not finite.
    let finite =
        std::sync::atomic::AtomicBool::new(aux.is_none() || rows.iter().all(|r| r.iter().all(|v| v.is_finite())));
    let packed: Vec<Vec<f32>> = if aux.is_none() && col_tiles > 1 {
        pool.install(|| {
            (0..row_tiles)
                .into_par_iter()
                .map(|ti| {
                    let (a, ok) = pack_tile(level, x, k, ti * mc, ((ti + 1) * mc).min(m));
                    if !ok {
                        finite.store(false, std::sync::atomic::Ordering::Relaxed);
                    }
                    a
                })
                .collect()
        })
    } else {
        Vec::new()
    };
    let out = OutPtr(y);
    pool.install(|| {
        (0..row_tiles * col_tiles).into_par_iter().for_each(|t| {
            let (ti, tj) = (t / col_tiles, t % col_tiles);
            let (r0, r1) = (ti * mc, ((ti + 1) * mc).min(m));
            let (p0, p1) = (tj * per, ((tj + 1) * per).min(panels));
            if p0 >= p1 {
                return;
            }
            // SAFETY: tile (ti, tj) owns rows r0..r1 × columns p0·NR..min(p1·NR, n); tiles
            // partition the output, and `y` outlives `pool.install`.
            let mut tile = Tile { y: out.get(), n, r0, r1, c0: p0 * NR, c1: (p1 * NR).min(n) };
            match &aux {
                Some(aux) => fused_tile(level, &rows, w, aux, bias, p0, p1, &mut tile),
                None => {
                    if !blocked_tile(level, x, k, w, bias, p0, p1, packed.get(ti).map(Vec::as_slice), &mut tile) {
                        finite.store(false, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            if let Some(act) = act {
                for r in r0..r1 {
                    // SAFETY: row r, columns c0..c1 of this task's tile, which only it touches.
                    let row = unsafe { std::slice::from_raw_parts_mut(tile.y.add(r * n + tile.c0), tile.c1 - tile.c0) };
                    crate::nonlinear::activation_in_place(level, act, row);
                }
            }
        });
    });
    finite.into_inner()
}

/// Row tiles from which a decoded format's GEMM decodes its weights once up front (see
/// [`gemm_raw`]): at MiniLM's FFN shapes and M = 4096 (22 tiles) decoding per tile made the
/// 4-bit GEMM 4–7% slower than the f32 one (`M=4096 q4_probe`).
const DECODE_ONCE_TILES: usize = 4;

/// The most weights decoded once up front (64 MiB of f32 panels): a larger layer (an LLM's
/// 4096 × 11008 projection would take 180 MB per call) decodes per row tile as before.
const DECODE_ONCE_MAX: usize = 16 << 20;

/// Every panel of `w` decoded to f32 panels, on the pool.
fn decode_all(level: SimdLevel, pool: &rayon::ThreadPool, w: &dyn Panels) -> PackedF32 {
    let (n, k) = (w.n(), w.k());
    let mut data = Aligned::new(n.div_ceil(NR) * k * NR);
    if k > 0 {
        pool.install(|| {
            data.par_chunks_mut(k * NR).enumerate().for_each(|(jb, dst)| {
                let mut buf = vec![0f32; k * NR];
                dst.copy_from_slice(w.panel(level, jb, 0, k, &mut buf));
            })
        });
    }
    PackedF32 { data, n, k }
}

/// How to split `units` output columns (panels, outputs) when there are only `row_tiles`
/// row tiles: into enough column ranges that every thread gets about four tasks. Returns the
/// number of ranges and the units per range.
pub(crate) fn column_split(pool: &rayon::ThreadPool, row_tiles: usize, units: usize) -> (usize, usize) {
    let want = 4 * pool.current_num_threads();
    let splits = if row_tiles >= want { 1 } else { want.div_ceil(row_tiles).min(units).max(1) };
    (splits, units.div_ceil(splits))
}

/// One task's rectangle of the output.
struct Tile {
    y: *mut f32,
    n: usize,
    r0: usize,
    r1: usize,
    c0: usize,
    c1: usize,
}

impl Tile {
    /// Sets every element of the tile to its bias (or zero).
    fn init(&mut self, bias: Option<&[f32]>) {
        for r in self.r0..self.r1 {
            for c in self.c0..self.c1 {
                // SAFETY: (r, c) lies in this tile, which only this task writes.
                unsafe { *self.y.add(r * self.n + c) = bias.map_or(0.0, |b| b[c]) };
            }
        }
    }

    /// Adds `acc` (rows from `r`, columns from `c`) into the tile, clipped to its bounds; on
    /// the `first` K block the base is the bias (or zero) instead of the tile's contents.
    fn add(&mut self, r: usize, c: usize, acc: &[[f32; NR]], first: bool, bias: Option<&[f32]>) {
        for (i, row) in acc.iter().enumerate().take(self.r1.saturating_sub(r)) {
            for (j, v) in row.iter().enumerate().take(self.c1.saturating_sub(c)) {
                // SAFETY: r + i < r1 and c + j < c1: inside this task's tile.
                unsafe {
                    let y = self.y.add((r + i) * self.n + c + j);
                    let base = if first { bias.map_or(0.0, |b| b[c + j]) } else { *y };
                    *y = base + *v;
                }
            }
        }
    }
}

/// The small-M path: the format's fused kernel, panel by panel, for the rows `rows` (the
/// whole input, at most [`MR`] rows) with their `aux` data.
#[allow(clippy::too_many_arguments)]
fn fused_tile(
    level: SimdLevel,
    rows: &[&[f32]],
    w: &dyn Panels,
    aux: &[f32],
    bias: Option<&[f32]>,
    p0: usize,
    p1: usize,
    tile: &mut Tile,
) {
    let mut acc = vec![[0f32; NR]; rows.len()];
    for jb in p0..p1 {
        acc.iter_mut().for_each(|a| *a = [0.0; NR]);
        w.fused_rows(level, jb, rows, aux, &mut acc);
        tile.add(tile.r0, jb * NR, &acc, true, bias);
    }
}

/// Rows `r0..r1` of `x` packed for every K block in turn, as [`blocked_tile`] reads them: the
/// block at `k0` is `[strip][p][MR]`, starting at `strips·MR·k0`.
fn pack_tile(level: SimdLevel, x: &[f32], k: usize, r0: usize, r1: usize) -> (Vec<f32>, bool) {
    let strips = (r1 - r0).div_ceil(MR);
    let mut a = vec![0f32; strips * MR * k];
    let mut finite = true;
    for k0 in (0..k).step_by(KC) {
        let k1 = (k0 + KC).min(k);
        finite &= pack_a(level, x, k, r0, r1, k0, k1, &mut a[strips * MR * k0..strips * MR * k1]);
    }
    (a, finite)
}

/// The blocked GEMM over one tile: for each K block, pack the tile's rows into [`MR`]-row
/// strips (or take them from `packed`, see [`pack_tile`]), then run every strip against each
/// panel slice.
#[allow(clippy::too_many_arguments)]
fn blocked_tile(
    level: SimdLevel,
    x: &[f32],
    k: usize,
    w: &dyn Panels,
    bias: Option<&[f32]>,
    p0: usize,
    p1: usize,
    packed: Option<&[f32]>,
    tile: &mut Tile,
) -> bool {
    // k > 0 here: gemm_raw writes the bias itself when there are no products.
    let mut finite = true;
    let rows = tile.r1 - tile.r0;
    let strips = rows.div_ceil(MR);
    let mut own = if packed.is_none() { vec![0f32; strips * MR * KC.min(k)] } else { Vec::new() };
    let mut buf = Aligned::<f32>::new(KC * NR);
    let mut acc = [[0f32; NR]; MR];
    for k0 in (0..k).step_by(KC) {
        let k1 = (k0 + KC).min(k);
        let kc = k1 - k0;
        let a: &[f32] = match packed {
            Some(p) => &p[strips * MR * k0..strips * MR * k1],
            None => {
                finite &= pack_a(level, x, k, tile.r0, tile.r1, k0, k1, &mut own[..strips * MR * kc]);
                &own[..strips * MR * kc]
            }
        };
        for jb in p0..p1 {
            let b = w.panel(level, jb, k0, k1, &mut buf);
            let mut s = 0;
            // The next panel's slice, fetched while the first strips multiply this one (with
            // few rows the GEMM streams its weights from memory, and the hardware prefetcher
            // alone does not keep up across panels).
            let ahead = if jb + 1 < p1 { w.stored_at(jb + 1, k0) } else { None };
            while s < strips {
                let (r, c) = (tile.r0 + s * MR, jb * NR);
                let (first, base) = (k0 == 0, bias.map(|b| &b[c..]));
                #[cfg(target_arch = "x86_64")]
                if level.avx512() && c + NR <= tile.c1 && tile.r1 - r >= 2 * MR {
                    let base = if first { Base::Bias(base) } else { Base::Output };
                    // SAFETY: AVX-512 F was detected just above; two whole strips, and their
                    // 12 × NR block at (r, c) lies inside this task's tile.
                    unsafe {
                        avx512::micro_add12(
                            &a[s * MR * kc..(s + 2) * MR * kc],
                            b,
                            kc,
                            tile.y.add(r * tile.n + c),
                            tile.n,
                            base,
                            if s == 0 { ahead } else { None },
                        )
                    };
                    s += 2;
                    continue;
                }
                let strip = &a[s * MR * kc..(s + 1) * MR * kc];
                s += 1;
                if c + NR <= tile.c1 {
                    let base = if first { Base::Bias(base) } else { Base::Output };
                    let rows = (tile.r1 - r).min(MR);
                    let ahead = if s == 1 { ahead } else { None };
                    // SAFETY: the rows × NR block at (r, c) lies inside this task's tile.
                    unsafe { micro_add(level, strip, b, kc, rows, tile.y.add(r * tile.n + c), tile.n, base, ahead) };
                } else {
                    micro(level, strip, b, kc, &mut acc);
                    tile.add(r, c, &acc, first, bias);
                }
            }
        }
    }
    finite
}

/// Rows `r0..r1`, columns `k0..k1` of `x` into strips `[strip][p][MR]`, zero rows past `r1`
/// (`a` holds exactly the strips); returns whether every value packed is finite. It only
/// moves values, so every level gives the same bits; AVX2 transposes 8 × 8 blocks in
/// registers (the scalar scatter, one 4-byte store per value 24 bytes apart, was 5% of
/// MiniLM's f32 time).
#[allow(clippy::too_many_arguments)]
fn pack_a(level: SimdLevel, x: &[f32], k: usize, r0: usize, r1: usize, k0: usize, k1: usize, a: &mut [f32]) -> bool {
    let kc = k1 - k0;
    assert!(a.len() == (r1 - r0).div_ceil(MR) * MR * kc && k1 <= k && r1 * k <= x.len());
    #[cfg(target_arch = "x86_64")]
    if level.avx2() {
        // SAFETY: AVX2 was detected just above; the bounds are asserted.
        return unsafe { avx2::pack_a(x, k, r0, r1, k0, k1, a) };
    }
    let _ = level;
    let mut finite = true;
    for (s, strip) in a.chunks_mut(MR * kc).enumerate() {
        for i in 0..MR {
            let r = r0 + s * MR + i;
            if r < r1 {
                for (p, &v) in x[r * k + k0..r * k + k1].iter().enumerate() {
                    strip[p * MR + i] = v;
                    finite &= v.is_finite();
                }
            } else {
                for p in 0..kc {
                    strip[p * MR + i] = 0.0;
                }
            }
        }
    }
    finite
}

/// `acc[i][c] = Σ_p a[p][i]·b[p][c]` as a chain of fused multiply-adds from zero, `p` ascending.
pub fn micro(level: SimdLevel, a: &[f32], b: &[f32], kc: usize, acc: &mut [[f32; NR]; MR]) {
    assert!(a.len() == kc * MR && b.len() == kc * NR);
    match level {
        #[cfg(target_arch = "x86_64")]
        l if l.avx2() => {
            // SAFETY: AVX2 and FMA were detected just above; lengths asserted.
            unsafe { avx2::micro(a, b, kc, acc) }
        }
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon if SimdLevel::detect() == SimdLevel::Neon => {
            // SAFETY: NEON was detected just above; lengths asserted.
            unsafe { neon::micro(a, b, kc, acc) }
        }
        _ => {
            *acc = [[0.0; NR]; MR];
            for p in 0..kc {
                let bp = &b[p * NR..(p + 1) * NR];
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = a[p * MR + i];
                    for (c, v) in row.iter_mut().enumerate() {
                        *v = ai.mul_add(bp[c], *v);
                    }
                }
            }
        }
    }
}

/// What a block's sums are added to: the output's current values (later K blocks) or, on the
/// first K block, the bias (`None`: zero) for the block's `NR` columns.
#[derive(Debug, Clone, Copy)]
pub enum Base<'a> {
    /// The values already in the output.
    Output,
    /// The bias from the block's first column (at least `NR` values), or zero.
    Bias(Option<&'a [f32]>),
}

/// [`micro`]'s first `rows` (1 ..= `MR`) rows written straight into the output at `c` (row
/// stride `ldc`, `NR` columns): `c[i][j] = base[i][j] + acc[i][j]`, one rounding per element,
/// as the edge tiles get. Each row's chain is independent of the others, so a strip's last
/// rows computed alone have the bits they would have in a full strip. With `ahead` (the next
/// panel's stored values, see [`Panels::stored_at`]), the AVX2 kernel prefetches one line of
/// them per step, as the AVX-512 one does: the first strip of each panel then does not wait
/// on lines the hardware prefetcher has not fetched yet. Only an address: never read through.
///
/// # Safety
/// `c` must point at `rows` rows of `NR` writable floats, `ldc` apart, that no other thread
/// touches during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn micro_add(
    level: SimdLevel,
    a: &[f32],
    b: &[f32],
    kc: usize,
    rows: usize,
    c: *mut f32,
    ldc: usize,
    base: Base,
    ahead: Option<*const f32>,
) {
    assert!((1..=MR).contains(&rows));
    match level {
        #[cfg(target_arch = "x86_64")]
        l if l.avx2() => {
            // SAFETY: AVX2 and FMA were detected just above; the caller vouches for `c`.
            unsafe {
                match (rows, ahead) {
                    (6, Some(next)) => avx2::micro_add_with::<MR, true>(a, b, kc, c, ldc, base, next),
                    (6, None) => avx2::micro_add::<6>(a, b, kc, c, ldc, base),
                    (5, _) => avx2::micro_add::<5>(a, b, kc, c, ldc, base),
                    (4, _) => avx2::micro_add::<4>(a, b, kc, c, ldc, base),
                    (3, _) => avx2::micro_add::<3>(a, b, kc, c, ldc, base),
                    (2, _) => avx2::micro_add::<2>(a, b, kc, c, ldc, base),
                    _ => avx2::micro_add::<1>(a, b, kc, c, ldc, base),
                }
            }
        }
        _ => {
            let _ = ahead;
            let mut acc = [[0f32; NR]; MR];
            micro(level, a, b, kc, &mut acc);
            for (i, row) in acc.iter().enumerate().take(rows) {
                for (j, v) in row.iter().enumerate() {
                    // SAFETY: i < MR, j < NR: inside the block the caller vouches for.
                    unsafe {
                        let y = c.add(i * ldc + j);
                        *y = match base {
                            Base::Output => *y,
                            Base::Bias(b) => b.map_or(0.0, |b| b[j]),
                        } + *v;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{MR, NR};

    /// The 6×16 micro-kernel on NEON: 24 four-lane accumulators (of 32 registers), four panel
    /// loads and six scalar-by-vector fused multiply-adds per row and step, the same chain per
    /// element as the scalar twin (`vfmaq` rounds once, as `mul_add`).
    ///
    /// # Safety
    /// The CPU must support NEON; `a.len() == kc·MR`, `b.len() == kc·NR`.
    #[target_feature(enable = "neon")]
    pub unsafe fn micro(a: &[f32], b: &[f32], kc: usize, acc: &mut [[f32; NR]; MR]) {
        assert!(a.len() == kc * MR && b.len() == kc * NR);
        let mut c = [[vdupq_n_f32(0.0); 4]; MR];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for p in 0..kc {
            // SAFETY: p < kc, so p·NR + 16 ≤ b.len() and p·MR + 6 ≤ a.len() (asserted).
            unsafe {
                let bv = [
                    vld1q_f32(bp.add(p * NR)),
                    vld1q_f32(bp.add(p * NR + 4)),
                    vld1q_f32(bp.add(p * NR + 8)),
                    vld1q_f32(bp.add(p * NR + 12)),
                ];
                for (i, ci) in c.iter_mut().enumerate() {
                    let av = *ap.add(p * MR + i);
                    for (q, cq) in ci.iter_mut().enumerate() {
                        *cq = vfmaq_n_f32(*cq, bv[q], av);
                    }
                }
            }
        }
        for (row, ci) in acc.iter_mut().zip(c) {
            for (q, cq) in ci.into_iter().enumerate() {
                // SAFETY: each row holds 16 floats: 4q + 4 ≤ 16.
                unsafe { vst1q_f32(row.as_mut_ptr().add(4 * q), cq) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Base, MR, NR};
    use crate::simd::avx2::transpose8;

    /// [`super::pack_a`]: per strip of `MR` rows, eight columns at a time, the rows (zeros past
    /// `r1`, and two zero rows filling the register) transposed 8 × 8 in registers; each
    /// column's `MR` values are stored with one 8-lane store whose two spare lanes the next
    /// column's store overwrites (the last column of the strip stores its `MR` values alone);
    /// the columns past the last whole eight one by one.
    ///
    /// # Safety
    /// AVX2; `a.len() == strips·MR·(k1 − k0)`, `k1 ≤ k`, `r1·k ≤ x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn pack_a(x: &[f32], k: usize, r0: usize, r1: usize, k0: usize, k1: usize, a: &mut [f32]) -> bool {
        let kc = k1 - k0;
        let strips = (r1 - r0).div_ceil(MR);
        assert!(a.len() == strips * MR * kc && k1 <= k && r1 * k <= x.len());
        let body = kc / 8 * 8;
        // Lanes that met NaN or ±∞ (v·0 is NaN exactly for those).
        let mut bad = _mm256_setzero_ps();
        let mut finite = true;
        for (s, strip) in a.chunks_exact_mut(MR * kc).enumerate() {
            let rows: [Option<&[f32]>; MR] = std::array::from_fn(|i| {
                let r = r0 + s * MR + i;
                (r < r1).then(|| &x[r * k + k0..r * k + k1])
            });
            let sp = strip.as_mut_ptr();
            for p in (0..body).step_by(8) {
                let v: [__m256; 8] = std::array::from_fn(|i| match rows.get(i).copied().flatten() {
                    // SAFETY: p + 8 ≤ body ≤ kc = row.len().
                    Some(row) => unsafe { _mm256_loadu_ps(row.as_ptr().add(p)) },
                    None => _mm256_setzero_ps(),
                });
                for r in &v {
                    let z = _mm256_mul_ps(*r, _mm256_setzero_ps());
                    bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_UNORD_Q>(z, z));
                }
                let t = transpose8(v);
                for (c, col) in t.iter().enumerate() {
                    let at = (p + c) * MR;
                    if at + 8 <= strip.len() {
                        // SAFETY: at + 8 ≤ strip.len(); lanes MR.. land in the next column,
                        // which a later store (or the tail loop) writes.
                        unsafe { _mm256_storeu_ps(sp.add(at), *col) };
                    } else {
                        let mut lanes = [0f32; 8];
                        // SAFETY: lanes holds 8 floats.
                        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *col) };
                        strip[at..at + MR].copy_from_slice(&lanes[..MR]);
                    }
                }
            }
            for p in body..kc {
                for (i, row) in rows.iter().enumerate() {
                    let v = row.map_or(0.0, |r| r[p]);
                    strip[p * MR + i] = v;
                    finite &= v.is_finite();
                }
            }
        }
        finite && _mm256_movemask_ps(bad) == 0
    }

    /// The 6×16 micro-kernel: twelve accumulators, two panel loads and six broadcasts per step.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `a.len() == kc·MR`, `b.len() == kc·NR`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn micro(a: &[f32], b: &[f32], kc: usize, acc: &mut [[f32; NR]; MR]) {
        let c = chains::<MR, false>(a, b, kc, std::ptr::null());
        for (row, ci) in acc.iter_mut().zip(c) {
            // SAFETY: each row holds NR = 16 floats.
            unsafe {
                _mm256_storeu_ps(row.as_mut_ptr(), ci[0]);
                _mm256_storeu_ps(row.as_mut_ptr().add(8), ci[1]);
            }
        }
    }

    /// [`super::micro_add`] on AVX2 for `R` rows.
    ///
    /// # Safety
    /// As [`super::micro_add`] with `rows = R`, and the CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn micro_add<const R: usize>(a: &[f32], b: &[f32], kc: usize, c: *mut f32, ldc: usize, base: Base) {
        // SAFETY: forwarded; no prefetch, so the address is unused.
        unsafe { micro_add_with::<R, false>(a, b, kc, c, ldc, base, std::ptr::null()) }
    }

    /// [`micro_add`], with `PF` prefetching one line of `next` (the next panel's stored
    /// values; only an address) per step.
    ///
    /// # Safety
    /// As [`micro_add`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn micro_add_with<const R: usize, const PF: bool>(
        a: &[f32],
        b: &[f32],
        kc: usize,
        c: *mut f32,
        ldc: usize,
        base: Base,
        next: *const f32,
    ) {
        // The output block's lines, asked for before the thousands of cycles of products (the
        // first K block writes lines not yet in cache): 10–16% faster at K = 384 on Zen 3
        // (in-process A/B, medians of 15 alternating pairs, one and two threads); the same
        // within noise at K = 1536, whose later blocks find the lines in cache.
        crate::simd::avx2::prefetch_tile16(c, ldc, R);
        let acc = chains::<R, PF>(a, b, kc, next);
        let bias = match base {
            Base::Bias(Some(b)) => {
                assert!(b.len() >= NR);
                // SAFETY: b holds at least 16 floats (asserted).
                Some(unsafe { [_mm256_loadu_ps(b.as_ptr()), _mm256_loadu_ps(b.as_ptr().add(8))] })
            }
            Base::Bias(None) => Some([_mm256_setzero_ps(); 2]),
            Base::Output => None,
        };
        for (i, ci) in acc.into_iter().enumerate() {
            // SAFETY: row i of the caller's MR × NR block.
            unsafe {
                let p = c.add(i * ldc);
                let [b0, b1] = bias.unwrap_or_else(|| [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]);
                _mm256_storeu_ps(p, _mm256_add_ps(b0, ci[0]));
                _mm256_storeu_ps(p.add(8), _mm256_add_ps(b1, ci[1]));
            }
        }
    }

    /// The accumulator chains of the first `R` rows (≤ 6) of a strip against 16 columns:
    /// twelve for a full 6×16 block.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn chains<const R: usize, const PF: bool>(a: &[f32], b: &[f32], kc: usize, next: *const f32) -> [[__m256; 2]; R] {
        assert!(a.len() == kc * MR && b.len() == kc * NR && R <= MR);
        let mut c = [[_mm256_setzero_ps(); 2]; R];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for p in 0..kc {
            if PF {
                // A prefetch never faults, so the address is formed with wrapping arithmetic.
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(p * NR).cast());
            }
            // SAFETY: p < kc, so p·NR + 16 ≤ b.len() and p·MR + 6 ≤ a.len().
            unsafe {
                let b0 = _mm256_loadu_ps(bp.add(p * NR));
                let b1 = _mm256_loadu_ps(bp.add(p * NR + 8));
                for (i, ci) in c.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*ap.add(p * MR + i));
                    ci[0] = _mm256_fmadd_ps(av, b0, ci[0]);
                    ci[1] = _mm256_fmadd_ps(av, b1, ci[1]);
                }
            }
        }
        c
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Base, MR, NR};

    /// Two whole strips (12 rows) against one panel slice, one 16-lane register per row: per
    /// step one panel load, twelve broadcasts and twelve fused multiply-adds, each element's
    /// chain the same as the AVX2 6×16 kernel's (so the same bits), written as
    /// [`super::micro_add`] writes.
    ///
    /// With `ahead`, one line of the `kc·NR` floats from there is prefetched per step (the
    /// next panel's slice; never read through here).
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, AVX2 and FMA; `a.len() == 2·kc·MR`, `b.len() == kc·NR`;
    /// `c` points at 12 rows of `NR` writable floats, `ldc` apart, that no other thread
    /// touches during the call.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn micro_add12(
        a: &[f32],
        b: &[f32],
        kc: usize,
        c: *mut f32,
        ldc: usize,
        base: Base,
        ahead: Option<*const f32>,
    ) {
        assert!(a.len() == 2 * kc * MR && b.len() == kc * NR);
        let mut acc = [_mm512_setzero_ps(); 2 * MR];
        let (a0, bp) = (a.as_ptr(), b.as_ptr());
        for p in 0..kc {
            if let Some(next) = ahead {
                // A prefetch never faults, so the address is formed with wrapping arithmetic.
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(p * NR).cast());
            }
            // SAFETY: p < kc, so p·NR + 16 ≤ b.len(), and both strips' p·MR + 6 ≤ kc·MR.
            unsafe {
                let bv = _mm512_loadu_ps(bp.add(p * NR));
                for (i, ai) in acc.iter_mut().enumerate() {
                    let at = (i / MR) * kc * MR + p * MR + i % MR;
                    *ai = _mm512_fmadd_ps(_mm512_set1_ps(*a0.add(at)), bv, *ai);
                }
            }
        }
        let bias = match base {
            Base::Bias(Some(b)) => {
                assert!(b.len() >= NR);
                // SAFETY: b holds at least 16 floats (asserted).
                Some(unsafe { _mm512_loadu_ps(b.as_ptr()) })
            }
            Base::Bias(None) => Some(_mm512_setzero_ps()),
            Base::Output => None,
        };
        for (i, v) in acc.iter().enumerate() {
            // SAFETY: row i of the caller's 12 × NR block.
            unsafe {
                let p = c.add(i * ldc);
                let b0 = bias.unwrap_or_else(|| _mm512_loadu_ps(p));
                _mm512_storeu_ps(p, _mm512_add_ps(b0, *v));
            }
        }
    }
}

#[cfg(test)]
mod tests;
