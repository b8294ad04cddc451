//! Evaluating architectures.
//!
//! - [`DigitsEvaluator`]: short training from scratch through core-tensor's trainer (seeded by
//!   the search seed and the trial), validation and test accuracy, parameters, bytes, MACs, and
//!   the latency of one image measured on a `Runtime` (cached per architecture, so a repeated
//!   architecture is not re-timed).
//! - [`EncoderEvaluator`]: encoder shapes as sub-networks of a pretrained sentence encoder
//!   (the pretrained model is the supernet): evenly spaced layers, and in each the heads and
//!   FFN neurons of largest weight magnitude, scored without training by the mean cosine of
//!   their sentence embeddings to the full model's on held-out sentences, with the latency of
//!   one sentence measured on a `Runtime`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use candle_nn::VarMap;
use pare_core_tensor::data::DigitsSplit;
use pare_core_tensor::metrics::{MacCounter, accuracy};
use pare_core_tensor::train::{LrSchedule, OptimizerKind, TrainConfig};
use pare_core_tensor::{Hooks, Module, Runtime};
use pare_models::bert::SentenceEncoder;
use pare_models::digits::{DigitsArch, DigitsNet, fit};

use crate::search::{Evaluator, Metrics};
use crate::space::{Candidate, EncoderArch, Space};
use crate::{Error, Result};

