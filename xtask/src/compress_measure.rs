//! Measuring the models of a `cargo xtask compress` run on one runtime: quality against the
//! original, latency in alternating rounds against each other and against the original on
//! candle f32 (and, for sentence encoders, on candle-transformers' `BertModel`), MACs, and the final model layer by layer (error and quality cost of each layer
//! compressed alone).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::BertModel;
use pare_core_tensor::data::{DigitsSplit, digits, sentences};
use pare_core_tensor::metrics::{MacCounter, mean_cosine};
use pare_core_tensor::{Hooks, LayerRef, Module, ReferenceRuntime, Runtime, Weight};
use pare_models::bert::{SentenceEncoder, mean_pool_normalize};
use pare_models::digits::DigitsNet;

use crate::compress_report::{Baseline, LayerRow, Row};

/// A model of either kind, loaded.
#[derive(Clone)]
pub enum Loaded {
    /// A digits classifier.
    Digits(DigitsNet),
    /// A sentence encoder.
    Encoder(Box<SentenceEncoder>),
}

impl Loaded {
    /// Loads a digits file or a sentence-transformers folder.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let dev = Device::Cpu;
        Ok(if path.is_dir() {
            Loaded::Encoder(Box::new(
                SentenceEncoder::load(path, &dev).with_context(|| format!("load {}", path.display()))?,
            ))
        } else {
            Loaded::Digits(DigitsNet::load(path, &dev).with_context(|| format!("load {}", path.display()))?)
        })
    }

    /// The layer tree.
    pub fn module(&self) -> &dyn Module {
        match self {
            Loaded::Digits(n) => n,
            Loaded::Encoder(e) => &e.bert,
        }
    }

    fn module_mut(&mut self) -> &mut dyn Module {
        match self {
            Loaded::Digits(n) => n,
            Loaded::Encoder(e) => &mut e.bert,
        }
    }
}

/// data/sentences.txt split for encoder pipelines: every fifth line is held out (quality is
/// measured on those), the others are what stages calibrate and distil on by default.
pub fn sentence_split() -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let all = sentences(crate::workspace_root().join("data/sentences.txt"))?;
    let (held, train): (Vec<_>, Vec<_>) = all.into_iter().enumerate().partition(|(i, _)| i % 5 == 4);
    Ok((train.into_iter().map(|p| p.1).collect(), held.into_iter().map(|p| p.1).collect()))
}

/// The batch every latency measurement runs.
enum Batch {
    /// 64 test images.
    Images(Tensor),
    /// 32 sequences of 128 tokens: real token ids of held-out sentences right-padded with
    /// `[PAD]` (or cut) to 128, an all-ones mask (dense work), as the benches and the ONNX
    /// Runtime peer build them.
    Tokens { ids: Tensor, types: Tensor, mask: Tensor },
}

impl Batch {
    /// Examples per batch.
    fn len(&self) -> usize {
        match self {
            Batch::Images(x) => x.dim(0).unwrap_or(1),
            Batch::Tokens { ids, .. } => ids.dim(0).unwrap_or(1),
        }
    }

    /// What the batch is, for reports.
    fn name(&self) -> String {
        match self {
            Batch::Images(x) => match x.dim(0).unwrap_or(0) {
                1 => "1 test image".into(),
                n => format!("{n} test images"),
            },
            Batch::Tokens { ids, .. } => {
                let (n, len) = ids.dims2().unwrap_or((0, 0));
                format!("{n} × {len} tokens")
            }
        }
    }

