use candle_core::{Device, Tensor};
use pare_core_tensor::{Activation, ReferenceRuntime, Runtime};
use proptest::prelude::*;

use crate::testkit::input;
use crate::{CpuRuntime, SimdLevel};

fn t(v: Vec<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn flat(x: &Tensor) -> Vec<f32> {
    x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Runs `f` on every level × thread count: every result within `tol(reference value)` of the
/// reference, and the same bits for every thread count at one level.
fn check(want: &[f32], tol: impl Fn(f32) -> f32, f: impl Fn(&CpuRuntime) -> Vec<f32>) -> Result<(), TestCaseError> {
    for level in SimdLevel::available() {
        let mut first: Option<Vec<f32>> = None;
        for threads in [1, 3] {
            let got = f(&CpuRuntime::with_level(threads, level).unwrap());
            prop_assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                prop_assert!((g - w).abs() <= tol(*w), "{:?}/{}: [{}] {} vs reference {}", level, threads, i, g, w);
            }
            match &first {
                None => first = Some(got),
                Some(f) => prop_assert_eq!(f, &got, "bits differ across thread counts"),
            }
        }
    }
    Ok(())
}

/// Random `[batch, seq, heads·hd]` projections and, when `masked`, a key mask that pads the end
/// of each sequence except its first token, as BERT masks it.
fn attention_case(
    batch: usize,
    seq: usize,
    heads: usize,
    hd: usize,
    masked: bool,
    seed: u64,
) -> (Tensor, Tensor, Tensor, Option<Tensor>) {
    let dims = [batch, seq, heads * hd];
    let n = batch * seq * heads * hd;
    let (q, k, v) = (t(input(1, n, seed), &dims), t(input(1, n, seed ^ 1), &dims), t(input(1, n, seed ^ 2), &dims));
    let mask = masked.then(|| {
        let keep = |i: usize| i.is_multiple_of(seq) || !(i * 7 + seed as usize).is_multiple_of(3);
        t((0..batch * seq).map(|i| if keep(i) { 0.0 } else { -1e9 }).collect(), &[batch, seq])
    });
    (q, k, v, mask)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn attention_matches_the_reference(
        batch in 1usize..3, seq in 1usize..40, heads in 1usize..4, hd in prop_oneof![Just(8usize), Just(16), Just(32), 1usize..12],
        masked in any::<bool>(), seed in any::<u64>()
    ) {
        let (q, k, v, mask) = attention_case(batch, seq, heads, hd, masked, seed);
        let scale = 1.0 / (hd as f64).sqrt();
        let want = flat(&ReferenceRuntime::cpu().attention(&q, &k, &v, heads, mask.as_ref(), scale).unwrap());
        check(&want, |_| 2e-5, |rt| flat(&rt.attention(&q, &k, &v, heads, mask.as_ref(), scale).unwrap()))?;
    }

    /// bf16 attention (`vdpbf16ps` with AVX-512 BF16, the f32 kernels on rounded operands at
    /// AVX2, the semantics value by value at the scalar level) matches the bf16 reference within f32 summation-order error, at lengths past the
    /// 64-key blocks, odd lengths (a last key pair of one), head widths that take either path,
    /// with and without a mask; the bits do not depend on the thread count.
    #[test]
    fn bf16_attention_matches_the_bf16_reference(
        batch in 1usize..3, seq in 1usize..140, heads in 1usize..3, hd in prop_oneof![Just(16usize), Just(32), Just(48), 1usize..12],
        masked in any::<bool>(), seed in any::<u64>()
    ) {
        let (q, k, v, mask) = attention_case(batch, seq, heads, hd, masked, seed);
        let scale = 1.0 / (hd as f64).sqrt();
        let bf16 = pare_core_tensor::AttentionPrecision::Bf16;
        let want = flat(&pare_core_tensor::attention_reference_bf16(&q, &k, &v, heads, mask.as_ref(), scale).unwrap());
        // The kernels' exp differs from candle's by an ulp or two, which rounding a numerator
        // to bf16 can turn into one bf16 ulp (2⁻⁸) of that key's weight: the tolerance is that
        // of a few flipped weights, not the f32 kernels' 2e-5.
        check(&want, |_| 3e-3, |rt| flat(&rt.attention_with(&q, &k, &v, heads, mask.as_ref(), scale, bf16).unwrap()))?;
        // And it is f32 attention to within bf16's rounding: each score moves by at most
        // δ = scale·Σ|q·k|·(2⁻⁸ + 2⁻¹⁸) (both operands within 2⁻⁹), so each normalised weight
        // by a factor within e^{±2δ}, and the rounded numerators and values by 2⁻⁹ each:
        // |o' − o| ≤ max|v|·((e^{2δ}(1 + 2⁻⁹) − 1)(1 + 2⁻⁹) + 2⁻⁹), plus f32 slack. (A fixed
        // 2% of the largest output was exceeded by a wide head of large scores: 2.06%.)
        let exact = flat(&ReferenceRuntime::cpu().attention(&q, &k, &v, heads, mask.as_ref(), scale).unwrap());
        let worst = want.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let (qv, kv, vv) = (flat(&q), flat(&k), flat(&v));
        let width = heads * hd;
        let mut spread = 0f64;
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..seq {
                    for j in 0..seq {
                        let at = |x: &[f32], t: usize, d: usize| f64::from(x[(b * seq + t) * width + h * hd + d]);
                        let s: f64 = (0..hd).map(|d| (at(&qv, i, d) * at(&kv, j, d)).abs()).sum();
                        spread = spread.max(s * scale);
                    }
                }
            }
        }
        let u = 2f64.powi(-9);
        let delta = spread * (2f64.powi(-8) + 2f64.powi(-18));
        let vmax = vv.iter().fold(0f64, |m, x| m.max(f64::from(x.abs())));
        let bound = vmax * (((2.0 * delta).exp() * (1.0 + u) - 1.0) * (1.0 + u) + u) + 1e-5 * vmax.max(1.0);
        prop_assert!(
            f64::from(worst) <= bound,
            "bf16 is {worst} from f32, above its rounding bound {bound} (δ = {delta}, max |v| = {vmax})"
        );
    }

    /// The AVX-512 attention (four rows, sixteen keys a register) gives the AVX2 path's bits,
    /// at lengths past its 64-key blocks and with every row tail.
    #[test]
    fn avx512_attention_gives_the_avx2_bits(
        seq in 1usize..140, heads in 1usize..3, hd in prop_oneof![Just(16usize), Just(32), Just(48)],
        masked in any::<bool>(), seed in any::<u64>()
    ) {
        if !SimdLevel::available().contains(&SimdLevel::Avx512Vnni) {
            return Ok(()); // nothing to compare on a CPU without AVX-512
        }
        let dims = [1, seq, heads * hd];
        let n = seq * heads * hd;
        let (q, k, v) = (t(input(1, n, seed), &dims), t(input(1, n, seed ^ 1), &dims), t(input(1, n, seed ^ 2), &dims));
        let mask = masked.then(|| t((0..seq).map(|i| if i % 5 == 4 { -1e9 } else { 0.0 }).collect(), &[1, seq]));
        let run = |level| flat(&CpuRuntime::with_level(2, level).unwrap().attention(&q, &k, &v, heads, mask.as_ref(), 0.2).unwrap());
        let (a, b) = (run(SimdLevel::Avx2), run(SimdLevel::Avx512Vnni));
        prop_assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "AVX2 and AVX-512 bits differ");
    }

    /// The AVX-512 activations (sixteen lanes, the same operations) give the AVX2 path's bits,
    /// standalone and fused into a linear's tiles, with every tail length and values past
    /// the saturating ends of erf, tanh and exp.
    #[test]
    fn avx512_activations_give_the_avx2_bits(n in 1usize..300, which in 0usize..4, seed in any::<u64>()) {
        if !SimdLevel::available().contains(&SimdLevel::Avx512Vnni) {
            return Ok(()); // nothing to compare on a CPU without AVX-512
        }
        let act = [Activation::Relu, Activation::Gelu, Activation::GeluTanh, Activation::Silu][which];
        let x = t(input(1, n, seed).into_iter().map(|v| v * 30.0).collect(), &[n]);
        let run = |level| flat(&CpuRuntime::with_level(2, level).unwrap().activation(act, &x).unwrap());
        let (a, b) = (run(SimdLevel::Avx2), run(SimdLevel::Avx512Vnni));
        prop_assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "AVX2 and AVX-512 bits differ");
    }

    #[test]
    fn activations_match_the_reference(n in 1usize..300, which in 0usize..4, seed in any::<u64>()) {
        let act = [Activation::Relu, Activation::Gelu, Activation::GeluTanh, Activation::Silu][which];
        // Values across [−12, 12]: the tails where erf saturates included.
        let x = t(input(1, n, seed).into_iter().map(|v| v * 4.0).collect(), &[n]);
        let want = flat(&ReferenceRuntime::cpu().activation(act, &x).unwrap());
        check(&want, |w| 2e-6 * w.abs().max(1.0), |rt| flat(&rt.activation(act, &x).unwrap()))?;
    }

    #[test]
    fn layer_norm_with_a_residual_matches_the_reference(rows in 1usize..20, dim in 1usize..100, res in any::<bool>(), seed in any::<u64>()) {
        let x = t(input(rows, dim, seed), &[rows, dim]);
        let r = res.then(|| t(input(rows, dim, seed ^ 5), &[rows, dim]));
        let (g, b) = (t(input(1, dim, seed ^ 6), &[dim]), t(input(1, dim, seed ^ 7), &[dim]));
        let want = flat(&ReferenceRuntime::cpu().layer_norm(&x, r.as_ref(), &g, &b, 1e-12).unwrap());
        check(&want, |w| 2e-5 * w.abs().max(1.0), |rt| flat(&rt.layer_norm(&x, r.as_ref(), &g, &b, 1e-12).unwrap()))?;
    }
}

