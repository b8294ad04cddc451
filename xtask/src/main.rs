//! `cargo xtask`: pare's command line — a thin layer of clap over the library crates.

mod bench;
mod compress;
mod compress_measure;
mod compress_report;
mod demo;
mod distill;
mod distill_report;
mod embed;
mod inspect;
mod nas;
mod nas_cell_report;
mod nas_report;
mod prune;
mod prune_report;
mod quantize;
mod recipe;
mod report;
mod runtime;
mod serve_bench;
mod train;

use clap::{Parser, Subcommand};

/// Seed of the digits train/validation/test split. Fixed for every command, so a model trained
/// by `train` or `demo` is always evaluated (by `quantize`, ...) on images it never saw.
pub(crate) const DIGITS_SPLIT_SEED: u64 = 42;

/// pare: make neural networks smaller and faster.
#[derive(Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the digits CNN teacher on the embedded data set and print its figures.
    Demo(demo::Args),
    /// Train a digits model of any architecture (cnn:C1,C2:H or mlp:H1,H2) on the embedded data.
    Train(train::Args),
    /// List every tensor of a safetensors file (name, dtype, shape, bytes) and pare's metadata.
    Inspect(inspect::Args),
    /// Embed every line of a text file with a sentence-transformers model folder.
    Embed(embed::Args),
    /// Quantize a model (weights, and activations dynamic or static) and report error and size.
    Quantize(Box<quantize::Args>),
    /// Prune a model (unstructured, N:M, gradual or structured) and report sparsity, size,
    /// quality and speed.
    Prune(Box<prune::Args>),
    /// Distil a teacher into a smaller student (digits: soft targets + hard labels; a model
    /// folder: embedding cosine, the student made of every other layer or a pruned folder).
    Distill(Box<distill::Args>),
    /// Regenerate reports/distill-report.md: the digits temperature study and MiniLM → 3 layers.
    DistillReport(distill_report::Args),
    /// Regenerate reports/prune-report.md: every pruning method on the digits and MiniLM.
    PruneReport(prune_report::Args),
    /// Gather `quantize --json` runs into a Markdown table, per-layer SQNR, JSON and an SVG plot.
    QuantReport(report::Args),
    /// Search digits architectures (random, grid, evolution, bo, rl, darts; trained or one-shot
    /// evaluation) for accuracy and measured latency; writes the trial log, a summary and plots.
    Nas(Box<nas::Args>),
    /// Regenerate reports/nas-report.md: every strategy × seeds on a digits space, against the demo CNN.
    NasReport(nas_report::Args),
    /// Regenerate reports/nas-cell-report.md: DARTS, one-shot supernets and multi-objective search.
    NasCellReport(Box<nas_cell_report::Args>),
    /// Run a TOML recipe's stages (distill, prune, quantize, evaluate) on a model, checkpointed
    /// and resumable, and report each stage's size, quality and speed.
    Compress(compress::Args),
    /// Re-render a `compress` folder's report.md from its report.json.
    Report(compress_report::ReportArgs),
    /// Run the kernel and MiniLM benchmarks against their peers; write bench-report.md/json.
    Bench(bench::Args),
    /// Serve MiniLM embeddings under each parallel mode (data, pipeline, tensor, dynamic
    /// batching) and report throughput, latency percentiles and scaling against one worker.
    ServeBench(serve_bench::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Compress(a) => compress::run(a),
        Command::Report(a) => compress_report::report(a),
        Command::Train(a) => train::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Embed(a) => embed::run(a),
        Command::Quantize(a) => quantize::run(*a),
        Command::Prune(a) => prune::run(*a),
        Command::Distill(a) => distill::run(*a),
        Command::DistillReport(a) => distill_report::run(a),
        Command::PruneReport(a) => prune_report::run(a),
        Command::QuantReport(a) => report::run(a),
        Command::Nas(a) => nas::run(*a),
        Command::NasReport(a) => nas_report::run(a),
        Command::NasCellReport(a) => nas_cell_report::run(*a),
        Command::Bench(a) => bench::run(a),
        Command::ServeBench(a) => serve_bench::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The workspace's root folder (where data/ and recipes/ are).
pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(std::path::Path::to_path_buf).unwrap_or_default()
}

/// A progress bar in pare's style, hidden when stderr is not a terminal.
pub(crate) fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Mean and sample standard deviation (0 for fewer than two values), for the reports' tables.
pub(crate) fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, var.sqrt())
}
