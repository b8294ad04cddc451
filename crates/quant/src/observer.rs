//! Observers: from the activations a layer sees over calibration batches, choose the range
//! `[lo, hi]` its static quantization covers.
//!
//! - [`ObserverKind::MinMax`]: the extremes seen (torch.ao `MinMaxObserver`);
//! - [`ObserverKind::MovingAverage`]: per-batch extremes averaged with momentum c,
//!   `r ← r + c(r_batch − r)` (torch.ao `MovingAverageMinMaxObserver`, c = 0.01);
//! - [`ObserverKind::Percentile`]: the p-th percentile of |x| (symmetric) or the (100 − p)-th
//!   and p-th of x (asymmetric);
//! - [`ObserverKind::Mse`]: the clipping range that minimises the expected squared
//!   quantization error over the histogram;
//! - [`ObserverKind::Entropy`]: TensorRT's calibration — the |x| threshold whose quantized
//!   distribution has the least KL divergence from the observed one.
//!
//! The three histogram methods need the range before binning, so calibration runs twice: a
//! first pass for min/max, a second filling 2048-bin histograms over that range.

use std::fmt;

use crate::error::option;
use crate::{Error, Result};

/// Histogram bins of the histogram-based observers (TensorRT uses 2048).
pub const BINS: usize = 2048;

/// How a static activation range is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ObserverKind {
    /// The minimum and maximum seen.
    MinMax,
    /// Exponential moving average of per-batch minima and maxima.
    MovingAverage {
        /// Weight of each new batch, in (0, 1].
        momentum: f32,
    },
    /// A percentile of the observed values.
    Percentile {
        /// The percentile, in (50, 100].
        pct: f64,
    },
    /// Minimum expected squared error.
    Mse,
    /// Minimum KL divergence (TensorRT entropy calibration).
    Entropy,
}

impl ObserverKind {
    /// Parses `minmax`, `moving-average[:C]`, `percentile[:P]` (99.99 by default), `mse`,
    /// `entropy` (or `kl`).
    pub fn parse(s: &str) -> Result<Self> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let num = |default: f64| -> Result<f64> {
            arg.map_or(Ok(default), |a| {
                a.parse::<f64>()
                    .map_err(|_| option("--observer", format!("expected a number after `{name}:`, found `{a}`")))
            })
        };
        let plain = |k: ObserverKind| match arg {
            None => Ok(k),
            Some(a) => Err(option("--observer", format!("`{name}` takes no argument, found `{name}:{a}`"))),
        };
        let kind = match name {
            "minmax" => plain(ObserverKind::MinMax)?,
            "moving-average" => ObserverKind::MovingAverage { momentum: num(0.01)? as f32 },
            "percentile" => ObserverKind::Percentile { pct: num(99.99)? },
            "mse" => plain(ObserverKind::Mse)?,
            "entropy" | "kl" => plain(ObserverKind::Entropy)?,
            other => {
                return Err(option(
                    "--observer",
                    format!("expected minmax, moving-average[:C], percentile[:P], mse or entropy, found `{other}`"),
                ));
            }
        };
        match kind {
            ObserverKind::MovingAverage { momentum } if !(momentum > 0.0 && momentum <= 1.0) => {
                Err(option("--observer", format!("momentum must be in (0, 1], found {momentum}")))
            }
            ObserverKind::Percentile { pct } if !(pct > 50.0 && pct <= 100.0) => {
                Err(option("--observer", format!("percentile must be in (50, 100], found {pct}")))
            }
            k => Ok(k),
        }
    }

    /// Whether the observer needs the second, histogram pass.
    pub fn needs_histogram(&self) -> bool {
        matches!(self, ObserverKind::Percentile { .. } | ObserverKind::Mse | ObserverKind::Entropy)
    }
}

impl fmt::Display for ObserverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObserverKind::MinMax => write!(f, "minmax"),
            ObserverKind::MovingAverage { momentum } => write!(f, "moving-average:{momentum}"),
            ObserverKind::Percentile { pct } => write!(f, "percentile:{pct}"),
            ObserverKind::Mse => write!(f, "mse"),
            ObserverKind::Entropy => write!(f, "entropy"),
        }
    }
}

/// What one layer's inputs looked like over the calibration set.
#[derive(Debug, Clone)]
pub struct ActStats {
    /// Smallest value seen.
    pub min: f32,
    /// Largest value seen.
    pub max: f32,
    /// Moving-average minimum.
    pub ema_min: f32,
    /// Moving-average maximum.
    pub ema_max: f32,
    /// Batches seen in the first pass.
    pub batches: usize,
    /// Values seen in the first pass.
    pub count: u64,
    /// Histogram of x over `[min, max]` (second pass).
    pub hist: Vec<u64>,
    /// Histogram of |x| over `[0, max(|min|, |max|)]` (second pass).
    pub abs_hist: Vec<u64>,
}

