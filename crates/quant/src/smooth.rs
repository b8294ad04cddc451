//! SmoothQuant (Xiao et al., 2023): move activation outliers into the weights. For a linear
//! layer with inputs `X` and weight `W`, per input channel `j`,
//! `s_j = max|X_j|^α / max|W_:j|^(1−α)`; the layer then quantizes `X ⊘ s` and holds
//! `W·diag(s)`, an exact rewrite in float that leaves both sides easier to quantize.
//!
//! In post-LayerNorm encoders such as BERT the LayerNorm output also feeds the residual, so
//! the division cannot be folded into the LayerNorm; pare keeps it in the layer's
//! activation spec ([`pare_core_tensor::ActQuant::smooth`]), where an integer kernel applies
//! it while quantizing the row it reads anyway.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Tensor};
use pare_core_tensor::{Hooks, Module, Observer, Site, Weight};

use crate::error::option;
use crate::{Result, finite_values};

/// Per layer, the largest |x| of each input channel seen during calibration.
#[derive(Debug, Default)]
pub struct ChannelMaxObserver {
    paths: BTreeSet<String>,
    /// `path → max |x_j|` per input channel.
    pub amax: BTreeMap<String, Vec<f32>>,
}

impl Observer for ChannelMaxObserver {
    fn observe(&mut self, site: &Site<'_>, input: &Tensor, _output: &Tensor) -> pare_core_tensor::Result<()> {
        if !self.paths.contains(site.path) {
            return Ok(());
        }
        let cols = input.dims().last().copied().unwrap_or(1);
        let m = input.to_dtype(DType::F32)?.reshape(((), cols))?.abs()?.max(0)?.to_vec1::<f32>()?;
        let e = self.amax.entry(site.path.to_string()).or_insert_with(|| vec![0.0; cols]);
        e.iter_mut().zip(&m).for_each(|(a, b)| *a = a.max(*b));
        Ok(())
    }
}

/// Collects per-channel input maxima of the linear layers at `paths`.
pub fn collect_channel_max(
    paths: &[String],
    run: &mut dyn FnMut(&mut Hooks<'_>) -> Result<usize>,
) -> Result<ChannelMaxObserver> {
    let mut obs = ChannelMaxObserver { paths: paths.iter().cloned().collect(), amax: BTreeMap::new() };
    if run(&mut Hooks::with(&mut obs))? == 0 {
        return Err(option("calibration set", "expected at least one example, found 0"));
    }
    for p in paths {
        if !obs.amax.contains_key(p) {
            return Err(option(p, "the calibration set never reached this layer (expected ≥ 1 batch, found 0)"));
        }
    }
    Ok(obs)
}

/// Smooths the (dense, float) linear layers at `paths` with migration strength `alpha`
/// (0.5 in the paper): scales each weight to `W·diag(s)` in place and returns the factors,
/// to be passed to [`crate::ptq::calibrate_smoothed`]. Channels never active get s = 1.
pub fn smooth_model(
    model: &mut dyn Module,
    paths: &[String],
    amax: &ChannelMaxObserver,
    alpha: f32,
) -> Result<BTreeMap<String, Vec<f32>>> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(option("--smooth", format!("alpha must be in [0, 1], found {alpha}")));
    }
    let mut plan = Vec::new();
    for p in paths {
        let (name, w) = model.layer(p)?.parameters().swap_remove(0);
        let t = crate::values::float_weight(&name, &w, "smoothing needs the float weight")?;
        let (rows, cols) =
            t.dims2().map_err(|_| option(&name, format!("expected a 2-D weight, found {:?}", t.dims())))?;
        let x = amax.amax.get(p).ok_or_else(|| option(p, "no calibration statistics for this layer"))?;
        if x.len() != cols {
            return Err(option(&name, format!("expected {cols} input channels, found {}", x.len())));
        }
        let v = finite_values(&name, &t)?;
        let s: Vec<f32> = (0..cols)
            .map(|j| {
                let wmax = (0..rows).map(|r| v[r * cols + j].abs()).fold(0f32, f32::max);
                let f = x[j].powf(alpha) / wmax.powf(1.0 - alpha);
                if f.is_finite() && f > 0.0 { f.clamp(1e-5, 1e5) } else { 1.0 }
            })
            .collect();
        plan.push((p.clone(), t, s));
    }
    let mut out = BTreeMap::new();
    for (p, t, s) in plan {
        let factors = Tensor::from_vec(s.clone(), (1, s.len()), t.device())?.to_dtype(t.dtype())?;
        model.layer_mut(&p)?.set_weight(Weight::Dense(t.broadcast_mul(&factors)?))?;
        out.insert(p, s);
    }
    Ok(out)
}
