//! Distilling a sentence encoder (MiniLM) into a shallower one, DistilBERT's way: the student
//! starts from every other teacher layer ([`every_other_layer`]) and learns to reproduce the
//! teacher's sentence embeddings (cosine loss, optionally MSE), optionally with hidden-state
//! hints between tapped layers (masked to real tokens).
//!
//! The teacher's embeddings of the training and validation sentences are computed once and
//! cacheable on disk ([`crate::cache::teacher_outputs`]); the teacher runs per batch only when
//! hints need its hidden states.

use candle_core::{DType, Tensor};
use pare_core_tensor::train::TrainTask;
use pare_core_tensor::{Error, Hooks, Module, Result, metrics};
use pare_models::bert::{SentenceEncoder, mean_pool_normalize};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::losses;
use crate::taps::{FeatureMap, Taps};

/// The layers DistilBERT keeps to initialise a student of half the depth: 0, 2, 4, ... of an
/// `n`-layer teacher.
pub fn every_other_layer(n: usize) -> Vec<usize> {
    (0..n).step_by(2).collect()
}

/// Sentences split into training, validation (model selection) and test (the reported
/// figures) parts by a seeded shuffle: 70 / 15 / 15.
#[derive(Debug, Clone)]
pub struct SentenceSplit {
    /// What the student trains on.
    pub train: Vec<String>,
    /// What selects the best epoch.
    pub validation: Vec<String>,
    /// Held out: only the reported figures are computed on it.
    pub test: Vec<String>,
}

/// Splits `sentences` 70 / 15 / 15 with a ChaCha8 shuffle from `seed` (the same on every
/// machine). Fewer than 3 sentences is an error: every part needs one.
pub fn split_sentences(sentences: &[String], seed: u64) -> Result<SentenceSplit> {
    let n = sentences.len();
    if n < 3 {
        return Err(Error::Data {
            name: "sentences".into(),
            detail: format!("need at least 3 to split into train / validation / test, found {n}"),
        });
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let held = ((n as f64 * 0.15).round() as usize).max(1);
    let pick = |r: &[usize]| r.iter().map(|&i| sentences[i].clone()).collect::<Vec<_>>();
    Ok(SentenceSplit {
        test: pick(&order[..held]),
        validation: pick(&order[held..2 * held]),
        train: pick(&order[2 * held..]),
    })
}

/// Loss weights of encoder distillation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderSettings {
    /// Weight of `1 − cosine` between student and teacher sentence embeddings.
    pub cosine: f64,
    /// Weight of the MSE between the embeddings (scaled by the width, so it is comparable to
    /// the cosine term).
    pub mse: f64,
    /// Weight of the summed hidden-state hints.
    pub feature_weight: f64,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        Self { cosine: 1.0, mse: 0.0, feature_weight: 1.0 }
    }
}

impl EncoderSettings {
    /// Checks every weight: finite, ≥ 0, and not all zero.
    pub fn check(&self) -> Result<()> {
        for (name, w) in
            [("--cosine-weight", self.cosine), ("--mse-weight", self.mse), ("--feature-weight", self.feature_weight)]
        {
            if !(w.is_finite() && w >= 0.0) {
                return Err(Error::invalid(name, format!("must be finite and ≥ 0, found {w}")));
            }
        }
        if self.cosine == 0.0 && self.mse == 0.0 {
            return Err(Error::invalid("embedding loss weights", "the cosine and MSE weights cannot both be 0"));
        }
        Ok(())
    }
}

/// The encoder distillation task: the student's sentence embeddings of a training batch
/// against the teacher's cached ones; the metric is the mean cosine to the teacher on the
/// validation sentences.
pub struct EncoderDistill<'a> {
    student: &'a SentenceEncoder,
    teacher: &'a SentenceEncoder,
    train: &'a [String],
    teacher_train: Tensor,
    validation: &'a [String],
    teacher_validation: Tensor,
    features: FeatureMap,
    settings: EncoderSettings,
    batch_size: usize,
}

