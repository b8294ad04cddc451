//! Fine-tuning with masks held fixed, and gradual pruning during fine-tuning: a wrapper around
//! any [`TrainTask`] whose `after_step` zeroes the pruned weights after every optimiser step
//! (and, on a [`Cubic`] schedule, grows the masks by magnitude), so core-tensor's trainer —
//! with its checkpoints, early stopping and seeded shuffles — runs the loop.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use pare_core_tensor::train::TrainTask;
use pare_core_tensor::{Error, Result};

use crate::schedule::Cubic;
use crate::select;

/// One masked weight: the trainable variable and its keep-mask as a 0/1 tensor.
struct Masked {
    name: String,
    var: Var,
    keep: Tensor,
    len: usize,
    /// This weight's final sparsity under a schedule, when not the schedule's own target.
    target: Option<f64>,
}

/// A [`TrainTask`] whose pruned weights stay zero: after each optimiser step the masks are
/// applied again (and, with a schedule, recomputed by magnitude at the scheduled sparsity).
pub struct MaskedTask<'a> {
    inner: &'a mut dyn TrainTask,
    weights: Vec<Masked>,
    schedule: Option<Cubic>,
    /// The sparsity the masks hold now.
    pub sparsity: f64,
}

impl<'a> MaskedTask<'a> {
    /// Wraps `inner`; `masks` maps parameter names (`layers.0.weight`) in `vars` to keep-masks
    /// over their row-major values. The masks are applied once now.
    pub fn new(inner: &'a mut dyn TrainTask, vars: &VarMap, masks: &BTreeMap<String, Vec<bool>>) -> Result<Self> {
        let data = vars.data().lock().expect("varmap lock poisoned");
        let mut weights = Vec::new();
        for (name, keep) in masks {
            let var = data
                .get(name)
                .ok_or_else(|| Error::unknown("trainable parameter", name, data.keys().map(String::as_str)))?;
            if var.elem_count() != keep.len() {
                return Err(Error::Shape {
                    name: format!("mask of `{name}`"),
                    expected: vec![var.elem_count()],
                    found: vec![keep.len()],
                });
            }
            let t = Tensor::from_vec(
                keep.iter().map(|&k| if k { 1f32 } else { 0.0 }).collect::<Vec<_>>(),
                var.dims(),
                var.device(),
            )?
            .to_dtype(var.dtype())?;
            weights.push(Masked { name: name.clone(), var: var.clone(), keep: t, len: keep.len(), target: None });
        }
        drop(data);
        let pruned: usize = masks.values().map(|m| m.iter().filter(|k| !**k).count()).sum();
        let total: usize = masks.values().map(Vec::len).sum();
        let mut task = Self { inner, weights, schedule: None, sparsity: pruned as f64 / total.max(1) as f64 };
        task.reapply()?;
        Ok(task)
    }

    /// Grows the masks during training on `schedule` (magnitude within each layer, so every
    /// layer reaches the scheduled sparsity exactly); the masks given to [`MaskedTask::new`]
    /// are the starting point.
    pub fn gradual(mut self, schedule: Cubic) -> Self {
        self.schedule = Some(schedule);
        self
    }

    /// Per-weight final sparsities for the schedule (by parameter name, each in [0, 1)): a
    /// weight listed here follows the schedule scaled to its own target (`target · s_t / s_f`),
    /// the others the schedule itself. Build the schedule with the largest target.
    pub fn with_targets(mut self, targets: &BTreeMap<String, f64>) -> Result<Self> {
        let known: Vec<String> = self.weights.iter().map(|w| w.name.clone()).collect();
        for (name, &t) in targets {
            select::check_sparsity(&format!("gradual target of `{name}`"), t)?;
            let w = self
                .weights
                .iter_mut()
                .find(|w| &w.name == name)
                .ok_or_else(|| Error::unknown("masked parameter", name, known.iter().map(String::as_str)))?;
            w.target = Some(t);
        }
        Ok(self)
    }

    fn reapply(&mut self) -> Result<()> {
        for w in &self.weights {
            w.var.set(&w.var.as_tensor().mul(&w.keep)?)?;
        }
        Ok(())
    }

    /// Re-derives every mask by magnitude at `sparsity` (already-pruned weights are zero, so
    /// they stay pruned).
    fn regrow(&mut self, sparsity: f64) -> Result<()> {
        let full = self.schedule.map_or(sparsity, |s| s.target);
        for w in &mut self.weights {
            let sparsity = match w.target {
                Some(t) if full > 0.0 => t * sparsity / full,
                Some(t) => t,
                None => sparsity,
            };
            let v = w.var.as_tensor().to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let scores: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            let keep = select::mask_lowest(&scores, select::count(sparsity, w.len));
            w.keep = Tensor::from_vec(
                keep.iter().map(|&k| if k { 1f32 } else { 0.0 }).collect::<Vec<_>>(),
                w.var.dims(),
                w.var.device(),
            )?
            .to_dtype(w.var.dtype())?;
            tracing::debug!(weight = %w.name, sparsity, "gradual pruning step");
        }
        self.sparsity = sparsity;
        Ok(())
    }

    /// The keep-masks now, by parameter name.
    pub fn masks(&self) -> Result<BTreeMap<String, Vec<bool>>> {
        self.weights
            .iter()
            .map(|w| {
                Ok((
                    w.name.clone(),
                    w.keep
                        .flatten_all()?
                        .to_dtype(candle_core::DType::F32)?
                        .to_vec1::<f32>()?
                        .iter()
                        .map(|&k| k != 0.0)
                        .collect(),
                ))
            })
            .collect()
    }
}

impl TrainTask for MaskedTask<'_> {
    fn loss(&mut self, batch: &[u32]) -> Result<Tensor> {
        self.inner.loss(batch)
    }

    fn evaluate(&mut self) -> Result<f64> {
        self.inner.evaluate()
    }

    /// Only weights at the schedule's target sparsity may be the run's best.
    fn selectable(&self) -> bool {
        self.inner.selectable() && self.schedule.is_none_or(|s| self.sparsity >= s.target - 1e-12)
    }

    fn after_step(&mut self, step: usize, total: usize) -> Result<()> {
        self.inner.after_step(step, total)?;
        // Whenever the schedule asks for more than the masks hold (at each pruning step, and
        // at once after a resume, when the masks given to `new` are the starting ones).
        if let Some(s) = self.schedule
            && s.at(step) > self.sparsity + 1e-12
        {
            self.regrow(s.at(step))?;
        }
        self.reapply()
    }
}
