//! Property tests of linear range mapping.

use candle_core::{Device, Tensor};
use pare_core_tensor::Granularity;
use proptest::prelude::*;

use super::*;

fn granularity(kind: u8, shape: &[usize]) -> Granularity {
    match kind % 4 {
        0 => Granularity::PerTensor,
        1 => Granularity::PerChannel { axis: usize::from(kind / 4) % shape.len() },
        2 => Granularity::PerGroup { size: *shape.last().unwrap() },
        _ => Granularity::PerToken,
    }
}

proptest! {
    #[test]
    fn round_trip_error_is_at_most_half_a_step(
        bits in 2u8..=8, symmetric: bool, kind in 0u8..16,
        rows in 1usize..7, cols in 1usize..13,
        vals in proptest::collection::vec(-1000f32..1000f32, 1..100),
    ) {
        let shape = [rows, cols];
        let v: Vec<f32> = (0..rows * cols).map(|i| vals[i % vals.len()] * (1.0 + i as f32 * 0.01)).collect();
        let t = Tensor::from_vec(v.clone(), (rows, cols), &Device::Cpu).unwrap();
        let spec = LinearSpec { bits, symmetric, granularity: granularity(kind, &shape) };
        let q = quantize_linear("w", &t, spec).unwrap();
        let back = q.dequantize_f32();
        for (i, (x, y)) in v.iter().zip(&back).enumerate() {
            let s = q.scales()[q.scale_index(i)];
            prop_assert!((x - y).abs() <= s / 2.0 * (1.0 + 1e-5) + 1e-6 * x.abs(), "x {x} -> {y}, S {s}");
        }
        // Zero is exactly representable: a zero input decodes to exactly zero.
        let mut z = v.clone();
        z[0] = 0.0;
        let q = quantize_linear("w", &Tensor::from_vec(z, (rows, cols), &Device::Cpu).unwrap(), spec).unwrap();
        prop_assert_eq!(q.dequantize_f32()[0], 0.0);
    }

    #[test]
    fn group_sizes_32_64_128_along_the_reduction_axis(g in prop_oneof![Just(32usize), Just(64), Just(128)], groups in 1usize..4, rows in 1usize..4, seed in any::<u32>()) {
        let cols = g * groups;
        let v: Vec<f32> = (0..rows * cols).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0).collect();
        let t = Tensor::from_vec(v.clone(), (rows, cols), &Device::Cpu).unwrap();
        let q = quantize_linear("w", &t, LinearSpec { bits: 4, symmetric: true, granularity: Granularity::PerGroup { size: g } }).unwrap();
        prop_assert_eq!(q.scales().len(), rows * groups);
        for (i, (x, y)) in v.iter().zip(q.dequantize_f32()).enumerate() {
            prop_assert!((x - y).abs() <= q.scales()[i / g] / 2.0 * (1.0 + 1e-5));
        }
    }
}

#[test]
fn the_formula_holds_exactly() {
    // r in [-1, 3] at 8 bits asymmetric: S = 4/255, Z = round(0 + 1/S) = round(63.75) = 64.
    let t = Tensor::new(&[-1f32, 0.0, 3.0, 1.5], &Device::Cpu).unwrap();
    let q = quantize_linear("w", &t, LinearSpec { bits: 8, symmetric: false, granularity: Granularity::PerTensor })
        .unwrap();
    assert_eq!(q.scales(), [4.0 / 255.0]);
    assert_eq!(q.zero_points().unwrap(), [64]);
    assert_eq!(q.codes(), [0, 64, 255, 160]); // -1/S+64 = 0.25 → 0; 1.5/S + 64 = 159.6 → 160
}

#[test]
fn constant_and_zero_tensors_have_a_defined_result() {
    let dev = Device::Cpu;
    for symmetric in [true, false] {
        let spec = LinearSpec { bits: 4, symmetric, granularity: Granularity::PerTensor };
        let zeros = quantize_linear("z", &Tensor::zeros(5, DType::F32, &dev).unwrap(), spec).unwrap();
        assert_eq!(zeros.dequantize_f32(), [0.0; 5]);
        let c = quantize_linear("c", &Tensor::new(&[2.5f32; 4], &dev).unwrap(), spec).unwrap();
        for x in c.dequantize_f32() {
            assert!((x - 2.5).abs() <= c.scales()[0] / 2.0 + 1e-6, "{x}");
        }
    }
}

#[test]
fn bad_options_and_values_are_refused() {
    let dev = Device::Cpu;
    let t = Tensor::zeros((2, 6), DType::F32, &dev).unwrap();
    for bits in [0, 1, 9] {
        let e =
            quantize_linear("enc.fc", &t, LinearSpec { bits, symmetric: true, granularity: Granularity::PerTensor })
                .unwrap_err();
        assert!(e.to_string().contains(&format!("needs 2..=8 bits, found {bits}")), "{e}");
    }
    let e = quantize_linear(
        "enc.fc",
        &t,
        LinearSpec { bits: 4, symmetric: true, granularity: Granularity::PerGroup { size: 4 } },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("`enc.fc`") && e.to_string().contains("group size 4 does not divide the row length 6"),
        "{e}"
    );
    let nan = Tensor::new(&[1f32, f32::NAN, f32::INFINITY], &dev).unwrap();
    let e =
        quantize_linear("enc.fc", &nan, LinearSpec { bits: 8, symmetric: true, granularity: Granularity::PerTensor })
            .unwrap_err();
    assert!(e.to_string().contains("`enc.fc` holds 2 non-finite values"), "{e}");
}
