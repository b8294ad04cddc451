//! `cargo xtask inspect FILE`: what a safetensors or GGUF file holds.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;

use candle_core::Device;
use pare_core_tensor::io::{SafeTensorsFile, load_weights};

/// Arguments of `cargo xtask inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// The safetensors or GGUF file.
    file: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Built whole, then written once: `inspect | head` must not panic on a closed pipe.
    let o = if pare_core_tensor::io::is_gguf(&args.file) { gguf(&args)? } else { safetensors(&args)? };
    match std::io::stdout().lock().write_all(o.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// A metadata value cut to 120 characters.
fn short(v: &str) -> String {
    if v.len() > 120 { format!("{}… ({} chars)", &v[..v.floor_char_boundary(117)], v.len()) } else { v.to_string() }
}

/// A GGUF file: its metadata, every tensor's GGML type, shape and bytes, and the weights pare
/// reads from it (Q8_0/Q4_0 as int8/int4 codes, the rest dense).
fn gguf(args: &Args) -> anyhow::Result<String> {
    use candle_core::quantized::gguf_file;
    let mut o = String::new();
    let mut f = std::fs::File::open(&args.file).with_context(|| format!("open {}", args.file.display()))?;
    let content = gguf_file::Content::read(&mut f)
        .map_err(|e| anyhow::anyhow!("{}: not a GGUF file: {e}", args.file.display()))?;
    let size = std::fs::metadata(&args.file)?.len();
    writeln!(o, "{}: GGUF, {} tensors, {size} bytes", args.file.display(), content.tensor_infos.len())?;
    if !content.metadata.is_empty() {
        writeln!(o, "\nmetadata:")?;
        let meta: std::collections::BTreeMap<_, _> = content.metadata.iter().collect();
        for (k, v) in meta {
            let text = match v.to_string() {
                Ok(s) => s.clone(),
                Err(_) => format!("{v:?}"),
            };
            writeln!(o, "  {k} = {}", short(&text))?;
        }
    }
    let infos: std::collections::BTreeMap<_, _> = content.tensor_infos.iter().collect();
    let width = infos.keys().map(|k| k.len()).max().unwrap_or(4).max(4);
    writeln!(o, "\n{:<width$}  {:<7}  {:<18}  {:>12}", "name", "type", "shape", "bytes")?;
    let mut total = 0;
    for (name, info) in &infos {
        let t = info.ggml_dtype;
        let bytes = info.shape.elem_count() / t.block_size() * t.type_size();
        total += bytes;
        writeln!(
            o,
            "{name:<width$}  {:<7}  {:<18}  {bytes:>12}",
            format!("{t:?}"),
            format!("{:?}", info.shape.dims())
        )?;
    }
    writeln!(o, "{:<width$}  {:<7}  {:<18}  {total:>12}", "total", "", "")?;
    let (weights, _) = pare_core_tensor::io::load_gguf(&args.file, &Device::Cpu)?;
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
    Ok(o)
}

fn safetensors(args: &Args) -> anyhow::Result<String> {
    let mut o = String::new();
    let file = SafeTensorsFile::open(&args.file)?;
    let size = std::fs::metadata(&args.file)?.len();
    writeln!(o, "{}: {} tensors, {size} bytes", args.file.display(), file.tensors().len())?;
    if !file.metadata().is_empty() {
        writeln!(o, "\nmetadata:")?;
        for (k, v) in file.metadata() {
            writeln!(o, "  {k} = {}", short(v))?;
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
    Ok(o)
}
