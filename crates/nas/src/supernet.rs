//! Weight-sharing supernets over a cell space, and the two searches that train them:
//!
//! - **DARTS** (Liu et al., 2019): every edge computes the softmax(α)-weighted sum of all its
//!   operations; network weights and architecture weights α (one vector per edge, shared by
//!   every copy of the cell) are trained alternately on two halves of the training split —
//!   first-order DARTS, candle autograd for both. The derived cell takes each edge's most
//!   probable operation other than `none`; further candidates follow in order of probability.
//! - **One-shot with uniform single paths** (SPOS, Guo et al., 2020): each batch trains one
//!   cell drawn uniformly from the space on the shared weights; afterwards any cell is scored
//!   with the weights it inherits, with no training of its own ([`OneShotEvaluator`]).
//!
//! Every operation of every edge of every cell copy holds its own weights
//! (`cells.C.eIJ.conv1x1`, `cells.C.eIJ.conv3x3`); the stem and classifier are shared by all
//! paths. Shuffles and path draws come from ChaCha8 seeded by the run's seed and the epoch.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use pare_core_tensor::data::{DIGITS_CLASSES, DigitsSplit, Examples};
use pare_core_tensor::metrics::accuracy;
use pare_core_tensor::{Conv2d, Conv2dParams, Hooks, Init, InitWeights, Linear, Module, Runtime, WeightSource};
use pare_models::digits::{CellConfig, CellOp, DigitsArch, DigitsNet};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::evaluate::{latency_ms, macs};
use crate::search::{Evaluator, Metrics, SearchConfig, SearchLog, Trial, search_with};
use crate::space::{Candidate, Space, SpaceKind};
use crate::strategy::Strategy;
use crate::{Error, Result};

/// How a supernet is trained.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SupernetConfig {
    /// Passes over the (weight) training data.
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak AdamW learning rate of the network weights (cosine decay to 2%).
    pub lr: f64,
    /// Adam learning rate of the architecture weights (DARTS only; β₁ 0.5, weight decay 1e-3).
    pub arch_lr: f64,
    /// Seed of the initial weights, shuffles and sampled paths.
    pub seed: u64,
}

impl SupernetConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(Error::invalid(
                "supernet training",
                format!("needs epochs ≥ 1 and batch size ≥ 1, found {} and {}", self.epochs, self.batch_size),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.arch_lr.is_finite() && self.arch_lr > 0.0) {
            return Err(Error::invalid(
                "supernet training",
                format!("learning rates must be finite and > 0, found {} and {}", self.lr, self.arch_lr),
            ));
        }
        Ok(())
    }
}

/// What one supernet epoch did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss of the weight steps.
    pub train_loss: f64,
    /// Validation accuracy of the supernet (DARTS: the mixed network; one-shot: the mean over
    /// a fixed set of sampled paths).
    pub validation: f64,
    /// DARTS: softmax(α) per edge over the space's options for it (empty for one-shot).
    pub probabilities: Vec<Vec<f64>>,
    /// DARTS: the cell derived at the end of this epoch (empty for one-shot).
    pub derived: String,
}

/// How the edges of the supernet's forward pass are computed.
enum Route<'a> {
    /// Σ softmax(α)ₒ · o(x) over each edge's operations.
    Mixed,
    /// One operation per edge.
    Path(&'a [CellOp]),
}

/// A supernet over a cell space (see the module documentation).
pub struct CellSupernet {
    space: Space,
    channels: usize,
    cells: usize,
    /// `(from, to)` of each edge, in the space's order.
    edges: Vec<(usize, usize)>,
    /// The operations each edge may take (the space's options for it).
    allowed: Vec<Vec<CellOp>>,
    stem: Conv2d,
    /// `[cell][edge]` → (1×1, 3×3) convolutions.
    convs: Vec<Vec<(Conv2d, Conv2d)>>,
    fc: Linear,
    /// One architecture-weight vector per edge, over `allowed`.
    alpha: Vec<Var>,
    weights: VarMap,
}

fn uniform(fan_in: usize) -> Init {
    Init::Uniform { bound: 1.0 / (fan_in as f64).sqrt() }
}

