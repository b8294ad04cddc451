//! `cargo xtask demo`: trains the digits CNN teacher and prints its size, accuracy and speed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use pare_core_tensor::data::digits;
use pare_core_tensor::metrics::MacCounter;
use pare_core_tensor::train::{LrSchedule, OptimizerKind, TrainConfig, TrainEvent};
use pare_core_tensor::{Hooks, Module};
use pare_models::digits::{DigitsArch, DigitsNet, fit, time_forward};

/// Arguments of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Seed of the data split, the initialisation and the shuffles.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Maximum training epochs (early stopping may end sooner).
    #[arg(long, default_value_t = 60)]
    epochs: usize,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Folder for the trained teacher.
    #[arg(long, default_value = "target/demo")]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let data = digits(args.seed, &dev)?;
    println!(
        "digits: {} train / {} validation / {} test images (8x8, 10 classes)",
        data.train.len(),
        data.validation.len(),
        data.test.len()
    );
    let vars = candle_nn::VarMap::new();
    let net = DigitsNet::init(DigitsArch::default_cnn(), args.seed, &dev, &vars)?;
    let cfg = TrainConfig {
        epochs: args.epochs,
        batch_size: 32,
        optimizer: OptimizerKind::adamw(args.lr),
        schedule: LrSchedule::Cosine { warmup_steps: 40, min_factor: 0.02 },
        seed: args.seed,
        patience: Some(15),
        checkpoint: None,
    };
    let steps = data.train.len().div_ceil(cfg.batch_size) * cfg.epochs;
    let bar = crate::progress(steps as u64, "train cnn");
    let started = std::time::Instant::now();
    let report = fit(&net, &vars, &data, &cfg, &mut |e| match e {
        TrainEvent::Step { loss, .. } => {
            bar.inc(1);
            bar.set_message(format!("loss {loss:.3}"));
        }
        TrainEvent::Epoch(s) => bar.set_message(format!("val acc {:.3}", s.metric)),
    })?;
    bar.finish_and_clear();
    println!(
        "trained in {:.1} s: {} epochs, best validation accuracy {:.4} at epoch {}{}",
        started.elapsed().as_secs_f64(),
        report.history.len(),
        report.best_metric,
        report.best_epoch + 1,
        if report.stopped_early { " (stopped early)" } else { "" }
    );

    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let path = args.out.join("teacher.safetensors");
    net.save(&path, &BTreeMap::new(), &[])?;

    let test_acc = net.accuracy(&data.test)?;
    let mut macs = MacCounter::default();
    let one = data.test.x.narrow(0, 0, 1)?;
    net.forward_hooked(&one, &mut Hooks::with(&mut macs))?;
    let batch = data.test.x.narrow(0, 0, 64.min(data.test.len()))?;
    let latency = time_forward(&net, &batch, 50)?;
    let bytes = std::fs::metadata(&path)?.len();

    println!();
    println!(
        "| model       | parameters | weight bytes | file bytes | MACs/image | test accuracy | latency / batch of 64 |"
    );
    println!(
        "|-------------|-----------:|-------------:|-----------:|-----------:|--------------:|----------------------:|"
    );
    println!(
        "| teacher CNN | {:>10} | {:>12} | {:>10} | {:>10} | {:>12.2}% | {:>18.3} ms |",
        net.parameter_count(),
        net.storage_bytes(),
        bytes,
        macs.total(),
        100.0 * test_acc,
        latency * 1e3
    );
    println!("\nsaved {}", path.display());
    Ok(())
}
