//! Codebook mappings: equal-population quantile bins, NF4 beating INT4 on Gaussian weights,
//! k-means no worse than its quantile start, seeded determinism.

use candle_core::{Device, Tensor};
use pare_core_tensor::Granularity;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::linear::{LinearSpec, quantize_linear};

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32 * 0.02
        })
        .collect()
}

fn rmse(a: &[f32], b: &[f32]) -> f64 {
    (a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>() / a.len() as f64).sqrt()
}

proptest! {
    #[test]
    fn quantile_bins_are_equal_population_within_one(bits in 1u8..=6, vals in proptest::collection::vec(-5f32..5f32, 1..400)) {
        let t = Tensor::from_vec(vals.clone(), vals.len(), &Device::Cpu).unwrap();
        let q = quantile("w", &t, bits).unwrap();
        let k = q.codebook().unwrap().len();
        let mut count = vec![0usize; k];
        for c in q.codes() { count[c as usize] += 1; }
        let (lo, hi) = (count.iter().min().unwrap(), count.iter().max().unwrap());
        prop_assert!(hi - lo <= 1, "{count:?}");
        // Bins are ordered: every value of bin b is ≤ every value of bin b + 1.
        let codes = q.codes();
        for (i, x) in vals.iter().enumerate() {
            for (j, y) in vals.iter().enumerate() {
                if codes[i] < codes[j] { prop_assert!(x <= y); }
            }
        }
    }
}

#[test]
fn nf4_beats_int4_absmax_on_gaussian_weights() {
    let v = gaussian(64 * 256, 1);
    let t = Tensor::from_vec(v.clone(), (64, 256), &Device::Cpu).unwrap();
    let nf = nf4("w", &t, 64).unwrap();
    let int4 = quantize_linear(
        "w",
        &t,
        LinearSpec { bits: 4, symmetric: true, granularity: Granularity::PerGroup { size: 64 } },
    )
    .unwrap();
    let (e_nf, e_int) = (rmse(&v, &nf.dequantize_f32()), rmse(&v, &int4.dequantize_f32()));
    assert!(e_nf < e_int, "NF4 RMSE {e_nf:.3e} vs INT4 {e_int:.3e}");
}

#[test]
fn kmeans_is_no_worse_than_quantile_and_is_deterministic() {
    let v = gaussian(20_000, 2);
    let t = Tensor::from_vec(v.clone(), (100, 200), &Device::Cpu).unwrap();
    for bits in [2u8, 3, 4] {
        let q = quantile("w", &t, bits).unwrap();
        let k = kmeans("w", &t, bits, 9, 50).unwrap();
        let (eq, ek) = (rmse(&v, &q.dequantize_f32()), rmse(&v, &k.dequantize_f32()));
        assert!(ek <= eq, "bits {bits}: k-means {ek:.3e} vs quantile {eq:.3e}");
        assert_eq!(k, kmeans("w", &t, bits, 9, 50).unwrap());
    }
    // Fewer distinct values than entries: the codebook shrinks, every value is exact.
    let few = Tensor::new(&[1f32, 1.0, 2.0, 2.0, 3.0], &Device::Cpu).unwrap();
    let k = kmeans("few", &few, 4, 0, 10).unwrap();
    assert_eq!(k.dequantize_f32(), [1.0, 1.0, 2.0, 2.0, 3.0]);
}

#[test]
fn nf4_groups_and_zero_groups() {
    let dev = Device::Cpu;
    let t = Tensor::new(&[[0f32, 0.0, 0.0, 0.0], [1.0, -1.0, 0.5, 0.0]], &dev).unwrap();
    let q = nf4("w", &t, 4).unwrap();
    assert_eq!(q.scales(), [0.0, 1.0]);
    let back = q.dequantize_f32();
    assert_eq!(&back[..5], &[0.0, 0.0, 0.0, 0.0, 1.0]);
    assert_eq!(back[5], -1.0);
    let e = nf4("enc.fc", &t, 3).unwrap_err();
    assert!(e.to_string().contains("group size 3 does not divide the row length 4"), "{e}");
}