    /// One forward of `t` on this batch.
    fn forward(&self, t: &Timed<'_>) -> anyhow::Result<()> {
        let m = match t {
            Timed::Model(m) => *m,
            Timed::CandleBert(bert) => {
                let Batch::Tokens { ids, types, mask } = self else {
                    anyhow::bail!("candle-transformers' BERT takes token batches")
                };
                // The same work as a pare encoder's forward below: the hidden states, then
                // the sentence embeddings.
                let h = bert.forward(ids, types, Some(mask))?;
                mean_pool_normalize(&h, mask)?.sum_all()?.to_scalar::<f32>()?;
                return Ok(());
            }
        };
        match (m, self) {
            (Loaded::Digits(net), Batch::Images(x)) => {
                net.forward(x)?.sum_all()?.to_scalar::<f32>()?;
            }
            (Loaded::Encoder(e), Batch::Tokens { ids, types, mask }) => {
                let h = e.bert.forward_hooked(ids, Some(types), mask, &mut Hooks::none())?;
                mean_pool_normalize(&h, mask)?.sum_all()?.to_scalar::<f32>()?;
            }
            _ => anyhow::bail!("the models of one pipeline must be of one kind"),
        }
        Ok(())
    }

    /// Median seconds per batch of every model, timed in `rounds` alternating rounds (each
    /// model runs about [`ROUND_SECS`] per round), so that a noisy machine slows all alike.
    fn time(&self, models: &[Timed<'_>], rounds: usize, on_round: &mut dyn FnMut()) -> anyhow::Result<Vec<f64>> {
        // Warm up, and size each model's block of forwards.
        let mut reps = Vec::with_capacity(models.len());
        for m in models {
            self.forward(m)?;
            let t = Instant::now();
            self.forward(m)?;
            let one = t.elapsed().as_secs_f64().max(1e-7);
            reps.push(((ROUND_SECS / one).ceil() as usize).clamp(1, 10_000));
        }
        let mut times = vec![Vec::with_capacity(rounds); models.len()];
        for _ in 0..rounds.max(1) {
            for (i, m) in models.iter().enumerate() {
                let t = Instant::now();
                for _ in 0..reps[i] {
                    self.forward(m)?;
                }
                times[i].push(t.elapsed().as_secs_f64() / reps[i] as f64);
            }
            on_round();
        }
        Ok(times
            .into_iter()
            .map(|mut v| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            })
            .collect())
    }
}

/// A timed batch of `n` examples: test images (the first `n`, repeated when `n` exceeds
/// the test split), or `n` held-out sentences as `len` real token ids each, right-padded
/// with `[PAD]` (or cut) and an all-ones mask (dense work), as the benches and the ONNX
/// Runtime peer build them.
fn make_batch(
    data: Option<&DigitsSplit>,
    text: &[String],
    original: &Loaded,
    n: usize,
    len: usize,
) -> anyhow::Result<Batch> {
    let dev = Device::Cpu;
    Ok(match original {
        Loaded::Digits(_) => {
            let x = &data.context("digits data")?.test.x;
            let have = x.dim(0)?;
            let rows: Vec<u32> = (0..n).map(|i| (i % have) as u32).collect();
            Batch::Images(x.index_select(&Tensor::from_vec(rows, n, &dev)?, 0)?)
        }
        Loaded::Encoder(e) => {
            let mut ids = vec![0u32; n * len];
            for (i, s) in text.iter().cycle().take(n).enumerate() {
                let b = e.encode_batch(&[s.as_str()], &dev)?;
                for (j, id) in b.input_ids.flatten_all()?.to_vec1::<u32>()?.into_iter().take(len).enumerate() {
                    ids[i * len + j] = id;
                }
            }
            Batch::Tokens {
                ids: Tensor::from_vec(ids, (n, len), &dev)?,
                types: Tensor::zeros((n, len), DType::U32, &dev)?,
                mask: Tensor::ones((n, len), DType::U32, &dev)?,
            }
        }
    })
}

