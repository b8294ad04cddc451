use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pare_core_tensor::testing::input;
use pare_core_tensor::{ActRange, ReferenceRuntime, Runtime, Weight};
use proptest::prelude::*;

use super::*;
use crate::CpuRuntime;
use crate::testkit::{int_weight, int8_weight};

fn specs() -> Vec<ActQuant> {
    let mut smooth = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    smooth.smooth = Some(Vec::new()); // sized per case below
    vec![
        ActQuant::new(8, true, ActRange::Dynamic { per_token: true }),
        ActQuant::new(8, true, ActRange::Dynamic { per_token: false }),
        ActQuant::new(8, false, ActRange::Dynamic { per_token: true }),
        ActQuant::new(8, false, ActRange::Static { scale: 0.021, zero_point: 121 }),
        ActQuant::new(8, true, ActRange::Static { scale: 0.017, zero_point: 0 }),
        smooth,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn every_simd_level_and_thread_count_matches_the_reference(
        m in prop_oneof![1usize..9, 9usize..20], n in 1usize..23, k in 1usize..70, seed in any::<u64>(), spec in 0usize..6,
        bias in any::<bool>(), bits in prop_oneof![Just(8u8), Just(7), Just(6)]
    ) {
        // 7 bits and fewer run AVX2's quads kernel (vpmaddubsw), 8 its pairs kernel.
        let q = int_weight(bits, n, k, seed);
        let mut act = specs()[spec].clone();
        if act.smooth.is_some() {
            act.smooth = Some((0..k).map(|i| 0.5 + (i % 5) as f32 * 0.3).collect());
        }
        let b = bias.then(|| Tensor::from_vec((0..n).map(|j| j as f32 * 0.1 - 1.0).collect::<Vec<_>>(), n, &Device::Cpu).unwrap());
        let x = Tensor::from_vec(input(m, k, seed ^ 7), (m, k), &Device::Cpu).unwrap();
        let w = Weight::Quantized(q.clone());
        let want = ReferenceRuntime::cpu()
            .prepare_linear_quantized_input("fc", &w, b.as_ref(), &act).unwrap()
            .forward(&x).unwrap().to_vec2::<f32>().unwrap();
        // The bound on float rounding: Σ|x̂·ŵ| times a few ulps.
        let xq = act.fake_quantize(&x).unwrap().to_vec2::<f32>().unwrap();
        let wd = q.dequantize_f32();
        let mut first: Option<Vec<Vec<f32>>> = None;
        for level in SimdLevel::available() {
            for threads in [1, 3] {
                let rt = CpuRuntime::with_level(threads, level).unwrap();
                let got = rt.prepare_linear_quantized_input("fc", &w, b.as_ref(), &act).unwrap()
                    .forward(&x).unwrap().to_vec2::<f32>().unwrap();
                for r in 0..m {
                    for j in 0..n {
                        let mag: f32 = (0..k).map(|t| (xq[r][t] * wd[j * k + t]).abs()).sum();
                        let tol = 4e-6 * mag + 1e-6;
                        prop_assert!((got[r][j] - want[r][j]).abs() <= tol,
                            "{level:?}/{threads}: [{r},{j}] {} vs {} (tol {tol})", got[r][j], want[r][j]);
                    }
                }
                match &first {
                    None => first = Some(got),
                    Some(f) => prop_assert_eq!(f, &got, "bits differ across levels or threads"),
                }
            }
        }
    }
}

#[test]
fn every_level_agrees_with_the_scalar_twin_on_long_rows() {
    // MiniLM's FFN width plus an odd tail, odd column and row counts.
    let (m, n, k) = (13, 37, 1536 + 13);
    let w: Vec<i8> = (0..n * k).map(|i| (i as i32 * 31 % 256 - 128) as i8).collect();
    let x: Vec<i8> = (0..m * k).map(|i| (i as i32 * 17 % 256 - 128) as i8).collect();
    let mut a = vec![0; m * n];
    gemm(SimdLevel::Scalar, &x, m, k, &w, &Panel::pack(SimdLevel::Scalar, &w, n, k), &mut a);
    assert_eq!(a[0], (0..k).map(|t| i32::from(x[t]) * i32::from(w[t])).sum::<i32>());
    assert!(x.contains(&i8::MIN) && w.contains(&i8::MIN), "the extreme code −128 on both sides");
    for level in SimdLevel::available() {
        let mut b = vec![0; m * n];
        gemm(level, &x, m, k, &w, &Panel::pack(level, &w, n, k), &mut b);
        assert_eq!(a, b, "{level:?}");
    }
    // The same weights narrowed to −64..=63 (AVX2's quads kernel: several slices of the
    // reduction with partial sums between them, a last block of five columns, a last tile of
    // five rows split into halves of four and one).
    let narrow: Vec<i8> = w.iter().map(|&v| v >> 1).collect();
    assert!(narrow.contains(&-64) && narrow.contains(&63));
    let mut a = vec![0; m * n];
    gemm(SimdLevel::Scalar, &x, m, k, &narrow, &Panel::pack(SimdLevel::Scalar, &narrow, n, k), &mut a);
    for level in SimdLevel::available() {
        let mut b = vec![0; m * n];
        gemm(level, &x, m, k, &narrow, &Panel::pack(level, &narrow, n, k), &mut b);
        assert_eq!(a, b, "narrow weights, {level:?}");
    }
}

/// A batch with enough row chunks for every task (one thread) and one whose chunks are split
/// by columns with the rows quantized beforehand (three threads): the same bits, close to the
/// reference, at every level.
#[test]
fn row_chunked_and_column_split_batches_give_the_same_bits() {
    let (m, n, k) = (200, 37, 99);
    let q = int8_weight(n, k, 5);
    let w = Weight::Quantized(q);
    let x = Tensor::from_vec(input(m, k, 11), (m, k), &Device::Cpu).unwrap();
    let act = ActQuant::new(8, false, ActRange::Dynamic { per_token: true });
    let want = ReferenceRuntime::cpu()
        .prepare_linear_quantized_input("fc", &w, None, &act)
        .unwrap()
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut first: Option<Vec<f32>> = None;
    for level in SimdLevel::available() {
        for threads in [1, 3] {
            let rt = CpuRuntime::with_level(threads, level).unwrap();
            let op = rt.prepare_linear_quantized_input("fc", &w, None, &act).unwrap();
            let got = op.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-4 * (1.0 + w.abs())), "{level:?}/{threads}");
            match &first {
                None => first = Some(got),
                Some(f) => assert_eq!(f, &got, "{level:?}/{threads}"),
            }
        }
    }
}

