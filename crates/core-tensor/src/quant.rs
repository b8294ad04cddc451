//! Quantized weight format: packed 1–8-bit codes, the scheme that maps them back to reals, and
//! the reference `dequantize()` that defines those semantics for every runtime.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How integer codes map back to real numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mapping {
    /// Affine: `r = S · (q − Z)`, where `q` is the code read as signed or unsigned.
    Linear,
    /// Table lookup: `r = S · codebook[c]` (quantile, NF4, k-means codebooks).
    Codebook,
}

/// Which elements share one scale (and zero point).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Granularity {
    /// One scale for the whole tensor.
    PerTensor,
    /// One scale per index along `axis` (for a `[out, in]` weight, axis 0 is per output channel).
    PerChannel {
        /// The axis that indexes the scales.
        axis: usize,
    },
    /// One scale per `size` consecutive elements of each row, where a row is everything after
    /// the first axis (for a `[out, in]` weight, `in`; for a `[out, in, kh, kw]` convolution,
    /// `in·kh·kw`: the reduction axis either way). `size` must divide the row.
    PerGroup {
        /// Elements per group; must divide the last dimension.
        size: usize,
    },
    /// One scale per row of the tensor viewed as `[rows, last_dim]` (activations: per token).
    PerToken,
}

/// The full description of a quantized tensor's code space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantScheme {
    /// Bits per code, 1 to 8.
    pub bits: u8,
    /// Whether codes are read as two's-complement-like signed values `c − 2^(bits−1)`.
    pub signed: bool,
    /// Symmetric schemes have no zero point (Z = 0); asymmetric ones store one per scale.
    pub symmetric: bool,
    /// Linear (affine) or codebook mapping.
    pub mapping: Mapping,
    /// Which elements share a scale.
    pub granularity: Granularity,
}

impl QuantScheme {
    /// The smallest integer value a code can take under this scheme.
    pub fn q_min(&self) -> i32 {
        if self.signed { -(1i32 << (self.bits - 1)) } else { 0 }
    }

    /// The largest integer value a code can take under this scheme.
    pub fn q_max(&self) -> i32 {
        if self.signed { (1i32 << (self.bits - 1)) - 1 } else { (1i32 << self.bits) - 1 }
    }

    /// Checks the scheme on its own: bit width in range, codebook schemes have no zero points.
    pub fn validate(&self) -> Result<()> {
        if !(1..=8).contains(&self.bits) {
            return Err(Error::invalid("quant scheme", format!("bits must be 1..=8, found {}", self.bits)));
        }
        if let Granularity::PerGroup { size: 0 } = self.granularity {
            return Err(Error::invalid("quant scheme", "group size must be at least 1, found 0"));
        }
        Ok(())
    }

    /// The index of the scale (and zero point) that flat element `i` of a tensor of `shape`
    /// uses. `shape` must satisfy [`QuantScheme::num_scales`].
    pub fn scale_index(&self, shape: &[usize], i: usize) -> usize {
        let cols = shape.last().copied().unwrap_or(1).max(1);
        match self.granularity {
            Granularity::PerTensor => 0,
            Granularity::PerChannel { axis } => {
                let stride: usize = shape[axis + 1..].iter().product();
                (i / stride) % shape[axis]
            }
            Granularity::PerGroup { size } => i / size,
            Granularity::PerToken => i / cols,
        }
    }

    /// How many scales a tensor of `shape` needs under this scheme's granularity.
    pub fn num_scales(&self, shape: &[usize]) -> Result<usize> {
        let numel: usize = shape.iter().product();
        let cols = shape.last().copied().unwrap_or(1).max(1);
        Ok(match self.granularity {
            Granularity::PerTensor => 1,
            Granularity::PerChannel { axis } => *shape.get(axis).ok_or_else(|| {
                Error::invalid("quant scheme", format!("per-channel axis {axis} out of range for shape {shape:?}"))
            })?,
            Granularity::PerGroup { size } => {
                let row: usize = if shape.len() >= 2 { shape[1..].iter().product() } else { numel };
                if !row.is_multiple_of(size) {
                    return Err(Error::invalid(
                        "quant scheme",
                        format!("group size {size} does not divide the row length {row} of shape {shape:?}"),
                    ));
                }
                numel / size
            }
            Granularity::PerToken => numel / cols,
        })
    }
}