impl<'a> EncoderDistill<'a> {
    /// Checks everything before training: the settings, that the student's embedding width
    /// matches the teacher's, that the cached embeddings cover the sentences, that every
    /// feature-map path is a layer of its model and each pair's hidden widths agree.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        student: &'a SentenceEncoder,
        teacher: &'a SentenceEncoder,
        train: &'a [String],
        teacher_train: Tensor,
        validation: &'a [String],
        teacher_validation: Tensor,
        features: &FeatureMap,
        settings: EncoderSettings,
    ) -> Result<Self> {
        settings.check()?;
        if train.is_empty() || validation.is_empty() {
            return Err(Error::Data {
                name: "distillation sentences".into(),
                detail: format!(
                    "need training and validation sentences, found {} and {}",
                    train.len(),
                    validation.len()
                ),
            });
        }
        let (ws, wt) = (student.bert.config().hidden_size, teacher.bert.config().hidden_size);
        if ws != wt {
            return Err(Error::Shape { name: "student embedding width".into(), expected: vec![wt], found: vec![ws] });
        }
        for (what, n, t) in
            [("training", train.len(), &teacher_train), ("validation", validation.len(), &teacher_validation)]
        {
            if t.dims() != [n, wt] {
                return Err(Error::Shape {
                    name: format!("teacher embeddings of the {what} sentences"),
                    expected: vec![n, wt],
                    found: t.dims().to_vec(),
                });
            }
        }
        features.check(&student.bert, &teacher.bert)?;
        Ok(Self {
            student,
            teacher,
            train,
            teacher_train: teacher_train.to_dtype(DType::F32)?,
            validation,
            teacher_validation: teacher_validation.to_dtype(DType::F32)?,
            features: features.clone(),
            settings,
            batch_size: 64,
        })
    }
}

/// Masked mean squared error between `[b, t, d]` hidden states over real tokens only.
fn masked_mse(s: &Tensor, t: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if s.dims() != t.dims() {
        return Err(Error::Shape {
            name: "hidden-state hint".into(),
            expected: t.dims().to_vec(),
            found: s.dims().to_vec(),
        });
    }
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let d = s.dim(2)? as f64;
    let tokens = f64::from(m.sum_all()?.to_scalar::<f32>()?).max(1.0);
    let diff = (s.to_dtype(DType::F32)? - t.detach().to_dtype(DType::F32)?)?.broadcast_mul(&m)?;
    Ok((diff.sqr()?.sum_all()? / (tokens * d))?)
}

impl TrainTask for EncoderDistill<'_> {
    fn loss(&mut self, batch: &[u32]) -> Result<Tensor> {
        let texts: Vec<&str> = batch.iter().map(|&i| self.train[i as usize].as_str()).collect();
        let device = self.teacher_train.device().clone();
        let enc = self.student.encode_batch(&texts, &device).map_err(pare_models::Error::into_core)?;
        let mut ts = Taps::new(&self.features.student_paths());
        let hidden = self
            .student
            .bert
            .forward_hooked(&enc.input_ids, Some(&enc.token_type_ids), &enc.attention_mask, &mut Hooks::with(&mut ts))
            .map_err(pare_models::Error::into_core)?;
        let emb = mean_pool_normalize(&hidden, &enc.attention_mask).map_err(pare_models::Error::into_core)?;
        let idx = Tensor::from_slice(batch, batch.len(), &device)?;
        let target = self.teacher_train.index_select(&idx, 0)?;
        let s = self.settings;
        let mut loss = (losses::embedding_cosine(&emb, &target)? * s.cosine)?;
        if s.mse > 0.0 {
            let width = emb.dim(1)? as f64;
            loss = (loss + (losses::embedding_mse(&emb, &target)? * (s.mse * width))?)?;
        }
        if !self.features.is_empty() && s.feature_weight > 0.0 {
            let mut tt = Taps::detached(&self.features.teacher_paths());
            self.teacher
                .bert
                .forward_hooked(
                    &enc.input_ids,
                    Some(&enc.token_type_ids),
                    &enc.attention_mask,
                    &mut Hooks::with(&mut tt),
                )
                .map_err(pare_models::Error::into_core)?;
            for (sp, tp) in &self.features.pairs {
                let hint = masked_mse(&ts.take(sp)?, &tt.take(tp)?, &enc.attention_mask)?;
                loss = (loss + (hint * s.feature_weight)?)?;
            }
        }
        Ok(loss)
    }

    fn evaluate(&mut self) -> Result<f64> {
        let emb =
            self.student.embed(self.validation, self.batch_size, &mut |_| {}).map_err(pare_models::Error::into_core)?;
        metrics::mean_cosine(&emb, &self.teacher_validation)
    }
}

/// Mean cosine between `student`'s and `teacher`'s embeddings of `sentences` (the teacher's
/// given, as cached), in batches of 64.
pub fn mean_cosine_to(student: &SentenceEncoder, sentences: &[String], teacher: &Tensor) -> Result<f64> {
    let emb = student.embed(sentences, 64, &mut |_| {}).map_err(pare_models::Error::into_core)?;
    metrics::mean_cosine(&emb, teacher)
}

/// The student's number of parameters relative to the teacher's, both counted by
/// [`Module::parameter_count`].
pub fn size_ratio(student: &dyn Module, teacher: &dyn Module) -> f64 {
    teacher.parameter_count() as f64 / student.parameter_count().max(1) as f64
}
