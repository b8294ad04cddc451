//! The search loop: propose, evaluate, record — with every trial logged to JSON (written
//! atomically after each evaluation) and a killed run resumed from its log to the same trials.
//!
//! Objectives: validation accuracy, optionally under constraints (latency ≤ L ms, bytes ≤ B);
//! a trial that breaks one scores `-inf` for the strategy but stays in the log. A
//! multi-objective search ([`Objective::pareto`]) scores the history for each proposal with a
//! fresh random augmented-Chebyshev scalarisation of (accuracy ↑, log latency ↓, log bytes ↓)
//! — ParEGO (Knowles, 2006) — so any strategy spreads its trials along the front instead of
//! chasing accuracy alone. Results are the Pareto front of the three with its hypervolume.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::space::{Candidate, Space};
use crate::strategy::{Scored, Strategy};
use crate::{Error, Result};

/// What an evaluation measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Validation accuracy (what the search optimises).
    pub validation: f64,
    /// Test accuracy (reported only; never used to choose).
    pub test: f64,
    /// Parameters.
    pub params: usize,
    /// Bytes of the weights in storage.
    pub bytes: usize,
    /// Multiply-accumulates per example.
    pub macs: u64,
    /// Measured latency of one example on the evaluator's runtime, milliseconds (median).
    pub latency_ms: f64,
}

/// One evaluated candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// 0-based position in the search.
    pub index: usize,
    /// The option indices.
    pub candidate: Candidate,
    /// The architecture they build, as its spec string.
    pub arch: String,
    /// What was measured.
    pub metrics: Metrics,
    /// Whether every constraint held.
    pub feasible: bool,
    /// Seconds the evaluation took (not compared on resume: wall time varies).
    pub seconds: f64,
}

/// What the search optimises.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Objective {
    /// Maximum latency in milliseconds.
    pub latency_max_ms: Option<f64>,
    /// Maximum weight bytes.
    pub bytes_max: Option<usize>,
    /// Search for the Pareto front of accuracy, latency and bytes (ParEGO scalarisations)
    /// rather than for accuracy alone.
    #[serde(default)]
    pub pareto: bool,
}

impl Objective {
    /// Checks the limits: finite and > 0.
    pub fn validate(&self) -> Result<()> {
        if let Some(l) = self.latency_max_ms
            && !(l.is_finite() && l > 0.0)
        {
            return Err(Error::invalid("--latency-max", format!("must be finite and > 0 ms, found {l}")));
        }
        if self.bytes_max == Some(0) {
            return Err(Error::invalid("--bytes-max", "must be > 0, found 0"));
        }
        Ok(())
    }
    /// Whether `m` meets every constraint.
    pub fn feasible(&self, m: &Metrics) -> bool {
        self.latency_max_ms.is_none_or(|l| m.latency_ms <= l) && self.bytes_max.is_none_or(|b| m.bytes <= b)
    }
}

/// Evaluates architectures (trains and measures them).
pub trait Evaluator {
    /// Evaluates the architecture `c` of `space` (trial `index`, for seeding).
    fn evaluate(&mut self, space: &Space, c: &Candidate, index: usize) -> Result<Metrics>;
}

/// Everything that shapes a search; a log can only be resumed with the same settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    /// The strategy.
    pub strategy: Strategy,
    /// Trials to run.
    pub budget: usize,
    /// Seed of the proposals (and, through the evaluator, of the training).
    pub seed: u64,
    /// Constraints.
    pub objective: Objective,
    /// The evaluator's settings as text (epochs, learning rate, runtime, ...): trials are only
    /// comparable under the same ones, so a log resumes only with the same text.
    pub evaluator: String,
}

/// A search's log: its space, settings and trials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchLog {
    /// The space searched.
    pub space: Space,
    /// The settings.
    pub config: SearchConfig,
    /// Every trial, in order.
    pub trials: Vec<Trial>,
    /// Whether the space ran out of candidates before the budget.
    pub exhausted: bool,
}

impl SearchLog {
    /// The best feasible trial by validation accuracy (ties: fewer bytes, then earlier).
    pub fn best(&self) -> Option<&Trial> {
        self.trials.iter().filter(|t| t.feasible).fold(None, |best: Option<&Trial>, t| match best {
            Some(b)
                if (b.metrics.validation, -(b.metrics.bytes as f64))
                    >= (t.metrics.validation, -(t.metrics.bytes as f64)) =>
            {
                Some(b)
            }
            _ => Some(t),
        })
    }
    /// The best validation accuracy after each trial (feasible trials only; `None` until one).
    pub fn best_so_far(&self) -> Vec<Option<f64>> {
        let mut best: Option<f64> = None;
        self.trials
            .iter()
            .map(|t| {
                if t.feasible {
                    best = Some(best.map_or(t.metrics.validation, |b| b.max(t.metrics.validation)));
                }
                best
            })
            .collect()
    }
}

