//! Measuring the models of a `cargo xtask compress` run on one runtime: quality against the
//! original, latency in alternating rounds against each other and against the original on
//! candle f32, MACs, and the final model layer by layer (error and quality cost of each layer
//! compressed alone).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
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

/// The batch every latency measurement runs.
enum Batch {
    /// 64 test images.
    Images(Tensor),
    /// 32 sequences of 128 tokens: real token ids of held-out sentences right-padded with
    /// `[PAD]` (or cut) to 128, an all-ones mask (dense work), as the benches and the ONNX
    /// Runtime peer build them.
    Tokens { ids: Tensor, types: Tensor, mask: Tensor },
}

/// Measures models on one runtime against the original.
pub struct Meter {
    rt: Arc<dyn Runtime>,
    /// The digits split (digits models).
    data: Option<DigitsSplit>,
    /// Held-out sentences (encoders): every fifth line of data/sentences.txt (the other lines
    /// are what recipes calibrate and distil on), at most 64.
    text: Vec<String>,
    /// The original's embeddings of `text`.
    reference: Option<Tensor>,
    batch: Option<Batch>,
}

/// What [`Meter::time`] runs per round: enough forwards to take about 50 ms.
const ROUND_SECS: f64 = 0.05;

impl Meter {
    /// A meter for models like `original` on `rt`.
    pub fn new(rt: Arc<dyn Runtime>, original: &Loaded) -> anyhow::Result<Self> {
        let dev = Device::Cpu;
        Ok(match original {
            Loaded::Digits(_) => {
                let data = digits(crate::DIGITS_SPLIT_SEED, &dev)?;
                let batch = Batch::Images(data.test.x.narrow(0, 0, 64.min(data.test.len()))?);
                Meter { rt, data: Some(data), text: Vec::new(), reference: None, batch: Some(batch) }
            }
            Loaded::Encoder(e) => {
                let all = sentences(crate::workspace_root().join("data/sentences.txt"))?;
                let text: Vec<String> =
                    all.into_iter().enumerate().filter(|(i, _)| i % 5 == 4).map(|(_, s)| s).take(64).collect();
                let (n, len) = (32, 128);
                let mut ids = vec![0u32; n * len];
                for (i, s) in text.iter().cycle().take(n).enumerate() {
                    let b = e.encode_batch(&[s.as_str()], &dev)?;
                    for (j, id) in b.input_ids.flatten_all()?.to_vec1::<u32>()?.into_iter().take(len).enumerate() {
                        ids[i * len + j] = id;
                    }
                }
                let batch = Batch::Tokens {
                    ids: Tensor::from_vec(ids, (n, len), &dev)?,
                    types: Tensor::zeros((n, len), DType::U32, &dev)?,
                    mask: Tensor::ones((n, len), DType::U32, &dev)?,
                };
                Meter { rt, data: None, text, reference: None, batch: Some(batch) }
            }
        })
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.rt
    }

