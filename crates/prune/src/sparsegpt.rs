//! SparseGPT (Frantar & Alistarh, 2023): one-shot pruning that compensates each pruned
//! weight on the weights not yet visited, from the layer's calibration Hessian `H = 2XᵀX/n`.
//! Columns are visited in blocks of [`BLOCK`]; within a block, the weights to prune are those
//! with the least `w²/[H⁻¹]_jj²` (a fixed mask per block — "adaptive mask selection" — or, for
//! N:M, the lowest `M − N` of each group of `M` as the group is reached); each visited column's
//! error `(w − q)/[H⁻¹]_jj` is spread over the later columns with the rows of the upper Cholesky
//! factor of `H⁻¹`. The per-block counts are spread so the layer prunes exactly the requested
//! number.

use pare_core_tensor::calib::inverse_upper_factor;
use pare_core_tensor::{Error, Result};

use crate::select::{count, lowest, spread};

/// Columns per block of the reference implementation.
pub const BLOCK: usize = 128;

/// What SparseGPT prunes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pattern {
    /// This fraction of the layer's weights, anywhere.
    Unstructured(f64),
    /// `n` kept of every `m` consecutive inputs of each row.
    Nm {
        /// Kept per group.
        n: usize,
        /// Group size.
        m: usize,
    },
}

/// Prunes `w` (`[rows, cols]` row-major, updated in place) with Hessian `h` (`cols × cols`,
/// from [`pare_core_tensor::calib::HessianObserver`]) and dampening `damp` (a fraction of
/// the mean diagonal, 0.01 in the paper). Returns the keep-mask. `name` labels errors.
pub fn prune(
    name: &str,
    w: &mut [f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    pattern: Pattern,
    damp: f64,
) -> Result<Vec<bool>> {
    assert!(w.len() == rows * cols && h.len() == cols * cols);
    if !(damp.is_finite() && damp > 0.0) {
        return Err(Error::invalid(name, format!("dampening must be finite and > 0, found {damp}")));
    }
    // Inputs that never fired carry no information: their weights go, their diagonal is 1.
    let mut h = h.to_vec();
    let mut keep = vec![true; rows * cols];
    for j in 0..cols {
        if h[j * cols + j] == 0.0 {
            h[j * cols + j] = 1.0;
            for r in 0..rows {
                w[r * cols + j] = 0.0;
            }
        }
    }
    let mean = (0..cols).map(|j| h[j * cols + j]).sum::<f64>() / cols.max(1) as f64;
    for j in 0..cols {
        h[j * cols + j] += damp * mean;
    }
    let u = inverse_upper_factor(&h, cols).ok_or_else(|| {
        Error::invalid(name, "the dampened calibration Hessian is not positive definite (raise the dampening)")
    })?;
    let mut wd: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
    // N:M groups must not straddle blocks: blocks are whole groups.
    let bs = match pattern {
        Pattern::Nm { m, .. } => (BLOCK / m).max(1) * m,
        Pattern::Unstructured(_) => BLOCK,
    };
    let blocks: Vec<(usize, usize)> = (0..cols).step_by(bs).map(|a| (a, (a + bs).min(cols))).collect();
    let per_block = match pattern {
        Pattern::Unstructured(s) => {
            let sizes: Vec<usize> = blocks.iter().map(|(a, b)| (b - a) * rows).collect();
            spread(count(s, rows * cols), &sizes)
        }
        Pattern::Nm { .. } => vec![0; blocks.len()],
    };
    let score = |wd: &[f64], r: usize, j: usize| -> f32 {
        let d = u[j * cols + j];
        (wd[r * cols + j] * wd[r * cols + j] / (d * d)) as f32
    };
    for (&(a, b), &k) in blocks.iter().zip(&per_block) {
        if let Pattern::Unstructured(_) = pattern {
            // The block's mask, fixed before its columns are visited.
            let scores: Vec<f32> =
                (0..rows).flat_map(|r| (a..b).map(move |j| (r, j))).map(|(r, j)| score(&wd, r, j)).collect();
            for i in lowest(&scores, k) {
                keep[(i / (b - a)) * cols + a + i % (b - a)] = false;
            }
        }
        let mut err = vec![0f64; rows * (b - a)];
        for j in a..b {
            if let Pattern::Nm { n, m } = pattern
                && (j - a).is_multiple_of(m)
            {
                for r in 0..rows {
                    let scores: Vec<f32> = (j..j + m).map(|c| score(&wd, r, c)).collect();
                    for i in lowest(&scores, m - n) {
                        keep[r * cols + j + i] = false;
                    }
                }
            }
            let d = u[j * cols + j];
            for r in 0..rows {
                let x = wd[r * cols + j];
                let q = if keep[r * cols + j] { x } else { 0.0 };
                let e = (x - q) / d;
                err[r * (b - a) + (j - a)] = e;
                wd[r * cols + j] = q;
                if e != 0.0 {
                    // The rest of the block now; later blocks in one pass after it.
                    for c in j + 1..b {
                        wd[r * cols + c] -= e * u[j * cols + c];
                    }
                }
            }
        }
        for r in 0..rows {
            for (i, j) in (a..b).enumerate() {
                let e = err[r * (b - a) + i];
                if e != 0.0 {
                    for c in b..cols {
                        wd[r * cols + c] -= e * u[j * cols + c];
                    }
                }
            }
        }
    }
    for (o, (v, k)) in w.iter_mut().zip(wd.iter().zip(&keep)) {
        *o = if *k { *v as f32 } else { 0.0 };
    }
    Ok(keep)
}

#[cfg(test)]
mod tests;
