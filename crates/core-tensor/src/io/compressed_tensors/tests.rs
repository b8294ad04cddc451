use proptest::prelude::*;

use super::*;
use crate::io::save_tensors;

#[test]
fn packing_matches_compressed_tensors_reference_example() {
    // pack_to_int32's docstring: int8 values [1, 2] at 8 bits -> [129, 130, 0, 0] -> 33409.
    let (words, shape) = pack_i32(&[1, 2], 1, 2, 8, 1);
    assert_eq!((words, shape), (vec![33409], vec![1, 1]));
    // 4 bits: eight values per word, the first in the lowest nibble.
    let v = [-8, -7, 0, 1, 2, 3, 4, 7];
    let (words, _) = pack_i32(&v, 1, 8, 4, 1);
    assert_eq!(words[0] as u32, 0xF_C_B_A_9_8_1_0);
}

proptest! {
    #[test]
    fn packing_round_trips_along_either_axis(
        rows in 1usize..13, cols in 1usize..21, bits in prop::sample::select(vec![2u8, 4, 8]), axis in 0usize..2, seed in any::<u64>()
    ) {
        let half = 1i64 << (bits - 1);
        let v: Vec<i32> = (0..rows * cols)
            .map(|i| {
                let h = seed.wrapping_mul(6364136223846793005).wrapping_add((i as u64).wrapping_mul(1442695040888963407));
                ((h >> 33) as i64 % (2 * half) - half) as i32
            })
            .collect();
        let (words, shape) = pack_i32(&v, rows, cols, bits, axis);
        let f = 32 / bits as usize;
        prop_assert_eq!(shape.clone(), if axis == 1 { vec![rows, cols.div_ceil(f)] } else { vec![rows.div_ceil(f), cols] });
        prop_assert_eq!(unpack_i32(&words, rows, cols, bits, axis), v);
    }
}

fn quantized(bits: u8, symmetric: bool, granularity: Granularity, rows: usize, cols: usize) -> QuantizedTensor {
    let scheme = QuantScheme { bits, signed: symmetric, symmetric, mapping: Mapping::Linear, granularity };
    let n = scheme.num_scales(&[rows, cols]).unwrap();
    let codes: Vec<u8> = (0..rows * cols).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
    let scales: Vec<f32> = (0..n).map(|i| 0.01 + i as f32 * 0.003).collect();
    let zeros = (!symmetric).then(|| (0..n).map(|i| (i % (1 << bits)) as i32).collect());
    QuantizedTensor::from_codes(&codes, scheme, scales, zeros, None, vec![rows, cols], DType::F32).unwrap()
}

#[test]
fn every_integer_layout_round_trips_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let bias = candle_core::Tensor::new(&[0.5f32, -1.0, 2.0, 0.25, 1.0, 0.0], &Device::Cpu).unwrap();
    for bits in [2u8, 3, 4, 8] {
        for symmetric in [true, false] {
            for g in [Granularity::PerTensor, Granularity::PerChannel { axis: 0 }, Granularity::PerGroup { size: 8 }] {
                for act in [
                    None,
                    Some(ActQuant::new(8, true, ActRange::Dynamic { per_token: true })),
                    Some(ActQuant::new(8, false, ActRange::Static { scale: 0.02, zero_point: 131 })),
                    Some(ActQuant::new(8, true, ActRange::Static { scale: 0.03, zero_point: 0 })),
                ] {
                    let q = quantized(bits, symmetric, g, 6, 24);
                    let weights = BTreeMap::from([
                        ("enc.fc.weight".to_string(), Weight::Quantized(q.clone())),
                        ("enc.fc.bias".to_string(), Weight::Dense(bias.clone())),
                    ]);
                    let inputs: BTreeMap<String, ActQuant> =
                        act.iter().map(|a| ("enc.fc".to_string(), a.clone())).collect();
                    let (tensors, config) = encode(&weights, &inputs).unwrap();
                    let packed = act.is_none() && matches!(bits, 4 | 8);
                    let want = if packed { "pack-quantized" } else { "int-quantized" };
                    assert_eq!(config["format"], want);
                    assert_eq!(tensors.contains_key("enc.fc.weight_packed"), packed);
                    assert_eq!(tensors.contains_key("enc.fc.weight_zero_point"), !symmetric);
                    let path = dir.path().join("model.safetensors");
                    save_tensors(&path, &tensors, &BTreeMap::new(), &[]).unwrap();
                    let (back, meta) = load(&path, &config, &Device::Cpu).unwrap();
                    let ctx = format!("int{bits} sym={symmetric} {g:?} {act:?}");
                    let Weight::Quantized(b) = &back["enc.fc.weight"] else { panic!("{ctx}: not quantized") };
                    assert_eq!(b.dequantize_f32(), q.dequantize_f32(), "{ctx}");
                    assert_eq!(b, &q, "{ctx}");
                    let Weight::Dense(bb) = &back["enc.fc.bias"] else { panic!("{ctx}: bias") };
                    assert_eq!(bb.to_vec1::<f32>().unwrap(), bias.to_vec1::<f32>().unwrap());
                    match &act {
                        None => assert!(meta.is_empty(), "{ctx}"),
                        Some(a) => {
                            let got: ActQuant = serde_json::from_str(&meta[&format!("{META_ACT}enc.fc")]).unwrap();
                            assert_eq!(&got, a, "{ctx}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn formats_compressed_tensors_cannot_hold_are_refused_by_name() {
    let cb = QuantScheme {
        bits: 4,
        signed: false,
        symmetric: true,
        mapping: Mapping::Codebook,
        granularity: Granularity::PerGroup { size: 8 },
    };
    let nf4 =
        QuantizedTensor::from_codes(&[0; 16], cb, vec![1.0, 1.0], None, Some(vec![0.0; 16]), vec![2, 8], DType::F32)
            .unwrap();
    let w = BTreeMap::from([("fc.weight".to_string(), Weight::Quantized(nf4))]);
    let e = encode(&w, &BTreeMap::new()).unwrap_err().to_string();
    assert!(e.contains("`fc.weight`") && e.contains("expected an int2..int8 linear scheme"), "{e}");

    let w = BTreeMap::from([(
        "fc.weight".to_string(),
        Weight::Quantized(quantized(8, true, Granularity::PerChannel { axis: 0 }, 2, 8)),
    )]);
    let mut smooth = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    smooth.smooth = Some(vec![1.0; 8]);
    let e = encode(&w, &BTreeMap::from([("fc".to_string(), smooth)])).unwrap_err().to_string();
    assert!(e.contains("`fc`") && e.contains("SmoothQuant"), "{e}");
    let act = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    let e = encode(&w, &BTreeMap::from([("other".to_string(), act)])).unwrap_err().to_string();
    assert!(e.contains("`other`") && e.contains("together with its weight"), "{e}");
}
