//! `cargo xtask prune`: unstructured (magnitude, random, Wanda, SparseGPT; layer-wise or one
//! global threshold; N:M), gradual and structured pruning (neurons, channels, heads, layers)
//! of a digits model or a sentence-transformers folder, with fine-tuning for the digits, a
//! per-layer table, the quality against the original and the speed on the chosen runtime.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use candle_core::Device;
use candle_nn::VarMap;
use pare_core_tensor::calib::InputNormObserver;
use pare_core_tensor::data::{DigitsSplit, digits, sentences};
use pare_core_tensor::io::META_RECIPE;
use pare_core_tensor::metrics::mean_cosine;
use pare_core_tensor::select::Selection;
use pare_core_tensor::train::{LrSchedule, OptimizerKind, TrainConfig, TrainTask, train};
use pare_core_tensor::{Hooks, LoadedWeights, Module, Runtime};
use pare_models::bert::SentenceEncoder;
use pare_models::digits::{DigitsNet, META_MODEL, Supervised};
use pare_prune::structured::{GroupStats, Importance, Structured, Unit, drop_layers, importance, prune_units_each};
use pare_prune::{Bounds, Calibration, Criterion, Cubic, MaskedTask, Override, Pattern, Pruned};

/// Arguments of `cargo xtask prune`.
#[derive(clap::Args)]
pub struct Args {
    /// A pare digits model file or a sentence-transformers folder (MiniLM).
    #[arg(long)]
    model: PathBuf,
    /// Output file (digits) or folder (model folder).
    #[arg(long)]
    out: PathBuf,
    /// magnitude, random, wanda, sparsegpt (unstructured, or N:M with --pattern), nm:N:M
    /// (magnitude N:M), or structured: neurons, channels, heads, layers.
    #[arg(long, default_value = "magnitude")]
    method: String,
    /// Fraction of weights (or of each group's units, for structured methods) to remove, in
    /// [0, 1). N:M patterns imply 1 − N/M.
    #[arg(long)]
    sparsity: Option<f64>,
    /// N:M semi-structured pattern for magnitude, wanda or sparsegpt, e.g. nm:2:4.
    #[arg(long)]
    pattern: Option<String>,
    /// One magnitude threshold across the selected layers instead of one per layer.
    #[arg(long)]
    global: bool,
    /// With --global: the least sparsity any layer gets.
    #[arg(long, default_value_t = 0.0)]
    global_min: f64,
    /// With --global: the most sparsity any layer gets.
    #[arg(long, default_value_t = 0.99)]
    global_max: f64,
    /// Gradual pruning (digits): reach the sparsity in this many magnitude pruning steps on
    /// Zhu & Gupta's cubic schedule over the first three quarters of the fine-tuning.
    #[arg(long)]
    gradual: Option<usize>,
    /// Fine-tuning epochs after pruning (digits), masks held fixed.
    #[arg(long, default_value_t = 0)]
    finetune: usize,
    /// Fine-tuning learning rate (AdamW, cosine decay).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seed of the fine-tuning shuffles and of random pruning.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Structured methods: how units are ranked — l1, l2, activation (calibration) or taylor
    /// (gradients, digits).
    #[arg(long, default_value = "l2")]
    importance: String,
    /// SparseGPT's Hessian dampening (fraction of the mean diagonal).
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// Calibration text, one sentence per line (model folders; digits calibrate on the
    /// training split).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration examples (sentences or digits).
    #[arg(long, default_value_t = 128)]
    calib_size: usize,
    /// Evaluation text for a model folder: mean cosine of the pruned embeddings to the
    /// original's, and the speed of both. Digits are evaluated on the embedded test split.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Prune only layers matching these globs (or `re:` regexes); by default every linear and
    /// convolution except the classifier.
    #[arg(long = "layers")]
    layers: Vec<String>,
    /// Leave these layers alone.
    #[arg(long = "exclude")]
    exclude: Vec<String>,
    /// Per-layer sparsity (repeatable; the last matching override wins): `GLOB=SPARSITY` or,
    /// for unstructured methods, `GLOB=nm:N:M`, e.g. `layers.0=0.3` or
    /// `encoder.layer.*.output.dense=nm:2:4`; 0 leaves a layer alone. Structured methods match
    /// the glob against each group's layer (`encoder.layer.3`, `layers.0`, `conv1`).
    #[arg(long = "override")]
    overrides: Vec<String>,
    /// Before pruning, a sensitivity scan: each selected layer alone pruned by magnitude at
    /// these sparsities (comma-separated, e.g. 0.5,0.7,0.9), with the metric each gives
    /// (validation accuracy for the digits, mean cosine on the calibration text for a folder).
    #[arg(long, value_delimiter = ',')]
    sensitivity: Vec<f64>,
    /// Also write the run's figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The runtime the original and pruned models are timed and evaluated on.
    #[command(flatten)]
    runtime: crate::runtime::RuntimeOpts,
}

