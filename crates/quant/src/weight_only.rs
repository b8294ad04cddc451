//! Weight-only quantization of whole models: pick a method, select layers by path glob (the
//! embeddings and the final classifier stay float unless named), check every selected layer
//! before touching any, quantize, and report each layer's error and size.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use pare_core_tensor::{Granularity, Module, QuantScheme, Weight};

use crate::codebook::{kmeans, nf4, quantile};
use crate::error::option;
use crate::float::{Fp8, Half, to_fp8, to_half};
use crate::linear::{LinearSpec, quantize_linear};
use crate::{Error, Result, finite_values};

/// A weight quantization method.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// Linear range mapping, round to nearest.
    Int(LinearSpec),
    /// Linear range mapping with each group's clipping range searched for the least error.
    IntClip(LinearSpec),
    /// GPTQ: linear mapping with error compensation from the calibration Hessian (linear
    /// layers; convolutions fall back to the clipping search). Needs Hessians: use
    /// [`crate::gptq::collect_hessians`] and [`quantize_model_with`].
    Gptq(LinearSpec, crate::gptq::GptqConfig),
    /// NF4 rounded by GPTQ's error compensation (linear layers with Hessians; otherwise plain
    /// NF4).
    Nf4Gptq {
        /// Elements per scale along each row.
        group: usize,
        /// GPTQ's options.
        cfg: crate::gptq::GptqConfig,
    },
    /// NF4 with per-group absmax scales.
    Nf4 {
        /// Elements per scale along each row.
        group: usize,
    },
    /// Quantile (equal-population) codebook per tensor.
    Quantile {
        /// Bits per code.
        bits: u8,
    },
    /// k-means codebook per tensor.
    KMeans {
        /// Bits per code.
        bits: u8,
        /// Seed for re-seeding empty clusters.
        seed: u64,
    },
    /// FP8 with an absmax scale per output channel.
    Fp8(Fp8),
    /// FP16 or BF16.
    Half(Half),
    /// A llama.cpp block type, quantized by candle: Q8_0 and Q4_0 convert exactly to pare's
    /// format; the others are written with `--format gguf`.
    Gguf(crate::gguf::GgufType),
}

fn parse_bits(s: &str, prefix: &str, scheme: &str) -> Result<u8> {
    s.strip_prefix(prefix)
        .and_then(|b| b.parse().ok())
        .ok_or_else(|| option("--scheme", format!("expected {prefix}N, found `{scheme}`")))
}

impl Method {
    /// With `algo` `rtn` (round to nearest), `clip` (clipping search) or `gptq`, for the
    /// integer schemes.
    pub fn with_algo(self, algo: &str) -> Result<Self> {
        match (self, algo) {
            (m, "rtn") => Ok(m),
            (Method::Int(s), "clip") => Ok(Method::IntClip(s)),
            (Method::Int(s), "gptq") => Ok(Method::Gptq(s, crate::gptq::GptqConfig::default())),
            (Method::Nf4 { group }, "gptq") => Ok(Method::Nf4Gptq { group, cfg: crate::gptq::GptqConfig::default() }),
            (Method::Int(_), other) => Err(option("--algo", format!("expected rtn, clip or gptq, found `{other}`"))),
            (_, other) => {
                Err(option("--algo", format!("`{other}` applies to the int2..int8 schemes (and gptq to nf4) only")))
            }
        }
    }

    /// Whether the method rounds with calibration Hessians (GPTQ).
    pub fn needs_hessians(&self) -> bool {
        matches!(self, Method::Gptq(..) | Method::Nf4Gptq { .. })
    }

