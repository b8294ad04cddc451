//! FP16 and BF16 weights kept at two bytes each, packed into [`NR`]-column panels and widened
//! to f32 a panel slice at a time (F16C `vcvtph2ps`; BF16 by a 16-bit shift), with f32
//! accumulation in pare's GEMM.

use candle_core::DType;
use half::{bf16, f16};

use crate::gemm::{NR, Panels};
use crate::simd::{Aligned, SimdLevel};

/// Half-precision weights `[n, k]` packed `[panel][k][NR]` as raw 16-bit patterns.
#[derive(Debug, Clone)]
pub struct HalfPanels {
    n: usize,
    k: usize,
    bf16: bool,
    data: Aligned<u16>,
}

impl HalfPanels {
    /// Packs row-major bit patterns of `dtype` (F16 or BF16) weights `[n, k]`.
    pub fn pack(bits: &[u16], n: usize, k: usize, dtype: DType) -> Self {
        assert!(matches!(dtype, DType::F16 | DType::BF16));
        Self { n, k, bf16: dtype == DType::BF16, data: crate::gemm::to_panels(bits, n, k) }
    }

    fn widen(&self, v: u16) -> f32 {
        if self.bf16 { bf16::from_bits(v).to_f32() } else { f16::from_bits(v).to_f32() }
    }
}

impl Panels for HalfPanels {
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
        let src = &self.data[(jb * self.k + k0) * NR..(jb * self.k + k1) * NR];
        let out = &mut buf[..src.len()];
        match level {
            #[cfg(target_arch = "x86_64")]
            l if l.avx2() => {
                // SAFETY: AVX2 and F16C were detected just above; src and out have equal length.
                unsafe { avx2::widen(src, self.bf16, out) }
            }
            _ => {
                for (o, &v) in out.iter_mut().zip(src) {
                    *o = self.widen(v);
                }
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Widens 16-bit floats to f32, eight at a time (the length is a multiple of 16).
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C; `out.len() == src.len()`, a multiple of 8.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen(src: &[u16], bf16: bool, out: &mut [f32]) {
        assert!(out.len() == src.len() && src.len().is_multiple_of(8));
        for i in (0..src.len()).step_by(8) {
            // SAFETY: i + 8 ≤ len for both slices.
            unsafe {
                let v = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                let f = if bf16 {
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
                } else {
                    _mm256_cvtph_ps(v)
                };
                _mm256_storeu_ps(out.as_mut_ptr().add(i), f);
            }
        }
    }
}
