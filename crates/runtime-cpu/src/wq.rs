//! Weight-only quantized linear weights (1–8-bit linear codes, sym or asym; 1–4-bit codebooks
//! such as NF4) repacked once into [`crate::gemm::Panels`] and decoded in registers.
//!
//! Codes are repacked into column panels of [`NR`] outputs: for `bits ≤ 4`, eight bytes per
//! reduction index, column `c`'s code at bit `32·(c mod 2) + 4·⌊c/2⌋` of their little-endian
//! 64-bit word (so a broadcast and a per-lane shift put column `c` in lane `c`, no shuffles);
//! for wider codes one byte per column. Scales and offsets are laid out per panel and
//! group as `NR`-lane vectors, so one load serves the whole panel.
//!
//! Two paths read them: the blocked GEMM asks for a `KC × NR` slice decoded to f32
//! (`S·(c − e)`, bit-for-bit the reference `dequantize`), and, for at most [`MR`] rows, a fused
//! kernel multiplies the raw code values (or codebook entries) straight into per-group
//! accumulators and applies `S·(acc − e·Σx)` once per group, reading each weight byte once.

use pare_core_tensor::{Granularity, Mapping, QuantizedTensor};

use crate::gemm::{MR, NR, Panels};
use crate::simd::SimdLevel;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::{PREFETCH, PREFETCH_GROUPS};

/// Quantized weights `[n, k]` in panel layout.
#[derive(Debug, Clone)]
pub struct QuantPanels {
    pub(crate) n: usize,
    pub(crate) k: usize,
    /// Codes of ≤ 4 bits, two per byte (otherwise one per byte).
    pub(crate) nibbles: bool,
    pub(crate) codes: Vec<u8>,
    /// Reduction indices per scale.
    pub(crate) group: usize,
    pub(crate) groups: usize,
    /// `[panel][group][NR]` scales.
    pub(crate) scale: Vec<f32>,
    /// `[panel][group][NR]` offsets `e = Z − q_min` (0 for codebooks): `w = S·(c − e)`;
    /// empty when every offset is `uniform` (symmetric schemes, codebooks), so the kernels
    /// neither store nor stream them.
    pub(crate) offset: Vec<f32>,
    pub(crate) uniform: Option<f32>,
    /// Codebook entries, padded to 16 (codebook schemes).
    pub(crate) table: Option<[f32; 16]>,
}

/// Whether the weight-only kernels take `q`: a 2-D weight with linear codes of any width, or a
/// codebook of at most 16 entries, and one scale per tensor, per output row or per group of
/// the reduction axis.
pub fn fits(q: &QuantizedTensor) -> bool {
    let s = q.scheme();
    q.shape().len() == 2
        && (s.mapping == Mapping::Linear || s.bits <= 4)
        && matches!(
            s.granularity,
            Granularity::PerTensor
                | Granularity::PerChannel { axis: 0 }
                | Granularity::PerGroup { .. }
                | Granularity::PerToken
        )
}

/// The byte of an index's 8 that holds column `c`'s 4-bit code: the code sits at bit
/// `32·(c mod 2) + 4·⌊c/2⌋` of the little-endian 64-bit word, so a kernel that broadcasts the
/// word to every 32-bit lane finds column `c`'s code in lane `c` with a per-lane shift.
const fn nibble_byte(c: usize) -> usize {
    4 * (c % 2) + c / 4
}

/// The shift of column `c`'s code within its byte (see [`nibble_byte`]).
const fn nibble_shift(c: usize) -> usize {
    4 * ((c / 2) % 2)
}

impl QuantPanels {
    /// Repacks `q`, which must satisfy [`fits`].
    pub fn pack(q: &QuantizedTensor) -> Self {
        assert!(fits(q), "QuantPanels::pack needs a format `fits` accepts");
        let (n, k) = (q.shape()[0], q.shape()[1]);
        let s = q.scheme();
        let group = match s.granularity {
            Granularity::PerGroup { size } => size,
            _ => k.max(1),
        };
        let groups = k.div_ceil(group).max(1);
        let panels = n.div_ceil(NR);
        let nibbles = s.bits <= 4;
        let codes_in = q.codes();
        let width = if nibbles { NR / 2 } else { NR };
        let mut codes = vec![0u8; panels * k * width];
        for j in 0..n {
            let (jb, c) = (j / NR, j % NR);
            for (p, &code) in codes_in[j * k..(j + 1) * k].iter().enumerate() {
                let at = (jb * k + p) * width;
                if nibbles {
                    codes[at + nibble_byte(c)] |= code << nibble_shift(c);
                } else {
                    codes[at + c] = code;
                }
            }
        }
        let mut scale = vec![0f32; panels * groups * NR];
        let mut offset = vec![0f32; panels * groups * NR];
        for j in 0..n {
            let (jb, c) = (j / NR, j % NR);
            for g in 0..groups {
                let i = q.scale_index(j * k + g * group);
                scale[(jb * groups + g) * NR + c] = q.scales()[i];
                if s.mapping == Mapping::Linear {
                    let z = q.zero_points().map_or(0, |z| z[i]);
                    offset[(jb * groups + g) * NR + c] = (z - s.q_min()) as f32;
                }
            }
        }
        let table = q.codebook().map(|cb| {
            let mut t = [0f32; 16];
            t[..cb.len()].copy_from_slice(cb);
            t
        });
        let uniform = match (s.mapping, q.zero_points()) {
            (Mapping::Codebook, _) => Some(0.0),
            (Mapping::Linear, None) => Some(-s.q_min() as f32),
            (Mapping::Linear, Some(_)) => None,
        };
        if uniform.is_some() {
            offset = Vec::new();
        }
        Self { n, k, nibbles, codes, group, groups, scale, offset, uniform, table }
    }

