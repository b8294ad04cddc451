//! `cargo xtask compress`: runs a TOML recipe's stages on a model (a digits file or a
//! sentence-transformers folder), checkpointing every stage's output under a key that chains
//! the input's hash and every option so far — an interrupted run resumes where it stopped —
//! and measures the original and every stage's output on one runtime: bytes, parameters,
//! quality (test accuracy, or mean cosine to the original's embeddings on held-out sentences)
//! and latency. Writes `manifest.json`, `report.json` and `report.md` (`cargo xtask report
//! DIR` re-renders the Markdown).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use pare_core_tensor::Module;
use pare_core_tensor::select::Selection;
use pare_distill::cache::Fingerprint;
use serde::{Deserialize, Serialize};

use crate::compress_measure::{Loaded, Meter};
use crate::compress_report::{BenchRow, Report};
use crate::recipe::{Kind, Recipe, Stage};

/// Arguments of `cargo xtask compress`.
#[derive(clap::Args)]
pub struct Args {
    /// A pare digits model file or a sentence-transformers folder (MiniLM).
    #[arg(long)]
    model: PathBuf,
    /// The recipe (TOML; see recipes/).
    #[arg(long)]
    recipe: PathBuf,
    /// Output folder: stages/, manifest.json, report.json, report.md.
    #[arg(long)]
    out: PathBuf,
    /// The runtime every stage evaluates on and every measurement runs on.
    #[command(flatten)]
    runtime: crate::runtime::RuntimeOpts,
    /// Sentence encoders: ONNX Runtime's timings of the same model (`ort-bench.json`, written
    /// by `../shared/tools/ort-peer/run.sh MODEL_DIR WORKDIR` in the same sitting), compared
    /// with the final model at 32 × 128 tokens, 2 threads.
    #[arg(long)]
    ort_json: Option<PathBuf>,
    /// Check the whole recipe against the model and stop: every stage's options, the stage
    /// order, the layer selectors and the output folder, as a run checks them before its first
    /// stage. Nothing is written.
    #[arg(long)]
    check: bool,
}

/// One stage as run, in the manifest.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct StageRecord {
    index: usize,
    kind: String,
    options: serde_json::Value,
    /// FNV-1a of the input's hash, pare's version and every stage's options so far.
    key: String,
    output: PathBuf,
    output_hash: String,
    seconds: f64,
}

/// What a run used and did: enough to reproduce it and to resume it.
#[derive(Serialize, Deserialize, Debug)]
struct Manifest {
    pare_version: String,
    recipe: PathBuf,
    recipe_text: String,
    seed: u64,
    runtime: String,
    model: PathBuf,
    model_hash: String,
    stages: Vec<StageRecord>,
}

/// A stable hash of a file, or of a folder's files (names and bytes, sorted).
fn hash_path(p: &Path) -> anyhow::Result<String> {
    let mut fp = Fingerprint::default();
    if p.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("read {}", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.is_file())
            .collect();
        files.sort();
        for f in files {
            fp.str(&f.file_name().unwrap_or_default().to_string_lossy());
            fp.bytes(&std::fs::read(&f).with_context(|| format!("read {}", f.display()))?);
        }
    } else {
        fp.bytes(&std::fs::read(p).with_context(|| format!("read {}", p.display()))?);
    }
    Ok(fp.hex())
}

/// A stage's command arguments, parsed and checked without running it.
enum Planned {
    Prune(Box<crate::prune::Args>),
    Quantize(Box<crate::quantize::Args>),
    Distill(Box<crate::distill::Args>),
    Nas(Box<crate::nas::Args>),
    /// The format, and the model to export (the previous stage's output).
    Export(ExportFormat, PathBuf),
    Evaluate,
    Bench(BenchArgs),
}

/// The keys of an `export` stage.
#[derive(clap::Args, Debug, Clone)]
struct ExportArgs {
    /// `gguf` (llama.cpp's file: float tensors, and Q8_0/Q4_0 blocks for codes quantized with
    /// scheme q8_0 or q4_0) or `compressed-tensors` (sentence encoders with integer codes: the
    /// layout vLLM and transformers load).
    #[arg(long)]
    format: String,
}

/// What an export stage writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExportFormat {
    Gguf,
    CompressedTensors,
}