    /// What one timed batch is.
    pub fn batch_name(&self) -> &'static str {
        match self.batch {
            Some(Batch::Images(_)) => "64 test images",
            _ => "32 × 128 tokens",
        }
    }

    /// Examples per timed batch.
    fn batch_len(&self) -> usize {
        match &self.batch {
            Some(Batch::Images(x)) => x.dim(0).unwrap_or(1),
            Some(Batch::Tokens { ids, .. }) => ids.dim(0).unwrap_or(1),
            None => 1,
        }
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

    /// One forward of the timed batch.
    fn forward(&self, m: &Loaded) -> anyhow::Result<()> {
        match (m, &self.batch) {
            (Loaded::Digits(net), Some(Batch::Images(x))) => {
                net.forward(x)?.sum_all()?.to_scalar::<f32>()?;
            }
            (Loaded::Encoder(e), Some(Batch::Tokens { ids, types, mask })) => {
                let h = e.bert.forward_hooked(ids, Some(types), mask, &mut Hooks::none())?;
                mean_pool_normalize(&h, mask)?.sum_all()?.to_scalar::<f32>()?;
            }
            _ => anyhow::bail!("the models of one pipeline must be of one kind"),
        }
        Ok(())
    }

    /// Dense multiply-accumulates of the linear and convolution layers for one example.
    pub fn macs(&self, m: &Loaded) -> anyhow::Result<u64> {
        let mut macs = MacCounter::default();
        match (m, &self.batch) {
            (Loaded::Digits(net), Some(Batch::Images(x))) => {
                net.forward_hooked(&x.narrow(0, 0, 1)?, &mut Hooks::with(&mut macs))?;
            }
            (Loaded::Encoder(e), Some(Batch::Tokens { ids, types, mask })) => {
                let one = |t: &Tensor| t.narrow(0, 0, 1);
                e.bert.forward_hooked(&one(ids)?, Some(&one(types)?), &one(mask)?, &mut Hooks::with(&mut macs))?;
            }
            _ => anyhow::bail!("the models of one pipeline must be of one kind"),
        }
        Ok(macs.total())
    }

    /// Median seconds per batch of every model, timed in `rounds` alternating rounds (each
    /// model runs about [`ROUND_SECS`] per round), so that a noisy machine slows all alike.
    pub fn time(&self, models: &[&Loaded], rounds: usize, on_round: &mut dyn FnMut()) -> anyhow::Result<Vec<f64>> {
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
        for _ in 0..rounds {
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

    /// Rows for `models` (labels and paths beside them) and the candle f32 baseline of the
    /// original (`models[0]`), all timed together.
    pub fn rows(
        &mut self,
        models: &[(String, PathBuf, Loaded, Option<f64>)],
        qualities: &[f64],
        on_round: &mut dyn FnMut(),
        rounds: usize,
    ) -> anyhow::Result<(Vec<Row>, Baseline)> {
        let mut base = models[0].2.clone();
        let reference: Arc<dyn Runtime> = ReferenceRuntime::shared(Device::Cpu);
        base.module_mut().prepare(&reference)?;
        let mut all: Vec<&Loaded> = models.iter().map(|m| &m.2).collect();
        all.push(&base);
        let secs = self.time(&all, rounds, on_round)?;
        let n = self.batch_len() as f64;
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
        Ok((rows, baseline))
    }

    /// The final model (`models.last()`) layer by layer: each weighted layer's format, size,
    /// sparsity, its error against the earliest model since it last changed shape, and the
    /// quality that model loses with only this layer replaced by the final one.
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
            // The earliest model from which on this layer keeps its shape.
            let mut from = last;
            while from > 0 {
                let prev = models[from - 1].2.module();
                match prev.layer(&path).ok().and_then(|p| weight_of(&p).map(Weight::shape)) {
                    Some(s) if s == shape => from -= 1,
                    _ => break,
                }
            }
            let (against, rel_error, quality_delta) = if from == last {
                (None, None, None)
            } else {
                let reference = models[from].2.module().layer(&path)?;
                let rw = weight_of(&reference).expect("same layer kind");
                let rv = rw.to_dense(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let (num, den) = dense
                    .iter()
                    .zip(&rv)
                    .fold((0f64, 0f64), |(n, d), (a, b)| (n + f64::from(a - b).powi(2), d + f64::from(*b).powi(2)));
                let err = (num / den.max(1e-30)).sqrt();
                let same = num == 0.0 && reference.input_quant() == l.input_quant();
                let delta = if same {
                    0.0
                } else {
                    let mut m = models[from].2.clone();
                    {
                        let module = m.module_mut();
                        let mut target = module.layer_mut(&path)?;
                        target.set_weight(w.clone())?;
                        target.set_input_quant(l.input_quant())?;
                        target.prepare(&self.rt)?;
                    }
                    self.quality(&m)? - qualities[from]
                };
                (Some(models[from].0.clone()), Some(err), Some(delta))
            };
            out.push(LayerRow {
                path,
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
