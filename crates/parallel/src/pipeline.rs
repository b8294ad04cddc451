//! Pipeline parallelism: a model's forward is a chain of units ([`Stages`]); [`partition`]
//! cuts it into contiguous stages of balanced measured cost, one per worker, and
//! [`pipeline_forward`] streams micro-batches through them.
//!
//! Rank 0 is the first stage and also collects the last stage's outputs. Two schedules:
//!
//! - [`Schedule::GPipe`]: rank 0 injects every micro-batch as fast as it can compute its
//!   stage, then collects the outputs; up to `m` micro-batches are in flight.
//! - [`Schedule::OneFOneB`]: after `p` micro-batches, rank 0 injects a new one only when an
//!   output has come back — the steady state of 1F1B, where each forward waits for one
//!   completed micro-batch (a backward pass in training, its output here in inference), so
//!   at most `p` micro-batches' activations are alive at once.
//!
//! This is inference: no backward passes, so the two schedules have the same ideal bubble,
//! `(p − 1)/(m + p − 1)` of the stage-time; they differ in peak activation memory, which
//! [`PipelineStats::peak_in_flight`] reports. The measured bubble is `1 − Σ busy / (p · wall)`.

use std::ops::Range;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use pare_core_tensor::Hooks;
use pare_models::bert::{BertEncoder, attention_bias, mean_pool_normalize};
use pare_models::digits::DigitsNet;
use serde::Serialize;

use crate::{Communicator, Error, Result};

const TAG_ACT: u16 = 200;
const TAG_OUT: u16 = 201;
const TAG_COUNT: u16 = 202;
const TAG_BUSY: u16 = 203;

/// A forward pass as a chain of units, each mapping a list of tensors to the next.
pub trait Stages: Sync {
    /// The number of units.
    fn units(&self) -> usize;
    /// A name for unit `k` (for reports).
    fn unit_name(&self, k: usize) -> String;
    /// Runs unit `k`.
    fn forward_unit(&self, k: usize, acts: Vec<Tensor>) -> Result<Vec<Tensor>>;

    /// Runs units `range` in order.
    fn forward_range(&self, range: Range<usize>, mut acts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        for k in range {
            acts = self.forward_unit(k, acts)?;
        }
        Ok(acts)
    }
}

/// The digits networks' units ([`DigitsNet::unit_forward`]): input `[pixels]`, output `[logits]`.
#[derive(Debug, Clone, Copy)]
pub struct DigitsStages<'a>(pub &'a DigitsNet);

impl Stages for DigitsStages<'_> {
    fn units(&self) -> usize {
        self.0.units()
    }
    fn unit_name(&self, k: usize) -> String {
        format!("unit {k}")
    }
    fn forward_unit(&self, k: usize, acts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let x = one(acts, "digits unit input")?;
        Ok(vec![self.0.unit_forward(k, &x)?])
    }
}

/// A sentence encoder's units: unit 0 embeds `[input_ids, token_type_ids, attention_mask]`
/// into `[hidden, additive mask, attention_mask]`; unit `1 + l` runs transformer layer `l`;
/// the last also mean-pools and L2-normalises, giving `[embeddings]` — the same operations,
/// in the same order, as `SentenceEncoder::embed` on one batch.
#[derive(Debug, Clone, Copy)]
pub struct BertStages<'a>(pub &'a BertEncoder);

impl Stages for BertStages<'_> {
    fn units(&self) -> usize {
        1 + self.0.num_layers()
    }
    fn unit_name(&self, k: usize) -> String {
        if k == 0 { "embeddings".into() } else { format!("encoder.layer.{}", k - 1) }
    }
    fn forward_unit(&self, k: usize, acts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let [a, b, mask]: [Tensor; 3] = acts
            .try_into()
            .map_err(|v: Vec<Tensor>| Error::config("BERT unit input", "3 tensors", format!("{} tensors", v.len())))?;
        let hooks = &mut Hooks::none();
        if k == 0 {
            let h = self.0.embed_hooked(&a, Some(&b), hooks)?;
            return Ok(vec![h, attention_bias(&mask)?, mask]);
        }
        let h = self.0.layer_forward(k - 1, &a, &b, hooks, &mut Ok)?;
        if k == self.units() - 1 {
            return Ok(vec![mean_pool_normalize(&h, &mask)?]);
        }
        Ok(vec![h, b, mask])
    }
}

