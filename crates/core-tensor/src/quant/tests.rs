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
