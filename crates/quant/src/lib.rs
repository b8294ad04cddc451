//! pare-quant: quantization algorithms.
//!
//! This crate will hold the algorithms that turn dense weights and activations into
//! `pare_core_tensor::QuantizedTensor`s (the formats themselves live in core-tensor):
//! fixed-point narrowing (FP16, BF16, FP8), linear range mapping at 2–8 bits, quantile,
//! NF4 and k-means codebooks; per-tensor, per-channel, per-group and per-token granularity;
//! PTQ dynamic and static with observers (min-max, moving average, percentile, MSE, KL);
//! GPTQ, AWQ and SmoothQuant; QAT with fake-quant and LSQ; mixed precision; and export to
//! GGUF and the compressed-tensors layout. It is filled by issue 3; nothing is implemented yet.
