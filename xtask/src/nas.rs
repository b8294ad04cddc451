//! `cargo xtask nas`: architecture search over a digits space with a strategy and a budget,
//! each candidate trained briefly and timed on the runtime; the trial log (resumed when it
//! exists), a Markdown summary and two SVG plots (best validation accuracy against trials, and
//! the accuracy/latency Pareto front with the hand-designed baseline) go to `--out`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::Device;
use pare_core_tensor::data::digits;
use pare_models::digits::DigitsArch;
use pare_nas::evaluate::DigitsEvaluator;
use pare_nas::{Objective, SearchConfig, SearchLog, Space, Strategy, Trial, hypervolume_2d, pareto_front, search};
use plotters::prelude::*;

/// Arguments of `cargo xtask nas`.
#[derive(clap::Args)]
pub struct Args {
    /// A built-in space (`mlp`, `cnn`) or a TOML/JSON space file.
    #[arg(long, default_value = "cnn")]
    space: String,
    /// random, grid, evolution (regularized), bo (TPE) or rl (REINFORCE).
    #[arg(long, default_value = "evolution")]
    strategy: String,
    /// Candidates to evaluate.
    #[arg(long, default_value_t = 20)]
    budget: usize,
    /// `acc` (the most accurate feasible model) or `acc,latency` (the Pareto front).
    #[arg(long, default_value = "acc,latency")]
    objective: String,
    /// Only models whose single-image latency is at most this many milliseconds are feasible.
    #[arg(long)]
    latency_max: Option<f64>,
    /// Only models whose weights take at most this many bytes are feasible.
    #[arg(long)]
    bytes_max: Option<usize>,
    /// Training epochs per candidate.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Seed of the proposals and the candidates' training.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The hand-designed model the results are compared with (evaluated the same way).
    #[arg(long, default_value = "cnn:16,32:64")]
    baseline: DigitsArch,
    /// Folder for trials.json (resumed if present), nas-report.md and the plots.
    #[arg(long)]
    out: PathBuf,
    /// Where candidates are timed.
    #[command(flatten)]
    runtime: crate::runtime::RuntimeOpts,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Everything is checked before the first candidate trains.
    let space = if Path::new(&args.space).is_file() {
        Space::from_file(Path::new(&args.space))?
    } else {
        Space::builtin(&args.space).with_context(|| format!("--space `{}`: not a file", args.space))?
    };
    let strategy: Strategy = args.strategy.parse()?;
    let multi = match args.objective.as_str() {
        "acc" => false,
        "acc,latency" => true,
        other => bail!("--objective: expected acc or acc,latency, found `{other}`"),
    };
    let objective = Objective { latency_max_ms: args.latency_max, bytes_max: args.bytes_max };
    strategy.validate()?;
    objective.validate()?;
    if args.budget == 0 {
        bail!("--budget must be at least 1 trial, found 0");
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out `{}` must be a folder", args.out.display());
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let rt = args.runtime.build()?;
    let data = digits(crate::DIGITS_SPLIT_SEED, &Device::Cpu)?;
    let mut eval = DigitsEvaluator::new(&data, rt, args.epochs, args.seed)?;
    let config = SearchConfig { strategy, budget: args.budget, seed: args.seed, objective, evaluator: eval.describe() };

    let bar = crate::progress(args.budget as u64, "nas");
    let log_path = args.out.join("trials.json");
    let mut best = f64::NEG_INFINITY;
    let log = search(&space, &config, &mut eval, Some(&log_path), &mut |t| {
        bar.inc(1);
        if t.feasible {
            best = best.max(t.metrics.validation);
        }
        bar.set_message(format!("{} val {:.3} (best {best:.3})", t.arch, t.metrics.validation));
    })?;
    bar.finish_and_clear();
    let baseline = eval.measure(&args.baseline, usize::MAX)?;
    let baseline = Trial {
        index: usize::MAX,
        candidate: Vec::new(),
        arch: args.baseline.to_string(),
        feasible: objective.feasible(&baseline),
        metrics: baseline,
        seconds: 0.0,
    };
    let md = summary(&args, &log, &baseline, multi);
    plot_curve(&log, &args.out.join("best-vs-trials.svg"))?;
    plot_front(&log, &baseline, &args.out.join("pareto.svg"))?;
    pare_core_tensor::io::write_file_atomic(args.out.join("nas-report.md"), md.as_bytes())?;
    println!("{md}");
    println!("wrote {}/{{trials.json, nas-report.md, best-vs-trials.svg, pareto.svg}}", args.out.display());
    Ok(())
}

fn row(t: &Trial) -> String {
    let m = &t.metrics;
    format!(
        "| {} | `{}` | {:.2}% | {:.2}% | {} | {} | {} | {:.3} | {} |",
        if t.index == usize::MAX { "baseline".to_string() } else { (t.index + 1).to_string() },
        t.arch,
        100.0 * m.validation,
        100.0 * m.test,
        m.params,
        m.bytes,
        m.macs,
        m.latency_ms,
        if t.feasible { "yes" } else { "no" }
    )
}

fn summary(args: &Args, log: &SearchLog, baseline: &Trial, multi: bool) -> String {
    let head = "| trial | architecture | validation | test | params | bytes | MACs | latency ms | feasible |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n";
    let mut md = format!(
        "# Architecture search on the digits\n\nCommand: `cargo xtask nas --space {} --strategy {} --budget {} --objective {} --epochs {} --seed {}{}{} --out {}` — {} trials{}; each candidate trained {} epochs from scratch; latency = median single-image forward on `{}`.\n\n",
        args.space,
        args.strategy,
        args.budget,
        args.objective,
        args.epochs,
        args.seed,
        args.latency_max.map(|l| format!(" --latency-max {l}")).unwrap_or_default(),
        args.bytes_max.map(|b| format!(" --bytes-max {b}")).unwrap_or_default(),
        args.out.display(),
        log.trials.len(),
        if log.exhausted { " (the space is exhausted)" } else { "" },
        args.epochs,
        args.runtime.runtime,
    );
    match log.best() {
        Some(b) => md.push_str(&format!(
            "**Best feasible by validation accuracy:** `{}`.\n\n{head}{}\n{}\n",
            b.arch,
            row(b),
            row(baseline)
        )),
        None => md.push_str("**No feasible architecture**: no candidate met the constraints.\n\n"),
    }
    if multi {
        let front = pareto_front(&log.trials);
        let worst = log.trials.iter().chain([baseline]).map(|t| t.metrics.latency_ms).fold(0.0, f64::max) * 1.1;
        let pts: Vec<(f64, f64)> =
            front.iter().map(|&i| (log.trials[i].metrics.validation, log.trials[i].metrics.latency_ms)).collect();
        md.push_str(&format!(
            "\n## Pareto front (validation accuracy ↑, latency ↓, bytes ↓)\n\nHypervolume of (accuracy, latency) against (0, {worst:.3} ms): {:.4}.\n\n{head}",
            hypervolume_2d(&pts, 0.0, worst)
        ));
        for &i in &front {
            md.push_str(&row(&log.trials[i]));
            md.push('\n');
        }
        let b = &baseline.metrics;
        let dominating: Vec<&Trial> = log
            .trials
            .iter()
            .filter(|t| {
                t.metrics.validation >= b.validation
                    && (t.metrics.latency_ms <= 0.5 * b.latency_ms || t.metrics.bytes * 2 <= b.bytes)
            })
            .collect();
        md.push_str(&format!(
            "\nAgainst the baseline `{}` (validation {:.2}%, {:.3} ms, {} bytes): {} candidates are at least as accurate with ≤ 50% of its latency or bytes{}.\n",
            baseline.arch,
            100.0 * b.validation,
            b.latency_ms,
            b.bytes,
            dominating.len(),
            dominating.first().map(|t| format!(", e.g. `{}` ({:.2}%, {:.3} ms, {} bytes)", t.arch, 100.0 * t.metrics.validation, t.metrics.latency_ms, t.metrics.bytes)).unwrap_or_default()
        ));
    }
    md.push_str(&format!("\n## Every trial\n\n{head}"));
    for t in &log.trials {
        md.push_str(&row(t));
        md.push('\n');
    }
    md.push_str(
        "\n![best validation accuracy against trials](best-vs-trials.svg)\n![accuracy against latency](pareto.svg)\n",
    );
    md
}

fn svg_done(tmp: &Path, path: &Path) -> anyhow::Result<()> {
    std::fs::rename(tmp, path).with_context(|| format!("write {}", path.display()))
}

fn plot_curve(log: &SearchLog, path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("svg.tmp");
    let pts: Vec<(f64, f64)> =
        log.best_so_far().iter().enumerate().filter_map(|(i, b)| b.map(|b| ((i + 1) as f64, 100.0 * b))).collect();
    let lo = pts.iter().map(|p| p.1).fold(100.0, f64::min) - 1.0;
    {
        let root = SVGBackend::new(&tmp, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{} search: best validation accuracy", log.config.strategy), ("sans-serif", 20))
            .margin(20)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.5..(log.trials.len() as f64 + 0.5), lo..100.0)?;
        chart
            .configure_mesh()
            .x_desc("trials")
            .y_desc("best feasible validation accuracy, %")
            .light_line_style(WHITE)
            .draw()?;
        chart.draw_series(LineSeries::new(pts.iter().copied(), BLUE.stroke_width(2)))?;
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))?;
        root.present()?;
    }
    svg_done(&tmp, path)
}

