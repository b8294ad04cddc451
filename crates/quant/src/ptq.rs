//! Post-training activation quantization of whole models.
//!
//! - **Dynamic**: [`dynamic_specs`] gives each selected layer an input range measured at run
//!   time (per token for linear layers, per call for convolutions); no calibration data.
//! - **Static**: [`calibrate`] runs the model over calibration batches with a [`Calibrator`]
//!   attached as a hook, and an [`ObserverKind`] turns what each layer saw into a fixed scale
//!   and zero point, stored with the model (`pare.act.PATH` metadata).
//!
//! Weights are quantized separately ([`crate::weight_only`], [`crate::gptq`]); W8A8 is both.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Tensor};
use pare_core_tensor::{ActQuant, ActRange, Hooks, LayerKind, Module, Observer, Site};

use crate::error::option;
use crate::observer::{ActStats, ObserverKind, require_seen};
use crate::{Error, Result};

/// Width and symmetry of activation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActSpec {
    /// Bits per code, 2 to 8.
    pub bits: u8,
    /// Signed codes with Z = 0, or unsigned codes with a zero point.
    pub symmetric: bool,
}

impl ActSpec {
    fn with_range(self, range: ActRange) -> ActQuant {
        ActQuant::new(self.bits, self.symmetric, range)
    }
    fn check(&self) -> Result<()> {
        if !(2..=8).contains(&self.bits) {
            return Err(option("--act-bits", format!("expected 2..=8, found {}", self.bits)));
        }
        Ok(())
    }
}

/// Dynamic activation quantization for the layers at `paths`: per token for linear layers
/// (or per tensor when `per_token` is false), per call for convolutions.
pub fn dynamic_specs(
    model: &dyn Module,
    paths: &[String],
    spec: ActSpec,
    per_token: bool,
) -> Result<BTreeMap<String, ActQuant>> {
    spec.check()?;
    paths
        .iter()
        .map(|p| {
            let per_token = per_token && model.layer(p)?.kind() == LayerKind::Linear;
            Ok((p.clone(), spec.with_range(ActRange::Dynamic { per_token })))
        })
        .collect()
}

/// Collects, per selected layer, the statistics of its inputs during calibration forwards.
#[derive(Debug)]
pub struct Calibrator {
    paths: BTreeSet<String>,
    smooth: BTreeMap<String, Vec<f32>>,
    kind: ObserverKind,
    second_pass: bool,
    stats: BTreeMap<String, ActStats>,
}

impl Calibrator {
    /// Watches the layers at `paths` for `kind`.
    pub fn new(paths: &[String], kind: ObserverKind) -> Self {
        Self {
            paths: paths.iter().cloned().collect(),
            smooth: BTreeMap::new(),
            kind,
            second_pass: false,
            stats: BTreeMap::new(),
        }
    }
    /// Observes inputs divided by these per-channel SmoothQuant factors (path → factors).
    pub fn with_smoothing(mut self, smooth: &BTreeMap<String, Vec<f32>>) -> Self {
        self.smooth = smooth.clone();
        self
    }
    /// Switches to filling histograms over the ranges the first pass found.
    pub fn start_second_pass(&mut self) {
        self.second_pass = true;
    }
    /// The statistics gathered for `path`.
    pub fn stats(&self, path: &str) -> Option<&ActStats> {
        self.stats.get(path)
    }
}

impl Observer for Calibrator {
    fn observe(&mut self, site: &Site<'_>, input: &Tensor, _output: &Tensor) -> pare_core_tensor::Result<()> {
        if !self.paths.contains(site.path) {
            return Ok(());
        }
        let mut v = input.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(s) = self.smooth.get(site.path) {
            if s.is_empty() || !v.len().is_multiple_of(s.len()) {
                return Err(pare_core_tensor::Error::Shape {
                    name: format!("input of `{}`", site.path),
                    expected: vec![s.len()],
                    found: input.dims().to_vec(),
                });
            }
            v.iter_mut().enumerate().for_each(|(i, x)| *x /= s[i % s.len()]);
        }
        if let Some(first) = v.iter().position(|x| !x.is_finite()) {
            return Err(pare_core_tensor::Error::NonFinite {
                name: format!("input of `{}` during calibration", site.path),
                count: v.iter().filter(|x| !x.is_finite()).count(),
                first,
            });
        }
        let momentum = match self.kind {
            ObserverKind::MovingAverage { momentum } => momentum,
            _ => 0.01,
        };
        let s = self.stats.entry(site.path.to_string()).or_default();
        if self.second_pass {
            s.observe_histogram(&v);
        } else {
            s.observe_range(&v, momentum);
        }
        Ok(())
    }
}

