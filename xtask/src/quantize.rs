//! `cargo xtask quantize`: quantization of a digits model, a sentence-transformers folder, or
//! any safetensors file tensor by tensor — weights (round to nearest, clipping search or GPTQ)
//! and, for known architectures, activations (dynamic per token, or static with an observer
//! over a calibration set) — with a per-layer error and size table and model-level quality.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::Device;
use pare_core_tensor::data::{Examples, digits, sentences};
use pare_core_tensor::io::{META_RECIPE, load_weights, save_weights};
use pare_core_tensor::metrics::{mean_cosine, retrieval_agreement};
use pare_core_tensor::train::{LrSchedule, OptimizerKind, TrainConfig};
use pare_core_tensor::{Granularity, ReferenceRuntime};
use pare_core_tensor::{Hooks, LayerKind, Module};
use pare_models::bert::SentenceEncoder;
use pare_models::digits::fit;
use pare_models::digits::{DigitsNet, META_MODEL};
use pare_quant::gguf::GgufType;
use pare_quant::gptq::{HessianObserver, collect_hessians};
use pare_quant::observer::ObserverKind;
use pare_quant::ptq::{ActSpec, apply, calibrate_smoothed, dynamic_specs};
use pare_quant::qat::QatConfig;
use pare_quant::smooth::{collect_channel_max, smooth_model};
use pare_quant::weight_only::{
    LayerReport, Method, Override, Selection, quantize_model_plan, quantize_tensors, select_tensors,
};

/// Arguments of `cargo xtask quantize`.
#[derive(clap::Args)]
pub struct Args {
    /// A pare digits model file, a sentence-transformers folder, or any safetensors file.
    #[arg(long)]
    model: PathBuf,
    /// Output file (for a file) or folder (for a model folder).
    #[arg(long)]
    out: PathBuf,
    /// int2..int8, nf4, quantile1..8, kmeans1..8, fp8-e4m3, fp8-e5m2, fp16, bf16.
    #[arg(long, default_value = "int8")]
    scheme: String,
    /// tensor, channel, or group:N (N elements of each row share a scale).
    #[arg(long, default_value = "channel")]
    granularity: String,
    /// Asymmetric integer weights (unsigned codes with a zero point) instead of symmetric.
    #[arg(long)]
    asymmetric: bool,
    /// How integer weights are rounded: rtn (to nearest), clip (per-group clipping search),
    /// gptq (error compensation from calibration Hessians; needs calibration data).
    #[arg(long, default_value = "rtn")]
    algo: String,
    /// weight-only, dynamic (activations ranged per token at run time), static (activation
    /// ranges calibrated and stored with the model) or qat (static, then quantization-aware
    /// fine-tuning of weights and learned step sizes; digits models).
    #[arg(long, default_value = "weight-only")]
    mode: String,
    /// Static mode's observer: minmax, moving-average (or moving-average:C for momentum C),
    /// percentile (or percentile:P, default 99.99), mse, entropy.
    #[arg(long, default_value = "mse")]
    observer: String,
    /// Bits of activation codes (dynamic and static modes).
    #[arg(long, default_value_t = 8)]
    act_bits: u8,
    /// Symmetric activation codes (dynamic mode uses them always).
    #[arg(long)]
    act_symmetric: bool,
    /// SmoothQuant migration strength α in [0, 1] (0.5 in the paper) for the linear layers'
    /// activations in dynamic and static modes; needs calibration data.
    #[arg(long)]
    smooth: Option<f32>,
    /// Calibration text, one sentence per line (model folders). Digits models calibrate on the
    /// embedded training split.
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration examples to use.
    #[arg(long, default_value_t = 128)]
    calib_size: usize,
    /// Evaluation text for a model folder: prints mean cosine and top-1 retrieval agreement
    /// of the quantized embeddings against the float ones. Digits models are always evaluated
    /// on the embedded test split.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Output format: pare (safetensors with packed codes), gguf (llama.cpp's blocks via
    /// candle; --scheme f16, q8_0, q4_0, q4_1, q4_k or q6_k) or compressed-tensors (the layout
    /// vLLM and transformers load; model folders, int2..int8).
    #[arg(long, default_value = "pare")]
    format: String,
    /// Quantize only layers matching these globs, or regexes after `re:` (repeatable); by
    /// default every linear and convolution except embeddings and the final classifier.
    #[arg(long = "layers")]
    layers: Vec<String>,
    /// Leave layers matching these globs (or `re:` regexes) in float (repeatable).
    #[arg(long = "exclude")]
    exclude: Vec<String>,
    /// A different method for some selected layers: `GLOB=SCHEME[,GRANULARITY[,ALGO]]`
    /// (repeatable; the last matching override wins), e.g.
    /// `encoder.layer.*.output.dense=int8,channel`.
    #[arg(long = "override")]
    overrides: Vec<String>,
    /// Precision of a sentence encoder's attention products: f32, or bf16 (operands rounded to
    /// bf16, sums in f32: half the multiply work on CPUs with AVX-512 BF16, each operand within
    /// 2⁻⁹ relative). Saved with the model (`pare_attention_precision` in config.json).
    #[arg(long, default_value = "f32")]
    attention: String,
    /// Also write the run's figures (options, per-layer table, totals, quality) as JSON here,
    /// for `cargo xtask quant-report`.
    #[arg(long)]
    json: Option<PathBuf>,
    /// QAT: fine-tuning epochs (the epoch with the best validation accuracy is kept).
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// QAT: peak learning rate of AdamW (weights and log step sizes).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// QAT: seed of the per-epoch shuffles (the data split is fixed, as in `train`).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop after checking the options (recipes check every stage before running any).
    #[arg(skip)]
    pub check_only: bool,
    /// The runtime the float and quantized models are evaluated on.
    #[command(flatten)]
    runtime: crate::runtime::RuntimeOpts,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    WeightOnly,
    Dynamic,
    Static,
    Qat,
}

