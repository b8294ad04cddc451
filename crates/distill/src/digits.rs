//! Distilling a digits classifier (MLP or CNN) into a smaller one: Hinton's soft targets at
//! temperature T plus the hard labels, and optionally FitNets hints between tapped layers.
//!
//! The teacher is frozen: its logits over the training split are computed once
//! ([`teacher_logits`], cacheable with [`crate::cache::teacher_outputs`]) on whatever runtime
//! it was prepared for; it runs per batch only when hints need its intermediate features.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarMap;
use pare_core_tensor::data::{DigitsSplit, Examples};
use pare_core_tensor::train::TrainTask;
use pare_core_tensor::{Error, Hooks, Init, InitWeights, Result, WeightSource, metrics};
use pare_models::digits::DigitsNet;

use crate::losses;
use crate::taps::{FeatureMap, Taps};

/// How a feature pair is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FeatureLoss {
    /// FitNets: mean squared error after a learned projection where widths differ.
    #[default]
    Hint,
    /// Zagoruyko & Komodakis: distance between normalised spatial attention maps of
    /// `[n, c, h, w]` features of equal spatial size (channel counts may differ; no projection).
    Attention,
}

impl std::str::FromStr for FeatureLoss {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "hint" => Ok(Self::Hint),
            "attention" => Ok(Self::Attention),
            other => Err(Error::invalid("--feature-loss", format!("expected hint or attention, found `{other}`"))),
        }
    }
}

/// The distillation hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Softmax temperature T (> 0) of the soft targets.
    pub temperature: f64,
    /// Weight α ∈ [0, 1] of the soft-target loss; the hard-label loss gets 1 − α.
    pub alpha: f64,
    /// Weight (≥ 0) of the summed hint losses, when a feature map is given.
    pub feature_weight: f64,
    /// How feature pairs are compared.
    pub feature_loss: FeatureLoss,
}

impl Default for Settings {
    fn default() -> Self {
        Self { temperature: 4.0, alpha: 0.9, feature_weight: 1.0, feature_loss: FeatureLoss::Hint }
    }
}

impl Settings {
    /// Checks every option, naming the bad one.
    pub fn check(&self) -> Result<()> {
        losses::check_temperature(self.temperature)?;
        losses::check_alpha(self.alpha)?;
        if !(self.feature_weight.is_finite() && self.feature_weight >= 0.0) {
            return Err(Error::invalid(
                "--feature-weight",
                format!("must be finite and ≥ 0, found {}", self.feature_weight),
            ));
        }
        Ok(())
    }
}