impl ActStats {
    /// No observations yet.
    pub fn new() -> Self {
        Self {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            ema_min: 0.0,
            ema_max: 0.0,
            batches: 0,
            count: 0,
            hist: Vec::new(),
            abs_hist: Vec::new(),
        }
    }

    /// First pass: one batch of (finite) values.
    pub fn observe_range(&mut self, x: &[f32], momentum: f32) {
        if x.is_empty() {
            return;
        }
        let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if self.batches == 0 {
            (self.ema_min, self.ema_max) = (lo, hi);
        } else {
            self.ema_min += momentum * (lo - self.ema_min);
            self.ema_max += momentum * (hi - self.ema_max);
        }
        self.min = self.min.min(lo);
        self.max = self.max.max(hi);
        self.batches += 1;
        self.count += x.len() as u64;
    }

    /// The largest magnitude seen.
    pub fn amax(&self) -> f32 {
        self.min.abs().max(self.max.abs())
    }

    /// Second pass: adds a batch to the histograms (values outside the first pass's range,
    /// which cannot happen for the same data, land in the end bins).
    pub fn observe_histogram(&mut self, x: &[f32]) {
        if self.hist.is_empty() {
            self.hist = vec![0; BINS];
            self.abs_hist = vec![0; BINS];
        }
        let width = (self.max - self.min) / BINS as f32;
        let amax = self.amax();
        for &v in x {
            self.hist[bin_of(v - self.min, width)] += 1;
            self.abs_hist[bin_of(v.abs(), amax / BINS as f32)] += 1;
        }
    }

    /// The range `[lo, hi]` `kind` chooses for a quantizer with `levels` codes, symmetric or not.
    pub fn range(&self, kind: ObserverKind, levels: u32, symmetric: bool) -> (f32, f32) {
        let amax = self.amax();
        let sym = |t: f32| (-t, t);
        match kind {
            ObserverKind::MinMax => (self.min, self.max),
            ObserverKind::MovingAverage { .. } => (self.ema_min, self.ema_max),
            ObserverKind::Percentile { pct } => {
                if symmetric {
                    sym(percentile(&self.abs_hist, 0.0, amax, pct))
                } else {
                    (
                        percentile(&self.hist, self.min, self.max, 100.0 - pct),
                        percentile(&self.hist, self.min, self.max, pct),
                    )
                }
            }
            ObserverKind::Mse => {
                if symmetric {
                    sym(mse_threshold(&self.abs_hist, amax, levels))
                } else {
                    mse_range(&self.hist, self.min, self.max, levels)
                }
            }
            ObserverKind::Entropy => {
                let quant_bins = if symmetric { levels / 2 } else { levels };
                let t = kl_threshold(&self.abs_hist, amax, quant_bins as usize);
                if symmetric { sym(t) } else { (self.min.max(-t), self.max.min(t)) }
            }
        }
    }
}

impl Default for ActStats {
    fn default() -> Self {
        Self::new()
    }
}

fn bin_of(offset: f32, width: f32) -> usize {
    if width <= 0.0 { 0 } else { ((offset / width) as usize).min(BINS - 1) }
}

/// The value below which `pct` percent of the histogram's mass lies (linear within a bin).
pub fn percentile(hist: &[u64], lo: f32, hi: f32, pct: f64) -> f32 {
    let total: u64 = hist.iter().sum();
    if total == 0 || hist.is_empty() {
        return hi;
    }
    let width = (hi - lo) / hist.len() as f32;
    let target = total as f64 * pct / 100.0;
    let mut acc = 0f64;
    for (i, &c) in hist.iter().enumerate() {
        if acc + c as f64 >= target {
            let frac = if c == 0 { 0.0 } else { ((target - acc) / c as f64) as f32 };
            return lo + width * (i as f32 + frac);
        }
        acc += c as f64;
    }
    hi
}

/// Expected squared error of quantizing the histogram's bin centres (over `[lo, hi]`) to
/// `levels` uniform codes covering `[a, b]`.
fn expected_error(hist: &[u64], lo: f32, hi: f32, a: f32, b: f32, levels: u32) -> f64 {
    let width = (hi - lo) / hist.len() as f32;
    let step = (b - a) / (levels - 1) as f32;
    if step <= 0.0 {
        return f64::INFINITY;
    }
    hist.iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, &c)| {
            let x = lo + width * (i as f32 + 0.5);
            let q = ((x.clamp(a, b) - a) / step).round_ties_even();
            let e = f64::from(x - (a + q * step));
            e * e * c as f64
        })
        .sum()
}

