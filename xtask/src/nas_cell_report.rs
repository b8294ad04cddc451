//! `cargo xtask nas-cell-report`: the weight-sharing and multi-objective parts of architecture
//! search on the digits, written as `reports/nas-cell-report.{md,json}` with two SVG plots.
//!
//! 1. DARTS on the `cell` space over several seeds: the derived cell of each, retrained from
//!    scratch, against the best of random cells trained from scratch with a budget of trials.
//! 2. One-shot (SPOS): one supernet trained once; random search and evolution scored on
//!    inherited weights; how well those scores rank cells (Kendall τ against the same cells
//!    trained from scratch); the one-shot winners retrained.
//! 3. Multi-objective: ParEGO evolution over the `cnn` and `cell` spaces for (accuracy,
//!    latency, bytes), and whether their fronts hold a model that dominates the hand-designed
//!    demo CNN — at least as accurate on validation *and* test, with ≤ 50% of its latency or
//!    bytes.
//!
//! Every search's trial log (and each DARTS run's supernet log) is kept under
//! `target/nas-cell-report/`, so an interrupted report resumes without redoing finished work.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use pare_core_tensor::data::digits;
use pare_models::digits::DigitsArch;
use pare_nas::evaluate::DigitsEvaluator;
use pare_nas::supernet::{EpochLog, OneShotEvaluator, SupernetConfig, darts_search, kendall_tau};
use pare_nas::{Metrics, Objective, SearchConfig, SearchLog, Space, Strategy, Trial, pareto_front, search};
use plotters::prelude::*;

use crate::mean_sd;

/// Arguments of `cargo xtask nas-cell-report`.
#[derive(clap::Args)]
pub struct Args {
    /// Where nas-cell-report.md, .json and the plots go.
    #[arg(long, default_value = "reports")]
    out: PathBuf,
    /// Seeds of DARTS and of the random-search comparison.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Epochs of each DARTS supernet.
    #[arg(long, default_value_t = 30)]
    darts_epochs: usize,
    /// Adam learning rate of DARTS' architecture weights.
    #[arg(long, default_value_t = 1e-2)]
    arch_lr: f64,
    /// Epochs of the one-shot supernet.
    #[arg(long, default_value_t = 40)]
    supernet_epochs: usize,
    /// Trials of each one-shot search (cheap: no training per trial).
    #[arg(long, default_value_t = 60)]
    one_shot_budget: usize,
    /// Cells trained from scratch per seed in the random-search comparison, and for the rank
    /// correlation.
    #[arg(long, default_value_t = 12)]
    scratch_budget: usize,
    /// Trials of the multi-objective search.
    #[arg(long, default_value_t = 30)]
    pareto_budget: usize,
    /// Epochs of every from-scratch training.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Where candidates are timed.
    #[command(flatten)]
    runtime: crate::runtime::RuntimeOpts,
}

fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok())
}

