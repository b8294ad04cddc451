//! pare-distill: knowledge distillation — a small student trained to reproduce a trained
//! teacher.
//!
//! - [`losses`]: soft targets at temperature T with the T² factor, hard-label cross-entropy and
//!   their weighted sum, FitNets hints with an optional learned projection, attention transfer,
//!   and cosine/MSE embedding losses for encoders — differentiable candle expressions.
//! - [`taps`]: intermediate outputs of layers named by parameter path, captured through
//!   core-tensor's hooks during an ordinary forward pass (no rewritten model), and the
//!   student↔teacher [`FeatureMap`] of hint pairs.
//! - [`cache`]: the frozen teacher's outputs computed once and cached on disk under a
//!   fingerprint of the teacher and the data.
//! - [`digits`]: the distillation task for the digits classifiers (MLP/CNN students).
//! - [`encoder`]: the distillation task for sentence encoders (MiniLM → a shallower student
//!   initialised from every other teacher layer, DistilBERT's recipe).
//!
//! Both tasks implement core-tensor's [`TrainTask`](pare_core_tensor::train::TrainTask), so a
//! run gets the trainer's seeded shuffles, checkpoints and resume, and early stopping.

pub mod cache;
pub mod digits;
pub mod encoder;
pub mod losses;
pub mod taps;

pub use cache::{Fingerprint, teacher_outputs};
pub use digits::{DigitsDistill, FeatureLoss, Settings, teacher_logits};
pub use encoder::{EncoderDistill, EncoderSettings, every_other_layer, split_sentences};
pub use taps::{FeatureMap, Taps};
