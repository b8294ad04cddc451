//! Distillation losses (Hinton et al., 2015; FitNets; attention transfer; sentence-embedding
//! distillation), as differentiable candle expressions over batches:
//!
//! - [`soft_target`]: `T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`, the batch mean — the T² factor
//!   keeps the soft gradients' scale independent of `T`.
//! - [`hard_label`]: cross-entropy of the student's logits against the true labels.
//! - [`combined`]: `α·soft + (1 − α)·hard`.
//! - [`hint`]: FitNets' feature loss, the mean squared error between a (projected) student
//!   feature map and the teacher's.
//! - [`attention_transfer`]: Zagoruyko & Komodakis' loss between the L2-normalised spatial
//!   attention maps `Σ_c F_c²` of two convolutional feature maps.
//! - [`embedding_cosine`] and [`embedding_mse`]: for encoders, `1 − mean cosine` and the mean
//!   squared error between student and teacher embeddings.
//!
//! Every function checks its shapes and options and returns a typed error naming them.

use candle_core::{D, DType, Tensor};
use pare_core_tensor::{Error, Result};

/// Checks a temperature: finite and > 0.
pub fn check_temperature(t: f64) -> Result<()> {
    if t.is_finite() && t > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid("--temperature", format!("must be finite and > 0, found {t}")))
    }
}

/// Checks the soft-loss weight: in `[0, 1]`.
pub fn check_alpha(a: f64) -> Result<()> {
    if (0.0..=1.0).contains(&a) {
        Ok(())
    } else {
        Err(Error::invalid("--alpha", format!("must be in [0, 1], found {a}")))
    }
}

fn same_shape(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() == b.dims() {
        Ok(())
    } else {
        Err(Error::Shape {
            name: format!("{what}: student vs teacher"),
            expected: b.dims().to_vec(),
            found: a.dims().to_vec(),
        })
    }
}

/// `T²·KL(softmax(teacher/T) ‖ softmax(student/T))` averaged over the batch (rows of `[n,
/// classes]` logits). The teacher's side carries no gradient.
pub fn soft_target(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    check_temperature(temperature)?;
    same_shape("logits", student, teacher)?;
    let n = student.dim(0)? as f64;
    let t = teacher.detach().to_dtype(DType::F32)?;
    let log_p = candle_nn::ops::log_softmax(&(t / temperature)?, D::Minus1)?;
    let log_q = candle_nn::ops::log_softmax(&(student.to_dtype(DType::F32)? / temperature)?, D::Minus1)?;
    let kl = (log_p.exp()? * (log_p - log_q)?)?.sum_all()?;
    Ok((kl * (temperature * temperature / n))?)
}

/// Cross-entropy of `[n, classes]` logits against `[n]` u32 labels, the batch mean.
pub fn hard_label(student: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let n = student.dim(0)?;
    if labels.dims() != [n] {
        return Err(Error::Shape { name: "labels".into(), expected: vec![n], found: labels.dims().to_vec() });
    }
    Ok(candle_nn::loss::cross_entropy(&student.to_dtype(DType::F32)?, labels)?)
}

/// Hinton's combination: `α·soft_target + (1 − α)·hard_label`.
pub fn combined(student: &Tensor, teacher: &Tensor, labels: &Tensor, temperature: f64, alpha: f64) -> Result<Tensor> {
    check_alpha(alpha)?;
    let soft = soft_target(student, teacher, temperature)?;
    let hard = hard_label(student, labels)?;
    Ok(((soft * alpha)? + (hard * (1.0 - alpha))?)?)
}

/// FitNets' hint loss: the mean squared error between the student's feature (after the
/// learned `projection`, when widths differ) and the teacher's (no gradient).
pub fn hint(student: &Tensor, teacher: &Tensor, projection: Option<&candle_nn::Linear>) -> Result<Tensor> {
    let s = match projection {
        Some(p) => candle_core::Module::forward(p, student)?,
        None => student.clone(),
    };
    same_shape("hint features", &s, teacher)?;
    Ok((s.to_dtype(DType::F32)? - teacher.detach().to_dtype(DType::F32)?)?.sqr()?.mean_all()?)
}

/// The L2-normalised spatial attention map `Σ_c F_c²` of `[n, c, h, w]` features, `[n, h·w]`.
fn attention_map(f: &Tensor) -> Result<Tensor> {
    if f.rank() != 4 {
        return Err(Error::Shape {
            name: "attention-transfer features".into(),
            expected: vec![0, 0, 0, 0],
            found: f.dims().to_vec(),
        });
    }
    let a = f.to_dtype(DType::F32)?.sqr()?.sum(1)?.flatten_from(1)?;
    let norm = (a.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-12)?;
    Ok(a.broadcast_div(&norm)?)
}

/// Attention transfer between `[n, c, h, w]` feature maps of equal spatial size (channel counts
/// may differ): the mean over the batch of `‖a_s − a_t‖²` of the normalised attention maps.
pub fn attention_transfer(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let (s, t) = (attention_map(student)?, attention_map(&teacher.detach())?);
    same_shape("attention maps", &s, &t)?;
    let n = s.dim(0)? as f64;
    Ok(((s - t)?.sqr()?.sum_all()? / n)?)
}

/// `1 − mean cosine` between `[n, d]` student and teacher embeddings.
pub fn embedding_cosine(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    same_shape("embeddings", student, teacher)?;
    let (s, t) = (student.to_dtype(DType::F32)?, teacher.detach().to_dtype(DType::F32)?);
    let dot = (&s * &t)?.sum(1)?;
    let norms = ((s.sqr()?.sum(1)?.sqrt()? * t.sqr()?.sum(1)?.sqrt()?)? + 1e-12)?;
    let cos = (dot / norms)?.mean_all()?;
    Ok((cos.neg()? + 1.0)?)
}

/// Mean squared error between `[n, d]` student and teacher embeddings.
pub fn embedding_mse(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    same_shape("embeddings", student, teacher)?;
    Ok((student.to_dtype(DType::F32)? - teacher.detach().to_dtype(DType::F32)?)?.sqr()?.mean_all()?)
}

#[cfg(test)]
mod tests;
