//! pare-runtime-cpu: fast CPU kernels.
//!
//! This crate will implement core-tensor's `Runtime` trait with SIMD kernels chosen at run
//! time (AVX2/FMA, AVX-512/VNNI, NEON, scalar): W8A8 int8 GEMM, 4- and 8-bit weight-only
//! GEMV/GEMM that dequantize in registers, FP16/BF16 weights, and sparse CSR, 2:4 and
//! block-sparse kernels, all multi-threaded with rayon and bit-identical across thread counts.
//! Until then, `pare_core_tensor::ReferenceRuntime` runs every format. It is filled by issue 4.
