//! Architecture search on the real digits through pare-nas's library API: the strategies find
//! accurate models under a budget, the Pareto front and its hypervolume come from measured
//! latency, a search interrupted after k trials resumes to the same trial log, and bad settings
//! are refused before any training.

use std::sync::Arc;

use candle_core::Device;
use pare_core_tensor::data::{DigitsSplit, digits};
use pare_core_tensor::{Error, ReferenceRuntime, Runtime};
use pare_nas::evaluate::DigitsEvaluator;
use pare_nas::search::Evaluator;
use pare_nas::{
    Candidate, Metrics, Objective, SearchConfig, Space, Strategy, Trial, hypervolume_2d, pareto_front, search,
};
use pare_runtime_cpu::CpuRuntime;

fn cpu() -> Arc<dyn Runtime> {
    Arc::new(CpuRuntime::new(1).unwrap())
}

/// The parts of a trial that do not depend on the clock.
fn stable(t: &Trial) -> (Candidate, String, f64, f64, usize, usize, u64) {
    let m = &t.metrics;
    (t.candidate.clone(), t.arch.clone(), m.validation, m.test, m.params, m.bytes, m.macs)
}

#[test]
fn every_strategy_finds_an_accurate_model_and_a_pareto_front() {
    let data = digits(42, &Device::Cpu).unwrap();
    let space = Space::builtin("mlp").unwrap();
    for strategy in ["random", "grid", "evolution", "bo", "rl"] {
        let mut strategy: Strategy = strategy.parse().unwrap();
        if let Strategy::Evolution { population, sample } = &mut strategy {
            (*population, *sample) = (3, 2);
        }
        let mut eval = DigitsEvaluator::new(&data, cpu(), 3, 5).unwrap();
        let config =
            SearchConfig { strategy, budget: 6, seed: 5, objective: Objective::default(), evaluator: eval.describe() };
        let log = search(&space, &config, &mut eval, None, &mut |_| {}).unwrap();
        assert_eq!(log.trials.len(), 6);
        let best = log.best().unwrap();
        let front = pareto_front(&log.trials);
        let pts: Vec<(f64, f64)> =
            front.iter().map(|&i| (log.trials[i].metrics.validation, log.trials[i].metrics.latency_ms)).collect();
        let worst = log.trials.iter().map(|t| t.metrics.latency_ms).fold(0.0, f64::max);
        let hv = hypervolume_2d(&pts, 0.0, worst * 1.1);
        eprintln!(
            "{strategy}: best {} validation {:.4}; front {:?}; hypervolume {hv:.4}",
            best.arch, best.metrics.validation, front
        );
        assert!(best.metrics.validation > 0.9, "{strategy}: best validation {}", best.metrics.validation);
        assert!(!front.is_empty() && hv > 0.0);
        assert_eq!(log.best_so_far().last().copied().flatten(), Some(best.metrics.validation));
        assert!(log.trials.iter().all(|t| t.metrics.latency_ms > 0.0 && t.metrics.macs > 0));
    }
}

/// An evaluator that fails (as a killed process would stop) at trial `k`.
struct Killed<'a> {
    inner: DigitsEvaluator<'a>,
    k: usize,
}

impl Evaluator for Killed<'_> {
    fn evaluate(&mut self, space: &Space, c: &Candidate, index: usize) -> pare_core_tensor::Result<Metrics> {
        if index == self.k {
            return Err(Error::invalid("search", format!("killed at trial {index}")));
        }
        self.inner.evaluate(space, c, index)
    }
}

fn evaluator(data: &DigitsSplit) -> DigitsEvaluator<'_> {
    DigitsEvaluator::new(data, cpu(), 1, 9).unwrap()
}

#[test]
fn a_search_killed_after_k_trials_resumes_to_the_same_log() {
    let data = digits(42, &Device::Cpu).unwrap();
    let space = Space::builtin("cnn").unwrap();
    let config = SearchConfig {
        strategy: Strategy::Evolution { population: 3, sample: 2 },
        budget: 7,
        seed: 9,
        objective: Objective { latency_max_ms: None, bytes_max: Some(60_000) },
        evaluator: evaluator(&data).describe(),
    };
    let dir = tempfile::tempdir().unwrap();
    let whole = search(&space, &config, &mut evaluator(&data), Some(&dir.path().join("a.json")), &mut |_| {}).unwrap();

    let log = dir.path().join("b.json");
    let mut killed = Killed { inner: evaluator(&data), k: 4 };
    let err = search(&space, &config, &mut killed, Some(&log), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("killed at trial 4"), "{err}");
    let mut seen = 0;
    let resumed = search(&space, &config, &mut evaluator(&data), Some(&log), &mut |_| seen += 1).unwrap();
    assert_eq!(seen, 3, "trials 4, 5, 6 run after the resume");
    assert_eq!(
        resumed.trials.iter().map(stable).collect::<Vec<_>>(),
        whole.trials.iter().map(stable).collect::<Vec<_>>()
    );
    // The file holds the same.
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(serde_json::from_str::<pare_nas::SearchLog>(&text).unwrap().trials.len(), 7);
    // Another seed against the same log is refused rather than mixed in.
    let other = SearchConfig { seed: 10, ..config.clone() };
    let e = search(&space, &other, &mut evaluator(&data), Some(&log), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("another space, strategy, seed, objective or evaluator"), "{e}");
    // So is an evaluator that trains longer: its trials are not comparable.
    let longer = DigitsEvaluator::new(&data, cpu(), 2, 9).unwrap();
    let other = SearchConfig { evaluator: longer.describe(), ..config.clone() };
    assert!(search(&space, &other, &mut evaluator(&data), Some(&log), &mut |_| {}).is_err());
}

#[test]
fn bad_settings_are_refused_before_any_training() {
    let data = digits(42, &Device::Cpu).unwrap();
    let space = Space::builtin("mlp").unwrap();
    let ok = SearchConfig {
        strategy: Strategy::Random,
        budget: 3,
        seed: 1,
        objective: Objective::default(),
        evaluator: String::new(),
    };
    let rt = ReferenceRuntime::shared(Device::Cpu);
    let run = |c: &SearchConfig| {
        let mut e = DigitsEvaluator::new(&data, rt.clone(), 1, 1).unwrap();
        search(&space, c, &mut e, None, &mut |_| panic!("nothing may be evaluated")).unwrap_err().to_string()
    };
    assert!(run(&SearchConfig { budget: 0, ..ok.clone() }).contains("--budget"));
    let bad_latency = Objective { latency_max_ms: Some(-1.0), bytes_max: None };
    assert!(run(&SearchConfig { objective: bad_latency, ..ok.clone() }).contains("--latency-max"));
    let bad_evolution = Strategy::Evolution { population: 1, sample: 1 };
    assert!(run(&SearchConfig { strategy: bad_evolution, ..ok.clone() }).contains("population ≥ 2"));
    assert!(DigitsEvaluator::new(&data, rt.clone(), 0, 1).is_err());
    // A constraint no candidate can meet gives an explicit "no feasible architecture".
    let impossible = SearchConfig { objective: Objective { latency_max_ms: None, bytes_max: Some(1) }, ..ok };
    let mut e = DigitsEvaluator::new(&data, rt, 1, 1).unwrap();
    let log = search(&space, &impossible, &mut e, None, &mut |_| {}).unwrap();
    assert!(log.best().is_none() && log.trials.iter().all(|t| !t.feasible));
}