/// Checks the options without loading anything (for recipes, before any stage runs).
pub fn check(args: &Args) -> anyhow::Result<()> {
    plan(args).map(|_| ())
}

/// What the command line asked for, parsed and checked.
enum Plan {
    Unstructured(Criterion, Pattern, Vec<Override>),
    Structured(Unit, Importance, f64, Vec<Override>),
}

fn parse_nm(s: &str) -> anyhow::Result<(usize, usize)> {
    let parts: Vec<&str> = s.strip_prefix("nm:").map(|r| r.split(':').collect()).unwrap_or_default();
    match parts.as_slice() {
        [n, m] => Ok((n.parse().context("N of N:M")?, m.parse().context("M of N:M")?)),
        _ => bail!("expected an N:M pattern like nm:2:4, found `{s}`"),
    }
}

fn plan(a: &Args) -> anyhow::Result<Plan> {
    let sparsity = || a.sparsity.context("--sparsity S is needed for this method");
    let structured = ["neurons", "channels", "heads", "layers"];
    let overrides = a.overrides.iter().map(|o| Override::parse(o)).collect::<pare_core_tensor::Result<Vec<_>>>()?;
    if structured.contains(&a.method.as_str()) {
        if a.pattern.is_some() || a.global || a.gradual.is_some() {
            bail!("--pattern, --global and --gradual apply to unstructured methods, not `{}`", a.method);
        }
        let s = sparsity()?;
        pare_prune::select::check_sparsity("--sparsity", s)?;
        let unit: Unit = a.method.parse()?;
        if unit == Unit::Layers && !overrides.is_empty() {
            bail!("--override sets a sparsity per layer or group; `--method layers` removes whole layers by one count");
        }
        if let Some(o) = overrides.iter().find(|o| matches!(o.pattern, Pattern::Nm { .. })) {
            bail!(
                "--override `{}`: structured pruning removes whole units; give a sparsity, not an N:M pattern",
                o.glob
            );
        }
        return Ok(Plan::Structured(unit, a.importance.parse()?, s, overrides));
    }
    let (criterion, nm) = match a.method.as_str() {
        "magnitude" => (Criterion::Magnitude, None),
        "random" => (Criterion::Random { seed: a.seed }, None),
        "wanda" => (Criterion::Wanda, None),
        "sparsegpt" => (Criterion::SparseGpt { damp: a.damp }, None),
        m if m.starts_with("nm:") => (Criterion::Magnitude, Some(parse_nm(m)?)),
        other => bail!(
            "--method: expected magnitude, random, wanda, sparsegpt, nm:N:M, neurons, channels, heads or layers, found `{other}`"
        ),
    };
    let nm = match (nm, &a.pattern) {
        (Some(_), Some(_)) => bail!("give the N:M pattern once: --method nm:N:M or --pattern nm:N:M"),
        (Some(p), None) => Some(p),
        (None, Some(p)) => Some(parse_nm(p)?),
        (None, None) => None,
    };
    let pattern = match nm {
        Some((n, m)) => {
            if a.sparsity.is_some() || a.global {
                bail!("an N:M pattern fixes the sparsity at 1 − N/M: drop --sparsity and --global");
            }
            Pattern::Nm { n, m }
        }
        None => {
            let s = sparsity()?;
            pare_prune::select::check_sparsity("--sparsity", s)?;
            let global = a.global.then_some(Bounds { min: a.global_min, max: a.global_max });
            Pattern::Unstructured { sparsity: s, global }
        }
    };
    if a.gradual.is_some() && (criterion != Criterion::Magnitude || nm.is_some() || a.global) {
        bail!("--gradual grows layer-wise magnitude masks; it takes --method magnitude without --pattern or --global");
    }
    if a.gradual.is_some() && a.finetune == 0 {
        bail!("--gradual prunes during fine-tuning: give --finetune EPOCHS (≥ 1)");
    }
    if a.global && !overrides.is_empty() {
        bail!(
            "--override sets layer-wise sparsities; --global ranks every layer together under one threshold: use one or the other"
        );
    }
    if a.gradual.is_some()
        && let Some(o) = overrides.iter().find(|o| matches!(o.pattern, Pattern::Nm { .. }))
    {
        bail!("--override `{}`: --gradual grows magnitude masks layer-wise; it takes sparsities, not N:M", o.glob);
    }
    Ok(Plan::Unstructured(criterion, pattern, overrides))
}

