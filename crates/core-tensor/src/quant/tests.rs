//! Property tests of packing and of the dequantization semantics.

use candle_core::{DType, Device};
use proptest::prelude::*;

use super::*;

fn scheme(bits: u8, signed: bool, symmetric: bool, granularity: Granularity) -> QuantScheme {
    QuantScheme { bits, signed, symmetric, mapping: Mapping::Linear, granularity }
}

proptest! {
    #[test]
    fn packing_round_trips_for_every_bit_width(bits in 1u8..=8, seed in proptest::collection::vec(any::<u8>(), 0..300)) {
        let codes: Vec<u8> = seed.iter().map(|c| (u16::from(*c) % (1u16 << bits)) as u8).collect();
        let packed = pack_codes(&codes, bits).unwrap();
        prop_assert_eq!(packed.len(), (codes.len() * bits as usize).div_ceil(8));
        prop_assert_eq!(unpack_codes(&packed, bits, codes.len()).unwrap(), codes);
    }

    #[test]
    fn dequantize_follows_the_affine_formula(
        bits in 2u8..=8, signed: bool, rows in 1usize..6, groups in 1usize..4, gsize in 1usize..9, raw in proptest::collection::vec(any::<u8>(), 200),
    ) {
        let cols = groups * gsize;
        let n = rows * cols;
        let codes: Vec<u8> = (0..n).map(|i| (u16::from(raw[i % raw.len()]) % (1u16 << bits)) as u8).collect();
        let s = scheme(bits, signed, false, Granularity::PerGroup { size: gsize });
        let scales: Vec<f32> = (0..rows * groups).map(|i| 0.01 + i as f32 * 0.5).collect();
        let zeros: Vec<i32> = (0..rows * groups).map(|i| s.q_min() + (i as i32 % (s.q_max() - s.q_min() + 1))).collect();
        let q = QuantizedTensor::from_codes(&codes, s, scales.clone(), Some(zeros.clone()), None, vec![rows, cols], DType::F32).unwrap();
        let deq = q.dequantize_f32();
        for i in 0..n {
            let g = (i / cols) * groups + (i % cols) / gsize;
            let expect = scales[g] * ((i32::from(codes[i]) + s.q_min() - zeros[g]) as f32);
            prop_assert_eq!(deq[i], expect);
        }
        let t = q.dequantize(&Device::Cpu).unwrap();
        prop_assert_eq!(t.dims(), &[rows, cols]);
    }
}

#[test]
fn zero_point_makes_zero_exact() {
    // An asymmetric uint8 tensor whose zero point is a code: that code must decode to exactly 0.
    let s = scheme(8, false, false, Granularity::PerTensor);
    let q =
        QuantizedTensor::from_codes(&[0, 37, 255], s, vec![0.013], Some(vec![37]), None, vec![3], DType::F32).unwrap();
    assert_eq!(q.dequantize_f32()[1], 0.0);
}

