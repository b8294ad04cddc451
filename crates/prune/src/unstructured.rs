//! Unstructured and N:M pruning of a model's linear and convolution weights: scores
//! (magnitude, random, Wanda) or SparseGPT's compensating updates, exact selection, and the
//! pruned weights stored in a sparse format.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use candle_core::{DType, Device, Tensor};
use pare_core_tensor::calib::{HessianObserver, InputNormObserver};
use pare_core_tensor::{Error, LayerKind, Module, Result, SparseTensor, Weight};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::select::{self, Bounds};
use crate::sparsegpt;

/// What decides which weights go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Criterion {
    /// The smallest `|w|` go first.
    Magnitude,
    /// Uniformly random (the baseline every method must beat), seeded.
    Random {
        /// Seed of the draw (each layer mixes in its path).
        seed: u64,
    },
    /// Wanda (Sun et al., 2023): `|W_ij|·‖X_j‖₂`, compared within each output row; needs
    /// calibration input norms.
    Wanda,
    /// SparseGPT with Hessian dampening `damp` (a fraction of the mean diagonal); needs
    /// calibration Hessians.
    SparseGpt {
        /// Dampening (0.01 in the paper).
        damp: f64,
    },
}

impl Criterion {
    /// The name used on the command line and in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Criterion::Magnitude => "magnitude",
            Criterion::Random { .. } => "random",
            Criterion::Wanda => "wanda",
            Criterion::SparseGpt { .. } => "sparsegpt",
        }
    }
}

/// Which weights may go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pattern {
    /// Any `sparsity` fraction of each layer's weights, or of all selected layers together
    /// with per-layer `global` bounds.
    Unstructured {
        /// Fraction pruned, in `[0, 1)`.
        sparsity: f64,
        /// One threshold across layers (magnitude and random scores only).
        global: Option<Bounds>,
    },
    /// `n` kept in every group of `m` consecutive inputs of each output row (2:4, 4:8).
    Nm {
        /// Kept per group.
        n: usize,
        /// Group size.
        m: usize,
    },
}

impl Pattern {
    /// The sparsity the pattern asks of each layer.
    pub fn sparsity(&self) -> f64 {
        match *self {
            Pattern::Unstructured { sparsity, .. } => sparsity,
            Pattern::Nm { n, m } => 1.0 - n as f64 / m as f64,
        }
    }
}

/// Calibration statistics for the calibration-aware criteria.
#[derive(Debug, Default)]
pub struct Calibration {
    /// Input Hessians (SparseGPT).
    pub hessians: Option<HessianObserver>,
    /// Input norms (Wanda).
    pub norms: Option<InputNormObserver>,
    /// Input rows the statistics saw.
    pub rows: usize,
}

impl Calibration {
    /// Gathers what `criterion` needs for the linear layers `paths`: `run` pushes the
    /// calibration set through the model with the hooks attached and returns the number of
    /// input rows (tokens or examples) it ran. Magnitude and random need nothing.
    pub fn collect(
        paths: &[String],
        criterion: Criterion,
        run: &mut dyn FnMut(&mut pare_core_tensor::Hooks<'_>) -> Result<usize>,
    ) -> Result<Self> {
        let mut out = Self::default();
        match criterion {
            Criterion::Wanda => {
                let mut obs = InputNormObserver::new(paths);
                out.rows = run(&mut pare_core_tensor::Hooks::with(&mut obs))?;
                out.norms = Some(obs);
            }
            Criterion::SparseGpt { .. } => {
                let mut obs = HessianObserver::new(paths);
                out.rows = run(&mut pare_core_tensor::Hooks::with(&mut obs))?;
                out.hessians = Some(obs);
            }
            Criterion::Magnitude | Criterion::Random { .. } => return Ok(out),
        }
        if out.rows == 0 {
            return Err(Error::invalid("calibration set", "expected at least one example, found 0"));
        }
        Ok(out)
    }
}

/// One layer's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Layer path.
    pub path: String,
    /// Weight shape.
    pub shape: Vec<usize>,
    /// Weights in the layer.
    pub params: usize,
    /// Weights pruned (set to zero by the mask).
    pub pruned: usize,
    /// The sparsity asked of the layer (for a global threshold, the global one).
    pub requested: f64,
}

impl LayerStats {
    /// Achieved sparsity: pruned / params.
    pub fn sparsity(&self) -> f64 {
        self.pruned as f64 / self.params.max(1) as f64
    }
}

/// The outcome of [`prune`]: each pruned layer's keep-mask (`true` = kept, over the weight's
/// row-major values) and new values (SparseGPT changes the kept ones too).
#[derive(Debug, Clone, Default)]
pub struct Pruned {
    /// Per layer: keep-mask.
    pub masks: BTreeMap<String, Vec<bool>>,
    /// Per layer: the weight's values after pruning.
    pub values: BTreeMap<String, Vec<f32>>,
    /// Per layer: shape.
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// Per layer statistics, in the order pruned.
    pub stats: Vec<LayerStats>,
}

