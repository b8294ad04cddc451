//! Non-linear (codebook) mappings: NF4 (the bitsandbytes 4-bit NormalFloat table with per-group
//! absmax scales), quantile mapping (equal-population bins, bin means as the codebook) and
//! seeded k-means (Lloyd) codebooks. Each is stored as a core-tensor codebook tensor.

use candle_core::{DType, Tensor};
use pare_core_tensor::{Granularity, Mapping, QuantScheme, QuantizedTensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Result;
use crate::error::option;
use crate::values::finite_values;

/// The NF4 codebook of QLoRA (Dettmers et al., 2023), as bitsandbytes ships it: the quantiles
/// of a standard normal, normalised to [-1, 1], with an exact zero.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

fn codebook_scheme(bits: u8, granularity: Granularity) -> QuantScheme {
    QuantScheme { bits, signed: false, symmetric: true, mapping: Mapping::Codebook, granularity }
}

/// Index of the entry of the sorted `book` nearest to `x` (ties to the lower entry).
pub(crate) fn nearest(book: &[f32], x: f32) -> usize {
    let i = book.partition_point(|v| *v < x);
    if i == 0 {
        0
    } else if i == book.len() || x - book[i - 1] <= book[i] - x {
        i - 1
    } else {
        i
    }
}

/// NF4 with one absmax scale per `group` consecutive elements of each row (bitsandbytes uses 64).
pub fn nf4(name: &str, t: &Tensor, group: usize) -> Result<QuantizedTensor> {
    let shape = t.dims().to_vec();
    let scheme = codebook_scheme(4, Granularity::PerGroup { size: group });
    if group == 0 {
        return Err(option(name, "NF4 group size must be at least 1, found 0"));
    }
    let n = scheme.num_scales(&shape).map_err(|e| option(name, e.to_string()))?;
    let v = finite_values(name, t)?;
    let mut scales = vec![0f32; n];
    for (i, x) in v.iter().enumerate() {
        scales[i / group] = scales[i / group].max(x.abs());
    }
    let zero = nearest(&NF4, 0.0);
    let codes: Vec<u8> = v
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let s = scales[i / group];
            (if s > 0.0 { nearest(&NF4, x / s) } else { zero }) as u8
        })
        .collect();
    Ok(QuantizedTensor::from_codes(&codes, scheme, scales, None, Some(NF4.to_vec()), shape, DType::F32)?)
}

/// Ranks of `v` (stable: equal values keep index order) and the values sorted.
fn sorted(v: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|a, b| v[*a].total_cmp(&v[*b]).then(a.cmp(b)));
    let s = idx.iter().map(|&i| v[i]).collect();
    (idx, s)
}

/// Quantile mapping with one codebook for the tensor: the values, sorted, are cut into
/// `2^bits` bins of equal population (sizes differ by at most one element); each element's
/// code is its bin, and each codebook entry is its bin's mean.
pub fn quantile(name: &str, t: &Tensor, bits: u8) -> Result<QuantizedTensor> {
    if !(1..=8).contains(&bits) {
        return Err(option(name, format!("quantile mapping needs 1..=8 bits, found {bits}")));
    }
    let v = finite_values(name, t)?;
    let n = v.len();
    let k = (1usize << bits).min(n.max(1));
    let (idx, s) = sorted(&v);
    let mut codes = vec![0u8; n];
    let mut book = vec![0f64; k];
    let mut count = vec![0usize; k];
    for (rank, &i) in idx.iter().enumerate() {
        let bin = rank * k / n;
        codes[i] = bin as u8;
        book[bin] += f64::from(s[rank]);
        count[bin] += 1;
    }
    let book: Vec<f32> =
        book.iter().zip(&count).map(|(sum, c)| if *c > 0 { (sum / *c as f64) as f32 } else { 0.0 }).collect();
    let scheme = codebook_scheme(bits, Granularity::PerTensor);
    Ok(QuantizedTensor::from_codes(&codes, scheme, vec![1.0], None, Some(book), t.dims().to_vec(), DType::F32)?)
}

/// Sum of squared errors and the new centroids for 1-D clusters of `sorted` values cut at the
/// midpoints between consecutive `centroids` (sorted). `prefix` holds running sums of values.
fn lloyd_step(sorted: &[f32], prefix: &[f64], centroids: &[f32]) -> Vec<Option<f32>> {
    let mut out = Vec::with_capacity(centroids.len());
    let mut start = 0;
    for j in 0..centroids.len() {
        let end = if j + 1 == centroids.len() {
            sorted.len()
        } else {
            let mid = 0.5 * (centroids[j] + centroids[j + 1]);
            // Ties at the midpoint go to the lower centroid, as in `nearest`.
            sorted.partition_point(|v| *v <= mid)
        };
        let end = end.max(start);
        out.push(if end > start { Some(((prefix[end] - prefix[start]) / (end - start) as f64) as f32) } else { None });
        start = end;
    }
    out
}

/// A k-means codebook of `2^bits` entries for the whole tensor, by Lloyd's algorithm in one
/// dimension: initialised at the quantile-bin means, at most `iterations` rounds, empty
/// clusters re-seeded with a value drawn by a ChaCha8 generator seeded with `seed`. Sorting
/// once and using prefix sums makes each round O(k log n), so whole embedding tables are cheap.
pub fn kmeans(name: &str, t: &Tensor, bits: u8, seed: u64, iterations: usize) -> Result<QuantizedTensor> {
    let init = quantile(name, t, bits)?;
    let v = finite_values(name, t)?;
    let (_, s) = sorted(&v);
    let mut prefix = Vec::with_capacity(s.len() + 1);
    prefix.push(0f64);
    for x in &s {
        prefix.push(prefix.last().expect("non-empty") + f64::from(*x));
    }
    let mut book: Vec<f32> = init.codebook().expect("quantile gives a codebook").to_vec();
    book.sort_by(f32::total_cmp);
    book.dedup();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..iterations {
        let next: Vec<f32> = lloyd_step(&s, &prefix, &book)
            .into_iter()
            .map(|c| c.unwrap_or_else(|| s[rng.random_range(0..s.len())]))
            .collect();
        let mut next_sorted = next.clone();
        next_sorted.sort_by(f32::total_cmp);
        if next_sorted == book {
            break;
        }
        book = next_sorted;
    }
    book.dedup();
    let codes: Vec<u8> = v.iter().map(|x| nearest(&book, *x) as u8).collect();
    let scheme = codebook_scheme(bits, Granularity::PerTensor);
    Ok(QuantizedTensor::from_codes(&codes, scheme, vec![1.0], None, Some(book), t.dims().to_vec(), DType::F32)?)
}

#[cfg(test)]
mod tests;