/// The keys of a `bench` stage.
#[derive(clap::Args, Debug, Clone, Copy)]
struct BenchArgs {
    /// Examples per batch (default 64 images, or 32 sentences).
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per sentence (encoders; default 128).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Alternating timing rounds; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// Where a stage reads and writes.
struct StageIo<'a> {
    /// The recipe's input model (the teacher of `finetune`).
    original: &'a Path,
    /// The previous stage's output.
    input: &'a Path,
    /// This stage's output.
    output: &'a Path,
    /// For sentence encoders: the training sentences (data/sentences.txt less the held-out
    /// lines), the default calibration and distillation text.
    train_text: Option<&'a Path>,
}

fn plan_stage(
    recipe: &Recipe,
    stage: &Stage,
    io: &StageIo<'_>,
    rt: &crate::runtime::RuntimeOpts,
) -> anyhow::Result<Planned> {
    let (input, output) = (io.input, io.output);
    let mut fixed = vec![("out", output.display().to_string()), ("runtime", rt.runtime.clone())];
    if let Some(t) = rt.threads {
        fixed.push(("threads", t.to_string()));
    }
    if let Some(text) = io.train_text {
        let key = if matches!(stage.kind, Kind::Distill | Kind::Finetune) { "?sentences" } else { "?calib" };
        if !matches!(stage.kind, Kind::Evaluate | Kind::Bench) {
            fixed.push((key, text.display().to_string()));
        }
    }
    // The command's checks name its flags (`--sparsity`): point at that key's line.
    let wrap = |e: anyhow::Error| {
        let msg = format!("{e:#}");
        let key = stage.options.keys().find(|k| msg.contains(&format!("--{}", k.replace('_', "-")))).cloned();
        recipe.error(stage, key.as_deref(), msg)
    };
    Ok(match stage.kind {
        Kind::Prune => {
            fixed.push(("model", input.display().to_string()));
            let a: crate::prune::Args = recipe.stage_args(stage, &fixed, true)?;
            crate::prune::check(&a).map_err(wrap)?;
            Planned::Prune(Box::new(a))
        }
        Kind::Quantize => {
            fixed.push(("model", input.display().to_string()));
            let check: crate::quantize::Args = recipe.stage_args(stage, &fixed, true)?;
            // A later stage's input does not exist yet, so the kind of model comes from the
            // pipeline, not from the path.
            if check.attention() != "f32" && io.train_text.is_none() {
                return Err(recipe.error(
                    stage,
                    Some("attention"),
                    "`attention` applies to sentence encoders, not digits".to_string(),
                ));
            }
            crate::quantize::check(check).map_err(wrap)?;
            Planned::Quantize(Box::new(recipe.stage_args(stage, &fixed, true)?))
        }
        Kind::Distill => {
            fixed.push(("teacher", input.display().to_string()));
            let a: crate::distill::Args = recipe.stage_args(stage, &fixed, true)?;
            crate::distill::check_for(&a, io.train_text.is_some()).map_err(wrap)?;
            Planned::Distill(Box::new(a))
        }
        Kind::Nas => {
            // The search writes its trials and report beside the winner.
            let dir = output.parent().context("the winner lies in the search's folder")?;
            let mut fixed: Vec<(&str, String)> = fixed
                .into_iter()
                .map(|(k, v)| if k == "out" { (k, dir.display().to_string()) } else { (k, v) })
                .collect();
            let folder = io.train_text.is_some();
            if folder {
                fixed.push(("model", input.display().to_string()));
            }
            let a: crate::nas::Args = recipe.stage_args(stage, &fixed, true)?;
            let encoder = crate::nas::check(&a).map_err(wrap)?;
            if encoder != folder {
                let what = if folder {
                    "a sentence encoder: use `space = \"encoder\"`"
                } else {
                    "a digits model: use a digits space (mlp, cnn, cell or a file)"
                };
                return Err(recipe.error(stage, Some("space"), format!("the model here is {what}")));
            }
            Planned::Nas(Box::new(a))
        }
        Kind::Finetune => {
            fixed.push(("teacher", io.original.display().to_string()));
            fixed.push(("student", input.display().to_string()));
            let a: crate::distill::Args = recipe.stage_args(stage, &fixed, true)?;
            crate::distill::check_for(&a, io.train_text.is_some()).map_err(wrap)?;
            Planned::Distill(Box::new(a))
        }
        Kind::Evaluate => {
            if let Some(k) = stage.options.keys().next() {
                return Err(recipe.error(stage, Some(k), format!("unknown key `{k}`: evaluate takes no options")));
            }
            Planned::Evaluate
        }
        Kind::Export => {
            let a: ExportArgs = recipe.stage_args(stage, &[], false)?;
            let folder = io.train_text.is_some();
            let format = match a.format.as_str() {
                "gguf" => ExportFormat::Gguf,
                "compressed-tensors" if folder => ExportFormat::CompressedTensors,
                "compressed-tensors" => {
                    return Err(recipe.error(
                        stage,
                        Some("format"),
                        "compressed-tensors is a Hugging Face model folder: the model here is a digits file (use gguf)",
                    ));
                }
                other => {
                    return Err(recipe.error(
                        stage,
                        Some("format"),
                        format!("unknown format `{other}`: expected gguf or compressed-tensors"),
                    ));
                }
            };
            check_export(recipe, stage, format)?;
            Planned::Export(format, input.to_path_buf())
        }
        Kind::Bench => {
            let a: BenchArgs = recipe.stage_args(stage, &[], false)?;
            let encoder = io.train_text.is_some();
            let bad = |key: &str, msg: String| Err(recipe.error(stage, Some(key), msg));
            if a.batch == Some(0) {
                return bad("batch", "`batch` must be at least 1, found 0".into());
            }
            if a.rounds == 0 {
                return bad("rounds", "`rounds` must be at least 1, found 0".into());
            }
            match (a.seq_len, encoder) {
                (Some(_), false) => return bad("seq_len", "`seq_len` applies to sentence encoders, not digits".into()),
                (Some(l), true) if !(2..=512).contains(&l) => {
                    return bad("seq_len", format!("`seq_len` must be in 2..=512 (BERT's positions), found {l}"));
                }
                _ => {}
            }
            Planned::Bench(a)
        }
    })
}

