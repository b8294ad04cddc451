//! `cargo xtask compress`: runs a TOML recipe's stages on a model (a digits file or a
//! sentence-transformers folder), checkpointing every stage's output under a key that chains
//! the input's hash and every option so far — an interrupted run resumes where it stopped —
//! and measures the original and every stage's output on one runtime: bytes, parameters,
//! quality (test accuracy, or mean cosine to the original's embeddings on held-out sentences)
//! and latency. Writes `manifest.json`, `report.json` and `report.md` (`cargo xtask report
//! DIR` re-renders the Markdown).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use pare_core_tensor::data::{digits, sentences};
use pare_core_tensor::metrics::mean_cosine;
use pare_core_tensor::select::Selection;
use pare_core_tensor::{Module, Runtime};
use pare_distill::cache::Fingerprint;
use pare_models::bert::SentenceEncoder;
use pare_models::digits::{DigitsNet, time_forward};
use serde::{Deserialize, Serialize};

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

/// One row of the report: the original or a stage's output, measured.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Row {
    /// `original`, or `N kind`.
    pub stage: String,
    /// Where the model is.
    pub path: PathBuf,
    /// Bytes of the weights as stored (codes, scales, sparse indices).
    pub bytes: usize,
    /// Logical parameters.
    pub params: usize,
    /// The quality metric's value.
    pub quality: f64,
    /// Milliseconds per batch on the runtime.
    pub latency_ms: f64,
    /// Examples (images or sentences) per second on the runtime.
    pub throughput: f64,
}

/// `report.json`.
#[derive(Serialize, Deserialize, Debug)]
pub struct Report {
    /// The recipe's name.
    pub recipe: String,
    /// The input model.
    pub model: PathBuf,
    /// The runtime every row was measured on.
    pub runtime: String,
    /// `test accuracy` (digits) or `mean cosine to the original` (sentence encoders).
    pub metric: String,
    /// What one latency measurement runs.
    pub batch: String,
    /// The original, then every stage.
    pub rows: Vec<Row>,
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

/// Held-out sentences for folder models: every fifth line of data/sentences.txt (the other
/// lines are what recipes calibrate and distil on), at most 64.
fn held_out() -> anyhow::Result<Vec<String>> {
    let all = sentences(crate::workspace_root().join("data/sentences.txt"))?;
    Ok(all.into_iter().enumerate().filter(|(i, _)| i % 5 == 4).map(|(_, s)| s).take(64).collect())
}

/// Measures models on one runtime against the original.
struct Meter {
    rt: Arc<dyn Runtime>,
    folder: bool,
    /// The held-out sentences (folders), read once.
    text: Vec<String>,
    /// The original's embeddings of the held-out sentences (folders).
    reference: Option<Tensor>,
}

impl Meter {
    fn measure(&mut self, stage: &str, path: &Path) -> anyhow::Result<Row> {
        let dev = Device::Cpu;
        if self.folder {
            let mut enc = SentenceEncoder::load(path, &dev).with_context(|| format!("load {}", path.display()))?;
            enc.bert.prepare(&self.rt)?;
            let text = &self.text;
            let e = enc.embed(text, 16, &mut |_| {})?;
            let reference = self.reference.get_or_insert_with(|| e.clone());
            let quality = mean_cosine(reference, &e)?;
            let batch: Vec<String> = text.iter().take(8).cloned().collect();
            let mut times = Vec::new();
            for _ in 0..3 {
                let t = Instant::now();
                enc.embed(&batch, 8, &mut |_| {})?;
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            let s = times[1];
            Ok(Row {
                stage: stage.into(),
                path: path.into(),
                bytes: enc.bert.storage_bytes(),
                params: enc.bert.parameter_count(),
                quality,
                latency_ms: s * 1e3,
                throughput: batch.len() as f64 / s,
            })
        } else {
            let data = digits(crate::DIGITS_SPLIT_SEED, &dev)?;
            let mut net = DigitsNet::load(path, &dev).with_context(|| format!("load {}", path.display()))?;
            net.prepare(&self.rt)?;
            let quality = net.accuracy(&data.test)?;
            let batch = data.test.x.narrow(0, 0, 64.min(data.test.len()))?;
            // Median of 5 timings of 30 forwards: a small net's batch takes microseconds.
            let mut times =
                (0..5).map(|_| time_forward(&net, &batch, 30)).collect::<pare_models::Result<Vec<f64>>>()?;
            times.sort_by(f64::total_cmp);
            let s = times[2];
            Ok(Row {
                stage: stage.into(),
                path: path.into(),
                bytes: net.storage_bytes(),
                params: net.parameter_count(),
                quality,
                latency_ms: s * 1e3,
                throughput: 64.0 / s,
            })
        }
    }
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
fn check_selectors(recipe: &Recipe, model: &Path) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let loaded: Box<dyn Module> = if model.is_dir() {
        Box::new(SentenceEncoder::load(model, &dev)?.bert)
    } else {
        Box::new(DigitsNet::load(model, &dev)?)
    };
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
                if let Err(e) = sel.resolve(loaded.as_ref()) {
                    return Err(recipe.error(stage, Some(key), format!("`{g}`: {e}")));
                }
            }
        }
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
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
    check_selectors(&recipe, &args.model)?;

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
    let text = if folder { held_out()? } else { Vec::new() };
    let mut meter = Meter { rt: rt.clone(), folder, text, reference: None };
    let mut rows = vec![meter.measure("original", &args.model)?];
    let mut key = Fingerprint::default();
    key.str(&model_hash).str(pare_core_tensor::VERSION).str(rt.name());
    for ((stage, plan), output) in recipe.stages.iter().zip(planned).zip(&outputs) {
        let options = serde_json::to_value(&stage.options)?;
        key.str(stage.kind.name()).str(&options.to_string());
        let stage_key = key.hex();
        let label = format!("{} {}", stage.index, stage.kind.name());
        let done =
            previous.as_ref().and_then(|m| m.stages.iter().find(|s| s.index == stage.index && s.key == stage_key));
        let record = match done {
            Some(d) if output.exists() && hash_path(output).ok().as_deref() == Some(d.output_hash.as_str()) => {
                println!("stage {label}: done in an earlier run (key {stage_key}), skipped");
                d.clone()
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
                StageRecord {
                    index: stage.index,
                    kind: stage.kind.name().into(),
                    options,
                    key: stage_key,
                    output: output.clone(),
                    output_hash: hash_path(output)?,
                    seconds: t.elapsed().as_secs_f64(),
                }
            }
        };
        manifest.stages.push(record);
        // The manifest is written after every stage, so a killed run resumes after the last
        // finished one.
        pare_core_tensor::io::write_file_atomic(&manifest_path, &serde_json::to_vec_pretty(&manifest)?)?;
        rows.push(meter.measure(&label, output)?);
    }
    let report = Report {
        recipe: recipe.name.clone(),
        model: args.model.clone(),
        runtime: rt.name().into(),
        metric: if folder { "mean cosine to the original".into() } else { "test accuracy".into() },
        batch: if folder { "8 held-out sentences".into() } else { "64 test images".into() },
        rows,
    };
    pare_core_tensor::io::write_file_atomic(args.out.join("report.json"), &serde_json::to_vec_pretty(&report)?)?;
    let md = render(&report);
    pare_core_tensor::io::write_file_atomic(args.out.join("report.md"), md.as_bytes())?;
    println!("\n{md}");
    println!("wrote {}/report.md, report.json, manifest.json", args.out.display());
    Ok(())
}

