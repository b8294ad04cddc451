//! Gradual pruning's sparsity schedule (Zhu & Gupta, 2017): from an initial sparsity `s_i`
//! at step `t0` to the final `s_f` over `n` pruning steps `Δt` apart,
//! `s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(n·Δt))³` — pruning fast while the network has
//! redundant weights and slowly as few remain.

use pare_core_tensor::{Error, Result};

/// A cubic schedule over optimisation steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cubic {
    /// Sparsity at the first pruning step.
    pub initial: f64,
    /// Sparsity from the last pruning step on.
    pub target: f64,
    /// The first pruning step (1-based optimiser step).
    pub start: usize,
    /// Pruning steps.
    pub steps: usize,
    /// Optimiser steps between pruning steps.
    pub every: usize,
}

impl Cubic {
    /// A schedule that prunes `steps` times, evenly over the first three quarters of `total`
    /// optimiser steps (the last quarter fine-tunes at the target), from 0 to `target`.
    pub fn over(total: usize, steps: usize, target: f64) -> Result<Self> {
        crate::select::check_sparsity("gradual pruning target", target)?;
        if steps == 0 {
            return Err(Error::invalid("--gradual", "pruning steps must be at least 1, found 0"));
        }
        let span = total * 3 / 4;
        if span < steps {
            return Err(Error::invalid(
                "--gradual",
                format!(
                    "{steps} pruning steps do not fit in the {total} optimisation steps of the fine-tuning (at most {span})"
                ),
            ));
        }
        let every = span / steps;
        Ok(Self { initial: 0.0, target, start: every, steps, every })
    }

    /// The sparsity in force at optimiser step `t` (1-based): that of the last pruning step
    /// `t0 + j·Δt ≤ t` (`j ≤ n`), or the initial one before `t0`.
    pub fn at(&self, t: usize) -> f64 {
        if t < self.start {
            return self.initial;
        }
        let j = ((t - self.start) / self.every.max(1)).min(self.steps);
        let done = j as f64 / self.steps.max(1) as f64;
        self.target + (self.initial - self.target) * (1.0 - done).powi(3)
    }
}
