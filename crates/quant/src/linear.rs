//! Linear (affine) range mapping at any width 2–8 bits, symmetric or asymmetric, at every
//! granularity: `r = S(q − Z)`, `q = clamp(round(r/S + Z), q_min, q_max)`,
//! `S = (r_max − r_min)/(q_max − q_min)`, `Z = q_min − r_min/S` rounded to an integer so that
//! zero is exactly representable.

use candle_core::{DType, Tensor};
use pare_core_tensor::{Granularity, Mapping, QuantScheme, QuantizedTensor};

use crate::Result;
use crate::error::option;
use crate::values::finite_values;

/// What to quantize to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearSpec {
    /// Bits per code, 2 to 8.
    pub bits: u8,
    /// Symmetric (signed codes, Z = 0, range ±max|r|) or asymmetric (unsigned codes, range
    /// [min(r, 0), max(r, 0)] with an integer zero point).
    pub symmetric: bool,
    /// Which elements share a scale.
    pub granularity: Granularity,
}

impl LinearSpec {
    /// The core-tensor scheme this spec produces.
    pub fn scheme(&self) -> QuantScheme {
        QuantScheme {
            bits: self.bits,
            signed: self.symmetric,
            symmetric: self.symmetric,
            mapping: Mapping::Linear,
            granularity: self.granularity,
        }
    }
}

/// Scale and zero point for one granularity unit whose values span `[lo, hi]`.
///
/// The range is widened to include 0 so zero is exact. A unit that is all zeros gets S = 1
/// (any scale represents it exactly), so constant tensors have a defined result.
pub fn scale_zero(lo: f32, hi: f32, scheme: &QuantScheme) -> (f32, i32) {
    pare_core_tensor::affine_scale_zero(lo, hi, scheme.q_min(), scheme.q_max(), scheme.symmetric)
}

/// Quantizes one value: `clamp(round(r/S + Z))` as an integer in the scheme's range.
#[inline]
pub fn quantize_value(r: f32, s: f32, z: i32, q_min: i32, q_max: i32) -> i32 {
    ((r / s).round_ties_even() as i32).saturating_add(z).clamp(q_min, q_max)
}

/// Quantizes `t` (named `name` in errors) with `spec`, computing each unit's range from the data.
pub fn quantize_linear(name: &str, t: &Tensor, spec: LinearSpec) -> Result<QuantizedTensor> {
    let scheme = spec.scheme();
    if !(2..=8).contains(&spec.bits) {
        return Err(option(name, format!("linear mapping needs 2..=8 bits, found {}", spec.bits)));
    }
    let shape = t.dims().to_vec();
    let n_scales = scheme.num_scales(&shape).map_err(|e| option(name, e.to_string()))?;
    let v = finite_values(name, t)?;
    let mut lo = vec![f32::INFINITY; n_scales];
    let mut hi = vec![f32::NEG_INFINITY; n_scales];
    for (i, &x) in v.iter().enumerate() {
        let u = scheme.scale_index(&shape, i);
        lo[u] = lo[u].min(x);
        hi[u] = hi[u].max(x);
    }
    let (scales, zeros): (Vec<f32>, Vec<i32>) =
        lo.iter().zip(&hi).map(|(&l, &h)| if l > h { (1.0, 0) } else { scale_zero(l, h, &scheme) }).unzip();
    quantize_with(name, &v, &shape, t.dtype(), spec, &scales, &zeros)
}

/// Quantizes row-major `values` of `shape` with given per-unit scales and zero points (from an
/// observer or a clipping search). Values outside the range saturate.
pub fn quantize_with(
    name: &str,
    values: &[f32],
    shape: &[usize],
    dtype: DType,
    spec: LinearSpec,
    scales: &[f32],
    zeros: &[i32],
) -> Result<QuantizedTensor> {
    let scheme = spec.scheme();
    let n = scheme.num_scales(shape).map_err(|e| option(name, e.to_string()))?;
    if scales.len() != n || zeros.len() != n {
        return Err(option(
            name,
            format!("expected {n} scales and zero points, found {} and {}", scales.len(), zeros.len()),
        ));
    }
    if let Some(i) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(option(name, format!("scale {i} is {}, expected a finite value > 0", scales[i])));
    }
    let (q_min, q_max) = (scheme.q_min(), scheme.q_max());
    let codes: Vec<u8> = values
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let u = scheme.scale_index(shape, i);
            (quantize_value(x, scales[u], zeros[u], q_min, q_max) - q_min) as u8
        })
        .collect();
    let dtype = if matches!(dtype, DType::F16 | DType::BF16 | DType::F64) { dtype } else { DType::F32 };
    let zero_points = if spec.symmetric { None } else { Some(zeros.to_vec()) };
    Ok(QuantizedTensor::from_codes(&codes, scheme, scales.to_vec(), zero_points, None, shape.to_vec(), dtype)?)
}

#[cfg(test)]
mod tests;