pub(crate) fn lines(path: &Path, limit: usize, what: &str) -> anyhow::Result<Vec<String>> {
    let mut l = sentences(path).with_context(|| format!("read {what} `{}`", path.display()))?;
    l.truncate(limit);
    if l.is_empty() {
        bail!("{what} `{}` is empty: expected at least one line", path.display());
    }
    Ok(l)
}

/// Median seconds of `a` and `b` over `reps` alternating runs (after one warm-up each).
pub(crate) fn median_pair(
    reps: usize,
    mut a: impl FnMut() -> anyhow::Result<()>,
    mut b: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64)> {
    a()?;
    b()?;
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = std::time::Instant::now();
        a()?;
        ta.push(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        b()?;
        tb.push(t.elapsed().as_secs_f64());
    }
    ta.sort_by(f64::total_cmp);
    tb.sort_by(f64::total_cmp);
    Ok((ta[reps / 2], tb[reps / 2]))
}

/// One table row: a layer (or unit group) before and after.
pub struct Row {
    name: String,
    detail: String,
    before: usize,
    after: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let json = args.json.clone();
    let (rows, quality, mut report) = execute(args)?;
    print_rows(&rows);
    for q in &quality {
        println!("{q}");
    }
    if let Some(p) = &json {
        report.insert("command".into(), serde_json::json!(std::env::args().skip(1).collect::<Vec<_>>()));
        report.insert("quality".into(), serde_json::json!(quality));
        let text = serde_json::to_vec_pretty(&serde_json::Value::Object(report))?;
        pare_core_tensor::io::write_file_atomic(p, &text).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}

/// One run's table rows, quality lines and JSON figures.
pub type Outcome = (Vec<Row>, Vec<String>, serde_json::Map<String, serde_json::Value>);

/// Runs one prune and returns its table rows, its quality lines (the last says where the
/// model went) and its figures for JSON.
pub fn execute(args: Args) -> anyhow::Result<Outcome> {
    let plan = plan(&args)?;
    let rt = args.runtime.build()?;
    if args.out.exists() && args.out.canonicalize().ok() == args.model.canonicalize().ok() {
        bail!("--out `{}` is the input model: write the pruned model elsewhere", args.out.display());
    }
    let recipe = format!(
        "pare prune --method {} --sparsity {:?} --pattern {:?} --global {} --gradual {:?} --finetune {} --importance {} --seed {} --override {:?}",
        args.method,
        args.sparsity,
        args.pattern,
        args.global,
        args.gradual,
        args.finetune,
        args.importance,
        args.seed,
        args.overrides
    );
    let meta = BTreeMap::from([(META_RECIPE.to_string(), recipe)]);
    let selection = Selection { include: args.layers.clone(), exclude: args.exclude.clone() };
    let mut report = serde_json::Map::new();
    let (rows, quality) = if args.model.is_dir() {
        folder(&args, &plan, &selection, &rt, &meta, &mut report)?
    } else {
        let meta_file = pare_core_tensor::io::load_weights(&args.model, &Device::Cpu)
            .with_context(|| format!("read {}", args.model.display()))?
            .1;
        if !meta_file.contains_key(META_MODEL) {
            bail!(
                "`{}` is not a pare digits model (no `{META_MODEL}` metadata) nor a model folder",
                args.model.display()
            );
        }
        digits_model(&args, &plan, &selection, &rt, &meta, &mut report)?
    };
    let mut quality = quality;
    quality.push(format!("wrote {}", args.out.display()));
    Ok((rows, quality, report))
}

/// A sensitivity scan's lines (one per layer) and JSON, when `--sensitivity` asks for one.
fn scan<M: Module + Clone>(
    args: &Args,
    model: &M,
    paths: &[String],
    metric: &mut dyn FnMut(&M) -> pare_core_tensor::Result<f64>,
    report: &mut serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<Vec<String>> {
    if args.sensitivity.is_empty() {
        return Ok(Vec::new());
    }
    let bar = crate::progress((paths.len() * args.sensitivity.len()) as u64, "scan");
    let mut counted = |m: &M| {
        bar.inc(1);
        metric(m)
    };
    let points = pare_prune::sensitivity(model, paths, &args.sensitivity, Criterion::Magnitude, &mut counted)?;
    bar.finish_and_clear();
    report.insert("sensitivity".into(), serde_json::to_value(&points)?);
    Ok(paths
        .iter()
        .map(|p| {
            let cells: Vec<String> = points
                .iter()
                .filter(|s| &s.path == p)
                .map(|s| format!("{:.0}% → {:.4}", 100.0 * s.sparsity, s.metric))
                .collect();
            format!("sensitivity of {p} alone: {}", cells.join(", "))
        })
        .collect())
}

fn print_rows(rows: &[Row]) {
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(5).max(5);
    println!("{:<w$}  {:>10}  {:>10}  {:>8}", "layer", "before", "after", "removed");
    for r in rows {
        let removed = 1.0 - r.after as f64 / r.before.max(1) as f64;
        println!("{:<w$}  {:>10}  {:>10}  {:>7.2}%  {}", r.name, r.before, r.after, 100.0 * removed, r.detail);
    }
    let (b, a) = rows.iter().fold((0, 0), |(b, a), r| (b + r.before, a + r.after));
    println!("{:<w$}  {:>10}  {:>10}  {:>7.2}%", "total", b, a, 100.0 * (1.0 - a as f64 / b.max(1) as f64));
}

fn unit_rows(stats: &[GroupStats]) -> Vec<Row> {
    stats
        .iter()
        .map(|s| Row {
            name: s.name.clone(),
            detail: format!("removed {:?}", s.removed),
            before: s.before,
            after: s.kept,
        })
        .collect()
}

fn weight_rows(p: &Pruned, formats: &[(String, String)]) -> Vec<Row> {
    p.stats
        .iter()
        .map(|s| Row {
            name: s.path.clone(),
            detail: formats.iter().find(|(f, _)| *f == s.path).map(|(_, d)| d.clone()).unwrap_or_default(),
            before: s.params,
            after: s.params - s.pruned,
        })
        .collect()
}

fn train_cfg(args: &Args, epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        optimizer: OptimizerKind::adamw(args.lr),
        schedule: LrSchedule::Cosine { warmup_steps: 0, min_factor: 0.05 },
        seed: args.seed,
        patience: None,
        checkpoint: None,
    }
}

/// Fine-tunes `net` (rebuilt with trainable weights) on the digits, keeping `masks` (by
/// parameter name) fixed or growing them on `schedule`; returns the tuned net and the masks.
fn finetune_digits(
    args: &Args,
    net: &DigitsNet,
    data: &DigitsSplit,
    masks: &BTreeMap<String, Vec<bool>>,
    schedule: Option<(usize, &BTreeMap<String, f64>)>,
) -> anyhow::Result<(DigitsNet, BTreeMap<String, Vec<bool>>)> {
    let varmap = VarMap::new();
    let tuned = DigitsNet::build(
        net.arch().clone(),
        &mut LoadedWeights::trainable(net.named_weights(), Device::Cpu, varmap.clone()),
    )?;
    let cfg = train_cfg(args, args.finetune);
    let steps = cfg.epochs * data.train.len().div_ceil(cfg.batch_size);
    let mut inner = Supervised::new(&tuned, data);
    let mut task = MaskedTask::new(&mut inner, &varmap, masks)?;
    if let Some((n, targets)) = schedule {
        // The schedule runs to the largest target; each layer follows it scaled to its own.
        let top = targets.values().copied().fold(0.0, f64::max);
        task = task.gradual(Cubic::over(steps, n, top)?).with_targets(targets)?;
    }
    let bar = crate::progress(steps as u64, "fine-tune");
    let rep = train(&mut task, &varmap, data.train.len(), &cfg, &mut |e| {
        if let pare_core_tensor::train::TrainEvent::Step { .. } = e {
            bar.inc(1);
        }
    })?;
    bar.finish_and_clear();
    let masks = task.masks()?;
    tracing::info!(best_epoch = rep.best_epoch, metric = rep.best_metric, "fine-tuned");
    Ok((tuned, masks))
}

fn digits_model(
    args: &Args,
    plan: &Plan,
    selection: &Selection,
    rt: &Arc<dyn Runtime>,
    meta: &BTreeMap<String, String>,
    report: &mut serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let dev = Device::Cpu;
    let float = DigitsNet::load(&args.model, &dev)?;
    let data = digits(crate::DIGITS_SPLIT_SEED, &dev)?;
    let calib = data.train.select(&(0..args.calib_size.min(data.train.len()) as u32).collect::<Vec<_>>())?;
    let run_calib = |n: &DigitsNet, hooks: &mut Hooks<'_>| -> pare_core_tensor::Result<usize> {
        for b in calib.batches(64)? {
            n.forward_hooked(&b.x, hooks).map_err(pare_models::Error::into_core)?;
        }
        Ok(calib.len())
    };
    let mut scan_lines = Vec::new();
    let (mut net, rows) = match *plan {
        Plan::Unstructured(criterion, pattern, ref overrides) => {
            let paths = selection.resolve(&float)?;
            let layers = pare_prune::per_layer(&paths, pattern, overrides)?;
            let cal = Calibration::collect(&paths, criterion, &mut |h| run_calib(&float, h))?;
            scan_lines = scan(
                args,
                &float,
                &paths,
                &mut |m: &DigitsNet| m.accuracy(&data.validation).map_err(pare_models::Error::into_core),
                report,
            )?;
            let mut net = float.clone();
            let pruned = if let Some(n) = args.gradual {
                // Masks start empty and grow by magnitude during fine-tuning, each layer to its
                // own target.
                pare_prune::check_each(&float, &layers, criterion, Some(&cal))?;
                let masks = paths
                    .iter()
                    .map(|p| -> anyhow::Result<(String, Vec<bool>)> {
                        Ok((format!("{p}.weight"), vec![true; float.layer(p)?.parameters()[0].1.numel()]))
                    })
                    .collect::<anyhow::Result<_>>()?;
                let targets: BTreeMap<String, f64> =
                    layers.iter().map(|(p, pat)| (format!("{p}.weight"), pat.sparsity())).collect();
                let (tuned, masks) = finetune_digits(args, &float, &data, &masks, Some((n, &targets)))?;
                net = tuned;
                masks_to_pruned(&net, &layers, &masks)?
            } else {
                let pruned = pare_prune::plan_each(&net, &layers, criterion, Some(&cal), &mut |_| {})?;
                pare_prune::apply(&mut net, &pruned)?;
                if args.finetune > 0 {
                    let masks = pruned.masks.iter().map(|(p, m)| (format!("{p}.weight"), m.clone())).collect();
                    let (tuned, masks) = finetune_digits(args, &net, &data, &masks, None)?;
                    net = tuned;
                    masks_to_pruned(&net, &layers, &masks)?
                } else {
                    pruned
                }
            };
            let formats = pare_prune::store_sparse_each(&mut net, &pruned, &layers)?;
            report.insert("sparsity".into(), pruned.sparsity().into());
            report.insert("layers".into(), serde_json::to_value(&pruned.stats)?);
            (net, weight_rows(&pruned, &formats))
        }
        Plan::Structured(unit, how, s, ref overrides) => {
            let groups = float.groups(unit)?;
            let sparsities = pare_prune::per_group(&groups, s, overrides)?;
            let norms = (how == Importance::Activation)
                .then(|| -> anyhow::Result<InputNormObserver> {
                    let consumers: Vec<String> = groups.iter().map(|g| g.consumer.0.clone()).collect();
                    let mut obs = InputNormObserver::new(&consumers);
                    run_calib(&float, &mut Hooks::with(&mut obs))?;
                    Ok(obs)
                })
                .transpose()?;
            let grads = (how == Importance::Taylor).then(|| digits_grads(&float, &calib)).transpose()?;
            let scores = importance(&float, &groups, how, norms.as_ref(), grads.as_ref())?;
            let (small, stats) = prune_units_each(&float, unit, &sparsities, &scores)?;
            let small =
                if args.finetune > 0 { finetune_digits(args, &small, &data, &BTreeMap::new(), None)?.0 } else { small };
            report.insert("groups".into(), serde_json::to_value(&stats)?);
            (small, unit_rows(&stats))
        }
    };
    // Quality and speed on the runtime, against the original on the same runtime.
    let mut orig = float.clone();
    orig.prepare(rt)?;
    net.prepare(rt)?;
    let (fa, pa) = (orig.accuracy(&data.test)?, net.accuracy(&data.test)?);
    let macs = |n: &DigitsNet| -> anyhow::Result<u64> {
        let mut m = pare_core_tensor::metrics::MacCounter::default();
        n.forward_hooked(&data.test.x.narrow(0, 0, 1)?, &mut Hooks::with(&mut m))?;
        Ok(m.total())
    };
    let (macs_o, macs_p) = (macs(&orig)?, macs(&net)?);
    report.insert("macs".into(), macs_p.into());
    report.insert("original_macs".into(), macs_o.into());
    let x = &data.test.x;
    let (t_orig, t_pruned) = median_pair(
        15,
        || orig.forward(x).map(drop).map_err(Into::into),
        || net.forward(x).map(drop).map_err(Into::into),
    )?;
    net.save(&args.out, meta, &[args.model.as_path()])?;
    let (bytes_o, bytes_p) = (std::fs::metadata(&args.model)?.len(), std::fs::metadata(&args.out)?.len());
    for (k, v) in [("accuracy", pa), ("original_accuracy", fa), ("seconds", t_pruned), ("original_seconds", t_orig)] {
        report.insert(k.into(), v.into());
    }
    report.insert("params".into(), net.parameter_count().into());
    report.insert("original_params".into(), float.parameter_count().into());
    report.insert("file_bytes".into(), bytes_p.into());
    report.insert("original_file_bytes".into(), bytes_o.into());
    Ok((
        rows,
        scan_lines
            .into_iter()
            .chain([
                format!(
                    "test accuracy {:.2}% (original {:.2}%, {:+.2} points) on {} digits",
                    100.0 * pa,
                    100.0 * fa,
                    100.0 * (pa - fa),
                    data.test.len()
                ),
                format!(
                    "parameters {} → {}; file {} → {} bytes ({:.2}× smaller); MACs per image {} → {}",
                    float.parameter_count(),
                    net.parameter_count(),
                    bytes_o,
                    bytes_p,
                    bytes_o as f64 / bytes_p as f64,
                    macs_o,
                    macs_p
                ),
                format!(
                    "forward of the {} test digits on `{}`: {:.3} ms vs original {:.3} ms (speed ratio {:.2}×)",
                    data.test.len(),
                    args.runtime.runtime,
                    t_pruned * 1e3,
                    t_orig * 1e3,
                    t_orig / t_pruned
                ),
            ])
            .collect(),
    ))
}