/// What a timing round runs.
enum Timed<'a> {
    /// A pare model, prepared on its runtime.
    Model(&'a Loaded),
    /// candle-transformers' f32 `BertModel` on the original encoder's weights.
    CandleBert(&'a BertModel),
}

/// candle-transformers' f32 `BertModel` on the weights of the sentence-transformers folder
/// `dir` (its `config.json` and `model.safetensors`).
fn candle_bert(dir: &Path) -> anyhow::Result<BertModel> {
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).with_context(|| format!("read {}", config.display()))?;
    let cfg: candle_transformers::models::bert::Config =
        serde_json::from_str(&text).with_context(|| format!("parse {} as a BERT config", config.display()))?;
    let weights = dir.join("model.safetensors");
    // SAFETY: nothing writes to the model file while this process maps it (the output folder
    // is checked not to be the input before any stage runs).
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu) }
        .with_context(|| format!("map {}", weights.display()))?;
    BertModel::load(vb, &cfg).with_context(|| format!("load {} as candle-transformers' BertModel", dir.display()))
}

/// Measures models on one runtime against the original.
pub struct Meter {
    rt: Arc<dyn Runtime>,
    /// The digits split (digits models).
    data: Option<DigitsSplit>,
    /// Held-out sentences (encoders): see [`sentence_split`].
    text: Vec<String>,
    /// The original's embeddings of `text`.
    reference: Option<Tensor>,
    /// The batch every row is timed on: 64 test images, or 32 × 128 tokens.
    batch: Batch,
}

/// How long each model runs per timing round: enough forwards to take about 50 ms.
const ROUND_SECS: f64 = 0.05;

impl Meter {
    /// A meter for models like `original` on `rt`.
    pub fn new(rt: Arc<dyn Runtime>, original: &Loaded) -> anyhow::Result<Self> {
        Ok(match original {
            Loaded::Digits(_) => {
                let data = digits(crate::DIGITS_SPLIT_SEED, &Device::Cpu)?;
                let batch = make_batch(Some(&data), &[], original, 64, 0)?;
                Meter { rt, data: Some(data), text: Vec::new(), reference: None, batch }
            }
            Loaded::Encoder(_) => {
                let (_, text) = sentence_split()?;
                let batch = make_batch(None, &text, original, 32, 128)?;
                Meter { rt, data: None, text, reference: None, batch }
            }
        })
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.rt
    }

    /// What one timed batch is.
    pub fn batch_name(&self) -> String {
        self.batch.name()
    }

    /// Whether the models are sentence encoders.
    pub fn encoder(&self) -> bool {
        self.data.is_none()
    }

