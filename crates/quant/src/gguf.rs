//! GGUF: llama.cpp's block formats through candle's quantizer and writer.
//!
//! - [`GgufType`] names the block types pare writes (F32, F16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K);
//!   [`GgufType::check`] refuses a tensor whose row is not a whole number of blocks (32
//!   elements, 256 for the K-quants) before any work starts.
//! - [`quantize`] is candle's `QTensor::quantize`; [`to_pare`] re-encodes Q8_0 and Q4_0 blocks
//!   exactly as pare `QuantizedTensor`s (symmetric, per group of 32, the block's f16 scale), so
//!   pare's own kernels run llama.cpp's formats bit for bit.
//! - [`write()`] saves tensors atomically (temp file, fsync, rename), refusing to overwrite an
//!   input; [`read()`] loads any GGUF file back (Q8_0/Q4_0 as pare codes, exactly; other block
//!   types dequantized) plus its string metadata, so a GGUF model pare wrote runs wherever a
//!   float one does; [`from_weight`] writes a pare weight that a GGUF type holds exactly
//!   (float, or Q8_0/Q4_0-shaped codes) without quantizing it again.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use pare_core_tensor::{QuantizedTensor, Weight};

use crate::error::option;
use crate::{Result, finite_values};

/// A GGUF tensor type pare writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// 8-bit, blocks of 32 with an f16 scale (8.5 bits per weight).
    Q8_0,
    /// 4-bit, blocks of 32 with an f16 scale (4.5 bits per weight).
    Q4_0,
    /// 4-bit, blocks of 32 with f16 scale and minimum (5 bits per weight).
    Q4_1,
    /// 4-bit K-quant, super-blocks of 256 (4.5 bits per weight).
    Q4K,
    /// 6-bit K-quant, super-blocks of 256 (6.5625 bits per weight).
    Q6K,
}

impl GgufType {
    /// Parses `f32`, `f16`, `q8_0`, `q4_0`, `q4_1`, `q4_k`, `q6_k`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "f32" => GgufType::F32,
            "f16" | "fp16" => GgufType::F16,
            "q8_0" => GgufType::Q8_0,
            "q4_0" => GgufType::Q4_0,
            "q4_1" => GgufType::Q4_1,
            "q4_k" => GgufType::Q4K,
            "q6_k" => GgufType::Q6K,
            _ => return None,
        })
    }

    /// candle's dtype.
    pub fn ggml(self) -> GgmlDType {
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q4_0 => GgmlDType::Q4_0,
            GgufType::Q4_1 => GgmlDType::Q4_1,
            GgufType::Q4K => GgmlDType::Q4K,
            GgufType::Q6K => GgmlDType::Q6K,
        }
    }

    /// Whether [`to_pare`] converts this type exactly into a pare weight.
    pub fn has_pare_format(self) -> bool {
        matches!(self, GgufType::F32 | GgufType::F16 | GgufType::Q8_0 | GgufType::Q4_0)
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    /// Checks that a tensor `name` of `shape` fits: rank ≥ 1 and a last dimension made of whole blocks.
    pub fn check(self, name: &str, shape: &[usize]) -> Result<()> {
        let b = self.block_size();
        match shape.last() {
            None => Err(option(name, "a scalar cannot be stored in GGUF blocks")),
            Some(&d) if !d.is_multiple_of(b) => Err(option(
                name,
                format!("{self:?} stores rows in blocks of {b}: expected a last dimension divisible by {b}, found {d}"),
            )),
            _ => Ok(()),
        }
    }
}

/// Quantizes `t` (named `name`) into a candle `QTensor` of type `ty`.
pub fn quantize(name: &str, t: &Tensor, ty: GgufType) -> Result<QTensor> {
    ty.check(name, t.dims())?;
    finite_values(name, t)?;
    Ok(QTensor::quantize(&t.to_dtype(DType::F32)?, ty.ggml())?)
}

