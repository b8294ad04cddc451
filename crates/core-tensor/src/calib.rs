//! Calibration statistics of layer inputs gathered by observers during forward passes: the
//! input Hessian `XᵀX` (GPTQ, SparseGPT) and per-feature input norms (Wanda, AWQ-style
//! scores), for linear layers, whose inputs are `[.., in]` rows.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Tensor};

use crate::hooks::{Observer, Site};
use crate::{Error, Result};

/// The input of a watched linear layer as `[rows, in]` f32, with a typed error on NaN/Inf.
fn rows(input: &Tensor) -> Result<Tensor> {
    let cols = input.dims().last().copied().unwrap_or(1);
    Ok(input.to_dtype(DType::F32)?.reshape(((), cols))?)
}

fn finite(site: &Site<'_>, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(first) => Err(Error::NonFinite {
            name: format!("input of `{}` during calibration", site.path),
            count: v.iter().filter(|x| !x.is_finite()).count(),
            first,
        }),
    }
}

/// Accumulates, per linear layer, `XᵀX` over every row of its inputs and the row count.
#[derive(Debug, Default)]
pub struct HessianObserver {
    paths: BTreeSet<String>,
    /// `path → (XᵀX row-major in×in, rows seen)`.
    pub sums: BTreeMap<String, (Vec<f64>, usize)>,
}

impl HessianObserver {
    /// Watches the linear layers at `paths`.
    pub fn new(paths: &[String]) -> Self {
        Self { paths: paths.iter().cloned().collect(), sums: BTreeMap::new() }
    }

    /// The Hessian `2XᵀX/n` of `path` (row-major `in×in`) and `n`, or an error when the
    /// calibration set never reached it.
    pub fn hessian(&self, path: &str) -> Result<(Vec<f64>, usize)> {
        match self.sums.get(path) {
            Some((s, n)) if *n > 0 => Ok((s.iter().map(|v| 2.0 * v / *n as f64).collect(), *n)),
            _ => Err(Error::invalid(path, "the calibration set never reached this layer (expected ≥ 1 row, found 0)")),
        }
    }
}

impl Observer for HessianObserver {
    fn observe(&mut self, site: &Site<'_>, input: &Tensor, _output: &Tensor) -> Result<()> {
        if !self.paths.contains(site.path) {
            return Ok(());
        }
        let x = rows(input)?;
        let (n, cols) = x.dims2()?;
        let xtx = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f32>()?;
        finite(site, &xtx)?;
        let e = self.sums.entry(site.path.to_string()).or_insert_with(|| (vec![0.0; cols * cols], 0));
        if e.0.len() != cols * cols {
            return Err(Error::Shape {
                name: format!("input of `{}`", site.path),
                expected: vec![(e.0.len() as f64).sqrt() as usize],
                found: vec![cols],
            });
        }
        e.0.iter_mut().zip(&xtx).for_each(|(a, b)| *a += f64::from(*b));
        e.1 += n;
        Ok(())
    }
}

/// Accumulates, per layer, `Σ x_j²` over every input row for each input feature `j` (for a
/// convolution, each input channel over every position), so `‖X_j‖₂` is its square root,
/// and the row count.
#[derive(Debug, Default)]
pub struct InputNormObserver {
    paths: BTreeSet<String>,
    /// `path → (Σ x_j² per feature, rows seen)`.
    pub sums: BTreeMap<String, (Vec<f64>, usize)>,
}

impl InputNormObserver {
    /// Watches the linear layers at `paths`.
    pub fn new(paths: &[String]) -> Self {
        Self { paths: paths.iter().cloned().collect(), sums: BTreeMap::new() }
    }

    /// `‖X_j‖₂` per input feature of `path`, or an error when the calibration set never
    /// reached it.
    pub fn norms(&self, path: &str) -> Result<Vec<f64>> {
        match self.sums.get(path) {
            Some((s, n)) if *n > 0 => Ok(s.iter().map(|v| v.sqrt()).collect()),
            _ => Err(Error::invalid(path, "the calibration set never reached this layer (expected ≥ 1 row, found 0)")),
        }
    }
}

impl Observer for InputNormObserver {
    fn observe(&mut self, site: &Site<'_>, input: &Tensor, _output: &Tensor) -> Result<()> {
        if !self.paths.contains(site.path) {
            return Ok(());
        }
        // A convolution's features are its input channels (summed over batch and positions).
        let (n, sq) = if site.kind == crate::LayerKind::Conv2d && input.rank() == 4 {
            let x = input.to_dtype(DType::F32)?;
            (x.dim(0)?, x.sqr()?.sum(3)?.sum(2)?.sum(0)?.to_vec1::<f32>()?)
        } else {
            let x = rows(input)?;
            (x.dim(0)?, x.sqr()?.sum(0)?.to_vec1::<f32>()?)
        };
        let cols = sq.len();
        finite(site, &sq)?;
        let e = self.sums.entry(site.path.to_string()).or_insert_with(|| (vec![0.0; cols], 0));
        if e.0.len() != cols {
            return Err(Error::Shape {
                name: format!("input of `{}`", site.path),
                expected: vec![e.0.len()],
                found: vec![cols],
            });
        }
        e.0.iter_mut().zip(&sq).for_each(|(a, b)| *a += f64::from(*b));
        e.1 += n;
        Ok(())
    }
}

