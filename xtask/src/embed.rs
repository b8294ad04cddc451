//! `cargo xtask embed`: one sentence embedding per input line, saved as safetensors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::Device;
use pare_core_tensor::Module;
use pare_core_tensor::io::{RawTensor, save_tensors};
use pare_models::bert::SentenceEncoder;

/// Arguments of `cargo xtask embed`.
#[derive(clap::Args)]
pub struct Args {
    /// A sentence-transformers folder (config.json, model.safetensors, tokenizer.json);
    /// defaults to $PARE_MINILM_DIR.
    #[arg(long, env = "PARE_MINILM_DIR")]
    model: PathBuf,
    /// A UTF-8 text file; every line (empty ones included) gets one embedding row.
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file with tensor `embeddings` (f32, [lines, dim]).
    #[arg(long)]
    out: PathBuf,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    runtime: crate::runtime::RuntimeOpts,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1, found 0");
    }
    let text = std::fs::read_to_string(&args.input).with_context(|| format!("read {}", args.input.display()))?;
    let lines: Vec<String> = text.lines().map(String::from).collect();
    if lines.is_empty() {
        bail!("input `{}` has no lines to embed", args.input.display());
    }
    let rt = args.runtime.build()?;
    let mut enc = SentenceEncoder::load(&args.model, &Device::Cpu)
        .with_context(|| format!("load model folder {}", args.model.display()))?;
    enc.bert.prepare(&rt)?;
    let bar = crate::progress(lines.len() as u64, "embed");
    let started = std::time::Instant::now();
    let emb = enc.embed(&lines, args.batch_size, &mut |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let meta = BTreeMap::from([
        ("pare.model_dir".to_string(), args.model.display().to_string()),
        ("pare.input".to_string(), args.input.display().to_string()),
    ]);
    let tensors = BTreeMap::from([("embeddings".to_string(), RawTensor::from_tensor(&emb)?)]);
    let weights = args.model.join("model.safetensors");
    save_tensors(&args.out, &tensors, &meta, &[args.input.as_path(), weights.as_path()])?;
    println!(
        "embedded {} lines into {:?} in {secs:.2} s ({:.1} lines/s, runtime {}) -> {}",
        lines.len(),
        emb.dims(),
        lines.len() as f64 / secs,
        rt.name(),
        args.out.display()
    );
    Ok(())
}
