//! pare-nas: neural architecture search — find, automatically, a network as accurate as a
//! hand-designed one but smaller and faster on the target runtime.
//!
//! - [`space`]: typed, serialisable search spaces (built in: global digits MLP/CNN spaces with
//!   depth, widths, kernel sizes and activations; a NAS-Bench-201-style cell space; a
//!   transformer-encoder space of layers, heads, FFN width and hidden width — or read from
//!   TOML/JSON); sampling, mutation, enumeration and encoding for the strategies; each
//!   candidate decodes to a `pare-models` architecture.
//! - [`strategy`]: random, grid, regularized (aging) evolution, Bayesian optimisation (TPE)
//!   and a REINFORCE controller, each proposal seeded by the run's seed and the trial index
//!   (model-based ones replay the history), so a resumed search proposes what an
//!   uninterrupted one would.
//! - [`evaluate`]: short training from scratch through core-tensor's trainer, accuracy,
//!   parameters, bytes, MACs and latency measured on a `Runtime` (cached per architecture);
//!   encoder shapes as sub-networks of a pretrained encoder, scored by embedding cosine.
//! - [`mod@search`]: the loop with constraints (latency, bytes), multi-objective ParEGO
//!   scalarisation, a JSON trial log written after every evaluation and resumed from, the
//!   Pareto front and its hypervolume.
//! - [`supernet`]: weight-sharing supernets over cell spaces — gradient-based search (DARTS,
//!   architecture weights on candle autograd) and one-shot training with uniform single paths,
//!   whose [`supernet::OneShotEvaluator`] scores any cell on inherited weights.

pub mod evaluate;
pub mod search;
pub mod space;
pub mod strategy;
pub mod supernet;

pub use pare_core_tensor::{Error, Result};
pub use search::{
    Metrics, Objective, SearchConfig, SearchLog, Trial, hypervolume_2d, pareto_front, scores, search, search_with,
};
pub use space::{Candidate, Space};
pub use strategy::Strategy;