/// The latency of one example of `net` on its runtime: the median of `reps` single-image
/// forward passes after a warm-up, in milliseconds.
pub fn latency_ms(net: &DigitsNet, x: &candle_core::Tensor, reps: usize) -> Result<f64> {
    let one = x.narrow(0, 0, 1)?;
    let run = || -> Result<()> {
        net.forward(&one).map_err(pare_models::Error::into_core)?.to_vec2::<f32>()?;
        Ok(())
    };
    run()?;
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            run().map(|()| s.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Multiply-accumulates of one example through `net`.
pub fn macs(net: &DigitsNet, x: &candle_core::Tensor) -> Result<u64> {
    let mut m = MacCounter::default();
    net.forward_hooked(&x.narrow(0, 0, 1)?, &mut Hooks::with(&mut m)).map_err(pare_models::Error::into_core)?;
    Ok(m.total())
}

/// Trains each candidate from scratch for a few epochs on the digits and measures it.
pub struct DigitsEvaluator<'a> {
    data: &'a DigitsSplit,
    runtime: Arc<dyn Runtime>,
    /// Training epochs per candidate.
    pub epochs: usize,
    /// Peak AdamW learning rate.
    pub lr: f64,
    /// Seed mixed with the trial index for initialisation and shuffles.
    pub seed: u64,
    /// Single-image forward passes timed per architecture.
    pub latency_reps: usize,
    latencies: BTreeMap<String, f64>,
}

impl<'a> DigitsEvaluator<'a> {
    /// An evaluator training on `data` and timing on `runtime`.
    pub fn new(data: &'a DigitsSplit, runtime: Arc<dyn Runtime>, epochs: usize, seed: u64) -> Result<Self> {
        if epochs == 0 {
            return Err(Error::invalid("--epochs", "each candidate trains at least 1 epoch, found 0"));
        }
        Ok(Self { data, runtime, epochs, lr: 3e-3, seed, latency_reps: 31, latencies: BTreeMap::new() })
    }

    /// The settings that shape every trial, for [`crate::SearchConfig::evaluator`].
    pub fn describe(&self) -> String {
        format!(
            "digits: {} epochs, AdamW {} cosine, batch 32, latency on `{}`",
            self.epochs,
            self.lr,
            self.runtime.name()
        )
    }

    /// Trains `arch` as trial `index` trains it (the same seed, so the same weights as in the
    /// search): how a search's winner becomes a model.
    pub fn train(&self, arch: &DigitsArch, index: usize) -> Result<DigitsNet> {
        let seed = self.seed ^ (index as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
        let vars = VarMap::new();
        let net = DigitsNet::init(arch.clone(), seed, &Device::Cpu, &vars).map_err(pare_models::Error::into_core)?;
        let cfg = TrainConfig {
            epochs: self.epochs,
            batch_size: 32,
            optimizer: OptimizerKind::adamw(self.lr),
            schedule: LrSchedule::Cosine { warmup_steps: 20, min_factor: 0.02 },
            seed,
            patience: None,
            checkpoint: None,
        };
        fit(&net, &vars, self.data, &cfg, &mut |_| {}).map_err(pare_models::Error::into_core)?;
        Ok(net)
    }

    /// Trains `arch` and measures it (the work of one trial).
    pub fn measure(&mut self, arch: &DigitsArch, index: usize) -> Result<Metrics> {
        let net = self.train(arch, index)?;
        let mut fast = net.clone();
        fast.prepare(&self.runtime)?;
        let acc = |e: &pare_core_tensor::data::Examples| -> Result<f64> {
            accuracy(&fast.forward(&e.x).map_err(pare_models::Error::into_core)?, &e.y)
        };
        let (validation, test) = (acc(&self.data.validation)?, acc(&self.data.test)?);
        let key = arch.to_string();
        let latency_ms = match self.latencies.get(&key) {
            Some(&l) => l,
            None => {
                let l = latency_ms(&fast, &self.data.test.x, self.latency_reps)?;
                self.latencies.insert(key, l);
                l
            }
        };
        Ok(Metrics {
            validation,
            test,
            params: net.parameter_count(),
            bytes: net.storage_bytes(),
            macs: macs(&net, &self.data.test.x)?,
            latency_ms,
        })
    }
}

impl Evaluator for DigitsEvaluator<'_> {
    fn evaluate(&mut self, space: &Space, c: &Candidate, index: usize) -> Result<Metrics> {
        let arch = space.decode(c)?;
        self.measure(&arch, index)
    }
}

/// Scores encoder shapes as sub-networks of a pretrained sentence encoder (see the module
/// documentation). [`Metrics::validation`] and [`Metrics::test`] are mean cosines to the full
/// model's embeddings on the validation and test sentences; latency is one sentence.
pub struct EncoderEvaluator {
    teacher: SentenceEncoder,
    validation: Vec<String>,
    test: Vec<String>,
    target: (candle_core::Tensor, candle_core::Tensor),
    /// Per layer: the importance of each head (squared weights of its query, key and value
    /// rows and attention-output columns).
    head_importance: Vec<Vec<f64>>,
    /// Per layer: the importance of each FFN neuron (norm of its input row × norm of its output
    /// column).
    neuron_importance: Vec<Vec<f64>>,
    runtime: Arc<dyn Runtime>,
    /// Single-sentence forward passes timed per shape.
    pub latency_reps: usize,
    latencies: BTreeMap<String, f64>,
}

fn column_sq(w: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(w.sqr()?.sum(0)?.to_vec1::<f32>()?)
}

fn row_sq(w: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(w.sqr()?.sum(1)?.to_vec1::<f32>()?)
}

impl EncoderEvaluator {
    /// An evaluator inheriting from `teacher`, scoring on `validation` and `test` sentences
    /// (each non-empty), timing on `runtime`.
    pub fn new(
        teacher: SentenceEncoder,
        validation: Vec<String>,
        test: Vec<String>,
        runtime: Arc<dyn Runtime>,
    ) -> Result<Self> {
        if validation.is_empty() || test.is_empty() {
            return Err(Error::Data {
                name: "sentences".into(),
                detail: format!(
                    "an encoder search needs validation and test sentences, found {} and {}",
                    validation.len(),
                    test.len()
                ),
            });
        }
        let embed = |s: &[String]| teacher.embed(s, 32, &mut |_| {}).map_err(pare_models::Error::into_core);
        let target = (embed(&validation)?, embed(&test)?);
        let c = teacher.bert.config().clone();
        let weights = teacher.bert.named_weights();
        let dense = |name: String| -> Result<candle_core::Tensor> {
            weights
                .get(&name)
                .ok_or_else(|| Error::invalid("encoder", format!("no parameter `{name}`")))?
                .to_dense(&Device::Cpu)
        };
        let d = c.head_size();
        let (mut head_importance, mut neuron_importance) = (Vec::new(), Vec::new());
        for l in 0..c.num_hidden_layers {
            let p = |s: &str| format!("encoder.layer.{l}.{s}");
            let mut rows = vec![0f32; c.heads_of(l) * d];
            for m in ["query", "key", "value"] {
                for (r, v) in rows.iter_mut().zip(row_sq(&dense(p(&format!("attention.self.{m}.weight")))?)?) {
                    *r += v;
                }
            }
            for (r, v) in rows.iter_mut().zip(column_sq(&dense(p("attention.output.dense.weight"))?)?) {
                *r += v;
            }
            head_importance.push(rows.chunks(d).map(|h| h.iter().map(|&v| f64::from(v)).sum()).collect());
            let inp = row_sq(&dense(p("intermediate.dense.weight"))?)?;
            let out = column_sq(&dense(p("output.dense.weight"))?)?;
            neuron_importance
                .push(inp.iter().zip(&out).map(|(&a, &b)| f64::from(a).sqrt() * f64::from(b).sqrt()).collect());
        }
        Ok(Self {
            teacher,
            validation,
            test,
            target,
            head_importance,
            neuron_importance,
            runtime,
            latency_reps: 15,
            latencies: BTreeMap::new(),
        })
    }

    /// The configuration of the pretrained encoder the sub-networks come from.
    pub fn teacher_config(&self) -> &pare_models::bert::BertConfig {
        self.teacher.bert.config()
    }

    /// The settings that shape every trial, for [`crate::SearchConfig::evaluator`].
    pub fn describe(&self) -> String {
        let c = self.teacher.bert.config();
        format!(
            "encoder sub-networks of a {}-layer, {}-head, {}-FFN, {}-wide encoder (magnitude-ranked heads and neurons, evenly spaced layers), no training; mean cosine on {} validation / {} test sentences; latency on `{}`",
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size,
            c.hidden_size,
            self.validation.len(),
            self.test.len(),
            self.runtime.name()
        )
    }

    /// The sub-network of the pretrained encoder with shape `arch`.
    pub fn subnetwork(&self, arch: &EncoderArch) -> Result<SentenceEncoder> {
        let c = self.teacher.bert.config();
        let n = c.num_hidden_layers;
        let too_big = |what: &str, want: usize, have: usize| {
            Error::invalid(
                "encoder shape",
                format!("{arch} asks for {want} {what}; inheriting from the pretrained encoder allows at most {have}"),
            )
        };
        if arch.hidden != c.hidden_size {
            return Err(Error::invalid(
                "encoder shape",
                format!(
                    "{arch}: sub-networks of the pretrained encoder keep its hidden width {}, found {}",
                    c.hidden_size, arch.hidden
                ),
            ));
        }
        if arch.layers == 0 || arch.layers > n {
            return Err(too_big("layers", arch.layers, n));
        }
        let keep: Vec<usize> = (0..arch.layers).map(|i| i * n / arch.layers).collect();
        let top = |scores: &[f64], k: usize, what: &str| -> Result<Vec<usize>> {
            if k == 0 || k > scores.len() {
                return Err(too_big(what, k, scores.len()));
            }
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let mut kept = order[..k].to_vec();
            kept.sort_unstable();
            Ok(kept)
        };
        let heads: Vec<Vec<usize>> =
            keep.iter().map(|&l| top(&self.head_importance[l], arch.heads, "heads")).collect::<Result<_>>()?;
        let neurons: Vec<Vec<usize>> =
            keep.iter().map(|&l| top(&self.neuron_importance[l], arch.ffn, "FFN neurons")).collect::<Result<_>>()?;
        let into = pare_models::Error::into_core;
        let bert = self.teacher.bert.keep_layers(&keep).map_err(into)?.subnetwork(&heads, &neurons).map_err(into)?;
        let mut enc = self.teacher.clone();
        enc.bert = bert;
        Ok(enc)
    }

    /// Builds and measures `arch` (the work of one trial).
    pub fn measure(&mut self, arch: &EncoderArch) -> Result<Metrics> {
        let mut enc = self.subnetwork(arch)?;
        let into = pare_models::Error::into_core;
        let cosine = |enc: &SentenceEncoder, s: &[String], target: &candle_core::Tensor| -> Result<f64> {
            let e = enc.embed(s, 32, &mut |_| {}).map_err(into)?;
            Ok(f64::from((e * target)?.sum(1)?.mean_all()?.to_scalar::<f32>()?))
        };
        let (params, bytes) = (enc.bert.parameter_count(), enc.bert.storage_bytes());
        let one = &self.test[..1];
        let mut counter = MacCounter::default();
        enc.embed_hooked(one, 1, &mut Hooks::with(&mut counter), &mut |_| {}).map_err(into)?;
        enc.bert.prepare(&self.runtime)?;
        let validation = cosine(&enc, &self.validation, &self.target.0)?;
        let test = cosine(&enc, &self.test, &self.target.1)?;
        let key = arch.to_string();
        let latency_ms = match self.latencies.get(&key) {
            Some(&l) => l,
            None => {
                let run = || enc.embed(one, 1, &mut |_| {}).map(drop).map_err(into);
                run()?;
                let mut t: Vec<f64> = (0..self.latency_reps.max(1))
                    .map(|_| {
                        let s = Instant::now();
                        run().map(|()| s.elapsed().as_secs_f64() * 1e3)
                    })
                    .collect::<Result<_>>()?;
                t.sort_by(f64::total_cmp);
                let l = t[t.len() / 2];
                self.latencies.insert(key, l);
                l
            }
        };
        Ok(Metrics { validation, test, params, bytes, macs: counter.total(), latency_ms })
    }
}

impl Evaluator for EncoderEvaluator {
    fn evaluate(&mut self, space: &Space, c: &Candidate, _index: usize) -> Result<Metrics> {
        let arch = space.decode_encoder(c)?;
        self.measure(&arch)
    }
}