fn one(mut acts: Vec<Tensor>, what: &'static str) -> Result<Tensor> {
    if acts.len() != 1 {
        return Err(Error::config(what, "1 tensor", format!("{} tensors", acts.len())));
    }
    Ok(acts.remove(0))
}

/// Seconds each unit takes on `sample` (the median of `reps` runs, after one warm-up), the
/// cost [`partition`] balances.
pub fn measure_costs(stages: &dyn Stages, sample: &[Tensor], reps: usize) -> Result<Vec<f64>> {
    let mut costs = Vec::with_capacity(stages.units());
    let mut acts = sample.to_vec();
    for k in 0..stages.units() {
        let mut times = Vec::with_capacity(reps.max(1));
        let mut out = stages.forward_unit(k, acts.clone())?;
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            out = stages.forward_unit(k, acts.clone())?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        costs.push(times[times.len() / 2]);
        acts = out;
    }
    Ok(costs)
}

/// Cuts units of costs `costs` into `parts` contiguous non-empty stages minimising the most
/// expensive stage (exact, by dynamic programming).
pub fn partition(costs: &[f64], parts: usize) -> Result<Vec<Range<usize>>> {
    let n = costs.len();
    if parts == 0 || parts > n {
        return Err(Error::config("pipeline stages", format!("between 1 and the model's {n} units"), parts));
    }
    if let Some(c) = costs.iter().find(|c| !c.is_finite() || **c < 0.0) {
        return Err(Error::config("unit cost", "a finite, non-negative time", c));
    }
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(costs.iter().scan(0.0, |s, c| {
            *s += c;
            Some(*s)
        }))
        .collect();
    let cost = |a: usize, b: usize| prefix[b] - prefix[a];
    // best[p][i]: the smallest possible maximum over the first i units cut into p stages.
    let mut best = vec![vec![f64::INFINITY; n + 1]; parts + 1];
    let mut cut = vec![vec![0usize; n + 1]; parts + 1];
    best[0][0] = 0.0;
    for p in 1..=parts {
        for i in p..=n {
            for j in (p - 1)..i {
                let v = best[p - 1][j].max(cost(j, i));
                if v < best[p][i] {
                    best[p][i] = v;
                    cut[p][i] = j;
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(parts);
    let mut end = n;
    for p in (1..=parts).rev() {
        let start = cut[p][end];
        ranges.push(start..end);
        end = start;
    }
    ranges.reverse();
    Ok(ranges)
}

/// The pipeline schedule (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Schedule {
    /// All micro-batches injected, then all collected.
    GPipe,
    /// At most one micro-batch in flight per stage.
    OneFOneB,
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::GPipe => "gpipe",
            Schedule::OneFOneB => "1f1b",
        })
    }
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gpipe" => Ok(Schedule::GPipe),
            "1f1b" => Ok(Schedule::OneFOneB),
            other => Err(Error::config("pipeline schedule", "gpipe or 1f1b", other)),
        }
    }
}

/// What one pipelined run measured (at rank 0).
#[derive(Debug, Clone, Serialize)]
pub struct PipelineStats {
    /// The schedule.
    pub schedule: Schedule,
    /// Stages (= workers).
    pub stages: usize,
    /// Micro-batches.
    pub micro_batches: usize,
    /// Seconds each stage spent computing.
    pub busy_s: Vec<f64>,
    /// Seconds from the first injection to the last output at rank 0.
    pub wall_s: f64,
    /// Measured bubble: `1 − Σ busy / (stages · wall)`.
    pub bubble: f64,
    /// The ideal bubble for equal stages, `(p − 1)/(m + p − 1)`.
    pub ideal_bubble: f64,
    /// Most micro-batches in flight at once.
    pub peak_in_flight: usize,
    /// Per stage, when it computed each micro-batch: `(start, end)` in seconds since the
    /// stage's clock started (rank 0: its first injection; the others: when they learned the
    /// micro-batch count, a message later).
    pub timeline: Vec<Vec<(f64, f64)>>,
}

