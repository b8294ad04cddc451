//! `cargo xtask nas-report`: every strategy with the same budget over several seeds on a
//! digits space — best validation and test accuracy, MACs and measured latency of each run's
//! best model, the best-vs-trials curves, the pooled Pareto front against the hand-designed
//! CNN — written as `reports/nas-report.{md,json,svg}`. Each run's trial log is kept under
//! `target/nas-report/`, so an interrupted report resumes where it stopped.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use pare_core_tensor::data::digits;
use pare_models::digits::DigitsArch;
use pare_nas::evaluate::DigitsEvaluator;
use pare_nas::{Objective, SearchConfig, SearchLog, Space, Strategy, Trial, pareto_front, search};
use plotters::prelude::*;

use crate::mean_sd;

/// Arguments of `cargo xtask nas-report`.
#[derive(clap::Args)]
pub struct Args {
    /// Where nas-report.md, .json and .svg go.
    #[arg(long, default_value = "reports")]
    out: PathBuf,
    /// The space searched (built-in name or file).
    #[arg(long, default_value = "cnn")]
    space: String,
    /// Trials per run.
    #[arg(long, default_value_t = 12)]
    budget: usize,
    /// Seeds per strategy.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Training epochs per candidate.
    #[arg(long, default_value_t = 8)]
    epochs: usize,
    /// Where candidates are timed.
    #[command(flatten)]
    runtime: crate::runtime::RuntimeOpts,
}

const STRATEGIES: [&str; 5] = ["random", "grid", "evolution", "bo", "rl"];

pub fn run(args: Args) -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("xtask has a parent folder")?;
    let work = root.join("target/nas-report");
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let space = if std::path::Path::new(&args.space).is_file() {
        Space::from_file(std::path::Path::new(&args.space))?
    } else {
        Space::builtin(&args.space)?
    };
    let rt = args.runtime.build()?;
    let data = digits(crate::DIGITS_SPLIT_SEED, &Device::Cpu)?;
    let mut runs: Vec<(String, u64, SearchLog)> = Vec::new();
    let bar = crate::progress((STRATEGIES.len() as u64) * args.seeds * args.budget as u64, "nas");
    for name in STRATEGIES {
        let strategy = match name.parse::<Strategy>()? {
            // A population that leaves most of a small budget to evolution proper.
            Strategy::Evolution { .. } => Strategy::Evolution { population: 5, sample: 2 },
            other => other,
        };
        for seed in 1..=args.seeds {
            bar.set_message(format!("{name} seed {seed}"));
            let mut eval = DigitsEvaluator::new(&data, rt.clone(), args.epochs, seed)?;
            let config = SearchConfig {
                strategy,
                budget: args.budget,
                seed,
                objective: Objective::default(),
                evaluator: eval.describe(),
            };
            // Epochs shape every trial but are not part of the search config: keep them in the name.
            let log_path =
                work.join(format!("{}-e{}-{name}-{seed}.json", args.space.replace(['/', '.'], "_"), args.epochs));
            let before =
                std::fs::read_to_string(&log_path).ok().and_then(|t| serde_json::from_str::<SearchLog>(&t).ok());
            bar.inc(before.map_or(0, |l| l.trials.len()) as u64);
            let log = search(&space, &config, &mut eval, Some(&log_path), &mut |_| bar.inc(1))?;
            runs.push((name.to_string(), seed, log));
        }
    }
    bar.finish_and_clear();
    // The hand-designed demo CNN, trained and timed the same way, once per seed.
    let demo = DigitsArch::default_cnn();
    let mut baseline = Vec::new();
    for seed in 1..=args.seeds {
        let mut eval = DigitsEvaluator::new(&data, rt.clone(), args.epochs, seed)?;
        baseline.push(eval.measure(&demo, usize::MAX)?);
    }
    write(&args, &runs, &baseline)
}

