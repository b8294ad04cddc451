//! `cargo xtask nas`: architecture search over a digits space with a strategy and a budget,
//! each candidate trained briefly and timed on the runtime; the trial log (resumed when it
//! exists), a Markdown summary and two SVG plots (best validation accuracy against trials, and
//! the accuracy/latency Pareto front with the hand-designed baseline) go to `--out`.
//!
//! On a cell space, `--strategy darts` trains a DARTS supernet and evaluates the most probable
//! cells (the derived one first), and `--evaluator one-shot` scores every candidate on the
//! weights it inherits from a supernet trained once with uniformly drawn paths.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::Device;
use pare_core_tensor::data::digits;
use pare_models::bert::SentenceEncoder;
use pare_models::digits::DigitsArch;
use pare_nas::evaluate::{DigitsEvaluator, EncoderEvaluator};
use pare_nas::search::Evaluator;
use pare_nas::space::{EncoderArch, SpaceKind};
use pare_nas::supernet::{EpochLog, OneShotEvaluator, SupernetConfig, darts_search};
use pare_nas::{Objective, SearchConfig, SearchLog, Space, Strategy, Trial, hypervolume_2d, pareto_front, search};
use plotters::prelude::*;

/// Arguments of `cargo xtask nas`.
#[derive(clap::Args)]
pub struct Args {
    /// A built-in space (`mlp`, `cnn`, `cell`, `encoder`) or a TOML/JSON space file.
    #[arg(long, default_value = "cnn")]
    space: String,
    /// random, grid, evolution (regularized), bo (TPE), rl (REINFORCE) or darts (cell spaces).
    #[arg(long, default_value = "evolution")]
    strategy: String,
    /// How candidates are scored: `train` (each trained from scratch for --epochs) or
    /// `one-shot` (inherited weights of a supernet trained once; cell spaces).
    #[arg(long, default_value = "train")]
    evaluator: String,
    /// Epochs of supernet training (darts, one-shot).
    #[arg(long, default_value_t = 30)]
    supernet_epochs: usize,
    /// Adam learning rate of DARTS' architecture weights.
    #[arg(long, default_value_t = 1e-2)]
    arch_lr: f64,
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
    /// Encoder spaces: the pretrained sentence-transformers folder whose sub-networks are
    /// searched (default: `PARE_MINILM_DIR`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Encoder spaces: sentences to score on (split 70/15/15 as `distill` does; the validation
    /// and test parts are used).
    #[arg(long, default_value = "data/sentences.txt")]
    sentences: PathBuf,
    /// The hand-designed model the results are compared with (evaluated the same way; for
    /// encoder spaces the full pretrained model is the baseline).
    #[arg(long, default_value = "cnn:16,32:64")]
    baseline: DigitsArch,
    /// Folder for trials.json (resumed if present), nas-report.md and the plots.
    #[arg(long)]
    out: PathBuf,
    /// Where candidates are timed.
    #[command(flatten)]
    runtime: crate::runtime::RuntimeOpts,
}

/// What the command line asked for, checked.
struct Plan {
    space: Space,
    strategy: Strategy,
    multi: bool,
    objective: Objective,
    supernet: SupernetConfig,
    one_shot: bool,
}

/// Checks the options (and reads a space file) without training anything; returns whether the
/// space searches sub-networks of a sentence encoder (for recipes, before any stage runs).
pub fn check(args: &Args) -> anyhow::Result<bool> {
    Ok(plan(args)?.space.kind == SpaceKind::Encoder)
}