/// Layer selectors (`layers`, `exclude`) of the stages before any distillation (which changes
/// the architecture) must match layers of the input model.
fn check_selectors(recipe: &Recipe, loaded: &dyn Module) -> anyhow::Result<()> {
    for stage in &recipe.stages {
        if matches!(stage.kind, Kind::Distill | Kind::Nas) {
            break;
        }
        for key in ["layers", "exclude"] {
            let Some(v) = stage.options.get(key) else { continue };
            let globs: Vec<String> = match v {
                toml::Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
                toml::Value::String(s) => vec![s.clone()],
                _ => continue,
            };
            for g in &globs {
                let sel = Selection { include: vec![g.clone()], exclude: Vec::new() };
                if let Err(e) = sel.resolve(loaded) {
                    return Err(recipe.error(stage, Some(key), format!("`{g}`: {e}")));
                }
            }
        }
        // A prune override's glob names layers (unstructured) or a group's layer prefix
        // (structured: `encoder.layer.3`): it must match a layer path or one of its prefixes.
        if stage.kind == Kind::Prune
            && let Some(v) = stage.options.get("override")
        {
            let paths: Vec<String> = loaded.layers().iter().map(|l| l.path().to_string()).collect();
            let scopes: Vec<String> = paths
                .iter()
                .flat_map(|p| p.match_indices('.').map(|(i, _)| p[..i].to_string()).chain([p.clone()]))
                .collect();
            let items: Vec<&str> = match v {
                toml::Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
                toml::Value::String(s) => vec![s.as_str()],
                _ => Vec::new(),
            };
            for o in items {
                let Some((g, _)) = o.split_once('=') else { continue };
                let m = pare_core_tensor::select::PathPattern::parse(g, "override")?;
                if !scopes.iter().any(|s| m.is_match(s)) {
                    let e = pare_core_tensor::Error::unknown("layer pattern", g, paths.iter().map(String::as_str));
                    return Err(recipe.error(stage, Some("override"), format!("`{g}`: {e}")));
                }
            }
        }
    }
    Ok(())
}

impl Args {
    /// A run of `recipe` on `model` into `out`, on `runtime`.
    pub fn new(model: PathBuf, recipe: PathBuf, out: PathBuf, runtime: crate::runtime::RuntimeOpts) -> Self {
        Args { model, recipe, out, runtime, ort_json: None, check: false }
    }
}

