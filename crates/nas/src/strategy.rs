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

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::space::{Candidate, Space};
use crate::{Error, Result};

/// Which strategy proposes candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
}

impl std::str::FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(Self::Random),
            "grid" => Ok(Self::Grid),
            "evolution" => Ok(Self::Evolution { population: 10, sample: 3 }),
            other => Err(Error::unknown("search strategy", other, ["random", "grid", "evolution"])),
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Strategy::Random => write!(f, "random"),
            Strategy::Grid => write!(f, "grid"),
            Strategy::Evolution { .. } => write!(f, "evolution"),
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
        }
    }
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
        for strategy in ["random", "grid", "evolution"] {
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
        let s: Strategy = "evolution".parse().unwrap();
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
        assert!("darwin".parse::<Strategy>().unwrap_err().to_string().contains("unknown search strategy `darwin`"));
        assert!(Strategy::Evolution { population: 3, sample: 5 }.validate().is_err());
    }
}
