//! Shared test problem for every linear kernel (tract test-rt style): random inputs, the
//! reference answer from `ReferenceRuntime` on the dense equivalent, every SIMD level × thread
//! count checked against it and against each other bit for bit.

use candle_core::{Device, Tensor};
use pare_core_tensor::{ReferenceRuntime, Runtime, Weight};
use proptest::prelude::*;

use crate::{CpuRuntime, SimdLevel};

pub use pare_core_tensor::testing::input;

/// A random `[n, k]` weight in the format the W8A8 kernel takes: int8 codes, signed and
/// symmetric, one scale per output channel.
pub fn int8_weight(n: usize, k: usize, seed: u64) -> pare_core_tensor::QuantizedTensor {
    int_weight(8, n, k, seed)
}

/// [`int8_weight`] with codes of `bits` bits (2..=8). As symmetric quantization makes them,
/// every row reaches the range's end: its first code is the most negative value, so 8-bit
/// weights never fit AVX2's narrow (7-bit) kernel by chance.
pub fn int_weight(bits: u8, n: usize, k: usize, seed: u64) -> pare_core_tensor::QuantizedTensor {
    use pare_core_tensor::{Granularity, Mapping, QuantScheme, QuantizedTensor};
    let scheme = QuantScheme {
        bits,
        signed: true,
        symmetric: true,
        mapping: Mapping::Linear,
        granularity: Granularity::PerChannel { axis: 0 },
    };
    let codes: Vec<u8> = (0..n * k)
        .map(|i| {
            if i % k == 0 {
                0
            } else {
                ((i as u64).wrapping_mul(2654435761).wrapping_add(seed) >> 7) as u8 >> (8 - bits)
            }
        })
        .collect();
    let scales = (0..n).map(|j| 0.001 + 0.0007 * j as f32).collect();
    QuantizedTensor::from_codes(&codes, scheme, scales, None, None, vec![n, k], candle_core::DType::F32).unwrap()
}

/// Runs `w` (dense values `dense`, `[n, k]`) on `m` random rows at every level and thread
/// count. Each result must be within the float-summation bound `8·k·ε·Σ|x|·mag` of the
/// reference, where `mag[j·k + p]` bounds the magnitude of the terms a kernel may sum for
/// weight `(j, p)` (`|w|` for float kernels), and all results must be identical.
pub fn check_linear(
    w: &Weight,
    dense: &[f32],
    mag: &[f32],
    (m, n, k): (usize, usize, usize),
    bias: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    let dev = Device::Cpu;
    let b = bias.then(|| Tensor::from_vec(input(1, n, seed ^ 3), n, &dev).unwrap());
    let xv = input(m, k, seed);
    let x = Tensor::from_vec(xv.clone(), (m, k), &dev).unwrap();
    let wd = Weight::Dense(Tensor::from_vec(dense.to_vec(), (n, k), &dev).unwrap());
    let want = ReferenceRuntime::cpu().prepare_linear("fc", &wd, b.as_ref()).unwrap().forward(&x).unwrap();
    let want = want.to_vec2::<f32>().unwrap();
    let mut first: Option<Vec<Vec<f32>>> = None;
    for level in SimdLevel::available() {
        for threads in [1, 3] {
            let rt = CpuRuntime::with_level(threads, level).unwrap();
            let got = rt.prepare_linear("fc", w, b.as_ref()).unwrap().forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for r in 0..m {
                for j in 0..n {
                    let s: f32 = (0..k).map(|p| xv[r * k + p].abs() * mag[j * k + p]).sum();
                    let tol = 8.0 * k as f32 * f32::EPSILON * s + 1e-6;
                    prop_assert!(
                        (got[r][j] - want[r][j]).abs() <= tol,
                        "{level:?}/{threads} threads: y[{r},{j}] = {} vs reference {} (tol {tol})",
                        got[r][j],
                        want[r][j]
                    );
                }
            }
            match &first {
                None => first = Some(got),
                Some(f) => prop_assert_eq!(f, &got, "bits differ across SIMD levels or thread counts"),
            }
        }
    }
    Ok(())
}