    /// Parses the command line's `--scheme` (int2..int8, nf4, quantileN, kmeansN, fp8-e4m3,
    /// fp8-e5m2, fp16, bf16), `--granularity` (tensor, channel, group:N) and `--symmetric`.
    pub fn parse(scheme: &str, granularity: &str, symmetric: bool) -> Result<Self> {
        let gran = match granularity {
            "tensor" => Granularity::PerTensor,
            "channel" => Granularity::PerChannel { axis: 0 },
            g => match g.strip_prefix("group:").and_then(|n| n.parse::<usize>().ok()) {
                Some(size) if size > 0 => Granularity::PerGroup { size },
                _ => {
                    return Err(option(
                        "--granularity",
                        format!("expected tensor, channel or group:N with N ≥ 1, found `{g}`"),
                    ));
                }
            },
        };
        let m = match scheme {
            "nf4" => Method::Nf4 {
                group: match gran {
                    Granularity::PerGroup { size } => size,
                    _ => 64,
                },
            },
            "fp8-e4m3" => Method::Fp8(Fp8::E4M3),
            "fp8-e5m2" => Method::Fp8(Fp8::E5M2),
            "fp16" => Method::Half(Half::F16),
            s if crate::gguf::GgufType::parse(s).is_some() && s.starts_with('q') => {
                Method::Gguf(crate::gguf::GgufType::parse(s).expect("checked"))
            }
            "bf16" => Method::Half(Half::BF16),
            s if s.starts_with("int") => {
                Method::Int(LinearSpec { bits: parse_bits(s, "int", scheme)?, symmetric, granularity: gran })
            }
            s if s.starts_with("quantile") => Method::Quantile { bits: parse_bits(s, "quantile", scheme)? },
            s if s.starts_with("kmeans") => Method::KMeans { bits: parse_bits(s, "kmeans", scheme)?, seed: 0 },
            other => {
                return Err(option(
                    "--scheme",
                    format!(
                        "expected int2..int8, nf4, quantileN, kmeansN, fp8-e4m3, fp8-e5m2, fp16, bf16, q8_0, q4_0, q4_1, \
                         q4_k or q6_k, found `{other}`"
                    ),
                ));
            }
        };
        let bits = match m {
            Method::Int(s) => Some((s.bits, 2)),
            Method::Quantile { bits } | Method::KMeans { bits, .. } => Some((bits, 1)),
            _ => None,
        };
        if let Some((b, lo)) = bits
            && !(lo..=8).contains(&b)
        {
            return Err(option("--scheme", format!("`{scheme}` needs {lo}..=8 bits, found {b}")));
        }
        Ok(m)
    }

    /// Checks that the method fits a weight of `shape` (group size divides the row, ...)
    /// without doing the work.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        if let Method::Gguf(ty) = self {
            ty.check(name, shape)?;
            if !ty.has_pare_format() {
                return Err(option(
                    name,
                    format!("{ty:?} has no exact pare format yet: expected q8_0 or q4_0, or use --format gguf"),
                ));
            }
            return Ok(());
        }
        let gran = match self {
            Method::Int(s) | Method::IntClip(s) | Method::Gptq(s, _) => s.granularity,
            Method::Nf4 { group } | Method::Nf4Gptq { group, .. } => Granularity::PerGroup { size: *group },
            Method::Fp8(_) => Granularity::PerChannel { axis: 0 },
            _ => Granularity::PerTensor,
        };
        let probe = QuantScheme {
            bits: 8,
            signed: true,
            symmetric: true,
            mapping: pare_core_tensor::Mapping::Linear,
            granularity: gran,
        };
        probe.validate().and_then(|_| probe.num_scales(shape)).map_err(|e| option(name, e.to_string()))?;
        Ok(())
    }
}

/// Quantizes one weight tensor with `method`.
pub fn quantize_weight(name: &str, t: &Tensor, method: &Method) -> Result<Weight> {
    method.check(name, t.dims())?;
    Ok(match *method {
        Method::Int(spec) => Weight::Quantized(quantize_linear(name, t, spec)?),
        Method::IntClip(spec) | Method::Gptq(spec, _) => {
            let w = if t.rank() == 2 { t.clone() } else { t.flatten_from(1)? };
            let q = crate::gptq::clip_search(name, &w, spec)?;
            Weight::Quantized(q.reshaped(t.dims().to_vec())?)
        }
        Method::Nf4 { group } | Method::Nf4Gptq { group, .. } => Weight::Quantized(nf4(name, t, group)?),
        Method::Quantile { bits } => Weight::Quantized(quantile(name, t, bits)?),
        Method::KMeans { bits, seed } => Weight::Quantized(kmeans(name, t, bits, seed, 30)?),
        Method::Fp8(f) => Weight::Quantized(to_fp8(name, t, f, Some(Granularity::PerChannel { axis: 0 }))?),
        Method::Half(h) => Weight::Dense(to_half(name, t, h)?),
        Method::Gguf(ty) => crate::gguf::to_pare(name, t, ty)?,
    })
}

pub use pare_core_tensor::select::{PathPattern, Selection};

/// One layer's outcome.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerReport {
    /// Layer path.
    pub path: String,
    /// Weight shape.
    pub shape: Vec<usize>,
    /// The new format, described.
    pub format: String,
    /// Bytes of the weight before.
    pub bytes_before: usize,
    /// Bytes of the weight after (codes, scales, zero points, codebook).
    pub bytes_after: usize,
    /// Root-mean-square error of the dequantized weight.
    pub rmse: f64,
    /// Signal-to-quantization-noise ratio in dB (infinite when exact).
    pub sqnr_db: f64,
}

