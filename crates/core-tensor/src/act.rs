//! Activation quantization: how a layer's *input* is quantized before its weight is applied.
//!
//! A layer with an [`ActQuant`] computes `y = Q(x) Wᵀ + b`, where `Q` maps `x` onto `bits`-bit
//! integers with the same affine rule as weights (`q = clamp(round(x/S) + Z)`, `x̂ = S(q − Z)`,
//! ties to even). The range is either fixed by calibration ([`ActRange::Static`]: one scale and
//! zero point stored with the model) or measured on each call ([`ActRange::Dynamic`]: per
//! token — each row of the last axis — or over the whole tensor). The reference semantics is
//! [`ActQuant::fake_quantize`]; integer kernels (runtime-cpu's W8A8 GEMM) must agree with it.
//!
//! Specs travel in a model file's metadata as `pare.act.PATH` (JSON), so a statically
//! quantized model reloads with its calibrated scales.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Module, Result};

/// Metadata key prefix of a layer's activation quantization.
pub const META_ACT: &str = "pare.act.";

/// How the range of an activation is found.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ActRange {
    /// Measured on every call: per token (every row of the last axis has its own scale) or
    /// over the whole tensor (one scale per call).
    Dynamic {
        /// One scale per row of the last axis rather than one per tensor.
        per_token: bool,
    },
    /// Fixed by calibration.
    Static {
        /// Step size S > 0.
        scale: f32,
        /// Zero point Z in the code range (0 when symmetric).
        zero_point: i32,
    },
}

/// The quantization of one layer's input activations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActQuant {
    /// Bits per code, 2 to 8.
    pub bits: u8,
    /// Symmetric (signed codes, Z = 0) or asymmetric (unsigned codes with a zero point).
    pub symmetric: bool,
    /// Static or dynamic range.
    pub range: ActRange,
    /// SmoothQuant factors, one per input channel (linear layers): the layer quantizes
    /// `x ⊘ s` and its weight already holds `W·diag(s)`, so outlier channels of `x` are tamed
    /// before the per-tensor or per-token range is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smooth: Option<Vec<f32>>,
}

impl ActQuant {
    /// The smallest code: `-2^(b-1)` when symmetric, 0 otherwise.
    pub fn q_min(&self) -> i32 {
        if self.symmetric { -(1 << (self.bits - 1)) } else { 0 }
    }
    /// The largest code: `2^(b-1) − 1` when symmetric, `2^b − 1` otherwise.
    pub fn q_max(&self) -> i32 {
        if self.symmetric { (1 << (self.bits - 1)) - 1 } else { (1 << self.bits) - 1 }
    }

    /// A spec without smoothing.
    pub fn new(bits: u8, symmetric: bool, range: ActRange) -> Self {
        Self { bits, symmetric, range, smooth: None }
    }

    /// Checks the spec for `layer`: width, a finite positive scale, a zero point in range,
    /// finite positive smoothing factors.
    pub fn validate(&self, layer: &str) -> Result<()> {
        let what = || format!("activation quantization of `{layer}`");
        if let Some(s) = &self.smooth
            && let Some(i) = s.iter().position(|v| !(v.is_finite() && *v > 0.0))
        {
            return Err(Error::invalid(
                what(),
                format!("smoothing factor {i} is {}, expected a finite value > 0", s[i]),
            ));
        }
        if !(2..=8).contains(&self.bits) {
            return Err(Error::invalid(what(), format!("expected 2..=8 bits, found {}", self.bits)));
        }
        if let ActRange::Static { scale, zero_point } = self.range {
            if !(scale.is_finite() && scale > 0.0) {
                return Err(Error::invalid(what(), format!("expected a finite scale > 0, found {scale}")));
            }
            let z_ok =
                if self.symmetric { zero_point == 0 } else { (self.q_min()..=self.q_max()).contains(&zero_point) };
            if !z_ok {
                return Err(Error::invalid(
                    what(),
                    format!("zero point {zero_point} outside [{}, {}] (0 when symmetric)", self.q_min(), self.q_max()),
                ));
            }
        }
        Ok(())
    }

    /// Scale and zero point for values spanning `[lo, hi]` (widened to include 0, so zero is
    /// exact; an all-zero range gets S = 1).
    pub fn scale_zero(&self, lo: f32, hi: f32) -> (f32, i32) {
        crate::quant::affine_scale_zero(lo, hi, self.q_min(), self.q_max(), self.symmetric)
    }

