//! The one trainer every technique reuses (fine-tuning after pruning, QAT, distillation, NAS):
//! AdamW or SGD with momentum, a learning-rate schedule, per-epoch evaluation, early stopping
//! that restores the best weights, seeded shuffling, and checkpoints that resume exactly.
//!
//! The optimizers are pare's own rather than candle-nn's because an exact resume needs their
//! state (moments, step count), which candle-nn keeps private; the update rules are the same.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::io::{RawTensor, SafeTensorsFile, save_tensors};
use crate::{Error, Result};

/// The optimizer and its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum OptimizerKind {
    /// AdamW (Loshchilov & Hutter): Adam with decoupled weight decay.
    AdamW {
        /// Peak learning rate.
        lr: f64,
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator epsilon.
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
    /// SGD with (heavy-ball) momentum and L2 weight decay.
    Sgd {
        /// Peak learning rate.
        lr: f64,
        /// Momentum factor (0 disables).
        momentum: f64,
        /// L2 weight decay added to the gradient.
        weight_decay: f64,
    },
}

impl OptimizerKind {
    /// AdamW with PyTorch's defaults and learning rate `lr`.
    pub fn adamw(lr: f64) -> Self {
        OptimizerKind::AdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
    fn lr(&self) -> f64 {
        match self {
            OptimizerKind::AdamW { lr, .. } | OptimizerKind::Sgd { lr, .. } => *lr,
        }
    }
}

/// How the learning rate moves over training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LrSchedule {
    /// The peak rate throughout.
    Constant,
    /// Linear warm-up over `warmup_steps`, then cosine decay to `min_factor` × peak.
    Cosine {
        /// Steps of linear warm-up.
        warmup_steps: usize,
        /// Final rate as a fraction of the peak.
        min_factor: f64,
    },
    /// Multiply by `gamma` every `every_epochs` epochs.
    Step {
        /// Epochs between decays.
        every_epochs: usize,
        /// Decay factor.
        gamma: f64,
    },
}

impl LrSchedule {
    /// The learning-rate factor at `step` (0-based) of `total` steps, in epoch `epoch`.
    pub fn factor(&self, step: usize, total: usize, epoch: usize) -> f64 {
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Cosine { warmup_steps, min_factor } => {
                if step < warmup_steps {
                    (step + 1) as f64 / warmup_steps as f64
                } else {
                    let span = total.saturating_sub(warmup_steps).max(1) as f64;
                    let p = ((step - warmup_steps) as f64 / span).min(1.0);
                    min_factor + (1.0 - min_factor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
                }
            }
            LrSchedule::Step { every_epochs, gamma } => gamma.powi((epoch / every_epochs.max(1)) as i32),
        }
    }
}

/// Everything that shapes a training run. Two runs with equal configs, tasks and initial
/// weights produce identical weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Maximum number of epochs.
    pub epochs: usize,
    /// Examples per optimisation step.
    pub batch_size: usize,
    /// Optimizer and hyper-parameters.
    pub optimizer: OptimizerKind,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// Seed of the per-epoch shuffles.
    pub seed: u64,
    /// Stop after this many epochs without a better evaluation metric.
    pub patience: Option<usize>,
    /// Where to write a checkpoint after every epoch and resume from if present.
    #[serde(skip)]
    pub checkpoint: Option<PathBuf>,
}

impl TrainConfig {
    fn validate(&self, n_train: usize) -> Result<()> {
        let bad = |d: String| Err(Error::invalid("training config", d));
        if n_train == 0 {
            return Err(Error::Data { name: "training set".into(), detail: "no examples to train on".into() });
        }
        if self.epochs == 0 {
            return bad("epochs must be at least 1, found 0".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1, found 0".into());
        }
        let lr = self.optimizer.lr();
        if !(lr.is_finite() && lr > 0.0) {
            return bad(format!("learning rate must be finite and > 0, found {lr}"));
        }
        Ok(())
    }
}

/// What a training run optimises: a loss over a batch of training-set indices, and a metric
/// on held-out data (higher is better) used for early stopping and model selection.
pub trait TrainTask {
    /// The scalar loss of the training examples at `batch` (indices into the training set).
    fn loss(&mut self, batch: &[u32]) -> Result<Tensor>;
    /// The held-out metric after an epoch (accuracy, negative loss, cosine, ...).
    fn evaluate(&mut self) -> Result<f64>;
    /// Called after every optimiser step (`step` 1-based, of `total` in the run): where
    /// pruning re-applies its masks or grows them on a schedule. Does nothing by default.
    fn after_step(&mut self, _step: usize, _total: usize) -> Result<()> {
        Ok(())
    }
    /// Whether the weights as they are now may be kept as the run's best (a gradual pruning
    /// schedule that has not reached its target sparsity says no). Epochs that may not count
    /// neither win model selection nor use up early-stopping patience.
    fn selectable(&self) -> bool {
        true
    }
}

/// One epoch's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// 0-based epoch.
    pub epoch: usize,
    /// Mean training loss over the epoch's steps.
    pub train_loss: f64,
    /// The task's held-out metric after the epoch.
    pub metric: f64,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
}

