use candle_core::DType;
use pare_core_tensor::{Granularity, Mapping, QuantScheme, QuantizedTensor, Weight};
use proptest::prelude::*;

use super::*;
use crate::gemm::KC;
use crate::testkit::{check_linear, input};

/// A random quantized `[n, k]` weight under the scheme picked by the arguments (the problem
/// generator every runtime's suite shares).
fn weight(n: usize, k: usize, bits: u8, kind: usize, gran: usize, seed: u64) -> QuantizedTensor {
    pare_core_tensor::testing::random_quantized(&[n, k], bits, kind, gran, seed)
}

/// `|S|·(|value| + |e|)`: the size of the terms the fused kernel sums for each weight.
fn magnitudes(q: &QuantizedTensor) -> Vec<f32> {
    let p = QuantPanels::pack(q);
    let k = q.shape()[1];
    let codes = q.codes();
    (0..q.numel())
        .map(|i| {
            let (j, t) = (i / k, i % k);
            let g = t / p.group;
            let at = (j / NR * p.groups + g) * NR + j % NR;
            p.scale[at].abs() * (p.value(codes[i]).abs() + p.offsets(j / NR, g)[j % NR].abs())
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Every code width, linear (sym, asym, signed, unsigned) and codebook mappings, every
    /// granularity, batch sizes on both sides of the fused limit, past one 192-row tile of
    /// decoded panels and past the four tiles from which the weights are decoded once up
    /// front, ragged n and k.
    #[test]
    fn weight_only_kernels_match_the_reference_at_every_level_and_thread_count(
        m in prop_oneof![1usize..8, 7usize..20, 190usize..200, 760usize..800], n in 1usize..40,
        k in prop_oneof![1usize..70, (1usize..20).prop_map(|g| g * 32)],
        bits in 1u8..9, kind in 0usize..4, gran in 0usize..4, bias in any::<bool>(), seed in any::<u64>()
    ) {
        let q = weight(n, k, bits, kind, gran, seed);
        prop_assert!(fits(&q));
        check_linear(&Weight::Quantized(q.clone()), &q.dequantize_f32(), &magnitudes(&q), (m, n, k), bias, seed)?;
    }

    /// The GEMM path's decoded panels are the reference dequantization, bit for bit.
    #[test]
    fn decoded_panels_are_the_reference_dequantization(
        n in 1usize..40, k in 1usize..600, bits in 1u8..9, kind in 0usize..4, gran in 0usize..4, seed in any::<u64>()
    ) {
        let q = weight(n, k, bits, kind, gran, seed);
        let want = q.dequantize_f32();
        let p = QuantPanels::pack(&q);
        let mut buf = vec![0f32; KC * NR];
        for level in SimdLevel::available() {
            for jb in 0..n.div_ceil(NR) {
                for k0 in (0..k).step_by(KC) {
                    let k1 = (k0 + KC).min(k);
                    let got = p.panel(level, jb, k0, k1, &mut buf);
                    for t in k0..k1 {
                        for c in 0..NR.min(n - jb * NR) {
                            let j = jb * NR + c;
                            prop_assert_eq!(got[(t - k0) * NR + c].to_bits(), want[j * k + t].to_bits(), "{:?} w[{},{}]", level, j, t);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn formats_the_kernels_do_not_take_fall_back_to_the_reference() {
    // An 8-bit codebook (256 entries) and per-input-channel scales are left to the reference.
    let q = weight(4, 8, 6, 0, 1, 1);
    assert!(fits(&q));
    let s = QuantScheme { granularity: Granularity::PerChannel { axis: 1 }, ..*q.scheme() };
    let q1 = QuantizedTensor::from_codes(&q.codes(), s, vec![0.1; 8], None, None, vec![4, 8], DType::F32).unwrap();
    assert!(!fits(&q1));
    let cb = QuantScheme {
        bits: 5,
        signed: false,
        symmetric: true,
        mapping: Mapping::Codebook,
        granularity: Granularity::PerTensor,
    };
    let q2 = QuantizedTensor::from_codes(&[1; 32], cb, vec![1.0], None, Some(input(1, 32, 3)), vec![4, 8], DType::F32)
        .unwrap();
    assert!(!fits(&q2));
    let rt = crate::CpuRuntime::new(1).unwrap();
    let x = candle_core::Tensor::ones((2, 8), DType::F32, &candle_core::Device::Cpu).unwrap();
    for w in [q1, q2] {
        use pare_core_tensor::Runtime;
        let op = rt.prepare_linear("fc", &Weight::Quantized(w), None).unwrap();
        assert_eq!(op.forward(&x).unwrap().dims(), &[2, 4]);
    }
}

/// The AVX2 fused kernel reads linear 4-bit codes scaled by a power of two per lane (up to
/// 2¹²) and undoes it in each group's scale and offset: at the edges of the range of real
/// activations (|x| from 10⁻²⁰ to 10²⁵, every code, asymmetric groups) every level still gives
/// the scalar twin's bits.
#[test]
fn scaled_codes_keep_the_bits_for_tiny_and_huge_activations() {
    let (n, k) = (16, 64);
    let q = weight(n, k, 4, 1, 3, 7);
    let p = QuantPanels::pack(&q);
    for mag in [1e-20f32, 1e-3, 1.0, 1e12, 1e25] {
        let x: Vec<f32> = (0..k).map(|i| mag * ((i as f32 * 0.37).sin() + 0.01)).collect();
        let rows = [x.as_slice()];
        let sums = p.fused_aux(&rows).unwrap();
        let mut want = [[0f32; NR]];
        p.fused_rows(SimdLevel::Scalar, 0, &rows, &sums, &mut want);
        assert!(want[0].iter().all(|v| v.is_finite() && *v != 0.0), "{mag}: {want:?}");
        for level in SimdLevel::available() {
            let mut got = [[0f32; NR]];
            p.fused_rows(level, 0, &rows, &sums, &mut got);
            let (g, w): (Vec<u32>, Vec<u32>) = (got[0].map(f32::to_bits).into(), want[0].map(f32::to_bits).into());
            assert_eq!(g, w, "{level:?} at |x| ~ {mag}");
        }
    }
}
