//! Search strategies: given the space and every trial so far, propose the next candidate.
//!
//! Each proposal draws from a ChaCha8 generator seeded by the run's seed and the trial's
//! index, and depends otherwise only on the trial history — so a resumed search proposes
//! exactly what an uninterrupted one would have.
//!
//! - `random`: uniform samples, skipping candidates already evaluated.
//! - `grid`: every candidate in mixed-radix order (the last decision fastest).
//! - `evolution`: regularized (aging) evolution (Real et al., 2019): the first `population`
//!   trials are random; then `sample` members of the latest `population` trials are drawn,
//!   the best is mutated in one decision, and the oldest member ages out.
//! - `bo`: Bayesian optimisation with a tree-structured Parzen estimator (Bergstra et al., 2011)
//!   over the categorical decisions: after `startup` random trials, the trials are split into
//!   the best `γ` and the rest, each decision gets smoothed option frequencies `l` (good) and
//!   `g` (rest), and of `candidates` draws from `l` the one maximising `Π l/g` is proposed.
//! - `darts`: gradient-based search on a weight-sharing supernet (see
//!   [`crate::supernet::darts_search`]); it ranks candidates from the trained architecture
//!   weights rather than proposing from the history, so [`Strategy::propose`] refuses it.
//! - `rl`: a REINFORCE controller (Williams, 1992; Zoph & Le, 2017): one softmax policy per
//!   decision, updated after every trial by `lr · (reward − baseline) · ∇log π`, with an
//!   exponential-moving-average baseline. The policy is replayed from the history, so it needs
//!   no state beyond the log.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::space::{Candidate, Space};
use crate::{Error, Result};

/// Which strategy proposes candidates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "name")]
pub enum Strategy {
    /// Uniform random sampling without repeats.
    Random,
    /// Exhaustive enumeration in order.
    Grid,
    /// Regularized evolution.
    Evolution {
        /// Trials that make up the population (the most recent ones).
        population: usize,
        /// Members drawn for each tournament.
        sample: usize,
    },
    /// Tree-structured Parzen estimator.
    Bo {
        /// Random trials before the model is used.
        startup: usize,
        /// Fraction of trials counted as good.
        gamma: f64,
        /// Draws from the good model scored per proposal.
        candidates: usize,
    },
    /// DARTS: the supernet's training settings.
    Darts(crate::supernet::SupernetConfig),
    /// REINFORCE controller.
    Rl {
        /// Policy-gradient step size.
        lr: f64,
        /// Weight of the newest reward in the moving-average baseline.
        baseline_decay: f64,
    },
}

impl std::str::FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(Self::Random),
            "grid" => Ok(Self::Grid),
            "evolution" => Ok(Self::Evolution { population: 10, sample: 3 }),
            "bo" => Ok(Self::Bo { startup: 5, gamma: 0.25, candidates: 24 }),
            "rl" => Ok(Self::Rl { lr: 0.5, baseline_decay: 0.2 }),
            "darts" => Ok(Self::Darts(crate::supernet::SupernetConfig {
                epochs: 30,
                batch_size: 64,
                lr: 3e-3,
                arch_lr: 1e-2,
                seed: 0,
            })),
            other => {
                Err(Error::unknown("search strategy", other, ["random", "grid", "evolution", "bo", "rl", "darts"]))
            }
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Strategy::Random => write!(f, "random"),
            Strategy::Grid => write!(f, "grid"),
            Strategy::Evolution { .. } => write!(f, "evolution"),
            Strategy::Bo { .. } => write!(f, "bo"),
            Strategy::Rl { .. } => write!(f, "rl"),
            Strategy::Darts(_) => write!(f, "darts"),
        }
    }
}

/// What a strategy sees of a finished trial: its candidate and its score (higher is better;
/// `-inf` for one that broke a constraint).
#[derive(Debug, Clone)]
pub struct Scored<'a> {
    /// The candidate.
    pub candidate: &'a Candidate,
    /// Its score.
    pub score: f64,
}