/// The pare weight holding exactly what llama.cpp's `ty` holds: Q8_0 and Q4_0 as symmetric
/// per-group-32 `QuantizedTensor`s with the blocks' scales, F16 as a dense f16 tensor, F32 as
/// it is. Q4_1 and the K-quants have float block minimums or nested scales with no pare
/// equivalent yet: write them with [`write()`].
pub fn to_pare(name: &str, t: &Tensor, ty: GgufType) -> Result<Weight> {
    match ty {
        GgufType::F32 => return Ok(Weight::Dense(t.to_dtype(DType::F32)?)),
        GgufType::F16 => {
            ty.check(name, t.dims())?;
            finite_values(name, t)?;
            return Ok(Weight::Dense(t.to_dtype(DType::F16)?));
        }
        GgufType::Q8_0 | GgufType::Q4_0 => {}
        other => {
            return Err(option(
                name,
                format!(
                    "{other:?} has no exact pare format yet: expected q8_0, q4_0, f16 or f32, or use --format gguf"
                ),
            ));
        }
    }
    let q = quantize(name, t, ty)?;
    let dtype = if t.dtype() == DType::F16 || t.dtype() == DType::BF16 { t.dtype() } else { DType::F32 };
    Ok(Weight::Quantized(QuantizedTensor::from_ggml_blocks(name, ty.ggml(), &q.data()?, t.dims(), dtype)?))
}

/// `w` as a GGUF tensor that holds it exactly: dense weights as F32 (F16 when they are f16),
/// Q8_0/Q4_0-shaped codes (signed, symmetric, groups of 32, f16-valued scales) as those blocks.
/// Any other format is refused by name: it has no exact GGML block type.
pub fn from_weight(name: &str, w: &Weight) -> Result<QTensor> {
    match w {
        Weight::Dense(t) => {
            let ty = if t.dtype() == DType::F16 { GgmlDType::F16 } else { GgmlDType::F32 };
            let t = if ty == GgmlDType::F16 { t.clone() } else { t.to_dtype(DType::F32)? };
            Ok(QTensor::quantize(&t, ty)?)
        }
        Weight::Quantized(q) => {
            let Some((ty, blocks)) = q.ggml_blocks() else {
                return Err(option(
                    name,
                    format!(
                        "{} has no exact GGUF block type: GGUF holds signed symmetric int8/int4 in groups of 32 \
                         (quantize with scheme q8_0 or q4_0) or float weights",
                        w.describe()
                    ),
                ));
            };
            if q.scales().iter().any(|s| half::f16::from_f32(*s).to_f32() != *s) {
                return Err(option(name, "its scales are not f16 values, so GGUF's f16 block scales would change them: quantize with scheme q8_0 or q4_0".to_string()));
            }
            let storage =
                candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(blocks), &Device::Cpu, ty)?;
            Ok(QTensor::new(storage, q.shape().to_vec())?)
        }
        Weight::Sparse(_) => Err(option(
            name,
            format!("{} has no GGUF type: store it dense (or quantized with q8_0/q4_0) first", w.describe()),
        )),
    }
}

/// Writes `tensors` and string `metadata` as a GGUF file at `dest` atomically (temp file in
/// the same folder, fsync, rename). `inputs` are files the run read, which it refuses to overwrite.
pub fn write(
    dest: &Path,
    tensors: &[(String, QTensor)],
    metadata: &BTreeMap<String, String>,
    inputs: &[&Path],
) -> Result<()> {
    let canon = |p: &Path| p.canonicalize().ok();
    if let Some(d) = canon(dest)
        && inputs.iter().any(|i| canon(i) == Some(d.clone()))
    {
        return Err(pare_core_tensor::Error::OverwriteInput { path: dest.to_path_buf() }.into());
    }
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let io = |action: &'static str, e: std::io::Error| pare_core_tensor::Error::io(action, dest, e);
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| io("create a temp file for", e))?;
    let values: Vec<(String, Value)> = metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    let meta: Vec<(&str, &Value)> = values.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tens: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        gguf_file::write(&mut w, &meta, &tens)?;
        w.flush().map_err(|e| io("write", e))?;
    }
    tmp.as_file().sync_all().map_err(|e| io("sync", e))?;
    let mode = std::fs::metadata(dest).map(|m| m.permissions()).ok();
    tmp.persist(dest).map_err(|e| io("rename into", e.error))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let perm = mode.unwrap_or_else(|| std::fs::Permissions::from_mode(0o644));
        std::fs::set_permissions(dest, perm).map_err(|e| io("set permissions of", e))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads a GGUF file as dense weights and string metadata (see
/// [`pare_core_tensor::io::load_gguf`]).
pub fn read(path: &Path, device: &Device) -> Result<(BTreeMap<String, Weight>, BTreeMap<String, String>)> {
    Ok(pare_core_tensor::io::load_gguf(path, device)?)
}

#[cfg(test)]
mod tests;
