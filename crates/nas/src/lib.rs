//! pare-nas: neural architecture search.
//!
//! This crate will hold search spaces (global and cell-based, for MLPs, CNNs and transformer
//! encoders), strategies (random, grid, regularized evolution, Bayesian optimisation,
//! REINFORCE, DARTS), evaluators (short training, one-shot supernets, measured latency on a
//! `&dyn Runtime`) and multi-objective Pareto fronts. It is filled by issue 7; nothing is
//! implemented yet.
