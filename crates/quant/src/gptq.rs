//! GPTQ (Frantar et al., 2022): weight quantization that compensates each column's rounding
//! error on the columns not yet quantized, using the layer's calibration Hessian
//! `H = 2XᵀX/n`. Per column `i` (in input order, or by decreasing `H_ii` with `act_order`):
//! `q = Q(w_i)`, `e = (w_i − q)/[H⁻¹]_ii`, `w_j −= e·[H⁻¹]_ij` for `j > i`, where `H⁻¹` is
//! the upper Cholesky factor of the damped inverse Hessian. Group scales are computed from
//! the weights as updated when the group starts (or, with `act_order`, from the original
//! weights — the reference's `static_groups`).
//!
//! [`HessianObserver`] accumulates `XᵀX` for the selected linear layers during calibration
//! forwards; [`gptq_quantize`] then quantizes one weight matrix. [`clip_search`] is the
//! cheaper, calibration-free companion: per group, the range shrink that minimises the
//! weight error.

use candle_core::Tensor;
use pare_core_tensor::{Granularity, QuantizedTensor};

use crate::error::option;
use crate::linear::{LinearSpec, quantize_value, quantize_with, scale_zero};
use crate::{Result, finite_values};

/// GPTQ's options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    /// Dampening added to the Hessian's diagonal, as a fraction of its mean (0.01).
    pub damp: f64,
    /// Quantize columns by decreasing Hessian diagonal (with group scales fixed up front).
    pub act_order: bool,
    /// Search each group's clipping range (shrinking it by up to 20 %) for the least error.
    pub clip_search: bool,
    /// Weights that are exactly zero stay zero (a pruned layer's mask survives): their share
    /// of the compensation is passed on to the kept weights, as SparseGPT does with a fixed
    /// mask, instead of filling them in.
    pub keep_zeros: bool,
}

impl Default for GptqConfig {
    fn default() -> Self {
        Self { damp: 0.01, act_order: false, clip_search: true, keep_zeros: false }
    }
}

pub use pare_core_tensor::calib::HessianObserver;

use pare_core_tensor::calib::inverse_upper_factor;

/// Scale and zero point of one group, optionally shrinking the range for the least error
/// `Σ|w − Q(w)|^2.4` (GPTQ's reference norm) over 20 steps of 1 %.
pub fn group_params(w: &[f32], spec: &LinearSpec, clip: bool) -> (f32, i32) {
    let scheme = spec.scheme();
    let lo = w.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
    let hi = w.iter().copied().fold(f32::NEG_INFINITY, f32::max).max(0.0);
    let (q_min, q_max) = (scheme.q_min(), scheme.q_max());
    let err = |(s, z): (f32, i32)| -> f64 {
        w.iter()
            .map(|&x| {
                let q = quantize_value(x, s, z, q_min, q_max);
                f64::from((x - s * (q - z) as f32).abs()).powf(2.4)
            })
            .sum()
    };
    let full = scale_zero(lo, hi, &scheme);
    if !clip {
        return full;
    }
    let mut best = (err(full), full);
    for k in 1..=20 {
        let f = 1.0 - k as f32 * 0.01;
        let cand = scale_zero(lo * f, hi * f, &scheme);
        let e = err(cand);
        if e < best.0 {
            best = (e, cand);
        }
    }
    best.1
}

fn groups_of(spec: &LinearSpec, name: &str, cols: usize) -> Result<usize> {
    match spec.granularity {
        Granularity::PerChannel { axis: 0 } | Granularity::PerTensor => Ok(cols),
        Granularity::PerGroup { size } if size > 0 && cols.is_multiple_of(size) => Ok(size),
        Granularity::PerGroup { size } => {
            Err(option(name, format!("group size {size} must divide the row length {cols}")))
        }
        g => Err(option(
            name,
            format!("GPTQ and clip search need per-tensor, per-channel (axis 0) or per-group scales, found {g:?}"),
        )),
    }
}

/// Round-to-nearest with a per-group clipping search (no calibration data).
pub fn clip_search(name: &str, t: &Tensor, spec: LinearSpec) -> Result<QuantizedTensor> {
    let (rows, cols) = t.dims2().map_err(|_| option(name, format!("expected a 2-D weight, found {:?}", t.dims())))?;
    let group = groups_of(&spec, name, cols)?;
    let w = finite_values(name, t)?;
    if spec.granularity == Granularity::PerTensor {
        let (s, z) = group_params(&w, &spec, true);
        return quantize_with(name, &w, &[rows, cols], t.dtype(), spec, &[s], &[z]);
    }
    let (mut scales, mut zeros) = (Vec::new(), Vec::new());
    for r in 0..rows {
        for g in (0..cols).step_by(group) {
            let (s, z) = group_params(&w[r * cols + g..r * cols + g + group], &spec, true);
            scales.push(s);
            zeros.push(z);
        }
    }
    quantize_with(name, &w, &[rows, cols], t.dtype(), spec, &scales, &zeros)
}

