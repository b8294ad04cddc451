//! `cargo xtask inspect FILE`: what a safetensors file holds.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use candle_core::Device;
use pare_core_tensor::io::{SafeTensorsFile, load_weights};

/// Arguments of `cargo xtask inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// The safetensors file.
    file: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Built whole, then written once: `inspect | head` must not panic on a closed pipe.
    let mut o = String::new();
    let file = SafeTensorsFile::open(&args.file)?;
    let size = std::fs::metadata(&args.file)?.len();
    writeln!(o, "{}: {} tensors, {size} bytes", args.file.display(), file.tensors().len())?;
    if !file.metadata().is_empty() {
        writeln!(o, "\nmetadata:")?;
        for (k, v) in file.metadata() {
            let v = if v.len() > 120 {
                format!("{}… ({} chars)", &v[..v.floor_char_boundary(117)], v.len())
            } else {
                v.clone()
            };
            writeln!(o, "  {k} = {v}")?;
        }
    }
    let width = file.tensors().keys().map(String::len).max().unwrap_or(4).max(4);
    writeln!(o, "\n{:<width$}  {:<7}  {:<18}  {:>12}", "name", "dtype", "shape", "bytes")?;
    let mut total = 0;
    for (name, info) in file.tensors() {
        writeln!(
            o,
            "{name:<width$}  {:<7}  {:<18}  {:>12}",
            info.dtype.name(),
            format!("{:?}", info.shape),
            info.bytes()
        )?;
        total += info.bytes();
    }
    writeln!(o, "{:<width$}  {:<7}  {:<18}  {total:>12}", "total", "", "")?;

    // When the file holds packed pare weights, also show each logical weight's format.
    if file.metadata().keys().any(|k| k.starts_with("pare.quant.") || k.starts_with("pare.sparse.")) {
        let (weights, _) = load_weights(&args.file, &Device::Cpu)?;
        writeln!(o, "\npare weights:")?;
        for (name, w) in &weights {
            writeln!(
                o,
                "  {name:<width$}  {:<18}  {:>12}  {}",
                format!("{:?}", w.shape()),
                w.storage_bytes(),
                w.describe()
            )?;
        }
    }
    match std::io::stdout().lock().write_all(o.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
