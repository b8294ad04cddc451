//! Exact selection of what to prune from scores (lower score = pruned first). Every selector
//! prunes exactly the requested count — `round(sparsity · n)` of a layer, or of all layers for
//! a global threshold — breaking ties by index, so results are deterministic and the achieved
//! sparsity is the requested one.

use pare_core_tensor::{Error, Result};

/// How many of `n` weights a sparsity prunes: `round(sparsity · n)`.
pub fn count(sparsity: f64, n: usize) -> usize {
    ((sparsity * n as f64).round() as usize).min(n)
}

/// Checks a requested sparsity: finite and in `[0, 1)`.
pub fn check_sparsity(what: &str, s: f64) -> Result<()> {
    if s.is_finite() && (0.0..1.0).contains(&s) {
        Ok(())
    } else {
        Err(Error::invalid(what, format!("sparsity must be in [0, 1), found {s}")))
    }
}

/// Indices of the `k` lowest `scores` (ties: lower index first), ascending by index.
pub fn lowest(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    let k = k.min(scores.len());
    if k == 0 {
        return Vec::new();
    }
    let key = |&i: &usize| (scores[i], i);
    order.select_nth_unstable_by(k - 1, |a, b| key(a).partial_cmp(&key(b)).expect("scores are not NaN"));
    let mut out = order[..k].to_vec();
    out.sort_unstable();
    out
}

/// A keep-mask (`true` = kept) over `scores` that prunes exactly `k` of them.
pub fn mask_lowest(scores: &[f32], k: usize) -> Vec<bool> {
    let mut keep = vec![true; scores.len()];
    for i in lowest(scores, k) {
        keep[i] = false;
    }
    keep
}

/// Splits `total` over `parts` groups of sizes `sizes` in proportion, by cumulative rounding
/// (`round(total·end/n) − round(total·start/n)`), so the counts sum to `total` exactly and no
/// group gets more than its size.
pub fn spread(total: usize, sizes: &[usize]) -> Vec<usize> {
    let n: usize = sizes.iter().sum();
    let at = |e: usize| if n == 0 { 0 } else { ((total as f64) * e as f64 / n as f64).round() as usize };
    let mut start = 0;
    sizes
        .iter()
        .map(|&s| {
            let c = at(start + s) - at(start);
            start += s;
            c.min(s)
        })
        .collect()
}

/// A keep-mask pruning exactly `k` of a `[rows, cols]` matrix with one comparison group per
/// row (Wanda's per-output grouping): the rows' counts are `k` spread evenly (they differ by
/// at most one), each row pruning its lowest scores.
pub fn mask_per_row(scores: &[f32], rows: usize, cols: usize, k: usize) -> Vec<bool> {
    assert!(scores.len() == rows * cols);
    let counts = spread(k, &vec![cols; rows]);
    let mut keep = Vec::with_capacity(rows * cols);
    for (r, &c) in counts.iter().enumerate() {
        keep.extend(mask_lowest(&scores[r * cols..(r + 1) * cols], c));
    }
    keep
}

/// An N:M keep-mask over a `[rows, cols]` matrix: in every group of `m` consecutive inputs of a
/// row, the `n` highest scores are kept (ties: lower index kept).
pub fn mask_nm(scores: &[f32], rows: usize, cols: usize, n: usize, m: usize) -> Vec<bool> {
    assert!(scores.len() == rows * cols && cols.is_multiple_of(m) && n < m);
    let mut keep = vec![true; rows * cols];
    for g in (0..rows * cols).step_by(m) {
        for i in lowest(&scores[g..g + m], m - n) {
            keep[g + i] = false;
        }
    }
    keep
}

/// Checks an N:M pattern against a row length: `0 < n < m` and `m` divides `cols`.
pub fn check_nm(what: &str, n: usize, m: usize, cols: usize) -> Result<()> {
    if n == 0 || n >= m {
        return Err(Error::invalid(what, format!("N:M needs 0 < N < M, found {n}:{m}")));
    }
    if !cols.is_multiple_of(m) {
        return Err(Error::invalid(what, format!("rows of {cols} inputs do not divide into groups of M = {m}")));
    }
    Ok(())
}

/// Per-layer bounds on a global threshold's sparsity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// Least sparsity any layer gets.
    pub min: f64,
    /// Most sparsity any layer gets (so no layer is emptied).
    pub max: f64,
}

impl Default for Bounds {
    fn default() -> Self {
        Self { min: 0.0, max: 0.99 }
    }
}

/// Global selection: prunes exactly `round(sparsity · Σ n_l)` weights across `layers` (each a
/// slice of comparable scores), lowest first, while every layer's sparsity stays within
/// `bounds` — each layer first takes its minimum count, then the rest go to the globally
/// lowest scores whose layer has not reached its maximum. Returns one keep-mask per layer.
pub fn mask_global(layers: &[&[f32]], sparsity: f64, bounds: Bounds) -> Result<Vec<Vec<bool>>> {
    check_sparsity("global sparsity", sparsity)?;
    if !(0.0..=1.0).contains(&bounds.min) || !(0.0..=1.0).contains(&bounds.max) || bounds.min > bounds.max {
        return Err(Error::invalid(
            "global sparsity bounds",
            format!("need 0 ≤ min ≤ max ≤ 1, found min {} and max {}", bounds.min, bounds.max),
        ));
    }
    let total: usize = layers.iter().map(|l| l.len()).sum();
    let k = count(sparsity, total);
    let hi: Vec<usize> = layers.iter().map(|l| ((bounds.max * l.len() as f64).floor() as usize).min(l.len())).collect();
    // A layer too small for both bounds (one weight, min 0.2, max 0.9) takes the maximum.
    let lo: Vec<usize> =
        layers.iter().zip(&hi).map(|(l, &h)| ((bounds.min * l.len() as f64).ceil() as usize).min(h)).collect();
    let (need, room): (usize, usize) = (lo.iter().sum(), hi.iter().sum());
    if k < need || k > room {
        return Err(Error::invalid(
            "global sparsity",
            format!(
                "{sparsity} of {total} weights is {k}, outside what the per-layer bounds allow ({need}..={room} with min {} and max {})",
                bounds.min, bounds.max
            ),
        ));
    }
    let mut keep: Vec<Vec<bool>> = layers.iter().map(|l| vec![true; l.len()]).collect();
    let mut taken = lo.clone();
    for (l, scores) in layers.iter().enumerate() {
        for i in lowest(scores, lo[l]) {
            keep[l][i] = false;
        }
    }
    let mut rest: Vec<(f32, usize, usize)> = Vec::new();
    for (l, scores) in layers.iter().enumerate() {
        rest.extend(scores.iter().enumerate().filter(|(i, _)| keep[l][*i]).map(|(i, &s)| (s, l, i)));
    }
    rest.sort_by(|a, b| a.partial_cmp(b).expect("scores are not NaN"));
    let mut left = k - need;
    for (_, l, i) in rest {
        if left == 0 {
            break;
        }
        if taken[l] < hi[l] {
            keep[l][i] = false;
            taken[l] += 1;
            left -= 1;
        }
    }
    Ok(keep)
}

#[cfg(test)]
mod tests;