impl Pruned {
    /// Weights pruned over all layers / weights in them.
    pub fn sparsity(&self) -> f64 {
        let (p, n) = self.stats.iter().fold((0, 0), |(p, n), s| (p + s.pruned, n + s.params));
        p as f64 / n.max(1) as f64
    }
}

/// A layer's weight as `[rows, cols]` f32 values (rows = outputs; a convolution's filters
/// flattened), checked dense and finite.
fn dense_values(model: &dyn Module, path: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let layer = model.layer(path)?;
    if !matches!(layer.kind(), LayerKind::Linear | LayerKind::Conv2d) {
        return Err(Error::invalid(format!("layer `{path}`"), "pruning applies to linear and convolution weights"));
    }
    let (_, w) = layer.parameters().into_iter().next().expect("a weighted layer has a weight");
    let t = match &w {
        Weight::Dense(t) => t.clone(),
        other => {
            return Err(Error::invalid(
                format!("weight of `{path}`"),
                format!("expected dense values to prune (prune before quantizing), found {}", other.describe()),
            ));
        }
    };
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(first) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            name: format!("weight of `{path}`"),
            count: v.iter().filter(|x| !x.is_finite()).count(),
            first,
        });
    }
    Ok((t.dims().to_vec(), v))
}

fn rows_cols(shape: &[usize]) -> (usize, usize) {
    let rows = shape.first().copied().unwrap_or(1);
    (rows, shape.iter().product::<usize>() / rows.max(1))
}

