//! pare-prune: pruning.
//!
//! This crate will hold the pruning algorithms: magnitude (layer-wise and global), random,
//! gradual (Zhu & Gupta's cubic schedule), Wanda and SparseGPT; semi-structured N:M masks
//! stored in core-tensor's N:M format; and structured surgery (neurons, channels, attention
//! heads, whole layers) with dependency groups, so the result is a genuinely smaller dense
//! model. It is filled by issue 5; nothing is implemented yet.