fn plot_front(log: &SearchLog, baseline: &Trial, path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("svg.tmp");
    let front = pareto_front(&log.trials);
    let all = log.trials.iter().chain([baseline]);
    let xmax = all.clone().map(|t| t.metrics.latency_ms).fold(0.0, f64::max) * 1.1;
    let ymin = all.map(|t| 100.0 * t.metrics.validation).fold(100.0, f64::min) - 1.0;
    {
        let root = SVGBackend::new(&tmp, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("accuracy against measured latency", ("sans-serif", 20))
            .margin(20)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..xmax, ymin..100.0)?;
        chart
            .configure_mesh()
            .x_desc("latency of one image, ms")
            .y_desc("validation accuracy, %")
            .light_line_style(WHITE)
            .draw()?;
        chart
            .draw_series(
                log.trials.iter().map(|t| {
                    Circle::new((t.metrics.latency_ms, 100.0 * t.metrics.validation), 3, BLUE.mix(0.4).filled())
                }),
            )?
            .label("trials")
            .legend(|(x, y)| Circle::new((x + 8, y), 3, BLUE.mix(0.4).filled()));
        let fp: Vec<(f64, f64)> = front
            .iter()
            .map(|&i| (log.trials[i].metrics.latency_ms, 100.0 * log.trials[i].metrics.validation))
            .collect();
        chart
            .draw_series(LineSeries::new(fp.iter().copied(), RED.stroke_width(2)))?
            .label("Pareto front")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(2)));
        chart.draw_series(fp.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
        let b = (baseline.metrics.latency_ms, 100.0 * baseline.metrics.validation);
        chart
            .draw_series([EmptyElement::at(b)
                + TriangleMarker::new((0, 0), 7, BLACK.filled())
                + Text::new(baseline.arch.clone(), (8, -8), ("sans-serif", 12).into_font())])?
            .label("hand-designed baseline")
            .legend(|(x, y)| TriangleMarker::new((x + 8, y), 5, BLACK.filled()));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    svg_done(&tmp, path)
}