/// `Pruned` for weights whose masks (by parameter name) came from fine-tuning.
fn masks_to_pruned(
    net: &DigitsNet,
    layers: &[(String, Pattern)],
    masks: &BTreeMap<String, Vec<bool>>,
) -> anyhow::Result<Pruned> {
    let mut out = Pruned::default();
    for (p, pattern) in layers {
        let requested = pattern.sparsity();
        let keep = masks.get(&format!("{p}.weight")).with_context(|| format!("no mask for `{p}`"))?;
        let w = net.layer(p)?.parameters()[0].1.to_dense(&Device::Cpu)?;
        let mut v = w.flatten_all()?.to_vec1::<f32>()?;
        v.iter_mut().zip(keep).for_each(|(x, k)| {
            if !k {
                *x = 0.0
            }
        });
        let pruned = keep.iter().filter(|k| !**k).count();
        out.stats.push(pare_prune::LayerStats {
            path: p.clone(),
            shape: w.dims().to_vec(),
            params: v.len(),
            pruned,
            requested,
        });
        out.masks.insert(p.clone(), keep.clone());
        out.shapes.insert(p.clone(), w.dims().to_vec());
        out.values.insert(p.clone(), v);
    }
    Ok(out)
}

/// Gradients of the cross-entropy on `calib` for every parameter of `net`, by name.
fn digits_grads(
    net: &DigitsNet,
    calib: &pare_core_tensor::data::Examples,
) -> anyhow::Result<BTreeMap<String, Vec<f32>>> {
    let varmap = VarMap::new();
    let t = DigitsNet::build(
        net.arch().clone(),
        &mut LoadedWeights::trainable(net.named_weights(), Device::Cpu, varmap.clone()),
    )?;
    let split = DigitsSplit { train: calib.clone(), validation: calib.clone(), test: calib.clone() };
    let mut task = Supervised::new(&t, &split);
    let all: Vec<u32> = (0..calib.len() as u32).collect();
    let loss = task.loss(&all)?;
    let grads = loss.backward()?;
    let data = varmap.data().lock().expect("varmap lock poisoned");
    let out = data
        .iter()
        .map(|(n, v)| -> anyhow::Result<(String, Vec<f32>)> {
            let g = match grads.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.as_tensor().zeros_like()?,
            };
            Ok((n.clone(), g.flatten_all()?.to_vec1::<f32>()?))
        })
        .collect();
    drop(data);
    out
}

