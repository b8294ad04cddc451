//! The compressed-tensors layout (neuralmagic / vLLM, `quant_method: "compressed-tensors"`)
//! that vLLM and transformers load: quantized linear weights as `int-quantized` (codes in an I8
//! `weight`) or `pack-quantized` (4- or 8-bit codes packed little-endian into I32
//! `weight_packed`, with `weight_shape`), `weight_scale` shaped `[1]` per tensor, `[out, 1]` per
//! channel or `[out, in/group]` per group, `weight_zero_point` for asymmetric schemes (I8, or
//! packed into I32 along the output axis in `pack-quantized`), and `input_scale` /
//! `input_zero_point` for static activations. `config.json` carries the `quantization_config`.
//!
//! Codes are signed in compressed-tensors whatever the symmetry (`q ∈ [−2^(b−1), 2^(b−1) − 1]`,
//! `r = S · (q − Z)`); pare's asymmetric codes are unsigned, so both `q` and `Z` shift by
//! `2^(b−1)` on the way out and back, leaving `q − Z` — and every value — unchanged.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use serde_json::{Value, json};

use super::{RawTensor, SafeTensorsFile, StDtype};
use crate::act::{ActQuant, ActRange, META_ACT};
use crate::quant::{Granularity, Mapping, QuantScheme, QuantizedTensor};
use crate::{Error, Result, Weight};

/// The `quant_method` of a compressed-tensors `quantization_config`.
pub const QUANT_METHOD: &str = "compressed-tensors";
/// The compressed-tensors library version whose layout pare writes.
pub const FORMAT_VERSION: &str = "0.12.2";

fn unsupported(name: &str, detail: impl Into<String>) -> Error {
    Error::invalid(format!("compressed-tensors export of `{name}`"), detail)
}

/// One layer's weight arguments as compressed-tensors spells them.
fn weight_args(name: &str, q: &QuantizedTensor) -> Result<Value> {
    let s = q.scheme();
    if s.mapping != Mapping::Linear || !(2..=8).contains(&s.bits) {
        return Err(unsupported(
            name,
            format!("expected an int2..int8 linear scheme, found {}", Weight::Quantized(q.clone()).describe()),
        ));
    }
    if q.shape().len() != 2 {
        return Err(unsupported(name, format!("expected a 2-D linear weight, found shape {:?}", q.shape())));
    }
    let (strategy, group) = match s.granularity {
        Granularity::PerTensor => ("tensor", Value::Null),
        Granularity::PerChannel { axis: 0 } => ("channel", Value::Null),
        Granularity::PerGroup { size } => ("group", json!(size)),
        g => {
            return Err(unsupported(
                name,
                format!("expected per-tensor, per-channel (axis 0) or per-group scales, found {g:?}"),
            ));
        }
    };
    Ok(json!({
        "num_bits": s.bits, "type": "int", "symmetric": s.symmetric, "strategy": strategy,
        "group_size": group, "block_structure": null, "dynamic": false, "actorder": null,
        "observer": "minmax", "observer_kwargs": {}
    }))
}

fn input_args(layer: &str, a: &ActQuant) -> Result<Value> {
    if a.smooth.is_some() {
        return Err(unsupported(
            layer,
            "SmoothQuant factors have no place in compressed-tensors (llm-compressor folds them into a preceding \
             norm, which post-LN BERT does not have): export without --smooth",
        ));
    }
    let (strategy, dynamic) = match a.range {
        ActRange::Dynamic { per_token: true } => ("token", true),
        ActRange::Dynamic { per_token: false } => ("tensor", true),
        ActRange::Static { .. } => ("tensor", false),
    };
    Ok(json!({
        "num_bits": a.bits, "type": "int", "symmetric": a.symmetric, "strategy": strategy,
        "group_size": null, "block_structure": null, "dynamic": dynamic, "actorder": null,
        "observer": if dynamic { Value::Null } else { json!("minmax") }, "observer_kwargs": {}
    }))
}

