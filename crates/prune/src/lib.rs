//! pare-prune: pruning that makes models smaller and, on pare's CPU runtime, faster.
//!
//! - [`unstructured`]: magnitude (layer-wise, or one global threshold with per-layer
//!   bounds), random (the baseline), Wanda and SparseGPT, unstructured or N:M (2:4, 4:8);
//!   the result is stored as CSR or N:M [`pare_core_tensor::SparseTensor`]s, which
//!   pare-runtime-cpu's sparse kernel runs.
//! - [`finetune`]: fine-tuning with the masks held fixed, and gradual pruning on Zhu & Gupta's
//!   cubic [`schedule`], through core-tensor's trainer.
//! - [`structured`]: neurons, channels, attention heads, FFN neurons and whole layers removed
//!   with their dependency groups, giving a genuinely smaller dense model.
//! - [`overrides`]: per-layer (or per-group) sparsities and N:M patterns in place of the
//!   run's one pattern, `GLOB=SPARSITY` / `GLOB=nm:N:M`, the last match winning.
//! - [`sensitivity`]: the metric when each layer alone is pruned at several levels.
//! - [`select`]: the exact selection every method shares (requested and achieved sparsity
//!   agree per layer and globally).

pub mod finetune;
pub mod overrides;
pub mod schedule;
pub mod select;
pub mod sparsegpt;
pub mod structured;
pub mod unstructured;

pub use finetune::MaskedTask;
pub use overrides::{Override, check_each, per_group, per_layer, plan_each, store_sparse_each};
pub use schedule::Cubic;
pub use select::Bounds;
pub use structured::prune_units_each;
pub use unstructured::{
    Calibration, Criterion, LayerStats, Pattern, Pruned, Sensitivity, apply, check, plan, plan_with, prune,
    sensitivity, store_sparse,
};
