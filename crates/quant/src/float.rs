//! Fixed-point narrowing of floats: FP16 and BF16 (stored as dense half tensors) and FP8 E4M3
//! and E5M2 (stored as 8-bit codebook tensors whose codebook is the format's value table, with
//! an optional absmax scale), all round-to-nearest-even and saturating at the format's maximum.

use candle_core::{DType, Tensor};
use pare_core_tensor::{Granularity, Mapping, QuantScheme, QuantizedTensor};

use crate::Result;
use crate::error::option;
use crate::values::finite_values;

/// A 16-bit float format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// IEEE binary16: 5 exponent bits, 10 mantissa bits, max 65504.
    F16,
    /// bfloat16: 8 exponent bits, 7 mantissa bits, the range of f32.
    BF16,
}

/// Narrows `t` to FP16 or BF16, round-to-nearest-even, saturating (values beyond the largest
/// finite half become ± that value instead of infinity).
pub fn to_half(name: &str, t: &Tensor, format: Half) -> Result<Tensor> {
    let v = finite_values(name, t)?;
    let (max, dtype) = match format {
        Half::F16 => (f32::from(half::f16::MAX), DType::F16),
        Half::BF16 => (f32::from(half::bf16::MAX), DType::BF16),
    };
    let clamped: Vec<f32> = v.iter().map(|x| x.clamp(-max, max)).collect();
    Ok(Tensor::from_vec(clamped, t.dims(), t.device())?.to_dtype(dtype)?)
}

/// An 8-bit float format (OCP OFP8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8 {
    /// 4 exponent bits (bias 7), 3 mantissa bits; no infinities; max 448; NaN = S.1111.111.
    E4M3,
    /// 5 exponent bits (bias 15), 2 mantissa bits; IEEE-like infinities and NaNs; max 57344.
    E5M2,
}

impl Fp8 {
    fn fields(self) -> (u32, u32, i32) {
        match self {
            Fp8::E4M3 => (4, 3, 7),
            Fp8::E5M2 => (5, 2, 15),
        }
    }

    /// The value of `code`, or NaN / ±infinity for the format's special codes.
    pub fn decode(self, code: u8) -> f32 {
        let (e_bits, m_bits, bias) = self.fields();
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = u32::from(code >> m_bits) & ((1 << e_bits) - 1);
        let m = u32::from(code) & ((1 << m_bits) - 1);
        let e_max = (1 << e_bits) - 1;
        match self {
            Fp8::E4M3 if e == e_max && m == (1 << m_bits) - 1 => return f32::NAN,
            Fp8::E5M2 if e == e_max => return if m == 0 { sign * f32::INFINITY } else { f32::NAN },
            _ => {}
        }
        let frac = m as f32 / (1 << m_bits) as f32;
        let mag = if e == 0 { frac * 2f32.powi(1 - bias) } else { (1.0 + frac) * 2f32.powi(e as i32 - bias) };
        sign * mag
    }

    /// The largest finite value.
    pub fn max(self) -> f32 {
        match self {
            Fp8::E4M3 => 448.0,
            Fp8::E5M2 => 57344.0,
        }
    }

    /// The non-negative finite codes in increasing order of value (0x00 = +0 first).
    fn positive_codes(self) -> Vec<u8> {
        (0u8..0x80).filter(|c| self.decode(*c).is_finite()).collect()
    }

    /// Encodes `x` round-to-nearest-even, saturating at ± [`Fp8::max`]. `x` must be finite.
    pub fn encode(self, x: f32) -> u8 {
        self.encoder().encode(x)
    }

    fn encoder(self) -> Encoder {
        let codes = self.positive_codes();
        let values = codes.iter().map(|c| self.decode(*c)).collect();
        Encoder { codes, values }
    }

    /// The 256-entry value table used as a codebook; special codes (never produced by the
    /// saturating encoder) map to the saturated value so the codebook stays finite.
    pub fn codebook(self) -> Vec<f32> {
        (0..=255u8)
            .map(|c| {
                let v = self.decode(c);
                if v.is_finite() {
                    v
                } else if c & 0x80 != 0 {
                    -self.max()
                } else {
                    self.max()
                }
            })
            .collect()
    }
}

/// Binary search over the positive value table.
struct Encoder {
    codes: Vec<u8>,
    values: Vec<f32>,
}

impl Encoder {
    fn encode(&self, x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = x.abs();
        let last = self.values.len() - 1;
        let code = if a >= self.values[last] {
            self.codes[last]
        } else {
            // values[i] <= a < values[i + 1]
            let i = self.values.partition_point(|v| *v <= a) - 1;
            let (lo, hi) = (self.values[i], self.values[i + 1]);
            let pick_hi = match (a - lo).total_cmp(&(hi - a)) {
                std::cmp::Ordering::Less => false,
                std::cmp::Ordering::Greater => true,
                // A tie goes to the even code (mantissa LSB 0): round half to even.
                std::cmp::Ordering::Equal => self.codes[i] & 1 == 1,
            };
            self.codes[if pick_hi { i + 1 } else { i }]
        };
        code | sign
    }
}

/// Narrows `t` to FP8. With `scale` set, each unit of that granularity is first divided by
/// `absmax / format.max()` (scaled FP8, as vLLM stores it); without, values are cast directly.
pub fn to_fp8(name: &str, t: &Tensor, format: Fp8, scale: Option<Granularity>) -> Result<QuantizedTensor> {
    let v = finite_values(name, t)?;
    let shape = t.dims().to_vec();
    let scheme = QuantScheme {
        bits: 8,
        signed: false,
        symmetric: true,
        mapping: Mapping::Codebook,
        granularity: scale.unwrap_or(Granularity::PerTensor),
    };
    let n = scheme.num_scales(&shape).map_err(|e| option(name, e.to_string()))?;
    let mut scales = vec![1f32; n];
    if scale.is_some() {
        let mut amax = vec![0f32; n];
        for (i, x) in v.iter().enumerate() {
            let u = scheme.scale_index(&shape, i);
            amax[u] = amax[u].max(x.abs());
        }
        for (s, a) in scales.iter_mut().zip(amax) {
            *s = if a > 0.0 { a / format.max() } else { 1.0 };
        }
    }
    let enc = format.encoder();
    let codes: Vec<u8> =
        v.iter().enumerate().map(|(i, x)| enc.encode(x / scales[scheme.scale_index(&shape, i)])).collect();
    Ok(QuantizedTensor::from_codes(&codes, scheme, scales, None, Some(format.codebook()), shape, DType::F32)?)
}

#[cfg(test)]
mod tests;
