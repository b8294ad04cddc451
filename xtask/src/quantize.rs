//! `cargo xtask quantize`: weight-only quantization of a digits model, a sentence-transformers
//! folder, or any safetensors file tensor by tensor, with a per-layer error and size table.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::Device;
use pare_core_tensor::io::{META_RECIPE, load_weights, save_weights};
use pare_models::bert::BertEncoder;
use pare_models::digits::{DigitsNet, META_MODEL};
use pare_quant::weight_only::{LayerReport, Method, Selection, quantize_model, quantize_tensors, select_tensors};

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
    /// Asymmetric integer mapping (unsigned codes with a zero point) instead of symmetric.
    #[arg(long)]
    asymmetric: bool,
    /// Quantize only layers matching these globs (repeatable); by default every linear and
    /// convolution except embeddings and the final classifier.
    #[arg(long = "layers")]
    layers: Vec<String>,
    /// Leave layers matching these globs in float (repeatable).
    #[arg(long = "exclude")]
    exclude: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let method = Method::parse(&args.scheme, &args.granularity, !args.asymmetric)?;
    let selection = Selection { include: args.layers.clone(), exclude: args.exclude.clone() };
    let recipe = format!(
        "quantize scheme={} granularity={} symmetric={} layers={:?} exclude={:?}",
        args.scheme, args.granularity, !args.asymmetric, args.layers, args.exclude
    );
    let meta = BTreeMap::from([(META_RECIPE.to_string(), recipe)]);
    let dev = Device::Cpu;
    let bar = crate::progress(0, "quantize");
    let mut on_layer = |r: &LayerReport| {
        bar.inc(1);
        bar.set_message(r.path.clone());
    };
    let reports = if args.model.is_dir() {
        let mut bert =
            BertEncoder::load(&args.model, &dev).with_context(|| format!("load {}", args.model.display()))?;
        bar.set_length(selection.resolve(&bert)?.len() as u64);
        let reports = quantize_model(&mut bert, &method, &selection, &mut on_layer)?;
        if args.out.exists() && !args.out.is_dir() {
            bail!("--out `{}` must be a folder for a model folder", args.out.display());
        }
        bert.save_folder(&args.model, &args.out, &meta).with_context(|| format!("write {}", args.out.display()))?;
        reports
    } else {
        let (mut weights, file_meta) = load_weights(&args.model, &dev)?;
        if file_meta.contains_key(META_MODEL) {
            let mut net = DigitsNet::load(&args.model, &dev)?;
            bar.set_length(selection.resolve(&net)?.len() as u64);
            let reports = quantize_model(&mut net, &method, &selection, &mut on_layer)?;
            net.save(&args.out, &meta, &[args.model.as_path()])?;
            reports
        } else {
            bar.set_length(select_tensors(&weights, &args.layers)?.len() as u64);
            let reports = quantize_tensors(&mut weights, &method, &args.layers, &mut on_layer)?;
            save_weights(&args.out, &weights, &meta, &[args.model.as_path()])?;
            reports
        }
    };
    bar.finish_and_clear();
    print_table(&reports);
    println!("wrote {}", args.out.display());
    Ok(())
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