/// Lines of a text file, at most `limit`, refusing an empty set.
fn text_lines(path: &Path, limit: usize, what: &str) -> anyhow::Result<Vec<String>> {
    let mut lines = sentences(path).with_context(|| format!("read {what} `{}`", path.display()))?;
    lines.truncate(limit);
    if lines.is_empty() {
        bail!("{what} `{}` is empty: expected at least one line", path.display());
    }
    Ok(lines)
}

impl Args {
    /// The `--attention` option as given (`f32` unless set).
    pub fn attention(&self) -> &str {
        &self.attention
    }
}

/// Checks the options without loading anything (for recipes, before any stage runs).
pub fn check(mut args: Args) -> anyhow::Result<()> {
    if args.format != "pare" {
        bail!("format `{}`: exports are not a recipe stage yet; quantize with the default format", args.format);
    }
    args.check_only = true;
    run(args)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let compressed_tensors = match args.format.as_str() {
        "pare" => false,
        "gguf" => return export_gguf(&args),
        "compressed-tensors" => true,
        other => bail!("--format: expected pare, gguf or compressed-tensors, found `{other}`"),
    };
    // Everything is checked before any long work starts.
    let eval_rt = args.runtime.build()?;
    let method = Method::parse(&args.scheme, &args.granularity, !args.asymmetric)?.with_algo(&args.algo)?;
    if compressed_tensors {
        if !args.model.is_dir() {
            bail!(
                "--format compressed-tensors writes a Hugging Face model folder: --model must be one (digits models save as pare or gguf)"
            );
        }
        if !matches!(method, Method::Int(_) | Method::IntClip(_) | Method::Gptq(..)) {
            bail!(
                "--format compressed-tensors holds integer weights: expected --scheme int2..int8, found `{}`",
                args.scheme
            );
        }
        if args.smooth.is_some() {
            bail!(
                "--format compressed-tensors has no place for SmoothQuant factors: drop --smooth, or use --format pare"
            );
        }
    }
    let mode = match args.mode.as_str() {
        "weight-only" => Mode::WeightOnly,
        "dynamic" => Mode::Dynamic,
        "static" => Mode::Static,
        "qat" => Mode::Qat,
        other => bail!("--mode: expected weight-only, dynamic, static or qat, found `{other}`"),
    };
    let observer = ObserverKind::parse(&args.observer)?;
    let attention = pare_core_tensor::AttentionPrecision::parse(&args.attention)?;
    // A recipe's later stages are checked before their input folders exist (compress checks
    // the kind of model for them).
    if attention != pare_core_tensor::AttentionPrecision::F32 && args.model.exists() && !args.model.is_dir() {
        bail!(
            "--attention {}: only a sentence-encoder folder has attention; `{}` is a file",
            args.attention,
            args.model.display()
        );
    }
    let act = ActSpec { bits: args.act_bits, symmetric: args.act_symmetric || mode == Mode::Dynamic };
    if mode != Mode::WeightOnly && !(2..=8).contains(&act.bits) {
        bail!("--act-bits: expected 2..=8, found {}", act.bits);
    }
    if args.smooth.is_some() && mode == Mode::WeightOnly {
        bail!("--smooth applies to activation quantization: use --mode dynamic or static");
    }
    let overrides =
        args.overrides.iter().map(|o| Override::parse(o, !args.asymmetric)).collect::<pare_quant::Result<Vec<_>>>()?;
    let any_gptq = method.needs_hessians() || overrides.iter().any(|o| o.method.needs_hessians());
    if !overrides.is_empty() && mode == Mode::Qat {
        bail!("--override does not apply to --mode qat (one learned width for every layer)");
    }
    if args.smooth.is_some() && any_gptq {
        // GPTQ would need the Hessian of the smoothed inputs, diag(1/s)·H·diag(1/s).
        bail!("--smooth with --algo gptq is not supported yet: use --algo rtn or clip");
    }
    let qat = match (&method, mode) {
        (_, m) if m != Mode::Qat => None,
        (Method::Int(spec), _)
            if spec.symmetric
                && matches!(spec.granularity, Granularity::PerChannel { axis: 0 } | Granularity::PerTensor) =>
        {
            Some(QatConfig { bits: spec.bits, per_channel: spec.granularity != Granularity::PerTensor })
        }
        _ => bail!(
            "--mode qat learns symmetric integer weights with one step per channel or per tensor: use --scheme \
             int2..int8, --granularity channel|tensor, no --asymmetric and --algo rtn (found --scheme {} \
             --granularity {}{} --algo {})",
            args.scheme,
            args.granularity,
            if args.asymmetric { " --asymmetric" } else { "" },
            args.algo
        ),
    };
    if qat.is_some() && args.smooth.is_some() {
        bail!("--smooth with --mode qat is not supported: QAT learns unsmoothed static input steps");
    }
    if qat.is_some() && (args.epochs == 0 || !(args.lr.is_finite() && args.lr > 0.0)) {
        bail!("--epochs must be ≥ 1 and --lr finite and > 0, found {} and {}", args.epochs, args.lr);
    }
    let needs_calib = matches!(mode, Mode::Static | Mode::Qat) || any_gptq || args.smooth.is_some();
    if needs_calib && args.calib_size == 0 {
        bail!("--calib-size: expected at least 1 calibration example, found 0");
    }
    let selection = Selection { include: args.layers.clone(), exclude: args.exclude.clone() };
    let recipe = format!(
        "quantize scheme={} granularity={} symmetric={} algo={} mode={} observer={} act_bits={} act_symmetric={} \
         smooth={:?} calib={:?} calib_size={} layers={:?} exclude={:?} epochs={} lr={} seed={} attention={}",
        args.scheme,
        args.granularity,
        !args.asymmetric,
        args.algo,
        args.mode,
        observer,
        act.bits,
        act.symmetric,
        args.smooth,
        args.calib,
        args.calib_size,
        args.layers,
        args.exclude,
        args.epochs,
        args.lr,
        args.seed,
        attention.name()
    );
    if args.check_only {
        return Ok(());
    }
    let meta = BTreeMap::from([(META_RECIPE.to_string(), recipe)]);
    let dev = Device::Cpu;
    let bar = crate::progress(0, "quantize");
    let mut on_layer = |r: &LayerReport| {
        bar.inc(1);
        bar.set_message(r.path.clone());
    };
    let mut quality = Vec::new();
    let mut metrics = serde_json::Map::new();
    // Layers whose inputs are quantized (a selected embedding gets weights only); QAT
    // quantizes the inputs of every layer it reports.
    let mut act_layers = None;
    let reports = if args.model.is_dir() {
        if mode == Mode::Qat {
            bail!(
                "--mode qat needs a training task: it is built for digits models; for a model folder use \
                 --mode static (with --smooth) or --algo gptq"
            );
        }
        if args.out.exists() && !args.out.is_dir() {
            bail!("--out `{}` must be a folder for a model folder", args.out.display());
        }
        let calib = match (&args.calib, needs_calib) {
            (Some(p), _) => text_lines(p, args.calib_size, "calibration file")?,
            (None, true) => {
                bail!("--calib FILE is needed for --mode static, --algo gptq and --smooth on a model folder")
            }
            (None, false) => Vec::new(),
        };
        let eval = args.eval.as_deref().map(|p| text_lines(p, usize::MAX, "evaluation file")).transpose()?;
        let float =
            SentenceEncoder::load(&args.model, &dev).with_context(|| format!("load {}", args.model.display()))?;
        let mut enc = float.clone();
        let paths = selection.resolve(&enc.bert)?;
        bar.set_length(paths.len() as u64);
        let run_calib = |e: &SentenceEncoder, hooks: &mut Hooks<'_>| -> pare_quant::Result<usize> {
            e.embed_hooked(&calib, 32, hooks, &mut |_| {})?;
            Ok(calib.len())
        };
        let hessians = gptq_hessians(any_gptq, &float.bert, &paths, &mut |h| run_calib(&float, h))?;
        // Activation quantization (and smoothing) applies to the inputs of linear layers; a
        // selected embedding table gets its weights quantized only (its inputs are token ids).
        let act_paths = of_kind(&enc.bert, &paths, &[LayerKind::Linear]);
        let factors = match args.smooth {
            Some(alpha) => {
                let amax = collect_channel_max(&act_paths, &mut |h| run_calib(&float, h))?;
                smooth_model(&mut enc.bert, &act_paths, &amax, alpha)?
            }
            None => BTreeMap::new(),
        };
        let reports =
            quantize_model_plan(&mut enc.bert, &method, &selection, &overrides, hessians.as_ref(), &mut on_layer)?;
        let specs = match mode {
            Mode::WeightOnly => BTreeMap::new(),
            Mode::Dynamic => with_factors(dynamic_specs(&enc.bert, &act_paths, act, true)?, &factors),
            // A smoothed model is only right once its specs divide the inputs: calibrate the
            // smoothed ranges on the float model.
            Mode::Static if !factors.is_empty() => {
                calibrate_smoothed(&act_paths, observer, act, &factors, &mut |h| run_calib(&float, h))?
            }
            Mode::Static | Mode::Qat => {
                calibrate_smoothed(&act_paths, observer, act, &factors, &mut |h| run_calib(&enc, h))?
            }
        };
        apply(&mut enc.bert, &specs)?;
        enc.bert.set_attention_precision(attention);
        act_layers = Some(specs.len());
        if let Some(eval) = eval {
            bar.set_message("evaluating");
            let mut float = float.clone();
            float.bert.prepare(&eval_rt)?;
            let mut enc = enc.clone();
            enc.bert.prepare(&eval_rt)?;
            let a = float.embed(&eval, 32, &mut |_| {})?;
            let b = enc.embed(&eval, 32, &mut |_| {})?;
            let (cos, agree) = (mean_cosine(&a, &b)?, retrieval_agreement(&a, &b)?);
            quality.push(format!(
                "{} sentences: mean cosine to float {cos:.5}, top-1 retrieval agreement {agree:.4}",
                eval.len()
            ));
            metrics.insert("mean_cosine".into(), cos.into());
            metrics.insert("top1_agreement".into(), agree.into());
            metrics.insert("eval_examples".into(), eval.len().into());
        }
        if compressed_tensors {
            enc.bert
                .save_folder_compressed_tensors(&args.model, &args.out, &meta)
                .with_context(|| format!("write {}", args.out.display()))?;
            // Read the folder back as a user would and check it computes the same embeddings.
            let back =
                SentenceEncoder::load(&args.out, &dev).with_context(|| format!("reload {}", args.out.display()))?;
            let probe: Vec<String> = calib.iter().take(16).cloned().collect();
            let probe =
                if probe.is_empty() { vec!["The quick brown fox jumps over the lazy dog.".to_string()] } else { probe };
            let (a, b) = (enc.embed(&probe, 32, &mut |_| {})?, back.embed(&probe, 32, &mut |_| {})?);
            let d = pare_core_tensor::testing::max_abs_diff(&a, &b)?;
            if d != 0.0 {
                bail!("the compressed-tensors folder reloads with embeddings {d} away from the quantized model");
            }
            quality.push(format!(
                "compressed-tensors folder ({}) reloads to identical embeddings",
                std::fs::read_to_string(args.out.join("config.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v["quantization_config"]["format"].as_str().map(String::from))
                    .unwrap_or_default()
            ));
        } else {
            enc.bert
                .save_folder(&args.model, &args.out, &meta)
                .with_context(|| format!("write {}", args.out.display()))?;
        }
        reports
    } else {
        let (mut weights, file_meta) = load_weights(&args.model, &dev)?;
        if let (Some(cfg), true) = (qat, file_meta.contains_key(META_MODEL)) {
            bar.finish_and_clear();
            let (reports, q, m) = qat_digits(&args, cfg, act, observer, &selection, &meta)?;
            quality.push(q);
            metrics.extend(m);
            reports
        } else if file_meta.contains_key(META_MODEL) {
            let float = DigitsNet::load(&args.model, &dev)?;
            let data = digits(crate::DIGITS_SPLIT_SEED, &dev)?;
            let calib: Examples =
                data.train.select(&(0..args.calib_size.min(data.train.len()) as u32).collect::<Vec<_>>())?;
            let mut net = float.clone();
            let paths = selection.resolve(&net)?;
            bar.set_length(paths.len() as u64);
            let run_calib = |n: &DigitsNet, hooks: &mut Hooks<'_>| -> pare_quant::Result<usize> {
                for b in calib.batches(64)? {
                    n.forward_hooked(&b.x, hooks)?;
                }
                Ok(calib.len())
            };
            let hessians = gptq_hessians(any_gptq, &float, &paths, &mut |h| run_calib(&float, h))?;
            let factors = match args.smooth {
                Some(alpha) => {
                    let linear = of_kind(&net, &paths, &[LayerKind::Linear]);
                    let amax = collect_channel_max(&linear, &mut |h| run_calib(&float, h))?;
                    smooth_model(&mut net, &linear, &amax, alpha)?
                }
                None => BTreeMap::new(),
            };
            let reports =
                quantize_model_plan(&mut net, &method, &selection, &overrides, hessians.as_ref(), &mut on_layer)?;
            let specs = match mode {
                Mode::WeightOnly => BTreeMap::new(),
                Mode::Dynamic => with_factors(dynamic_specs(&net, &paths, act, true)?, &factors),
                Mode::Static if !factors.is_empty() => {
                    calibrate_smoothed(&paths, observer, act, &factors, &mut |h| run_calib(&float, h))?
                }
                Mode::Static | Mode::Qat => {
                    calibrate_smoothed(&paths, observer, act, &factors, &mut |h| run_calib(&net, h))?
                }
            };
            apply(&mut net, &specs)?;
            act_layers = Some(specs.len());
            let (mut float, mut net) = (float.clone(), net.clone());
            float.prepare(&eval_rt)?;
            net.prepare(&eval_rt)?;
            let (fa, qa) = (float.accuracy(&data.test)?, net.accuracy(&data.test)?);
            metrics.insert("accuracy".into(), qa.into());
            metrics.insert("float_accuracy".into(), fa.into());
            quality.push(format!(
                "test accuracy {:.2}% (float {:.2}%, {:+.2} points) on {} digits",
                100.0 * qa,
                100.0 * fa,
                100.0 * (qa - fa),
                data.test.len()
            ));
            net.save(&args.out, &meta, &[args.model.as_path()])?;
            reports
        } else {
            if mode != Mode::WeightOnly || needs_calib {
                bail!(
                    "`{}` has no known architecture (no `{META_MODEL}` metadata, not a model folder): only \
                     weight-only modes without calibration work tensor by tensor",
                    args.model.display()
                );
            }
            bar.set_length(select_tensors(&weights, &args.layers)?.len() as u64);
            if !overrides.is_empty() {
                bail!("--override needs a known architecture; tensor by tensor, quantize in steps with --layers");
            }
            let reports = quantize_tensors(&mut weights, &method, &args.layers, &mut on_layer)?;
            save_weights(&args.out, &weights, &meta, &[args.model.as_path()])?;
            reports
        }
    };
    bar.finish_and_clear();
    print_table(&reports);
    let mut act_desc = String::new();
    if mode != Mode::WeightOnly {
        let kind = match mode {
            Mode::Dynamic => "dynamic per token".to_string(),
            Mode::Qat => format!("static (initialised by {observer}, steps learned by QAT)"),
            _ => format!("static ({observer})"),
        };
        act_desc = format!("int{} {} {kind}", act.bits, if act.symmetric { "symmetric" } else { "asymmetric" });
        println!("activations: {act_desc} on the inputs of {} layers", act_layers.unwrap_or(reports.len()));
    }
    for q in &quality {
        println!("{q}");
    }
    println!("wrote {}", args.out.display());
    let act_desc = (mode != Mode::WeightOnly).then_some(act_desc);
    write_run_json(args.json.as_deref(), &reports, act_desc, metrics)
}

