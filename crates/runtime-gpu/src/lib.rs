//! pare-runtime-gpu: GPU runtimes.
//!
//! This crate will implement core-tensor's `Runtime` trait on GPUs: wgpu compute shaders
//! (Vulkan, Metal, DX12; executed in CI on Mesa's lavapipe) behind a `wgpu` feature and
//! candle's CUDA device behind a `cuda` feature, with a "not compiled with FEATURE" error
//! without the feature and a "no device" error without a usable device. It is filled by
//! issue 9; nothing is implemented yet.