#[test]
fn per_channel_axis_selects_the_right_scale() {
    let s = scheme(8, true, true, Granularity::PerChannel { axis: 1 });
    // shape [2, 3]: column j uses scale j.
    let codes = [129u8; 6]; // q = 1
    let q = QuantizedTensor::from_codes(&codes, s, vec![1.0, 2.0, 3.0], None, None, vec![2, 3], DType::F32).unwrap();
    assert_eq!(q.dequantize_f32(), [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
}

#[test]
fn codebook_mapping_looks_codes_up() {
    let s = QuantScheme {
        bits: 2,
        signed: false,
        symmetric: true,
        mapping: Mapping::Codebook,
        granularity: Granularity::PerToken,
    };
    let cb = vec![-1.0, -0.25, 0.5, 1.0];
    let q =
        QuantizedTensor::from_codes(&[0, 1, 2, 3], s, vec![2.0, 4.0], None, Some(cb), vec![2, 2], DType::F32).unwrap();
    assert_eq!(q.dequantize_f32(), [-2.0, -0.5, 2.0, 4.0]);
}

#[test]
fn invalid_tensors_are_refused_with_the_reason() {
    let s = scheme(4, true, true, Granularity::PerGroup { size: 3 });
    let e = QuantizedTensor::from_codes(&[0; 8], s, vec![1.0; 2], None, None, vec![2, 4], DType::F32).unwrap_err();
    assert!(e.to_string().contains("group size 3 does not divide the row length 4"), "{e}");

    let s = scheme(0, true, true, Granularity::PerTensor);
    assert!(
        QuantizedTensor::from_codes(&[], s, vec![1.0], None, None, vec![0], DType::F32)
            .unwrap_err()
            .to_string()
            .contains("bits must be 1..=8")
    );

    let s = scheme(4, false, false, Granularity::PerTensor);
    let e = QuantizedTensor::from_codes(&[1, 2], s, vec![1.0], None, None, vec![2], DType::F32).unwrap_err();
    assert!(e.to_string().contains("needs zero points"), "{e}");
    let e = QuantizedTensor::from_codes(&[1, 2], s, vec![1.0], Some(vec![16]), None, vec![2], DType::F32).unwrap_err();
    assert!(e.to_string().contains("outside the code range 0..=15"), "{e}");
    let e =
        QuantizedTensor::from_codes(&[1, 2], s, vec![f32::NAN], Some(vec![0]), None, vec![2], DType::F32).unwrap_err();
    assert!(e.to_string().contains("must be finite"), "{e}");
    assert!(pack_codes(&[16], 4).unwrap_err().to_string().contains("does not fit in 4 bits"));
    let e = QuantizedTensor::new(vec![0; 3], s, vec![1.0], Some(vec![0]), None, vec![4], DType::F32).unwrap_err();
    assert!(e.to_string().contains("expected 2 packed code bytes, found 3"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Q8_0/Q4_0-shaped codes with f16-representable scales go to GGML blocks and back to the
    /// same codes and scales, and candle reads the blocks as the same values (GGUF export and
    /// import are exact).
    #[test]
    fn ggml_blocks_round_trip_exactly(rows in 1usize..6, blocks in 1usize..4, four in any::<bool>(), seed in any::<u64>()) {
        let cols = 32 * blocks;
        let q = crate::testing::random_quantized(&[rows, cols], if four { 4 } else { 8 }, 0, 3, seed);
        // Scales rounded to f16 values, as a Q8_0/Q4_0 scheme stores them.
        let scales: Vec<f32> = q.scales().iter().map(|s| half::f16::from_f32(*s).to_f32()).collect();
        let q = QuantizedTensor::from_codes(&q.codes(), *q.scheme(), scales, None, None, vec![rows, cols], DType::F32).unwrap();
        let (ty, data) = q.ggml_blocks().expect("signed symmetric groups of 32");
        let back = QuantizedTensor::from_ggml_blocks("w", ty, &data, &[rows, cols], DType::F32).unwrap();
        prop_assert_eq!(back.codes(), q.codes());
        prop_assert_eq!(back.scales(), q.scales());
        let storage = candle_core::quantized::QStorage::from_data(std::borrow::Cow::Borrowed(&data), &Device::Cpu, ty).unwrap();
        let theirs = candle_core::quantized::QTensor::new(storage, (rows, cols)).unwrap().dequantize(&Device::Cpu).unwrap();
        prop_assert_eq!(theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap(), q.dequantize_f32());
    }
}

#[test]
fn ggml_blocks_refuse_what_they_cannot_hold() {
    // Unsigned, per-channel: no GGML block type.
    let q = crate::testing::random_quantized(&[4, 64], 8, 1, 1, 3);
    assert!(q.ggml_blocks().is_none());
    let e = QuantizedTensor::from_ggml_blocks(
        "w",
        candle_core::quantized::GgmlDType::Q8_0,
        &[0u8; 33],
        &[1, 32],
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`w`") && e.contains("expected 34 bytes of blocks, found 33"), "{e}");
    let e = QuantizedTensor::from_ggml_blocks(
        "w",
        candle_core::quantized::GgmlDType::Q4_0,
        &[0u8; 18],
        &[1, 30],
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("blocks of 32"), "{e}");
}