    pub(crate) fn width(&self) -> usize {
        if self.nibbles { NR / 2 } else { NR }
    }

    /// The 16 raw codes of panel `jb` at reduction index `p`.
    pub(crate) fn codes_at(&self, jb: usize, p: usize) -> [u8; NR] {
        let at = (jb * self.k + p) * self.width();
        let mut out = [0u8; NR];
        if self.nibbles {
            for (c, o) in out.iter_mut().enumerate() {
                *o = (self.codes[at + nibble_byte(c)] >> nibble_shift(c)) & 0x0F;
            }
        } else {
            out.copy_from_slice(&self.codes[at..at + NR]);
        }
        out
    }

    /// A code's value before scaling: the integer itself, or its codebook entry.
    fn value(&self, c: u8) -> f32 {
        match &self.table {
            Some(t) => t[usize::from(c)],
            None => f32::from(c),
        }
    }

    pub(crate) fn lanes(&self, v: &[f32], jb: usize, g: usize) -> [f32; NR] {
        v[(jb * self.groups + g) * NR..(jb * self.groups + g + 1) * NR].try_into().expect("NR lanes")
    }

    /// The offsets `e` of panel `jb`, group `g`.
    pub(crate) fn offsets(&self, jb: usize, g: usize) -> [f32; NR] {
        match self.uniform {
            Some(e) => [e; NR],
            None => self.lanes(&self.offset, jb, g),
        }
    }
}

impl Panels for QuantPanels {
    fn n(&self) -> usize {
        self.n
    }

    fn decoded(&self) -> bool {
        true
    }

    fn k(&self) -> usize {
        self.k
    }

    fn panel<'a>(&'a self, level: SimdLevel, jb: usize, k0: usize, k1: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let out = &mut buf[..(k1 - k0) * NR];
        match level {
            #[cfg(target_arch = "x86_64")]
            l if l.avx512() && self.nibbles => {
                // SAFETY: AVX-512 was detected just above; indices are within the packed panel.
                unsafe { avx512::decode(self, jb, k0, k1, out) }
            }
            #[cfg(target_arch = "x86_64")]
            l if l.avx2() => {
                // SAFETY: AVX2 was detected just above; indices are within the packed panel.
                unsafe { avx2::decode(self, jb, k0, k1, out) }
            }
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon if SimdLevel::detect() == SimdLevel::Neon => {
                // SAFETY: NEON was detected just above; indices are within the packed panel.
                unsafe { neon::decode(self, jb, k0, k1, out) }
            }
            _ => {
                for p in k0..k1 {
                    let g = p / self.group;
                    let (s, e) = (self.lanes(&self.scale, jb, g), self.offsets(jb, g));
                    let codes = self.codes_at(jb, p);
                    for c in 0..NR {
                        out[(p - k0) * NR + c] = (self.value(codes[c]) - e[c]) * s[c];
                    }
                }
            }
        }
        out
    }

    /// Σx per row and group, in index order: the `e·Σx` correction of each group.
    fn fused_aux(&self, x: &[&[f32]]) -> Option<Vec<f32>> {
        Some(
            x.iter()
                .flat_map(|row| {
                    (0..self.groups)
                        .map(move |g| row[g * self.group..((g + 1) * self.group).min(row.len())].iter().sum::<f32>())
                })
                .collect(),
        )
    }

    fn fused_rows(&self, level: SimdLevel, jb: usize, x: &[&[f32]], sums: &[f32], out: &mut [[f32; NR]]) {
        assert!(x.len() <= MR && out.len() == x.len() && x.iter().all(|r| r.len() == self.k));
        assert!(sums.len() == x.len() * self.groups);
        match level {
            #[cfg(target_arch = "x86_64")]
            l if l.avx512() && self.nibbles => {
                // SAFETY: AVX-512 was detected just above; shapes asserted.
                unsafe { avx512::fused(self, jb, x, sums, out) }
            }
            #[cfg(target_arch = "x86_64")]
            l if l.avx2() => {
                // SAFETY: AVX2 was detected just above; shapes asserted.
                unsafe { avx2::fused(self, jb, x, sums, out) }
            }
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon if SimdLevel::detect() == SimdLevel::Neon => {
                // SAFETY: NEON was detected just above; shapes asserted.
                unsafe { neon::fused(self, jb, x, sums, out) }
            }
            _ => self.fused_scalar(jb, x, sums, out),
        }
    }
}

/// Independent accumulator sets per row count: enough chains to hide the FMA latency when
/// only one or two rows share each decoded weight. One row takes three, not four: a step of
/// the AVX2 kernel issues seven vector instructions besides its two loads, so three sets of
/// two chains already outpace the 4-cycle FMA latency, and a fourth set pushed the loop past
/// the 16 registers (two accumulators spilled to the stack; `gemv_probe` with the panels in L3:
/// 9.6 GB/s of codes per core with three sets against 8.6 with four).
pub(crate) const fn unroll(rows: usize) -> usize {
    match rows {
        1 => 3,
        2 => 2,
        _ => 1,
    }
}