/// Static activation ranges for the layers at `paths`. `run` must push the whole calibration
/// set through the model with the given hooks attached and return how many examples it ran;
/// it is called once, or twice for histogram observers. An empty set, or a layer the set never
/// reaches, is an error.
pub fn calibrate(
    paths: &[String],
    kind: ObserverKind,
    spec: ActSpec,
    run: &mut dyn FnMut(&mut Hooks<'_>) -> Result<usize>,
) -> Result<BTreeMap<String, ActQuant>> {
    calibrate_smoothed(paths, kind, spec, &BTreeMap::new(), run)
}

/// [`calibrate`] for layers smoothed by [`crate::smooth::smooth_model`]: ranges are taken of
/// the inputs divided by each layer's factors, and the specs carry the factors.
///
/// `run` must drive a model *without* the smoothed weights (the float model, or the original
/// weight-quantized one): a smoothed layer computes its float output only once its spec
/// divides the input, so calibrating the smoothed model itself would propagate `x·diag(s)·Wᵀ`
/// to every later layer.
pub fn calibrate_smoothed(
    paths: &[String],
    kind: ObserverKind,
    spec: ActSpec,
    smooth: &BTreeMap<String, Vec<f32>>,
    run: &mut dyn FnMut(&mut Hooks<'_>) -> Result<usize>,
) -> Result<BTreeMap<String, ActQuant>> {
    spec.check()?;
    if paths.is_empty() {
        return Err(option("--layers", "no layer selected for activation quantization"));
    }
    let mut cal = Calibrator::new(paths, kind).with_smoothing(smooth);
    let n = run(&mut Hooks::with(&mut cal))?;
    if n == 0 {
        return Err(Error::Option {
            tensor: "calibration set".into(),
            detail: "expected at least one example, found 0".into(),
        });
    }
    for p in paths {
        require_seen(p, cal.stats(p))?;
    }
    if kind.needs_histogram() {
        cal.start_second_pass();
        run(&mut Hooks::with(&mut cal))?;
    }
    let probe = spec.with_range(ActRange::Dynamic { per_token: false });
    let levels = (probe.q_max() - probe.q_min() + 1) as u32;
    paths
        .iter()
        .map(|p| {
            let s = &cal.stats[p];
            let (lo, hi) = s.range(kind, levels, spec.symmetric);
            let (scale, zero_point) = probe.scale_zero(lo, hi);
            tracing::debug!(layer = %p, lo, hi, scale, zero_point, "static activation range");
            let mut a = spec.with_range(ActRange::Static { scale, zero_point });
            a.smooth = smooth.get(p).cloned();
            a.validate(p)?;
            Ok((p.clone(), a))
        })
        .collect()
}

/// Sets every layer's input quantization from `specs` (path → spec). All paths are checked
/// before any layer changes.
pub fn apply(model: &mut dyn Module, specs: &BTreeMap<String, ActQuant>) -> Result<()> {
    for (p, a) in specs {
        let kind = model.layer(p)?.kind();
        if !matches!(kind, LayerKind::Linear | LayerKind::Conv2d) {
            return Err(option(p, format!("activation quantization needs a linear or conv layer, found {kind:?}")));
        }
        a.validate(p)?;
        if let Some(s) = &a.smooth {
            let cols: usize = model.layer(p)?.parameters()[0].1.shape()[1..].iter().product();
            if kind != LayerKind::Linear || s.len() != cols {
                return Err(option(
                    p,
                    format!("expected {cols} smoothing factors on a linear layer, found {}", s.len()),
                ));
            }
        }
    }
    for (p, a) in specs {
        model.layer_mut(p)?.set_input_quant(Some(a.clone()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