/// Checks everything [`prune`] needs before any layer is touched: the pattern, each layer's
/// weight (dense, finite, N:M-divisible), and the calibration the criterion needs.
pub fn check(
    model: &dyn Module,
    paths: &[String],
    criterion: Criterion,
    pattern: Pattern,
    calib: Option<&Calibration>,
) -> Result<()> {
    if paths.is_empty() {
        return Err(Error::invalid("layer selection", "no layer to prune (expected ≥ 1, found 0)"));
    }
    match pattern {
        Pattern::Unstructured { sparsity, global } => {
            select::check_sparsity("--sparsity", sparsity)?;
            if global.is_some() && !matches!(criterion, Criterion::Magnitude | Criterion::Random { .. }) {
                return Err(Error::invalid(
                    "--global",
                    format!(
                        "one threshold across layers needs comparable scores (magnitude or random), found {}",
                        criterion.name()
                    ),
                ));
            }
        }
        Pattern::Nm { n, m } if n == 0 || n >= m => {
            return Err(Error::invalid("N:M pattern", format!("needs 0 < N < M, found {n}:{m}")));
        }
        Pattern::Nm { .. } => {}
    }
    for p in paths {
        let (shape, _) = dense_values(model, p)?;
        let (_, cols) = rows_cols(&shape);
        if let Pattern::Nm { n, m } = pattern {
            select::check_nm(&format!("layer `{p}`"), n, m, cols)?;
        }
        let kind = model.layer(p)?.kind();
        match criterion {
            Criterion::Wanda | Criterion::SparseGpt { .. } if kind != LayerKind::Linear => {
                return Err(Error::invalid(
                    format!("layer `{p}`"),
                    format!(
                        "{} uses the inputs of linear layers; this is a convolution (use magnitude)",
                        criterion.name()
                    ),
                ));
            }
            Criterion::Wanda => {
                let c = calib.and_then(|c| c.norms.as_ref()).ok_or_else(|| {
                    Error::invalid("--calib", "wanda needs calibration input norms (a calibration set), found none")
                })?;
                let norms = c.norms(p)?;
                if norms.len() != cols {
                    return Err(Error::Shape {
                        name: format!("input norms of `{p}`"),
                        expected: vec![cols],
                        found: vec![norms.len()],
                    });
                }
            }
            Criterion::SparseGpt { damp } => {
                if !(damp.is_finite() && damp > 0.0) {
                    return Err(Error::invalid("--damp", format!("must be finite and > 0, found {damp}")));
                }
                let c = calib.and_then(|c| c.hessians.as_ref()).ok_or_else(|| {
                    Error::invalid("--calib", "sparsegpt needs calibration Hessians (a calibration set), found none")
                })?;
                let (_, rows) = c.hessian(p)?;
                if rows < cols {
                    return Err(Error::invalid(
                        format!("calibration of `{p}`"),
                        format!(
                            "the Hessian of {cols} inputs needs at least {cols} calibration rows (tokens) to be of full rank, found {rows}: use a larger calibration set"
                        ),
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Seeded random scores for `path`.
fn random_scores(seed: u64, path: &str, n: usize) -> Vec<f32> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ h.finish());
    (0..n).map(|_| rng.random::<f32>()).collect()
}

/// Prunes the weights of `paths` in `model` (checked first with [`check`]; nothing changes
/// on error) and sets each layer's weight to its pruned dense values. Returns the masks,
/// values and per-layer statistics.
pub fn prune(
    model: &mut dyn Module,
    paths: &[String],
    criterion: Criterion,
    pattern: Pattern,
    calib: Option<&Calibration>,
) -> Result<Pruned> {
    let pruned = plan(model, paths, criterion, pattern, calib)?;
    apply(model, &pruned)?;
    Ok(pruned)
}

/// One point of a sensitivity scan: the metric with layer `path` alone pruned to `sparsity`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sensitivity {
    /// The layer pruned.
    pub path: String,
    /// Its sparsity.
    pub sparsity: f64,
    /// The metric (accuracy, mean cosine, ...) of the model with only that layer pruned.
    pub metric: f64,
}

/// Sensitivity scan: for each layer of `paths` alone and each of `levels`, prunes it by
/// `criterion` (magnitude or random; layer-wise) on a copy of `model` and records
/// `metric(copy)`. Layers whose metric barely moves can take more sparsity.
pub fn sensitivity<M: Module + Clone>(
    model: &M,
    paths: &[String],
    levels: &[f64],
    criterion: Criterion,
    metric: &mut dyn FnMut(&M) -> Result<f64>,
) -> Result<Vec<Sensitivity>> {
    if !matches!(criterion, Criterion::Magnitude | Criterion::Random { .. }) {
        return Err(Error::invalid(
            "sensitivity scan",
            format!("scans use magnitude or random scores, found {}", criterion.name()),
        ));
    }
    for &s in levels {
        select::check_sparsity("sensitivity level", s)?;
    }
    check(model, paths, criterion, Pattern::Unstructured { sparsity: 0.0, global: None }, None)?;
    let mut out = Vec::new();
    for p in paths {
        for &s in levels {
            let mut m = model.clone();
            prune(
                &mut m,
                std::slice::from_ref(p),
                criterion,
                Pattern::Unstructured { sparsity: s, global: None },
                None,
            )?;
            out.push(Sensitivity { path: p.clone(), sparsity: s, metric: metric(&m)? });
        }
    }
    Ok(out)
}

/// [`prune`]'s decisions without touching the model.
pub fn plan(
    model: &dyn Module,
    paths: &[String],
    criterion: Criterion,
    pattern: Pattern,
    calib: Option<&Calibration>,
) -> Result<Pruned> {
    plan_with(model, paths, criterion, pattern, calib, &mut |_| {})
}

/// [`plan`], calling `on_layer(path)` as each layer's decision is made (SparseGPT takes
/// seconds per layer: a progress bar's hook).
pub fn plan_with(
    model: &dyn Module,
    paths: &[String],
    criterion: Criterion,
    pattern: Pattern,
    calib: Option<&Calibration>,
    on_layer: &mut dyn FnMut(&str),
) -> Result<Pruned> {
    check(model, paths, criterion, pattern, calib)?;
    let mut out = Pruned::default();
    let layers: Vec<(String, Vec<usize>, Vec<f32>)> =
        paths.iter().map(|p| dense_values(model, p).map(|(s, v)| (p.clone(), s, v))).collect::<Result<_>>()?;
    let scores = |path: &str, shape: &[usize], v: &[f32]| -> Result<Vec<f32>> {
        Ok(match criterion {
            Criterion::Magnitude | Criterion::SparseGpt { .. } => v.iter().map(|x| x.abs()).collect(),
            Criterion::Random { seed } => random_scores(seed, path, v.len()),
            Criterion::Wanda => {
                let norms = calib.and_then(|c| c.norms.as_ref()).expect("checked").norms(path)?;
                let (_, cols) = rows_cols(shape);
                v.iter().enumerate().map(|(i, x)| (f64::from(x.abs()) * norms[i % cols]) as f32).collect()
            }
        })
    };
    let mut masks: Vec<Vec<bool>> = Vec::with_capacity(layers.len());
    let mut values: Vec<Vec<f32>> = Vec::with_capacity(layers.len());
    match (criterion, pattern) {
        (Criterion::SparseGpt { damp }, _) => {
            let pat = match pattern {
                Pattern::Unstructured { sparsity, .. } => sparsegpt::Pattern::Unstructured(sparsity),
                Pattern::Nm { n, m } => sparsegpt::Pattern::Nm { n, m },
            };
            let hs = calib.and_then(|c| c.hessians.as_ref()).expect("checked");
            for (p, shape, v) in &layers {
                let (rows, cols) = rows_cols(shape);
                let (h, _) = hs.hessian(p)?;
                let mut w = v.clone();
                masks.push(sparsegpt::prune(&format!("layer `{p}`"), &mut w, rows, cols, &h, pat, damp)?);
                values.push(w);
                on_layer(p);
            }
        }
        (_, Pattern::Unstructured { sparsity, global: Some(bounds) }) => {
            let all: Vec<Vec<f32>> = layers.iter().map(|(p, s, v)| scores(p, s, v)).collect::<Result<_>>()?;
            let refs: Vec<&[f32]> = all.iter().map(Vec::as_slice).collect();
            masks = select::mask_global(&refs, sparsity, bounds)?;
            values = layers.iter().map(|(_, _, v)| v.clone()).collect();
            paths.iter().for_each(|p| on_layer(p));
        }
        (_, Pattern::Unstructured { sparsity, global: None }) => {
            for (p, s, v) in &layers {
                let sc = scores(p, s, v)?;
                let k = select::count(sparsity, v.len());
                let (rows, cols) = rows_cols(s);
                masks.push(match criterion {
                    Criterion::Wanda => select::mask_per_row(&sc, rows, cols, k),
                    _ => select::mask_lowest(&sc, k),
                });
                values.push(v.clone());
                on_layer(p);
            }
        }
        (_, Pattern::Nm { n, m }) => {
            for (p, s, v) in &layers {
                let (rows, cols) = rows_cols(s);
                masks.push(select::mask_nm(&scores(p, s, v)?, rows, cols, n, m));
                values.push(v.clone());
                on_layer(p);
            }
        }
    }
    for (((p, shape, _), keep), mut v) in layers.into_iter().zip(masks).zip(values) {
        for (x, k) in v.iter_mut().zip(&keep) {
            if !k {
                *x = 0.0;
            }
        }
        let pruned = keep.iter().filter(|k| !**k).count();
        out.stats.push(LayerStats {
            params: v.len(),
            pruned,
            requested: pattern.sparsity(),
            shape: shape.clone(),
            path: p.clone(),
        });
        out.masks.insert(p.clone(), keep);
        out.values.insert(p.clone(), v);
        out.shapes.insert(p, shape);
    }
    Ok(out)
}

/// Sets each pruned layer's weight to its pruned values (dense, in the weight's dtype).
pub fn apply(model: &mut dyn Module, pruned: &Pruned) -> Result<()> {
    for (p, v) in &pruned.values {
        let layer = model.layer(p)?;
        let (_, w) = layer.parameters().into_iter().next().expect("weighted");
        let (dtype, device) = match &w {
            Weight::Dense(t) => (t.dtype(), t.device().clone()),
            _ => (DType::F32, Device::Cpu),
        };
        let t = Tensor::from_vec(v.clone(), pruned.shapes[p].clone(), &device)?.to_dtype(dtype)?;
        model.layer_mut(p)?.set_weight(Weight::Dense(t))?;
    }
    Ok(())
}

/// Stores each pruned layer's weight in the sparse format that persists its mask: N:M storage
/// for an N:M pattern; CSR for unstructured sparsity where it is smaller than the dense values
/// (below about half density), else dense with its zeros. Returns each layer's new format.
pub fn store_sparse(model: &mut dyn Module, pruned: &Pruned, pattern: Pattern) -> Result<Vec<(String, String)>> {
    store_sparse_with(model, pruned, &|_| Ok(pattern))
}

/// [`store_sparse`] with each layer's pattern given by `pattern_of(path)`.
pub(crate) fn store_sparse_with(
    model: &mut dyn Module,
    pruned: &Pruned,
    pattern_of: &dyn Fn(&str) -> Result<Pattern>,
) -> Result<Vec<(String, String)>> {
    let mut formats = Vec::new();
    for p in pruned.values.keys() {
        let pattern = pattern_of(p)?;
        let layer = model.layer(p)?;
        let (name, w) = layer.parameters().into_iter().next().expect("weighted");
        let Weight::Dense(t) = w else {
            return Err(Error::invalid(format!("weight of `{p}`"), "expected the pruned dense values"));
        };
        let new = match pattern {
            Pattern::Nm { n, m } => Weight::Sparse(SparseTensor::nm_from_dense(&t, n, m, &name)?),
            Pattern::Unstructured { .. } => {
                let csr = SparseTensor::csr_from_dense(&t, &name)?;
                if csr.storage_bytes() < t.elem_count() * t.dtype().size_in_bytes() {
                    Weight::Sparse(csr)
                } else {
                    Weight::Dense(t)
                }
            }
        };
        formats.push((p.clone(), new.describe()));
        model.layer_mut(p)?.set_weight(new)?;
    }
    Ok(formats)
}

#[cfg(test)]
mod tests;