/// Scale and zero point of the affine mapping with codes `[q_min, q_max]` for values spanning
/// `[lo, hi]`: the range is widened to include 0 (made ±max|r| when `symmetric`, Z = 0) so zero
/// is exact, `S = (hi − lo)/(q_max − q_min)`, `Z = round(q_min − lo/S)`. An empty or non-finite
/// range gets S = 1 (Z = q_min when asymmetric), so constant tensors have a defined result.
/// Weights (pare-quant) and activations ([`crate::ActQuant`]) share this one rule.
pub fn affine_scale_zero(lo: f32, hi: f32, q_min: i32, q_max: i32, symmetric: bool) -> (f32, i32) {
    let (q_min, q_max) = (q_min as f32, q_max as f32);
    let (lo, hi) = if symmetric {
        let a = lo.abs().max(hi.abs());
        (-a, a)
    } else {
        (lo.min(0.0), hi.max(0.0))
    };
    if hi - lo <= 0.0 || !(hi - lo).is_finite() {
        return (1.0, if symmetric { 0 } else { q_min as i32 });
    }
    let s = (hi - lo) / (q_max - q_min);
    if symmetric {
        return (s, 0);
    }
    (s, (q_min - lo / s).round_ties_even().clamp(q_min, q_max) as i32)
}

/// Packs `codes` (each `< 2^bits`) into a little-endian bit stream: code `i` occupies bits
/// `i·bits .. (i+1)·bits`, least significant bit first.
pub fn pack_codes(codes: &[u8], bits: u8) -> Result<Vec<u8>> {
    if !(1..=8).contains(&bits) {
        return Err(Error::invalid("packing", format!("bits must be 1..=8, found {bits}")));
    }
    let limit = 1u16 << bits;
    if let Some((i, &c)) = codes.iter().enumerate().find(|(_, c)| u16::from(**c) >= limit) {
        return Err(Error::invalid("packing", format!("code {c} at index {i} does not fit in {bits} bits")));
    }
    if bits == 8 {
        return Ok(codes.to_vec());
    }
    let bits = usize::from(bits);
    let mut out = vec![0u8; packed_len(codes.len(), bits as u8)];
    for (i, &c) in codes.iter().enumerate() {
        let bit = i * bits;
        let (byte, shift) = (bit / 8, bit % 8);
        let v = u16::from(c) << shift;
        out[byte] |= v as u8;
        if shift + bits > 8 {
            out[byte + 1] |= (v >> 8) as u8;
        }
    }
    Ok(out)
}

/// Unpacks `n` codes of `bits` bits from a stream written by [`pack_codes`].
pub fn unpack_codes(packed: &[u8], bits: u8, n: usize) -> Result<Vec<u8>> {
    if !(1..=8).contains(&bits) {
        return Err(Error::invalid("unpacking", format!("bits must be 1..=8, found {bits}")));
    }
    let need = packed_len(n, bits);
    if packed.len() != need {
        return Err(Error::invalid(
            "unpacking",
            format!("{n} codes of {bits} bits need {need} bytes, found {}", packed.len()),
        ));
    }
    if bits == 8 {
        return Ok(packed.to_vec());
    }
    let b = usize::from(bits);
    let mask = (1u16 << bits) - 1;
    Ok((0..n)
        .map(|i| {
            let bit = i * b;
            let (byte, shift) = (bit / 8, bit % 8);
            let lo = u16::from(packed[byte]);
            let hi = if shift + b > 8 { u16::from(packed[byte + 1]) << 8 } else { 0 };
            (((lo | hi) >> shift) & mask) as u8
        })
        .collect())
}

/// Bytes needed to pack `n` codes of `bits` bits.
pub fn packed_len(n: usize, bits: u8) -> usize {
    (n * usize::from(bits)).div_ceil(8)
}

