//! The instruction sets a kernel may use, detected once at run time (never by compile-time
//! `target-cpu`), with every level below the detected one available to force in tests.

/// A SIMD level, ordered from the most portable to the fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Plain Rust: the twin every other level is tested against.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL) with VNNI, on top of AVX2: the W8A8 products run on
    /// `vpdpbusd` (four int8 products summed into an i32 lane per instruction); the f32 GEMM
    /// micro-kernel (12 × 16), attention and the sparse kernel on 16-lane registers (the same
    /// bits as their AVX2 paths); every other kernel runs its AVX2 path.
    Avx512Vnni,
    /// aarch64 Advanced SIMD (NEON): the f32 GEMM, W8A8 and weight-only kernels; the other
    /// kernels run their scalar twins there.
    Neon,
}

impl SimdLevel {
    /// The fastest level this CPU supports, probed once per process: every kernel dispatch
    /// asks (through [`SimdLevel::avx2`] and friends), and re-reading seven feature flags per
    /// 6×16 block cost about 1% of MiniLM's f32 time.
    pub fn detect() -> Self {
        static LEVEL: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(Self::probe)
    }

    /// [`SimdLevel::detect`]'s probe of the CPU's features.
    fn probe() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                let vnni = is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni");
                return if vnni { SimdLevel::Avx512Vnni } else { SimdLevel::Avx2 };
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                return SimdLevel::Neon;
            }
        }
        SimdLevel::Scalar
    }

    /// Every level this CPU can run, scalar first (levels of another architecture never).
    pub fn available() -> Vec<Self> {
        match Self::detect() {
            SimdLevel::Scalar => vec![SimdLevel::Scalar],
            SimdLevel::Avx512Vnni => vec![SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512Vnni],
            best => vec![SimdLevel::Scalar, best],
        }
    }

    /// Whether a kernel running at this level may use AVX2 + FMA + F16C: the level is AVX2 or
    /// above it on x86-64, and this CPU has them.
    pub fn avx2(self) -> bool {
        matches!(self, SimdLevel::Avx2 | SimdLevel::Avx512Vnni)
            && matches!(Self::detect(), SimdLevel::Avx2 | SimdLevel::Avx512Vnni)
    }

    /// Whether a kernel running at this level may use AVX-512 F/BW/VL and VNNI (pare has one
    /// AVX-512 level): the level is [`SimdLevel::Avx512Vnni`] and this CPU has them.
    pub fn avx512(self) -> bool {
        self == SimdLevel::Avx512Vnni && Self::detect() == SimdLevel::Avx512Vnni
    }

    /// Whether a kernel running at this level may also multiply bf16 pairs (AVX-512 BF16's
    /// `vdpbf16ps`, on Zen 4 and Sapphire Rapids): the AVX-512 level on a CPU that has them.
    pub fn avx512_bf16(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self.avx512() && is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// A zeroed buffer of `len` values whose first one sits on a 64-byte boundary (a cache line),
/// so a kernel's 32-byte loads at multiples of 32 bytes never straddle two lines (a split
/// load costs two). The allocator only promises 16 bytes.
#[derive(Debug, Clone)]
pub struct Aligned<T> {
    buf: Vec<T>,
    off: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    /// `len` default (zero) values, the first cache-line aligned.
    pub fn new(len: usize) -> Self {
        let extra = 64 / std::mem::size_of::<T>().max(1);
        let buf = vec![T::default(); len + extra];
        let off = buf.as_ptr().align_offset(64).min(extra);
        Self { buf, off, len }
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// `dst[c·ldd + r] = src[r·lds + c]` for `r < rows`, `c < cols`: a strided matrix transposed,
/// 8 × 8 blocks in registers on AVX2 (the same values at every level: it only moves them).
pub fn transpose(level: SimdLevel, src: &[f32], lds: usize, rows: usize, cols: usize, dst: &mut [f32], ldd: usize) {
    transpose_impl::<false>(level, src, lds, rows, cols, dst, ldd);
}

/// [`transpose`], reporting whether every value it moved is finite: a kernel that transposes
/// its whole input anyway (the sparse one) screens it in the same pass instead of a pass of
/// its own.
pub(crate) fn transpose_screened(
    level: SimdLevel,
    src: &[f32],
    lds: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    ldd: usize,
) -> bool {
    transpose_impl::<true>(level, src, lds, rows, cols, dst, ldd)
}

/// [`transpose`], and with `SCREEN` whether every value moved is finite (`true` without).
fn transpose_impl<const SCREEN: bool>(
    level: SimdLevel,
    src: &[f32],
    lds: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    ldd: usize,
) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    assert!((rows - 1) * lds + cols <= src.len() && (cols - 1) * ldd + rows <= dst.len());
    // The whole 8 × 8 blocks done in registers (none without AVX2).
    let (rb, cb, mut finite) = match level {
        #[cfg(target_arch = "x86_64")]
        l if l.avx2() => {
            let (rb, cb) = (rows / 8 * 8, cols / 8 * 8);
            // SAFETY: AVX2 was detected; the blocks lie inside the bounds asserted above.
            let finite = unsafe { avx2::transpose_blocks::<SCREEN>(src, lds, rb, cb, dst, ldd) };
            (rb, cb, finite)
        }
        _ => (0, 0, true),
    };
    for r in 0..rows {
        let c0 = if r < rb { cb } else { 0 };
        for c in c0..cols {
            let v = src[r * lds + c];
            dst[c * ldd + r] = v;
            if SCREEN {
                finite &= v.is_finite();
            }
        }
    }
    finite
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// Asks for the cache lines of `rows` rows of 16 four-byte elements from `first`, `ld`
    /// elements apart (a micro-kernel's output tile), ahead of the stores that will write
    /// them: such a tile's stores to lines not yet in cache otherwise fill the store buffer
    /// and stall the next tile's start. Each row's 16 elements span one or two lines: the
    /// first and the last element's are asked for. Only addresses, formed with wrapping
    /// arithmetic: a prefetch never faults, and nothing is read or written through them.
    #[inline]
    pub(crate) fn prefetch_tile16(first: *const f32, ld: usize, rows: usize) {
        for i in 0..rows {
            let row = first.wrapping_add(i * ld);
            // SAFETY: `_mm_prefetch` is SSE, part of x86-64's baseline; a prefetch is a hint
            // that never faults, whatever the address.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(row.cast());
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(15).cast());
            }
        }
    }

    /// The 8 × 8 transpose of `v` (rows in, columns out), in registers.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) fn transpose8(v: [__m256; 8]) -> [__m256; 8] {
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
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }

    /// [`super::transpose`] for the whole 8 × 8 blocks: rows `0..rb`, columns `0..cb` (both
    /// multiples of 8); with `SCREEN`, whether every value moved is finite (`true` without).
    ///
    /// # Safety
    /// AVX2; `(rb − 1)·lds + cb ≤ src.len()` and `(cb − 1)·ldd + rb ≤ dst.len()` when both are
    /// nonzero.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn transpose_blocks<const SCREEN: bool>(
        src: &[f32],
        lds: usize,
        rb: usize,
        cb: usize,
        dst: &mut [f32],
        ldd: usize,
    ) -> bool {
        if rb == 0 || cb == 0 {
            return true;
        }
        assert!((rb - 1) * lds + cb <= src.len() && (cb - 1) * ldd + rb <= dst.len());
        // x − x is +0 (all bits clear) for a finite x and NaN for an infinity or a NaN: the
        // bitwise OR of the differences is zero exactly when every value is finite.
        let mut bad = _mm256_setzero_ps();
        for ib in (0..rb).step_by(8) {
            for jb in (0..cb).step_by(8) {
                // SAFETY: row ib + i < rb, columns jb .. jb + 8 ≤ cb (asserted bounds).
                let v: [__m256; 8] =
                    std::array::from_fn(|i| unsafe { _mm256_loadu_ps(src.as_ptr().add((ib + i) * lds + jb)) });
                if SCREEN {
                    for r in v {
                        bad = _mm256_or_ps(bad, _mm256_sub_ps(r, r));
                    }
                }
                for (c, col) in transpose8(v).iter().enumerate() {
                    // SAFETY: (jb + c)·ldd + ib + 8 ≤ (cb − 1)·ldd + rb ≤ dst.len().
                    unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add((jb + c) * ldd + ib), *col) };
                }
            }
        }
        _mm256_testz_si256(_mm256_castps_si256(bad), _mm256_castps_si256(bad)) == 1
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{SimdLevel, transpose};

    /// The level the kernels' tests force against the scalar twin is the architecture's own.
    #[test]
    fn the_detected_level_is_this_architectures() {
        let levels = SimdLevel::available();
        assert_eq!(levels[0], SimdLevel::Scalar);
        #[cfg(target_arch = "aarch64")]
        assert_eq!(levels, [SimdLevel::Scalar, SimdLevel::Neon], "NEON is part of every aarch64 CPU");
        #[cfg(target_arch = "x86_64")]
        {
            assert!(!levels.contains(&SimdLevel::Neon));
            // A CPU with VNNI still tests the AVX2 paths its W8A8 products bypass.
            if levels.contains(&SimdLevel::Avx512Vnni) {
                assert_eq!(levels, [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512Vnni]);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Every level moves each value to its transposed place and leaves the rest alone,
        /// with strides wider than the rows and sizes that are not multiples of the 8 × 8 block.
        #[test]
        fn transpose_matches_the_index_definition(rows in 1usize..30, cols in 1usize..30, pad_s in 0usize..5, pad_d in 0usize..5) {
            let (lds, ldd) = (cols + pad_s, rows + pad_d);
            let src: Vec<f32> = (0..rows * lds).map(|i| i as f32).collect();
            for level in SimdLevel::available() {
                let mut dst = vec![-1f32; cols * ldd];
                transpose(level, &src, lds, rows, cols, &mut dst, ldd);
                for c in 0..cols {
                    for r in 0..ldd {
                        let want = if r < rows { src[r * lds + c] } else { -1.0 };
                        prop_assert_eq!(dst[c * ldd + r], want, "{:?} [{}][{}]", level, c, r);
                    }
                }
            }
        }
    }
}
