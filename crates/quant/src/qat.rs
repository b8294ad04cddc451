//! Quantization-aware training: fake-quant nodes on candle autograd with a straight-through
//! estimator and learned step sizes (LSQ, Esser et al. 2020), trained by core-tensor's trainer,
//! then converted to real integer weights and static activation specs.
//!
//! [`QatRuntime`] is a [`Runtime`]: preparing a model on it makes every selected layer compute
//! `x̂ · Ŵᵀ + b` where
//!
//! - `Ŵ = s_w · clamp(round(W / s_w), q_min, q_max)` per output channel (symmetric, signed codes);
//! - `x̂ = s_x · (clamp(round(x / s_x) + Z, q_min, q_max) − Z)` when the layer has a static input
//!   spec (its calibrated scale is the initial `s_x`, its zero point `Z` is kept);
//! - `round` passes gradients straight through (`v + (round(v) − v).detach()`), `clamp` passes
//!   them only inside the range, so `∂Ŵ/∂s_w` is LSQ's `round(v) − v` inside and `q_min`/`q_max`
//!   outside.
//!
//! The steps are learned in log space (`s = exp(t)`, as TQT does for its thresholds), so Adam's
//! updates are relative to the step and need no LSQ gradient scale. The step `Var`s live in the
//! same `VarMap` as the weights, so the trainer updates, checkpoints and restores them together.
//!
//! [`convert`] then writes the trained weights as [`QuantizedTensor`]s with the learned steps as
//! scales and the learned input steps as static [`ActQuant`]s: the converted model computes what
//! the QAT model computed in training, with the same rounding (half away from zero, as candle's
//! `round`) so every weight code is the one the training saw.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use pare_core_tensor::{
    ActQuant, ActRange, Conv2dParams, Granularity, LayerKind, Mapping, Module, PreparedOp, QuantScheme,
    QuantizedTensor, ReferenceRuntime, Runtime, Weight,
};

use crate::error::option;
use crate::weight_only::{LayerReport, error_stats};
use crate::{Result, finite_values};

/// Suffix of the `Var` holding a layer's log weight steps (one per output channel).
pub const WEIGHT_STEP: &str = ".qat.log_weight_step";
/// Suffix of the `Var` holding a layer's log input step.
pub const INPUT_STEP: &str = ".qat.log_input_step";

/// A [`Runtime`] whose selected layers fake-quantize their weights (and, where the layer has a
/// static input spec, their inputs) with learned steps. See the module docs.
pub struct QatRuntime {
    reference: ReferenceRuntime,
    varmap: VarMap,
    cfg: QatConfig,
    layers: BTreeSet<String>,
}

/// What QAT learns for the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QatConfig {
    /// Bits per weight code, 2 to 8 (symmetric, signed).
    pub bits: u8,
    /// One step per output channel (else one per tensor).
    pub per_channel: bool,
}

impl std::fmt::Debug for QatRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QatRuntime").field("cfg", &self.cfg).field("layers", &self.layers).finish()
    }
}

impl QatRuntime {
    /// A QAT runtime for the `layers` named, registering its step `Var`s in `varmap` as layers
    /// are prepared.
    pub fn new(device: Device, varmap: &VarMap, cfg: QatConfig, layers: &[String]) -> Result<Self> {
        if !(2..=8).contains(&cfg.bits) {
            return Err(option("QAT weights", format!("bits must be 2..=8, found {}", cfg.bits)));
        }
        if layers.is_empty() {
            return Err(option("QAT", "no layer selected"));
        }
        Ok(Self {
            reference: ReferenceRuntime::new(device),
            varmap: varmap.clone(),
            cfg,
            layers: layers.iter().cloned().collect(),
        })
    }

    /// Weight code range: signed `[−2^(b−1), 2^(b−1) − 1]`.
    fn code_range(&self) -> (i32, i32) {
        (-(1 << (self.cfg.bits - 1)), (1 << (self.cfg.bits - 1)) - 1)
    }