#[test]
fn attention_shapes_are_checked() {
    let rt = CpuRuntime::new(1).unwrap();
    let q = Tensor::zeros((1, 4, 6), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = rt.attention(&q, &q, &q, 4, None, 1.0).unwrap_err().to_string();
    assert!(e.contains("4 heads") && e.contains("6"), "{e}");
    let bad = Tensor::zeros((1, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = rt.attention(&q, &q, &q, 2, Some(&bad), 1.0).unwrap_err().to_string();
    assert!(e.contains("attention mask") && e.contains("[1, 4]"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// A linear with its activation fused (each task activates its tile in cache) gives the
    /// bits of the linear followed by the runtime's activation: dense f32 (blocked and small-M
    /// paths), sparse, 4-bit weight-only panels and W8A8, at every level and thread count,
    /// with odd widths that leave partial vectors at the tiles' edges.
    #[test]
    fn fused_activations_give_the_unfused_bits(
        m in prop_oneof![1usize..8, 60usize..140], n in 1usize..70, k in 1usize..90,
        format in 0usize..4, which in 0usize..4, seed in any::<u64>()
    ) {
        use pare_core_tensor::{ActQuant, ActRange, Activation, Runtime, SparseTensor, Weight};
        let act = [Activation::Gelu, Activation::Relu, Activation::GeluTanh, Activation::Silu][which];
        let dense: Vec<f32> = input(n, k, seed).into_iter().enumerate().map(|(i, v)| if format == 1 && i % 3 != 0 { 0.0 } else { v }).collect();
        let wt = t(dense, &[n, k]);
        let bias = t(input(1, n, seed ^ 5), &[n]);
        let x = t(input(m, k, seed ^ 9), &[m, k]);
        for level in SimdLevel::available() {
            for threads in [1, 3] {
                let rt = CpuRuntime::with_level(threads, level).unwrap();
                let op = match format {
                    0 => rt.prepare_linear("fc", &Weight::Dense(wt.clone()), Some(&bias)).unwrap(),
                    1 => rt.prepare_linear("fc", &Weight::Sparse(SparseTensor::csr_from_dense(&wt, "fc").unwrap()), Some(&bias)).unwrap(),
                    2 => {
                        let q = pare_core_tensor::testing::random_quantized(&[n, k], 4, 0, 0, seed);
                        rt.prepare_linear("fc", &Weight::Quantized(q), Some(&bias)).unwrap()
                    }
                    _ => {
                        let q = crate::testkit::int8_weight(n, k, seed);
                        let a = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
                        rt.prepare_linear_quantized_input("fc", &Weight::Quantized(q), Some(&bias), &a).unwrap()
                    }
                };
                let fused = op.forward_activated(&x, act).expect("the CPU ops fuse these activations").unwrap();
                let want = rt.activation(act, &op.forward(&x).unwrap()).unwrap();
                prop_assert_eq!(flat(&fused), flat(&want), "{:?}/{} format {} {:?}", level, threads, format, act);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]
    /// The vectorisable bf16 rounding equals `half`'s (to nearest, ties to even) on every bit
    /// pattern: normal, subnormal, infinite, near f32::MAX (rounding up to infinity), and keeps
    /// a NaN a NaN.
    #[test]
    fn carry_trick_bf16_rounding_equals_half(bits in any::<u32>()) {
        let x = f32::from_bits(bits);
        let (got, want) = (super::bf16_round_bits(x), super::bf16_round(x));
        if x.is_nan() {
            prop_assert!(got.is_nan());
        } else {
            prop_assert_eq!(got.to_bits(), want.to_bits(), "{:e}", x);
        }
    }
}

#[test]
fn carry_trick_bf16_rounding_breaks_ties_to_even() {
    for hi in [0x3f80u32, 0x3f81, 0xbf80, 0xbf81, 0x0001, 0x7f7f, 0x0080] {
        for lo in [0x7fffu32, 0x8000, 0x8001, 0x0000, 0xffff] {
            let x = f32::from_bits(hi << 16 | lo);
            assert_eq!(super::bf16_round_bits(x).to_bits(), super::bf16_round(x).to_bits(), "{hi:#x}{lo:04x}");
        }
    }
}