fn write(args: &Args, runs: &[(String, u64, SearchLog)], baseline: &[pare_nas::Metrics]) -> anyhow::Result<()> {
    let out = &args.out;
    std::fs::create_dir_all(out)?;
    let bv: Vec<f64> = baseline.iter().map(|m| m.validation).collect();
    let bt: Vec<f64> = baseline.iter().map(|m| m.test).collect();
    let b_lat = mean_sd(&baseline.iter().map(|m| m.latency_ms).collect::<Vec<_>>()).0;
    let b_bytes = baseline.first().map_or(0, |m| m.bytes);
    let mut md = format!(
        "# Architecture search on the digits\n\nRegenerate: `cargo xtask nas-report --space {} --budget {} --seeds {} --epochs {}` (trial logs kept in target/nas-report/, so an interrupted report resumes). Every strategy gets the same budget of {} trials per seed on the built-in `{}` space; each candidate is trained for {} epoch(s) from scratch (seeded by run seed and trial), and its single-image latency is the median of 31 forward passes on `{}`. The best model of a run is its best validation accuracy; test accuracy is only reported. Settings: evolution with a population of 5 and tournaments of 2, bo (TPE) after 5 random trials with γ = 0.25 and 24 draws, rl (REINFORCE) with step 0.5 and a moving-average baseline. With the same seed, random, evolution and bo draw the same first trials (common random numbers), so their curves coincide until the model-based strategies take over.\n\n\
The hand-designed demo CNN `cnn:16,32:64`, trained the same way: validation {:.2}% ± {:.2}, test {:.2}% ± {:.2}, {:.3} ms, {} bytes.\n\n\
| strategy | best validation | its test accuracy | its MACs | its latency ms | its bytes | best architectures (per seed) |\n|---|---:|---:|---:|---:|---:|---|\n",
        args.space,
        args.budget,
        args.seeds,
        args.epochs,
        args.budget,
        args.space,
        args.epochs,
        args.runtime.runtime,
        100.0 * mean_sd(&bv).0,
        100.0 * mean_sd(&bv).1,
        100.0 * mean_sd(&bt).0,
        100.0 * mean_sd(&bt).1,
        b_lat,
        b_bytes,
    );
    let mut summary = Vec::new();
    for name in STRATEGIES {
        let bests: Vec<&Trial> = runs.iter().filter(|r| r.0 == name).filter_map(|r| r.2.best()).collect();
        let get = |f: &dyn Fn(&Trial) -> f64| mean_sd(&bests.iter().map(|t| f(t)).collect::<Vec<_>>());
        let (v, t) = (get(&|t| t.metrics.validation), get(&|t| t.metrics.test));
        let (macs, lat, bytes) =
            (get(&|t| t.metrics.macs as f64), get(&|t| t.metrics.latency_ms), get(&|t| t.metrics.bytes as f64));
        md.push_str(&format!(
            "| {name} | {:.2}% ± {:.2} | {:.2}% ± {:.2} | {:.0} | {:.3} | {:.0} | {} |\n",
            100.0 * v.0,
            100.0 * v.1,
            100.0 * t.0,
            100.0 * t.1,
            macs.0,
            lat.0,
            bytes.0,
            bests.iter().map(|b| format!("`{}`", b.arch)).collect::<Vec<_>>().join(", ")
        ));
        summary.push(serde_json::json!({"strategy": name, "best_validation": v, "best_test": t, "macs": macs.0, "latency_ms": lat.0, "bytes": bytes.0,
            "best": bests.iter().map(|b| b.arch.clone()).collect::<Vec<_>>()}));
    }
    let random = mean_sd(
        &runs
            .iter()
            .filter(|r| r.0 == "random")
            .filter_map(|r| r.2.best())
            .map(|t| t.metrics.validation)
            .collect::<Vec<_>>(),
    );
    let better: Vec<&str> = STRATEGIES[1..]
        .iter()
        .copied()
        .filter(|n| {
            mean_sd(
                &runs
                    .iter()
                    .filter(|r| r.0 == *n)
                    .filter_map(|r| r.2.best())
                    .map(|t| t.metrics.validation)
                    .collect::<Vec<_>>(),
            )
            .0 > random.0 + random.1
        })
        .collect();
    md.push_str(&format!(
        "\nAgainst random search ({:.2}% ± {:.2}): {}.\n",
        100.0 * random.0,
        100.0 * random.1,
        if better.is_empty() {
            "no strategy's mean best validation accuracy is more than one of random's standard deviations above it — at this budget random search is as good as the model-based strategies, as the literature warns".to_string()
        } else {
            format!("{} beat it by more than one of its standard deviations", better.join(", "))
        }
    ));
    // The pooled multi-objective view.
    let pooled: Vec<Trial> = runs.iter().flat_map(|r| r.2.trials.iter().cloned()).collect();
    let front = pareto_front(&pooled);
    let bval = mean_sd(&bv).0;
    let dominating: Vec<&Trial> = pooled
        .iter()
        .filter(|t| {
            t.metrics.validation >= bval && (t.metrics.latency_ms <= 0.5 * b_lat || t.metrics.bytes * 2 <= b_bytes)
        })
        .collect();
    md.push_str(&format!(
        "\n## Accuracy against latency, all {} trials pooled\n\nPareto front (validation ↑, latency ↓, bytes ↓): {}.\n\nCandidates at least as accurate (validation) as the demo CNN's mean with ≤ 50% of its latency or bytes: {}.\n",
        pooled.len(),
        front.iter().map(|&i| format!("`{}` ({:.2}%, {:.3} ms, {} B)", pooled[i].arch, 100.0 * pooled[i].metrics.validation, pooled[i].metrics.latency_ms, pooled[i].metrics.bytes)).collect::<Vec<_>>().join(", "),
        if dominating.is_empty() {
            "none in this budget".to_string()
        } else {
            let mut names: Vec<String> = dominating.iter().map(|t| format!("`{}` ({:.2}%, {:.3} ms, {} B)", t.arch, 100.0 * t.metrics.validation, t.metrics.latency_ms, t.metrics.bytes)).collect();
            names.dedup();
            names.join(", ")
        }
    ));
    md.push_str("\n![mean best validation accuracy against trials](nas-report.svg)\n");
    plot(runs, &out.join("nas-report.svg"))?;
    let json = serde_json::to_vec_pretty(&serde_json::json!({
        "strategies": summary,
        "baseline": baseline,
        "runs": runs.iter().map(|r| serde_json::json!({"strategy": r.0, "seed": r.1, "log": r.2})).collect::<Vec<_>>(),
    }))?;
    pare_core_tensor::io::write_file_atomic(out.join("nas-report.json"), &json)?;
    pare_core_tensor::io::write_file_atomic(out.join("nas-report.md"), md.as_bytes())?;
    println!("{md}");
    println!("wrote {}/nas-report.md, .json and .svg", out.display());
    Ok(())
}

