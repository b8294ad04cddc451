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

/// The metadata block: one `key = value` line each, values cut to 120 characters.
fn metadata<'a>(o: &mut String, entries: impl IntoIterator<Item = (&'a String, String)>) -> std::fmt::Result {
    let mut entries = entries.into_iter().peekable();
    if entries.peek().is_some() {
        writeln!(o, "\nmetadata:")?;
        for (k, v) in entries {
            writeln!(o, "  {k} = {}", short(&v))?;
        }
    }
    Ok(())
}

/// The tensor table (name, type, shape, bytes per row) with its total.
fn tensor_table(o: &mut String, kind: &str, rows: &[(&str, String, String, usize)]) -> std::fmt::Result {
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(4).max(4);
    writeln!(o, "\n{:<width$}  {:<7}  {:<18}  {:>12}", "name", kind, "shape", "bytes")?;
    for (name, ty, shape, bytes) in rows {
        writeln!(o, "{name:<width$}  {ty:<7}  {shape:<18}  {bytes:>12}")?;
    }
    let total: usize = rows.iter().map(|r| r.3).sum();
    writeln!(o, "{:<width$}  {:<7}  {:<18}  {total:>12}", "total", "", "")
}

/// Each logical weight pare reads from the file, with its format.
fn pare_weights(
    o: &mut String,
    weights: &std::collections::BTreeMap<String, pare_core_tensor::Weight>,
) -> std::fmt::Result {
    let width = weights.keys().map(String::len).max().unwrap_or(4).max(4);
    writeln!(o, "\npare weights:")?;
    for (name, w) in weights {
        writeln!(
            o,
            "  {name:<width$}  {:<18}  {:>12}  {}",
            format!("{:?}", w.shape()),
            w.storage_bytes(),
            w.describe()
        )?;
    }
    Ok(())
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
    let meta: std::collections::BTreeMap<_, _> = content.metadata.iter().collect();
    metadata(
        &mut o,
        meta.into_iter().map(|(k, v)| (k, v.to_string().map_or_else(|_| format!("{v:?}"), Clone::clone))),
    )?;
    let infos: std::collections::BTreeMap<_, _> = content.tensor_infos.iter().collect();
    let rows: Vec<_> = infos
        .iter()
        .map(|(name, info)| {
            let t = info.ggml_dtype;
            let bytes = info.shape.elem_count() / t.block_size() * t.type_size();
            (name.as_str(), format!("{t:?}"), format!("{:?}", info.shape.dims()), bytes)
        })
        .collect();
    tensor_table(&mut o, "type", &rows)?;
    pare_weights(&mut o, &pare_core_tensor::io::load_gguf(&args.file, &Device::Cpu)?.0)?;
    Ok(o)
}

fn safetensors(args: &Args) -> anyhow::Result<String> {
    let mut o = String::new();
    let file = SafeTensorsFile::open(&args.file)?;
    let size = std::fs::metadata(&args.file)?.len();
    writeln!(o, "{}: {} tensors, {size} bytes", args.file.display(), file.tensors().len())?;
    metadata(&mut o, file.metadata().iter().map(|(k, v)| (k, v.clone())))?;
    let rows: Vec<_> = file
        .tensors()
        .iter()
        .map(|(name, info)| (name.as_str(), info.dtype.name().to_string(), format!("{:?}", info.shape), info.bytes()))
        .collect();
    tensor_table(&mut o, "dtype", &rows)?;
    // When the file holds packed pare weights, also show each logical weight's format.
    if file.metadata().keys().any(|k| k.starts_with("pare.quant.") || k.starts_with("pare.sparse.")) {
        pare_weights(&mut o, &load_weights(&args.file, &Device::Cpu)?.0)?;
    }
    Ok(o)
}