/// Progress events for a progress bar or log.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// One optimisation step finished.
    Step {
        /// 0-based epoch.
        epoch: usize,
        /// 0-based step within the epoch.
        step: usize,
        /// Steps per epoch.
        steps: usize,
        /// The step's loss.
        loss: f64,
    },
    /// One epoch finished.
    Epoch(EpochStats),
}

/// The outcome of [`train`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Every epoch run, including those before a resume.
    pub history: Vec<EpochStats>,
    /// Epoch with the best metric (its weights are the ones left in the vars).
    pub best_epoch: usize,
    /// The best metric.
    pub best_metric: f64,
    /// Whether training stopped early for lack of improvement.
    pub stopped_early: bool,
    /// The epoch a resumed run started from, if it resumed.
    pub resumed_at: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    config: TrainConfig,
    next_epoch: usize,
    step: usize,
    history: Vec<EpochStats>,
    best_epoch: usize,
    best_metric: f64,
    stopped_early: bool,
}

const META_STATE: &str = "pare.train_state";

/// Named trainable variables, sorted by name so every walk over them is deterministic.
fn sorted_vars(vars: &VarMap) -> Vec<(String, Var)> {
    let map = vars.data().lock().expect("varmap lock poisoned");
    let mut v: Vec<(String, Var)> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

struct Optim {
    kind: OptimizerKind,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl Optim {
    fn new(kind: OptimizerKind, vars: &[(String, Var)]) -> Result<Self> {
        let zeros = || vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>();
        Ok(Self { kind, m: zeros()?, v: zeros()? })
    }

    fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &candle_core::backprop::GradStore,
        lr: f64,
        t: usize,
    ) -> Result<()> {
        for (i, (_, var)) in vars.iter().enumerate() {
            let Some(g) = grads.get(var) else { continue };
            match self.kind {
                OptimizerKind::AdamW { beta1, beta2, eps, weight_decay, .. } => {
                    let m = ((&self.m[i] * beta1)? + (g * (1.0 - beta1))?)?;
                    let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let mhat = (&m / (1.0 - beta1.powi(t as i32)))?;
                    let vhat = (&v / (1.0 - beta2.powi(t as i32)))?;
                    let decayed = (var.as_tensor().detach() * (1.0 - lr * weight_decay))?;
                    let update = ((mhat * lr)? / (vhat.sqrt()? + eps)?)?;
                    var.set(&(decayed - update)?)?;
                    self.m[i] = m;
                    self.v[i] = v;
                }
                OptimizerKind::Sgd { momentum, weight_decay, .. } => {
                    let g =
                        if weight_decay != 0.0 { (g + (var.as_tensor().detach() * weight_decay)?)? } else { g.clone() };
                    let d = if momentum != 0.0 { ((&self.m[i] * momentum)? + &g)? } else { g };
                    var.set(&(var.as_tensor().detach() - (&d * lr)?)?)?;
                    self.m[i] = d;
                }
            }
        }
        Ok(())
    }
}

fn save_checkpoint(path: &Path, vars: &[(String, Var)], best: &[Tensor], opt: &Optim, state: &State) -> Result<()> {
    let mut t = BTreeMap::new();
    for (i, (name, var)) in vars.iter().enumerate() {
        t.insert(format!("param/{name}"), RawTensor::from_tensor(var.as_tensor())?);
        t.insert(format!("best/{name}"), RawTensor::from_tensor(&best[i])?);
        t.insert(format!("opt.m/{name}"), RawTensor::from_tensor(&opt.m[i])?);
        t.insert(format!("opt.v/{name}"), RawTensor::from_tensor(&opt.v[i])?);
    }
    let meta = BTreeMap::from([(META_STATE.to_string(), serde_json::to_string(state).expect("state serialises"))]);
    save_tensors(path, &t, &meta, &[])
}

fn load_checkpoint(
    path: &Path,
    cfg: &TrainConfig,
    vars: &[(String, Var)],
    best: &mut [Tensor],
    opt: &mut Optim,
    device: &Device,
) -> Result<State> {
    let file = SafeTensorsFile::open(path)?;
    let bad = |what: String| Error::Malformed { path: path.to_path_buf(), what };
    let state: State = serde_json::from_str(
        file.metadata().get(META_STATE).ok_or_else(|| bad(format!("no `{META_STATE}` metadata: not a checkpoint")))?,
    )
    .map_err(|e| bad(format!("`{META_STATE}` is not a training state: {e}")))?;
    // The checkpoint path itself is not part of what shapes the weights.
    let this_run = TrainConfig { checkpoint: None, ..cfg.clone() };
    if state.config != this_run {
        return Err(Error::invalid(
            format!("checkpoint `{}`", path.display()),
            format!("it was made with config {:?}, this run has {this_run:?}; delete it to start afresh", state.config),
        ));
    }
    for (i, (name, var)) in vars.iter().enumerate() {
        let get = |k: &str| -> Result<Tensor> {
            let t = file.tensor(&format!("{k}/{name}"), device)?;
            if t.dims() != var.dims() {
                return Err(Error::Shape {
                    name: format!("{k}/{name}"),
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            Ok(t)
        };
        var.set(&get("param")?)?;
        best[i] = get("best")?;
        opt.m[i] = get("opt.m")?;
        opt.v[i] = get("opt.v")?;
    }
    Ok(state)
}

/// Trains the variables in `vars` on `task` over `n_train` examples. Each epoch visits the
/// examples in an order drawn from `seed` and the epoch number (so a resumed run sees the same
/// order), steps the optimizer per batch, evaluates, and checkpoints. At the end the weights of
/// the best epoch are restored. A non-finite loss stops training with an error.
pub fn train(
    task: &mut dyn TrainTask,
    vars: &VarMap,
    n_train: usize,
    cfg: &TrainConfig,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainReport> {
    cfg.validate(n_train)?;
    let vars = sorted_vars(vars);
    if vars.is_empty() {
        return Err(Error::invalid("training", "no trainable variables"));
    }
    let device = vars[0].1.device().clone();
    let mut opt = Optim::new(cfg.optimizer, &vars)?;
    let mut best: Vec<Tensor> =
        vars.iter().map(|(_, v)| v.as_tensor().detach().copy()).collect::<candle_core::Result<_>>()?;
    let steps_per_epoch = n_train.div_ceil(cfg.batch_size);
    let total_steps = steps_per_epoch * cfg.epochs;
    let mut state = State {
        config: TrainConfig { checkpoint: None, ..cfg.clone() },
        next_epoch: 0,
        step: 0,
        history: Vec::new(),
        best_epoch: 0,
        best_metric: f64::NEG_INFINITY,
        stopped_early: false,
    };
    let mut resumed_at = None;
    if let Some(ck) = cfg.checkpoint.as_deref().filter(|p| p.exists()) {
        state = load_checkpoint(ck, cfg, &vars, &mut best, &mut opt, &device)?;
        resumed_at = Some(state.next_epoch);
        tracing::info!(checkpoint = %ck.display(), epoch = state.next_epoch, "resuming training");
    }

    while state.next_epoch < cfg.epochs && !state.stopped_early {
        let epoch = state.next_epoch;
        let mut order: Vec<u32> = (0..n_train as u32).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64));
        let (mut loss_sum, mut lr) = (0.0, 0.0);
        for (step, batch) in order.chunks(cfg.batch_size).enumerate() {
            let loss = task.loss(batch)?;
            let value = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            if !value.is_finite() {
                return Err(Error::NonFinite {
                    name: format!("training loss (epoch {epoch}, step {step})"),
                    count: 1,
                    first: 0,
                });
            }
            lr = cfg.optimizer.lr() * cfg.schedule.factor(state.step, total_steps, epoch);
            let grads = loss.backward()?;
            state.step += 1;
            opt.step(&vars, &grads, lr, state.step)?;
            task.after_step(state.step, total_steps)?;
            loss_sum += value;
            on_event(&TrainEvent::Step { epoch, step, steps: steps_per_epoch, loss: value });
        }
        let metric = task.evaluate()?;
        let stats = EpochStats { epoch, train_loss: loss_sum / steps_per_epoch as f64, metric, lr };
        let eligible = task.selectable();
        if eligible && metric > state.best_metric {
            state.best_metric = metric;
            state.best_epoch = epoch;
            best = vars.iter().map(|(_, v)| v.as_tensor().detach().copy()).collect::<candle_core::Result<_>>()?;
        } else if eligible && cfg.patience.is_some_and(|p| epoch - state.best_epoch >= p) {
            state.stopped_early = true;
        }
        tracing::debug!(epoch, loss = stats.train_loss, metric, lr, "epoch done");
        state.history.push(stats.clone());
        state.next_epoch += 1;
        if let Some(ck) = &cfg.checkpoint {
            save_checkpoint(ck, &vars, &best, &opt, &state)?;
        }
        on_event(&TrainEvent::Epoch(stats));
    }
    for ((_, var), b) in vars.iter().zip(&best) {
        var.set(b)?;
    }
    Ok(TrainReport {
        history: state.history,
        best_epoch: state.best_epoch,
        best_metric: state.best_metric,
        stopped_early: state.stopped_early,
        resumed_at,
    })
}