/// `--json`: the run's options, per-layer table, totals, activation scheme and quality metrics.
fn write_run_json(
    path: Option<&Path>,
    reports: &[LayerReport],
    activations: Option<String>,
    metrics: serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    let (before, after): (usize, usize) =
        reports.iter().fold((0, 0), |(b, a), r| (b + r.bytes_before, a + r.bytes_after));
    let weights: usize = reports.iter().map(|r| r.shape.iter().product::<usize>()).sum();
    let run = serde_json::json!({
        "command": std::env::args().skip(1).collect::<Vec<_>>(),
        "layers": reports,
        "bytes_before": before,
        "bytes_after": after,
        "bits_per_weight": 8.0 * after as f64 / weights.max(1) as f64,
        "activations": activations,
        "metrics": metrics,
    });
    let text = serde_json::to_vec_pretty(&run)?;
    pare_core_tensor::io::write_file_atomic(path, &text).with_context(|| format!("write {}", path.display()))
}

/// `--mode qat` on a digits model: static PTQ as the starting point (weights at the MSE-optimal
/// steps, activation ranges from the observer), then LSQ fine-tuning on the training split,
/// then conversion to integer weights and static activation specs.
fn qat_digits(
    args: &Args,
    cfg: QatConfig,
    act: ActSpec,
    observer: ObserverKind,
    selection: &Selection,
    meta: &BTreeMap<String, String>,
) -> anyhow::Result<(Vec<LayerReport>, String, serde_json::Map<String, serde_json::Value>)> {
    let dev = Device::Cpu;
    let float = DigitsNet::load(&args.model, &dev)?;
    let data = digits(crate::DIGITS_SPLIT_SEED, &dev)?;
    let calib: Examples = data.train.select(&(0..args.calib_size.min(data.train.len()) as u32).collect::<Vec<_>>())?;
    let vars = candle_nn::VarMap::new();
    let mut net = DigitsNet::load_trainable(&args.model, &dev, &vars)?;
    let paths = selection.resolve(&net)?;
    let specs = calibrate_smoothed(&paths, observer, act, &BTreeMap::new(), &mut |hooks| {
        for b in calib.batches(64)? {
            net.forward_hooked(&b.x, hooks)?;
        }
        Ok(calib.len())
    })?;
    apply(&mut net, &specs)?;
    let rt = pare_quant::qat::prepare(&mut net, &vars, cfg, &paths)?;
    let start = net.accuracy(&data.test)?;
    let train = TrainConfig {
        epochs: args.epochs,
        batch_size: 32,
        optimizer: OptimizerKind::adamw(args.lr),
        schedule: LrSchedule::Cosine { warmup_steps: 20, min_factor: 0.05 },
        seed: args.seed,
        patience: None,
        checkpoint: None,
    };
    let bar = crate::progress((data.train.len().div_ceil(32) * args.epochs) as u64, "qat");
    let report = fit(&net, &vars, &data, &train, &mut crate::train::show_on(&bar))?;
    bar.finish_and_clear();
    let reference: std::sync::Arc<dyn pare_core_tensor::Runtime> = ReferenceRuntime::shared(dev.clone());
    let reports = pare_quant::qat::convert(&mut net, &rt, &reference)?;
    let (fa, qa) = (float.accuracy(&data.test)?, net.accuracy(&data.test)?);
    net.save(&args.out, meta, &[args.model.as_path()])?;
    let quality = format!(
        "test accuracy {:.2}% (float {:.2}%, {:+.2} points; PTQ starting point {:.2}%) after QAT epoch {} of {} on {} digits",
        100.0 * qa,
        100.0 * fa,
        100.0 * (qa - fa),
        100.0 * start,
        report.best_epoch + 1,
        report.history.len(),
        data.test.len()
    );
    let mut m = serde_json::Map::new();
    m.insert("accuracy".into(), qa.into());
    m.insert("float_accuracy".into(), fa.into());
    m.insert("ptq_start_accuracy".into(), start.into());
    Ok((reports, quality, m))
}