impl LayerReport {
    /// Storage bits per weight, scales and metadata included.
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.bytes_after as f64 / self.shape.iter().product::<usize>().max(1) as f64
    }
}

/// Error statistics of `after` against `before` (both dense values of the same tensor).
pub fn error_stats(before: &[f32], after: &[f32]) -> (f64, f64) {
    let (mut sig, mut noise) = (0f64, 0f64);
    for (x, y) in before.iter().zip(after) {
        sig += f64::from(*x).powi(2);
        noise += f64::from(x - y).powi(2);
    }
    let rmse = (noise / before.len().max(1) as f64).sqrt();
    let sqnr = if noise == 0.0 { f64::INFINITY } else { 10.0 * (sig / noise).log10() };
    (rmse, sqnr)
}

/// Quantizes `t` (the weight of `path`, named `name`) and measures what it cost.
fn quantize_and_report(path: &str, name: &str, t: &Tensor, method: &Method) -> Result<(Weight, LayerReport)> {
    report_for(path, name, t, quantize_weight(name, t, method)?)
}

fn report_for(path: &str, name: &str, t: &Tensor, q: Weight) -> Result<(Weight, LayerReport)> {
    let before = finite_values(name, t)?;
    let after = q.to_dense(t.device())?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (rmse, sqnr_db) = error_stats(&before, &after);
    let report = LayerReport {
        path: path.to_string(),
        shape: t.dims().to_vec(),
        format: q.describe(),
        bytes_before: t.elem_count() * t.dtype().size_in_bytes(),
        bytes_after: q.storage_bytes(),
        rmse,
        sqnr_db,
    };
    Ok((q, report))
}

/// Quantizes the weights of the selected layers of `model` in place. Every selected weight is
/// checked (dense, finite, method fits its shape) before the first is changed, so a bad option
/// fails fast and leaves the model as it was. `on_layer` is called after each layer.
pub fn quantize_model(
    model: &mut dyn Module,
    method: &Method,
    selection: &Selection,
    on_layer: &mut dyn FnMut(&LayerReport),
) -> Result<Vec<LayerReport>> {
    quantize_model_with(model, method, selection, None, on_layer)
}

/// [`quantize_model`] with calibration Hessians for [`Method::Gptq`] (linear layers without
/// one, or any layer when `hessians` is `None`, get the clipping search).
pub fn quantize_model_with(
    model: &mut dyn Module,
    method: &Method,
    selection: &Selection,
    hessians: Option<&crate::gptq::HessianObserver>,
    on_layer: &mut dyn FnMut(&LayerReport),
) -> Result<Vec<LayerReport>> {
    quantize_model_plan(model, method, selection, &[], hessians, on_layer)
}

/// A per-layer override: selected layers whose path matches the glob `pattern` take `method`
/// instead of the default.
#[derive(Debug, Clone)]
pub struct Override {
    /// Glob over layer paths.
    pub pattern: String,
    /// The method for the layers it matches.
    pub method: Method,
}

impl Override {
    /// Parses the command line's `GLOB=SCHEME[,GRANULARITY[,ALGO]]` (granularity `channel`
    /// and algorithm `rtn` when left out), e.g. `encoder.layer.*.output.dense=int8,channel`.
    pub fn parse(text: &str, symmetric: bool) -> Result<Self> {
        let bad = || option("--override", format!("expected GLOB=SCHEME[,GRANULARITY[,ALGO]], found `{text}`"));
        let (pattern, spec) = text.split_once('=').ok_or_else(bad)?;
        let mut parts = spec.split(',');
        let scheme = parts.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
        let gran = parts.next().unwrap_or("channel");
        let algo = parts.next().unwrap_or("rtn");
        if pattern.is_empty() || parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self { pattern: pattern.to_string(), method: Method::parse(scheme, gran, symmetric)?.with_algo(algo)? })
    }
}

