//! pare-distill: knowledge distillation.
//!
//! [`losses`] holds the distillation losses — soft targets at temperature T with the T²
//! factor, hard-label cross-entropy and their weighted sum, FitNets hints with an optional
//! learned projection, attention transfer, and cosine/MSE embedding losses for encoders — as
//! differentiable candle expressions that core-tensor's trainer optimises. The teacher wiring
//! (frozen teacher, cached logits, layer taps) and the command line come next (issue 6).

pub mod losses;