fn scale_shape(q: &QuantizedTensor) -> Vec<usize> {
    let (rows, cols) = (q.shape()[0], q.shape()[1]);
    match q.scheme().granularity {
        Granularity::PerChannel { .. } => vec![rows, 1],
        Granularity::PerGroup { size } => vec![rows, cols / size],
        _ => vec![1],
    }
}

fn floats(values: &[f32], dtype: DType, shape: Vec<usize>) -> RawTensor {
    let (dtype, data) = match dtype {
        DType::F16 => (StDtype::F16, values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
        DType::BF16 => (StDtype::Bf16, values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect()),
        _ => (StDtype::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
    };
    RawTensor { dtype, shape, data }
}

fn i8s(values: &[i32], shape: Vec<usize>) -> RawTensor {
    RawTensor { dtype: StDtype::I8, shape, data: values.iter().map(|v| *v as i8 as u8).collect() }
}

/// Packs signed `bits`-bit values of a `[rows, cols]` matrix into I32 words along `axis` (1:
/// along each row, `[rows, ⌈cols/f⌉]`; 0: down each column, `[⌈rows/f⌉, cols]`), `f = 32/bits`
/// values per word, value `k` of a word in bits `k·bits..`, zero-padded: compressed-tensors'
/// `pack_to_int32`.
pub fn pack_i32(values: &[i32], rows: usize, cols: usize, bits: u8, axis: usize) -> (Vec<i32>, Vec<usize>) {
    let f = 32 / bits as usize;
    let offset = 1i32 << (bits - 1);
    let code = |r: usize, c: usize| ((values[r * cols + c] + offset) as u32) & ((1u32 << bits) - 1);
    if axis == 1 {
        let words = cols.div_ceil(f);
        let mut out = vec![0i32; rows * words];
        for r in 0..rows {
            for c in 0..cols {
                out[r * words + c / f] |= (code(r, c) << (bits as usize * (c % f))) as i32;
            }
        }
        (out, vec![rows, words])
    } else {
        let words = rows.div_ceil(f);
        let mut out = vec![0i32; words * cols];
        for r in 0..rows {
            for c in 0..cols {
                out[(r / f) * cols + c] |= (code(r, c) << (bits as usize * (r % f))) as i32;
            }
        }
        (out, vec![words, cols])
    }
}

/// The inverse of [`pack_i32`]: `rows × cols` signed values.
pub fn unpack_i32(words: &[i32], rows: usize, cols: usize, bits: u8, axis: usize) -> Vec<i32> {
    let f = 32 / bits as usize;
    let offset = 1i32 << (bits - 1);
    let mask = (1u32 << bits) - 1;
    let wcols = if axis == 1 { cols.div_ceil(f) } else { cols };
    (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let (w, k) =
                if axis == 1 { (words[r * wcols + c / f], c % f) } else { (words[(r / f) * wcols + c], r % f) };
            (((w as u32) >> (bits as usize * k)) & mask) as i32 - offset
        })
        .collect()
}

fn i32s(values: &[i32], shape: Vec<usize>) -> RawTensor {
    RawTensor { dtype: StDtype::I32, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
}

/// The layout of a model's weights in compressed-tensors: every tensor to write, and the
/// `quantization_config` for config.json. `weights` are named by tensor (`PATH.weight`);
/// `inputs` are the layers' activation specs by layer path. Quantized weights need an
/// int2..int8 linear scheme on a 2-D weight; dense ones are written as they are.
pub fn encode(
    weights: &BTreeMap<String, Weight>,
    inputs: &BTreeMap<String, ActQuant>,
) -> Result<(BTreeMap<String, RawTensor>, Value)> {
    let mut tensors = BTreeMap::new();
    // (format, weight args, input args) → target layers
    let mut groups: BTreeMap<String, (Value, Vec<String>)> = BTreeMap::new();
    for (name, w) in weights {
        let q = match w {
            Weight::Dense(t) => {
                tensors.insert(name.clone(), RawTensor::from_tensor(t)?);
                continue;
            }
            Weight::Sparse(_) => {
                return Err(unsupported(name, "sparse weights are not a compressed-tensors quantization format"));
            }
            Weight::Quantized(q) => q,
        };
        let layer = name
            .strip_suffix(".weight")
            .ok_or_else(|| unsupported(name, "a quantized tensor must be a layer's `.weight`"))?;
        let wargs = weight_args(name, q)?;
        let input = inputs.get(layer).map(|a| input_args(layer, a)).transpose()?;
        let s = q.scheme();
        let (rows, cols) = (q.shape()[0], q.shape()[1]);
        let offset = if s.symmetric { 0 } else { 1i32 << (s.bits - 1) };
        // pare's values: signed codes c − 2^(b−1) when symmetric, unsigned c when not.
        let signed: Vec<i32> = q.codes().iter().map(|&c| i32::from(c) + s.q_min() - offset).collect();
        let zeros: Option<Vec<i32>> = q.zero_points().map(|z| z.iter().map(|z| z - offset).collect());
        let packed = input.is_none() && matches!(s.bits, 4 | 8);
        let format = if packed { "pack-quantized" } else { "int-quantized" };
        let sshape = scale_shape(q);
        tensors.insert(format!("{layer}.weight_scale"), floats(q.scales(), q.dtype(), sshape.clone()));
        if packed {
            let (words, shape) = pack_i32(&signed, rows, cols, s.bits, 1);
            tensors.insert(format!("{layer}.weight_packed"), i32s(&words, shape));
            tensors.insert(
                format!("{layer}.weight_shape"),
                RawTensor {
                    dtype: StDtype::I64,
                    shape: vec![2],
                    data: [rows as i64, cols as i64].iter().flat_map(|v| v.to_le_bytes()).collect(),
                },
            );
        } else {
            tensors.insert(format!("{layer}.weight"), i8s(&signed, vec![rows, cols]));
        }
        if let Some(z) = &zeros {
            let zt = if packed && sshape.len() == 2 {
                let (words, shape) = pack_i32(z, sshape[0], sshape[1], s.bits, 0);
                i32s(&words, shape)
            } else {
                i8s(z, sshape.clone())
            };
            tensors.insert(format!("{layer}.weight_zero_point"), zt);
        }
        if let Some(a) = inputs.get(layer)
            && let ActRange::Static { scale, zero_point } = a.range
        {
            tensors.insert(format!("{layer}.input_scale"), floats(&[scale], q.dtype(), vec![1]));
            if !a.symmetric {
                let z = zero_point - (1 << (a.bits - 1));
                tensors.insert(format!("{layer}.input_zero_point"), i8s(&[z], vec![1]));
            }
        }
        let key = serde_json::to_string(&(format, &wargs, &input)).expect("JSON values serialise");
        let scheme = json!({
            "weights": wargs, "input_activations": input, "output_activations": null, "format": format
        });
        groups.entry(key).or_insert_with(|| (scheme, Vec::new())).1.push(layer.to_string());
    }
    for layer in inputs.keys() {
        if !weights.contains_key(&format!("{layer}.weight"))
            || !matches!(weights[&format!("{layer}.weight")], Weight::Quantized(_))
        {
            return Err(unsupported(
                layer,
                "compressed-tensors quantizes a layer's inputs only together with its weight: quantize the weight too",
            ));
        }
    }
    let formats: std::collections::BTreeSet<&str> =
        groups.values().map(|(s, _)| s["format"].as_str().unwrap_or_default()).collect();
    let format = match formats.len() {
        1 => formats.iter().next().copied().unwrap_or_default().to_string(),
        _ => "mixed-precision".to_string(),
    };
    let config_groups: serde_json::Map<String, Value> = groups
        .into_values()
        .enumerate()
        .map(|(i, (mut scheme, targets))| {
            scheme["targets"] = json!(targets);
            (format!("group_{i}"), scheme)
        })
        .collect();
    let config = json!({
        "quant_method": QUANT_METHOD,
        "format": format,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
        "kv_cache_scheme": null,
        "global_compression_ratio": null,
        "version": FORMAT_VERSION,
    });
    Ok((tensors, config))
}

fn args_field<'a>(args: &'a Value, key: &str, ctx: &str) -> Result<&'a Value> {
    args.get(key).ok_or_else(|| Error::invalid(ctx.to_string(), format!("missing `{key}`")))
}