/// The teacher's logits `[n, classes]` over `examples`, in inference batches of 512.
pub fn teacher_logits(teacher: &DigitsNet, examples: &Examples) -> Result<Tensor> {
    let mut parts = Vec::new();
    for b in examples.batches(512)? {
        parts.push(teacher.forward(&b.x).map_err(pare_models::Error::into_core)?.detach());
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// A transfer set: `examples` followed by copies of every image shifted by one pixel in
/// each of the four directions (zero fill), each copy keeping its label. Distillation trains on
/// it with the teacher's soft targets for every image — Hinton's transfer set, where the
/// teacher's knowledge reaches inputs the labels never covered — and a fair hard-label
/// baseline trains on the same images.
pub fn shifted_copies(examples: &Examples) -> Result<Examples> {
    let n = examples.len();
    let side = 8usize;
    let x = examples.x.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let y = examples.y.to_vec1::<u32>()?;
    if x.first().is_some_and(|r| r.len() != side * side) {
        return Err(Error::Shape {
            name: "digits images".into(),
            expected: vec![n, 64],
            found: examples.x.dims().to_vec(),
        });
    }
    let (mut xs, mut ys): (Vec<f32>, Vec<u32>) = (x.concat(), y.clone());
    for (dr, dc) in [(-1i32, 0i32), (1, 0), (0, -1), (0, 1)] {
        for (img, &label) in x.iter().zip(&y) {
            for r in 0..side as i32 {
                for c in 0..side as i32 {
                    let (sr, sc) = (r - dr, c - dc);
                    let inside = (0..side as i32).contains(&sr) && (0..side as i32).contains(&sc);
                    xs.push(if inside { img[(sr * side as i32 + sc) as usize] } else { 0.0 });
                }
            }
            ys.push(label);
        }
    }
    let m = ys.len();
    Ok(Examples {
        x: Tensor::from_vec(xs, (m, side * side), examples.x.device())?,
        y: Tensor::from_vec(ys, m, examples.y.device())?,
    })
}

/// One feature pair's hint: student and teacher taps, and the learned projection when their
/// widths differ.
#[derive(Debug)]
struct Hint {
    student: String,
    teacher: String,
    projection: Option<candle_nn::Linear>,
}

/// Rows of feature vectors: `[n, d]` stays; `[n, c, h, w]` becomes `[n·h·w, c]` (the hint
/// then compares channel vectors position by position, a 1×1-convolution projection).
fn rows(f: &Tensor) -> Result<Tensor> {
    match f.rank() {
        2 => Ok(f.clone()),
        4 => {
            let c = f.dim(1)?;
            Ok(f.permute((0, 2, 3, 1))?.reshape(((), c))?)
        }
        r => Err(Error::invalid("hint feature", format!("expected a [n, d] or [n, c, h, w] output, found rank {r}"))),
    }
}

/// The distillation task on the digits: [`losses::combined`] on the training split against
/// the cached teacher logits, plus `feature_weight ×` the hints; validation accuracy as the
/// metric (ties broken by the validation cross-entropy, as in supervised training).
pub struct DigitsDistill<'a> {
    student: &'a DigitsNet,
    teacher: &'a DigitsNet,
    data: &'a DigitsSplit,
    teacher_logits: Tensor,
    hints: Vec<Hint>,
    settings: Settings,
}

impl<'a> DigitsDistill<'a> {
    /// Checks everything before any training: the settings, that the teacher logits cover the
    /// training split with the student's output width, that every feature-map path is a layer
    /// of its model and that each pair's features are comparable (same rank, same spatial
    /// size). Pairs whose widths differ get a projection (student width → teacher width)
    /// initialised from `seed` and registered in `vars`, so it trains with the student.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        student: &'a DigitsNet,
        teacher: &'a DigitsNet,
        data: &'a DigitsSplit,
        teacher_logits: Tensor,
        features: &FeatureMap,
        settings: Settings,
        vars: &VarMap,
        seed: u64,
    ) -> Result<Self> {
        settings.check()?;
        let n = data.train.len();
        if n == 0 {
            return Err(Error::Data { name: "digits training split".into(), detail: "no examples".into() });
        }
        let probe = data.train.select(&[0])?;
        let out_s = student.forward(&probe.x).map_err(pare_models::Error::into_core)?;
        let out_t = teacher.forward(&probe.x).map_err(pare_models::Error::into_core)?;
        if out_s.dims() != out_t.dims() {
            return Err(Error::Shape {
                name: "student output (must match the teacher's)".into(),
                expected: out_t.dims().to_vec(),
                found: out_s.dims().to_vec(),
            });
        }
        let classes = out_s.dim(1)?;
        if teacher_logits.dims() != [n, classes] {
            return Err(Error::Shape {
                name: "teacher logits (one row per training example)".into(),
                expected: vec![n, classes],
                found: teacher_logits.dims().to_vec(),
            });
        }
        features.check(student, teacher)?;
        let mut hints = Vec::new();
        if !features.is_empty() {
            let (mut ts, mut tt) =
                (Taps::detached(&features.student_paths()), Taps::detached(&features.teacher_paths()));
            student.forward_hooked(&probe.x, &mut Hooks::with(&mut ts)).map_err(pare_models::Error::into_core)?;
            teacher.forward_hooked(&probe.x, &mut Hooks::with(&mut tt)).map_err(pare_models::Error::into_core)?;
            let mut init = InitWeights::new(seed ^ 0x6869_6e74, Device::Cpu, vars.clone());
            for (i, (sp, tp)) in features.pairs.iter().enumerate() {
                let (fs, ft) = (ts.take(sp)?, tt.take(tp)?);
                let attention = settings.feature_loss == FeatureLoss::Attention;
                let comparable = fs.rank() == ft.rank()
                    && (fs.rank() == 2 && !attention || fs.rank() == 4 && fs.dims()[2..] == ft.dims()[2..]);
                if !comparable {
                    return Err(Error::Shape {
                        name: format!("hint feature of student layer `{sp}` (to match teacher layer `{tp}`)"),
                        expected: ft.dims().to_vec(),
                        found: fs.dims().to_vec(),
                    });
                }
                let (ws, wt) = (fs.dim(1)?, ft.dim(1)?);
                let projection = if ws == wt || attention {
                    None
                } else {
                    let bound = 1.0 / (ws as f64).sqrt();
                    let w = init.tensor(&format!("distill.hint.{i}.weight"), &[wt, ws], Init::Uniform { bound })?;
                    let b = init.tensor(&format!("distill.hint.{i}.bias"), &[wt], Init::Zeros)?;
                    Some(candle_nn::Linear::new(w, Some(b)))
                };
                hints.push(Hint { student: sp.clone(), teacher: tp.clone(), projection });
            }
        }
        Ok(Self { student, teacher, data, teacher_logits: teacher_logits.to_dtype(DType::F32)?, hints, settings })
    }
}

