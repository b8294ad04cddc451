//! The workspace's one tolerance helper, for tests in every crate.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Largest absolute element-wise difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        return Err(Error::Shape {
            name: "compared tensor".into(),
            expected: a.dims().to_vec(),
            found: b.dims().to_vec(),
        });
    }
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?;
    if d.elem_count() == 0 {
        return Ok(0.0);
    }
    Ok(d.max(0)?.to_scalar::<f32>()?)
}

/// Checks that `a` and `b` agree within `tol` (max absolute difference), with an error that
/// says by how much they do not.
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f32) -> Result<()> {
    let d = max_abs_diff(a, b)?;
    if d.is_nan() || d > tol {
        return Err(Error::invalid("comparison", format!("max abs difference {d} exceeds tolerance {tol}")));
    }
    Ok(())
}

/// Deterministic pseudo-random values in [−3, 3): `m·k` of them, the same for the same `seed`
/// in every runtime's test suite.
pub fn input(m: usize, k: usize, seed: u64) -> Vec<f32> {
    (0..m * k)
        .map(|i| {
            let h = (i as u64).wrapping_mul(6364136223846793005).wrapping_add(seed.wrapping_mul(1442695040888963407));
            ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
        })
        .collect()
}

/// A deterministic random quantized weight of `shape` (rows first) for kernel tests: every
/// runtime's test suite draws its weight-only problems from here, so they test the same ones.
/// `kind` picks the mapping (0 signed symmetric, 1 unsigned asymmetric, 2 signed asymmetric,
/// 3 a 4-bit-at-most codebook), `gran` the granularity (0 tensor, 1 channel, 2 token, 3 the
/// largest of 32, 64, 8, 2 elements that divides a row).
pub fn random_quantized(shape: &[usize], bits: u8, kind: usize, gran: usize, seed: u64) -> crate::QuantizedTensor {
    use crate::{Granularity, Mapping, QuantScheme, QuantizedTensor};
    let (signed, symmetric, mapping) = match kind {
        0 => (true, true, Mapping::Linear),
        1 => (false, false, Mapping::Linear),
        2 => (true, false, Mapping::Linear),
        _ => (false, true, Mapping::Codebook),
    };
    let bits = if mapping == Mapping::Codebook { bits.min(4) } else { bits };
    let row: usize = shape[1..].iter().product();
    let group = [32, 64, 8, 2].into_iter().find(|g| row.is_multiple_of(*g)).unwrap_or(row);
    let granularity = match gran {
        0 => Granularity::PerTensor,
        1 => Granularity::PerChannel { axis: 0 },
        2 => Granularity::PerToken,
        _ => Granularity::PerGroup { size: group },
    };
    let scheme = QuantScheme { bits, signed, symmetric, mapping, granularity };
    let levels = 1u64 << bits;
    let hash = |i: usize, salt: u64| (i as u64 ^ salt).wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(seed) >> 17;
    let numel: usize = shape.iter().product();
    let codes: Vec<u8> = (0..numel).map(|i| (hash(i, 1) % levels) as u8).collect();
    let ns = scheme.num_scales(shape).expect("a valid test shape");
    let scales: Vec<f32> = (0..ns).map(|i| (hash(i, 2) % 1000) as f32 * 1e-4 - 0.02).collect();
    let zeros = (!symmetric && mapping == Mapping::Linear)
        .then(|| (0..ns).map(|i| scheme.q_min() + (hash(i, 3) % levels) as i32).collect::<Vec<i32>>());
    let codebook = (mapping == Mapping::Codebook)
        .then(|| (0..levels as usize).map(|i| (i as f32 - 7.5) / 7.5 + (hash(i, 4) % 7) as f32 * 0.01).collect());
    QuantizedTensor::from_codes(&codes, scheme, scales, zeros, codebook, shape.to_vec(), DType::F32)
        .expect("a valid test weight")
}
