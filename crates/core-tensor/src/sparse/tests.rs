//! Round-trip and invariant tests of the sparse layouts.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;

use super::*;

fn tensor(v: Vec<f32>, rows: usize, cols: usize) -> Tensor {
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

/// Values with about `zero_pct`% exact zeros, from a byte stream.
fn sparse_values(raw: &[u8], n: usize, zero_pct: u8) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let b = raw[i % raw.len()].wrapping_add(i as u8);
            if b % 100 < zero_pct { 0.0 } else { f32::from(b) - 127.5 }
        })
        .collect()
}

proptest! {
    #[test]
    fn csr_round_trips(rows in 1usize..12, cols in 1usize..17, zero_pct in 0u8..100, raw in proptest::collection::vec(any::<u8>(), 1..64)) {
        let v = sparse_values(&raw, rows * cols, zero_pct);
        let s = SparseTensor::csr_from_dense(&tensor(v.clone(), rows, cols), "w").unwrap();
        prop_assert_eq!(s.stored(), v.iter().filter(|x| **x != 0.0).count());
        prop_assert_eq!(s.to_dense_f32(), v);
    }

    #[test]
    fn nm_round_trips_and_keeps_the_pattern(rows in 1usize..8, groups in 1usize..6, nm in prop_oneof![Just((2usize, 4usize)), Just((4, 8)), Just((1, 4))], raw in proptest::collection::vec(any::<u8>(), 1..64)) {
        let (n, m) = nm;
        let cols = groups * m;
        // Zero all but the n largest-magnitude entries of every group, as a pruner would.
        let mut v = sparse_values(&raw, rows * cols, 30);
        for g in v.chunks_mut(m) {
            let mut idx: Vec<usize> = (0..m).collect();
            idx.sort_by(|a, b| g[*b].abs().total_cmp(&g[*a].abs()));
            for &i in &idx[n..] { g[i] = 0.0; }
        }
        let s = SparseTensor::nm_from_dense(&tensor(v.clone(), rows, cols), n, m, "w").unwrap();
        prop_assert_eq!(s.stored(), rows * cols / m * n);
        prop_assert_eq!(s.to_dense_f32(), v);
        if let SparseLayout::NM { indices, .. } = s.layout() {
            for g in indices.chunks(n) { prop_assert!(g.windows(2).all(|w| w[0] < w[1]) && g.iter().all(|i| (*i as usize) < m)); }
        }
    }

    #[test]
    fn block_round_trips(brs in 1usize..4, bcs in 1usize..4, br in 1usize..4, bc in 1usize..4, zero_pct in 0u8..100, raw in proptest::collection::vec(any::<u8>(), 1..64)) {
        let (rows, cols) = (brs * br, bcs * bc);
        let v = sparse_values(&raw, rows * cols, zero_pct);
        let s = SparseTensor::block_from_dense(&tensor(v.clone(), rows, cols), br, bc, "w").unwrap();
        prop_assert_eq!(s.to_dense_f32(), v);
    }
}

#[test]
fn nm_refuses_a_group_with_too_many_nonzeros() {
    let e = SparseTensor::nm_from_dense(&tensor(vec![1.0, 2.0, 3.0, 0.0], 1, 4), 2, 4, "enc.fc").unwrap_err();
    assert!(e.to_string().contains("hold 3 non-zeros, more than n = 2"), "{e}");
    let e = SparseTensor::nm_from_dense(&tensor(vec![0.0; 6], 1, 6), 2, 4, "enc.fc").unwrap_err();
    assert!(e.to_string().contains("m dividing 6 columns"), "{e}");
}

#[test]
fn constructors_check_invariants() {
    let bad = SparseTensor::new(
        vec![2, 3],
        DType::F32,
        SparseLayout::Csr { row_ptr: vec![0, 2, 1], col_idx: vec![0], values: vec![1.0] },
    );
    assert!(bad.is_err());
    let bad = SparseTensor::new(
        vec![1, 3],
        DType::F32,
        SparseLayout::Csr { row_ptr: vec![0, 2], col_idx: vec![2, 1], values: vec![1.0, 2.0] },
    );
    assert!(bad.unwrap_err().to_string().contains("not strictly increasing"));
    let bad = SparseTensor::new(
        vec![1, 4],
        DType::F32,
        SparseLayout::NM { n: 2, m: 4, values: vec![1.0, 2.0], indices: vec![3, 4] },
    );
    assert!(bad.unwrap_err().to_string().contains("strictly increasing and < 4"));
    let nan = SparseTensor::csr_from_dense(&tensor(vec![f32::NAN, 1.0], 1, 2), "w").unwrap_err();
    assert!(matches!(nan, Error::NonFinite { count: 1, first: 0, .. }), "{nan}");
}
