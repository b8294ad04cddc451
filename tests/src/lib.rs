//! pare-tests: workspace integration tests (in `tests/pare/`) and the helpers they share.

use std::path::PathBuf;

// README's Rust examples compile and run as doctests, so the tour cannot drift from the code.
#[doc = include_str!("../../README.md")]
mod readme {}

/// The MiniLM folder from `PARE_MINILM_DIR`, or `None` with a message on stderr saying why the
/// calling test is skipped. When `PARE_REQUIRE_MINILM` is set (CI sets it), a missing folder
/// is an error instead, so CI can never pass by skipping.
pub fn minilm_dir(test: &str) -> anyhow::Result<Option<PathBuf>> {
    match std::env::var_os("PARE_MINILM_DIR") {
        Some(d) if PathBuf::from(&d).join("model.safetensors").is_file() => Ok(Some(PathBuf::from(d))),
        other => {
            let why = match other {
                Some(d) => format!("PARE_MINILM_DIR={} holds no model.safetensors", PathBuf::from(d).display()),
                None => "PARE_MINILM_DIR is not set".to_string(),
            };
            if std::env::var_os("PARE_REQUIRE_MINILM").is_some() {
                anyhow::bail!("{test}: {why}, and PARE_REQUIRE_MINILM forbids skipping");
            }
            eprintln!(
                "SKIPPED {test}: {why}; fetch the model with ../shared/tools/fetch-minilm.sh DIR and export PARE_MINILM_DIR=DIR"
            );
            Ok(None)
        }
    }
}

/// The workspace root (for `data/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

/// A digits network of architecture `arch` (`mlp:128,64`, `cnn:16,32:64`, ...) trained for
/// `epochs` on the embedded digits from seed 7 (AdamW 3e-3, batches of 32): a quick, real,
/// deterministic model for tests that need trained weights but not the best accuracy.
pub fn trained_digits(arch: &str, epochs: usize) -> anyhow::Result<pare_models::digits::DigitsNet> {
    use pare_core_tensor::train::{LrSchedule, OptimizerKind, TrainConfig};
    use pare_models::digits::{DigitsArch, DigitsNet, fit};
    let dev = candle_core::Device::Cpu;
    let data = pare_core_tensor::data::digits(42, &dev)?;
    let vars = candle_nn::VarMap::new();
    let net = DigitsNet::init(arch.parse::<DigitsArch>()?, 7, &dev, &vars)?;
    let cfg = TrainConfig {
        epochs,
        batch_size: 32,
        optimizer: OptimizerKind::adamw(3e-3),
        schedule: LrSchedule::Constant,
        seed: 7,
        patience: None,
        checkpoint: None,
    };
    fit(&net, &vars, &data, &cfg, &mut |_| {})?;
    Ok(net)
}