/// Reads a compressed-tensors `model.safetensors` given the folder's `quantization_config`:
/// every weight (quantized ones as [`QuantizedTensor`]s, others dense) and metadata entries
/// `pare.act.PATH` for the layers whose inputs are quantized, ready for
/// [`crate::act::apply_metadata`]. Targets may be layer names or the class name `Linear`
/// (every layer with a `weight_scale`, minus `ignore`).
pub fn load(
    path: impl AsRef<Path>,
    config: &Value,
    device: &Device,
) -> Result<(BTreeMap<String, Weight>, BTreeMap<String, String>)> {
    let file = SafeTensorsFile::open(path)?;
    let bad = |what: String| Error::Malformed { path: file.path().to_path_buf(), what };
    if config.get("quant_method").and_then(Value::as_str) != Some(QUANT_METHOD) {
        return Err(bad(format!("quantization_config.quant_method is not `{QUANT_METHOD}`")));
    }
    let ignore: Vec<&str> = config
        .get("ignore")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let scaled: Vec<String> =
        file.tensors().keys().filter_map(|k| k.strip_suffix(".weight_scale").map(String::from)).collect();
    let groups = config
        .get("config_groups")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("quantization_config has no config_groups".into()))?;
    let global_format = config.get("format").and_then(Value::as_str).unwrap_or("int-quantized");
    let mut claimed = std::collections::HashSet::new();
    let mut weights = BTreeMap::new();
    let mut meta = BTreeMap::new();
    for (gname, scheme) in groups {
        let ctx = format!("quantization_config.config_groups.{gname}");
        let format = scheme.get("format").and_then(Value::as_str).unwrap_or(global_format);
        let wargs = args_field(scheme, "weights", &ctx)?;
        let targets = args_field(scheme, "targets", &ctx)?.as_array().cloned().unwrap_or_default();
        let mut layers = Vec::new();
        for t in targets.iter().filter_map(Value::as_str) {
            if t == "Linear" {
                layers.extend(scaled.iter().filter(|l| !ignore.contains(&l.as_str())).cloned());
            } else if t.starts_with("re:") {
                return Err(bad(format!("{ctx}: regex target `{t}` is not supported; name the layers")));
            } else {
                layers.push(t.to_string());
            }
        }
        let bits = args_field(wargs, "num_bits", &ctx)?
            .as_u64()
            .filter(|b| (2..=8).contains(b))
            .ok_or_else(|| bad(format!("{ctx}.weights.num_bits: expected 2..=8, found {}", wargs["num_bits"])))?
            as u8;
        if wargs.get("type").and_then(Value::as_str) != Some("int") {
            return Err(bad(format!("{ctx}.weights.type: expected \"int\", found {}", wargs["type"])));
        }
        let symmetric = wargs.get("symmetric").and_then(Value::as_bool).unwrap_or(true);
        let granularity = match args_field(wargs, "strategy", &ctx)?.as_str() {
            Some("tensor") => Granularity::PerTensor,
            Some("channel") => Granularity::PerChannel { axis: 0 },
            Some("group") => Granularity::PerGroup {
                size: wargs
                    .get("group_size")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| bad(format!("{ctx}: group without group_size")))? as usize,
            },
            other => {
                return Err(bad(format!("{ctx}.weights.strategy: expected tensor, channel or group, found {other:?}")));
            }
        };
        let scheme_q = QuantScheme { bits, signed: symmetric, symmetric, mapping: Mapping::Linear, granularity };
        let offset = if symmetric { 0 } else { 1i32 << (bits - 1) };
        for layer in layers {
            let get = |k: &str| format!("{layer}.{k}");
            let scale_info = file.info(&get("weight_scale"))?;
            let float_dtype = scale_info.dtype.candle().filter(|d| d.is_float()).ok_or_else(|| {
                bad(format!("`{}` must be a float tensor, found {}", get("weight_scale"), scale_info.dtype.name()))
            })?;
            let scales = file
                .tensor(&get("weight_scale"), &Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let (values, shape) = if format == "pack-quantized" {
                let dims = file.typed(&get("weight_shape"), StDtype::I64, |b| {
                    i64::from_le_bytes(b.try_into().expect("8 bytes"))
                })?;
                let [rows, cols] = dims[..] else {
                    return Err(bad(format!("`{}` must hold 2 values, found {}", get("weight_shape"), dims.len())));
                };
                let (rows, cols) = (rows.max(0) as usize, cols.max(0) as usize);
                let words = file.typed(&get("weight_packed"), StDtype::I32, |b| {
                    i32::from_le_bytes(b.try_into().expect("4 bytes"))
                })?;
                let need = rows * cols.div_ceil(32 / bits as usize);
                if words.len() != need {
                    return Err(bad(format!(
                        "`{}`: expected {need} words for {rows}×{cols}, found {}",
                        get("weight_packed"),
                        words.len()
                    )));
                }
                (unpack_i32(&words, rows, cols, bits, 1), vec![rows, cols])
            } else {
                let info = file.info(&get("weight"))?;
                let v = file.typed(&get("weight"), StDtype::I8, |b| i32::from(b[0] as i8))?;
                (v, info.shape.clone())
            };
            let zeros = if symmetric {
                None
            } else {
                let n = scales.len();
                let zinfo = file.info(&get("weight_zero_point"))?;
                let z = if zinfo.dtype == StDtype::I32 {
                    let words = file.typed(&get("weight_zero_point"), StDtype::I32, |b| {
                        i32::from_le_bytes(b.try_into().expect("4 bytes"))
                    })?;
                    let cols = *scale_info.shape.last().unwrap_or(&1);
                    unpack_i32(&words, n / cols.max(1), cols, bits, 0)
                } else {
                    file.typed(&get("weight_zero_point"), StDtype::I8, |b| i32::from(b[0] as i8))?
                };
                Some(z.iter().map(|z| z + offset).collect())
            };
            let codes: Vec<u8> = values.iter().map(|&v| (v + offset - scheme_q.q_min()) as u8).collect();
            let q = QuantizedTensor::from_codes(&codes, scheme_q, scales, zeros, None, shape, float_dtype)
                .map_err(|e| bad(format!("weight `{}`: {e}", get("weight"))))?;
            weights.insert(get("weight"), Weight::Quantized(q));
            for k in [
                "weight",
                "weight_packed",
                "weight_shape",
                "weight_scale",
                "weight_zero_point",
                "input_scale",
                "input_zero_point",
            ] {
                claimed.insert(get(k));
            }
            if let Some(iargs) = scheme.get("input_activations").filter(|v| !v.is_null()) {
                let abits = iargs.get("num_bits").and_then(Value::as_u64).unwrap_or(8) as u8;
                let asym = !iargs.get("symmetric").and_then(Value::as_bool).unwrap_or(true);
                let dynamic = iargs.get("dynamic").and_then(Value::as_bool).unwrap_or(false);
                let token = iargs.get("strategy").and_then(Value::as_str) == Some("token");
                let range = if dynamic {
                    ActRange::Dynamic { per_token: token }
                } else {
                    let scale = file
                        .tensor(&get("input_scale"), &Device::Cpu)?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    let z = if asym {
                        file.typed(&get("input_zero_point"), StDtype::I8, |b| i32::from(b[0] as i8))?
                    } else {
                        vec![0]
                    };
                    let (Some(&scale), Some(&z)) = (scale.first(), z.first()) else {
                        return Err(bad(format!("`{}`: expected one value", get("input_scale"))));
                    };
                    ActRange::Static { scale, zero_point: if asym { z + (1 << (abits - 1)) } else { 0 } }
                };
                let a = ActQuant::new(abits, !asym, range);
                a.validate(&layer)?;
                meta.insert(format!("{META_ACT}{layer}"), serde_json::to_string(&a).expect("serialises"));
            }
        }
    }
    for name in file.tensors().keys() {
        if !claimed.contains(name) {
            weights.insert(name.clone(), Weight::Dense(file.tensor(name, device)?));
        }
    }
    Ok((weights, meta))
}

#[cfg(test)]
mod tests;
