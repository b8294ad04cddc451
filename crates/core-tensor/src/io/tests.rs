//! Round trips of every weight format through safetensors, and the atomic writer's refusals.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::{Granularity, Mapping, QuantScheme};

fn sample_weights() -> BTreeMap<String, Weight> {
    let dev = Device::Cpu;
    let dense = Tensor::arange(0f32, 12., &dev).unwrap().reshape((3, 4)).unwrap();
    let scheme = QuantScheme {
        bits: 3,
        signed: false,
        symmetric: false,
        mapping: Mapping::Linear,
        granularity: Granularity::PerGroup { size: 2 },
    };
    let q = QuantizedTensor::from_codes(
        &[0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4],
        scheme,
        vec![0.5; 6],
        Some(vec![3; 6]),
        None,
        vec![3, 4],
        DType::F32,
    )
    .unwrap();
    let nf = QuantScheme {
        bits: 2,
        signed: false,
        symmetric: true,
        mapping: Mapping::Codebook,
        granularity: Granularity::PerTensor,
    };
    let cb = QuantizedTensor::from_codes(
        &[0, 1, 2, 3],
        nf,
        vec![1.5],
        None,
        Some(vec![-1.0, 0.0, 0.3, 1.0]),
        vec![2, 2],
        DType::F16,
    )
    .unwrap();
    let sparse_src = Tensor::new(&[[0f32, 1., 0., 2.], [3., 0., 0., 4.]], &dev).unwrap();
    BTreeMap::from([
        ("a.dense".to_string(), Weight::Dense(dense)),
        ("b.q3".to_string(), Weight::Quantized(q)),
        ("c.nf".to_string(), Weight::Quantized(cb)),
        ("d.csr".to_string(), Weight::Sparse(SparseTensor::csr_from_dense(&sparse_src, "d").unwrap())),
        ("e.nm".to_string(), Weight::Sparse(SparseTensor::nm_from_dense(&sparse_src, 2, 4, "e").unwrap())),
        ("f.block".to_string(), Weight::Sparse(SparseTensor::block_from_dense(&sparse_src, 1, 2, "f").unwrap())),
        ("g.half".to_string(), Weight::Dense(Tensor::new(&[1f32, -2.5], &dev).unwrap().to_dtype(DType::BF16).unwrap())),
    ])
}

#[test]
fn every_format_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let weights = sample_weights();
    let meta = BTreeMap::from([(META_RECIPE.to_string(), "[[stage]]\nkind = \"quantize\"".to_string())]);
    save_weights(&path, &weights, &meta, &[]).unwrap();
    let (back, meta_back) = load_weights(&path, &Device::Cpu).unwrap();
    assert_eq!(meta_back.get(META_VERSION).map(String::as_str), Some(crate::VERSION));
    assert_eq!(meta_back.get(META_RECIPE), meta.get(META_RECIPE));
    assert_eq!(back.keys().collect::<Vec<_>>(), weights.keys().collect::<Vec<_>>());
    for (name, w) in &weights {
        let b = &back[name];
        match (w, b) {
            (Weight::Quantized(x), Weight::Quantized(y)) => assert_eq!(x, y, "{name}"),
            (Weight::Sparse(x), Weight::Sparse(y)) => assert_eq!(x, y, "{name}"),
            (Weight::Dense(x), Weight::Dense(y)) => {
                assert_eq!(x.dtype(), y.dtype());
                assert_eq!(crate::testing::max_abs_diff(x, y).unwrap(), 0.0, "{name}");
            }
            _ => panic!("{name} changed format: {} vs {}", w.describe(), b.describe()),
        }
    }
    // A new file is readable by others (not the temp file's private 0600).
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
    // Saving twice gives the same bytes.
    let again = dir.path().join("w2.safetensors");
    save_weights(&again, &weights, &meta, &[]).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&again).unwrap());
}

#[test]
fn saving_over_an_input_is_refused_and_the_input_survives() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.safetensors");
    save_weights(&path, &sample_weights(), &BTreeMap::new(), &[]).unwrap();
    let before = std::fs::read(&path).unwrap();
    // Named as an input explicitly...
    let e = save_weights(&path, &BTreeMap::new(), &BTreeMap::new(), &[path.as_path()]).unwrap_err();
    assert!(matches!(e, Error::OverwriteInput { .. }), "{e}");
    // ...or opened for reading earlier in this process.
    let _opened = SafeTensorsFile::open(&path).unwrap();
    let e = save_weights(&path, &BTreeMap::new(), &BTreeMap::new(), &[]).unwrap_err();
    assert!(e.to_string().contains("refusing to overwrite input file"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn writer_checks_byte_counts() {
    let dir = tempfile::tempdir().unwrap();
    let t = BTreeMap::from([("x".to_string(), RawTensor { dtype: StDtype::F32, shape: vec![3], data: vec![0; 8] })]);
    let e = save_tensors(dir.path().join("x.safetensors"), &t, &BTreeMap::new(), &[]).unwrap_err();
    assert!(e.to_string().contains("needs 12 bytes, found 8"), "{e}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing may be left behind");
}