impl TrainTask for DigitsDistill<'_> {
    fn loss(&mut self, batch: &[u32]) -> Result<Tensor> {
        let b = self.data.train.select(batch)?;
        let idx = Tensor::from_slice(batch, batch.len(), self.teacher_logits.device())?;
        let t_logits = self.teacher_logits.index_select(&idx, 0)?;
        let Settings { temperature, alpha, feature_weight, feature_loss } = self.settings;
        if self.hints.is_empty() {
            let logits = self.student.forward(&b.x).map_err(pare_models::Error::into_core)?;
            return losses::combined(&logits, &t_logits, &b.y, temperature, alpha);
        }
        let mut ts = Taps::new(&self.hints.iter().map(|h| h.student.as_str()).collect::<Vec<_>>());
        let mut tt = Taps::detached(&self.hints.iter().map(|h| h.teacher.as_str()).collect::<Vec<_>>());
        let logits =
            self.student.forward_hooked(&b.x, &mut Hooks::with(&mut ts)).map_err(pare_models::Error::into_core)?;
        self.teacher.forward_hooked(&b.x, &mut Hooks::with(&mut tt)).map_err(pare_models::Error::into_core)?;
        let mut loss = losses::combined(&logits, &t_logits, &b.y, temperature, alpha)?;
        for h in &self.hints {
            let (fs, ft) = (ts.take(&h.student)?, tt.take(&h.teacher)?);
            let term = match feature_loss {
                FeatureLoss::Hint => losses::hint(&rows(&fs)?, &rows(&ft)?, h.projection.as_ref())?,
                FeatureLoss::Attention => losses::attention_transfer(&fs, &ft)?,
            };
            loss = (loss + (term * feature_weight)?)?;
        }
        Ok(loss)
    }

    fn evaluate(&mut self) -> Result<f64> {
        let v = &self.data.validation;
        let logits = self.student.forward(&v.x).map_err(pare_models::Error::into_core)?;
        let acc = metrics::accuracy(&logits, &v.y)?;
        let loss = f64::from(candle_nn::loss::cross_entropy(&logits, &v.y)?.to_scalar::<f32>()?);
        Ok(acc - 1e-4 * loss.min(10.0))
    }
}

/// The agreement of two classifiers: the fraction of `examples` on which their arg-max
/// predictions are equal.
pub fn agreement(a: &DigitsNet, b: &DigitsNet, examples: &Examples) -> Result<f64> {
    let pa = teacher_logits(a, examples)?.argmax(D::Minus1)?;
    let pb = teacher_logits(b, examples)?.argmax(D::Minus1)?;
    let same = pa.eq(&pb)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(f64::from(same) / examples.len().max(1) as f64)
}