fn cell(t: &Trial) -> String {
    format!(
        "`{}` ({:.2}% val, {:.2}% test, {} B, {:.3} ms)",
        t.arch,
        100.0 * t.metrics.validation,
        100.0 * t.metrics.test,
        t.metrics.bytes,
        t.metrics.latency_ms
    )
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("xtask has a parent folder")?;
    let work = root.join("target/nas-cell-report");
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let rt = args.runtime.build()?;
    let data = digits(crate::DIGITS_SPLIT_SEED, &Device::Cpu)?;
    let cells = Space::builtin("cell")?;
    let tag = format!("e{}", args.epochs);
    let scratch = |seed: u64| DigitsEvaluator::new(&data, rt.clone(), args.epochs, seed);

    // 1. DARTS, one derived cell per seed, retrained from scratch.
    let mut darts: Vec<(SearchLog, Vec<EpochLog>)> = Vec::new();
    for seed in 1..=args.seeds {
        let stem = format!("darts-{tag}-s{}-a{}-{seed}", args.darts_epochs, args.arch_lr);
        let log_path = work.join(format!("{stem}.json"));
        let epochs_path = work.join(format!("{stem}-supernet.json"));
        if let (Some(log), Some(epochs)) = (load::<SearchLog>(&log_path), load::<Vec<EpochLog>>(&epochs_path))
            && log.trials.len() == 1
        {
            darts.push((log, epochs));
            continue;
        }
        let mut eval = scratch(seed)?;
        let Strategy::Darts(defaults) = "darts".parse::<Strategy>()? else { unreachable!("darts parses to Darts") };
        let strategy = Strategy::Darts(SupernetConfig { epochs: args.darts_epochs, arch_lr: args.arch_lr, ..defaults });
        let config =
            SearchConfig { strategy, budget: 1, seed, objective: Objective::default(), evaluator: eval.describe() };
        let bar = crate::progress(args.darts_epochs as u64, &format!("DARTS seed {seed}"));
        let (log, epochs) = darts_search(
            &cells,
            &config,
            &data,
            &mut eval,
            Some(&log_path),
            &mut |e| {
                bar.inc(1);
                bar.set_message(format!("mixed val {:.3}, derived {}", e.validation, e.derived));
            },
            &mut |_| {},
        )?;
        bar.finish_and_clear();
        pare_core_tensor::io::write_file_atomic(&epochs_path, &serde_json::to_vec_pretty(&epochs)?)?;
        darts.push((log, epochs));
    }

    // Random cells trained from scratch, per seed (the baseline DARTS must beat).
    let mut random: Vec<SearchLog> = Vec::new();
    let bar = crate::progress(args.seeds * args.scratch_budget as u64, "random cells");
    for seed in 1..=args.seeds {
        let mut eval = scratch(seed)?;
        let config = SearchConfig {
            strategy: Strategy::Random,
            budget: args.scratch_budget,
            seed,
            objective: Objective::default(),
            evaluator: eval.describe(),
        };
        let path = work.join(format!("random-{tag}-{seed}.json"));
        random.push(search(&cells, &config, &mut eval, Some(&path), &mut |_| bar.inc(1))?);
    }
    bar.finish_and_clear();

    // 2. One-shot: one supernet, two searches on inherited weights, the rank correlation.
    let sn = SupernetConfig { epochs: args.supernet_epochs, batch_size: 64, lr: 3e-3, arch_lr: 3e-3, seed: 1 };
    let bar = crate::progress(args.supernet_epochs as u64, "one-shot supernet");
    let mut one_shot = OneShotEvaluator::train(&cells, &data, rt.clone(), sn, &mut |e| {
        bar.inc(1);
        bar.set_message(format!("sampled paths val {:.3}", e.validation));
    })?;
    bar.finish_and_clear();
    let mut one_shot_runs: Vec<(String, SearchLog)> = Vec::new();
    for (name, strategy) in
        [("random", Strategy::Random), ("evolution", Strategy::Evolution { population: 10, sample: 3 })]
    {
        let config = SearchConfig {
            strategy,
            budget: args.one_shot_budget,
            seed: 1,
            objective: Objective::default(),
            evaluator: one_shot.describe(),
        };
        let path = work.join(format!("oneshot-s{}-{name}.json", args.supernet_epochs));
        one_shot_runs.push((name.into(), search(&cells, &config, &mut one_shot, Some(&path), &mut |_| {})?));
    }
    // Rank correlation on the random cells of seed 1 (trained from scratch above).
    let ranked: Vec<(String, f64, f64)> = random[0]
        .trials
        .iter()
        .map(|t| {
            let inherited = pare_nas::search::Evaluator::evaluate(&mut one_shot, &cells, &t.candidate, t.index)?;
            Ok((t.arch.clone(), inherited.validation, t.metrics.validation))
        })
        .collect::<anyhow::Result<_>>()?;
    let tau =
        kendall_tau(&ranked.iter().map(|r| r.1).collect::<Vec<_>>(), &ranked.iter().map(|r| r.2).collect::<Vec<_>>());
    // The one-shot winners, retrained from scratch.
    let mut retrained: Vec<(String, Metrics)> = Vec::new();
    for (name, log) in &one_shot_runs {
        let best = log.best().context("a one-shot search has a best trial")?;
        let arch: DigitsArch = best.arch.parse()?;
        retrained.push((name.clone(), scratch(1)?.measure(&arch, usize::MAX - 1)?));
    }

    // 3. Multi-objective evolution (ParEGO) over the global CNN space and the cell space.
    let mut pareto_logs: Vec<SearchLog> = Vec::new();
    for (name, file) in [("cnn", format!("pareto-{tag}.json")), ("cell", format!("pareto-cell-{tag}.json"))] {
        let space = Space::builtin(name)?;
        let mut eval = scratch(1)?;
        let config = SearchConfig {
            strategy: Strategy::Evolution { population: 8, sample: 2 },
            budget: args.pareto_budget,
            seed: 1,
            objective: Objective { pareto: true, ..Objective::default() },
            evaluator: eval.describe(),
        };
        let bar = crate::progress(args.pareto_budget as u64, &format!("ParEGO evolution on {name}"));
        pareto_logs.push(search(&space, &config, &mut eval, Some(&work.join(file)), &mut |_| bar.inc(1))?);
        bar.finish_and_clear();
    }
    let demo: Vec<Metrics> = (1..=args.seeds)
        .map(|seed| Ok(scratch(seed)?.measure(&DigitsArch::default_cnn(), usize::MAX)?))
        .collect::<anyhow::Result<_>>()?;

    write(&args, &darts, &random, &one_shot, &one_shot_runs, &ranked, tau, &retrained, &pareto_logs, &demo)
}

