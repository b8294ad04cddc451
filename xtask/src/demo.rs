//! `cargo xtask demo`: trains the digits CNN teacher and prints its size, accuracy and speed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use pare_core_tensor::data::digits;
use pare_core_tensor::metrics::MacCounter;
use pare_core_tensor::{Hooks, Module};
use pare_models::digits::{DigitsArch, time_forward};

/// Arguments of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    opts: crate::train::TrainOpts,
    /// Folder for the trained teacher.
    #[arg(long, default_value = "target/demo")]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
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