/// `Σ a[k]·b[k]` over the shorter slice with four interleaved partial sums: independent
/// chains instead of one, so the factorisations below are not bound by the latency of a
/// single running sum. The order of the additions is fixed, so the result is too.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    let mut s = [0.0f64; 4];
    for (x, y) in ca.zip(cb) {
        for i in 0..4 {
            s[i] += x[i] * y[i];
        }
    }
    ((s[0] + s[1]) + (s[2] + s[3])) + tail
}

/// In-place Cholesky factorisation of a symmetric positive-definite `n×n` matrix into its
/// lower factor `L` (upper triangle zeroed). Returns `false` when a pivot is not positive.
///
/// Every sum runs along rows (contiguous memory), so the work is arithmetic rather than
/// cache misses (the column walks this replaced took a third of the MiniLM GPTQ test, whose
/// FFN output layers have 1536-wide Hessians).
///
/// # Panics
/// If `a` does not hold `n·n` values (a caller's bug, not bad data).
pub fn cholesky(a: &mut [f64], n: usize) -> bool {
    assert!(a.len() == n * n, "cholesky: {} values for a {n}×{n} matrix", a.len());
    for j in 0..n {
        let row_j = j * n;
        let d = a[row_j + j] - dot(&a[row_j..row_j + j], &a[row_j..row_j + j]);
        if d <= 0.0 || !d.is_finite() {
            return false;
        }
        let d = d.sqrt();
        a[row_j + j] = d;
        for i in j + 1..n {
            let row_i = i * n;
            let s = a[row_i + j] - dot(&a[row_i..row_i + j], &a[row_j..row_j + j]);
            a[row_i + j] = s / d;
        }
        a[row_j + j + 1..row_j + n].fill(0.0);
    }
    true
}

/// The upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = UᵀU`), as GPTQ and SparseGPT use it: row
/// `i` holds the coefficients that spread column `i`'s error over the later columns. `None`
/// when `H` is not positive definite.
pub fn inverse_upper_factor(h: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = h.to_vec();
    if !cholesky(&mut l, n) {
        return None;
    }
    // M = L⁻ᵀ (upper triangular), by forward substitution stored transposed so that row c of
    // M (column c of L⁻¹) is built left to right and every sum reads two rows.
    let mut m = vec![0.0; n * n];
    for c in 0..n {
        let row_c = c * n;
        for i in c..n {
            let delta = if i == c { 1.0 } else { 0.0 };
            let s = delta - dot(&l[i * n + c..i * n + i], &m[row_c + c..row_c + i]);
            m[row_c + i] = s / l[i * n + i];
        }
    }
    // inv(H) = L⁻ᵀ L⁻¹ = M Mᵀ: inv[i][j] = Σ_{k ≥ j} M[i][k]·M[j][k] for j ≥ i.
    let mut inv = vec![0.0; n * n];
    for i in 0..n {
        for j in i..n {
            let s = dot(&m[i * n + j..(i + 1) * n], &m[j * n + j..(j + 1) * n]);
            inv[i * n + j] = s;
            inv[j * n + i] = s;
        }
    }
    // Upper factor: inv = UᵀU with U = chol(inv)ᵀ.
    if !cholesky(&mut inv, n) {
        return None;
    }
    let mut u = vec![0.0; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = inv[j * n + i];
        }
    }
    Some(u)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::inverse_upper_factor;

    proptest! {
        /// `UᵀU·H = I` with `U` upper triangular, for sizes on both sides of the dot product's
        /// four-wide chunks (1–37), on `H = AAᵀ + I` from random `A`.
        #[test]
        fn the_inverse_upper_factor_inverts_spd_matrices(n in 1usize..38, seed in any::<u64>()) {
            let mut state = seed | 1;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            };
            let a: Vec<f64> = (0..n * n).map(|_| next()).collect();
            let mut h = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] = (0..n).map(|k| a[i * n + k] * a[j * n + k]).sum::<f64>() + f64::from(u8::from(i == j));
                }
            }
            let u = inverse_upper_factor(&h, n).expect("AAᵀ + I is positive definite");
            for i in 0..n {
                for j in 0..i {
                    prop_assert_eq!(u[i * n + j], 0.0, "U[{}][{}] below the diagonal", i, j);
                }
            }
            for i in 0..n {
                for j in 0..n {
                    let v: f64 = (0..n)
                        .map(|k| (0..n).map(|t| u[t * n + i] * u[t * n + k]).sum::<f64>() * h[k * n + j])
                        .sum();
                    let want = f64::from(u8::from(i == j));
                    prop_assert!((v - want).abs() < 1e-9, "(UᵀU·H)[{}][{}] = {} at n = {}", i, j, v, n);
                }
            }
        }
    }
}