    /// The metric's name.
    pub fn metric(&self) -> &'static str {
        if self.data.is_some() { "test accuracy" } else { "mean cosine to the original" }
    }

    /// `m`, prepared on the runtime.
    pub fn prepared(&self, mut m: Loaded) -> anyhow::Result<Loaded> {
        m.module_mut().prepare(&self.rt)?;
        Ok(m)
    }

    /// The quality of a prepared model: test accuracy, or mean cosine of its embeddings of the
    /// held-out sentences to the original's (the first encoder measured is the original).
    pub fn quality(&mut self, m: &Loaded) -> anyhow::Result<f64> {
        match m {
            Loaded::Digits(net) => {
                let data = self.data.as_ref().context("a digits model in an encoder pipeline")?;
                Ok(net.accuracy(&data.test)?)
            }
            Loaded::Encoder(e) => {
                let emb = e.embed(&self.text, 16, &mut |_| {})?;
                let reference = self.reference.get_or_insert_with(|| emb.clone());
                Ok(mean_cosine(reference, &emb)?)
            }
        }
    }

    /// Dense multiply-accumulates of the linear and convolution layers for one example.
    pub fn macs(&self, m: &Loaded) -> anyhow::Result<u64> {
        let mut macs = MacCounter::default();
        match (m, &self.batch) {
            (Loaded::Digits(net), Batch::Images(x)) => {
                net.forward_hooked(&x.narrow(0, 0, 1)?, &mut Hooks::with(&mut macs))?;
            }
            (Loaded::Encoder(e), Batch::Tokens { ids, types, mask }) => {
                let one = |t: &Tensor| t.narrow(0, 0, 1);
                e.bert.forward_hooked(&one(ids)?, Some(&one(types)?), &one(mask)?, &mut Hooks::with(&mut macs))?;
            }
            _ => anyhow::bail!("the models of one pipeline must be of one kind"),
        }
        Ok(macs.total())
    }

    /// Times `model` (prepared) against the original (`original`, prepared on the runtime)
    /// and the original on candle f32 on a batch of `n` examples (`len` tokens each for
    /// encoders), in `rounds` alternating rounds: seconds per batch of each, and the batch's name.
    pub fn bench(
        &self,
        original: &Loaded,
        model: &Loaded,
        (n, len, rounds): (usize, usize, usize),
        on_round: &mut dyn FnMut(),
    ) -> anyhow::Result<([f64; 3], String)> {
        let batch = make_batch(self.data.as_ref(), &self.text, original, n, len)?;
        let base = candle_f32(original)?;
        let t = batch.time(&[Timed::Model(original), Timed::Model(model), Timed::Model(&base)], rounds, on_round)?;
        Ok(([t[0], t[1], t[2]], batch.name()))
    }

    /// Rows for `models` (labels and paths beside them), the candle f32 baseline of the
    /// original (`models[0]`) and, for a sentence encoder, candle-transformers' `BertModel` on
    /// the original's weights, all timed together.
    pub fn rows(
        &mut self,
        models: &[(String, PathBuf, Loaded, Option<f64>)],
        qualities: &[f64],
        on_round: &mut dyn FnMut(),
        rounds: usize,
    ) -> anyhow::Result<(Vec<Row>, Baseline, Option<Baseline>)> {
        let base = candle_f32(&models[0].2)?;
        // A folder candle-transformers cannot load (another architecture's config, say) only
        // loses that column: every stage's work is done by now.
        let bert = match &models[0].2 {
            Loaded::Encoder(_) => candle_bert(&models[0].1)
                .inspect_err(|e| tracing::warn!("not timing candle-transformers' BertModel: {e:#}"))
                .ok(),
            Loaded::Digits(_) => None,
        };
        let mut all: Vec<Timed<'_>> = models.iter().map(|m| Timed::Model(&m.2)).collect();
        all.push(Timed::Model(&base));
        all.extend(bert.as_ref().map(Timed::CandleBert));
        let batch = &self.batch;
        let secs = batch.time(&all, rounds, on_round)?;
        let n = batch.len() as f64;
        let mut rows = Vec::new();
        for (i, (stage, path, m, seconds)) in models.iter().enumerate() {
            let module = m.module();
            let (zeros, total) = weight_zeros(module)?;
            let bytes = module.storage_bytes();
            let params = module.parameter_count();
            rows.push(Row {
                stage: stage.clone(),
                path: path.clone(),
                bytes,
                params,
                bits_per_weight: 8.0 * bytes as f64 / params.max(1) as f64,
                sparsity: zeros as f64 / total.max(1) as f64,
                macs: self.macs(m)?,
                quality: qualities[i],
                latency_ms: secs[i] * 1e3,
                throughput: n / secs[i],
                seconds: *seconds,
            });
        }
        let t = secs[models.len()];
        let baseline = Baseline {
            name: "the original's f32 weights on candle's matmul and ops (pare's reference runtime)".into(),
            latency_ms: t * 1e3,
            throughput: n / t,
        };
        let bert = bert.map(|_| {
            let t = secs[models.len() + 1];
            Baseline {
                name: "candle-transformers' f32 `BertModel` on the original's weights".into(),
                latency_ms: t * 1e3,
                throughput: n / t,
            }
        });
        Ok((rows, baseline, bert))
    }

    /// The final model (`models.last()`) layer by layer: each weighted layer's format, size,
    /// sparsity, the stage that gave it its final form, its error against the layer just
    /// before that stage, and the quality that earlier model changes by with only this layer
    /// replaced by the final one.
    pub fn layers(
        &mut self,
        models: &[(String, PathBuf, Loaded, Option<f64>)],
        qualities: &[f64],
        on_layer: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<Vec<LayerRow>> {
        let last = models.len() - 1;
        let fin = models[last].2.module();
        let weighted: Vec<LayerRef<'_>> = fin.layers().into_iter().filter(|l| weight_of(l).is_some()).collect();
        let mut out = Vec::new();
        for (k, l) in weighted.iter().enumerate() {
            on_layer(k, weighted.len());
            let w = weight_of(l).expect("weighted layers only");
            let path = l.path().to_string();
            let shape = w.shape();
            let dense = w.to_dense(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let zeros = dense.iter().filter(|v| **v == 0.0).count();
            // The first model in which this layer has its final form (walking back while the
            // previous model holds the same weight and input quantization), and the model
            // before it, if the layer existed there with the same shape.
            let same_as_final = |k: usize| -> anyhow::Result<bool> {
                let Ok(p) = models[k].2.module().layer(&path) else { return Ok(false) };
                let Some(pw) = weight_of(&p) else { return Ok(false) };
                if pw.shape() != shape || pw.describe() != w.describe() || p.input_quant() != l.input_quant() {
                    return Ok(false);
                }
                let v = pw.to_dense(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(v == dense)
            };
            let mut first = last;
            while first > 0 && same_as_final(first - 1)? {
                first -= 1;
            }
            let before = (first > 0)
                .then(|| models[first - 1].2.module().layer(&path).ok())
                .flatten()
                .filter(|p| weight_of(p).is_some_and(|pw| pw.shape() == shape));
            let (against, rel_error, quality_delta) = match before {
                None => (None, None, None),
                Some(reference) => {
                    let from = first - 1;
                    let rw = weight_of(&reference).expect("checked above");
                    let rv = rw.to_dense(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let (num, den) = dense
                        .iter()
                        .zip(&rv)
                        .fold((0f64, 0f64), |(n, d), (a, b)| (n + f64::from(a - b).powi(2), d + f64::from(*b).powi(2)));
                    let mut m = models[from].2.clone();
                    {
                        let mut target = m.module_mut().layer_mut(&path)?;
                        target.set_weight(w.clone())?;
                        target.set_input_quant(l.input_quant())?;
                        target.prepare(&self.rt)?;
                    }
                    let delta = self.quality(&m)? - qualities[from];
                    (Some(models[from].0.clone()), Some((num / den.max(1e-30)).sqrt()), Some(delta))
                }
            };
            out.push(LayerRow {
                path,
                changed_in: models[first].0.clone(),
                format: w.describe(),
                shape: shape.clone(),
                bytes: w.storage_bytes(),
                bits: 8.0 * w.storage_bytes() as f64 / w.numel().max(1) as f64,
                sparsity: zeros as f64 / dense.len().max(1) as f64,
                against,
                rel_error,
                quality_delta,
            });
        }
        Ok(out)
    }
}

/// `original` on the reference runtime: its f32 weights on candle's matmul and ops, the
/// baseline every timing is also compared with.
fn candle_f32(original: &Loaded) -> anyhow::Result<Loaded> {
    let mut base = original.clone();
    let reference: Arc<dyn Runtime> = ReferenceRuntime::shared(Device::Cpu);
    base.module_mut().prepare(&reference)?;
    Ok(base)
}

/// The main weight of a linear, convolution or embedding layer.
fn weight_of<'a>(l: &LayerRef<'a>) -> Option<&'a Weight> {
    match l {
        LayerRef::Linear(x) => Some(x.weight()),
        LayerRef::Conv2d(x) => Some(x.weight()),
        LayerRef::Embedding(x) => Some(x.weight()),
        LayerRef::LayerNorm(_) => None,
    }
}

/// Zero weights and all weights of the weighted layers.
fn weight_zeros(m: &dyn Module) -> anyhow::Result<(usize, usize)> {
    let (mut zeros, mut total) = (0, 0);
    for l in m.layers() {
        if let Some(w) = weight_of(&l) {
            let v = w.to_dense(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            zeros += v.iter().filter(|x| **x == 0.0).count();
            total += v.len();
        }
    }
    Ok((zeros, total))
}