/// The quads layout is packed exactly where the CPU runs it — VNNI for any codes, AVX2 for
/// codes in −64..=63 — so the suites above test it there.
#[test]
fn the_quads_panel_is_packed_where_the_cpu_runs_it() {
    let vnni = SimdLevel::detect() == SimdLevel::Avx512Vnni;
    let avx2 = SimdLevel::Avx2.avx2();
    let quads = |level, w: &[i8]| matches!(Panel::pack(level, w, 2, 4).data, PanelData::Quads { .. });
    let (wide, narrow) = ([1, -65, 3, 4, 5, 6, 7, 8], [1, -64, 3, 4, 5, 6, 7, 63]);
    assert_eq!(quads(SimdLevel::Avx512Vnni, &wide), vnni);
    assert_eq!(quads(SimdLevel::Avx512Vnni, &narrow), vnni || avx2);
    assert_eq!(quads(SimdLevel::Avx2, &narrow), avx2);
    assert!(!quads(SimdLevel::Avx2, &wide) && !quads(SimdLevel::Scalar, &narrow));
    assert!(!quads(SimdLevel::Avx2, &[1, 64, 3, 4, 5, 6, 7, 8]));
    assert_eq!(SimdLevel::available().contains(&SimdLevel::Avx512Vnni), vnni);
}

