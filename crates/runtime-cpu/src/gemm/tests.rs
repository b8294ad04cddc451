use candle_core::{DType, Device, Tensor};
use pare_core_tensor::Weight;
use proptest::prelude::*;

use super::*;
use crate::testkit::{check_linear, input};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    /// Shapes straddle every blocking edge: MR-row strips and the fused limit (6), MC-row
    /// tiles (96), NR-column panels (16) and KC-deep blocks (256), with tails of each.
    #[test]
    fn f32_weights_match_the_reference_at_every_level_and_thread_count(
        m in prop_oneof![1usize..14, 90usize..110], n in 1usize..40, k in prop_oneof![1usize..40, 250usize..530],
        bias in any::<bool>(), seed in any::<u64>()
    ) {
        let w = input(n, k, seed ^ 11);
        let t = Weight::Dense(Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap());
        let mag: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        check_linear(&t, &w, &mag, (m, n, k), bias, seed)?;
    }

    #[test]
    fn f16_and_bf16_weights_widen_exactly_and_accumulate_in_f32(
        m in prop_oneof![1usize..12, 190usize..200, 760usize..800], n in 1usize..35, k in 1usize..300, bf in any::<bool>(),
        seed in any::<u64>()
    ) {
        let dtype = if bf { DType::BF16 } else { DType::F16 };
        let half = Tensor::from_vec(input(n, k, seed), (n, k), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let w = half.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mag: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        check_linear(&Weight::Dense(half), &w, &mag, (m, n, k), true, seed)?;
    }
}

#[test]
fn the_micro_kernel_equals_its_scalar_twin_bit_for_bit() {
    let kc = 37;
    let a = input(kc, MR, 1);
    let b = input(kc, NR, 2);
    let mut want = [[0f32; NR]; MR];
    micro(SimdLevel::Scalar, &a, &b, kc, &mut want);
    let direct: f32 = (0..kc).fold(0.0, |s, p| a[p * MR + 2].mul_add(b[p * NR + 5], s));
    assert_eq!(want[2][5], direct);
    for level in SimdLevel::available() {
        let mut got = [[0f32; NR]; MR];
        micro(level, &a, &b, kc, &mut got);
        assert_eq!(got, want, "{level:?}");
    }
}

#[test]
fn empty_batches_and_bad_inputs() {
    use pare_core_tensor::Runtime;
    let rt = crate::CpuRuntime::new(2).unwrap();
    let w = Weight::Dense(Tensor::ones((3, 5), DType::F32, &Device::Cpu).unwrap());
    let op = rt.prepare_linear("fc", &w, None).unwrap();
    let y = op.forward(&Tensor::zeros((0, 5), DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(y.dims(), &[0, 3]);
    let y = op.forward(&Tensor::ones((2, 4, 5), DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(y.dims(), &[2, 4, 3]);
    assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![5.0; 24]);
    let e = op.forward(&Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("input of `fc`") && e.contains("[5]") && e.contains("[4]"), "{e}");
    let e = op.forward(&Tensor::new(&[[1f32, 2.0, f32::INFINITY, 0.0, 0.0]], &Device::Cpu).unwrap()).unwrap_err();
    assert!(e.to_string().contains("input of `fc`"), "{e}");
    let b = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    let e = rt.prepare_linear("fc", &w, Some(&b)).unwrap_err().to_string();
    assert!(e.contains("fc.bias") && e.contains("[3]") && e.contains("[4]"), "{e}");
    let w3 = Weight::Dense(Tensor::ones((3, 5, 1), DType::F32, &Device::Cpu).unwrap());
    assert!(rt.prepare_linear("fc", &w3, None).unwrap_err().to_string().contains("2-D"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Packing only moves values: every level's strips equal the scalar scatter's, for row
    /// ranges that end mid-strip, column blocks that start anywhere and widths with tails of
    /// the 8-column transposes (the last column's store must not spill past the strips).
    #[test]
    fn every_level_packs_the_strips_the_scalar_path_packs(
        m in 1usize..40, k in 1usize..70, r0f in 0.0f64..1.0, k0f in 0.0f64..1.0, k1f in 0.0f64..1.0, seed in any::<u64>()
    ) {
        let x = input(m, k, seed);
        let r0 = ((m - 1) as f64 * r0f) as usize;
        let k0 = ((k - 1) as f64 * k0f) as usize;
        let k1 = k0 + 1 + ((k - k0 - 1) as f64 * k1f) as usize;
        let len = (m - r0).div_ceil(MR) * MR * (k1 - k0);
        let mut want = vec![f32::NAN; len + 8];
        pack_a(SimdLevel::Scalar, &x, k, r0, m, k0, k1, &mut want[..len]);
        let finite = pack_a(SimdLevel::Scalar, &x, k, r0, m, k0, k1, &mut want[..len]);
        prop_assert!(finite);
        for level in SimdLevel::available() {
            let mut got = vec![f32::NAN; len + 8];
            prop_assert!(pack_a(level, &x, k, r0, m, k0, k1, &mut got[..len]));
            prop_assert!(got[..len].iter().zip(&want[..len]).all(|(a, b)| a.to_bits() == b.to_bits()), "{level:?}");
            prop_assert!(got[len..].iter().all(|v| v.is_nan()), "{level:?} wrote past the strips");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// The GEMM screens its input while packing it (and the fused kernel's few rows directly)
    /// instead of a separate pass: one NaN or ±∞ anywhere, at every level and thread count,
    /// for the fused rows, row tiles, column-split tiles and K tails, with f32, f16 and 4-bit
    /// weights, is the error naming the layer, how many values and the first.
    #[test]
    fn a_value_that_is_not_finite_anywhere_is_named(
        m in prop_oneof![1usize..7, 7usize..20, 90usize..200], k in prop_oneof![1usize..20, 380usize..400],
        at in 0.0f64..1.0, which in 0usize..3, format in 0usize..3, seed in any::<u64>()
    ) {
        use pare_core_tensor::Runtime;
        let n = 19;
        let mut v = input(m, k, seed);
        let first = ((m * k - 1) as f64 * at) as usize;
        v[first] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][which];
        let x = Tensor::from_vec(v, (m, k), &Device::Cpu).unwrap();
        let dense = Tensor::from_vec(input(n, k, seed ^ 5), (n, k), &Device::Cpu).unwrap();
        let w = match format {
            0 => Weight::Dense(dense),
            1 => Weight::Dense(dense.to_dtype(DType::F16).unwrap()),
            _ => Weight::Quantized(pare_core_tensor::testing::random_quantized(&[n, k], 4, 0, 2, seed)),
        };
        for level in SimdLevel::available() {
            for threads in [1, 3] {
                let rt = crate::CpuRuntime::with_level(threads, level).unwrap();
                let op = rt.prepare_linear("fc", &w, None).unwrap();
                let e = op.forward(&x).unwrap_err().to_string();
                prop_assert!(e.contains("input of `fc`") && e.contains(&format!("{first}")), "{level:?}/{threads}: {e}");
            }
        }
    }
}
