use candle_core::{DType, Device, Tensor};
use pare_core_tensor::testing::{input, random_quantized};
use pare_core_tensor::{ActRange, Granularity, QuantScheme, ReferenceRuntime, Runtime, Weight};
use proptest::prelude::*;

use super::*;
use crate::CpuRuntime;

/// Activation specs: per token and per tensor, symmetric and with a zero point, static ranges
/// (one that clips), narrower codes, smoothing (factors sized per case).
fn specs(k: usize) -> Vec<ActQuant> {
    let mut smooth = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    smooth.smooth = Some((0..k).map(|i| 0.5 + (i % 5) as f32 * 0.3).collect());
    vec![
        ActQuant::new(8, true, ActRange::Dynamic { per_token: true }),
        ActQuant::new(8, true, ActRange::Dynamic { per_token: false }),
        ActQuant::new(8, false, ActRange::Dynamic { per_token: true }),
        ActQuant::new(8, false, ActRange::Static { scale: 0.021, zero_point: 121 }),
        ActQuant::new(8, true, ActRange::Static { scale: 0.004, zero_point: 0 }),
        ActQuant::new(6, false, ActRange::Dynamic { per_token: true }),
        smooth,
    ]
}

/// Runs `q` on `x` with `act` at every level and thread count: each result within the
/// float-rounding bound of the reference (fake-quantized input × dequantized weight), all
/// results identical.
fn check(
    q: &QuantizedTensor,
    act: &ActQuant,
    x: &Tensor,
    bias: Option<&Tensor>,
) -> std::result::Result<(), TestCaseError> {
    let (m, k) = x.dims2().unwrap();
    let n = q.shape()[0];
    let w = Weight::Quantized(q.clone());
    let want = ReferenceRuntime::cpu()
        .prepare_linear_quantized_input("fc", &w, bias, act)
        .unwrap()
        .forward(x)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let xq = act.fake_quantize(x).unwrap().to_vec2::<f32>().unwrap();
    let wd = q.dequantize_f32();
    let mut first: Option<Vec<Vec<f32>>> = None;
    for level in SimdLevel::available() {
        for threads in [1, 3] {
            let rt = CpuRuntime::with_level(threads, level).unwrap();
            let op = rt.prepare_linear_quantized_input("fc", &w, bias, act).unwrap();
            let got = op.forward(x).unwrap().to_vec2::<f32>().unwrap();
            for r in 0..m {
                for j in 0..n {
                    let mag: f32 = (0..k).map(|t| (xq[r][t] * wd[j * k + t]).abs()).sum();
                    let tol = 8.0 * (k + 8) as f32 * f32::EPSILON * mag + 1e-6;
                    prop_assert!(
                        (got[r][j] - want[r][j]).abs() <= tol,
                        "{level:?}/{threads}: y[{r},{j}] = {} vs reference {} (tol {tol})",
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Every code width up to 4, symmetric and asymmetric (signed and unsigned) weights, every
    /// granularity (groups of 32, 64, 8 and 2: the last one runs the float path), rows on both
    /// sides of the integer kernel's limit, ragged n and k (tails of 1–3 indices), every
    /// activation spec.
    #[test]
    fn w4a8_matches_the_reference_at_every_level_and_thread_count(
        m in prop_oneof![1usize..7, 7usize..12], n in 1usize..40,
        k in prop_oneof![1usize..70, (1usize..12).prop_map(|g| g * 32), (1usize..6).prop_map(|g| g * 64 + 3)],
        bits in 1u8..5, kind in 0usize..3, gran in 0usize..4, spec in 0usize..7, bias in any::<bool>(),
        seed in any::<u64>()
    ) {
        let q = random_quantized(&[n, k], bits, kind, gran, seed);
        prop_assert!(fits(&q));
        let act = specs(k)[spec].clone();
        let b = bias.then(|| Tensor::from_vec(input(1, n, seed ^ 3), n, &Device::Cpu).unwrap());
        let x = Tensor::from_vec(input(m, k, seed ^ 7), (m, k), &Device::Cpu).unwrap();
        check(&q, &act, &x, b.as_ref())?;
    }
}

/// The extreme products on long rows: codes 15 against activation codes −128 (centred; a
/// static range with zero point 255 maps these inputs to code 0), so eight i16 steps reach
/// −30720 — one more bit would wrap — with every layout path (groups of 32, one group over
/// an odd length).
#[test]
fn extreme_codes_do_not_wrap_the_integer_sums() {
    let (m, n) = (2, 21);
    for (k, gran) in [(4096, Granularity::PerGroup { size: 32 }), (1541, Granularity::PerChannel { axis: 0 })] {
        let scheme =
            QuantScheme { bits: 4, signed: false, symmetric: true, mapping: Mapping::Linear, granularity: gran };
        let ns = scheme.num_scales(&[n, k]).unwrap();
        let q =
            QuantizedTensor::from_codes(&vec![15; n * k], scheme, vec![0.01; ns], None, None, vec![n, k], DType::F32)
                .unwrap();
        let act = ActQuant::new(8, false, ActRange::Static { scale: 0.01, zero_point: 255 });
        let x = Tensor::from_vec(vec![-3.0f32; m * k], (m, k), &Device::Cpu).unwrap();
        check(&q, &act, &x, None).unwrap();
        // The integer path really ran: its sums are exact, so the result is the closed form.
        let op = W4A8Linear::new("fc", &q, None, &act, SimdLevel::detect(), crate::CpuRuntime::new(1).unwrap().pool)
            .unwrap();
        assert!(op.integer);
        let y = op.run(&vec![-3.0f32; m * k], None).unwrap();
        // Unsigned symmetric codes have no offset: ŵ = 0.01·15 per weight, x̂ = 0.01·(0 − 255).
        let want = k as f32 * 0.15 * -2.55;
        assert!(y.iter().all(|v| (v - want).abs() <= 1e-5 * want.abs()), "{} vs {want}", y[0]);
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let q = random_quantized(&[8, 64], 4, 0, 3, 1);
    let act = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    let rt = CpuRuntime::new(1).unwrap();
    let op = rt.prepare_linear_quantized_input("fc", &Weight::Quantized(q.clone()), None, &act).unwrap();
    let wrong = Tensor::zeros((2, 63), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(op.forward(&wrong), Err(Error::Shape { .. })));
    // Both paths (2 rows: the integer kernel; 40: the float one), NaN and infinity, screened
    // by the per-token ranges.
    for (m, bad) in [(2, f32::NAN), (40, f32::INFINITY), (40, f32::NAN)] {
        let mut v = vec![0.5f32; m * 64];
        v[70] = bad;
        let x = Tensor::from_vec(v, (m, 64), &Device::Cpu).unwrap();
        assert!(matches!(op.forward(&x), Err(Error::NonFinite { first: 70, count: 1, .. })), "{m} rows, {bad}");
    }
    let mut bad = act.clone();
    bad.smooth = Some(vec![1.0; 63]);
    let e = rt.prepare_linear_quantized_input("fc", &Weight::Quantized(q), None, &bad).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
}

/// An activation fused into the op gives the bits of the op followed by the runtime's own
/// activation kernel, on both paths (the integer kernel and the float one).
#[test]
fn fused_activations_match_the_separate_kernel() {
    let (n, k) = (37, 96);
    let q = random_quantized(&[n, k], 4, 1, 3, 5);
    let act = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    let rt = CpuRuntime::new(2).unwrap();
    let op = rt.prepare_linear_quantized_input("fc", &Weight::Quantized(q), None, &act).unwrap();
    for m in [3, 40] {
        let x = Tensor::from_vec(input(m, k, 9), (m, k), &Device::Cpu).unwrap();
        for a in [Activation::Gelu, Activation::Relu] {
            let fused = op.forward_activated(&x, a).unwrap().unwrap().to_vec2::<f32>().unwrap();
            let apart = rt.activation(a, &op.forward(&x).unwrap()).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(fused, apart, "{m} rows, {a:?}");
        }
    }
}