impl PipelineStats {
    /// The bubble this schedule has with exactly the durations measured for each stage and
    /// micro-batch ([`PipelineStats::timeline`]) and messages that take no time: a replay of
    /// the schedule's rules (a stage starts a micro-batch when it has it and is free; under
    /// 1F1B rank 0 also waits for output `i − p` before starting `i`). Measured minus replayed
    /// is what the implementation and its messages add; replayed minus
    /// `(p − 1)/(m + p − 1)` is what unequal and varying stage times cost the schedule
    /// itself (1F1B, which ties rank 0 to the last stage, feels the variation more).
    pub fn replayed_bubble(&self) -> f64 {
        let (p, m) = (self.stages, self.micro_batches);
        if p == 0 || m == 0 || self.timeline.len() != p || self.timeline.iter().any(|t| t.len() != m) {
            return f64::NAN;
        }
        let d = |s: usize, i: usize| (self.timeline[s][i].1 - self.timeline[s][i].0).max(0.0);
        // done[s][i]: when stage s finishes micro-batch i.
        let mut done = vec![vec![0f64; m]; p];
        for i in 0..m {
            for s in 0..p {
                let free = if i > 0 { done[s][i - 1] } else { 0.0 };
                let mut start = if s > 0 { free.max(done[s - 1][i]) } else { free };
                if s == 0 && self.schedule == Schedule::OneFOneB && i >= p {
                    start = start.max(done[p - 1][i - p]);
                }
                done[s][i] = start + d(s, i);
            }
        }
        let busy: f64 = (0..p).flat_map(|s| (0..m).map(move |i| (s, i))).map(|(s, i)| d(s, i)).sum();
        1.0 - busy / (p as f64 * done[p - 1][m - 1]).max(f64::MIN_POSITIVE)
    }
}