impl CellSupernet {
    /// A freshly initialised supernet over the cell `space` (whose `channels` and `cells` must
    /// each have one option: the supernet shares one width), α starting at zero (uniform).
    pub fn new(space: &Space, seed: u64) -> Result<Self> {
        space.validate()?;
        if space.kind != SpaceKind::DigitsCell {
            return Err(Error::invalid(
                "supernet search space",
                format!("DARTS and one-shot supernets search cell spaces (kind digits_cell), found {:?}", space.kind),
            ));
        }
        let single = |name: &str| -> Result<usize> {
            let c = space.choices.iter().find(|c| c.name == name).expect("validated");
            match c.options.as_slice() {
                [v] => Ok(*v),
                other => Err(Error::invalid(
                    format!("supernet choice `{name}`"),
                    format!("a supernet shares one {name} value: give one option, found {other:?}"),
                )),
            }
        };
        let (channels, cells) = (single("channels")?, single("cells")?);
        let allowed: Vec<Vec<CellOp>> = space
            .choices
            .iter()
            .filter(|c| c.name.starts_with("edge."))
            .map(|c| c.options.iter().map(|&o| CellOp::ALL[o]).collect())
            .collect();
        let edges = CellConfig::edges(CellConfig::nodes_for(allowed.len()).expect("validated"));
        let weights = VarMap::new();
        let mut src = InitWeights::new(seed, Device::Cpu, weights.clone());
        let mut conv = |path: String, cin: usize, k: usize| -> Result<Conv2d> {
            let fan = cin * k * k;
            let w = src.weight(&format!("{path}.weight"), &[channels, cin, k, k], uniform(fan))?;
            let b = src.tensor(&format!("{path}.bias"), &[channels], uniform(fan))?;
            Conv2d::new(path, w, Some(b), Conv2dParams { padding: k / 2, ..Default::default() })
        };
        let stem = conv("stem".into(), 1, 3)?;
        let mut convs = Vec::new();
        for cell in 0..cells {
            let mut row = Vec::new();
            for &(i, j) in &edges {
                let p = format!("cells.{cell}.e{i}{j}");
                row.push((conv(format!("{p}.conv1x1"), channels, 1)?, conv(format!("{p}.conv3x3"), channels, 3)?));
            }
            convs.push(row);
        }
        let flat = channels * 16;
        let w = src.weight("fc.weight", &[DIGITS_CLASSES, flat], uniform(flat))?;
        let b = src.tensor("fc.bias", &[DIGITS_CLASSES], uniform(flat))?;
        let fc = Linear::new("fc", w, Some(b))?;
        let alpha = allowed
            .iter()
            .map(|a| Var::zeros(a.len(), candle_core::DType::F32, &Device::Cpu))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { space: space.clone(), channels, cells, edges, allowed, stem, convs, fc, alpha, weights })
    }

    /// The space the supernet covers.
    pub fn space(&self) -> &Space {
        &self.space
    }

    fn apply(&self, cell: usize, edge: usize, op: CellOp, x: &Tensor) -> Result<Tensor> {
        let (c1, c3) = &self.convs[cell][edge];
        Ok(match op {
            CellOp::Conv1x1 => c1.forward_hooked(&x.relu()?, &mut Hooks::none())?,
            CellOp::Conv3x3 => c3.forward_hooked(&x.relu()?, &mut Hooks::none())?,
            fixed => fixed.apply_fixed(x)?,
        })
    }

    fn forward(&self, x: &Tensor, route: &Route<'_>) -> Result<Tensor> {
        let n = x.dim(0)?;
        let mix: Vec<Tensor> = match route {
            Route::Mixed => self
                .alpha
                .iter()
                .map(|a| candle_nn::ops::softmax(a.as_tensor(), 0))
                .collect::<candle_core::Result<_>>()?,
            Route::Path(_) => Vec::new(),
        };
        let nodes = CellConfig::nodes_for(self.edges.len()).expect("validated");
        let mut h = self.stem.forward_hooked(&x.reshape((n, 1, 8, 8))?, &mut Hooks::none())?;
        for cell in 0..self.cells {
            h = CellConfig::walk(nodes, h, |e, x| -> Result<Vec<Tensor>> {
                match route {
                    Route::Path(ops) if ops[e] == CellOp::None => Ok(Vec::new()),
                    Route::Path(ops) => Ok(vec![self.apply(cell, e, ops[e], x)?]),
                    Route::Mixed => self.allowed[e]
                        .iter()
                        .enumerate()
                        .filter(|(_, op)| **op != CellOp::None)
                        .map(|(o, &op)| Ok(self.apply(cell, e, op, x)?.broadcast_mul(&mix[e].narrow(0, o, 1)?)?))
                        .collect(),
                }
            })?;
        }
        self.fc.forward(&h.relu()?.max_pool2d(2)?.flatten_from(1)?)
    }

    /// Validation-style accuracy of the cell `ops` on `examples` with the supernet's weights.
    pub fn path_accuracy(&self, ops: &[CellOp], examples: &Examples) -> Result<f64> {
        self.check_ops(ops)?;
        self.accuracy_on(&Route::Path(ops), examples)
    }

    /// Accuracy of the DARTS mixture on `examples`.
    pub fn mixed_accuracy(&self, examples: &Examples) -> Result<f64> {
        self.accuracy_on(&Route::Mixed, examples)
    }

    fn accuracy_on(&self, route: &Route<'_>, examples: &Examples) -> Result<f64> {
        let mut hits = 0.0;
        for b in examples.batches(512)? {
            hits += accuracy(&self.forward(&b.x, route)?, &b.y)? * b.len() as f64;
        }
        Ok(hits / examples.len() as f64)
    }

    fn check_ops(&self, ops: &[CellOp]) -> Result<()> {
        if ops.len() != self.edges.len() || ops.iter().zip(&self.allowed).any(|(o, a)| !a.contains(o)) {
            return Err(Error::invalid(
                "cell",
                format!(
                    "{:?} is not a cell of this supernet (edges allow {:?})",
                    ops.iter().map(|o| o.name()).collect::<Vec<_>>(),
                    self.allowed.iter().map(|a| a.iter().map(|o| o.name()).collect::<Vec<_>>()).collect::<Vec<_>>()
                ),
            ));
        }
        Ok(())
    }

    /// softmax(α) of each edge over its allowed operations.
    pub fn probabilities(&self) -> Result<Vec<Vec<f64>>> {
        self.alpha
            .iter()
            .map(|a| {
                Ok(candle_nn::ops::softmax(a.as_tensor(), 0)?.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
            })
            .collect()
    }

    /// The cells in decreasing order of probability under α (`none` excluded unless an edge
    /// allows nothing else), at most `k` of them — the first is DARTS' derived cell (each
    /// edge's most probable operation). Exact k-best by best-first search over per-edge ranks.
    pub fn ranked(&self, k: usize) -> Result<Vec<Vec<CellOp>>> {
        let probs = self.probabilities()?;
        // Per edge: (log p, op) sorted best first, none dropped where something else is allowed.
        let per_edge: Vec<Vec<(f64, CellOp)>> = probs
            .iter()
            .zip(&self.allowed)
            .map(|(p, a)| {
                let mut v: Vec<(f64, CellOp)> = p.iter().zip(a).map(|(&p, &o)| (p.max(1e-30).ln(), o)).collect();
                if a.iter().any(|&o| o != CellOp::None) {
                    v.retain(|&(_, o)| o != CellOp::None);
                }
                v.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
                v
            })
            .collect();
        #[derive(PartialEq)]
        struct Node(f64, Vec<usize>);
        impl Eq for Node {}
        impl PartialOrd for Node {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Node {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                self.0.total_cmp(&o.0).then_with(|| o.1.cmp(&self.1))
            }
        }
        let score = |r: &[usize]| r.iter().zip(&per_edge).map(|(&i, e)| e[i].0).sum::<f64>();
        let start = vec![0; per_edge.len()];
        let mut heap = BinaryHeap::from([Node(score(&start), start.clone())]);
        let mut seen = BTreeSet::from([start]);
        let mut out = Vec::new();
        while let Some(Node(_, r)) = heap.pop() {
            out.push(r.iter().zip(&per_edge).map(|(&i, e)| e[i].1).collect());
            if out.len() >= k {
                break;
            }
            for e in 0..r.len() {
                if r[e] + 1 < per_edge[e].len() {
                    let mut next = r.clone();
                    next[e] += 1;
                    if seen.insert(next.clone()) {
                        heap.push(Node(score(&next), next));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The candidate of the space that builds the cell `ops`.
    pub fn candidate(&self, ops: &[CellOp]) -> Result<Candidate> {
        self.check_ops(ops)?;
        let mut edge = 0;
        Ok(self
            .space
            .choices
            .iter()
            .map(|c| {
                if c.name.starts_with("edge.") {
                    edge += 1;
                    c.options.iter().position(|&o| CellOp::ALL[o] == ops[edge - 1]).expect("checked")
                } else {
                    0
                }
            })
            .collect())
    }

    /// The architecture of the cell `ops` at the supernet's width.
    pub fn arch(&self, ops: &[CellOp]) -> DigitsArch {
        DigitsArch::Cell(CellConfig { channels: self.channels, cells: self.cells, ops: ops.to_vec() })
    }

    fn weight_vars(&self) -> Vec<Var> {
        // Sorted by name so the optimiser's order, hence its arithmetic, is fixed.
        let data = self.weights.data().lock().expect("the varmap lock is not poisoned");
        let sorted: BTreeMap<&String, &Var> = data.iter().collect();
        sorted.into_values().cloned().collect()
    }

    fn sample_path(&self, rng: &mut ChaCha8Rng) -> Vec<CellOp> {
        self.allowed.iter().map(|a| a[rng.random_range(0..a.len())]).collect()
    }
}

fn shuffled(n: usize, seed: u64, epoch: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64));
    order
}

fn cosine_lr(cfg: &SupernetConfig, step: usize, total: usize) -> f64 {
    let t = step as f64 / total.max(1) as f64;
    cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

fn weight_optimizer(net: &CellSupernet, cfg: &SupernetConfig) -> Result<AdamW> {
    Ok(AdamW::new(net.weight_vars(), ParamsAdamW { lr: cfg.lr, weight_decay: 1e-4, ..Default::default() })?)
}

fn finite_loss(loss: &Tensor, what: &str, epoch: usize) -> Result<f64> {
    let v = f64::from(loss.to_scalar::<f32>()?);
    if !v.is_finite() {
        return Err(Error::invalid(
            format!("{what} training"),
            format!("the loss became {v} in epoch {epoch}; lower the learning rate"),
        ));
    }
    Ok(v)
}

/// Trains `net` with first-order DARTS on `data`: the training split is halved (seeded), each
/// step updates α on a batch of one half, then the weights on a batch of the other. Returns
/// one log per epoch (`on_epoch` sees each as it ends).
pub fn train_darts(
    net: &CellSupernet,
    data: &DigitsSplit,
    cfg: &SupernetConfig,
    on_epoch: &mut dyn FnMut(&EpochLog),
) -> Result<Vec<EpochLog>> {
    cfg.validate()?;
    let split = shuffled(data.train.len(), cfg.seed ^ 0xDA475, 0);
    let half = split.len() / 2;
    if half < cfg.batch_size.min(8) {
        return Err(Error::invalid("DARTS", format!("needs at least 16 training examples, found {}", split.len())));
    }
    let (w_part, a_part) = (data.train.select(&split[..half])?, data.train.select(&split[half..])?);
    let mut w_opt = weight_optimizer(net, cfg)?;
    let mut a_opt = AdamW::new(
        net.alpha.clone(),
        ParamsAdamW { lr: cfg.arch_lr, beta1: 0.5, beta2: 0.999, weight_decay: 1e-3, ..Default::default() },
    )?;
    let steps = half.div_ceil(cfg.batch_size);
    let mut logs = Vec::new();
    for epoch in 1..=cfg.epochs {
        let (wo, ao) = (shuffled(w_part.len(), cfg.seed, epoch), shuffled(a_part.len(), cfg.seed ^ 0xA1FA, epoch));
        let mut loss_sum = 0.0;
        for s in 0..steps {
            let range = |order: &[u32]| {
                let lo = (s * cfg.batch_size) % order.len();
                order[lo..(lo + cfg.batch_size).min(order.len())].to_vec()
            };
            let ab = a_part.select(&range(&ao))?;
            let a_loss = candle_nn::loss::cross_entropy(&net.forward(&ab.x, &Route::Mixed)?, &ab.y)?;
            finite_loss(&a_loss, "DARTS", epoch)?;
            a_opt.backward_step(&a_loss)?;
            w_opt.set_learning_rate(cosine_lr(cfg, (epoch - 1) * steps + s, cfg.epochs * steps));
            let wb = w_part.select(&range(&wo))?;
            let w_loss = candle_nn::loss::cross_entropy(&net.forward(&wb.x, &Route::Mixed)?, &wb.y)?;
            loss_sum += finite_loss(&w_loss, "DARTS", epoch)?;
            w_opt.backward_step(&w_loss)?;
        }
        let derived = net.arch(&net.ranked(1)?[0]).to_string();
        let log = EpochLog {
            epoch,
            train_loss: loss_sum / steps as f64,
            validation: net.mixed_accuracy(&data.validation)?,
            probabilities: net.probabilities()?,
            derived,
        };
        tracing::debug!(epoch, loss = log.train_loss, validation = log.validation, derived = %log.derived, "DARTS epoch");
        on_epoch(&log);
        logs.push(log);
    }
    Ok(logs)
}

/// Trains `net`'s weights one-shot: each batch of the training split trains one cell drawn
/// uniformly from the space (SPOS). Each epoch's log reports the mean validation accuracy of
/// 8 fixed sampled cells.
pub fn train_one_shot(
    net: &CellSupernet,
    data: &DigitsSplit,
    cfg: &SupernetConfig,
    on_epoch: &mut dyn FnMut(&EpochLog),
) -> Result<Vec<EpochLog>> {
    cfg.validate()?;
    let mut w_opt = weight_optimizer(net, cfg)?;
    let n = data.train.len();
    let steps = n.div_ceil(cfg.batch_size);
    let mut probe_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x9B0BE);
    let probes: Vec<Vec<CellOp>> = (0..8).map(|_| net.sample_path(&mut probe_rng)).collect();
    let mut logs = Vec::new();
    for epoch in 1..=cfg.epochs {
        let order = shuffled(n, cfg.seed, epoch);
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5905 ^ (epoch as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
        let mut loss_sum = 0.0;
        for (s, batch) in order.chunks(cfg.batch_size).enumerate() {
            let path = net.sample_path(&mut rng);
            let b = data.train.select(batch)?;
            w_opt.set_learning_rate(cosine_lr(cfg, (epoch - 1) * steps + s, cfg.epochs * steps));
            let loss = candle_nn::loss::cross_entropy(&net.forward(&b.x, &Route::Path(&path))?, &b.y)?;
            loss_sum += finite_loss(&loss, "one-shot supernet", epoch)?;
            w_opt.backward_step(&loss)?;
        }
        let mut val = 0.0;
        for p in &probes {
            val += net.path_accuracy(p, &data.validation)? / probes.len() as f64;
        }
        let log = EpochLog {
            epoch,
            train_loss: loss_sum / steps as f64,
            validation: val,
            probabilities: Vec::new(),
            derived: String::new(),
        };
        tracing::debug!(epoch, loss = log.train_loss, validation = log.validation, "one-shot epoch");
        on_epoch(&log);
        logs.push(log);
    }
    Ok(logs)
}

/// A DARTS search: trains a supernet over the cell `space` with the settings of
/// `config.strategy` (which must be [`Strategy::Darts`]; its seed is replaced by
/// `config.seed`), then evaluates the `config.budget` most probable cells under the learned α
/// — the derived cell first — with `evaluator` (typically training each from scratch), logged
/// and resumed like [`crate::search()`]. The supernet is retrained on a resume: its training is
/// deterministic, so the ranking, and the log, come out the same.
pub fn darts_search(
    space: &Space,
    config: &SearchConfig,
    data: &DigitsSplit,
    evaluator: &mut dyn Evaluator,
    log: Option<&std::path::Path>,
    on_epoch: &mut dyn FnMut(&EpochLog),
    on_trial: &mut dyn FnMut(&Trial),
) -> Result<(SearchLog, Vec<EpochLog>)> {
    let Strategy::Darts(cfg) = config.strategy else {
        return Err(Error::invalid("darts_search", format!("needs the darts strategy, found {}", config.strategy)));
    };
    let cfg = SupernetConfig { seed: config.seed, ..cfg };
    cfg.validate()?;
    if config.budget == 0 {
        return Err(Error::invalid("--budget", "must be at least 1 trial, found 0"));
    }
    let net = CellSupernet::new(space, cfg.seed)?;
    let epochs = train_darts(&net, data, &cfg, on_epoch)?;
    let ranked = net.ranked(config.budget)?;
    let candidates: Vec<Candidate> = ranked.iter().map(|ops| net.candidate(ops)).collect::<Result<_>>()?;
    let mut propose = |trials: &[Trial]| -> Result<Option<Candidate>> { Ok(candidates.get(trials.len()).cloned()) };
    let log = search_with(space, config, evaluator, log, &mut propose, on_trial)?;
    Ok((log, epochs))
}

/// Kendall's rank correlation τ-b of two equally long lists (1: same order, −1: reversed).
pub fn kendall_tau(a: &[f64], b: &[f64]) -> f64 {
    let (mut concordant, mut discordant, mut ties_a, mut ties_b) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for i in 0..a.len().min(b.len()) {
        for j in i + 1..a.len().min(b.len()) {
            let (x, y) = ((a[i] - a[j]).signum(), (b[i] - b[j]).signum());
            match (a[i] == a[j], b[i] == b[j]) {
                (true, true) => {}
                (true, false) => ties_a += 1.0,
                (false, true) => ties_b += 1.0,
                (false, false) if x == y => concordant += 1.0,
                (false, false) => discordant += 1.0,
            }
        }
    }
    let denom = ((concordant + discordant + ties_a) * (concordant + discordant + ties_b)).sqrt();
    if denom == 0.0 { 0.0 } else { (concordant - discordant) / denom }
}

/// Scores cells on the weights they inherit from a one-shot supernet: validation and test
/// accuracy of the path, no training; parameters, bytes, MACs and latency from the
/// stand-alone network the cell builds (latency measured on the runtime, cached per cell).
pub struct OneShotEvaluator<'a> {
    net: CellSupernet,
    data: &'a DigitsSplit,
    runtime: Arc<dyn Runtime>,
    cfg: SupernetConfig,
    /// What training the supernet did.
    pub epochs: Vec<EpochLog>,
    /// Single-image forward passes timed per architecture.
    pub latency_reps: usize,
    latencies: BTreeMap<String, f64>,
}

impl<'a> OneShotEvaluator<'a> {
    /// Trains a supernet over `space` one-shot on `data` (the one-off cost of this evaluator).
    pub fn train(
        space: &Space,
        data: &'a DigitsSplit,
        runtime: Arc<dyn Runtime>,
        cfg: SupernetConfig,
        on_epoch: &mut dyn FnMut(&EpochLog),
    ) -> Result<Self> {
        let net = CellSupernet::new(space, cfg.seed)?;
        let epochs = train_one_shot(&net, data, &cfg, on_epoch)?;
        Ok(Self { net, data, runtime, cfg, epochs, latency_reps: 31, latencies: BTreeMap::new() })
    }

    /// The trained supernet.
    pub fn supernet(&self) -> &CellSupernet {
        &self.net
    }

    /// The settings that shape every trial, for [`crate::SearchConfig::evaluator`].
    pub fn describe(&self) -> String {
        format!(
            "one-shot: cell supernet trained {} epochs on uniformly drawn single paths (SPOS), AdamW {} cosine, batch {}, seed {}; latency on `{}`",
            self.cfg.epochs,
            self.cfg.lr,
            self.cfg.batch_size,
            self.cfg.seed,
            self.runtime.name()
        )
    }
}

fn ops_of(arch: &DigitsArch) -> Result<Vec<CellOp>> {
    match arch {
        DigitsArch::Cell(c) => Ok(c.ops.clone()),
        other => Err(Error::invalid("one-shot evaluation", format!("evaluates cell networks, found `{other}`"))),
    }
}

impl Evaluator for OneShotEvaluator<'_> {
    fn evaluate(&mut self, space: &Space, c: &Candidate, _index: usize) -> Result<Metrics> {
        if space != self.net.space() {
            return Err(Error::invalid(
                "one-shot evaluation",
                "the candidate is from another space than the supernet's",
            ));
        }
        let arch = space.decode(c)?;
        let ops = ops_of(&arch)?;
        let validation = self.net.path_accuracy(&ops, &self.data.validation)?;
        let test = self.net.path_accuracy(&ops, &self.data.test)?;
        let vars = VarMap::new();
        let mut net = DigitsNet::init(arch.clone(), 0, &Device::Cpu, &vars).map_err(pare_models::Error::into_core)?;
        let (params, bytes, macs) = (net.parameter_count(), net.storage_bytes(), macs(&net, &self.data.test.x)?);
        let key = arch.to_string();
        let latency_ms = match self.latencies.get(&key) {
            Some(&l) => l,
            None => {
                net.prepare(&self.runtime)?;
                let l = latency_ms(&net, &self.data.test.x, self.latency_reps)?;
                self.latencies.insert(key, l);
                l
            }
        };
        Ok(Metrics { validation, test, params, bytes, macs, latency_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_best_cells_come_in_order_of_probability() {
        let space = Space::builtin("cell").unwrap();
        let net = CellSupernet::new(&space, 1).unwrap();
        // Make edge 0 prefer conv3x3 strongly and edge 5 prefer skip mildly.
        net.alpha[0].set(&Tensor::new(&[5.0f32, 0.0, 0.0, 3.0, 0.0], &Device::Cpu).unwrap()).unwrap();
        net.alpha[5].set(&Tensor::new(&[0.0f32, 1.0, 0.5, 0.0, 0.0], &Device::Cpu).unwrap()).unwrap();
        let r = net.ranked(30).unwrap();
        assert_eq!(r.len(), 30);
        assert_eq!(r[0][0], CellOp::Conv3x3, "none is never derived");
        assert_eq!(r[0][5], CellOp::Skip);
        let p = net.probabilities().unwrap();
        let logp = |ops: &[CellOp]| -> f64 {
            ops.iter().enumerate().map(|(e, o)| p[e][CellOp::ALL.iter().position(|x| x == o).unwrap()].ln()).sum()
        };
        for w in r.windows(2) {
            assert!(logp(&w[0]) >= logp(&w[1]) - 1e-12);
        }
        let distinct: BTreeSet<_> = r.iter().collect();
        assert_eq!(distinct.len(), 30);
        let c = net.candidate(&r[0]).unwrap();
        assert_eq!(space.decode(&c).unwrap(), net.arch(&r[0]));
    }

    #[test]
    fn a_path_of_the_supernet_computes_what_the_standalone_cell_computes() {
        // Copy the supernet's weights of one path into the stand-alone network: same logits.
        let space = Space::builtin("cell").unwrap();
        let net = CellSupernet::new(&space, 3).unwrap();
        let ops = [CellOp::Conv3x3, CellOp::Skip, CellOp::Conv1x1, CellOp::None, CellOp::Avg3x3, CellOp::Conv3x3];
        let data = net.weights.data().lock().unwrap().clone();
        let mut weights = BTreeMap::new();
        for (name, var) in &data {
            let mut parts: Vec<&str> = name.split('.').collect();
            // cells.C.eIJ.convKxK.weight → cells.C.eIJ.weight when the edge uses convKxK.
            if parts[0] == "cells" {
                let e = CellConfig::edges(3).iter().position(|(i, j)| parts[2] == format!("e{i}{j}")).unwrap();
                if ops[e].name() != parts[3] {
                    continue;
                }
                parts.remove(3);
            }
            weights.insert(parts.join("."), pare_core_tensor::Weight::Dense(var.as_tensor().clone()));
        }
        let standalone =
            DigitsNet::build(net.arch(&ops), &mut pare_core_tensor::LoadedWeights::new(weights, Device::Cpu)).unwrap();
        let x = Tensor::rand(0f32, 1.0, (5, 64), &Device::Cpu).unwrap();
        let a = net.forward(&x, &Route::Path(&ops)).unwrap().to_vec2::<f32>().unwrap();
        let b = standalone.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        for (ra, rb) in a.iter().zip(&b) {
            for (u, v) in ra.iter().zip(rb) {
                assert!((u - v).abs() < 1e-5, "{u} vs {v}");
            }
        }
        assert!(
            net.path_accuracy(&ops[..5], &Examples { x: x.clone(), y: x.clone() }).is_err(),
            "a short cell is refused"
        );
    }

    #[test]
    fn kendall_tau_counts_concordant_pairs() {
        assert_eq!(kendall_tau(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), 1.0);
        assert_eq!(kendall_tau(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), -1.0);
        assert!((kendall_tau(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]) - 4.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn supernets_refuse_other_spaces_and_shared_width_choices() {
        let e = CellSupernet::new(&Space::builtin("cnn").unwrap(), 0).err().unwrap().to_string();
        assert!(e.contains("cell spaces"), "{e}");
        let mut s = Space::builtin("cell").unwrap();
        s.choices[0].options = vec![8, 16];
        let e = CellSupernet::new(&s, 0).err().unwrap().to_string();
        assert!(e.contains("`channels`") && e.contains("[8, 16]"), "{e}");
        let bad = SupernetConfig { epochs: 0, batch_size: 32, lr: 1e-3, arch_lr: 1e-3, seed: 0 };
        assert!(bad.validate().unwrap_err().to_string().contains("epochs ≥ 1"));
    }
}