/// `report.md` from `report.json`'s contents.
pub fn render(r: &Report) -> String {
    let first = &r.rows[0];
    let mut s = format!(
        "# Compression report: {}\n\nRegenerate: `cargo xtask report DIR` (from report.json); rerun: `cargo xtask compress` with the recipe in manifest.json.\n\nModel `{}`, measured on the `{}` runtime; latency per batch of {}; quality is {}.\n\n",
        r.recipe,
        r.model.display(),
        r.runtime,
        r.batch,
        r.metric
    );
    s.push_str("| stage | weight bytes | smaller | parameters | quality | Δ quality | latency (ms) | faster |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for row in &r.rows {
        s.push_str(&format!(
            "| {} | {} | {:.2}× | {} | {:.4} | {:+.4} | {:.3} | {:.2}× |\n",
            row.stage,
            row.bytes,
            first.bytes as f64 / row.bytes.max(1) as f64,
            row.params,
            row.quality,
            row.quality - first.quality,
            row.latency_ms,
            first.latency_ms / row.latency_ms.max(1e-9)
        ));
    }
    s
}

/// Arguments of `cargo xtask report`.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// A `compress` output folder (holding report.json).
    dir: PathBuf,
}

/// Re-renders DIR/report.md from DIR/report.json.
pub fn report(args: ReportArgs) -> anyhow::Result<()> {
    let path = args.dir.join("report.json");
    let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    let r: Report = serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
    if r.rows.is_empty() {
        bail!("{}: no rows", path.display());
    }
    let md = render(&r);
    pare_core_tensor::io::write_file_atomic(args.dir.join("report.md"), md.as_bytes())?;
    print!("{md}");
    Ok(())
}
