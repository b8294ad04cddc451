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
use crate::compress_report::Report;
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
    Evaluate,
}

fn plan_stage(
    recipe: &Recipe,
    stage: &Stage,
    input: &Path,
    output: &Path,
    rt: &crate::runtime::RuntimeOpts,
) -> anyhow::Result<Planned> {
    let mut fixed = vec![("out", output.display().to_string()), ("runtime", rt.runtime.clone())];
    if let Some(t) = rt.threads {
        fixed.push(("threads", t.to_string()));
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
            crate::quantize::check(check).map_err(wrap)?;
            Planned::Quantize(Box::new(recipe.stage_args(stage, &fixed, true)?))
        }
        Kind::Distill => {
            fixed.push(("teacher", input.display().to_string()));
            let a: crate::distill::Args = recipe.stage_args(stage, &fixed, true)?;
            crate::distill::check(&a).map_err(wrap)?;
            Planned::Distill(Box::new(a))
        }
        Kind::Evaluate => {
            if let Some(k) = stage.options.keys().next() {
                return Err(recipe.error(stage, Some(k), format!("unknown key `{k}`: evaluate takes no options")));
            }
            Planned::Evaluate
        }
    })
}

/// Layer selectors (`layers`, `exclude`) of the stages before any distillation (which changes
/// the architecture) must match layers of the input model.
fn check_selectors(recipe: &Recipe, loaded: &dyn Module) -> anyhow::Result<()> {
    for stage in &recipe.stages {
        if stage.kind == Kind::Distill {
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
    }
    Ok(())
}

impl Args {
    /// A run of `recipe` on `model` into `out`, on `runtime`.
    pub fn new(model: PathBuf, recipe: PathBuf, out: PathBuf, runtime: crate::runtime::RuntimeOpts) -> Self {
        Args { model, recipe, out, runtime }
    }
}

/// `cargo xtask compress`: runs the recipe and prints the report.
pub fn run(args: Args) -> anyhow::Result<()> {
    let out = args.out.clone();
    let report = execute(args)?;
    println!("\n{}", report.render());
    println!("wrote {}/report.md, report.json, tradeoff.svg, sensitivity.svg, manifest.json", out.display());
    Ok(())
}

/// Runs a recipe: checks it whole, runs (or resumes) its stages, measures every model and
/// writes the report, which it returns.
pub fn execute(args: Args) -> anyhow::Result<Report> {
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
    let rt = args.runtime.build()?;
    let ext = if folder { "" } else { ".safetensors" };
    let stage_dir = args.out.join("stages");
    let mut outputs = Vec::new();
    let mut planned = Vec::new();
    let mut input = args.model.clone();
    for stage in &recipe.stages {
        let output = if stage.kind == Kind::Evaluate {
            input.clone()
        } else {
            stage_dir.join(format!("{:02}-{}{ext}", stage.index, stage.kind.name()))
        };
        planned.push(plan_stage(&recipe, stage, &input, &output, &args.runtime)?);
        outputs.push(output.clone());
        input = output;
    }
    let original = Loaded::load(&args.model)?;
    check_selectors(&recipe, original.module())?;

    std::fs::create_dir_all(&stage_dir).with_context(|| format!("create {}", stage_dir.display()))?;
    let model_hash = hash_path(&args.model)?;
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
    let mut key = Fingerprint::default();
    key.str(&model_hash).str(pare_core_tensor::VERSION).str(rt.name());
    for ((stage, plan), output) in recipe.stages.iter().zip(planned).zip(&outputs) {
        let options = serde_json::to_value(&stage.options)?;
        key.str(stage.kind.name()).str(&options.to_string());
        let stage_key = key.hex();
        let label = format!("{} {}", stage.index, stage.kind.name());
        let done =
            previous.as_ref().and_then(|m| m.stages.iter().find(|s| s.index == stage.index && s.key == stage_key));
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
                    Planned::Evaluate => {}
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
    finish(&recipe, &args, &mut meter, &models, &qualities)
}

/// Times every model against the others and candle f32, analyses the final model layer by
/// layer, and writes the report.
fn finish(
    recipe: &Recipe,
    args: &Args,
    meter: &mut Meter,
    models: &[(String, PathBuf, Loaded, Option<f64>)],
    qualities: &[f64],
) -> anyhow::Result<Report> {
    let rounds = if meter.batch_name().starts_with("32") { 3 } else { 7 };
    let bar = crate::progress(rounds as u64, "timing");
    let (rows, baseline) = meter.rows(models, qualities, &mut || bar.inc(1), rounds)?;
    bar.finish_and_clear();
    let bar = crate::progress(0, "layers");
    let layers = meter.layers(models, qualities, &mut |k, n| {
        bar.set_length(n as u64);
        bar.set_position(k as u64);
    })?;
    bar.finish_and_clear();
    let report = Report {
        recipe: recipe.name.clone(),
        model: args.model.clone(),
        runtime: meter.runtime().name().into(),
        metric: meter.metric().into(),
        batch: meter.batch_name().into(),
        baseline,
        rows,
        layers,
    };
    report.write(&args.out)?;
    Ok(report)
}