fn folder(
    args: &Args,
    plan: &Plan,
    selection: &Selection,
    rt: &Arc<dyn Runtime>,
    meta: &BTreeMap<String, String>,
    report: &mut serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let dev = Device::Cpu;
    if args.finetune > 0 || args.gradual.is_some() {
        bail!(
            "--finetune and --gradual need a training task: they are built for digits models (a model folder has no labels to fine-tune on: repair it by distillation, `cargo xtask distill --teacher ORIGINAL --student PRUNED_FOLDER`)"
        );
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out `{}` must be a folder for a model folder", args.out.display());
    }
    let float = SentenceEncoder::load(&args.model, &dev).with_context(|| format!("load {}", args.model.display()))?;
    let needs_calib = match plan {
        Plan::Unstructured(c, _, _) => matches!(c, Criterion::Wanda | Criterion::SparseGpt { .. }),
        Plan::Structured(u, i, _, _) => *i == Importance::Activation || *u == Unit::Layers,
    };
    let calib = match (&args.calib, needs_calib) {
        (Some(p), _) => lines(p, args.calib_size, "calibration file")?,
        (None, true) => bail!("--calib FILE (sentences) is needed for this method on a model folder"),
        (None, false) => Vec::new(),
    };
    if matches!(plan, Plan::Structured(_, Importance::Taylor, _, _)) {
        bail!("--importance taylor needs labels: it is built for digits models; use l1, l2 or activation");
    }
    let eval = args.eval.as_deref().map(|p| lines(p, usize::MAX, "evaluation file")).transpose()?;
    if !args.sensitivity.is_empty() && calib.is_empty() {
        bail!("--sensitivity on a model folder measures the cosine on the calibration text: give --calib FILE");
    }
    let mut scan_lines = Vec::new();
    let mut enc = float.clone();
    let rows = match *plan {
        Plan::Unstructured(criterion, pattern, ref overrides) => {
            let paths = selection.resolve(&enc.bert)?;
            let layers = pare_prune::per_layer(&paths, pattern, overrides)?;
            // Every layer's weight against its pattern before the calibration pass (the
            // criterion's own needs are checked once the calibration is in).
            pare_prune::check_each(&enc.bert, &layers, Criterion::Magnitude, None)?;
            let bar = crate::progress(0, "calibrate");
            let cal = Calibration::collect(&paths, criterion, &mut |h| {
                float.embed_hooked(&calib, 32, h, &mut |_| bar.tick()).map_err(pare_models::Error::into_core)?;
                Ok(calib.len())
            })?;
            bar.finish_and_clear();
            // The full model's calibration embeddings, only when a scan compares against them.
            let reference =
                if args.sensitivity.is_empty() { None } else { Some(float.embed(&calib, 32, &mut |_| {})?) };
            scan_lines = scan(
                args,
                &float.bert,
                &paths,
                &mut |m: &pare_models::bert::BertEncoder| {
                    let mut e = float.clone();
                    e.bert = m.clone();
                    let want = reference.as_ref().expect("computed when a scan runs");
                    mean_cosine(want, &e.embed(&calib, 32, &mut |_| {}).map_err(pare_models::Error::into_core)?)
                },
                report,
            )?;
            let bar = crate::progress(paths.len() as u64, criterion.name());
            let pruned = pare_prune::plan_each(&enc.bert, &layers, criterion, Some(&cal), &mut |p| {
                bar.inc(1);
                bar.set_message(p.to_string());
            })?;
            bar.finish_and_clear();
            pare_prune::apply(&mut enc.bert, &pruned)?;
            let formats = pare_prune::store_sparse_each(&mut enc.bert, &pruned, &layers)?;
            report.insert("sparsity".into(), pruned.sparsity().into());
            report.insert("layers".into(), serde_json::to_value(&pruned.stats)?);
            weight_rows(&pruned, &formats)
        }
        Plan::Structured(Unit::Layers, _, s, _) => {
            // Sensitivity: the cosine to the full model's embeddings when each layer alone is
            // dropped; the layers whose absence costs least go.
            let n = float.bert.config().num_hidden_layers;
            let full = float.embed(&calib, 32, &mut |_| {})?;
            let bar = crate::progress(n as u64, "layers");
            let mut cos = Vec::new();
            for l in 0..n {
                let mut e = float.clone();
                e.bert = drop_layers(&float.bert, &[l])?;
                cos.push(mean_cosine(&full, &e.embed(&calib, 32, &mut |_| {})?)?);
                bar.inc(1);
            }
            bar.finish_and_clear();
            let k = pare_prune::select::count(s, n);
            if k >= n {
                bail!("--sparsity {s} would remove all {n} layers; at least one stays");
            }
            let scores: Vec<f32> = cos.iter().map(|c| -(*c as f32)).collect();
            let remove = pare_prune::select::lowest(&scores, k);
            enc.bert = drop_layers(&float.bert, &remove)?;
            report.insert("layer_sensitivity_cosine".into(), serde_json::json!(cos));
            (0..n)
                .map(|l| Row {
                    name: format!("encoder.layer.{l}"),
                    detail: format!(
                        "cosine without it {:.4}{}",
                        cos[l],
                        if remove.contains(&l) { ", removed" } else { "" }
                    ),
                    before: 1,
                    after: usize::from(!remove.contains(&l)),
                })
                .collect()
        }
        Plan::Structured(unit, how, s, ref overrides) => {
            let groups = float.bert.groups(unit)?;
            let sparsities = pare_prune::per_group(&groups, s, overrides)?;
            let norms = (how == Importance::Activation)
                .then(|| -> anyhow::Result<InputNormObserver> {
                    let consumers: Vec<String> = groups.iter().map(|g| g.consumer.0.clone()).collect();
                    let mut obs = InputNormObserver::new(&consumers);
                    float.embed_hooked(&calib, 32, &mut Hooks::with(&mut obs), &mut |_| {})?;
                    Ok(obs)
                })
                .transpose()?;
            let scores = importance(&float.bert, &groups, how, norms.as_ref(), None)?;
            let (small, stats) = prune_units_each(&float.bert, unit, &sparsities, &scores)?;
            enc.bert = small;
            report.insert("groups".into(), serde_json::to_value(&stats)?);
            unit_rows(&stats)
        }
    };
    enc.bert.save_folder(&args.model, &args.out, meta).with_context(|| format!("write {}", args.out.display()))?;
    // Read the folder back as a user would: it must load and give the pruned embeddings.
    let back = SentenceEncoder::load(&args.out, &dev).with_context(|| format!("reload {}", args.out.display()))?;
    let mut quality = scan_lines;
    quality.push(format!(
        "parameters {} → {} ({:.2}× fewer); weights {} → {} bytes",
        float.bert.parameter_count(),
        back.bert.parameter_count(),
        float.bert.parameter_count() as f64 / back.bert.parameter_count() as f64,
        float.bert.storage_bytes(),
        back.bert.storage_bytes()
    ));
    report.insert("params".into(), back.bert.parameter_count().into());
    report.insert("original_params".into(), float.bert.parameter_count().into());
    report.insert("bytes".into(), back.bert.storage_bytes().into());
    report.insert("original_bytes".into(), float.bert.storage_bytes().into());
    if let Some(eval) = eval {
        let (mut a, mut b) = (float.clone(), back);
        a.bert.prepare(rt)?;
        b.bert.prepare(rt)?;
        let (ea, eb) = (a.embed(&eval, 32, &mut |_| {})?, b.embed(&eval, 32, &mut |_| {})?);
        let cos = mean_cosine(&ea, &eb)?;
        let batch: Vec<String> = eval.iter().take(32).cloned().collect();
        let (ta, tb) = median_pair(
            5,
            || a.embed(&batch, 32, &mut |_| {}).map(drop).map_err(Into::into),
            || b.embed(&batch, 32, &mut |_| {}).map(drop).map_err(Into::into),
        )?;
        quality.push(format!("{} sentences: mean cosine to the original embeddings {cos:.5}", eval.len()));
        quality.push(format!(
            "embedding {} sentences on `{}`: {:.1} ms vs original {:.1} ms (speed ratio {:.2}×)",
            batch.len(),
            args.runtime.runtime,
            tb * 1e3,
            ta * 1e3,
            ta / tb
        ));
        for (k, v) in [("mean_cosine", cos), ("seconds", tb), ("original_seconds", ta)] {
            report.insert(k.into(), v.into());
        }
    }
    Ok((rows, quality))
}
