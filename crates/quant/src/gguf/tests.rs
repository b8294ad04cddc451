use candle_core::{Device, Tensor};
use proptest::prelude::*;

use super::*;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Q8_0 and Q4_0 re-encoded as pare tensors dequantize to exactly what candle dequantizes.
    #[test]
    fn q8_0_and_q4_0_are_exact_in_pare_format(rows in 1usize..5, blocks in 1usize..5, seed in 0u32..1000) {
        let t = Tensor::from_vec(values(rows * blocks * 32, seed), (rows, blocks * 32), &Device::Cpu).unwrap();
        for ty in [GgufType::Q8_0, GgufType::Q4_0] {
            let theirs = quantize("w", &t, ty).unwrap().dequantize(&Device::Cpu).unwrap();
            let ours = to_pare("w", &t, ty).unwrap().to_dense(&Device::Cpu).unwrap();
            let d = pare_core_tensor::testing::max_abs_diff(&theirs, &ours).unwrap();
            prop_assert_eq!(d, 0.0, "{:?}", ty);
        }
    }
}

#[test]
fn a_row_that_is_not_whole_blocks_is_refused_by_name() {
    let e = GgufType::Q4K.check("encoder.layer.0.attention.self.query.weight", &[384, 384]).unwrap_err().to_string();
    assert!(e.contains("query.weight") && e.contains("divisible by 256") && e.contains("found 384"), "{e}");
    assert!(GgufType::Q4K.check("w", &[384, 1536]).is_ok());
    assert!(GgufType::Q8_0.check("w", &[]).is_err());
    let e = to_pare("w", &Tensor::zeros((2, 64), DType::F32, &Device::Cpu).unwrap(), GgufType::Q4K).unwrap_err();
    assert!(e.to_string().contains("--format gguf"), "{e}");
}

#[test]
fn files_round_trip_and_never_overwrite_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::from_vec(values(4 * 256, 3), (4, 256), &Device::Cpu).unwrap();
    let tensors: Vec<(String, QTensor)> = [GgufType::Q4K, GgufType::Q6K, GgufType::Q4_1, GgufType::F16]
        .iter()
        .map(|ty| (format!("{ty:?}"), quantize("w", &t, *ty).unwrap()))
        .collect();
    let meta = BTreeMap::from([("pare.version".to_string(), "test".to_string())]);
    let path = dir.path().join("m.gguf");
    write(&path, &tensors, &meta, &[]).unwrap();
    let (back, m) = read(&path, &Device::Cpu).unwrap();
    assert_eq!(m["pare.version"], "test");
    for (name, q) in &tensors {
        let d = pare_core_tensor::testing::max_abs_diff(
            &q.dequantize(&Device::Cpu).unwrap(),
            &back[name].to_dense(&Device::Cpu).unwrap(),
        )
        .unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
    let before = std::fs::read(&path).unwrap();
    assert!(write(&path, &tensors, &meta, &[path.as_path()]).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not gguf at all").unwrap();
    let e = read(&junk, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("junk.gguf"), "{e}");
}