fn plot(runs: &[(String, u64, SearchLog)], path: &std::path::Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("svg.tmp");
    let budget = runs.iter().map(|r| r.2.trials.len()).max().unwrap_or(1);
    let curves: Vec<(&str, Vec<(f64, f64)>)> = STRATEGIES
        .iter()
        .map(|&name| {
            let logs: Vec<Vec<Option<f64>>> = runs.iter().filter(|r| r.0 == name).map(|r| r.2.best_so_far()).collect();
            let pts = (0..budget)
                .filter_map(|i| {
                    let v: Vec<f64> = logs.iter().filter_map(|l| l.get(i).copied().flatten()).collect();
                    (!v.is_empty()).then(|| ((i + 1) as f64, 100.0 * mean_sd(&v).0))
                })
                .collect();
            (name, pts)
        })
        .collect();
    let lo = curves.iter().flat_map(|c| c.1.iter().map(|p| p.1)).fold(100.0, f64::min) - 0.5;
    let hi = curves.iter().flat_map(|c| c.1.iter().map(|p| p.1)).fold(0.0, f64::max) + 0.5;
    {
        let root = SVGBackend::new(&tmp, (860, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("best validation accuracy so far (mean over seeds)", ("sans-serif", 20))
            .margin(20)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.5..(budget as f64 + 0.5), lo..hi.min(100.0))?;
        chart.configure_mesh().x_desc("trials").y_desc("validation accuracy, %").light_line_style(WHITE).draw()?;
        for (k, (name, pts)) in curves.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
