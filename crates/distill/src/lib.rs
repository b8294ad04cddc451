//! pare-distill: knowledge distillation.
//!
//! This crate will hold the distillation losses (soft targets at temperature T with the T²
//! factor, hard-label cross-entropy, FitNets hints, attention transfer, cosine/MSE embedding
//! losses) and the frozen-teacher wiring, training through core-tensor's trainer. It is
//! filled by issue 6; nothing is implemented yet.
