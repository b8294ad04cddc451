//! A corpus of malformed safetensors files: each must give a typed error naming the problem,
//! without a panic and without allocating more than the file's size.

use std::path::Path;

use pare_core_tensor::Error;
use pare_core_tensor::io::SafeTensorsFile;

/// A file with `header` as JSON and `data` as the data section.
fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

/// Opens `bytes` as a file, checking that no single allocation exceeds the file's size
/// (plus a small allowance for paths and error messages).
fn open_bytes(dir: &Path, name: &str, bytes: &[u8]) -> Result<SafeTensorsFile, Error> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let (result, largest) = crate::alloc_probe::largest_allocation(|| SafeTensorsFile::open(&p));
    assert!(
        largest <= bytes.len() + 64 * 1024,
        "`{name}`: a {largest}-byte allocation for a {}-byte file",
        bytes.len()
    );
    result
}

#[test]
fn every_malformed_file_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "shorter than the 8-byte header length"),
        ("short", vec![1, 2, 3], "shorter than the 8-byte header length"),
        ("truncated data", file(good, &[0; 5]), "out of range of the 5-byte data section"),
        (
            "header past end",
            {
                let mut v = file(good, &[0; 8]);
                v[..8].copy_from_slice(&10_000u64.to_le_bytes());
                v
            },
            "header length 10000 runs past the end of the file",
        ),
        (
            "100 MB header claim",
            {
                let mut v = file(good, &[0; 8]);
                v[..8].copy_from_slice(&(100u64 * 1024 * 1024 + 1).to_le_bytes());
                v
            },
            "exceeds the limit",
        ),
        (
            "u64::MAX header claim",
            {
                let mut v = file(good, &[0; 8]);
                v[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                v
            },
            "exceeds the limit",
        ),
        ("not JSON", file("this is not json", &[]), "header is not valid JSON"),
        ("not an object", file("[1,2,3]", &[]), "header is not valid JSON"),
        (
            "overlap",
            file(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &[0; 12],
            ),
            "overlap",
        ),
        ("out of range", file(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &[0; 8]), "out of range"),
        (
            "reversed offsets",
            file(r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#, &[0; 8]),
            "out of range",
        ),
        (
            "shape x dtype mismatch",
            file(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0; 8]),
            "needs 12 bytes but data_offsets span 8",
        ),
        (
            "shape overflow",
            file(r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#, &[0; 8]),
            "more than 2^64",
        ),
        (
            "unknown dtype",
            file(r#"{"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}}"#, &[0; 8]),
            "unknown dtype `Q7`",
        ),
        (
            "duplicate name",
            file(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                &[0; 8],
            ),
            "duplicate tensor name `a`",
        ),
        ("missing field", file(r#"{"a":{"dtype":"F32","shape":[2]}}"#, &[0; 8]), "entry `a`"),
        (
            "unknown field",
            file(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}"#, &[0; 8]),
            "entry `a`",
        ),
        ("negative shape", file(r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, &[0; 8]), "entry `a`"),
        ("bad metadata", file(r#"{"__metadata__":{"k":1}}"#, &[]), "header is not valid JSON"),
    ];
    for (name, bytes, expect) in cases {
        let path_name = name.replace(' ', "_");
        match open_bytes(dir.path(), &path_name, &bytes) {
            Ok(_) => panic!("`{name}` was accepted"),
            Err(e @ Error::Malformed { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(expect), "`{name}`: expected a message containing `{expect}`, got `{msg}`");
                assert!(msg.contains(&path_name), "`{name}`: the message must name the file: `{msg}`");
            }
            Err(other) => panic!("`{name}`: expected Error::Malformed, got {other:?}"),
        }
    }
}

#[test]
fn packed_weights_with_impossible_metadata_are_refused() {
    use pare_core_tensor::io::load_weights;
    let dir = tempfile::tempdir().unwrap();
    let scheme = r#"{\"bits\":4,\"signed\":true,\"symmetric\":true,\"mapping\":\"linear\",\"granularity\":{\"kind\":\"per_tensor\"}}"#;
    let cases = [
        (
            format!(r#"{{\"scheme\":{scheme},\"shape\":[4294967296,4294967296,16],\"dtype\":\"f32\"}}"#),
            "element count overflows",
        ),
        (
            format!(r#"{{\"scheme\":{scheme},\"shape\":[5],\"dtype\":\"f32\"}}"#),
            "expected 3 packed code bytes, found 2",
        ),
        (format!(r#"{{\"scheme\":{scheme},\"shape\":[4],\"dtype\":\"u8\"}}"#), "logical dtype must be a float type"),
        ("{}".to_string(), "is not a quant description"),
    ];
    for (i, (meta, expect)) in cases.iter().enumerate() {
        let header = format!(
            r#"{{"__metadata__":{{"pare.quant.w":"{meta}"}},"w.__q.codes":{{"dtype":"U8","shape":[2],"data_offsets":[0,2]}},"w.__q.scales":{{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}}}"#
        );
        let p = dir.path().join(format!("q{i}"));
        std::fs::write(&p, file(&header, &[0x21, 0x43, 0, 0, 128, 63])).unwrap();
        let e = load_weights(&p, &candle_core::Device::Cpu).unwrap_err();
        assert!(e.to_string().contains(expect), "case {i}: expected `{expect}`, got `{e}`");
    }
}

#[test]
fn a_missing_file_names_the_path() {
    let e = SafeTensorsFile::open("/nonexistent/pare/x.safetensors").unwrap_err();
    assert!(matches!(e, Error::Io { action: "open", .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/pare/x.safetensors"));
}

#[test]
fn a_good_file_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let f = open_bytes(
        dir.path(),
        "good",
        &file(r#"{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &data),
    )
    .unwrap();
    assert_eq!(f.metadata()["k"], "v");
    let t = f.tensor("a", &candle_core::Device::Cpu).unwrap();
    assert_eq!(t.to_vec1::<f32>().unwrap(), [1.5, -2.0]);
    let e = f.tensor("b", &candle_core::Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("unknown tensor `b` (closest: a)"), "{e}");
}

mod fuzz {
    //! Structure-aware fuzzing on stable Rust: mutate a valid pare file (every weight format)
    //! byte by byte and by truncation; the loader must answer Ok or a typed error, never panic.

    use std::collections::BTreeMap;

    use candle_core::{DType, Device, Tensor};
    use pare_core_tensor::io::{load_weights, save_weights};
    use pare_core_tensor::{Granularity, Mapping, QuantScheme, QuantizedTensor, SparseTensor, Weight};
    use proptest::prelude::*;

    fn valid_file() -> Vec<u8> {
        let dev = Device::Cpu;
        let d = Tensor::new(&[[0f32, 1., 0., 2.], [3., 0., 0., 4.]], &dev).unwrap();
        let scheme = QuantScheme {
            bits: 4,
            signed: true,
            symmetric: true,
            mapping: Mapping::Linear,
            granularity: Granularity::PerGroup { size: 2 },
        };
        let q = QuantizedTensor::from_codes(
            &[1, 2, 3, 4, 5, 6, 7, 8],
            scheme,
            vec![0.5; 4],
            None,
            None,
            vec![2, 4],
            DType::F32,
        )
        .unwrap();
        let w = BTreeMap::from([
            ("a".to_string(), Weight::Dense(d.clone())),
            ("b".to_string(), Weight::Quantized(q)),
            ("c".to_string(), Weight::Sparse(SparseTensor::csr_from_dense(&d, "c").unwrap())),
            ("d".to_string(), Weight::Sparse(SparseTensor::nm_from_dense(&d, 2, 4, "d").unwrap())),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.safetensors");
        save_weights(&p, &w, &BTreeMap::new(), &[]).unwrap();
        std::fs::read(p).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        #[test]
        fn mutated_files_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>(), truncate: bool) {
            let mut bytes = valid_file();
            for (at, v) in edits {
                let i = at.index(bytes.len());
                bytes[i] = v;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("m.safetensors");
            std::fs::write(&p, &bytes).unwrap();
            // Either outcome is fine; a panic fails the test.
            let _ = load_weights(&p, &Device::Cpu);
        }
    }
}