#[test]
fn shapes_that_do_not_match_are_errors() {
    let rt: Arc<dyn Runtime> = Arc::new(CpuRuntime::new(1).unwrap());
    let w = Weight::Quantized(int8_weight(4, 8, 1));
    let act = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    let op = rt.prepare_linear_quantized_input("fc", &w, None, &act).unwrap();
    let e = op.forward(&Tensor::zeros((2, 9), DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("input of `fc`") && e.contains("[8]") && e.contains("[9]"), "{e}");
    let bad_bias = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
    let e = rt.prepare_linear_quantized_input("fc", &w, Some(&bad_bias), &act).unwrap_err().to_string();
    assert!(e.contains("fc.bias"), "{e}");
    let nan = Tensor::new(&[[f32::NAN; 8]], &Device::Cpu).unwrap();
    assert!(op.forward(&nan).is_err());
    assert!(CpuRuntime::new(0).unwrap_err().to_string().contains("found 0"));
}

/// The integer GEMM at every SIMD level against the scalar twin: the same sums exactly.
fn every_level_equals_the_scalar_twin(
    x: &[i8],
    w: &[i8],
    (m, n, k): (usize, usize, usize),
) -> std::result::Result<(), TestCaseError> {
    let mut want = vec![0; m * n];
    gemm(SimdLevel::Scalar, x, m, k, w, &Panel::pack(SimdLevel::Scalar, w, n, k), &mut want);
    for level in SimdLevel::available() {
        let mut got = vec![0; m * n];
        gemm(level, x, m, k, w, &Panel::pack(level, w, n, k), &mut got);
        prop_assert_eq!(&got, &want, "{:?}", level);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn the_packed_gemm_equals_the_scalar_twin(m in 1usize..11, n in 1usize..40, k in 1usize..45, seed in any::<u64>()) {
        let w: Vec<i8> = (0..n * k).map(|i| ((i as u64).wrapping_mul(2654435761).wrapping_add(seed) >> 9) as i8).collect();
        let x: Vec<i8> = (0..m * k).map(|i| ((i as u64).wrapping_mul(40503).wrapping_add(seed) % 256) as i16 - 128).map(|v| v as i8).collect();
        every_level_equals_the_scalar_twin(&x, &w, (m, n, k))?;
        // The same weights narrowed to −64..=63: AVX2's quads kernel.
        let narrow: Vec<i8> = w.iter().map(|&v| v >> 1).collect();
        every_level_equals_the_scalar_twin(&x, &narrow, (m, n, k))?;
    }
}

#[test]
fn quantization_of_far_out_of_range_values_matches_the_scalar_path() {
    let act = ActQuant::new(8, false, ActRange::Static { scale: 1e-3, zero_point: 7 });
    let x: Vec<f32> = vec![3e9, -3e9, 1e7, -1e7, 0.0, 0.0015, -0.0025, 0.1275, 1.0, -1.0, 2.5e-3];
    let (want, _) = act.quantize_slice(&x, x.len());
    for level in SimdLevel::available() {
        let mut got = vec![0i16; x.len()];
        quantize_row(level, &x, None, (1e-3, 7), &act, &mut got, false);
        // Unsigned codes are stored shifted by −128.
        assert_eq!(got.iter().map(|&v| i32::from(v) + 128).collect::<Vec<_>>(), want, "{level:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Rows quantized by their own range divide by a reciprocal with Markstein's correction on
    /// the SIMD levels: the codes equal the reference's IEEE division, also for values a few
    /// ulps from a rounding tie (x = S·(c + ½)) and over many binades of scale.
    #[test]
    fn per_row_codes_equal_ieee_division_near_ties(
        len in 1usize..70, exp in -60i32..60, seed in any::<u64>(), symmetric in any::<bool>()
    ) {
        let act = ActQuant::new(8, symmetric, ActRange::Dynamic { per_token: true });
        let mag = 2f32.powi(exp);
        let mut x: Vec<f32> = input(1, len, seed).iter().map(|v| v * mag).collect();
        let (lo, hi) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        let (s, z) = act.scale_zero(lo, hi);
        // Put every other value next to a tie of the grid, keeping the row's range.
        for (i, v) in x.iter_mut().enumerate().skip(1).step_by(2) {
            let c = (*v / s).floor() + 0.5;
            let near = f32::from_bits((s * c).to_bits().wrapping_add((i as u32 % 5).wrapping_sub(2)));
            if near > lo && near < hi && *v > lo && *v < hi {
                *v = near;
            }
        }
        let (want, units) = act.quantize_slice(&x, len);
        prop_assert_eq!(units[0], (s, z));
        for level in SimdLevel::available() {
            let mut got = vec![0i16; len];
            quantize_row(level, &x, None, (s, z), &act, &mut got, true);
            let got: Vec<i32> = got.iter().map(|&v| i32::from(v) + code_offset(&act)).collect();
            prop_assert_eq!(&got, &want, "{:?}", level);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Codes at the extremes (−128, ±127, 0) on both sides, and weights at the extremes of
    /// the quads kernel's range (−64, 63) against them: the pair sums that come nearest to
    /// saturating `vpmaddubsw`'s i16 lanes (255·(−64)·2 = −32640).
    #[test]
    fn extreme_codes_stay_exact(m in 1usize..9, n in 1usize..20, k in 1usize..40, seed in any::<u64>()) {
        let pick = |i: usize, s: u64| [-128i8, -127, 127, 0, -128, 5][((i as u64).wrapping_mul(2654435761) ^ s) as usize % 6];
        let w: Vec<i8> = (0..n * k).map(|i| pick(i, seed)).collect();
        let x: Vec<i8> = (0..m * k).map(|i| pick(i, seed >> 7)).collect();
        every_level_equals_the_scalar_twin(&x, &w, (m, n, k))?;
        let narrow = |i: usize, s: u64| [-64i8, 63, -64, 0, 63, -3][((i as u64).wrapping_mul(2654435761) ^ s) as usize % 6];
        let w: Vec<i8> = (0..n * k).map(|i| narrow(i, seed)).collect();
        every_level_equals_the_scalar_twin(&x, &w, (m, n, k))?;
        every_level_equals_the_scalar_twin(&vec![127; m * k], &vec![-64; n * k], (m, n, k))?;
        every_level_equals_the_scalar_twin(&vec![127; m * k], &vec![63; n * k], (m, n, k))?;
    }
}

/// Per-token ranges screen every value for NaN and infinities on their own pass (no separate
/// check): one bad value anywhere — SIMD body or tail, any row — is the same typed error as
/// the separate check gives, at every level, plain or with a fused activation.
#[test]
fn non_finite_inputs_are_named_at_every_level_and_row_count() {
    let k = 13;
    let w = Weight::Quantized(int8_weight(5, k, 3));
    let act = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    for level in SimdLevel::available() {
        let rt = CpuRuntime::with_level(2, level).unwrap();
        let op = rt.prepare_linear_quantized_input("fc", &w, None, &act).unwrap();
        for m in [1usize, 2, 7, 40] {
            for (bad, col) in [(f32::NAN, 0), (f32::INFINITY, 12), (f32::NEG_INFINITY, 5), (f32::NAN, 9)] {
                for row in [0, m - 1] {
                    let at = row * k + col;
                    let mut v = vec![0.5f32; m * k];
                    v[at] = bad;
                    let x = Tensor::from_vec(v, (m, k), &Device::Cpu).unwrap();
                    for e in
                        [op.forward(&x).unwrap_err(), op.forward_activated(&x, Activation::Gelu).unwrap().unwrap_err()]
                    {
                        assert!(
                            matches!(e, pare_core_tensor::Error::NonFinite { count: 1, first, .. } if first == at),
                            "{level:?}, {m} rows, {bad} at {at}: {e}"
                        );
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Ops sharing an input quantization run on one quantized copy of it
    /// (`PreparedOp::forward_shared`, as an attention block's query, key and value do): the
    /// same bits as each op's own forward, at every level and thread count, with row-chunked
    /// and column-split batches, for 8-bit weights (AVX2's pairs layout) and 7-bit ones (its
    /// quads layout); an op quantizing differently, or whose weights take the other layout,
    /// makes the group decline.
    #[test]
    fn shared_input_ops_give_each_ops_own_bits(
        m in prop_oneof![1usize..9, 40usize..120], ns in proptest::collection::vec(1usize..40, 1..4), k in 1usize..70,
        seed in any::<u64>(), spec in 0usize..5, bias in any::<bool>(), bits in prop_oneof![Just(8u8), Just(7)]
    ) {
        let act = specs()[spec].clone();
        let x = Tensor::from_vec(input(m, k, seed ^ 7), (m, k), &Device::Cpu).unwrap();
        for level in SimdLevel::available() {
            for threads in [1, 3] {
                let rt = CpuRuntime::with_level(threads, level).unwrap();
                let ops: Vec<_> = ns.iter().enumerate().map(|(i, &n)| {
                    let b = bias.then(|| Tensor::from_vec((0..n).map(|j| j as f32 * 0.1 - i as f32).collect::<Vec<_>>(), n, &Device::Cpu).unwrap());
                    let w = Weight::Quantized(int_weight(bits, n, k, seed.wrapping_add(i as u64)));
                    rt.prepare_linear_quantized_input("fc", &w, b.as_ref(), &act).unwrap()
                }).collect();
                let others: Vec<&dyn PreparedOp> = ops[1..].iter().map(|o| o.as_ref()).collect();
                let shared = ops[0].forward_shared(&others, &x).expect("W8A8 ops share").unwrap();
                prop_assert_eq!(shared.len(), ops.len());
                for (o, y) in ops.iter().zip(&shared) {
                    let own = o.forward(&x).unwrap();
                    prop_assert_eq!(y.dims(), own.dims());
                    prop_assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), own.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{:?}/{}", level, threads);
                }
                let other = specs()[(spec + 1) % 5].clone();
                let odd = rt.prepare_linear_quantized_input("fc", &Weight::Quantized(int_weight(bits, 3, k, seed)), None, &other).unwrap();
                prop_assert!(ops[0].forward_shared(&[odd.as_ref()], &x).is_none(), "another quantization declines");
                if level.avx2() && !level.avx512() {
                    let narrow = int_weight(15 - bits, 3, k, seed);
                    let odd = rt.prepare_linear_quantized_input("fc", &Weight::Quantized(narrow), None, &act).unwrap();
                    prop_assert!(ops[0].forward_shared(&[odd.as_ref()], &x).is_none(), "another layout declines");
                }
            }
        }
    }
}

#[test]
fn a_non_finite_input_of_a_shared_group_is_an_error() {
    let rt = CpuRuntime::new(2).unwrap();
    let act = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    let ops: Vec<_> = (0..3)
        .map(|i| {
            rt.prepare_linear_quantized_input("fc", &Weight::Quantized(int8_weight(8, 16, i)), None, &act).unwrap()
        })
        .collect();
    let mut v = input(4, 16, 1);
    v[21] = f32::NAN;
    let x = Tensor::from_vec(v, (4, 16), &Device::Cpu).unwrap();
    let err = ops[0].forward_shared(&[ops[1].as_ref(), ops[2].as_ref()], &x).unwrap().unwrap_err().to_string();
    assert!(err.contains("not finite") || err.contains("NaN"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    /// A feed-forward pair run as one chain (`PreparedOp::forward_chain`: each row chunk
    /// through both ops, the intermediate never written out) gives the bits of the two ops
    /// run one after the other, at every level and thread count, whatever the first op's
    /// input quantization and the activation; with too few rows to keep the threads busy it
    /// declines and the caller runs the ops.
    #[test]
    fn a_chained_pair_gives_the_two_ops_bits(
        m in prop_oneof![1usize..9, 150usize..300, 540usize..620], k in 1usize..50, n1 in 1usize..70, n2 in 1usize..30,
        seed in any::<u64>(), spec in 0usize..6, next_spec in 0usize..3, act in 0usize..4, bias in any::<bool>()
    ) {
        let mut first = specs()[spec].clone();
        if first.smooth.is_some() {
            first.smooth = Some((0..k).map(|i| 0.5 + (i % 5) as f32 * 0.3).collect());
        }
        let mut second = [specs()[0].clone(), specs()[2].clone(), specs()[5].clone()][next_spec].clone();
        if second.smooth.is_some() {
            second.smooth = Some((0..n1).map(|i| 0.4 + (i % 7) as f32 * 0.2).collect());
        }
        let act = [Activation::Gelu, Activation::Relu, Activation::GeluTanh, Activation::Silu][act];
        let x = Tensor::from_vec(input(m, k, seed ^ 7), (m, k), &Device::Cpu).unwrap();
        let bias_of = |n: usize, at: f32| bias.then(|| Tensor::from_vec((0..n).map(|j| j as f32 * 0.05 - at).collect::<Vec<_>>(), n, &Device::Cpu).unwrap());
        for level in SimdLevel::available() {
            for threads in [1, 3] {
                let rt = CpuRuntime::with_level(threads, level).unwrap();
                let up = rt.prepare_linear_quantized_input("up", &Weight::Quantized(int8_weight(n1, k, seed)), bias_of(n1, 0.5).as_ref(), &first).unwrap();
                let down = rt.prepare_linear_quantized_input("down", &Weight::Quantized(int8_weight(n2, n1, seed ^ 1)), bias_of(n2, 1.0).as_ref(), &second).unwrap();
                let h = up.forward_activated(&x, act).expect("W8A8 fuses these activations").unwrap();
                let want = down.forward(&h).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                match up.forward_chain(act, down.as_ref(), &x) {
                    Some(y) => {
                        let y = y.unwrap();
                        prop_assert_eq!(y.dims(), &[m, n2][..]);
                        prop_assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "{:?}/{}", level, threads);
                    }
                    None => prop_assert!(m < 540, "{m} rows on {threads} threads should chain"),
                }
            }
        }
    }
}

#[test]
fn a_chain_declines_what_it_cannot_run_and_names_a_bad_input() {
    let rt = CpuRuntime::new(2).unwrap();
    let per_token = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    let per_tensor = ActQuant::new(8, true, ActRange::Dynamic { per_token: false });
    let prep = |n: usize, k: usize, act: &ActQuant| {
        rt.prepare_linear_quantized_input("fc", &Weight::Quantized(int8_weight(n, k, 5)), None, act).unwrap()
    };
    let (m, k) = (600, 16);
    let x = Tensor::from_vec(input(m, k, 2), (m, k), &Device::Cpu).unwrap();
    let up = prep(24, k, &per_token);
    // A next op that needs the whole intermediate's range, or takes another width, declines.
    assert!(up.forward_chain(Activation::Gelu, prep(8, 24, &per_tensor).as_ref(), &x).is_none());
    assert!(up.forward_chain(Activation::Gelu, prep(8, 23, &per_token).as_ref(), &x).is_none());
    // So does an activation the kernels do not fuse.
    assert!(up.forward_chain(Activation::Tanh, prep(8, 24, &per_token).as_ref(), &x).is_none());
    let down = prep(8, 24, &per_token);
    assert!(up.forward_chain(Activation::Gelu, down.as_ref(), &x).is_some());
    // A bad input is the first op's error, as unchained.
    let mut v = input(m, k, 2);
    v[300 * k + 3] = f32::NAN;
    let bad = Tensor::from_vec(v, (m, k), &Device::Cpu).unwrap();
    let e = up.forward_chain(Activation::Gelu, down.as_ref(), &bad).unwrap().unwrap_err();
    assert!(matches!(e, pare_core_tensor::Error::NonFinite { count: 1, first, .. } if first == 300 * k + 3), "{e}");
    // An intermediate that overflows (inputs near 1e38: their scale times the integer
    // sums is infinite) makes the chain decline, so the caller's unchained run names it as
    // the second op's input.
    let vast = Tensor::from_vec(
        (0..m * 256).map(|i| if i % 2 == 0 { 1.6e38f32 } else { 1e38 }).collect::<Vec<_>>(),
        (m, 256),
        &Device::Cpu,
    )
    .unwrap();
    let up = prep(24, 256, &per_token);
    let h = up.forward_activated(&vast, Activation::Relu).unwrap().unwrap();
    let h_values = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(h_values.iter().any(|v| !v.is_finite()), "the intermediate overflows");
    assert!(up.forward_chain(Activation::Relu, down.as_ref(), &vast).is_none());
    let e = down.forward(&h).unwrap_err();
    assert!(matches!(e, pare_core_tensor::Error::NonFinite { .. }), "{e}");
}