    fn vars(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Var>> {
        let m: &Mutex<_> = self.varmap.data();
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `Var` named `name`, created from `init` if the map does not hold it yet (a layer
    /// prepared again keeps its learned step).
    fn var_or_init(&self, name: String, init: impl FnOnce() -> Result<Tensor>) -> Result<Var> {
        if let Some(v) = self.vars().get(&name) {
            return Ok(v.clone());
        }
        let v = Var::from_tensor(&init()?)?;
        self.vars().insert(name, v.clone());
        Ok(v)
    }

    fn weight_step(&self, layer: &str, w: &Tensor) -> Result<Var> {
        let (q_min, q_max) = self.code_range();
        self.var_or_init(format!("{layer}{WEIGHT_STEP}"), || {
            let out = if self.cfg.per_channel { w.dim(0)? } else { 1 };
            let values = finite_values(&format!("{layer}.weight"), w)?;
            let row = values.len() / out.max(1);
            let steps: Vec<f32> =
                values.chunks(row.max(1)).map(|r| mse_step(r, q_min as f32, q_max as f32).ln()).collect();
            let mut shape = vec![1usize; w.rank()];
            shape[0] = out;
            Ok(Tensor::from_vec(steps, shape, w.device())?)
        })
    }

    fn input_step(&self, layer: &str, scale: f32) -> Result<Var> {
        self.var_or_init(format!("{layer}{INPUT_STEP}"), || {
            Ok(Tensor::from_vec(vec![scale.abs().max(f32::MIN_POSITIVE).ln()], 1, self.reference.device())?)
        })
    }

    /// The learned per-channel weight steps of `layer` (as the forward pass uses them).
    pub fn weight_steps(&self, layer: &str) -> Result<Vec<f32>> {
        self.learned(&format!("{layer}{WEIGHT_STEP}"))
    }

    /// The learned input step of `layer`, if it quantizes its input.
    pub fn input_step_value(&self, layer: &str) -> Result<Option<f32>> {
        let name = format!("{layer}{INPUT_STEP}");
        if !self.vars().contains_key(&name) {
            return Ok(None);
        }
        Ok(self.learned(&name)?.first().copied())
    }

    fn learned(&self, name: &str) -> Result<Vec<f32>> {
        let v =
            self.vars().get(name).cloned().ok_or_else(|| option(name, "no such QAT step: was the layer prepared?"))?;
        Ok(v.as_tensor().exp()?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn prepare(&self, layer: &str, weight: &Weight, input: Option<&ActQuant>) -> Result<Option<QatParts>> {
        if !self.layers.contains(layer) {
            return Ok(None);
        }
        let w = match weight {
            Weight::Dense(t) => t.to_dtype(DType::F32)?,
            other => return Err(option(layer, format!("QAT needs float weights, found {}", other.describe()))),
        };
        let (q_min, q_max) = self.code_range();
        let w_step = self.weight_step(layer, &w)?;
        let input = match input {
            None => None,
            Some(a) => match a.range {
                ActRange::Static { scale, zero_point } if a.smooth.is_none() => Some(InputQuant {
                    step: self.input_step(layer, scale)?,
                    zero: zero_point as f64,
                    q_min: a.q_min() as f64,
                    q_max: a.q_max() as f64,
                }),
                _ => {
                    return Err(option(
                        layer,
                        format!(
                            "QAT learns static input steps: expected a static unsmoothed spec, found {}",
                            a.describe()
                        ),
                    ));
                }
            },
        };
        Ok(Some(QatParts { w, w_step, q_min: q_min as f64, q_max: q_max as f64, input }))
    }
}

/// The MSE-optimal symmetric step for a row of weights, searched over clipping ratios.
fn mse_step(row: &[f32], q_min: f32, q_max: f32) -> f32 {
    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        return 1.0;
    }
    let mut best = (f32::INFINITY, amax / -q_min);
    for k in 1..=100 {
        let s = amax * k as f32 / 100.0 / -q_min;
        let err: f32 = row
            .iter()
            .map(|&v| {
                let d = v - s * (v / s).clamp(q_min, q_max).round();
                d * d
            })
            .sum();
        if err < best.0 {
            best = (err, s);
        }
    }
    best.1
}

/// `s · (clamp(v + Z) rounded with a straight-through gradient − Z)` with `v = x / s`.
fn fake_quant(x: &Tensor, log_step: &Var, zero: f64, q_min: f64, q_max: f64) -> candle_core::Result<Tensor> {
    let s = log_step.as_tensor().exp()?;
    let v = (x.broadcast_div(&s)? + zero)?.clamp(q_min, q_max)?;
    let r = ((v.round()? - &v)?.detach() + &v)?;
    (r - zero)?.broadcast_mul(&s)
}

#[derive(Debug)]
struct InputQuant {
    step: Var,
    zero: f64,
    q_min: f64,
    q_max: f64,
}

#[derive(Debug)]
struct QatParts {
    w: Tensor,
    w_step: Var,
    q_min: f64,
    q_max: f64,
    input: Option<InputQuant>,
}

impl QatParts {
    fn inputs_and_weight(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let x = match &self.input {
            Some(i) => fake_quant(x, &i.step, i.zero, i.q_min, i.q_max)?,
            None => x.clone(),
        };
        Ok((x, fake_quant(&self.w, &self.w_step, 0.0, self.q_min, self.q_max)?))
    }
}

#[derive(Debug)]
struct QatLinear {
    parts: QatParts,
    bias: Option<Tensor>,
}

impl PreparedOp for QatLinear {
    fn forward(&self, x: &Tensor) -> pare_core_tensor::Result<Tensor> {
        let (x, w) = self.parts.inputs_and_weight(x)?;
        pare_core_tensor::linear_forward(&x, &w, self.bias.as_ref())
    }
}

#[derive(Debug)]
struct QatConv2d {
    parts: QatParts,
    bias: Option<Tensor>,
    p: Conv2dParams,
}

impl PreparedOp for QatConv2d {
    fn forward(&self, x: &Tensor) -> pare_core_tensor::Result<Tensor> {
        let (x, w) = self.parts.inputs_and_weight(x)?;
        pare_core_tensor::conv2d_forward(&x, &w, self.bias.as_ref(), self.p)
    }
}

fn core(e: crate::Error) -> pare_core_tensor::Error {
    match e {
        crate::Error::Core(e) => e,
        crate::Error::Candle(e) => e.into(),
        other => pare_core_tensor::Error::invalid("QAT", other.to_string()),
    }
}

impl Runtime for QatRuntime {
    fn name(&self) -> &str {
        "qat"
    }

    fn device(&self) -> &Device {
        self.reference.device()
    }

    fn prepare_linear(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
    ) -> pare_core_tensor::Result<Arc<dyn PreparedOp>> {
        match self.prepare(layer, weight, None).map_err(core)? {
            Some(parts) => Ok(Arc::new(QatLinear { parts, bias: bias.cloned() })),
            None => self.reference.prepare_linear(layer, weight, bias),
        }
    }

    fn prepare_conv2d(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
        params: Conv2dParams,
    ) -> pare_core_tensor::Result<Arc<dyn PreparedOp>> {
        match self.prepare(layer, weight, None).map_err(core)? {
            Some(parts) => Ok(Arc::new(QatConv2d { parts, bias: bias.cloned(), p: params })),
            None => self.reference.prepare_conv2d(layer, weight, bias, params),
        }
    }

    fn prepare_embedding(&self, layer: &str, weight: &Weight) -> pare_core_tensor::Result<Arc<dyn PreparedOp>> {
        self.reference.prepare_embedding(layer, weight)
    }

    fn prepare_linear_quantized_input(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
        input: &ActQuant,
    ) -> pare_core_tensor::Result<Arc<dyn PreparedOp>> {
        match self.prepare(layer, weight, Some(input)).map_err(core)? {
            Some(parts) => Ok(Arc::new(QatLinear { parts, bias: bias.cloned() })),
            None => self.reference.prepare_linear_quantized_input(layer, weight, bias, input),
        }
    }

    fn prepare_conv2d_quantized_input(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
        params: Conv2dParams,
        input: &ActQuant,
    ) -> pare_core_tensor::Result<Arc<dyn PreparedOp>> {
        match self.prepare(layer, weight, Some(input)).map_err(core)? {
            Some(parts) => Ok(Arc::new(QatConv2d { parts, bias: bias.cloned(), p: params })),
            None => self.reference.prepare_conv2d_quantized_input(layer, weight, bias, params, input),
        }
    }
}

/// Prepares `model` (whose weights should be `Var`s in `varmap`, e.g. loaded with
/// `load_trainable`) for QAT of `layers` with `cfg`'s weights and returns the runtime. Layers
/// that already carry a static input spec (from [`crate::ptq::calibrate`]) also learn their
/// input step. Every layer is checked first: a name that is not a linear or convolution layer,
/// or a dynamic/smoothed input spec, is an error before the model changes.
pub fn prepare(model: &mut dyn Module, varmap: &VarMap, cfg: QatConfig, layers: &[String]) -> Result<Arc<QatRuntime>> {
    for p in layers {
        let l = model.layer(p)?;
        if !matches!(l.kind(), LayerKind::Linear | LayerKind::Conv2d) {
            return Err(option(p, format!("QAT needs a linear or conv layer, found {:?}", l.kind())));
        }
        if let Some((_, w)) = l.parameters().first().filter(|(_, w)| !matches!(w, Weight::Dense(_))) {
            return Err(option(p, format!("QAT needs float weights, found {}", w.describe())));
        }
        if let Some(a) = l.input_quant()
            && (!matches!(a.range, ActRange::Static { .. }) || a.smooth.is_some())
        {
            return Err(option(
                p,
                format!("QAT learns static input steps: expected a static unsmoothed spec, found {}", a.describe()),
            ));
        }
    }
    let device = model
        .layers()
        .iter()
        .flat_map(|l| l.parameters())
        .find_map(|(_, w)| match w {
            Weight::Dense(t) => Some(t.device().clone()),
            _ => None,
        })
        .unwrap_or(Device::Cpu);
    let rt = Arc::new(QatRuntime::new(device, varmap, cfg, layers)?);
    let dynrt: Arc<dyn Runtime> = rt.clone();
    model.prepare(&dynrt)?;
    Ok(rt)
}

/// Converts a model trained on `qat` into real integer weights: each selected layer's weight
/// becomes a symmetric per-channel (or per-tensor) [`QuantizedTensor`] whose scales are the learned steps, and
/// its static input spec takes the learned input step. The model is re-prepared on `runtime`.
/// Returns one report per layer (error against the trained float weight).
pub fn convert(model: &mut dyn Module, qat: &QatRuntime, runtime: &Arc<dyn Runtime>) -> Result<Vec<LayerReport>> {
    let (q_min, q_max) = qat.code_range();
    let scheme = QuantScheme {
        bits: qat.cfg.bits,
        signed: true,
        symmetric: true,
        mapping: Mapping::Linear,
        granularity: if qat.cfg.per_channel { Granularity::PerChannel { axis: 0 } } else { Granularity::PerTensor },
    };
    let mut planned = Vec::new();
    for p in &qat.layers {
        let layer = model.layer(p)?;
        let w = match &layer.parameters()[0].1 {
            Weight::Dense(t) => t.detach().to_dtype(DType::F32)?,
            other => return Err(option(p, format!("expected the trained float weight, found {}", other.describe()))),
        };
        let steps = qat.weight_steps(p)?;
        let values = finite_values(&format!("{p}.weight"), &w)?;
        let row = values.len() / steps.len().max(1);
        let codes: Vec<u8> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| ((v / steps[i / row]).clamp(q_min as f32, q_max as f32).round() as i32 - q_min) as u8)
            .collect();
        let q = QuantizedTensor::from_codes(&codes, scheme, steps, None, None, w.dims().to_vec(), DType::F32)?;
        let after = q.dequantize_f32();
        let (rmse, sqnr_db) = error_stats(&values, &after);
        let report = LayerReport {
            path: p.clone(),
            shape: w.dims().to_vec(),
            format: Weight::Quantized(q.clone()).describe(),
            bytes_before: values.len() * 4,
            bytes_after: q.storage_bytes(),
            rmse,
            sqnr_db,
        };
        let act = match (layer.input_quant(), qat.input_step_value(p)?) {
            (Some(a), Some(step)) => match a.range {
                ActRange::Static { zero_point, .. } => {
                    let mut a = a.clone();
                    a.range = ActRange::Static { scale: step, zero_point };
                    a.validate(p)?;
                    Some(a)
                }
                _ => Some(a),
            },
            (a, _) => a,
        };
        planned.push((p.clone(), q, act, report));
    }
    model.prepare(runtime)?;
    let mut reports = Vec::new();
    for (p, q, act, report) in planned {
        let mut l = model.layer_mut(&p)?;
        l.set_weight(Weight::Quantized(q))?;
        l.set_input_quant(act)?;
        reports.push(report);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests;