/// `--format gguf`: the selected layers' weights in a llama.cpp block type, every other tensor
/// as F32, written through candle's GGUF writer; the result is loaded back and evaluated.
fn export_gguf(args: &Args) -> anyhow::Result<()> {
    let Some(ty) = GgufType::parse(&args.scheme) else {
        bail!("--format gguf needs --scheme f16, q8_0, q4_0, q4_1, q4_k or q6_k, found `{}`", args.scheme);
    };
    if args.mode != "weight-only" || args.algo != "rtn" {
        bail!("--format gguf writes weight-only blocks: expected --mode weight-only --algo rtn");
    }
    if !args.overrides.is_empty() {
        bail!("--override applies to --format pare and compressed-tensors: for GGUF, run with --layers per block type");
    }
    let dev = Device::Cpu;
    let selection = Selection { include: args.layers.clone(), exclude: args.exclude.clone() };
    let mut meta = BTreeMap::from([
        (
            META_RECIPE.to_string(),
            format!("quantize format=gguf scheme={} layers={:?} exclude={:?}", args.scheme, args.layers, args.exclude),
        ),
        (pare_core_tensor::io::META_VERSION.to_string(), pare_core_tensor::VERSION.to_string()),
    ]);
    // (all weights, names to quantize, output file, the model kind for evaluation)
    let folder = args.model.is_dir();
    let (weights, chosen, dest) = if folder {
        let bert = pare_models::bert::BertEncoder::load(&args.model, &dev)
            .with_context(|| format!("load {}", args.model.display()))?;
        let chosen: Vec<String> = selection.resolve(&bert)?.iter().map(|p| format!("{p}.weight")).collect();
        if args.out.exists() && !args.out.is_dir() {
            bail!("--out `{}` must be a folder for a model folder", args.out.display());
        }
        (bert.named_weights(), chosen, args.out.join("model.gguf"))
    } else {
        let (weights, file_meta) = load_weights(&args.model, &dev)?;
        let chosen = if let Some(arch) = file_meta.get(META_MODEL) {
            meta.insert(META_MODEL.to_string(), arch.clone());
            let net = DigitsNet::load(&args.model, &dev)?;
            selection.resolve(&net)?.iter().map(|p| format!("{p}.weight")).collect()
        } else {
            select_tensors(&weights, &args.layers)?
        };
        (weights, chosen, args.out.clone())
    };
    if chosen.is_empty() {
        bail!("the selection matches no layer to quantize");
    }
    for name in &chosen {
        let w = &weights[name];
        if !matches!(w, pare_core_tensor::Weight::Dense(_)) {
            bail!("`{name}`: GGUF export needs float weights, found {}", w.describe());
        }
        if let Err(e) = ty.check(name, &w.shape()) {
            bail!("{e} (leave it in float with --exclude, or name the layers with --layers)");
        }
    }
    let bar = crate::progress(weights.len() as u64, "gguf");
    let mut tensors = Vec::new();
    let mut reports = Vec::new();
    for (name, w) in &weights {
        let t = w.to_dense(&dev)?;
        if chosen.contains(name) {
            let q = pare_quant::gguf::quantize(name, &t, ty)?;
            let before = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let after = q.dequantize(&dev)?.flatten_all()?.to_vec1::<f32>()?;
            let (rmse, sqnr_db) = pare_quant::weight_only::error_stats(&before, &after);
            reports.push(LayerReport {
                path: name.trim_end_matches(".weight").to_string(),
                shape: t.dims().to_vec(),
                format: format!("gguf {}", args.scheme),
                bytes_before: t.elem_count() * t.dtype().size_in_bytes(),
                bytes_after: q.storage_size_in_bytes(),
                rmse,
                sqnr_db,
            });
            tensors.push((name.clone(), q));
        } else {
            let t32 = t.to_dtype(candle_core::DType::F32)?;
            tensors.push((name.clone(), candle_core::quantized::QTensor::quantize(&t32, GgufType::F32.ggml())?));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if folder {
        std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    }
    pare_quant::gguf::write(&dest, &tensors, &meta, &[args.model.as_path()])?;
    if folder {
        pare_models::bert::copy_model_files(&args.model, &args.out)?;
    }
    print_table(&reports);
    let mut metrics = serde_json::Map::new();
    // Load what was written, as a user would, and measure it against the float model.
    if folder {
        if let Some(eval) = &args.eval {
            let eval = text_lines(eval, usize::MAX, "evaluation file")?;
            let a = SentenceEncoder::load(&args.model, &dev)?.embed(&eval, 32, &mut |_| {})?;
            let b = SentenceEncoder::load(&args.out, &dev)?.embed(&eval, 32, &mut |_| {})?;
            let (cos, agree) = (mean_cosine(&a, &b)?, retrieval_agreement(&a, &b)?);
            println!(
                "{} sentences (model reloaded from GGUF): mean cosine to float {cos:.5}, top-1 retrieval agreement {agree:.4}",
                eval.len()
            );
            metrics.insert("mean_cosine".into(), cos.into());
            metrics.insert("top1_agreement".into(), agree.into());
            metrics.insert("eval_examples".into(), eval.len().into());
        }
    } else if meta.contains_key(META_MODEL) {
        let data = digits(crate::DIGITS_SPLIT_SEED, &dev)?;
        let (fa, qa) = (
            DigitsNet::load(&args.model, &dev)?.accuracy(&data.test)?,
            DigitsNet::load(&dest, &dev)?.accuracy(&data.test)?,
        );
        println!(
            "test accuracy (model reloaded from GGUF) {:.2}% (float {:.2}%, {:+.2} points)",
            100.0 * qa,
            100.0 * fa,
            100.0 * (qa - fa)
        );
        metrics.insert("accuracy".into(), qa.into());
        metrics.insert("float_accuracy".into(), fa.into());
    }
    println!("wrote {}", dest.display());
    write_run_json(args.json.as_deref(), &reports, None, metrics)
}

/// Dynamic specs carrying each layer's SmoothQuant factors.
fn with_factors(
    mut specs: BTreeMap<String, pare_core_tensor::ActQuant>,
    factors: &BTreeMap<String, Vec<f32>>,
) -> BTreeMap<String, pare_core_tensor::ActQuant> {
    for (p, a) in &mut specs {
        a.smooth = factors.get(p).cloned();
    }
    specs
}

/// Calibration Hessians when the method is GPTQ.
/// Input Hessians of the selected linear and convolution layers (an embedding's input is
/// token ids: it has none, and GPTQ does not apply to it).
fn gptq_hessians(
    needed: bool,
    model: &dyn Module,
    paths: &[String],
    run: &mut dyn FnMut(&mut Hooks<'_>) -> pare_quant::Result<usize>,
) -> anyhow::Result<Option<HessianObserver>> {
    let weighted = of_kind(model, paths, &[LayerKind::Linear, LayerKind::Conv2d]);
    Ok(if needed { Some(collect_hessians(&weighted, run)?) } else { None })
}

/// The paths among `paths` whose layer is of one of `kinds`.
fn of_kind(model: &dyn Module, paths: &[String], kinds: &[LayerKind]) -> Vec<String> {
    paths.iter().filter(|p| model.layer(p).is_ok_and(|l| kinds.contains(&l.kind()))).cloned().collect()
}

fn print_table(reports: &[LayerReport]) {
    let w = reports.iter().map(|r| r.path.len()).max().unwrap_or(5).max(5);
    println!(
        "{:<w$}  {:<14}  {:<32}  {:>9}  {:>10}  {:>10}  {:>8}",
        "layer", "shape", "format", "bits/w", "RMSE", "SQNR dB", "ratio"
    );
    let (mut before, mut after, mut n) = (0usize, 0usize, 0usize);
    for r in reports {
        println!(
            "{:<w$}  {:<14}  {:<32}  {:>9.3}  {:>10.3e}  {:>10.2}  {:>7.2}x",
            r.path,
            format!("{:?}", r.shape),
            r.format,
            r.bits_per_weight(),
            r.rmse,
            r.sqnr_db,
            r.bytes_before as f64 / r.bytes_after as f64
        );
        before += r.bytes_before;
        after += r.bytes_after;
        n += r.shape.iter().product::<usize>();
    }
    println!(
        "{} layers: {before} -> {after} bytes ({:.2}x), {:.3} bits per weight",
        reports.len(),
        before as f64 / after.max(1) as f64,
        8.0 * after as f64 / n.max(1) as f64
    );
}