/// One pipelined forward, called by every worker with the same `plan` (one range of units per
/// rank, contiguous and covering every unit, e.g. from [`partition`]). At rank 0
/// `micro_batches` are the inputs; it returns their outputs in order and the measurements.
/// Other ranks pass an empty list and get `None`.
pub fn pipeline_forward(
    comm: &dyn Communicator,
    stages: &dyn Stages,
    plan: &[Range<usize>],
    schedule: Schedule,
    micro_batches: Vec<Vec<Tensor>>,
) -> Result<Option<(Vec<Vec<Tensor>>, PipelineStats)>> {
    check_plan(plan, stages.units(), comm.size())?;
    let mut agreed = vec![stages.units() as u32];
    agreed.extend(plan.iter().flat_map(|r| [r.start as u32, r.end as u32]));
    comm.check_agreement("pipeline units and stage plan across workers", &agreed)?;
    let (rank, p) = (comm.rank(), comm.size());
    let mine = plan[rank].clone();
    let dev = Device::Cpu;
    let m =
        if rank == 0 {
            if micro_batches.is_empty() {
                return Err(Error::config("pipeline input", "at least one micro-batch", "none"));
            }
            let count = Tensor::new(&[micro_batches.len() as u32], &dev)?;
            for r in 1..p {
                comm.send(r, TAG_COUNT, std::slice::from_ref(&count))?;
            }
            micro_batches.len()
        } else {
            let c = comm.recv(0, TAG_COUNT)?;
            c.first().and_then(|t| t.to_vec1::<u32>().ok()).and_then(|v| v.first().copied()).ok_or_else(|| {
                Error::Protocol { rank, peer: 0, detail: "the micro-batch count is not one u32".into() }
            })? as usize
        };
    let mut busy = Duration::ZERO;
    let mut events: Vec<(f64, f64)> = Vec::with_capacity(m);
    let clock = Instant::now();
    let mut run = |acts: Vec<Tensor>| -> Result<Vec<Tensor>> {
        let t = Instant::now();
        let out = stages.forward_range(mine.clone(), acts)?;
        busy += t.elapsed();
        events.push(((t - clock).as_secs_f64(), clock.elapsed().as_secs_f64()));
        Ok(out)
    };
    if p == 1 {
        let start = Instant::now();
        let outs = micro_batches.into_iter().map(&mut run).collect::<Result<Vec<_>>>()?;
        let wall = start.elapsed().as_secs_f64();
        let stats = PipelineStats {
            schedule,
            stages: 1,
            micro_batches: m,
            busy_s: vec![busy.as_secs_f64()],
            wall_s: wall,
            bubble: 1.0 - busy.as_secs_f64() / wall.max(f64::MIN_POSITIVE),
            ideal_bubble: 0.0,
            peak_in_flight: 1,
            timeline: vec![events],
        };
        return Ok(Some((outs, stats)));
    }
    if rank != 0 {
        let next = if rank + 1 == p { 0 } else { rank + 1 };
        let tag = if rank + 1 == p { TAG_OUT } else { TAG_ACT };
        for _ in 0..m {
            let acts = comm.recv(rank - 1, TAG_ACT)?;
            let out = run(acts)?;
            comm.send(next, tag, &out)?;
        }
        let flat: Vec<f64> = events.iter().flat_map(|&(a, b)| [a, b]).collect();
        let report = [
            Tensor::new(&[busy.as_secs_f64()], &dev)?.to_dtype(DType::F32)?,
            Tensor::from_vec(flat, (m, 2), &dev)?.to_dtype(DType::F32)?,
        ];
        comm.send(0, TAG_BUSY, &report)?;
        return Ok(None);
    }
    let start = Instant::now();
    let mut outs = Vec::with_capacity(m);
    let (mut in_flight, mut peak) = (0usize, 0usize);
    for mb in micro_batches {
        if schedule == Schedule::OneFOneB && in_flight >= p {
            outs.push(comm.recv(p - 1, TAG_OUT)?);
            in_flight -= 1;
        }
        let acts = run(mb)?;
        comm.send(1, TAG_ACT, &acts)?;
        in_flight += 1;
        peak = peak.max(in_flight);
    }
    while outs.len() < m {
        outs.push(comm.recv(p - 1, TAG_OUT)?);
    }
    let wall = start.elapsed().as_secs_f64();
    let mut busy_s = vec![busy.as_secs_f64()];
    let mut timeline = vec![std::mem::take(&mut events)];
    for r in 1..p {
        let b = comm.recv(r, TAG_BUSY)?;
        let bad =
            || Error::Protocol { rank, peer: r, detail: format!("expected the busy time and a [{m}, 2] timeline") };
        let [busy_t, times]: [Tensor; 2] = b.try_into().map_err(|_| bad())?;
        let v = busy_t.to_vec1::<f32>().ok().and_then(|v| v.first().copied()).ok_or_else(bad)?;
        let times = times.to_vec2::<f32>().map_err(|_| bad())?;
        if times.len() != m || times.iter().any(|t| t.len() != 2) {
            return Err(bad());
        }
        busy_s.push(v as f64);
        timeline.push(times.iter().map(|t| (t[0] as f64, t[1] as f64)).collect());
    }
    let total: f64 = busy_s.iter().sum();
    let stats = PipelineStats {
        schedule,
        stages: p,
        micro_batches: m,
        busy_s,
        wall_s: wall,
        bubble: 1.0 - total / (p as f64 * wall.max(f64::MIN_POSITIVE)),
        ideal_bubble: (p - 1) as f64 / (m + p - 1) as f64,
        peak_in_flight: peak,
        timeline,
    };
    Ok(Some((outs, stats)))
}