/// A tensor stored as packed integer codes plus the scheme, scales, zero points and optional
/// codebook needed to recover its values. Construct it with [`QuantizedTensor::new`], which
/// checks every invariant, so a value of this type is always consistent.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    codes: Vec<u8>,
    scheme: QuantScheme,
    scales: Vec<f32>,
    zero_points: Option<Vec<i32>>,
    codebook: Option<Vec<f32>>,
    shape: Vec<usize>,
    dtype: DType,
}

impl QuantizedTensor {
    /// The GGML block type that holds this tensor exactly (up to the f16 rounding of its
    /// scales, none for scales that are already f16 values), if any: signed symmetric linear
    /// int8 or int4 in groups of 32 along the rows of a 2-D tensor (llama.cpp's Q8_0 and Q4_0).
    pub fn ggml_type(&self) -> Option<candle_core::quantized::GgmlDType> {
        use candle_core::quantized::GgmlDType;
        let s = &self.scheme;
        let fits = s.signed
            && s.symmetric
            && s.mapping == Mapping::Linear
            && s.granularity == Granularity::PerGroup { size: 32 }
            && self.shape.len() == 2
            && self.shape[1].is_multiple_of(32);
        match s.bits {
            8 if fits => Some(GgmlDType::Q8_0),
            4 if fits => Some(GgmlDType::Q4_0),
            _ => None,
        }
    }

    /// The codes and scales as GGML blocks of [`QuantizedTensor::ggml_type`] (Q8_0: an f16
    /// scale and 32 i8; Q4_0: an f16 scale and 16 bytes, element `j` in the low nibble of byte
    /// `j`, element `j + 16` in the high one), or `None` when no block type holds them.
    pub fn ggml_blocks(&self) -> Option<(candle_core::quantized::GgmlDType, Vec<u8>)> {
        use candle_core::quantized::GgmlDType;
        let ty = self.ggml_type()?;
        let codes = self.codes();
        let mut out = Vec::with_capacity(codes.len() / 32 * 34);
        for (b, block) in codes.chunks(32).enumerate() {
            out.extend_from_slice(&half::f16::from_f32(self.scales[b]).to_le_bytes());
            match ty {
                // Codes are stored offset by q_min (−128): the signed value is `c − 128`.
                GgmlDType::Q8_0 => out.extend(block.iter().map(|&c| c.wrapping_sub(128))),
                // Q4_0 reads `nibble − 8`, and 4-bit codes are already `value + 8`.
                _ => out.extend((0..16).map(|j| block[j] | (block[j + 16] << 4))),
            }
        }
        Some((ty, out))
    }

