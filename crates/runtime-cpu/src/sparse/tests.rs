use candle_core::{Device, Tensor};
use pare_core_tensor::{Runtime, SparseTensor, Weight};
use proptest::prelude::*;

use crate::testkit::{check_linear, input};

/// `[n, k]` values with about `keep` of them nonzero.
fn pruned(n: usize, k: usize, keep: f64, seed: u64) -> Vec<f32> {
    input(n, k, seed)
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let h = (i as u64 ^ seed).wrapping_mul(0x9E3779B97F4A7C15) >> 11;
            if (h % 1000) as f64 / 1000.0 < keep { v } else { 0.0 }
        })
        .collect()
}

/// Keeps the `n` largest magnitudes of every `m` consecutive values.
fn nm(mut v: Vec<f32>, n: usize, m: usize) -> Vec<f32> {
    for g in v.chunks_mut(m) {
        let mut order: Vec<usize> = (0..m).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in &order[n..] {
            g[i] = 0.0;
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    /// CSR, 2:4 and 4:8 and block-sparse weights, and dense weights that are mostly zeros,
    /// at batch sizes that take every tile width (8, 16, 32, 64 and AVX-512's 128 rows) and
    /// its tails.
    #[test]
    fn sparse_weights_match_the_reference_at_every_level_and_thread_count(
        m in prop_oneof![1usize..12, 14usize..40, 62usize..70, 126usize..140], n in 1usize..30, kq in 1usize..40,
        format in 0usize..5, keep in 0.0f64..0.3, bias in any::<bool>(), seed in any::<u64>()
    ) {
        let k = kq * 8;
        let dense = match format {
            1 => nm(input(n, k, seed), 2, 4),
            2 => nm(input(n, k, seed), 4, 8),
            _ => pruned(n, k, keep, seed),
        };
        let t = Tensor::from_vec(dense.clone(), (n, k), &Device::Cpu).unwrap();
        let w = match format {
            0 => Weight::Sparse(SparseTensor::csr_from_dense(&t, "w").unwrap()),
            1 => Weight::Sparse(SparseTensor::nm_from_dense(&t, 2, 4, "w").unwrap()),
            2 => Weight::Sparse(SparseTensor::nm_from_dense(&t, 4, 8, "w").unwrap()),
            3 => Weight::Sparse(SparseTensor::block_from_dense(&t, 1, 4, "w").unwrap()),
            _ => Weight::Dense(t),
        };
        let values = w.to_dense(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mag: Vec<f32> = values.iter().map(|v| v.abs()).collect();
        check_linear(&w, &values, &mag, (m, n, k), bias, seed)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// The sparse kernel screens its input while transposing it: a NaN or an infinity
    /// anywhere (in the 8 × 8 blocks or the tails, in a column no nonzero reads) is an error
    /// that names the layer, the count and the first position, at every level and thread
    /// count, and a finite input runs.
    #[test]
    fn non_finite_inputs_of_a_sparse_layer_are_named(
        m in prop_oneof![1usize..12, 60usize..70, 126usize..134], kq in 1usize..20, at in any::<prop::sample::Index>(),
        which in 0usize..3, seed in any::<u64>()
    ) {
        let (n, k) = (24, kq * 4 + 3);
        let mut w = pruned(n, k, 0.1, seed);
        // Column 0 unread by every output: a bad value there changes no sum.
        for row in w.chunks_mut(k) {
            row[0] = 0.0;
        }
        w[1] = 0.5;
        let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let w = Weight::Sparse(SparseTensor::csr_from_dense(&t, "w").unwrap());
        let mut x = input(m, k, seed);
        let first = if which == 0 { at.index(m) * k } else { at.index(m * k) };
        x[first] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][which];
        let x = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
        for level in crate::SimdLevel::available() {
            for threads in [1, 3] {
                let rt = crate::CpuRuntime::with_level(threads, level).unwrap();
                let op = rt.prepare_linear("fc.sparse", &w, None).unwrap();
                prop_assert!(rt.kernel("fc.sparse", &w, true).unwrap().is_some_and(|k| matches!(k, crate::linear::LinearKernel::Sparse(_))));
                let e = op.forward(&x).unwrap_err();
                prop_assert!(
                    matches!(&e, pare_core_tensor::Error::NonFinite { count: 1, first: f, name } if f == &first && name.contains("fc.sparse")),
                    "{level:?}/{threads}: {e}"
                );
                let clean = Tensor::from_vec(input(m, k, seed), (m, k), &Device::Cpu).unwrap();
                prop_assert!(op.forward(&clean).is_ok());
            }
        }
    }
}

#[test]
fn the_kernel_is_chosen_by_density() {
    let sparse = SparseRows::from_dense(&pruned(16, 64, 0.1, 1), 16, 64);
    assert!(sparse.density() < 0.2);
    let rt = crate::CpuRuntime::new(1).unwrap();
    let kind = |keep: f64| {
        let w = Weight::Dense(Tensor::from_vec(pruned(16, 64, keep, 1), (16, 64), &Device::Cpu).unwrap());
        rt.kernel("fc", &w, true).unwrap()
    };
    assert!(matches!(kind(0.1), Some(crate::linear::LinearKernel::Sparse(_))));
    assert!(matches!(kind(0.95), Some(crate::linear::LinearKernel::Panels(_))));
}

use super::SparseRows;