/// The scores the strategy sees when proposing trial `trials.len()`: validation accuracy, or
/// under [`Objective::pareto`] the negated augmented Chebyshev distance to the ideal point,
/// `−(maxₖ λₖ(1 − fₖ) + 0.05 Σₖ λₖ(1 − fₖ))`, of the three objectives normalised to fₖ ∈ [0, 1]
/// over the feasible history (latency and bytes on a log scale), with weights λ drawn
/// uniformly from the simplex by the run's seed and the trial index. Infeasible trials score
/// `-inf`.
pub fn scores(trials: &[Trial], objective: &Objective, seed: u64) -> Vec<f64> {
    if !objective.pareto {
        return trials.iter().map(|t| if t.feasible { t.metrics.validation } else { f64::NEG_INFINITY }).collect();
    }
    let goals =
        |t: &Trial| [t.metrics.validation, -t.metrics.latency_ms.max(1e-9).ln(), -(t.metrics.bytes.max(1) as f64).ln()];
    let feasible: Vec<[f64; 3]> = trials.iter().filter(|t| t.feasible).map(goals).collect();
    let (mut lo, mut hi) = ([f64::INFINITY; 3], [f64::NEG_INFINITY; 3]);
    for g in &feasible {
        for k in 0..3 {
            lo[k] = lo[k].min(g[k]);
            hi[k] = hi[k].max(g[k]);
        }
    }
    // Weights uniform on the simplex: sorted uniforms' spacings.
    let mut rng = crate::strategy::trial_rng(seed ^ 0x5041_5245_474F, trials.len());
    let (a, b): (f64, f64) = (rand::Rng::random(&mut rng), rand::Rng::random(&mut rng));
    let (a, b) = (a.min(b), a.max(b));
    let w = [a, b - a, 1.0 - b];
    trials
        .iter()
        .map(|t| {
            if !t.feasible {
                return f64::NEG_INFINITY;
            }
            let g = goals(t);
            let f: Vec<f64> =
                (0..3).map(|k| if hi[k] > lo[k] { (g[k] - lo[k]) / (hi[k] - lo[k]) } else { 1.0 }).collect();
            // Weighted distances to the ideal point, negated so that higher is better.
            let gap: Vec<f64> = (0..3).map(|k| w[k] * (1.0 - f[k])).collect();
            -(gap.iter().copied().fold(0.0, f64::max) + 0.05 * gap.iter().sum::<f64>())
        })
        .collect()
}

fn load_log(path: &Path) -> Result<SearchLog> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json { path: path.to_path_buf(), cause: e })
}

/// Runs (or resumes) a search: `budget` trials proposed by the strategy, each evaluated,
/// checked against the constraints and appended to the log, which is written atomically to
/// `log` after every trial. A log that exists is resumed when its space and settings equal
/// these (the budget may grow) and refused otherwise. `on_trial` sees every new trial.
pub fn search(
    space: &Space,
    config: &SearchConfig,
    evaluator: &mut dyn Evaluator,
    log: Option<&Path>,
    on_trial: &mut dyn FnMut(&Trial),
) -> Result<SearchLog> {
    config.strategy.validate()?;
    let strategy = config.strategy;
    let mut propose = |trials: &[Trial]| -> Result<Option<Candidate>> {
        let s = scores(trials, &config.objective, config.seed);
        let history: Vec<Scored<'_>> =
            trials.iter().zip(s).map(|(t, score)| Scored { candidate: &t.candidate, score }).collect();
        strategy.propose(space, &history, config.seed)
    };
    search_with(space, config, evaluator, log, &mut propose, on_trial)
}

/// [`search`] with the proposals made by `propose` (given the trials so far) instead of the
/// configured strategy's — for strategies such as DARTS that rank candidates from a trained
/// supernet. `propose` must be a function of the trials alone for a resume to be exact.
pub fn search_with(
    space: &Space,
    config: &SearchConfig,
    evaluator: &mut dyn Evaluator,
    log: Option<&Path>,
    propose: &mut dyn FnMut(&[Trial]) -> Result<Option<Candidate>>,
    on_trial: &mut dyn FnMut(&Trial),
) -> Result<SearchLog> {
    space.validate()?;
    config.objective.validate()?;
    if config.budget == 0 {
        return Err(Error::invalid("--budget", "must be at least 1 trial, found 0"));
    }
    let mut state = SearchLog { space: space.clone(), config: config.clone(), trials: Vec::new(), exhausted: false };
    if let Some(p) = log.filter(|p| p.exists()) {
        let old = load_log(p)?;
        let same = old.space == *space && SearchConfig { budget: config.budget, ..old.config.clone() } == *config;
        if !same {
            return Err(Error::invalid(
                format!("search log `{}`", p.display()),
                "was written by a search with another space, strategy, seed, objective or evaluator; give another --out or the same settings",
            ));
        }
        tracing::info!(log = %p.display(), trials = old.trials.len(), "resuming search");
        state.trials = old.trials;
        state.exhausted = old.exhausted;
    }
    while state.trials.len() < config.budget && !state.exhausted {
        let Some(c) = propose(&state.trials)? else {
            state.exhausted = true;
            break;
        };
        let index = state.trials.len();
        let started = Instant::now();
        let metrics = evaluator.evaluate(space, &c, index)?;
        let trial = Trial {
            index,
            arch: space.describe(&c)?,
            candidate: c,
            feasible: config.objective.feasible(&metrics),
            metrics,
            seconds: started.elapsed().as_secs_f64(),
        };
        state.trials.push(trial);
        if let Some(p) = log {
            let json = serde_json::to_vec_pretty(&state).expect("the log serialises");
            pare_core_tensor::io::write_file_atomic(p, &json)?;
        }
        on_trial(state.trials.last().expect("just pushed"));
    }
    if let Some(p) = log {
        let json = serde_json::to_vec_pretty(&state).expect("the log serialises");
        pare_core_tensor::io::write_file_atomic(p, &json)?;
    }
    Ok(state)
}

