//! `cargo xtask distill`: trains a student to reproduce a frozen teacher — a digits classifier
//! (soft targets at temperature T plus hard labels, optional FitNets hints) or a
//! sentence-transformers folder (embedding cosine, optional hidden-state hints; the student
//! made of every other teacher layer, or any folder such as a structurally pruned model).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use candle_core::Device;
use candle_nn::VarMap;
use pare_core_tensor::data::{DigitsSplit, digits};
use pare_core_tensor::io::META_RECIPE;
use pare_core_tensor::train::{LrSchedule, OptimizerKind, TrainConfig, TrainReport, train};
use pare_core_tensor::{Module, Runtime};
use pare_distill::cache::Source;
use pare_distill::digits::agreement;
use pare_distill::encoder::{mean_cosine_to, size_ratio};
use pare_distill::{
    DigitsDistill, EncoderDistill, EncoderSettings, FeatureMap, Fingerprint, Settings, every_other_layer,
    split_sentences, teacher_logits, teacher_outputs,
};
use pare_models::bert::SentenceEncoder;
use pare_models::digits::{DigitsArch, DigitsNet, META_MODEL};

/// Arguments of `cargo xtask distill`.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// The trained teacher: a pare digits model file or a sentence-transformers folder (MiniLM).
    #[arg(long)]
    pub teacher: PathBuf,
    /// The student. Digits: an architecture (mlp:H1,... or cnn:C1,...:H), trained from a seeded
    /// initialisation, or a digits model file to start from. Folder teacher: `every-other`
    /// (DistilBERT: the teacher's layers 0, 2, 4, ...), `layers:I,J,...`, or a model folder
    /// (e.g. a structurally pruned copy of the teacher, repaired by distillation).
    #[arg(long)]
    pub student: String,
    /// Softmax temperature of the soft targets (digits), > 0.
    #[arg(long, default_value_t = 4.0)]
    pub temperature: f64,
    /// Weight of the soft-target loss in [0, 1]; the hard labels get 1 − α (digits).
    #[arg(long, default_value_t = 0.9)]
    pub alpha: f64,
    /// Hint pairs `student_layer=teacher_layer,...` by parameter path: FitNets' feature loss
    /// (a learned projection where widths differ), or hidden-state MSE for encoders.
    #[arg(long, default_value = "")]
    pub features: String,
    /// Digits: train on a transfer set — the training images plus their one-pixel shifts, all
    /// soft-labelled by the teacher (the shifted copies keep their hard labels too).
    #[arg(long)]
    pub transfer: bool,
    /// How digits feature pairs are compared: `hint` (FitNets MSE, projected) or `attention`
    /// (attention transfer between convolution maps of equal spatial size).
    #[arg(long, default_value = "hint")]
    pub feature_loss: String,
    /// Weight of the summed hint losses.
    #[arg(long, default_value_t = 1.0)]
    pub feature_weight: f64,
    /// Encoders: weight of the MSE between embeddings, beside the cosine loss (weight 1).
    #[arg(long, default_value_t = 0.0)]
    pub mse_weight: f64,
    /// Training epochs (default 60 for digits, 6 for encoders); the best validation epoch is kept.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Peak learning rate of AdamW (default 3e-3 for digits, 1e-4 for encoders).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Examples per step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Seed of the student's initialisation, the shuffles and the sentence split.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Sentences to distil an encoder on (split 70/15/15 into train, validation and held-out test).
    #[arg(long, default_value = "data/sentences.txt")]
    pub sentences: PathBuf,
    /// Cache the teacher's outputs in this file, reused by later runs with the same teacher and data.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Checkpoint after every epoch here, and resume from it if it exists.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Where the student goes: a file (digits) or a folder (encoders).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the run's figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where the teacher runs (its outputs) and where both models are timed.
    #[command(flatten)]
    pub runtime: crate::runtime::RuntimeOpts,
}

/// The figures of one distillation run.
pub type Figures = serde_json::Map<String, serde_json::Value>;

