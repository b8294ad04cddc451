//! The instruction sets a kernel may use, detected once at run time (never by compile-time
//! `target-cpu`), with every level below the detected one available to force in tests.

/// A SIMD level, ordered from the most portable to the fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Plain Rust: the twin every other level is tested against.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
}

impl SimdLevel {
    /// The fastest level this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Scalar
    }

    /// Every level this CPU can run, scalar first.
    pub fn available() -> Vec<Self> {
        [SimdLevel::Scalar, SimdLevel::Avx2].into_iter().filter(|l| *l <= Self::detect()).collect()
    }
}
