//! `cargo xtask train`: trains a digits model of any architecture on the embedded data set
//! (the demo's teacher, or a compact model to quantize, prune or distil into).

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::Device;
use pare_core_tensor::Module;
use pare_core_tensor::data::{DigitsSplit, digits};
use pare_core_tensor::io::META_RECIPE;
use pare_core_tensor::train::{LrSchedule, OptimizerKind, TrainConfig, TrainEvent, TrainReport};
use pare_models::digits::{DigitsArch, DigitsNet, fit};

/// Training options shared by `train` and `demo`.
#[derive(clap::Args, Clone, Copy)]
pub struct TrainOpts {
    /// Seed of the initialisation and the shuffles (the train/validation/test split is fixed).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Maximum training epochs (early stopping may end sooner).
    #[arg(long, default_value_t = 60)]
    pub epochs: usize,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
}

/// Arguments of `cargo xtask train`.
#[derive(clap::Args)]
pub struct Args {
    /// cnn:C1,C2,...:H (convolution channels, hidden width) or mlp:H1,H2,...
    #[arg(long, default_value = "cnn:16,32:64")]
    arch: DigitsArch,
    #[command(flatten)]
    opts: TrainOpts,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
}

/// A trainer callback that advances `bar` per step and shows the loss and validation metric.
pub fn show_on(bar: &indicatif::ProgressBar) -> impl FnMut(&TrainEvent) + '_ {
    move |e| match e {
        TrainEvent::Step { loss, .. } => {
            bar.inc(1);
            bar.set_message(format!("loss {loss:.3}"));
        }
        TrainEvent::Epoch(s) => bar.set_message(format!("val acc {:.3}", s.metric)),
    }
}

/// Trains a digits model of `arch` with a progress bar and prints a one-line summary.
pub fn train_digits(
    arch: DigitsArch,
    data: &DigitsSplit,
    opts: &TrainOpts,
) -> anyhow::Result<(DigitsNet, TrainReport)> {
    let TrainOpts { seed, epochs, lr } = *opts;
    let vars = candle_nn::VarMap::new();
    let net = DigitsNet::init(arch.clone(), seed, &Device::Cpu, &vars)?;
    let cfg = TrainConfig {
        epochs,
        batch_size: 32,
        optimizer: OptimizerKind::adamw(lr),
        schedule: LrSchedule::Cosine { warmup_steps: 40, min_factor: 0.02 },
        seed,
        patience: Some(15),
        checkpoint: None,
    };
    let steps = data.train.len().div_ceil(cfg.batch_size) * cfg.epochs;
    let bar = crate::progress(
        steps as u64,
        &format!(
            "train {}",
            match arch {
                DigitsArch::Mlp(_) => "mlp",
                DigitsArch::Cnn(_) => "cnn",
                DigitsArch::Cell(_) => "cell",
            }
        ),
    );
    let started = std::time::Instant::now();
    let report = fit(&net, &vars, data, &cfg, &mut show_on(&bar))?;
    bar.finish_and_clear();
    println!(
        "trained {arch} ({} parameters) in {:.1} s: {} epochs, best validation accuracy {:.4} at epoch {}{}",
        net.parameter_count(),
        started.elapsed().as_secs_f64(),
        report.history.len(),
        report.best_metric,
        report.best_epoch + 1,
        if report.stopped_early { " (stopped early)" } else { "" }
    );
    Ok((net, report))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let data = digits(crate::DIGITS_SPLIT_SEED, &Device::Cpu)?;
    let (net, _) = train_digits(args.arch.clone(), &data, &args.opts)?;
    let o = &args.opts;
    let recipe = format!("train arch={} seed={} epochs={} lr={}", args.arch, o.seed, o.epochs, o.lr);
    net.save(&args.out, &BTreeMap::from([(META_RECIPE.to_string(), recipe)]), &[])?;
    println!("test accuracy {:.2}% on {} digits", 100.0 * net.accuracy(&data.test)?, data.test.len());
    println!("wrote {}", args.out.display());
    Ok(())
}
