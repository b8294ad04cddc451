//! `cargo xtask demo`: the whole pipeline on the embedded digits, with no download — train the
//! CNN teacher, then run `recipes/digits.toml` on it (distil a 32-unit MLP student on the
//! teacher's soft targets, prune half of its first layer with masked fine-tuning, quantize to
//! int8, evaluate) on pare's CPU runtime, and print the before/after table against the goals.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use pare_core_tensor::Module;
use pare_core_tensor::data::digits;
use pare_models::digits::DigitsArch;

/// Arguments of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    opts: crate::train::TrainOpts,
    /// Folder for the trained teacher (`teacher.safetensors`) and the pipeline's output
    /// (`compressed/`: every stage's model, manifest, report and plots).
    #[arg(long, default_value = "target/demo")]
    out: PathBuf,
    /// The recipe run on the teacher.
    #[arg(long, default_value = "recipes/digits.toml")]
    recipe: PathBuf,
    /// The runtime the pipeline measures every model on.
    #[command(flatten)]
    runtime: crate::runtime::RuntimeOpts,
}

/// The goals the demo is held to (issue 10): at least this much smaller than the teacher,
/// at most this many test-accuracy points lost, at least this much faster on the runtime.
const GOALS: (f64, f64, f64) = (10.0, 1.0, 3.0);

pub fn run(args: Args) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let recipe = if args.recipe.is_relative() && !args.recipe.exists() {
        crate::workspace_root().join(&args.recipe)
    } else {
        args.recipe.clone()
    };
    // Check the recipe and the runtime before the teacher trains.
    crate::recipe::Recipe::load(&recipe)?;
    args.runtime.build()?;
    let dev = Device::Cpu;
    let data = digits(crate::DIGITS_SPLIT_SEED, &dev)?;
    println!(
        "digits: {} train / {} validation / {} test images (8x8, 10 classes)",
        data.train.len(),
        data.validation.len(),
        data.test.len()
    );
    let (net, _) = crate::train::train_digits(DigitsArch::default_cnn(), &data, &args.opts)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let teacher = args.out.join("teacher.safetensors");
    net.save(&teacher, &BTreeMap::new(), &[])?;
    println!(
        "teacher {}: {} parameters, test accuracy {:.2}%, saved {}\n",
        net.arch(),
        net.parameter_count(),
        100.0 * net.accuracy(&data.test)?,
        teacher.display()
    );

    let out = args.out.join("compressed");
    let report = crate::compress::execute(crate::compress::Args::new(teacher, recipe, out.clone(), args.runtime))?;
    let (first, last) = (&report.rows[0], report.rows.last().expect("rows"));
    let smaller = first.bytes as f64 / last.bytes.max(1) as f64;
    let lost = 100.0 * (first.quality - last.quality);
    let faster = first.latency_ms / last.latency_ms.max(1e-12);
    println!("\n{}", report.table());
    println!("{}", report.summary());
    for b in &report.benches {
        println!(
            "{}: {} in {:.3} ms, {:.2}× the teacher on `{}` ({:.3} ms), {:.2}× candle f32 ({:.3} ms)",
            b.stage,
            b.batch,
            b.latency_ms,
            b.original_ms / b.latency_ms.max(1e-12),
            report.runtime,
            b.original_ms,
            b.candle_f32_ms / b.latency_ms.max(1e-12),
            b.candle_f32_ms
        );
    }
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("goal ≥ {:.0}× smaller than the teacher: {smaller:.1}× ({})", GOALS.0, verdict(smaller >= GOALS.0));
    println!("goal ≤ {:.0} accuracy point lost: {lost:.2} ({})", GOALS.1, verdict(lost <= GOALS.1));
    println!(
        "goal ≥ {:.0}× faster on `{}` (same run): {faster:.1}× ({})",
        GOALS.2,
        report.runtime,
        verdict(faster >= GOALS.2)
    );
    println!(
        "\nreport: {}/report.md (per-layer table, tradeoff.svg, sensitivity.svg); demo took {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