/// The generator of trial `index` of a run seeded with `seed`.
pub fn trial_rng(seed: u64, index: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

impl Strategy {
    /// Checks the strategy's own options.
    pub fn validate(&self) -> Result<()> {
        if let Strategy::Darts(cfg) = self {
            cfg.validate()?;
        }
        if let Strategy::Evolution { population, sample } = *self
            && (population < 2 || sample == 0 || sample > population)
        {
            return Err(Error::invalid(
                "evolution strategy",
                format!(
                    "needs population ≥ 2 and 1 ≤ sample ≤ population, found population {population}, sample {sample}"
                ),
            ));
        }
        if let Strategy::Bo { gamma, candidates, .. } = *self
            && (!(gamma > 0.0 && gamma < 1.0) || candidates == 0)
        {
            return Err(Error::invalid(
                "bo strategy",
                format!("needs 0 < gamma < 1 and candidates ≥ 1, found gamma {gamma}, candidates {candidates}"),
            ));
        }
        if let Strategy::Rl { lr, baseline_decay } = *self
            && !(lr.is_finite() && lr > 0.0 && baseline_decay > 0.0 && baseline_decay <= 1.0)
        {
            return Err(Error::invalid(
                "rl strategy",
                format!("needs lr > 0 and 0 < baseline_decay ≤ 1, found lr {lr}, baseline_decay {baseline_decay}"),
            ));
        }
        Ok(())
    }

    /// The next candidate after `history`, or `None` when the space has no unevaluated
    /// candidate left.
    pub fn propose(&self, space: &Space, history: &[Scored<'_>], seed: u64) -> Result<Option<Candidate>> {
        let seen = |c: &Candidate| history.iter().any(|h| h.candidate == c);
        let mut rng = trial_rng(seed, history.len());
        let fresh_sample =
            |rng: &mut ChaCha8Rng| -> Option<Candidate> { (0..1000).map(|_| space.sample(rng)).find(|c| !seen(c)) };
        match *self {
            Strategy::Darts(_) => Err(Error::invalid(
                "darts strategy",
                "ranks candidates from a trained supernet instead of proposing from the history: run it with pare_nas::supernet::darts_search",
            )),
            Strategy::Grid => {
                let all = space.enumerate(1_000_000).ok_or_else(|| {
                    Error::invalid(
                        "grid search",
                        format!("the space has {} candidates; grid search enumerates at most 1 000 000", space.size()),
                    )
                })?;
                Ok(all.into_iter().find(|c| !seen(c)))
            }
            Strategy::Random => Ok(fresh_sample(&mut rng).or_else(|| first_unseen(space, &seen))),
            Strategy::Evolution { population, sample } => {
                if history.len() < population {
                    return Ok(fresh_sample(&mut rng).or_else(|| first_unseen(space, &seen)));
                }
                let pop = &history[history.len() - population..];
                let mut best: Option<&Scored<'_>> = None;
                for _ in 0..sample {
                    let m = &pop[rng.random_range(0..pop.len())];
                    if best.is_none_or(|b| m.score > b.score) {
                        best = Some(m);
                    }
                }
                let parent = best.expect("sample ≥ 1").candidate;
                for _ in 0..50 {
                    let child = space.mutate(parent, &mut rng);
                    if !seen(&child) {
                        return Ok(Some(child));
                    }
                }
                Ok(fresh_sample(&mut rng).or_else(|| first_unseen(space, &seen)))
            }
            Strategy::Bo { startup, gamma, candidates } => {
                if history.len() < startup.max(2) {
                    return Ok(fresh_sample(&mut rng).or_else(|| first_unseen(space, &seen)));
                }
                let mut order: Vec<usize> = (0..history.len()).collect();
                // Best first; ties (and -inf) keep trial order, so the split is deterministic.
                order.sort_by(|&a, &b| history[b].score.total_cmp(&history[a].score).then(a.cmp(&b)));
                let n_good = ((gamma * history.len() as f64).ceil() as usize).clamp(1, history.len() - 1);
                let (good, bad) = order.split_at(n_good);
                let density = |members: &[usize], i: usize| -> Vec<f64> {
                    let k = space.choices[i].options.len();
                    let mut counts = vec![1.0; k]; // a uniform prior of one pseudo-count per option
                    for &m in members {
                        counts[history[m].candidate[i]] += 1.0;
                    }
                    let total: f64 = counts.iter().sum();
                    counts.into_iter().map(|c| c / total).collect()
                };
                let l: Vec<Vec<f64>> = (0..space.choices.len()).map(|i| density(good, i)).collect();
                let g: Vec<Vec<f64>> = (0..space.choices.len()).map(|i| density(bad, i)).collect();
                let mut best: Option<(f64, Candidate)> = None;
                for _ in 0..candidates {
                    let c = space.canonical(l.iter().map(|p| draw(p, &mut rng)).collect());
                    if seen(&c) {
                        continue;
                    }
                    let score: f64 =
                        (0..c.len()).filter(|&i| space.is_active(&c, i)).map(|i| (l[i][c[i]] / g[i][c[i]]).ln()).sum();
                    if best.as_ref().is_none_or(|b| score > b.0) {
                        best = Some((score, c));
                    }
                }
                Ok(best.map(|b| b.1).or_else(|| fresh_sample(&mut rng)).or_else(|| first_unseen(space, &seen)))
            }
            Strategy::Rl { lr, baseline_decay } => {
                let logits = reinforce(space, history, lr, baseline_decay);
                let policy: Vec<Vec<f64>> = logits.iter().map(|z| softmax(z)).collect();
                for _ in 0..100 {
                    let c = space.canonical(policy.iter().map(|p| draw(p, &mut rng)).collect());
                    if !seen(&c) {
                        return Ok(Some(c));
                    }
                }
                Ok(fresh_sample(&mut rng).or_else(|| first_unseen(space, &seen)))
            }
        }
    }
}

/// An index drawn from the probabilities `p`.
fn draw(p: &[f64], rng: &mut ChaCha8Rng) -> usize {
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (i, &x) in p.iter().enumerate() {
        acc += x;
        if u < acc {
            return i;
        }
    }
    p.len() - 1
}

fn softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// The REINFORCE controller's logits after replaying `history`: per trial, reward = score
/// (infeasible trials get the worst finite score seen, or 0), advantage = reward − baseline,
/// and each active decision's logits move by `lr · advantage · (onehot − π)`.
pub fn reinforce(space: &Space, history: &[Scored<'_>], lr: f64, baseline_decay: f64) -> Vec<Vec<f64>> {
    let mut logits: Vec<Vec<f64>> = space.choices.iter().map(|c| vec![0.0; c.options.len()]).collect();
    let floor = history.iter().map(|h| h.score).filter(|s| s.is_finite()).fold(f64::INFINITY, f64::min);
    let floor = if floor.is_finite() { floor } else { 0.0 };
    let mut baseline: Option<f64> = None;
    for h in history {
        let reward = if h.score.is_finite() { h.score } else { floor };
        let b = baseline.unwrap_or(reward);
        let advantage = reward - b;
        for (i, z) in logits.iter_mut().enumerate() {
            if !space.is_active(h.candidate, i) {
                continue;
            }
            let p = softmax(z);
            for (k, zk) in z.iter_mut().enumerate() {
                let onehot = if k == h.candidate[i] { 1.0 } else { 0.0 };
                *zk += lr * advantage * (onehot - p[k]);
            }
        }
        baseline = Some(b + baseline_decay * (reward - b));
    }
    logits
}

fn first_unseen(space: &Space, seen: &dyn Fn(&Candidate) -> bool) -> Option<Candidate> {
    space.enumerate(1_000_000)?.into_iter().find(|c| !seen(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_never_repeat_and_stop_when_the_space_is_exhausted() {
        let space = Space::builtin("mlp").unwrap();
        for strategy in ["random", "grid", "evolution", "bo", "rl"] {
            let s: Strategy = strategy.parse().unwrap();
            let mut done: Vec<Candidate> = Vec::new();
            let mut scores = Vec::new();
            while let Some(c) = {
                let h: Vec<Scored<'_>> =
                    done.iter().zip(&scores).map(|(c, &score)| Scored { candidate: c, score }).collect();
                s.propose(&space, &h, 3).unwrap()
            } {
                assert!(!done.contains(&c), "{strategy} repeated {c:?}");
                scores.push(space.encode(&c).iter().sum::<f64>());
                done.push(c);
            }
            assert_eq!(done.len(), 84, "{strategy} covers the whole space");
        }
    }

    #[test]
    fn proposals_depend_only_on_seed_and_history() {
        let space = Space::builtin("cnn").unwrap();
        for name in ["evolution", "bo", "rl"] {
            let s: Strategy = name.parse().unwrap();
            let run = || {
                let mut done: Vec<Candidate> = Vec::new();
                for _ in 0..25 {
                    let scores: Vec<f64> = done.iter().map(|c| space.encode(c)[4]).collect();
                    let h: Vec<Scored<'_>> =
                        done.iter().zip(&scores).map(|(c, &score)| Scored { candidate: c, score }).collect();
                    let c = s.propose(&space, &h, 11).unwrap().unwrap();
                    done.push(c);
                }
                done
            };
            assert_eq!(run(), run());
        }
        assert!("darwin".parse::<Strategy>().unwrap_err().to_string().contains("unknown search strategy `darwin`"));
        assert!(Strategy::Evolution { population: 3, sample: 5 }.validate().is_err());
        assert!(Strategy::Bo { startup: 5, gamma: 1.5, candidates: 24 }.validate().is_err());
        assert!(Strategy::Rl { lr: 0.0, baseline_decay: 0.2 }.validate().is_err());
    }

    #[test]
    fn model_based_strategies_concentrate_on_what_scored_well() {
        // A synthetic objective: the score is the index of the first width (bigger is better).
        let space = Space::builtin("mlp").unwrap();
        for name in ["bo", "rl"] {
            let s: Strategy = name.parse().unwrap();
            let mut done: Vec<Candidate> = Vec::new();
            for _ in 0..30 {
                let scores: Vec<f64> = done.iter().map(|c| c[1] as f64).collect();
                let h: Vec<Scored<'_>> =
                    done.iter().zip(&scores).map(|(c, &score)| Scored { candidate: c, score }).collect();
                done.push(s.propose(&space, &h, 2).unwrap().unwrap());
            }
            // Uniform sampling proposes the best first width a quarter of the time (7.5 of 30).
            let best = done.iter().filter(|c| c[1] == 3).count();
            assert!(best >= 12, "{name}: the best first width proposed {best} times in 30");
        }
    }
}