#[allow(clippy::too_many_arguments)]
fn write(
    args: &Args,
    darts: &[(SearchLog, Vec<EpochLog>)],
    random: &[SearchLog],
    one_shot: &OneShotEvaluator<'_>,
    one_shot_runs: &[(String, SearchLog)],
    ranked: &[(String, f64, f64)],
    tau: f64,
    retrained: &[(String, Metrics)],
    pareto_logs: &[SearchLog],
    demo: &[Metrics],
) -> anyhow::Result<()> {
    let out = &args.out;
    std::fs::create_dir_all(out)?;
    let pct = |v: (f64, f64)| format!("{:.2}% ± {:.2}", 100.0 * v.0, 100.0 * v.1);
    let darts_val = mean_sd(&darts.iter().map(|d| d.0.trials[0].metrics.validation).collect::<Vec<_>>());
    let darts_test = mean_sd(&darts.iter().map(|d| d.0.trials[0].metrics.test).collect::<Vec<_>>());
    let rbest: Vec<&Trial> = random.iter().filter_map(|l| l.best()).collect();
    let rand_val = mean_sd(&rbest.iter().map(|t| t.metrics.validation).collect::<Vec<_>>());
    let rand_test = mean_sd(&rbest.iter().map(|t| t.metrics.test).collect::<Vec<_>>());
    let demo_val = mean_sd(&demo.iter().map(|m| m.validation).collect::<Vec<_>>());
    let demo_test = mean_sd(&demo.iter().map(|m| m.test).collect::<Vec<_>>());
    let demo_lat = mean_sd(&demo.iter().map(|m| m.latency_ms).collect::<Vec<_>>()).0;
    let demo_bytes = demo[0].bytes;
    let darts_secs: f64 = darts.iter().map(|d| d.0.trials[0].seconds).sum::<f64>() / darts.len() as f64;
    let mut md = format!(
        "# Architecture search on the digits: DARTS, one-shot supernets, multi-objective search\n\n\
Regenerate: `cargo xtask nas-cell-report --seeds {} --darts-epochs {} --arch-lr {} --supernet-epochs {} --one-shot-budget {} --scratch-budget {} --pareto-budget {} --epochs {}` (logs kept in target/nas-cell-report/, so an interrupted report resumes). \
Every from-scratch training is {} epochs of AdamW 3e-3 with a cosine schedule, seeded by the run seed and trial; latency is the median of 31 single-image forward passes on `{}`; test accuracy is never used to choose.\n\n\
The **cell space** (`--space cell`) is NAS-Bench-201's design sized for 8×8 digits: a 16-channel 3×3 stem, two copies of one cell, ReLU, 2×2 max-pool, the classifier. A cell is a DAG on 4 nodes whose 6 edges each take one of none, skip, 1×1 conv, 3×3 conv, 3×3 average pool (15 625 cells). \
The hand-designed demo CNN `cnn:16,32:64`, trained the same way over {} seeds: validation {}, test {}, {:.3} ms, {} bytes.\n\n\
## 1. DARTS\n\nFirst-order DARTS: a supernet whose every edge is the softmax(α)-weighted sum of its five operations; network weights (AdamW 3e-3, cosine) and α (Adam {}, β₁ 0.5, weight decay 1e-3; one α per edge shared by both cells) are updated alternately on two halves of the training split, {} epochs per seed (about 10 α steps per epoch on this small split, hence a larger α step than DARTS' 3e-4). The derived cell takes each edge's most probable operation other than none and is retrained from scratch.\n\n\
| seed | derived cell | mixed-supernet validation | retrained validation | retrained test | bytes | latency ms |\n|---:|---|---:|---:|---:|---:|---:|\n",
        args.seeds,
        args.darts_epochs,
        args.arch_lr,
        args.supernet_epochs,
        args.one_shot_budget,
        args.scratch_budget,
        args.pareto_budget,
        args.epochs,
        args.epochs,
        args.runtime.runtime,
        args.seeds,
        pct(demo_val),
        pct(demo_test),
        demo_lat,
        demo_bytes,
        args.arch_lr,
        args.darts_epochs,
    );
    for (k, (log, epochs)) in darts.iter().enumerate() {
        let t = &log.trials[0];
        md.push_str(&format!(
            "| {} | `{}` | {:.2}% | {:.2}% | {:.2}% | {} | {:.3} |\n",
            k + 1,
            t.arch,
            100.0 * epochs.last().map_or(0.0, |e| e.validation),
            100.0 * t.metrics.validation,
            100.0 * t.metrics.test,
            t.metrics.bytes,
            t.metrics.latency_ms
        ));
    }
    let probs = darts.first().and_then(|d| d.1.last()).map(|e| e.probabilities.clone()).unwrap_or_default();
    md.push_str(&format!(
        "\nDARTS' derived cells retrained: validation {}, test {}. The best of {} random cells trained from scratch, per seed: validation {}, test {} ({}). Seed 1's final operation probabilities per edge (none, skip, conv1x1, conv3x3, avg3x3): {}. Retraining one derived cell took {:.1} s on top of the supernet.\n\n",
        pct(darts_val),
        pct(darts_test),
        args.scratch_budget,
        pct(rand_val),
        pct(rand_test),
        rbest.iter().map(|t| format!("`{}`", t.arch)).collect::<Vec<_>>().join(", "),
        probs.iter().map(|p| format!("[{}]", p.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(", "))).collect::<Vec<_>>().join(" "),
        darts_secs,
    ));
    let derived_ops: Vec<String> = darts
        .iter()
        .flat_map(|d| {
            d.0.trials[0].arch.rsplit(':').next().unwrap_or("").split(',').map(str::to_string).collect::<Vec<_>>()
        })
        .collect();
    let free = derived_ops.iter().filter(|o| *o == "skip" || *o == "avg3x3").count();
    md.push_str(&format!(
        "{} {free} of the {} derived edges are parameter-free (skip or avg3x3){}.\n\n",
        if darts_val.0 >= rand_val.0 - rand_val.1 {
            "DARTS' derived cells are as accurate as the best random cells within one standard deviation, for the cost of one supernet training plus one retraining per seed."
        } else {
            "DARTS' derived cells are less accurate than the best random cells by more than one standard deviation."
        },
        derived_ops.len(),
        if 2 * free > derived_ops.len() {
            " — the known failure mode of DARTS, whose α drifts towards parameter-free operations because they help the mixed network early in training"
        } else {
            ""
        }
    ));

    // 2. One-shot.
    let last = one_shot.epochs.last().context("the supernet trained at least one epoch")?;
    md.push_str(&format!(
        "## 2. One-shot supernet (uniform single paths)\n\nOne supernet trained {} epochs, each batch on one cell drawn uniformly (SPOS); afterwards every cell is scored by its validation accuracy on the weights it inherits — no training per trial. Final training loss {:.3}; mean validation accuracy of 8 fixed sampled cells {:.2}%.\n\n\
| search on inherited weights | trials | best cell | its inherited validation | retrained validation | retrained test | bytes | latency ms |\n|---|---:|---|---:|---:|---:|---:|---:|\n",
        args.supernet_epochs,
        last.train_loss,
        100.0 * last.validation,
    ));
    for ((name, log), (_, m)) in one_shot_runs.iter().zip(retrained) {
        let b = log.best().context("a best trial")?;
        md.push_str(&format!(
            "| {name} | {} | `{}` | {:.2}% | {:.2}% | {:.2}% | {} | {:.3} |\n",
            log.trials.len(),
            b.arch,
            100.0 * b.metrics.validation,
            100.0 * m.validation,
            100.0 * m.test,
            m.bytes,
            m.latency_ms
        ));
    }
    md.push_str(&format!(
        "\nHow well inherited weights rank cells: the {} random cells of seed 1, each scored on inherited weights and trained from scratch — Kendall τ = {tau:.2} between the two validation accuracies ({}).\n\n\
| cell | inherited validation | trained from scratch |\n|---|---:|---:|\n",
        ranked.len(),
        if tau >= 0.5 {
            "a useful ranking"
        } else if tau > 0.0 {
            "a weak ranking: one-shot scores narrow the field but cannot replace training"
        } else {
            "no useful ranking"
        },
    ));
    for (arch, inherited, trained) in ranked {
        md.push_str(&format!("| `{arch}` | {:.2}% | {:.2}% |\n", 100.0 * inherited, 100.0 * trained));
    }
    md.push_str("\n![inherited against stand-alone accuracy](nas-cell-oneshot.svg)\n\n");

    // 3. Multi-objective.
    md.push_str(&format!(
        "## 3. Multi-objective search (accuracy, latency, bytes)\n\nRegularized evolution (population 8, tournaments of 2) with ParEGO scoring: every proposal scores the history with a fresh random augmented-Chebyshev weighting of (validation accuracy, log latency, log bytes), so the search spreads along the front. {} trials per space, each trained from scratch, seed 1. A model dominates the demo CNN here when its validation and test accuracy are both at least the demo's means ({:.2}%, {:.2}%) and it needs ≤ 50% of the demo's {:.3} ms or of its {} bytes.\n\n",
        args.pareto_budget,
        100.0 * demo_val.0,
        100.0 * demo_test.0,
        demo_lat,
        demo_bytes,
    ));
    // The demo CNN as the plots' baseline: its mean accuracy and latency.
    let demo_trial = Trial {
        index: usize::MAX,
        candidate: Vec::new(),
        arch: DigitsArch::default_cnn().to_string(),
        metrics: Metrics { validation: demo_val.0, test: demo_test.0, latency_ms: demo_lat, ..demo[0].clone() },
        feasible: true,
        seconds: 0.0,
    };
    let mut dominating: Vec<&Trial> = Vec::new();
    for (log, svg) in pareto_logs.iter().zip(["nas-pareto.svg", "nas-pareto-cell.svg"]) {
        let front = pareto_front(&log.trials);
        let here: Vec<&Trial> = log
            .trials
            .iter()
            .filter(|t| {
                t.metrics.validation >= demo_val.0
                    && t.metrics.test >= demo_test.0
                    && (t.metrics.latency_ms <= 0.5 * demo_lat || 2 * t.metrics.bytes <= demo_bytes)
            })
            .collect();
        md.push_str(&format!(
            "**{} space.** Pareto front: {}.\n\nDominating the demo CNN: {}.\n\n![the {} front against the demo CNN]({svg})\n\n",
            log.space.kind_name(),
            front.iter().map(|&i| cell(&log.trials[i])).collect::<Vec<_>>().join(", "),
            if here.is_empty() {
                "none in this budget".to_string()
            } else {
                here.iter().map(|t| cell(t)).collect::<Vec<_>>().join(", ")
            },
            log.space.kind_name(),
        ));
        crate::nas::plot_front(log, &demo_trial, &out.join(svg))?;
        dominating.extend(here);
    }
    plot_ranks(ranked, tau, &out.join("nas-cell-oneshot.svg"))?;
    let json = serde_json::to_vec_pretty(&serde_json::json!({
        "demo_cnn": demo,
        "darts": darts.iter().map(|(log, epochs)| serde_json::json!({"log": log, "supernet": epochs})).collect::<Vec<_>>(),
        "random_cells": random,
        "one_shot": {"supernet": one_shot.epochs, "describe": one_shot.describe(),
            "searches": one_shot_runs.iter().map(|(n, l)| serde_json::json!({"strategy": n, "log": l})).collect::<Vec<_>>(),
            "retrained": retrained.iter().map(|(n, m)| serde_json::json!({"strategy": n, "metrics": m})).collect::<Vec<_>>(),
            "kendall_tau": tau,
            "ranked": ranked.iter().map(|r| serde_json::json!({"arch": r.0, "inherited": r.1, "scratch": r.2})).collect::<Vec<_>>()},
        "pareto": pareto_logs,
        "dominating_demo": dominating.iter().map(|t| t.arch.clone()).collect::<Vec<_>>(),
    }))?;
    pare_core_tensor::io::write_file_atomic(out.join("nas-cell-report.json"), &json)?;
    pare_core_tensor::io::write_file_atomic(out.join("nas-cell-report.md"), md.as_bytes())?;
    println!("{md}");
    println!(
        "wrote {}/nas-cell-report.md, .json, nas-cell-oneshot.svg, nas-pareto.svg and nas-pareto-cell.svg",
        out.display()
    );
    Ok(())
}

fn plot_ranks(ranked: &[(String, f64, f64)], tau: f64, path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("svg.tmp");
    // Zoom on the data, with a margin of one point.
    let range = |v: Vec<f64>| {
        let lo = v.iter().copied().fold(100.0, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        ((lo - 1.0).max(0.0), (hi + 1.0).min(100.0))
    };
    let (xlo, xhi) = range(ranked.iter().map(|r| 100.0 * r.1).collect());
    let (ylo, yhi) = range(ranked.iter().map(|r| 100.0 * r.2).collect());
    {
        let root = SVGBackend::new(&tmp, (640, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("one-shot score against training from scratch (Kendall τ {tau:.2})"), ("sans-serif", 18))
            .margin(20)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(xlo..xhi, ylo..yhi)?;
        chart
            .configure_mesh()
            .x_desc("validation accuracy on inherited weights, %")
            .y_desc("validation accuracy trained from scratch, %")
            .light_line_style(WHITE)
            .draw()?;
        chart.draw_series(ranked.iter().map(|r| Circle::new((100.0 * r.1, 100.0 * r.2), 4, BLUE.mix(0.6).filled())))?;
        root.present()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