/// `cargo xtask compress`: runs the recipe and prints the report.
pub fn run(args: Args) -> anyhow::Result<()> {
    let out = args.out.clone();
    let check = args.check;
    let (model, recipe) = (args.model.clone(), args.recipe.clone());
    let Some(report) = run_recipe(args)? else {
        debug_assert!(check);
        println!("{}: every stage checks out against {} (nothing written)", recipe.display(), model.display());
        return Ok(());
    };
    println!("\n{}", report.render());
    println!("wrote {}/report.md, report.json, tradeoff.svg, sensitivity.svg, manifest.json", out.display());
    Ok(())
}

/// Runs a recipe: checks it whole, runs (or resumes) its stages, measures every model and
/// writes the report, which it returns.
pub fn execute(args: Args) -> anyhow::Result<Report> {
    run_recipe(Args { check: false, ..args })?.context("a run that is not a check returns its report")
}

/// [`execute`], or with `args.check` only its checks (`None`: nothing run, nothing written).
fn run_recipe(args: Args) -> anyhow::Result<Option<Report>> {
    // Everything is checked before anything is written.
    let recipe = Recipe::load(&args.recipe)?;
    if !args.model.exists() {
        bail!("--model `{}` does not exist: expected a digits model file or a model folder", args.model.display());
    }
    let folder = args.model.is_dir();
    let same = |a: &Path, b: &Path| a.canonicalize().ok().is_some_and(|x| b.canonicalize().ok() == Some(x));
    if same(&args.out, &args.model)
        || (args.out.exists() && args.model.canonicalize()?.starts_with(args.out.canonicalize()?) && folder)
    {
        bail!("--out `{}` holds the input model: write the compressed model elsewhere", args.out.display());
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out `{}` is a file: expected a folder", args.out.display());
    }
    let peers = match &args.ort_json {
        Some(p) if folder => ort_peers(p)?,
        Some(_) => bail!("--ort-json compares sentence encoders: the model here is a digits file"),
        None => Vec::new(),
    };
    let rt = args.runtime.build()?;
    let ext = if folder { "" } else { ".safetensors" };
    let stage_dir = args.out.join("stages");
    let train_text = folder.then(|| args.out.join("sentences-train.txt"));
    let mut outputs = Vec::new();
    let mut planned = Vec::new();
    let mut input = args.model.clone();
    for stage in &recipe.stages {
        let output = if matches!(stage.kind, Kind::Evaluate | Kind::Bench) {
            input.clone()
        } else if stage.kind == Kind::Export {
            stage_dir.join(format!("{:02}-export{}", stage.index, if folder { "" } else { ".gguf" }))
        } else if stage.kind == Kind::Nas {
            stage_dir.join(format!("{:02}-nas", stage.index)).join(format!("best-model{ext}"))
        } else {
            stage_dir.join(format!("{:02}-{}{ext}", stage.index, stage.kind.name()))
        };
        let io = StageIo { original: &args.model, input: &input, output: &output, train_text: train_text.as_deref() };
        planned.push(plan_stage(&recipe, stage, &io, &args.runtime)?);
        outputs.push(output.clone());
        input = output;
    }
    let original = Loaded::load(&args.model)?;
    check_selectors(&recipe, original.module())?;
    if args.check {
        return Ok(None);
    }

    std::fs::create_dir_all(&stage_dir).with_context(|| format!("create {}", stage_dir.display()))?;
    let mut model_hash = hash_path(&args.model)?;
    if let Some(p) = &train_text {
        let (train, _) = crate::compress_measure::sentence_split()?;
        pare_core_tensor::io::write_file_atomic(p, (train.join("\n") + "\n").as_bytes())?;
        // The stages' data is an input too: a changed sentences file reruns them.
        model_hash = format!("{model_hash}+{}", hash_path(p)?);
    }
    let manifest_path = args.out.join("manifest.json");
    let previous: Option<Manifest> = std::fs::read(&manifest_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let mut manifest = Manifest {
        pare_version: pare_core_tensor::VERSION.into(),
        recipe: args.recipe.clone(),
        recipe_text: recipe.text.clone(),
        seed: recipe.seed,
        runtime: rt.name().into(),
        model: args.model.clone(),
        model_hash: model_hash.clone(),
        stages: Vec::new(),
    };
    println!(
        "recipe `{}`: {} stages on {} (runtime {})",
        recipe.name,
        recipe.stages.len(),
        args.model.display(),
        rt.name()
    );
    let mut meter = Meter::new(rt.clone(), &original)?;
    let original = meter.prepared(original)?;
    let mut models = vec![("original".to_string(), args.model.clone(), original, None)];
    let mut qualities = vec![meter.quality(&models[0].2)?];
    println!("original: {} {:.4}", meter.metric(), qualities[0]);
    let mut benches = Vec::new();
    let mut key = Fingerprint::default();
    key.str(&model_hash).str(pare_core_tensor::VERSION).str(rt.name());
    for ((stage, plan), output) in recipe.stages.iter().zip(planned).zip(&outputs) {
        let options = serde_json::to_value(&stage.options)?;
        key.str(stage.kind.name()).str(&options.to_string());
        let stage_key = key.hex();
        let label = format!("{} {}", stage.index, stage.kind.name());
        let done =
            previous.as_ref().and_then(|m| m.stages.iter().find(|s| s.index == stage.index && s.key == stage_key));
        // A bench stage times its model at the end, resumed or not.
        if let Planned::Bench(b) = &plan {
            benches.push((label.clone(), models.len(), *b));
        }
        let (record, ran) = match done {
            Some(d) if output.exists() && hash_path(output).ok().as_deref() == Some(d.output_hash.as_str()) => {
                println!("stage {label}: done in an earlier run (key {stage_key}), skipped");
                (d.clone(), false)
            }
            _ => {
                println!("stage {label}: running");
                let t = Instant::now();
                match plan {
                    Planned::Prune(a) => {
                        let (_, quality, _) = crate::prune::execute(*a)?;
                        quality.iter().for_each(|q| println!("  {q}"));
                    }
                    Planned::Quantize(a) => crate::quantize::run(*a)?,
                    Planned::Distill(a) => {
                        let (lines, _) = crate::distill::execute(&a, &mut |_| {})?;
                        lines.iter().for_each(|l| println!("  {l}"));
                    }
                    Planned::Nas(a) => crate::nas::run(*a)?,
                    Planned::Export(format, input) => export(format, &input, output)?,
                    Planned::Evaluate => {}
                    Planned::Bench(_) => {}
                }
                let record = StageRecord {
                    index: stage.index,
                    kind: stage.kind.name().into(),
                    options,
                    key: stage_key,
                    output: output.clone(),
                    output_hash: hash_path(output)?,
                    seconds: t.elapsed().as_secs_f64(),
                };
                (record, true)
            }
        };
        let record_secs = record.seconds;
        manifest.stages.push(record);
        // The manifest is written after every stage, so a killed run resumes after the last
        // finished one.
        pare_core_tensor::io::write_file_atomic(&manifest_path, &serde_json::to_vec_pretty(&manifest)?)?;
        let m = meter.prepared(Loaded::load(output)?)?;
        let q = meter.quality(&m)?;
        println!("  {label}: {} {q:.4} ({} weight bytes)", meter.metric(), m.module().storage_bytes());
        qualities.push(q);
        models.push((label, output.clone(), m, ran.then_some(record_secs)));
    }
    let mut report = finish(&recipe, &args, &mut meter, &models, &qualities, &benches)?;
    if !peers.is_empty() {
        report.peers = peers;
        report.write(&args.out)?;
    }
    Ok(Some(report))
}

/// Export stages take what the last quantize stage made: GGUF holds float weights and
/// Q8_0/Q4_0 codes (weights only); compressed-tensors holds integer codes.
fn check_export(recipe: &Recipe, stage: &Stage, format: ExportFormat) -> anyhow::Result<()> {
    let Some(q) =
        recipe.stages.iter().take_while(|s| s.index < stage.index).filter(|s| s.kind == Kind::Quantize).last()
    else {
        return Ok(());
    };
    let get = |k: &str| q.options.get(k).and_then(|v| v.as_str()).map(String::from);
    let scheme = get("scheme").unwrap_or_else(|| "int8".into());
    let mode = get("mode").unwrap_or_else(|| "weight-only".into());
    let overrides: Vec<String> = match q.options.get("override") {
        Some(toml::Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
        Some(toml::Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    };
    let schemes = std::iter::once(scheme).chain(
        overrides
            .iter()
            .filter_map(|o| o.split_once('='))
            .map(|(_, m)| m.split(',').next().unwrap_or_default().to_string()),
    );
    for s in schemes {
        let ok = match format {
            ExportFormat::Gguf => matches!(s.as_str(), "q8_0" | "q4_0" | "fp16" | "f16"),
            ExportFormat::CompressedTensors => s.starts_with("int"),
        };
        if !ok {
            let what = match format {
                ExportFormat::Gguf => {
                    "GGUF holds float weights and Q8_0/Q4_0 blocks exactly: quantize with scheme q8_0 or q4_0"
                }
                ExportFormat::CompressedTensors => {
                    "compressed-tensors holds integer codes: quantize with scheme int2..int8"
                }
            };
            return Err(recipe.error(stage, Some("format"), format!("stage {} quantizes to `{s}`; {what}", q.index)));
        }
    }
    if format == ExportFormat::Gguf && mode != "weight-only" {
        return Err(recipe.error(
            stage,
            Some("format"),
            format!(
                "stage {} quantizes activations (mode {mode}); GGUF holds weights only: use compressed-tensors",
                q.index
            ),
        ));
    }
    Ok(())
}

/// Writes the model at `input` as `format` at `output`, holding it exactly.
fn export(format: ExportFormat, input: &Path, output: &Path) -> anyhow::Result<()> {
    let model = Loaded::load(input)?;
    let mut meta = std::collections::BTreeMap::from([
        (pare_core_tensor::io::META_VERSION.to_string(), pare_core_tensor::VERSION.to_string()),
        (pare_core_tensor::io::META_RECIPE.to_string(), format!("export {format:?} of {}", input.display())),
    ]);
    match (format, &model) {
        (ExportFormat::Gguf, _) => {
            if let Some(l) = model.module().layers().iter().find(|l| l.input_quant().is_some()) {
                bail!("`{}` quantizes its input at run time; GGUF holds weights only", l.path());
            }
            // Every tensor is converted before anything is written.
            let tensors = model
                .module()
                .named_weights()
                .iter()
                .map(|(name, w)| Ok((name.clone(), pare_quant::gguf::from_weight(name, w)?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let dest = match &model {
                Loaded::Digits(net) => {
                    meta.insert(pare_models::digits::META_MODEL.into(), serde_json::to_string(net.arch())?);
                    output.to_path_buf()
                }
                Loaded::Encoder(_) => {
                    std::fs::create_dir_all(output).with_context(|| format!("create {}", output.display()))?;
                    pare_models::bert::copy_model_files(input, output)?;
                    output.join("model.gguf")
                }
            };
            pare_quant::gguf::write(&dest, &tensors, &meta, &[input])?;
            println!("  wrote {} ({} tensors)", dest.display(), tensors.len());
        }
        (ExportFormat::CompressedTensors, Loaded::Encoder(e)) => {
            e.bert.save_folder_compressed_tensors(input, output, &meta)?;
            println!("  wrote {} (compressed-tensors)", output.display());
        }
        (ExportFormat::CompressedTensors, Loaded::Digits(_)) => {
            bail!("compressed-tensors is a Hugging Face model folder; a digits model exports as gguf")
        }
    }
    Ok(())
}

/// ONNX Runtime's 2-thread medians at 32 × 128 from `ort-bench.json`: its fastest f32 graph
/// and its fastest int8 graph of the sitting (the peer builds several of each: plain and fused
/// f32; dynamic int8 per channel and per tensor, with and without the transformer fusions),
/// each named.
fn ort_peers(path: &Path) -> anyhow::Result<Vec<crate::compress_report::Peer>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--ort-json: read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("--ort-json: {} is not JSON", path.display()))?;
    let mut out = Vec::new();
    for (want, precision) in [("f32-", "f32"), ("int8-", "int8")] {
        let fastest = v["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["threads"].as_u64() == Some(2) && r["shape"].as_str() == Some("32x128"))
            .filter_map(|r| {
                let model = r["model"].as_str()?.split('(').next()?;
                Some((model.to_string(), r["median_s"].as_f64()?)).filter(|_| model.starts_with(want))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let Some((model, secs)) = fastest else {
            bail!(
                "--ort-json {}: no 2-thread 32x128 result for any {precision} graph (expected run.sh's ort-bench.json)",
                path.display()
            );
        };
        out.push(crate::compress_report::Peer {
            name: format!("onnxruntime {model} (fastest {precision} graph), 2 threads"),
            latency_ms: secs * 1e3,
            throughput: 32.0 / secs,
            source: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Times every model against the others and candle f32, analyses the final model layer by
/// layer, and writes the report.
fn finish(
    recipe: &Recipe,
    args: &Args,
    meter: &mut Meter,
    models: &[(String, PathBuf, Loaded, Option<f64>)],
    qualities: &[f64],
    benches: &[(String, usize, BenchArgs)],
) -> anyhow::Result<Report> {
    let rounds = if meter.encoder() { 3 } else { 7 };
    let bar = crate::progress(rounds as u64, "timing");
    let (rows, baseline, candle_bert) = meter.rows(models, qualities, &mut || bar.inc(1), rounds)?;
    bar.finish_and_clear();
    let bar = crate::progress(0, "layers");
    let layers = meter.layers(models, qualities, &mut |k, n| {
        bar.set_length(n as u64);
        bar.set_position(k as u64);
    })?;
    bar.finish_and_clear();
    let mut bench_rows = Vec::new();
    for (stage, i, b) in benches {
        let (n, len) = if meter.encoder() {
            (b.batch.unwrap_or(32), b.seq_len.unwrap_or(128))
        } else {
            (b.batch.unwrap_or(64), 0)
        };
        let bar = crate::progress(b.rounds as u64, "bench");
        let (t, shape) = meter.bench(&models[0].2, &models[*i].2, (n, len, b.rounds), &mut || bar.inc(1))?;
        bar.finish_and_clear();
        println!(
            "  {stage}: {shape}: {:.3} ms (original {:.3} ms, candle f32 {:.3} ms)",
            t[1] * 1e3,
            t[0] * 1e3,
            t[2] * 1e3
        );
        bench_rows.push(BenchRow {
            stage: stage.clone(),
            batch: shape,
            examples: n,
            latency_ms: t[1] * 1e3,
            throughput: n as f64 / t[1],
            original_ms: t[0] * 1e3,
            candle_f32_ms: t[2] * 1e3,
        });
    }
    let mut command = format!(
        "cargo xtask compress --model {} --recipe {} --out {} --runtime {}",
        args.model.display(),
        args.recipe.display(),
        args.out.display(),
        args.runtime.runtime
    );
    if let Some(t) = args.runtime.threads {
        command.push_str(&format!(" --threads {t}"));
    }
    if let Some(p) = &args.ort_json {
        command.push_str(&format!(" --ort-json {}", p.display()));
    }
    let report = Report {
        recipe: recipe.name.clone(),
        command,
        model: args.model.clone(),
        runtime: meter.runtime().name().into(),
        metric: meter.metric().into(),
        batch: meter.batch_name(),
        baseline,
        candle_transformers: candle_bert,
        rows,
        layers,
        benches: bench_rows,
        peers: Vec::new(),
    };
    report.write(&args.out)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peer rows are ONNX Runtime's fastest f32 and fastest int8 graphs at 2 threads and
    /// 32 × 128, whichever variant that is, named in the row; other shapes and thread counts
    /// do not count.
    #[test]
    fn the_onnx_runtime_peers_are_the_fastest_graph_of_each_precision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ort-bench.json");
        let row = |model: &str, threads: u64, shape: &str, s: f64| serde_json::json!({"model": model, "threads": threads, "shape": shape, "median_s": s});
        let results = vec![
            row("f32-fused(tf-optimizer)", 2, "32x128", 0.56),
            row("f32-plain(ENABLE_ALL)", 2, "32x128", 0.53),
            row("f32-plain(ENABLE_ALL)", 1, "32x128", 0.40),
            row("int8-dyn-perchannel", 2, "32x128", 0.265),
            row("int8-dyn-pc-unfused", 2, "32x128", 0.241),
            row("int8-dyn-pc-unfused", 2, "32x128-realmask", 0.2),
            row("int8-dyn-pertensor", 2, "1x16", 0.001),
        ];
        std::fs::write(&path, serde_json::json!({ "results": results }).to_string()).unwrap();
        let peers = ort_peers(&path).unwrap();
        let got: Vec<(&str, f64)> = peers.iter().map(|p| (p.name.as_str(), p.latency_ms)).collect();
        assert_eq!(
            got,
            [
                ("onnxruntime f32-plain (fastest f32 graph), 2 threads", 530.0),
                ("onnxruntime int8-dyn-pc-unfused (fastest int8 graph), 2 threads", 241.0)
            ]
        );
        let only_f32 = serde_json::json!({ "results": [row("f32-fused(x)", 2, "32x128", 0.5)] });
        std::fs::write(&path, only_f32.to_string()).unwrap();
        let e = ort_peers(&path).unwrap_err().to_string();
        assert!(e.contains("no 2-thread 32x128 result for any int8 graph"), "{e}");
    }
}