/// [`quantize_model_with`] with per-layer overrides: each selected layer takes the method of
/// the last override whose glob matches it, else `default`. Every override must match a
/// selected layer, and every layer is checked against its method, before any layer changes.
pub fn quantize_model_plan(
    model: &mut dyn Module,
    default: &Method,
    selection: &Selection,
    overrides: &[Override],
    hessians: Option<&crate::gptq::HessianObserver>,
    on_layer: &mut dyn FnMut(&LayerReport),
) -> Result<Vec<LayerReport>> {
    let paths = selection.resolve(model)?;
    if paths.is_empty() {
        return Err(option(
            "--layers",
            format!(
                "the selection {:?} (excluding {:?}) matches no linear, convolution or embedding layer",
                selection.include, selection.exclude
            ),
        ));
    }
    let matchers = overrides
        .iter()
        .map(|o| {
            let m = PathPattern::parse(&o.pattern, "--override")?;
            if !paths.iter().any(|p| m.is_match(p)) {
                return Err(Error::Core(pare_core_tensor::Error::unknown(
                    "override pattern (among the selected layers)",
                    &o.pattern,
                    paths.iter().map(String::as_str),
                )));
            }
            Ok((m, &o.method))
        })
        .collect::<Result<Vec<_>>>()?;
    // Each layer's path, float values, method and whether it was pruned sparse (whose zeros
    // GPTQ must keep).
    let mut plan: Vec<(String, Tensor, &Method, bool)> = Vec::with_capacity(paths.len());
    for p in &paths {
        let method = matchers.iter().rev().find(|(m, _)| m.is_match(p)).map_or(default, |(_, method)| *method);
        let layer = model.layer(p)?;
        if method.needs_hessians() && layer.kind() == pare_core_tensor::LayerKind::Embedding {
            return Err(option(
                p,
                "GPTQ works from a layer's input activations, and an embedding's inputs are token ids: \
                 quantize it round-to-nearest (an override with algo rtn)"
                    .to_string(),
            ));
        }
        let (name, w) = layer.parameters().swap_remove(0);
        let t = crate::values::float_weight(&name, &w, "expected a float weight (dense or pruned sparse)")?;
        method.check(&name, t.dims())?;
        finite_values(&name, &t)?;
        plan.push((p.clone(), t, method, matches!(w, Weight::Sparse(_))));
    }
    let mut reports = Vec::with_capacity(plan.len());
    for (path, t, method, sparse) in plan {
        let name = format!("{path}.weight");
        let keep =
            |cfg: &crate::gptq::GptqConfig| crate::gptq::GptqConfig { keep_zeros: cfg.keep_zeros || sparse, ..*cfg };
        let (q, report) = match (method, hessians) {
            (Method::Gptq(spec, cfg), Some(h)) if t.rank() == 2 => {
                let (hess, _) = h.hessian(&path)?;
                let q = Weight::Quantized(crate::gptq::gptq_quantize(&name, &t, &hess, *spec, keep(cfg))?);
                report_for(&path, &name, &t, q)?
            }
            (Method::Nf4Gptq { group, cfg }, Some(h)) if t.rank() == 2 => {
                let (hess, _) = h.hessian(&path)?;
                let q = Weight::Quantized(crate::gptq::gptq_nf4(&name, &t, &hess, *group, keep(cfg))?);
                report_for(&path, &name, &t, q)?
            }
            _ => quantize_and_report(&path, &name, &t, method)?,
        };
        model.layer_mut(&path)?.set_weight(q)?;
        on_layer(&report);
        reports.push(report);
    }
    Ok(reports)
}

/// The names of the 2-D dense float tensors of `weights` matching `include` globs (all of them
/// when empty), or an error when none does.
pub fn select_tensors(weights: &BTreeMap<String, Weight>, include: &[String]) -> Result<Vec<String>> {
    let set =
        include.iter().map(|p| PathPattern::parse(p, "--layers")).collect::<pare_core_tensor::Result<Vec<_>>>()?;
    let chosen: Vec<String> = weights
        .iter()
        .filter(|(n, w)| {
            matches!(w, Weight::Dense(t) if t.rank() == 2 && t.dtype().is_float())
                && (include.is_empty() || set.iter().any(|m| m.is_match(n)))
        })
        .map(|(n, _)| n.clone())
        .collect();
    if chosen.is_empty() {
        return Err(option("--layers", "no 2-D float tensor matches the selection"));
    }
    Ok(chosen)
}

/// Quantizes, tensor by tensor, a plain weights map with no known architecture: every 2-D
/// float tensor whose name matches `include` globs (all 2-D float tensors when empty).
pub fn quantize_tensors(
    weights: &mut BTreeMap<String, Weight>,
    method: &Method,
    include: &[String],
    on_tensor: &mut dyn FnMut(&LayerReport),
) -> Result<Vec<LayerReport>> {
    let chosen = select_tensors(weights, include)?;
    for n in &chosen {
        if let Weight::Dense(t) = &weights[n] {
            method.check(n, t.dims())?;
            finite_values(n, t)?;
        }
    }
    let mut reports = Vec::new();
    for n in chosen {
        let Weight::Dense(t) = weights[&n].clone() else { unreachable!("filtered to dense") };
        let (q, r) = quantize_and_report(&n, &n, &t, method)?;
        weights.insert(n, q);
        on_tensor(&r);
        reports.push(r);
    }
    Ok(reports)
}