pub fn run(args: Args) -> anyhow::Result<()> {
    let json = args.json.clone();
    let (lines, mut figures) = execute(&args, &mut |_| {})?;
    for l in &lines {
        println!("{l}");
    }
    if let Some(p) = &json {
        figures.insert("command".into(), serde_json::json!(std::env::args().skip(1).collect::<Vec<_>>()));
        let text = serde_json::to_vec_pretty(&serde_json::Value::Object(figures))?;
        pare_core_tensor::io::write_file_atomic(p, &text).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}

/// The digits distillation settings the options name.
fn settings(args: &Args) -> anyhow::Result<Settings> {
    Ok(Settings {
        temperature: args.temperature,
        alpha: args.alpha,
        feature_weight: args.feature_weight,
        feature_loss: args.feature_loss.parse()?,
    })
}

/// Checks the options without loading anything (for recipes, before any stage runs): each
/// on its own, and that they suit the kind of teacher (`folder`: a sentence encoder;
/// otherwise a digits model), since a pipeline's stages are checked before the models they
/// take exist.
pub fn check_for(args: &Args, folder: bool) -> anyhow::Result<()> {
    check_common(args)?;
    let s = args.student.as_str();
    let digits_arch = s.starts_with("mlp:") || s.starts_with("cnn:");
    let encoder_spec = s == "every-other" || s.starts_with("layers:");
    if folder {
        if args.transfer {
            bail!(
                "--transfer builds a transfer set of shifted digits: it applies to a digits teacher, not a model folder"
            );
        }
        if args.feature_loss != "hint" {
            bail!(
                "--feature-loss {}: encoder hints compare hidden states by masked MSE; only `hint` applies to a model folder",
                args.feature_loss
            );
        }
        if digits_arch {
            bail!(
                "--student `{s}` is a digits architecture, but the teacher is a sentence encoder: expected every-other, layers:I,J,... or a model folder"
            );
        }
    } else if encoder_spec {
        bail!(
            "--student `{s}` picks a sentence encoder's layers, but the teacher is a digits model: expected mlp:H1,..., cnn:C1,...:H or a digits model file"
        );
    }
    Ok(())
}

/// Checks the options every kind of teacher shares, before anything is loaded.
fn check_common(args: &Args) -> anyhow::Result<FeatureMap> {
    settings(args)?.check()?;
    if args.epochs == Some(0) {
        bail!("--epochs must be at least 1, found 0");
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1, found 0");
    }
    if let Some(lr) = args.lr
        && !(lr.is_finite() && lr > 0.0)
    {
        bail!("--lr must be finite and > 0, found {lr}");
    }
    if args.out.canonicalize().ok().is_some() && args.out.canonicalize().ok() == args.teacher.canonicalize().ok() {
        bail!("--out `{}` is the teacher: write the student elsewhere", args.out.display());
    }
    Ok(args.features.parse::<FeatureMap>()?)
}

/// Runs one distillation; returns the lines to print and the figures. `on_epoch` sees every
/// finished epoch (the report's learning curves).
pub fn execute(
    args: &Args,
    on_epoch: &mut dyn FnMut(&pare_core_tensor::train::EpochStats),
) -> anyhow::Result<(Vec<String>, Figures)> {
    let features = check_common(args)?;
    let rt = args.runtime.build()?;
    if args.teacher.is_dir() {
        encoder(args, &features, &rt, on_epoch)
    } else if args.teacher.is_file() {
        digits_run(args, &features, &rt, on_epoch)
    } else {
        bail!("--teacher `{}` does not exist: expected a digits model file or a model folder", args.teacher.display())
    }
}

fn train_config(args: &Args, epochs: usize, lr: f64, warmup: usize, patience: Option<usize>) -> TrainConfig {
    TrainConfig {
        epochs: args.epochs.unwrap_or(epochs),
        batch_size: args.batch_size,
        optimizer: OptimizerKind::adamw(args.lr.unwrap_or(lr)),
        schedule: LrSchedule::Cosine { warmup_steps: warmup, min_factor: 0.02 },
        seed: args.seed,
        patience,
        checkpoint: args.checkpoint.clone(),
    }
}

fn run_training(
    task: &mut dyn pare_core_tensor::train::TrainTask,
    vars: &VarMap,
    n: usize,
    cfg: &TrainConfig,
    what: &str,
    on_epoch: &mut dyn FnMut(&pare_core_tensor::train::EpochStats),
) -> anyhow::Result<TrainReport> {
    let bar = crate::progress((n.div_ceil(cfg.batch_size) * cfg.epochs) as u64, what);
    let mut show = crate::train::show_on(&bar);
    let report = train(task, vars, n, cfg, &mut |e| {
        show(e);
        if let pare_core_tensor::train::TrainEvent::Epoch(s) = e {
            on_epoch(s);
        }
    })?;
    bar.finish_and_clear();
    Ok(report)
}

fn training_line(r: &TrainReport, metric: &str) -> String {
    format!(
        "trained {} epochs{}: best validation {metric} {:.4} at epoch {}{}",
        r.history.len(),
        match r.resumed_at {
            Some(e) if e >= r.history.len() =>
                " (resumed from a finished checkpoint: nothing left to train)".to_string(),
            Some(e) => format!(" (resumed at epoch {})", e + 1),
            None => String::new(),
        },
        r.best_metric,
        r.best_epoch + 1,
        if r.stopped_early { " (stopped early)" } else { "" }
    )
}

/// A digits teacher distilled into a digits student.
fn digits_run(
    args: &Args,
    features: &FeatureMap,
    rt: &Arc<dyn Runtime>,
    on_epoch: &mut dyn FnMut(&pare_core_tensor::train::EpochStats),
) -> anyhow::Result<(Vec<String>, Figures)> {
    let dev = Device::Cpu;
    let meta = pare_core_tensor::io::load_weights(&args.teacher, &dev)
        .with_context(|| format!("read teacher {}", args.teacher.display()))?
        .1;
    if !meta.contains_key(META_MODEL) {
        bail!(
            "--teacher `{}` is not a pare digits model (no `{META_MODEL}` metadata) nor a model folder",
            args.teacher.display()
        );
    }
    let mut data: DigitsSplit = digits(crate::DIGITS_SPLIT_SEED, &dev)?;
    if args.transfer {
        data.train = pare_distill::digits::shifted_copies(&data.train)?;
    }
    let mut teacher = DigitsNet::load(&args.teacher, &dev)?;
    teacher.prepare(rt)?;
    let vars = VarMap::new();
    let student_path = Path::new(&args.student);
    let student = if student_path.is_file() {
        DigitsNet::load_trainable(student_path, &dev, &vars)?
    } else {
        let arch: DigitsArch = args.student.parse().with_context(|| {
            format!("--student `{}` is neither a digits model file nor an architecture", args.student)
        })?;
        DigitsNet::init(arch, args.seed, &dev, &vars)?
    };
    let mut key = Fingerprint::default();
    key.str("digits-logits").model(&teacher)?.tensor(&data.train.x)?;
    let (logits, source) =
        teacher_outputs(args.cache.as_deref(), &key, data.train.len(), &dev, || teacher_logits(&teacher, &data.train))?;
    let settings = settings(args)?;
    let mut task = DigitsDistill::new(&student, &teacher, &data, logits, features, settings, &vars, args.seed)?;
    let cfg = train_config(args, 60, 3e-3, 40, Some(15));
    let report = run_training(&mut task, &vars, data.train.len(), &cfg, "distill", on_epoch)?;

    let mut fast = student.clone();
    fast.prepare(rt)?;
    let (ta, sa) = (teacher.accuracy(&data.test)?, fast.accuracy(&data.test)?);
    let agree = agreement(&teacher, &fast, &data.test)?;
    let x = &data.test.x;
    let (t_teacher, t_student) = crate::prune::median_pair(
        15,
        || teacher.forward(x).map(drop).map_err(Into::into),
        || fast.forward(x).map(drop).map_err(Into::into),
    )?;
    let recipe = format!(
        "distill teacher={} student={} T={} alpha={} features={:?} feature_loss={} transfer={} seed={}",
        args.teacher.display(),
        args.student,
        args.temperature,
        args.alpha,
        args.features,
        args.feature_loss,
        args.transfer,
        args.seed
    );
    student.save(
        &args.out,
        &BTreeMap::from([(META_RECIPE.to_string(), recipe)]),
        &[args.teacher.as_path(), student_path],
    )?;
    let (pt, ps) = (teacher.parameter_count(), student.parameter_count());
    let mut f = Figures::new();
    for (k, v) in [
        ("teacher_accuracy", ta),
        ("student_accuracy", sa),
        ("agreement", agree),
        ("best_validation", report.best_metric),
        ("teacher_seconds", t_teacher),
        ("student_seconds", t_student),
        ("temperature", args.temperature),
        ("alpha", args.alpha),
    ] {
        f.insert(k.into(), v.into());
    }
    f.insert("teacher_params".into(), pt.into());
    f.insert("student_params".into(), ps.into());
    f.insert("student".into(), student.arch().to_string().into());
    f.insert("teacher".into(), teacher.arch().to_string().into());
    f.insert("epochs".into(), report.history.len().into());
    let lines = vec![
        format!(
            "teacher {}: {} outputs over {} training digits",
            teacher.arch(),
            if source == Source::Cached { "cached" } else { "computed" },
            data.train.len()
        ),
        training_line(&report, "accuracy"),
        format!(
            "test accuracy: student {} {:.2}% vs teacher {} {:.2}% ({:+.2} points); agreement {:.2}% on {} digits",
            student.arch(),
            100.0 * sa,
            teacher.arch(),
            100.0 * ta,
            100.0 * (sa - ta),
            100.0 * agree,
            data.test.len()
        ),
        format!("parameters {pt} → {ps} ({:.1}× fewer)", pt as f64 / ps as f64),
        format!(
            "forward of the {} test digits on `{}`: student {:.3} ms vs teacher {:.3} ms ({:.2}× faster)",
            data.test.len(),
            args.runtime.runtime,
            t_student * 1e3,
            t_teacher * 1e3,
            t_teacher / t_student
        ),
        format!("wrote {}", args.out.display()),
    ];
    Ok((lines, f))
}

/// The student encoder named by `--student`, before training (inference weights).
fn student_encoder(args: &Args, teacher: &SentenceEncoder) -> anyhow::Result<SentenceEncoder> {
    let n = teacher.bert.config().num_hidden_layers;
    let mut s = teacher.clone();
    s.bert = match args.student.as_str() {
        "every-other" => teacher.bert.keep_layers(&every_other_layer(n))?,
        spec if spec.starts_with("layers:") => {
            let keep: Vec<usize> = spec["layers:".len()..]
                .split(',')
                .map(|l| l.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("--student `{spec}`: expected layers:I,J,... with layer indices"))?;
            teacher.bert.keep_layers(&keep)?
        }
        path if Path::new(path).is_dir() => {
            let other = SentenceEncoder::load(Path::new(path), &Device::Cpu)
                .with_context(|| format!("load student folder {path}"))?;
            other.bert
        }
        other => {
            bail!("--student `{other}` for a folder teacher: expected every-other, layers:I,J,... or a model folder")
        }
    };
    Ok(s)
}

/// Seconds to embed `sentences` in batches of 32, one warm-up then the median of 5 runs, for
/// both models alternately.
fn time_pair(a: &SentenceEncoder, b: &SentenceEncoder, sentences: &[String]) -> anyhow::Result<(f64, f64)> {
    crate::prune::median_pair(
        5,
        || a.embed(sentences, 32, &mut |_| {}).map(drop).map_err(Into::into),
        || b.embed(sentences, 32, &mut |_| {}).map(drop).map_err(Into::into),
    )
}

/// A sentence-transformers teacher distilled into a shallower (or pruned) encoder.
fn encoder(
    args: &Args,
    features: &FeatureMap,
    rt: &Arc<dyn Runtime>,
    on_epoch: &mut dyn FnMut(&pare_core_tensor::train::EpochStats),
) -> anyhow::Result<(Vec<String>, Figures)> {
    let dev = Device::Cpu;
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out `{}` must be a folder for a folder teacher", args.out.display());
    }
    if args.transfer {
        bail!("--transfer builds a transfer set of shifted digits: it applies to a digits teacher, not a model folder");
    }
    if args.feature_loss != "hint" {
        bail!(
            "--feature-loss {}: encoder hints compare hidden states by masked MSE; only `hint` applies to a model folder",
            args.feature_loss
        );
    }
    let student_dir = Path::new(&args.student);
    if student_dir.is_dir()
        && args.out.canonicalize().ok().is_some()
        && args.out.canonicalize().ok() == student_dir.canonicalize().ok()
    {
        bail!(
            "--out `{}` is the student folder the run starts from: write the distilled student elsewhere",
            args.out.display()
        );
    }
    let settings = EncoderSettings { cosine: 1.0, mse: args.mse_weight, feature_weight: args.feature_weight };
    settings.check()?;
    let teacher =
        SentenceEncoder::load(&args.teacher, &dev).with_context(|| format!("load {}", args.teacher.display()))?;
    let init = student_encoder(args, &teacher)?;
    features.check(&init.bert, &teacher.bert)?;
    let all = crate::prune::lines(&args.sentences, usize::MAX, "sentences file")?;
    let split = split_sentences(&all, args.seed)?;

    // The teacher's embeddings of every sentence, computed once on the runtime (or cached).
    let mut fast_teacher = teacher.clone();
    fast_teacher.bert.prepare(rt)?;
    let ordered: Vec<String> = split.train.iter().chain(&split.validation).chain(&split.test).cloned().collect();
    let mut key = Fingerprint::default();
    key.str("sentence-embeddings").model(&teacher.bert)?.str(&teacher.max_len().to_string());
    for s in &ordered {
        key.str(s);
    }
    let bar = crate::progress(ordered.len() as u64, "teacher");
    let (all_emb, source) = teacher_outputs(args.cache.as_deref(), &key, ordered.len(), &dev, || {
        fast_teacher.embed(&ordered, 64, &mut |d| bar.set_position(d as u64)).map_err(pare_models::Error::into_core)
    })?;
    bar.finish_and_clear();
    let (nt, nv) = (split.train.len(), split.validation.len());
    let (emb_train, emb_val, emb_test) =
        (all_emb.narrow(0, 0, nt)?, all_emb.narrow(0, nt, nv)?, all_emb.narrow(0, nt + nv, split.test.len())?);

    let mut fast_init = init.clone();
    fast_init.bert.prepare(rt)?;
    let before = mean_cosine_to(&fast_init, &split.test, &emb_test)?;

    let vars = VarMap::new();
    let mut student = init.clone();
    student.bert = init.bert.trainable(&vars, &["embeddings."])?;
    let hint_teacher = &fast_teacher;
    let mut task = EncoderDistill::new(
        &student,
        hint_teacher,
        &split.train,
        emb_train,
        &split.validation,
        emb_val,
        features,
        settings,
    )?;
    let cfg = train_config(args, 6, 1e-4, 10, None);
    let report = run_training(&mut task, &vars, nt, &cfg, "distill", on_epoch)?;
    drop(task);

    let mut fast = student.clone();
    fast.bert.prepare(rt)?;
    let after = mean_cosine_to(&fast, &split.test, &emb_test)?;
    let (t_teacher, t_student) = time_pair(&fast_teacher, &fast, &split.test)?;
    let recipe = format!(
        "distill teacher={} student={} features={:?} mse_weight={} seed={}",
        args.teacher.display(),
        args.student,
        args.features,
        args.mse_weight,
        args.seed
    );
    student.bert.save_folder(&args.teacher, &args.out, &BTreeMap::from([(META_RECIPE.to_string(), recipe)]))?;

    let layer_params = |m: &dyn Module| -> usize {
        m.named_weights().iter().filter(|(k, _)| k.starts_with("encoder.")).map(|(_, w)| w.numel()).sum()
    };
    let (pt, ps) = (teacher.bert.parameter_count(), student.bert.parameter_count());
    let (lt, ls) = (layer_params(&teacher.bert), layer_params(&student.bert));
    let mut f = Figures::new();
    for (k, v) in [
        ("cosine_before", before),
        ("cosine_after", after),
        ("best_validation", report.best_metric),
        ("teacher_seconds", t_teacher),
        ("student_seconds", t_student),
    ] {
        f.insert(k.into(), v.into());
    }
    for (k, v) in
        [("teacher_params", pt), ("student_params", ps), ("teacher_layer_params", lt), ("student_layer_params", ls)]
    {
        f.insert(k.into(), v.into());
    }
    f.insert("teacher_layers".into(), teacher.bert.config().num_hidden_layers.into());
    f.insert("student_layers".into(), student.bert.config().num_hidden_layers.into());
    f.insert("test_sentences".into(), split.test.len().into());
    f.insert("epochs".into(), report.history.len().into());
    let lines = vec![
        format!(
            "teacher: {} layers, embeddings of {} sentences {} ({} train / {} validation / {} held-out test)",
            teacher.bert.config().num_hidden_layers,
            ordered.len(),
            if source == Source::Cached { "cached" } else { "computed" },
            nt,
            nv,
            split.test.len()
        ),
        training_line(&report, "mean cosine"),
        format!(
            "held-out mean cosine to the teacher: {before:.4} before distillation → {after:.4} after ({} of {} layers)",
            student.bert.config().num_hidden_layers,
            teacher.bert.config().num_hidden_layers
        ),
        format!(
            "parameters {pt} → {ps} ({:.2}× fewer; transformer layers {lt} → {ls}, {:.2}× fewer)",
            size_ratio(&student.bert, &teacher.bert),
            lt as f64 / ls.max(1) as f64
        ),
        format!(
            "embedding the {} held-out sentences on `{}`: student {:.1} ms vs teacher {:.1} ms ({:.2}× faster)",
            split.test.len(),
            args.runtime.runtime,
            t_student * 1e3,
            t_teacher * 1e3,
            t_teacher / t_student
        ),
        format!("wrote {}", args.out.display()),
    ];
    Ok((lines, f))
}