fn plan(args: &Args) -> anyhow::Result<Plan> {
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
    let objective = Objective { latency_max_ms: args.latency_max, bytes_max: args.bytes_max, pareto: multi };
    let supernet = SupernetConfig {
        epochs: args.supernet_epochs,
        batch_size: 64,
        lr: 3e-3,
        arch_lr: args.arch_lr,
        seed: args.seed,
    };
    supernet.validate()?;
    let strategy = match strategy {
        Strategy::Darts(_) => Strategy::Darts(supernet),
        other => other,
    };
    let one_shot = match args.evaluator.as_str() {
        "train" => false,
        "one-shot" => true,
        other => bail!("--evaluator: expected train or one-shot, found `{other}`"),
    };
    if (one_shot || matches!(strategy, Strategy::Darts(_))) && space.kind != SpaceKind::DigitsCell {
        bail!(
            "--strategy darts and --evaluator one-shot need a cell space (`--space cell` or a digits_cell file), found {:?}",
            space.kind
        );
    }
    strategy.validate()?;
    objective.validate()?;
    if args.budget == 0 {
        bail!("--budget must be at least 1 trial, found 0");
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out `{}` must be a folder", args.out.display());
    }
    Ok(Plan { space, strategy, multi, objective, supernet, one_shot })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Everything is checked before the first candidate trains.
    let Plan { space, strategy, multi, objective, supernet, one_shot } = plan(&args)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let rt = args.runtime.build()?;
    let data = digits(crate::DIGITS_SPLIT_SEED, &Device::Cpu)?;
    let mut eval = DigitsEvaluator::new(&data, rt.clone(), args.epochs, args.seed)?;
    let model_dir = args.model.clone().or_else(|| std::env::var_os("PARE_MINILM_DIR").map(PathBuf::from));
    let mut encoder = if space.kind == SpaceKind::Encoder {
        let dir = model_dir.clone().context(
            "--space encoder searches sub-networks of a pretrained encoder: give --model DIR (a sentence-transformers folder such as all-MiniLM-L6-v2, fetched by ../shared/tools/fetch-minilm.sh) or set PARE_MINILM_DIR",
        )?;
        let teacher =
            SentenceEncoder::load(&dir, &Device::Cpu).with_context(|| format!("--model {}", dir.display()))?;
        let all = crate::prune::lines(&args.sentences, usize::MAX, "sentences file")?;
        let split = pare_distill::encoder::split_sentences(&all, crate::DIGITS_SPLIT_SEED)?;
        Some(EncoderEvaluator::new(teacher, split.validation, split.test, rt.clone())?)
    } else {
        None
    };
    let mut supernet_log: Vec<EpochLog> = Vec::new();
    let epoch_bar = |what: &str| crate::progress(args.supernet_epochs as u64, what);
    let mut shared = if one_shot {
        let bar = epoch_bar("one-shot supernet");
        let e = OneShotEvaluator::train(&space, &data, rt.clone(), supernet, &mut |e| {
            bar.inc(1);
            bar.set_message(format!("loss {:.3}, sampled paths val {:.3}", e.train_loss, e.validation));
        })?;
        bar.finish_and_clear();
        supernet_log = e.epochs.clone();
        Some(e)
    } else {
        None
    };
    let describe = match (&shared, &encoder) {
        (Some(e), _) => e.describe(),
        (_, Some(e)) => e.describe(),
        _ => eval.describe(),
    };
    let config = SearchConfig { strategy, budget: args.budget, seed: args.seed, objective, evaluator: describe };

    let log_path = args.out.join("trials.json");
    let mut best = f64::NEG_INFINITY;
    let bar = crate::progress(args.budget as u64, "nas");
    let mut on_trial = |t: &Trial| {
        bar.inc(1);
        if t.feasible {
            best = best.max(t.metrics.validation);
        }
        bar.set_message(format!("{} val {:.3} (best {best:.3})", t.arch, t.metrics.validation));
    };
    let evaluator: &mut dyn Evaluator = match (shared.as_mut(), encoder.as_mut()) {
        (Some(e), _) => e,
        (_, Some(e)) => e,
        _ => &mut eval,
    };
    let log = if let Strategy::Darts(_) = strategy {
        bar.set_message("training the DARTS supernet");
        let (log, epochs) = darts_search(
            &space,
            &config,
            &data,
            evaluator,
            Some(&log_path),
            &mut |e| {
                bar.set_message(format!(
                    "DARTS epoch {}: mixed val {:.3}, derived {}",
                    e.epoch, e.validation, e.derived
                ));
            },
            &mut on_trial,
        )?;
        supernet_log = epochs;
        log
    } else {
        search(&space, &config, evaluator, Some(&log_path), &mut on_trial)?
    };
    bar.finish_and_clear();
    if !supernet_log.is_empty() {
        let json = serde_json::to_vec_pretty(&supernet_log)?;
        pare_core_tensor::io::write_file_atomic(args.out.join("supernet.json"), &json)?;
    }
    let (baseline, baseline_arch) = match encoder.as_mut() {
        Some(e) => {
            let c = e.teacher_config().clone();
            let full = EncoderArch {
                layers: c.num_hidden_layers,
                heads: c.num_attention_heads,
                ffn: c.intermediate_size,
                hidden: c.hidden_size,
            };
            (e.measure(&full)?, full.to_string())
        }
        None => (eval.measure(&args.baseline, usize::MAX)?, args.baseline.to_string()),
    };
    let baseline = Trial {
        index: usize::MAX,
        candidate: Vec::new(),
        arch: baseline_arch,
        feasible: objective.feasible(&baseline),
        metrics: baseline,
        seconds: 0.0,
    };
    let mut md = summary(&args, &log, &baseline, multi, &supernet_log);
    if let (Some(e), Some(best)) = (encoder.as_ref(), log.best()) {
        // The chosen sub-network as a model folder, ready for distillation repair.
        let dir = model_dir.as_ref().context("the model folder was given")?;
        let sub = e.subnetwork(&log.space.decode_encoder(&best.candidate)?)?;
        let out = args.out.join("best-model");
        let meta = [("pare.nas".to_string(), best.arch.clone())].into_iter().collect();
        sub.bert.save_folder(dir, &out, &meta).with_context(|| format!("write {}", out.display()))?;
        md.push_str(&format!(
            "\nThe best feasible sub-network `{}` is saved as a model folder in `{}`; repair it by distillation from the full model with `cargo xtask distill --teacher {} --student {}`.\n",
            best.arch,
            out.display(),
            dir.display(),
            out.display()
        ));
    }
    if let (None, Some(best)) = (encoder.as_ref(), log.best()) {
        // The winner as a model file: trained again as its trial trained it (same seed, same
        // weights for a trained-from-scratch search; one-shot and DARTS winners get their
        // first training from scratch here).
        let arch: DigitsArch = best.arch.parse()?;
        let net = eval.train(&arch, best.index)?;
        let out = args.out.join("best-model.safetensors");
        let meta = [("pare.nas".to_string(), best.arch.clone())].into_iter().collect();
        net.save(&out, &meta, &[])?;
        md.push_str(&format!(
            "\nThe best feasible architecture `{}` (test accuracy {:.2}% after {} epochs) is saved in `{}`; distil the teacher into it with `cargo xtask distill --student {}`.\n",
            best.arch,
            100.0 * net.accuracy(&data.test)?,
            args.epochs,
            out.display(),
            out.display()
        ));
    }
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

fn summary(args: &Args, log: &SearchLog, baseline: &Trial, multi: bool, supernet: &[EpochLog]) -> String {
    let head = "| trial | architecture | validation | test | params | bytes | MACs | latency ms | feasible |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n";
    let one_shot = args.evaluator == "one-shot";
    let mut md = format!(
        "# Architecture search on the digits\n\nCommand: `cargo xtask nas --space {} --strategy {} --evaluator {}{} --budget {} --objective {} --epochs {} --seed {}{}{} --out {}` — {} trials{}; {}; latency = median single-image forward on `{}`.\n\n",
        args.space,
        args.strategy,
        args.evaluator,
        if supernet.is_empty() { String::new() } else { format!(" --supernet-epochs {}", args.supernet_epochs) },
        args.budget,
        args.objective,
        args.epochs,
        args.seed,
        args.latency_max.map(|l| format!(" --latency-max {l}")).unwrap_or_default(),
        args.bytes_max.map(|b| format!(" --bytes-max {b}")).unwrap_or_default(),
        args.out.display(),
        log.trials.len(),
        if log.exhausted { " (the space is exhausted)" } else { "" },
        if one_shot {
            format!(
                "each candidate scored on the weights it inherits from a one-shot supernet trained {} epochs (the baseline is trained {} epochs from scratch)",
                args.supernet_epochs, args.epochs
            )
        } else {
            format!("each candidate trained {} epochs from scratch", args.epochs)
        },
        args.runtime.runtime,
    );
    if let Some(last) = supernet.last() {
        if last.derived.is_empty() {
            md.push_str(&format!(
                "One-shot supernet: {} epochs; final training loss {:.3}; mean validation accuracy of 8 sampled cells {:.2}%.\n\n",
                supernet.len(),
                last.train_loss,
                100.0 * last.validation
            ));
        } else {
            md.push_str(&format!(
                "DARTS supernet: {} epochs (first-order; weights and α on alternate halves of the training split). Final mixed-network validation accuracy {:.2}%; derived cell `{}`. Trials below are the most probable cells under α, the derived one first, each trained from scratch.\n\n| epoch | loss | mixed val | derived cell |\n|---:|---:|---:|---|\n",
                supernet.len(),
                100.0 * last.validation,
                last.derived
            ));
            for e in supernet.iter().filter(|e| e.epoch == 1 || e.epoch % 5 == 0 || e.epoch == supernet.len()) {
                md.push_str(&format!(
                    "| {} | {:.3} | {:.2}% | `{}` |\n",
                    e.epoch,
                    e.train_loss,
                    100.0 * e.validation,
                    e.derived
                ));
            }
            md.push_str("\nFinal operation probabilities per edge (softmax α):\n\n| edge | none | skip | conv1x1 | conv3x3 | avg3x3 |\n|---|---:|---:|---:|---:|---:|\n");
            let edges = log.space.choices.iter().filter(|c| c.name.starts_with("edge."));
            for (c, p) in edges.zip(&last.probabilities) {
                let mut cells = ["–".to_string(), "–".into(), "–".into(), "–".into(), "–".into()];
                for (&o, &v) in c.options.iter().zip(p) {
                    cells[o] = format!("{v:.3}");
                }
                md.push_str(&format!("| {} | {} |\n", c.name, cells.join(" | ")));
            }
            md.push('\n');
        }
    }
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

pub(crate) fn svg_done(tmp: &Path, path: &Path) -> anyhow::Result<()> {
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

/// Accuracy against measured latency: every trial, the accuracy/latency front as a staircase,
/// the 3-objective front's members, and the baseline (shared with `nas-cell-report`).
pub(crate) fn plot_front(log: &SearchLog, baseline: &Trial, path: &Path) -> anyhow::Result<()> {
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
        // The accuracy/latency front as a staircase; the (accuracy, latency, bytes) front as dots
        // (a smaller model can be on it without being faster or more accurate).
        let mut by_latency: Vec<(f64, f64)> =
            log.trials.iter().map(|t| (t.metrics.latency_ms, 100.0 * t.metrics.validation)).collect();
        by_latency.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut stairs: Vec<(f64, f64)> = Vec::new();
        for (l, a) in by_latency {
            if stairs.last().is_none_or(|&(_, best)| a > best) {
                if let Some(&(_, best)) = stairs.last() {
                    stairs.push((l, best));
                }
                stairs.push((l, a));
            }
        }
        chart
            .draw_series(LineSeries::new(stairs, RED.stroke_width(2)))?
            .label("front of accuracy and latency")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(2)));
        let fp: Vec<(f64, f64)> = front
            .iter()
            .map(|&i| (log.trials[i].metrics.latency_ms, 100.0 * log.trials[i].metrics.validation))
            .collect();
        chart
            .draw_series(fp.iter().map(|&p| Circle::new(p, 4, RED.filled())))?
            .label("front of accuracy, latency and bytes")
            .legend(|(x, y)| Circle::new((x + 8, y), 4, RED.filled()));
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