impl QuantPanels {
    /// The scalar twin of the fused kernel: the same chains of fused multiply-adds per lane,
    /// `unroll(rows)` interleaved accumulator sets summed in order at each group's end.
    fn fused_scalar(&self, jb: usize, x: &[&[f32]], sums: &[f32], out: &mut [[f32; NR]]) {
        let rows = x.len();
        let u = unroll(rows);
        for g in 0..self.groups {
            let (g0, g1) = (g * self.group, ((g + 1) * self.group).min(self.k));
            let mut acc = vec![[0f32; NR]; u * rows];
            for p in g0..g1 {
                let set = (p - g0) % u;
                let codes = self.codes_at(jb, p);
                let w: [f32; NR] = std::array::from_fn(|c| self.value(codes[c]));
                for (r, xr) in x.iter().enumerate() {
                    let a = &mut acc[set * rows + r];
                    for c in 0..NR {
                        a[c] = xr[p].mul_add(w[c], a[c]);
                    }
                }
            }
            let (s, e) = (self.lanes(&self.scale, jb, g), self.offsets(jb, g));
            for (r, o) in out.iter_mut().enumerate() {
                let mut a = acc[r];
                for set in 1..u {
                    for c in 0..NR {
                        a[c] += acc[set * rows + r][c];
                    }
                }
                let sx = sums[r * self.groups + g];
                for c in 0..NR {
                    let t = (-e[c]).mul_add(sx, a[c]);
                    o[c] = s[c].mul_add(t, o[c]);
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{NR, QuantPanels, unroll};

    /// The 16 codes at `ptr` (8 bytes of nibbles when `NIB`, else 16 bytes) as four
    /// vectors of code values (columns 0–3, 4–7, 8–11, 12–15), or of codebook entries when
    /// `tab` (the 16 entries' 64 bytes) is given: each code `c` picks bytes `4c..4c + 4`.
    ///
    /// # Safety
    /// NEON must be available and `ptr` readable for 8 (`NIB`) or 16 bytes.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn load<const NIB: bool>(ptr: *const u8, tab: Option<&uint8x16x4_t>) -> [float32x4_t; 4] {
        let codes: [uint32x4_t; 4] = if NIB {
            // The word in both 64-bit lanes: lane c (even: low half, odd: high half) finds
            // column c's code 4·⌊c/2⌋ bits up (see `nibble_byte`); NEON shifts right by a
            // negative left shift.
            // SAFETY: the caller vouches for 8 readable bytes.
            let v = vreinterpretq_u32_u64(vdupq_n_u64(unsafe { ptr.cast::<u64>().read_unaligned() }));
            let m = vdupq_n_u32(0x0F);
            std::array::from_fn(|i| {
                let s = -8 * i as i32;
                let sh = [s, s, s - 4, s - 4];
                // SAFETY: four i32 lanes from a four-element array.
                vandq_u32(vshlq_u32(v, unsafe { vld1q_s32(sh.as_ptr()) }), m)
            })
        } else {
            // SAFETY: the caller vouches for 16 readable bytes.
            let bytes = unsafe { vld1q_u8(ptr) };
            let (lo, hi) = (vmovl_u8(vget_low_u8(bytes)), vmovl_high_u8(bytes));
            [vmovl_u16(vget_low_u16(lo)), vmovl_high_u16(lo), vmovl_u16(vget_low_u16(hi)), vmovl_high_u16(hi)]
        };
        match tab {
            None => codes.map(|c| vcvtq_f32_u32(c)),
            Some(t) => codes.map(|c| {
                let idx = vaddq_u32(vmulq_n_u32(c, 0x0404_0404), vdupq_n_u32(0x0302_0100));
                vreinterpretq_f32_u8(vqtbl4q_u8(*t, vreinterpretq_u8_u32(idx)))
            }),
        }
    }

    /// The codebook's 64 bytes, if there is one.
    #[target_feature(enable = "neon")]
    fn table(q: &QuantPanels) -> Option<uint8x16x4_t> {
        // SAFETY: reading 64 bytes from a 16-entry f32 array.
        q.table.as_ref().map(|t| unsafe { vld1q_u8_x4(t.as_ptr() as *const u8) })
    }

    /// Scale and offset vectors of panel `jb`, group `g`.
    #[target_feature(enable = "neon")]
    #[inline]
    fn scale_offset(q: &QuantPanels, jb: usize, g: usize) -> ([float32x4_t; 4], [float32x4_t; 4]) {
        let at = (jb * q.groups + g) * NR;
        assert!(at + NR <= q.scale.len() && (q.uniform.is_some() || at + NR <= q.offset.len()));
        // SAFETY: at + 16 ≤ scale.len() and, when offsets are stored, ≤ offset.len() (asserted).
        unsafe {
            let s = std::array::from_fn(|i| vld1q_f32(q.scale.as_ptr().add(at + 4 * i)));
            let e = match q.uniform {
                Some(e) => [vdupq_n_f32(e); 4],
                None => std::array::from_fn(|i| vld1q_f32(q.offset.as_ptr().add(at + 4 * i))),
            };
            (s, e)
        }
    }

    /// [`super::QuantPanels`]' decode on NEON: `(c − e)·S`, as the scalar twin rounds it.
    ///
    /// # Safety
    /// The CPU must support NEON; `out.len() == (k1 − k0)·NR`, `k1 ≤ k`.
    #[target_feature(enable = "neon")]
    pub unsafe fn decode(q: &QuantPanels, jb: usize, k0: usize, k1: usize, out: &mut [f32]) {
        let w = q.width();
        assert!(out.len() == (k1 - k0) * NR && k1 <= q.k && (jb * q.k + k1) * w <= q.codes.len());
        let tab = table(q);
        for p in k0..k1 {
            let (s, e) = scale_offset(q, jb, p / q.group);
            // SAFETY: (jb·k + p + 1)·w ≤ codes.len() and (p − k0)·16 + 16 ≤ out.len() (asserted).
            unsafe {
                let ptr = q.codes.as_ptr().add((jb * q.k + p) * w);
                let v = if q.nibbles { load::<true>(ptr, tab.as_ref()) } else { load::<false>(ptr, tab.as_ref()) };
                for i in 0..4 {
                    vst1q_f32(out.as_mut_ptr().add((p - k0) * NR + 4 * i), vmulq_f32(vsubq_f32(v[i], e[i]), s[i]));
                }
            }
        }
    }

    /// The fused small-M kernel for 1..=6 rows (see the AVX2 twin).
    ///
    /// # Safety
    /// The CPU must support NEON; every row of `x` has `k` values, `out.len() == x.len() ≤ 6`,
    /// `sums` holds `x.len()·groups` values.
    #[target_feature(enable = "neon")]
    pub unsafe fn fused(q: &QuantPanels, jb: usize, x: &[&[f32]], sums: &[f32], out: &mut [[f32; NR]]) {
        macro_rules! go {
            ($nib:literal) => {
                match x.len() {
                    1 => rows::<1, { unroll(1) }, $nib>(q, jb, x, sums, out),
                    2 => rows::<2, { unroll(2) }, $nib>(q, jb, x, sums, out),
                    3 => rows::<3, 1, $nib>(q, jb, x, sums, out),
                    4 => rows::<4, 1, $nib>(q, jb, x, sums, out),
                    5 => rows::<5, 1, $nib>(q, jb, x, sums, out),
                    _ => rows::<6, 1, $nib>(q, jb, x, sums, out),
                }
            };
        }
        // SAFETY: forwarded contract.
        unsafe { if q.nibbles { go!(true) } else { go!(false) } }
    }

    /// `R` rows against panel `jb` with `U` interleaved accumulator sets per group.
    #[target_feature(enable = "neon")]
    unsafe fn rows<const R: usize, const U: usize, const NIB: bool>(
        q: &QuantPanels,
        jb: usize,
        x: &[&[f32]],
        sums: &[f32],
        out: &mut [[f32; NR]],
    ) {
        let w = q.width();
        assert!(x.len() == R && out.len() == R && sums.len() == R * q.groups && x.iter().all(|r| r.len() == q.k));
        assert!((jb + 1) * q.k * w <= q.codes.len());
        let tab = table(q);
        // SAFETY: panel jb's codes, k·w bytes from here, are in bounds (asserted).
        let codes = unsafe { q.codes.as_ptr().add(jb * q.k * w) };
        let mut y = [[vdupq_n_f32(0.0); 4]; R];
        for g in 0..q.groups {
            let (g0, g1) = (g * q.group, ((g + 1) * q.group).min(q.k));
            let mut acc = [[[vdupq_n_f32(0.0); 4]; R]; U];
            let mut step = |set: usize, p: usize| {
                // SAFETY: p < g1 ≤ k, so the codes at p·w and x[r][p] are in bounds.
                let wv = unsafe { load::<NIB>(codes.add(p * w), tab.as_ref()) };
                for (r, a) in acc[set].iter_mut().enumerate() {
                    let xv = x[r][p];
                    for i in 0..4 {
                        a[i] = vfmaq_n_f32(a[i], wv[i], xv);
                    }
                }
            };
            for p in g0..g1 {
                step((p - g0) % U, p);
            }
            let (s, e) = scale_offset(q, jb, g);
            for r in 0..R {
                let sx = vdupq_n_f32(sums[r * q.groups + g]);
                for i in 0..4 {
                    let mut a = acc[0][r][i];
                    for set in acc.iter().skip(1) {
                        a = vaddq_f32(a, set[r][i]);
                    }
                    let t = vfmsq_f32(a, e[i], sx);
                    y[r][i] = vfmaq_f32(y[r][i], s[i], t);
                }
            }
        }
        for (o, yr) in out.iter_mut().zip(y) {
            for (i, v) in yr.into_iter().enumerate() {
                // SAFETY: each output row holds 16 floats: 4i + 4 ≤ 16.
                unsafe { vst1q_f32(o.as_mut_ptr().add(4 * i), v) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{NR, QuantPanels, unroll};

    /// The 16 codes at `ptr` (8 bytes of nibbles when `NIB`, else 16 bytes) as two vectors of
    /// code values (columns 0–7, 8–15), or of codebook entries when `tab` is given.
    ///
    /// # Safety
    /// AVX2 must be available and `ptr` readable for 8 (`NIB`) or 16 bytes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load<const NIB: bool, const TAB: bool>(ptr: *const u8, tab: (__m256, __m256)) -> (__m256, __m256) {
        // SAFETY: the caller vouches for 8 / 16 readable bytes; loads are unaligned.
        let (a, b) = unsafe {
            if NIB {
                // The word in every 64-bit lane: lane c (even: low half, odd: high half) finds
                // column c's code 4·⌊c/2⌋ bits up (see `nibble_byte`).
                let v = _mm256_set1_epi64x(ptr.cast::<i64>().read_unaligned());
                let m = _mm256_set1_epi32(0x0F);
                let lo = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
                let hi = _mm256_setr_epi32(16, 16, 20, 20, 24, 24, 28, 28);
                (_mm256_and_si256(_mm256_srlv_epi32(v, lo), m), _mm256_and_si256(_mm256_srlv_epi32(v, hi), m))
            } else {
                // Bytes are spread to dwords with in-lane shuffles of a broadcast (no
                // lane-crossing widening): dword i of the first is byte i, of the second i + 8.
                const Z: i8 = -1;
                let lo_idx = _mm256_setr_epi8(
                    0, Z, Z, Z, 1, Z, Z, Z, 2, Z, Z, Z, 3, Z, Z, Z, 4, Z, Z, Z, 5, Z, Z, Z, 6, Z, Z, Z, 7, Z, Z, Z,
                );
                let hi_idx = _mm256_setr_epi8(
                    8, Z, Z, Z, 9, Z, Z, Z, 10, Z, Z, Z, 11, Z, Z, Z, 12, Z, Z, Z, 13, Z, Z, Z, 14, Z, Z, Z, 15, Z, Z,
                    Z,
                );
                let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(ptr as *const __m128i));
                (_mm256_shuffle_epi8(v, lo_idx), _mm256_shuffle_epi8(v, hi_idx))
            }
        };
        if TAB {
            let (t0, t1) = tab;
            let seven = _mm256_set1_epi32(7);
            let pick = |i: __m256i| {
                let high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, seven));
                _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, i), _mm256_permutevar8x32_ps(t1, i), high)
            };
            (pick(a), pick(b))
        } else {
            (_mm256_cvtepi32_ps(a), _mm256_cvtepi32_ps(b))
        }
    }

    /// Whether [`rows`] reads `NIB`, `TAB` codes with [`scaled`]: linear 4-bit codes.
    const fn scales_codes(nib: bool, tab: bool) -> bool {
        nib && !tab
    }

    /// The per-lane power of two [`scaled`] leaves on column `c`'s code: `2^(4·⌊(c mod 8)/2⌋)`.
    const POW: [f32; 8] = [1.0, 1.0, 16.0, 16.0, 256.0, 256.0, 4096.0, 4096.0];
    /// `1 / POW`, exactly (powers of two).
    const INV_POW: [f32; 8] = [1.0, 1.0, 1.0 / 16.0, 1.0 / 16.0, 1.0 / 256.0, 1.0 / 256.0, 1.0 / 4096.0, 1.0 / 4096.0];

    /// The 16 linear 4-bit codes of the word at `ptr`, each times its lane's [`POW`]: the AND
    /// that isolates column `c`'s code leaves it where the packing put it, `4·⌊c/2⌋` bits up
    /// (columns 8–15 after one uniform 16-bit shift), and the conversion is exact, so the
    /// per-lane shifts of [`load`] are not needed. The fused kernel undoes the power of two in
    /// each group's offset and scale (`e·POW`, `S/POW`), exactly: the chains are the scalar
    /// twin's scaled by `POW`, and every product and sum is the same bit pattern scaled, as
    /// long as none leaves f32's normal range (|x| above ~10³⁰, partial sums below 10⁻³⁸, or
    /// scales below 10⁻³⁴).
    ///
    /// # Safety
    /// AVX2 must be available and `ptr` readable for 8 bytes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn scaled(ptr: *const u8) -> (__m256, __m256) {
        // SAFETY: the caller vouches for 8 readable bytes.
        let v = _mm256_set1_epi64x(unsafe { ptr.cast::<i64>().read_unaligned() });
        let m = _mm256_setr_epi32(0xF, 0xF, 0xF0, 0xF0, 0xF00, 0xF00, 0xF000, 0xF000);
        (
            _mm256_cvtepi32_ps(_mm256_and_si256(v, m)),
            _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32::<16>(v), m)),
        )
    }

    /// One step's 16 weights as [`rows`] multiplies them: [`scaled`] for linear 4-bit codes,
    /// else [`load`].
    ///
    /// # Safety
    /// As [`load`].
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn step<const NIB: bool, const TAB: bool>(ptr: *const u8, tab: (__m256, __m256)) -> (__m256, __m256) {
        // SAFETY: forwarded contract.
        unsafe { if scales_codes(NIB, TAB) { scaled(ptr) } else { load::<NIB, TAB>(ptr, tab) } }
    }

    /// The codebook as two vectors (zeros when there is none: `load::<_, false>` ignores them).
    #[target_feature(enable = "avx2,fma")]
    fn table(q: &QuantPanels) -> (__m256, __m256) {
        let t = q.table.unwrap_or([0.0; 16]);
        // SAFETY: reading 8 + 8 floats from a 16-entry array.
        unsafe { (_mm256_loadu_ps(t.as_ptr()), _mm256_loadu_ps(t.as_ptr().add(8))) }
    }

    /// Scale and offset vectors of panel `jb`, group `g`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) fn scale_offset(q: &QuantPanels, jb: usize, g: usize) -> ([__m256; 2], [__m256; 2]) {
        let at = (jb * q.groups + g) * NR;
        assert!(at + NR <= q.scale.len() && (q.uniform.is_some() || at + NR <= q.offset.len()));
        // SAFETY: at + 16 ≤ scale.len() and, when offsets are stored, ≤ offset.len() (asserted).
        unsafe {
            let s = [_mm256_loadu_ps(q.scale.as_ptr().add(at)), _mm256_loadu_ps(q.scale.as_ptr().add(at + 8))];
            let e = match q.uniform {
                Some(e) => [_mm256_set1_ps(e); 2],
                None => [_mm256_loadu_ps(q.offset.as_ptr().add(at)), _mm256_loadu_ps(q.offset.as_ptr().add(at + 8))],
            };
            (s, e)
        }
    }

    /// Decodes reduction rows `k0..k1` of panel `jb` to `S·(c − e)` into `out` (`[p][NR]`).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `out.len() == (k1 − k0)·NR`, `k1 ≤ k`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn decode(q: &QuantPanels, jb: usize, k0: usize, k1: usize, out: &mut [f32]) {
        // SAFETY: forwarded contract.
        unsafe {
            match (q.nibbles, q.table.is_some()) {
                (true, true) => decode_as::<true, true>(q, jb, k0, k1, out),
                (true, false) => decode_as::<true, false>(q, jb, k0, k1, out),
                (false, true) => decode_as::<false, true>(q, jb, k0, k1, out),
                (false, false) => decode_as::<false, false>(q, jb, k0, k1, out),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn decode_as<const NIB: bool, const TAB: bool>(
        q: &QuantPanels,
        jb: usize,
        k0: usize,
        k1: usize,
        out: &mut [f32],
    ) {
        let w = q.width();
        assert!(out.len() == (k1 - k0) * NR && k1 <= q.k && (jb * q.k + k1) * w <= q.codes.len());
        let tab = table(q);
        let mut g_cur = usize::MAX;
        let (mut s, mut e) = ([_mm256_setzero_ps(); 2], [_mm256_setzero_ps(); 2]);
        for p in k0..k1 {
            let g = p / q.group;
            if g != g_cur {
                g_cur = g;
                (s, e) = scale_offset(q, jb, g);
            }
            let o = (p - k0) * NR;
            // SAFETY: (jb·k + p + 1)·w ≤ codes.len() and o + 16 ≤ out.len() (asserted).
            unsafe {
                let (v0, v1) = load::<NIB, TAB>(q.codes.as_ptr().add((jb * q.k + p) * w), tab);
                _mm256_storeu_ps(out.as_mut_ptr().add(o), _mm256_mul_ps(_mm256_sub_ps(v0, e[0]), s[0]));
                _mm256_storeu_ps(out.as_mut_ptr().add(o + 8), _mm256_mul_ps(_mm256_sub_ps(v1, e[1]), s[1]));
            }
        }
    }

    /// The fused small-M kernel for 1..=6 rows.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; every row of `x` has `k` values, `out.len() ==
    /// x.len() ≤ 6`, `sums` holds `x.len()·groups` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fused(q: &QuantPanels, jb: usize, x: &[&[f32]], sums: &[f32], out: &mut [[f32; NR]]) {
        macro_rules! go {
            ($nib:literal, $tab:literal) => {
                match x.len() {
                    1 => rows::<1, { unroll(1) }, $nib, $tab>(q, jb, x, sums, out),
                    2 => rows::<2, { unroll(2) }, $nib, $tab>(q, jb, x, sums, out),
                    3 => rows::<3, 1, $nib, $tab>(q, jb, x, sums, out),
                    4 => rows::<4, 1, $nib, $tab>(q, jb, x, sums, out),
                    5 => rows::<5, 1, $nib, $tab>(q, jb, x, sums, out),
                    _ => rows::<6, 1, $nib, $tab>(q, jb, x, sums, out),
                }
            };
        }
        // SAFETY: forwarded contract.
        unsafe {
            match (q.nibbles, q.table.is_some()) {
                (true, true) => go!(true, true),
                (true, false) => go!(true, false),
                (false, true) => go!(false, true),
                (false, false) => go!(false, false),
            }
        }
    }

    /// `R` rows against panel `jb` with `U` interleaved accumulator sets per group.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows<const R: usize, const U: usize, const NIB: bool, const TAB: bool>(
        q: &QuantPanels,
        jb: usize,
        x: &[&[f32]],
        sums: &[f32],
        out: &mut [[f32; NR]],
    ) {
        let w = q.width();
        assert!(x.len() == R && out.len() == R && sums.len() == R * q.groups && x.iter().all(|r| r.len() == q.k));
        assert!((jb + 1) * q.k * w <= q.codes.len());
        let tab = table(q);
        let xp: [*const f32; R] = std::array::from_fn(|r| x[r].as_ptr());
        // SAFETY: panel jb's codes, k·w bytes from here, are in bounds (asserted).
        let codes = unsafe { q.codes.as_ptr().add(jb * q.k * w) };
        let mut y = [[_mm256_setzero_ps(); 2]; R];
        for g in 0..q.groups {
            let (g0, g1) = (g * q.group, ((g + 1) * q.group).min(q.k));
            // As the AVX-512 kernel: scales and codes fetched ahead (addresses only, so
            // wrapping arithmetic).
            let next = q.scale.as_ptr().wrapping_add((jb * q.groups + g + super::avx512::PREFETCH_GROUPS) * NR);
            _mm_prefetch::<_MM_HINT_T0>(next.cast());
            let mut acc = [[[_mm256_setzero_ps(); 2]; R]; U];
            let mut p = g0;
            // SAFETY (both loops): p < g1 ≤ k, so the codes at p·w and x[r][p] are in bounds.
            while p + U <= g1 {
                if U * w <= 64 {
                    // At most one line starts in these bytes: prefetching the step's own
                    // address ahead, whether or not a line starts, costs one load-port
                    // instruction and keeps the loop free of the inner loop's branches.
                    _mm_prefetch::<_MM_HINT_T0>(codes.wrapping_add(p * w + super::avx512::PREFETCH).cast());
                } else {
                    super::avx512::prefetch_lines(codes, p * w, (p + U) * w);
                }
                for (u, set) in acc.iter_mut().enumerate() {
                    let (w0, w1) = unsafe { step::<NIB, TAB>(codes.add((p + u) * w), tab) };
                    for (r, a) in set.iter_mut().enumerate() {
                        let xv = unsafe { _mm256_broadcast_ss(&*xp[r].add(p + u)) };
                        a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                        a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                    }
                }
                p += U;
            }
            for set in acc.iter_mut().take(g1 - p) {
                let (w0, w1) = unsafe { step::<NIB, TAB>(codes.add(p * w), tab) };
                for (r, a) in set.iter_mut().enumerate() {
                    let xv = unsafe { _mm256_broadcast_ss(&*xp[r].add(p)) };
                    a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                }
                p += 1;
            }
            let (mut s, mut e) = scale_offset(q, jb, g);
            if scales_codes(NIB, TAB) {
                // SAFETY: 8 floats each.
                let (pow, inv) = unsafe { (_mm256_loadu_ps(POW.as_ptr()), _mm256_loadu_ps(INV_POW.as_ptr())) };
                for h in 0..2 {
                    s[h] = _mm256_mul_ps(s[h], inv);
                    e[h] = _mm256_mul_ps(e[h], pow);
                }
            }
            for r in 0..R {
                let sx = _mm256_set1_ps(sums[r * q.groups + g]);
                for h in 0..2 {
                    let mut a = acc[0][r][h];
                    for set in acc.iter().skip(1) {
                        a = _mm256_add_ps(a, set[r][h]);
                    }
                    let t = _mm256_fnmadd_ps(e[h], sx, a);
                    y[r][h] = _mm256_fmadd_ps(s[h], t, y[r][h]);
                }
            }
        }
        for (o, yr) in out.iter_mut().zip(y) {
            // SAFETY: each output row holds 16 floats.
            unsafe {
                _mm256_storeu_ps(o.as_mut_ptr(), yr[0]);
                _mm256_storeu_ps(o.as_mut_ptr().add(8), yr[1]);
            }
        }
    }
}