    /// Quantizes `x` to codes (as `i32`), returning each value's `(scale, zero_point)` unit
    /// through `units`: one unit for static and per-tensor ranges, one per row when per token.
    /// `row` is the length of the last axis.
    pub fn quantize_slice(&self, x: &[f32], row: usize) -> (Vec<i32>, Vec<(f32, i32)>) {
        let (q_min, q_max) = (self.q_min(), self.q_max());
        let units: Vec<(f32, i32)> = match self.range {
            ActRange::Static { scale, zero_point } => vec![(scale, zero_point)],
            ActRange::Dynamic { per_token: false } => vec![self.scale_zero(min_of(x), max_of(x))],
            ActRange::Dynamic { per_token: true } => {
                x.chunks(row.max(1)).map(|r| self.scale_zero(min_of(r), max_of(r))).collect()
            }
        };
        let per_row = units.len() > 1;
        let codes = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let (s, z) = units[if per_row { i / row } else { 0 }];
                ((v / s).round_ties_even() as i32).saturating_add(z).clamp(q_min, q_max)
            })
            .collect();
        (codes, units)
    }

    /// The reference semantics: `x` (divided by the smoothing factors along its last axis, if
    /// any) quantized and dequantized, in `x`'s dtype and shape.
    pub fn fake_quantize(&self, x: &Tensor) -> Result<Tensor> {
        let row = x.dims().last().copied().unwrap_or(1);
        let mut v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(s) = &self.smooth {
            if s.len() != row {
                return Err(Error::Shape {
                    name: "smoothed activation".into(),
                    expected: vec![s.len()],
                    found: vec![row],
                });
            }
            v.iter_mut().enumerate().for_each(|(i, x)| *x /= s[i % row]);
        }
        if let Some(i) = v.iter().position(|f| !f.is_finite()) {
            return Err(Error::NonFinite {
                name: "activation entering a quantized layer".into(),
                count: v.iter().filter(|f| !f.is_finite()).count(),
                first: i,
            });
        }
        let (codes, units) = self.quantize_slice(&v, row);
        let per_row = units.len() > 1;
        let out: Vec<f32> = codes
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let (s, z) = units[if per_row { i / row } else { 0 }];
                s * (q - z) as f32
            })
            .collect();
        Ok(Tensor::from_vec(out, x.dims(), x.device())?.to_dtype(x.dtype())?)
    }

    /// A short description for reports (`int8 asym static`, `int8 sym per-token`).
    pub fn describe(&self) -> String {
        let sym = if self.symmetric { "sym" } else { "asym" };
        let range = match self.range {
            ActRange::Static { .. } => "static",
            ActRange::Dynamic { per_token: true } => "dynamic per-token",
            ActRange::Dynamic { per_token: false } => "dynamic per-tensor",
        };
        let smooth = if self.smooth.is_some() { " smoothed" } else { "" };
        format!("int{} {sym} {range}{smooth}", self.bits)
    }
}

fn min_of(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::INFINITY, f32::min)
}

fn max_of(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Every layer's activation quantization as metadata entries (`pare.act.PATH` → JSON).
pub fn to_metadata(model: &dyn Module) -> BTreeMap<String, String> {
    model
        .layers()
        .iter()
        .filter_map(|l| {
            l.input_quant().map(|a| (format!("{META_ACT}{}", l.path()), serde_json::to_string(&a).expect("serialises")))
        })
        .collect()
}

/// Applies the `pare.act.*` entries of a file's metadata to `model`'s layers. An entry that
/// names no layer, or does not parse, is an error naming the key.
pub fn apply_metadata(model: &mut dyn Module, metadata: &BTreeMap<String, String>) -> Result<()> {
    for (key, value) in metadata {
        let Some(path) = key.strip_prefix(META_ACT) else { continue };
        let spec: ActQuant = serde_json::from_str(value)
            .map_err(|e| Error::invalid(format!("metadata `{key}`"), format!("not an activation spec: {e}")))?;
        model.layer_mut(path)?.set_input_quant(Some(spec))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn static_and_dynamic_ranges_round_trip_within_half_a_step() {
        let x = Tensor::new(&[[-1.0f32, 0.5, 2.0], [0.1, 0.2, 0.3]], &Device::Cpu).unwrap();
        let dynamic = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
        let y = dynamic.fake_quantize(&x).unwrap().to_vec2::<f32>().unwrap();
        // Each row has its own step S = 2·max|x|/255.
        for (row, (xs, ys)) in [[-1.0f32, 0.5, 2.0], [0.1, 0.2, 0.3]].iter().zip(&y).enumerate() {
            let s = 2.0 * xs.iter().fold(0f32, |a, v| a.max(v.abs())) / 255.0;
            assert!(xs.iter().zip(ys).all(|(a, b)| (a - b).abs() <= s / 2.0 + 1e-7), "row {row}: {ys:?}");
        }
        // A static range clips what lies outside it.
        let fixed = ActQuant::new(8, false, ActRange::Static { scale: 0.01, zero_point: 100 });
        let y = fixed.fake_quantize(&x).unwrap().to_vec2::<f32>().unwrap();
        assert!((y[0][0] + 1.0).abs() < 1e-6 && (y[0][2] - 1.55).abs() < 1e-5, "{y:?}");
    }

    #[test]
    fn values_far_outside_a_static_range_saturate_instead_of_overflowing() {
        let a = ActQuant::new(8, false, ActRange::Static { scale: 1e-3, zero_point: 7 });
        let (codes, _) = a.quantize_slice(&[3e9, -3e9, 0.0], 3);
        assert_eq!(codes, [255, 0, 7]);
    }

    #[test]
    fn bad_specs_name_the_layer() {
        let bad = ActQuant::new(8, true, ActRange::Static { scale: f32::NAN, zero_point: 0 });
        let e = bad.validate("fc1").unwrap_err().to_string();
        assert!(e.contains("`fc1`") && e.contains("NaN"), "{e}");
        let bad = ActQuant::new(9, true, ActRange::Dynamic { per_token: true });
        assert!(bad.validate("fc1").unwrap_err().to_string().contains("found 9"));
        let x = Tensor::new(&[f32::INFINITY, 1.0], &Device::Cpu).unwrap();
        let ok = ActQuant::new(8, true, ActRange::Dynamic { per_token: false });
        assert!(ok.fake_quantize(&x).is_err());
    }
}
