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