    /// A `[rows, cols]` tensor from GGML Q8_0 or Q4_0 blocks (the inverse of
    /// [`QuantizedTensor::ggml_blocks`]: the same codes, the f16 scales as f32) whose
    /// `dequantize()` returns `dtype`. `name` names the tensor in errors.
    pub fn from_ggml_blocks(
        name: &str,
        ty: candle_core::quantized::GgmlDType,
        data: &[u8],
        shape: &[usize],
        dtype: DType,
    ) -> Result<Self> {
        use candle_core::quantized::GgmlDType;
        let bad = |detail: String| Error::invalid(format!("GGUF tensor `{name}`"), detail);
        let (bits, block_bytes) = match ty {
            GgmlDType::Q8_0 => (8u8, 34usize),
            GgmlDType::Q4_0 => (4, 18),
            other => return Err(bad(format!("expected Q8_0 or Q4_0 blocks, found {other:?}"))),
        };
        let [rows, cols] = shape[..] else { return Err(bad(format!("expected 2 dimensions, found {shape:?}"))) };
        if !cols.is_multiple_of(32) {
            return Err(bad(format!("rows of {cols} elements do not split into blocks of 32")));
        }
        let blocks = rows * cols / 32;
        if data.len() != blocks * block_bytes {
            return Err(bad(format!("expected {} bytes of blocks, found {}", blocks * block_bytes, data.len())));
        }
        let mut codes = Vec::with_capacity(rows * cols);
        let mut scales = Vec::with_capacity(blocks);
        for block in data.chunks(block_bytes) {
            scales.push(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
            match ty {
                GgmlDType::Q8_0 => codes.extend(block[2..].iter().map(|&c| c.wrapping_add(128))),
                _ => {
                    codes.extend(block[2..].iter().map(|&b| b & 0x0F));
                    codes.extend(block[2..].iter().map(|&b| b >> 4));
                }
            }
        }
        let scheme = QuantScheme {
            bits,
            signed: true,
            symmetric: true,
            mapping: Mapping::Linear,
            granularity: Granularity::PerGroup { size: 32 },
        };
        Self::from_codes(&codes, scheme, scales, None, None, shape.to_vec(), dtype)
    }

    /// Builds a quantized tensor from unpacked codes (one `u8` per element, each `< 2^bits`),
    /// packing them. `dtype` is the logical dtype `dequantize()` returns.
    pub fn from_codes(
        codes: &[u8],
        scheme: QuantScheme,
        scales: Vec<f32>,
        zero_points: Option<Vec<i32>>,
        codebook: Option<Vec<f32>>,
        shape: Vec<usize>,
        dtype: DType,
    ) -> Result<Self> {
        scheme.validate()?;
        let packed = pack_codes(codes, scheme.bits)?;
        Self::new(packed, scheme, scales, zero_points, codebook, shape, dtype)
    }

    /// Builds a quantized tensor from already packed codes, validating every invariant:
    /// packed length, number of scales, finite scales, zero points present
    /// exactly for asymmetric linear schemes and within the code range, codebook present
    /// exactly for codebook schemes with at most `2^bits` finite entries.
    pub fn new(
        codes: Vec<u8>,
        scheme: QuantScheme,
        scales: Vec<f32>,
        zero_points: Option<Vec<i32>>,
        codebook: Option<Vec<f32>>,
        shape: Vec<usize>,
        dtype: DType,
    ) -> Result<Self> {
        scheme.validate()?;
        let what = || format!("quantized tensor of shape {shape:?}");
        let numel = crate::checked_numel(&shape).ok_or_else(|| Error::invalid(what(), "element count overflows"))?;
        let need = packed_len(numel, scheme.bits);
        if codes.len() != need {
            return Err(Error::invalid(what(), format!("expected {need} packed code bytes, found {}", codes.len())));
        }
        let n_scales = scheme.num_scales(&shape)?;
        if scales.len() != n_scales {
            return Err(Error::invalid(what(), format!("expected {n_scales} scales, found {}", scales.len())));
        }
        // Scales may be negative: llama.cpp's Q4_0 stores d = max/−8 with the sign of the
        // largest-magnitude value, and pare keeps its blocks exactly.
        if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
            return Err(Error::invalid(what(), format!("scale {i} is {} (must be finite)", scales[i])));
        }
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(Error::invalid(what(), format!("logical dtype must be a float type, found {dtype:?}")));
        }
        match scheme.mapping {
            Mapping::Linear => {
                if codebook.is_some() {
                    return Err(Error::invalid(what(), "a linear scheme has no codebook"));
                }
                match (&zero_points, scheme.symmetric) {
                    (Some(_), true) => {
                        return Err(Error::invalid(what(), "a symmetric scheme has no zero points"));
                    }
                    (None, false) => {
                        return Err(Error::invalid(what(), "an asymmetric scheme needs zero points, found none"));
                    }
                    (Some(z), false) => {
                        if z.len() != n_scales {
                            return Err(Error::invalid(
                                what(),
                                format!("expected {n_scales} zero points, found {}", z.len()),
                            ));
                        }
                        if let Some(i) = z.iter().position(|z| *z < scheme.q_min() || *z > scheme.q_max()) {
                            return Err(Error::invalid(
                                what(),
                                format!(
                                    "zero point {i} is {}, outside the code range {}..={}",
                                    z[i],
                                    scheme.q_min(),
                                    scheme.q_max()
                                ),
                            ));
                        }
                    }
                    (None, true) => {}
                }
            }
            Mapping::Codebook => {
                if zero_points.is_some() {
                    return Err(Error::invalid(what(), "a codebook scheme has no zero points"));
                }
                let Some(cb) = &codebook else {
                    return Err(Error::invalid(what(), "a codebook scheme needs a codebook, found none"));
                };
                let max = 1usize << scheme.bits;
                if cb.is_empty() || cb.len() > max {
                    return Err(Error::invalid(
                        what(),
                        format!("codebook must hold 1..={max} entries, found {}", cb.len()),
                    ));
                }
                if cb.iter().any(|v| !v.is_finite()) {
                    return Err(Error::invalid(what(), "codebook holds a non-finite entry"));
                }
                if scheme.bits < 8 || cb.len() < 256 {
                    let codes = unpack_codes(&codes, scheme.bits, numel)?;
                    if let Some(i) = codes.iter().position(|c| usize::from(*c) >= cb.len()) {
                        return Err(Error::invalid(
                            what(),
                            format!("code {} at index {i} is past the codebook's {} entries", codes[i], cb.len()),
                        ));
                    }
                }
            }
        }
        Ok(Self { codes, scheme, scales, zero_points, codebook, shape, dtype })
    }

    /// The same codes and scales under another shape with as many elements, when the scheme
    /// assigns scales the same way (a `[out, in·kh·kw]` matrix back to its `[out, in, kh, kw]`
    /// convolution weight, for per-channel and per-group schemes).
    pub fn reshaped(self, shape: Vec<usize>) -> Result<Self> {
        let (from, n) = (self.shape.clone(), self.numel());
        if crate::checked_numel(&shape) != Some(n) || self.scheme.num_scales(&shape)? != self.scales.len() {
            return Err(Error::invalid(
                format!("quantized tensor of shape {from:?}"),
                format!("cannot be viewed as {shape:?} under {:?}", self.scheme.granularity),
            ));
        }
        let dtype = self.dtype;
        Self::new(self.codes, self.scheme, self.scales, self.zero_points, self.codebook, shape, dtype)
    }

    /// The packed code bytes.
    pub fn packed_codes(&self) -> &[u8] {
        &self.codes
    }
    /// The codes unpacked, one `u8` per element in row-major order.
    pub fn codes(&self) -> Vec<u8> {
        unpack_codes(&self.codes, self.scheme.bits, self.numel()).expect("length checked at construction")
    }
    /// The scheme.
    pub fn scheme(&self) -> &QuantScheme {
        &self.scheme
    }
    /// The scales, one per granularity unit.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// The zero points (asymmetric linear schemes only).
    pub fn zero_points(&self) -> Option<&[i32]> {
        self.zero_points.as_deref()
    }
    /// The codebook (codebook schemes only).
    pub fn codebook(&self) -> Option<&[f32]> {
        self.codebook.as_deref()
    }
    /// The logical shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// The logical dtype `dequantize()` returns.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The number of logical elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes this tensor occupies in storage: packed codes, f32 scales, i32 zero points, codebook.
    pub fn storage_bytes(&self) -> usize {
        self.codes.len()
            + 4 * self.scales.len()
            + 4 * self.zero_points.as_ref().map_or(0, Vec::len)
            + 4 * self.codebook.as_ref().map_or(0, Vec::len)
    }

    /// The index into `scales` (and `zero_points`) of flat element `i`.
    pub fn scale_index(&self, i: usize) -> usize {
        self.scheme.scale_index(&self.shape, i)
    }

    /// The real values as `f32`, in row-major order: the reference semantics.
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let codes = self.codes();
        let offset = self.scheme.q_min();
        codes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let s = self.scale_index(i);
                let scale = self.scales[s];
                match self.scheme.mapping {
                    Mapping::Linear => {
                        let q = i32::from(c) + offset;
                        let z = self.zero_points.as_ref().map_or(0, |z| z[s]);
                        scale * (q - z) as f32
                    }
                    Mapping::Codebook => {
                        scale * self.codebook.as_ref().expect("checked at construction")[usize::from(c)]
                    }
                }
            })
            .collect()
    }

    /// The real values as a tensor of the logical shape and dtype on `device`: the reference
    /// semantics every runtime's kernels are tested against.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let t = Tensor::from_vec(self.dequantize_f32(), self.shape.as_slice(), device)?;
        Ok(if self.dtype == DType::F32 { t } else { t.to_dtype(self.dtype)? })
    }
}

#[cfg(test)]
mod tests;