/// Indices of the trials on the Pareto front of (validation accuracy ↑, latency ↓, bytes ↓):
/// no other trial is at least as good in all three and better in one. Sorted by latency.
pub fn pareto_front(trials: &[Trial]) -> Vec<usize> {
    let key = |t: &Trial| (t.metrics.validation, -t.metrics.latency_ms, -(t.metrics.bytes as f64));
    let dominates = |a: (f64, f64, f64), b: (f64, f64, f64)| {
        a.0 >= b.0 && a.1 >= b.1 && a.2 >= b.2 && (a.0 > b.0 || a.1 > b.1 || a.2 > b.2)
    };
    let mut front: Vec<usize> =
        (0..trials.len()).filter(|&i| !trials.iter().any(|o| dominates(key(o), key(&trials[i])))).collect();
    front.sort_by(|&a, &b| trials[a].metrics.latency_ms.total_cmp(&trials[b].metrics.latency_ms).then(a.cmp(&b)));
    front
}

/// The hypervolume of (accuracy ↑, latency ↓) points against the reference point
/// (`acc_ref`, `latency_ref`): the area they dominate, in accuracy × milliseconds. Points
/// outside the reference box add nothing.
pub fn hypervolume_2d(points: &[(f64, f64)], acc_ref: f64, latency_ref: f64) -> f64 {
    let mut p: Vec<(f64, f64)> = points.iter().copied().filter(|&(a, l)| a > acc_ref && l < latency_ref).collect();
    // Sweep by latency ascending, keeping the running best accuracy.
    p.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut area = 0.0;
    let mut best = acc_ref;
    for (i, &(a, l)) in p.iter().enumerate() {
        best = best.max(a);
        let next = p.get(i + 1).map_or(latency_ref, |q| q.1);
        area += (best - acc_ref) * (next - l);
    }
    area
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(acc: f64, lat: f64, bytes: usize) -> Trial {
        Trial {
            index: 0,
            candidate: vec![],
            arch: String::new(),
            metrics: Metrics { validation: acc, test: acc, params: 0, bytes, macs: 0, latency_ms: lat },
            feasible: true,
            seconds: 0.0,
        }
    }

    #[test]
    fn the_pareto_front_keeps_exactly_the_non_dominated_trials() {
        let t = vec![
            trial(0.9, 1.0, 10),
            trial(0.95, 2.0, 10),
            trial(0.85, 1.5, 10),
            trial(0.95, 2.0, 5),
            trial(0.8, 0.5, 10),
        ];
        assert_eq!(pareto_front(&t), vec![4, 0, 3]);
    }

    #[test]
    fn pareto_scores_trade_accuracy_for_speed_and_size() {
        let t = vec![trial(0.99, 2.0, 100_000), trial(0.90, 0.2, 5_000), trial(0.95, 1.0, 50_000)];
        let plain = Objective::default();
        assert_eq!(scores(&t, &plain, 1), vec![0.99, 0.90, 0.95]);
        let multi = Objective { pareto: true, ..plain };
        // Across proposals the weights vary: each extreme trial is sometimes preferred.
        let best: Vec<usize> = (0..40)
            .map(|i| {
                let mut h = t.clone();
                h.extend((0..i).map(|_| trial(0.94, 5.0, 200_000)));
                let s = scores(&h, &multi, 7);
                (0..3).max_by(|&a, &b| s[a].total_cmp(&s[b])).unwrap()
            })
            .collect();
        assert!(best.contains(&0) && best.contains(&1), "{best:?}");
        let mut bad = t.clone();
        bad[0].feasible = false;
        assert_eq!(scores(&bad, &multi, 1)[0], f64::NEG_INFINITY);
    }

    #[test]
    fn hypervolume_is_the_dominated_area() {
        // Two points: (0.9 acc, 1 ms) and (0.95, 2 ms), reference (0.8, 3 ms):
        // [1,2) × 0.1 + [2,3) × 0.15 = 0.25.
        let hv = hypervolume_2d(&[(0.9, 1.0), (0.95, 2.0)], 0.8, 3.0);
        assert!((hv - 0.25).abs() < 1e-12, "{hv}");
        // A dominated point adds nothing; one outside the box neither.
        assert!((hypervolume_2d(&[(0.9, 1.0), (0.95, 2.0), (0.85, 1.5), (0.99, 4.0)], 0.8, 3.0) - hv).abs() < 1e-12);
    }
}