/// Checks that `plan` gives each of `world` ranks a non-empty range, contiguous and covering
/// `0..units`.
pub fn check_plan(plan: &[Range<usize>], units: usize, world: usize) -> Result<()> {
    if plan.len() != world {
        return Err(Error::config(
            "stage plan",
            format!("one stage per worker ({world})"),
            format!("{} stages", plan.len()),
        ));
    }
    let mut next = 0;
    for (s, r) in plan.iter().enumerate() {
        if r.start != next || r.is_empty() {
            return Err(Error::config(
                "stage plan",
                format!("stage {s} to start at unit {next} and hold at least one unit"),
                format!("{r:?}"),
            ));
        }
        next = r.end;
    }
    if next != units {
        return Err(Error::config(
            "stage plan",
            format!("stages covering the model's {units} units"),
            format!("stages ending at {next}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_balances_and_covers() {
        let costs = [1.0, 1.0, 1.0, 5.0, 1.0, 1.0];
        let p = partition(&costs, 2).unwrap();
        assert_eq!(p, vec![0..3, 3..6]);
        let p = partition(&costs, 3).unwrap();
        assert_eq!(p, vec![0..3, 3..4, 4..6]);
        assert_eq!(partition(&costs, 6).unwrap().len(), 6);
        assert!(partition(&costs, 7).unwrap_err().to_string().contains("between 1 and the model's 6 units"));
        assert!(partition(&[1.0, f64::NAN], 1).is_err());
    }

    /// With equal stage times every schedule replays to `(p − 1)/(m + p − 1)`; a slow stage
    /// raises it; under 1F1B, a rank 0 that must wait for the last stage's outputs loses the
    /// slack GPipe keeps when the stages' speeds vary.
    #[test]
    fn replay_gives_the_formula_for_equal_stages_and_more_for_uneven_ones() {
        let stats = |schedule, d: &dyn Fn(usize, usize) -> f64, p: usize, m: usize| PipelineStats {
            schedule,
            stages: p,
            micro_batches: m,
            busy_s: vec![0.0; p],
            wall_s: 0.0,
            bubble: 0.0,
            ideal_bubble: (p - 1) as f64 / (m + p - 1) as f64,
            peak_in_flight: 0,
            timeline: (0..p).map(|s| (0..m).map(|i| (10.0 * i as f64, 10.0 * i as f64 + d(s, i))).collect()).collect(),
        };
        for (p, m) in [(2, 16), (3, 8), (4, 4)] {
            for schedule in [Schedule::GPipe, Schedule::OneFOneB] {
                let s = stats(schedule, &|_, _| 0.5, p, m);
                assert!((s.replayed_bubble() - s.ideal_bubble).abs() < 1e-12, "{schedule:?} p {p} m {m}");
                let slow = stats(schedule, &|s, _| if s == 1 { 0.6 } else { 0.5 }, p, m);
                assert!(slow.replayed_bubble() > slow.ideal_bubble + 1e-3);
            }
        }
        // The last stage slow on the first half of the micro-batches, the first stage on the
        // second half: GPipe's rank 0 runs ahead in the first half and leaves a queue that
        // keeps the last stage busy in the second; 1F1B's rank 0 waits for outputs, so no
        // queue builds and the last stage starves later.
        let jitter = |s: usize, i: usize| if (i < 8) == (s == 1) { 0.6 } else { 0.4 };
        let g = stats(Schedule::GPipe, &jitter, 2, 16).replayed_bubble();
        let f = stats(Schedule::OneFOneB, &jitter, 2, 16).replayed_bubble();
        assert!(f > g + 0.01, "1f1b {f} vs gpipe {g}");
    }

    #[test]
    fn bad_plans_are_named() {
        assert!(check_plan(&[0..2, 2..4], 4, 2).is_ok());
        let one_stage: Vec<std::ops::Range<usize>> = vec![std::ops::Range { start: 0, end: 2 }];
        assert!(check_plan(&one_stage, 4, 2).unwrap_err().to_string().contains("one stage per worker (2)"));
        assert!(check_plan(&[0..2, 3..4], 4, 2).unwrap_err().to_string().contains("stage 1 to start at unit 2"));
        assert!(check_plan(&[0..2, 2..3], 4, 2).unwrap_err().to_string().contains("covering the model's 4 units"));
    }
}
