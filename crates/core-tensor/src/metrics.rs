//! Metrics shared by every report: accuracy, cosine similarity, KL divergence, top-k
//! agreement, and cost measures (bytes, parameters, MACs per forward).

use std::collections::BTreeMap;

use candle_core::{D, DType, Tensor};

use crate::hooks::{LayerKind, Observer, Site};
use crate::{Error, Result};

/// Fraction of rows of `logits` `[n, classes]` whose arg-max equals `labels` `[n]`.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<f64> {
    let n = labels.dims1()?;
    if n == 0 {
        return Err(Error::Data { name: "accuracy".into(), detail: "no examples".into() });
    }
    let pred = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
    let hits = pred.eq(&labels.to_dtype(DType::U32)?)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(f64::from(hits) / n as f64)
}

/// Cosine similarity of each pair of rows of `a` and `b` (both `[n, d]`).
pub fn cosine_rows(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    if a.dims() != b.dims() {
        return Err(Error::Shape {
            name: "cosine operand".into(),
            expected: a.dims().to_vec(),
            found: b.dims().to_vec(),
        });
    }
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let dot = (&a * &b)?.sum(D::Minus1)?;
    let na = a.sqr()?.sum(D::Minus1)?.sqrt()?;
    let nb = b.sqr()?.sum(D::Minus1)?.sqrt()?;
    let denom = (na * nb)?.clamp(1e-12f32, f32::MAX)?;
    Ok((dot / denom)?.to_vec1::<f32>()?)
}

/// Mean of [`cosine_rows`].
pub fn mean_cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    let c = cosine_rows(a, b)?;
    Ok(c.iter().map(|v| f64::from(*v)).sum::<f64>() / c.len().max(1) as f64)
}

/// Mean over rows of KL(P ‖ Q), with P = softmax(`p_logits`) the reference and
/// Q = softmax(`q_logits`) the candidate, in nats.
pub fn kl_divergence(p_logits: &Tensor, q_logits: &Tensor) -> Result<f64> {
    let lp = candle_nn::ops::log_softmax(&p_logits.to_dtype(DType::F32)?, D::Minus1)?;
    let lq = candle_nn::ops::log_softmax(&q_logits.to_dtype(DType::F32)?, D::Minus1)?;
    let kl = (lp.exp()? * (lp - lq)?)?.sum(D::Minus1)?.mean_all()?;
    Ok(f64::from(kl.to_scalar::<f32>()?))
}

/// Fraction of rows where the candidate's top-1 class is among the reference's top `k`.
pub fn top_k_agreement(reference: &Tensor, candidate: &Tensor, k: usize) -> Result<f64> {
    let r = reference.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let c = candidate.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if r.is_empty() || r.len() != c.len() {
        return Err(Error::Shape { name: "top-k candidate".into(), expected: vec![r.len()], found: vec![c.len()] });
    }
    let hits = r
        .iter()
        .zip(&c)
        .filter(|(row, pick)| {
            let v = row[**pick as usize];
            // Rank = how many classes beat the pick (ties resolved in the pick's favour).
            row.iter().filter(|x| **x > v).count() < k
        })
        .count();
    Ok(hits as f64 / r.len() as f64)
}

/// Top-1 retrieval agreement of two embedding sets of the same `n` items (`[n, d]`, rows
/// L2-normalised): the fraction of items whose nearest other item (by cosine) is the same
/// under `candidate` as under `reference`.
pub fn retrieval_agreement(reference: &Tensor, candidate: &Tensor) -> Result<f64> {
    let nearest = |e: &Tensor| -> Result<Vec<u32>> {
        let e = e.to_dtype(DType::F32)?;
        let n = e.dim(0)?;
        let sims = e.matmul(&e.t()?)?;
        // Exclude each item itself.
        let eye = Tensor::eye(n, DType::F32, e.device())?;
        Ok((sims - (eye * 1e9)?)?.argmax(D::Minus1)?.to_vec1::<u32>()?)
    };
    if reference.dims() != candidate.dims() || reference.dim(0)? < 2 {
        return Err(Error::Shape {
            name: "retrieval candidate".into(),
            expected: reference.dims().to_vec(),
            found: candidate.dims().to_vec(),
        });
    }
    let (a, b) = (nearest(reference)?, nearest(candidate)?);
    Ok(a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64)
}

/// An observer that counts multiply-accumulates per layer during a forward pass.
#[derive(Debug, Default, Clone)]
pub struct MacCounter {
    /// MACs per layer path.
    pub per_layer: BTreeMap<String, u64>,
}

impl MacCounter {
    /// Total MACs over all layers.
    pub fn total(&self) -> u64 {
        self.per_layer.values().sum()
    }
}

impl Observer for MacCounter {
    fn observe(&mut self, site: &Site<'_>, _input: &Tensor, output: &Tensor) -> Result<()> {
        let out = output.elem_count() as u64;
        let macs = match site.kind {
            // Each output element is a dot product over the input features.
            LayerKind::Linear => out * site.weight_shape[1] as u64,
            // ... over in/groups × kh × kw.
            LayerKind::Conv2d => out * site.weight_shape[1..].iter().product::<usize>() as u64,
            LayerKind::Embedding | LayerKind::LayerNorm => 0,
        };
        *self.per_layer.entry(site.path.to_string()).or_default() += macs;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn metrics_match_hand_computed_values() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2f32, 1.0, 0.0], [0.0, 0.5, 3.0], [1.0, 2.0, 0.0]], &dev).unwrap();
        let labels = Tensor::new(&[0u32, 2, 0], &dev).unwrap();
        assert!((accuracy(&logits, &labels).unwrap() - 2.0 / 3.0).abs() < 1e-12);

        assert!(kl_divergence(&logits, &logits).unwrap().abs() < 1e-6);
        // KL([0.5, 0.5] ‖ [0.8, 0.2]) = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2) = 0.22314...
        let p = Tensor::new(&[[0f32, 0.0]], &dev).unwrap();
        let q = Tensor::new(&[[0.8f32.ln(), 0.2f32.ln()]], &dev).unwrap();
        assert!((kl_divergence(&p, &q).unwrap() - 0.223_143_55).abs() < 1e-5);

        // Candidate picks: row0 → 0 (ref top-1), row1 → 1 (ref rank 2), row2 → 2 (ref rank 3).
        let cand = Tensor::new(&[[9f32, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]], &dev).unwrap();
        assert!((top_k_agreement(&logits, &cand, 1).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert!((top_k_agreement(&logits, &cand, 2).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((top_k_agreement(&logits, &cand, 3).unwrap() - 1.0).abs() < 1e-12);

        let a = Tensor::new(&[[1f32, 0.0], [1.0, 1.0]], &dev).unwrap();
        let b = Tensor::new(&[[0f32, 2.0], [2.0, 2.0]], &dev).unwrap();
        let c = cosine_rows(&a, &b).unwrap();
        assert!(c[0].abs() < 1e-6 && (c[1] - 1.0).abs() < 1e-6);
        assert!(
            accuracy(&Tensor::zeros((0, 3), DType::F32, &dev).unwrap(), &Tensor::zeros(0, DType::U32, &dev).unwrap())
                .is_err()
        );
    }
}