/// The symmetric threshold T (codes over `[-T, T]`) minimising expected error on an |x| histogram.
pub fn mse_threshold(abs_hist: &[u64], amax: f32, levels: u32) -> f32 {
    if amax <= 0.0 {
        return 0.0;
    }
    (1..=200)
        .map(|k| amax * k as f32 / 200.0)
        .map(|t| {
            // |x| against a symmetric grid: the error of x and −x is the same.
            (expected_error(abs_hist, 0.0, amax, -t, t, levels), t)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map_or(amax, |(_, t)| t)
}

/// The asymmetric range minimising expected error on a histogram over `[lo, hi]`: both ends
/// shrink toward zero by a common factor.
pub fn mse_range(hist: &[u64], lo: f32, hi: f32, levels: u32) -> (f32, f32) {
    let (a0, b0) = (lo.min(0.0), hi.max(0.0));
    if b0 - a0 <= 0.0 {
        return (lo, hi);
    }
    let mut best = (f64::INFINITY, a0, b0);
    for ka in (1..=40).rev() {
        for kb in (1..=40).rev() {
            let (a, b) = (a0 * ka as f32 / 40.0, b0 * kb as f32 / 40.0);
            let e = expected_error(hist, lo, hi, a, b, levels);
            if e < best.0 {
                best = (e, a, b);
            }
        }
    }
    (best.1, best.2)
}

/// TensorRT's entropy calibration on an |x| histogram over `[0, amax]`: for each candidate
/// threshold bin `i` ≥ `quant_bins`, the reference distribution P is the first `i` bins with
/// the tail folded into the last; Q merges those bins into `quant_bins` and spreads each back
/// over its non-empty bins; the threshold minimising KL(P‖Q) wins.
pub fn kl_threshold(abs_hist: &[u64], amax: f32, quant_bins: usize) -> f32 {
    let n = abs_hist.len();
    if amax <= 0.0 || n == 0 || quant_bins == 0 || quant_bins >= n {
        return amax;
    }
    let width = amax / n as f32;
    // suffix[i] = mass in bins i.. (the outliers a threshold at bin i folds in).
    let mut suffix = vec![0u64; n + 1];
    for i in (0..n).rev() {
        suffix[i] = suffix[i + 1] + abs_hist[i];
    }
    let mut best = (f64::INFINITY, n);
    let mut q = vec![0f64; n];
    for i in quant_bins..=n {
        let sliced = &abs_hist[..i];
        let mut p: Vec<f64> = sliced.iter().map(|&c| c as f64).collect();
        p[i - 1] += suffix[i] as f64;
        let merged = i as f64 / quant_bins as f64;
        q[..i].iter_mut().for_each(|v| *v = 0.0);
        for j in 0..quant_bins {
            let start = (j as f64 * merged).floor() as usize;
            let end = if j + 1 == quant_bins { i } else { ((j + 1) as f64 * merged).floor() as usize };
            let total: u64 = sliced[start..end].iter().sum();
            let nonzero = sliced[start..end].iter().filter(|&&c| c > 0).count();
            if nonzero > 0 {
                let share = total as f64 / nonzero as f64;
                for k in start..end {
                    if sliced[k] > 0 {
                        q[k] = share;
                    }
                }
            }
        }
        let kl = kl_divergence(&p, &q[..i]);
        if kl < best.0 {
            best = (kl, i);
        }
    }
    width * best.1 as f32
}

/// KL(P‖Q) of two unnormalised histograms; empty bins of Q where P has mass are smoothed.
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if sp == 0.0 || sq == 0.0 {
        return f64::INFINITY;
    }
    p.iter()
        .zip(q)
        .filter(|(pi, _)| **pi > 0.0)
        .map(|(pi, qi)| {
            let (pn, qn) = (pi / sp, (qi / sq).max(1e-12));
            pn * (pn / qn).ln()
        })
        .sum()
}

/// Refuses an observation set that saw nothing for `layer`.
pub(crate) fn require_seen(layer: &str, stats: Option<&ActStats>) -> Result<()> {
    match stats {
        Some(s) if s.count > 0 => Ok(()),
        _ => Err(Error::Option {
            tensor: layer.to_string(),
            detail: "the calibration set never reached this layer (expected ≥ 1 batch, found 0)".into(),
        }),
    }
}

#[cfg(test)]
mod tests;