/// Quantizes the `[out, in]` weight `t` with GPTQ given its input Hessian `h` (`in×in`,
/// row-major, from [`HessianObserver::hessian`]).
pub fn gptq_quantize(name: &str, t: &Tensor, h: &[f64], spec: LinearSpec, cfg: GptqConfig) -> Result<QuantizedTensor> {
    let (rows, cols) = t.dims2().map_err(|_| option(name, format!("expected a 2-D weight, found {:?}", t.dims())))?;
    if !(2..=8).contains(&spec.bits) {
        return Err(option(name, format!("linear mapping needs 2..=8 bits, found {}", spec.bits)));
    }
    let group = groups_of(&spec, name, cols)?;
    let scheme = spec.scheme();
    let (q_min, q_max) = (scheme.q_min(), scheme.q_max());
    let grid = Grid {
        group,
        per_tensor: spec.granularity == Granularity::PerTensor,
        params: &|w: &[f32]| group_params(w, &spec, cfg.clip_search),
        deq: &|x: f32, (s, z): (f32, i32)| s * (quantize_value(x, s, z, q_min, q_max) - z) as f32,
    };
    let (out, mut params) = gptq_core(name, t, h, cfg, &grid)?;
    if grid.per_tensor {
        params.truncate(1);
    }
    let (scales, zeros): (Vec<f32>, Vec<i32>) = params.into_iter().unzip();
    quantize_with(name, &out, &[rows, cols], t.dtype(), spec, &scales, &zeros)
}

/// NF4 with per-group absmax scales (optionally shrunk by the clipping search), rounded by
/// GPTQ's error compensation instead of to the nearest codebook entry.
pub fn gptq_nf4(name: &str, t: &Tensor, h: &[f64], group: usize, cfg: GptqConfig) -> Result<QuantizedTensor> {
    let (rows, cols) = t.dims2().map_err(|_| option(name, format!("expected a 2-D weight, found {:?}", t.dims())))?;
    if group == 0 || !cols.is_multiple_of(group) {
        return Err(option(name, format!("NF4 group size {group} must divide the row length {cols}")));
    }
    let book = &crate::codebook::NF4;
    let deq = |x: f32, (s, _): (f32, i32)| if s > 0.0 { s * book[crate::codebook::nearest(book, x / s)] } else { 0.0 };
    let params = |w: &[f32]| -> (f32, i32) {
        let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        if !cfg.clip_search || amax == 0.0 {
            return (amax, 0);
        }
        let err = |s: f32| -> f64 { w.iter().map(|&x| f64::from((x - deq(x, (s, 0))).abs()).powf(2.4)).sum() };
        let mut best = (err(amax), amax);
        for k in 1..=20 {
            let s = amax * (1.0 - k as f32 * 0.01);
            let e = err(s);
            if e < best.0 {
                best = (e, s);
            }
        }
        (best.1, 0)
    };
    let grid = Grid { group, per_tensor: false, params: &params, deq: &deq };
    let (out, params) = gptq_core(name, t, h, cfg, &grid)?;
    let scales: Vec<f32> = params.iter().map(|p| p.0).collect();
    let codes: Vec<u8> = out
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let s = scales[i / group];
            (if s > 0.0 { crate::codebook::nearest(book, x / s) } else { crate::codebook::nearest(book, 0.0) }) as u8
        })
        .collect();
    let scheme = pare_core_tensor::QuantScheme {
        bits: 4,
        signed: false,
        symmetric: true,
        mapping: pare_core_tensor::Mapping::Codebook,
        granularity: Granularity::PerGroup { size: group },
    };
    Ok(QuantizedTensor::from_codes(
        &codes,
        scheme,
        scales,
        None,
        Some(book.to_vec()),
        vec![rows, cols],
        candle_core::DType::F32,
    )?)
}

/// One group's scale and zero point.
type GroupParams = (f32, i32);

/// A per-group quantization grid for [`gptq_core`]: how a group's parameters are chosen and
/// how one value is quantized and dequantized under them.
struct Grid<'a> {
    group: usize,
    per_tensor: bool,
    params: &'a dyn Fn(&[f32]) -> (f32, i32),
    deq: &'a dyn Fn(f32, (f32, i32)) -> f32,
}

