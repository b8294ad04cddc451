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

/// In-place Cholesky factorisation of a symmetric positive-definite `n×n` matrix into its
/// lower factor `L` (upper triangle zeroed). Returns `false` when a pivot is not positive.
pub fn cholesky(a: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d <= 0.0 || !d.is_finite() {
            return false;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
        for k in j + 1..n {
            a[j * n + k] = 0.0;
        }
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
    // L⁻¹ by forward substitution, column by column.
    let mut linv = vec![0.0; n * n];
    for c in 0..n {
        for i in c..n {
            let mut s = if i == c { 1.0 } else { 0.0 };
            for k in c..i {
                s -= l[i * n + k] * linv[k * n + c];
            }
            linv[i * n + c] = s / l[i * n + i];
        }
    }
    // inv(H) = L⁻ᵀ L⁻¹.
    let mut inv = vec![0.0; n * n];
    for i in 0..n {
        for j in i..n {
            let mut s = 0.0;
            for k in j..n {
                s += linv[k * n + i] * linv[k * n + j];
            }
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