/// The fused kernel on AVX-512 for 4-bit codes: the AVX2 kernel's chains on 16-lane registers,
/// so the bits agree.
///
/// Cross-lane widening (`vpmovzxbd`) is slow on Zen 4's 512-bit datapath (a first try that
/// widened two indices' bytes at once ran no faster than AVX2), so the codes reach their lanes
/// without it: the nibble packing (see [`nibble_byte`]) puts column `c`'s code at bit
/// `32·(c mod 2) + 4·⌊c/2⌋` of an index's 64-bit word, and a broadcast load and a per-lane shift
/// (`vpsrlvd`) bring it to lane `c`; one `vpermps` then gives its value (the code, or its
/// codebook entry).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MR, NR, QuantPanels, unroll};

    /// The 16 columns' codes of the 64-bit word at `ptr` looked up in `tab` (the code values
    /// 0–15 as f32, or the codebook's entries): `vpermps` reads only each lane's low 4 bits,
    /// so the lookup needs no mask, and on Zen 4 it is faster than an AND and a conversion
    /// (`gemv_probe`: 17 against 12 GB/s of codes on one core with the panels in L2).
    ///
    /// # Safety
    /// AVX-512 F must be available and `ptr` readable for 8 bytes.
    #[target_feature(enable = "avx2,fma,avx512f")]
    #[inline]
    unsafe fn load(ptr: *const u8, shift: __m512i, tab: __m512) -> __m512 {
        // SAFETY: the caller vouches for 8 readable bytes.
        let v = _mm512_srlv_epi32(_mm512_set1_epi64(unsafe { ptr.cast::<i64>().read_unaligned() }), shift);
        _mm512_permutexvar_ps(v, tab)
    }

    /// The lookup [`load`] takes for `q`: its codebook, or the code values 0–15.
    ///
    /// # Safety
    /// AVX-512 F must be available.
    #[target_feature(enable = "avx2,fma,avx512f")]
    #[inline]
    unsafe fn table(q: &QuantPanels) -> __m512 {
        let ints: [f32; 16] = std::array::from_fn(|c| c as f32);
        // SAFETY: 16 floats.
        unsafe { _mm512_loadu_ps(q.table.as_ref().unwrap_or(&ints).as_ptr()) }
    }

    /// Scale and offset vectors of panel `jb`, group `g`.
    ///
    /// # Safety
    /// AVX-512 F must be available.
    #[target_feature(enable = "avx2,fma,avx512f")]
    #[inline]
    unsafe fn scale_offset(q: &QuantPanels, jb: usize, g: usize) -> (__m512, __m512) {
        let at = (jb * q.groups + g) * NR;
        assert!(at + NR <= q.scale.len() && (q.uniform.is_some() || at + NR <= q.offset.len()));
        // SAFETY: at + 16 ≤ scale.len() and, when offsets are stored, ≤ offset.len() (asserted).
        unsafe {
            let e = match q.uniform {
                Some(e) => _mm512_set1_ps(e),
                None => _mm512_loadu_ps(q.offset.as_ptr().add(at)),
            };
            (_mm512_loadu_ps(q.scale.as_ptr().add(at)), e)
        }
    }

    /// Decodes reduction rows `k0..k1` of nibble panel `jb` to `S·(c − e)` into `out`
    /// (`[p][NR]`), as the AVX2 decode rounds it.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F; the codes are nibbles; `out.len() == (k1 − k0)·NR`,
    /// `k1 ≤ k`.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn decode(q: &QuantPanels, jb: usize, k0: usize, k1: usize, out: &mut [f32]) {
        const W: usize = NR / 2;
        assert!(q.nibbles && out.len() == (k1 - k0) * NR && k1 <= q.k && (jb * q.k + k1) * W <= q.codes.len());
        let shift = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
        // SAFETY: AVX-512 F is enabled on this function.
        let tab = unsafe { table(q) };
        let mut g_cur = usize::MAX;
        let (mut s, mut e) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for p in k0..k1 {
            let g = p / q.group;
            if g != g_cur {
                g_cur = g;
                // SAFETY: AVX-512 F is enabled on this function.
                (s, e) = unsafe { scale_offset(q, jb, g) };
            }
            // SAFETY: (jb·k + p + 1)·W ≤ codes.len() and (p − k0 + 1)·16 ≤ out.len() (asserted).
            unsafe {
                let v = load(q.codes.as_ptr().add((jb * q.k + p) * W), shift, tab);
                _mm512_storeu_ps(out.as_mut_ptr().add((p - k0) * NR), _mm512_mul_ps(_mm512_sub_ps(v, e), s));
            }
        }
    }

    /// The fused kernel for 1..=[`MR`] rows of nibble codes.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F; the codes are nibbles; every row of `x`
    /// has `k` values, `out.len() == x.len() ≤ MR`, `sums` holds `x.len()·groups` values.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn fused(q: &QuantPanels, jb: usize, x: &[&[f32]], sums: &[f32], out: &mut [[f32; NR]]) {
        const { assert!(MR == 6) };
        // SAFETY: forwarded contract; `rows` asserts the shapes.
        unsafe {
            match x.len() {
                1 => rows::<1, { unroll(1) }>(q, jb, x, sums, out),
                2 => rows::<2, { unroll(2) }>(q, jb, x, sums, out),
                3 => rows::<3, 1>(q, jb, x, sums, out),
                4 => rows::<4, 1>(q, jb, x, sums, out),
                5 => rows::<5, 1>(q, jb, x, sums, out),
                _ => rows::<6, 1>(q, jb, x, sums, out),
            }
        }
    }

    /// How far ahead of the group being multiplied [`rows`] prefetches codes, in bytes: with
    /// one or two rows the kernel decodes faster than the hardware prefetcher alone streams
    /// the panels in from memory.
    pub(crate) const PREFETCH: usize = 1024;
    /// How far ahead [`rows`] prefetches the scales, in groups.
    pub(crate) const PREFETCH_GROUPS: usize = 8;

    /// Prefetches, [`PREFETCH`] bytes ahead, each cache line that starts within bytes
    /// `from..to` of `codes`: a kernel calls it for the bytes of each step, so every line of a
    /// panel is fetched once, evenly along the loop (a whole group's lines at once would be a
    /// burst of 512, the whole 32 KiB panel, with one scale per row over k = 4096).
    #[inline(always)]
    pub(super) fn prefetch_lines(codes: *const u8, from: usize, to: usize) {
        let mut line = from.div_ceil(64) * 64;
        while line < to {
            // SAFETY: a prefetch reads nothing and never faults; the address is only formed
            // (with wrapping arithmetic).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(codes.wrapping_add(line + PREFETCH).cast()) };
            line += 64;
        }
    }

    /// `R` rows against panel `jb` with `U` interleaved accumulator sets per group.
    #[target_feature(enable = "avx2,fma,avx512f")]
    unsafe fn rows<const R: usize, const U: usize>(
        q: &QuantPanels,
        jb: usize,
        x: &[&[f32]],
        sums: &[f32],
        out: &mut [[f32; NR]],
    ) {
        const W: usize = NR / 2;
        assert!(q.nibbles);
        // SAFETY: AVX-512 F is enabled on this function.
        let tab = unsafe { table(q) };
        assert!(x.len() == R && out.len() == R && sums.len() == R * q.groups && x.iter().all(|r| r.len() == q.k));
        assert!((jb + 1) * q.k * W <= q.codes.len());
        let shift = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
        let xp: [*const f32; R] = std::array::from_fn(|r| x[r].as_ptr());
        // SAFETY: panel jb's codes, k·W bytes from here, are in bounds (asserted).
        let codes = unsafe { q.codes.as_ptr().add(jb * q.k * W) };
        let mut y = [_mm512_setzero_ps(); R];
        for g in 0..q.groups {
            let (g0, g1) = (g * q.group, ((g + 1) * q.group).min(q.k));
            // The scales PREFETCH_GROUPS groups ahead (past the panel's end: the next panel's,
            // which this thread most likely takes next), the codes PREFETCH bytes ahead below.
            // Prefetches never fault, so the addresses are formed with wrapping arithmetic.
            let next = q.scale.as_ptr().wrapping_add((jb * q.groups + g + PREFETCH_GROUPS) * NR);
            _mm_prefetch::<_MM_HINT_T0>(next.cast());
            let mut acc = [[_mm512_setzero_ps(); R]; U];
            let mut p = g0;
            // SAFETY (both loops): p < g1 ≤ k, so the codes at p·W and x[r][p] are in bounds.
            while p + U <= g1 {
                prefetch_lines(codes, p * W, (p + U) * W);
                for (u, set) in acc.iter_mut().enumerate() {
                    let w = unsafe { load(codes.add((p + u) * W), shift, tab) };
                    for (r, a) in set.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(unsafe { *xp[r].add(p + u) }), w, *a);
                    }
                }
                p += U;
            }
            for set in acc.iter_mut().take(g1 - p) {
                let w = unsafe { load(codes.add(p * W), shift, tab) };
                for (r, a) in set.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(unsafe { *xp[r].add(p) }), w, *a);
                }
                p += 1;
            }
            // SAFETY: AVX-512 F is enabled on this function.
            let (s, e) = unsafe { scale_offset(q, jb, g) };
            for r in 0..R {
                let mut a = acc[0][r];
                for set in acc.iter().skip(1) {
                    a = _mm512_add_ps(a, set[r]);
                }
                let t = _mm512_fnmadd_ps(e, _mm512_set1_ps(sums[r * q.groups + g]), a);
                y[r] = _mm512_fmadd_ps(s, t, y[r]);
            }
        }
        for (o, yr) in out.iter_mut().zip(y) {
            // SAFETY: each output row holds 16 floats.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), yr) };
        }
    }
}

#[cfg(test)]
mod tests;