/// GPTQ's column-by-column quantization with error compensation: the dequantized weight
/// (row-major, original column order) and every row's group parameters.
fn gptq_core(
    name: &str,
    t: &Tensor,
    h: &[f64],
    cfg: GptqConfig,
    grid: &Grid<'_>,
) -> Result<(Vec<f32>, Vec<GroupParams>)> {
    let (rows, cols) = t.dims2().map_err(|_| option(name, format!("expected a 2-D weight, found {:?}", t.dims())))?;
    if h.len() != cols * cols {
        return Err(option(name, format!("expected a {cols}×{cols} Hessian, found {} values", h.len())));
    }
    let group = grid.group;
    let mut w = finite_values(name, t)?;
    let pruned: Vec<bool> = if cfg.keep_zeros { w.iter().map(|&x| x == 0.0).collect() } else { Vec::new() };
    let mut h = h.to_vec();
    // Dead inputs (never non-zero in calibration) carry no information: zero their weights.
    for i in 0..cols {
        if h[i * cols + i] == 0.0 {
            h[i * cols + i] = 1.0;
            for r in 0..rows {
                w[r * cols + i] = 0.0;
            }
        }
    }
    let mean_diag = (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
    // Column order: natural, or by decreasing Hessian diagonal.
    let mut perm: Vec<usize> = (0..cols).collect();
    if cfg.act_order {
        perm.sort_by(|&a, &b| h[b * cols + b].total_cmp(&h[a * cols + a]).then(a.cmp(&b)));
    }
    // Group parameters fixed up front for act-order (static groups) and per-tensor scales,
    // else found lazily from the updated weights.
    let n_groups = cols / group;
    let fixed = cfg.act_order || grid.per_tensor;
    let mut params = vec![(0f32, 0i32); rows * n_groups];
    if grid.per_tensor {
        params.fill((grid.params)(&w));
    } else if cfg.act_order {
        for r in 0..rows {
            for g in 0..n_groups {
                params[r * n_groups + g] = (grid.params)(&w[r * cols + g * group..r * cols + (g + 1) * group]);
            }
        }
    }
    // Permute H and W's columns into processing order.
    let hp: Vec<f64> = (0..cols * cols).map(|k| h[perm[k / cols] * cols + perm[k % cols]]).collect();
    let mut wp: Vec<f64> = (0..rows * cols).map(|k| f64::from(w[(k / cols) * cols + perm[k % cols]])).collect();
    // Damp until the Cholesky succeeds (GPTQ's 1 % usually suffices).
    let mut damp = cfg.damp.max(0.0) * mean_diag.max(f64::MIN_POSITIVE);
    let u = loop {
        let mut hd = hp.clone();
        for i in 0..cols {
            hd[i * cols + i] += damp;
        }
        if let Some(u) = inverse_upper_factor(&hd, cols) {
            break u;
        }
        damp = if damp == 0.0 { 1e-6 * mean_diag.max(1e-12) } else { damp * 10.0 };
        if damp > 1e6 * mean_diag.max(1e-12) {
            return Err(option(name, "the calibration Hessian is not positive definite even after dampening"));
        }
    };
    let mut out = vec![0f32; rows * cols];
    let mut err = vec![0f64; rows];
    for i in 0..cols {
        let orig = perm[i];
        let g = orig / group;
        if !fixed && orig.is_multiple_of(group) {
            // Natural order: the group starts here; take its parameters from the updated weights.
            for r in 0..rows {
                let row: Vec<f32> = (i..i + group).map(|j| wp[r * cols + j] as f32).collect();
                params[r * n_groups + g] = (grid.params)(&row);
            }
        }
        let d = u[i * cols + i];
        for r in 0..rows {
            let x = wp[r * cols + i] as f32;
            let deq =
                if cfg.keep_zeros && pruned[r * cols + orig] { 0.0 } else { (grid.deq)(x, params[r * n_groups + g]) };
            out[r * cols + orig] = deq;
            err[r] = (f64::from(x) - f64::from(deq)) / d;
        }
        let urow = &u[i * cols + i + 1..(i + 1) * cols];
        for r in 0..rows {
            let e = err[r];
            if e != 0.0 {
                let wr = &mut wp[r * cols + i + 1..(r + 1) * cols];
                wr.iter_mut().zip(urow).for_each(|(wv, uv)| *wv -= e * uv);
            }
        }
    }
    Ok((out, params))
}

#[cfg(test)]
mod tests;

/// Collects the input Hessians of the linear layers at `paths`: `run` pushes the calibration
/// set through the model with the hooks attached and returns how many examples it ran.
pub fn collect_hessians(
    paths: &[String],
    run: &mut dyn FnMut(&mut pare_core_tensor::Hooks<'_>) -> Result<usize>,
) -> Result<HessianObserver> {
    let mut obs = HessianObserver::new(paths);
    let n = run(&mut pare_core_tensor::Hooks::with(&mut obs))?;
    if n == 0 {
        return Err(option("calibration set", "expected at least one example, found 0"));
    }
    for p in paths {
        obs.hessian(p)?;
    }
    Ok(obs)
}
