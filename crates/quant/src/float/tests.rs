//! FP8 against the OCP OFP8 tables; half narrowing saturates.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;

use super::*;

#[test]
fn fp8_values_match_the_ocp_tables() {
    let e4 = Fp8::E4M3;
    assert_eq!(e4.decode(0x38), 1.0);
    assert_eq!(e4.decode(0x7E), 448.0); // max normal S.1111.110
    assert_eq!(e4.decode(0x08), 2f32.powi(-6)); // min normal
    assert_eq!(e4.decode(0x07), 0.875 * 2f32.powi(-6)); // max subnormal
    assert_eq!(e4.decode(0x01), 2f32.powi(-9)); // min subnormal
    assert_eq!(e4.decode(0xB8), -1.0);
    assert!(e4.decode(0x7F).is_nan() && e4.decode(0xFF).is_nan());
    assert_eq!(e4.decode(0x78), 256.0); // E4M3 uses exponent 15 for normal values
    let e5 = Fp8::E5M2;
    assert_eq!(e5.decode(0x3C), 1.0);
    assert_eq!(e5.decode(0x7B), 57344.0);
    assert_eq!(e5.decode(0x04), 2f32.powi(-14));
    assert_eq!(e5.decode(0x03), 0.75 * 2f32.powi(-14));
    assert_eq!(e5.decode(0x01), 2f32.powi(-16));
    assert_eq!(e5.decode(0x7C), f32::INFINITY);
    assert_eq!(e5.decode(0xFC), f32::NEG_INFINITY);
    assert!(e5.decode(0x7D).is_nan());
    // 127 finite non-negative E4M3 codes (0x00..=0x7E), 124 for E5M2 (0x00..=0x7B).
    assert_eq!(e4.positive_codes().len(), 127);
    assert_eq!(e5.positive_codes().len(), 124);
}

#[test]
fn fp8_encoding_rounds_half_to_even_and_saturates() {
    for f in [Fp8::E4M3, Fp8::E5M2] {
        for c in 0u8..=255 {
            let v = f.decode(c);
            if v.is_finite() && !(v == 0.0 && c == 0x80) {
                assert_eq!(f.encode(v), c, "{f:?} code {c:#04x} = {v}");
            }
        }
        assert_eq!(f.decode(f.encode(1e9)), f.max());
        assert_eq!(f.decode(f.encode(-1e9)), -f.max());
    }
    // 1.0625 is halfway between E4M3 1.0 (0x38, even) and 1.125 (0x39): ties to even.
    assert_eq!(Fp8::E4M3.encode(1.0625), 0x38);
    // 1.1875 is halfway between 1.125 (0x39) and 1.25 (0x3A, even).
    assert_eq!(Fp8::E4M3.encode(1.1875), 0x3A);
    // 464 is halfway between 448 and the (absent) 480: saturates to 448.
    assert_eq!(Fp8::E4M3.decode(Fp8::E4M3.encode(464.0)), 448.0);
}

proptest! {
    #[test]
    fn fp8_picks_the_nearest_value(x in -60000f32..60000f32) {
        for f in [Fp8::E4M3, Fp8::E5M2] {
            let y = f.decode(f.encode(x));
            let best = (0u8..=255).map(|c| f.decode(c)).filter(|v| v.is_finite()).map(|v| (v - x.clamp(-f.max(), f.max())).abs()).fold(f32::INFINITY, f32::min);
            prop_assert_eq!((y - x.clamp(-f.max(), f.max())).abs(), best);
        }
    }
}

#[test]
fn scaled_fp8_tensors_dequantize_close_and_half_saturates() {
    let dev = Device::Cpu;
    let t = Tensor::new(&[[0.001f32, -2.0, 3.5, 1000.0], [0.5, 0.25, -0.125, 0.0]], &dev).unwrap();
    let q = to_fp8("w", &t, Fp8::E4M3, Some(Granularity::PerChannel { axis: 0 })).unwrap();
    assert_eq!(q.scales(), [1000.0 / 448.0, 0.5 / 448.0]);
    let back = q.dequantize_f32();
    for (x, y) in t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().zip(back) {
        assert!((x - y).abs() <= x.abs() / 16.0 + 1e-2, "{x} vs {y}"); // 3 mantissa bits: ≤ 2^-4 relative
    }
    let big = Tensor::new(&[1e6f32, -1e6, 1.0], &dev).unwrap();
    let h = to_half("w", &big, Half::F16).unwrap();
    assert_eq!(h.dtype(), DType::F16);
    assert_eq!(h.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), [65504.0, -65504.0, 1.0]);
    let b = to_half("w", &Tensor::new(&[f32::MAX, 1.0 + 1.0 / 256.0], &dev).unwrap(), Half::BF16).unwrap();
    let b = b.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
    assert!(b[0].is_finite() && b[1] == 1.0, "{b:?}"); // 1 + 2^-8 ties to even → 1.0
}
