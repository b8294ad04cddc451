//! The digits models: an MLP and a small CNN over 8×8 images, trainable with core-tensor's
//! trainer and saved as safetensors whose metadata records the architecture.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarMap;
use pare_core_tensor::data::{DIGITS_CLASSES, DIGITS_PIXELS, DigitsSplit, Examples};
use pare_core_tensor::io::{load_weights, save_weights};
use pare_core_tensor::train::{TrainConfig, TrainEvent, TrainReport, TrainTask, train};
use pare_core_tensor::{
    Activation, Conv2d, Conv2dParams, Hooks, Init, InitWeights, LayerMut, LayerRef, Linear, LoadedWeights, Module,
    WeightSource, metrics,
};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Metadata key under which a digits model file records its architecture.
pub const META_MODEL: &str = "pare.model";

/// A multi-layer perceptron: 64 inputs → hidden widths → 10 classes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// Widths of the hidden layers.
    pub hidden: Vec<usize>,
}

/// A small CNN: 3×3 convolutions (padding 1) with ReLU, a 2×2 max-pool, then a hidden linear
/// layer and the classifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CnnConfig {
    /// Output channels of each convolution.
    pub channels: Vec<usize>,
    /// Width of the hidden linear layer.
    pub hidden: usize,
}

/// The architecture of a digits model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "arch")]
pub enum DigitsArch {
    /// See [`MlpConfig`].
    Mlp(MlpConfig),
    /// See [`CnnConfig`].
    Cnn(CnnConfig),
}

impl std::str::FromStr for DigitsArch {
    type Err = Error;

    /// `mlp:H1,H2,...` (hidden widths) or `cnn:C1,C2,...:H` (convolution channels, hidden
    /// width): `cnn:16,32:64` is the demo's teacher, `mlp:128,64` the default MLP.
    fn from_str(spec: &str) -> Result<Self> {
        let bad = |why: &str| Error::Config {
            what: "digits architecture",
            detail: format!("expected mlp:H1,H2,... or cnn:C1,C2,...:H, found `{spec}` ({why})"),
        };
        let widths = |list: &str| -> Result<Vec<usize>> {
            list.split(',')
                .map(|w| w.trim().parse::<usize>().map_err(|_| bad("widths are positive integers")))
                .collect()
        };
        let arch = match spec.split(':').collect::<Vec<_>>().as_slice() {
            ["mlp", hidden] => DigitsArch::Mlp(MlpConfig { hidden: widths(hidden)? }),
            ["mlp"] => DigitsArch::Mlp(MlpConfig { hidden: Vec::new() }),
            ["cnn", channels, hidden] => DigitsArch::Cnn(CnnConfig {
                channels: widths(channels)?,
                hidden: hidden.trim().parse().map_err(|_| bad("the hidden width is a positive integer"))?,
            }),
            _ => return Err(bad("unknown form")),
        };
        arch.validate()?;
        Ok(arch)
    }
}

impl std::fmt::Display for DigitsArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let join = |w: &[usize]| w.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        match self {
            DigitsArch::Mlp(c) if c.hidden.is_empty() => write!(f, "mlp"),
            DigitsArch::Mlp(c) => write!(f, "mlp:{}", join(&c.hidden)),
            DigitsArch::Cnn(c) => write!(f, "cnn:{}:{}", join(&c.channels), c.hidden),
        }
    }
}

impl DigitsArch {
    /// The demo's teacher CNN: conv 16, conv 32, max-pool, linear 64, linear 10 (≈38k parameters).
    pub fn default_cnn() -> Self {
        DigitsArch::Cnn(CnnConfig { channels: vec![16, 32], hidden: 64 })
    }
    /// The default MLP: 64 → 128 → 64 → 10 (≈17k parameters).
    pub fn default_mlp() -> Self {
        DigitsArch::Mlp(MlpConfig { hidden: vec![128, 64] })
    }
    fn validate(&self) -> Result<()> {
        let zero = match self {
            DigitsArch::Mlp(c) => c.hidden.contains(&0),
            DigitsArch::Cnn(c) => c.channels.is_empty() || c.channels.contains(&0) || c.hidden == 0,
        };
        if zero {
            return Err(Error::Config {
                what: "digits",
                detail: format!("widths must be ≥ 1 (and a CNN needs a convolution), found {self:?}"),
            });
        }
        Ok(())
    }
}

/// A digits classifier: `[n, 64]` pixels in, `[n, 10]` logits out.
#[derive(Debug, Clone)]
pub struct DigitsNet {
    arch: DigitsArch,
    convs: Vec<Conv2d>,
    linears: Vec<Linear>,
}

fn uniform(fan_in: usize) -> Init {
    Init::Uniform { bound: 1.0 / (fan_in as f64).sqrt() }
}

impl DigitsNet {
    /// Builds the network, taking every parameter from `src` (a file or a seeded initialiser).
    pub fn build(arch: DigitsArch, src: &mut dyn WeightSource) -> Result<Self> {
        arch.validate()?;
        let linear = |src: &mut dyn WeightSource, path: &str, i: usize, o: usize| {
            crate::linear(src, path, i, o, uniform(i), uniform(i))
        };
        let (mut convs, mut linears) = (Vec::new(), Vec::new());
        match &arch {
            DigitsArch::Mlp(c) => {
                let mut widths = vec![DIGITS_PIXELS];
                widths.extend(&c.hidden);
                widths.push(DIGITS_CLASSES);
                for (k, w) in widths.windows(2).enumerate() {
                    linears.push(linear(src, &format!("layers.{k}"), w[0], w[1])?);
                }
            }
            DigitsArch::Cnn(c) => {
                let mut cin = 1;
                for (k, &cout) in c.channels.iter().enumerate() {
                    let path = format!("conv{}", k + 1);
                    let fan = cin * 9;
                    let w = src.weight(&format!("{path}.weight"), &[cout, cin, 3, 3], uniform(fan))?;
                    let b = src.tensor(&format!("{path}.bias"), &[cout], uniform(fan))?;
                    convs.push(Conv2d::new(path, w, Some(b), Conv2dParams { padding: 1, ..Default::default() })?);
                    cin = cout;
                }
                let flat = cin * 4 * 4;
                linears.push(linear(src, "fc1", flat, c.hidden)?);
                linears.push(linear(src, "fc2", c.hidden, DIGITS_CLASSES)?);
            }
        }
        Ok(Self { arch, convs, linears })
    }

    /// A freshly initialised network whose parameters are `Var`s registered in `varmap`.
    pub fn init(arch: DigitsArch, seed: u64, device: &Device, varmap: &VarMap) -> Result<Self> {
        Self::build(arch, &mut InitWeights::new(seed, device.clone(), varmap.clone()))
    }

    /// The architecture.
    pub fn arch(&self) -> &DigitsArch {
        &self.arch
    }

    /// Logits for pixels `x` `[n, 64]`, reporting every layer to `hooks`.
    pub fn forward_hooked(&self, x: &Tensor, hooks: &mut Hooks<'_>) -> Result<Tensor> {
        let n = x.dim(0)?;
        let mut h = x.clone();
        if !self.convs.is_empty() {
            h = h.reshape((n, 1, 8, 8))?;
            for conv in &self.convs {
                h = conv.forward_hooked(&h, hooks)?.relu()?;
            }
            h = h.max_pool2d(2)?.flatten_from(1)?;
        }
        let last = self.linears.len() - 1;
        for (k, l) in self.linears.iter().enumerate() {
            h = l.forward_hooked(&h, hooks)?;
            if k < last {
                h = Activation::Relu.forward(&h)?;
            }
        }
        Ok(h)
    }

    /// Logits for pixels `x` `[n, 64]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_hooked(x, &mut Hooks::none())
    }

    /// Accuracy on `examples`, evaluated in batches of 512.
    pub fn accuracy(&self, examples: &Examples) -> Result<f64> {
        let mut hits = 0.0;
        for b in examples.batches(512)? {
            hits += metrics::accuracy(&self.forward(&b.x)?, &b.y)? * b.len() as f64;
        }
        Ok(hits / examples.len() as f64)
    }

    /// Saves weights (in whatever formats they now are) and the architecture to `path`
    /// atomically; `inputs` are files this run read, which the save refuses to overwrite.
    pub fn save(&self, path: &Path, metadata: &BTreeMap<String, String>, inputs: &[&Path]) -> Result<()> {
        let mut meta = metadata.clone();
        meta.insert(META_MODEL.into(), serde_json::to_string(&self.arch).expect("arch serialises"));
        meta.extend(pare_core_tensor::act::to_metadata(self));
        Ok(save_weights(path, &self.named_weights(), &meta, inputs)?)
    }

    /// Loads a network saved by [`DigitsNet::save`] (or exported to GGUF by `pare-quant`, whose
    /// tensors load dequantized).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (weights, meta) = if pare_core_tensor::io::is_gguf(path) {
            pare_core_tensor::io::load_gguf(path, device)?
        } else {
            load_weights(path, device)?
        };
        let arch = Self::arch_of(path, &meta)?;
        let mut src = LoadedWeights::new(weights, device.clone());
        let mut net = Self::build(arch, &mut src)?;
        pare_core_tensor::act::apply_metadata(&mut net, &meta)?;
        Ok(net)
    }

    /// Loads a network saved by [`DigitsNet::save`] with its dense weights as trainable `Var`s
    /// registered in `varmap` (for fine-tuning).
    pub fn load_trainable(path: &Path, device: &Device, varmap: &VarMap) -> Result<Self> {
        let (weights, meta) = load_weights(path, device)?;
        let arch = Self::arch_of(path, &meta)?;
        Self::build(arch, &mut LoadedWeights::trainable(weights, device.clone(), varmap.clone()))
    }

    fn arch_of(path: &Path, meta: &BTreeMap<String, String>) -> Result<DigitsArch> {
        let text = meta.get(META_MODEL).ok_or_else(|| Error::Model {
            path: PathBuf::from(path),
            detail: format!("no `{META_MODEL}` metadata: not a pare digits model"),
        })?;
        serde_json::from_str(text).map_err(|e| Error::Model {
            path: PathBuf::from(path),
            detail: format!("`{META_MODEL}` metadata is not a digits architecture: {e}"),
        })
    }
}

impl Module for DigitsNet {
    fn layers(&self) -> Vec<LayerRef<'_>> {
        self.convs.iter().map(LayerRef::Conv2d).chain(self.linears.iter().map(LayerRef::Linear)).collect()
    }
    fn classifier_path(&self) -> Option<String> {
        self.linears.last().map(|l| l.path().to_string())
    }
    fn layers_mut(&mut self) -> Vec<LayerMut<'_>> {
        self.convs.iter_mut().map(LayerMut::Conv2d).chain(self.linears.iter_mut().map(LayerMut::Linear)).collect()
    }
}

/// Supervised training of a digits model: cross-entropy on the training split, accuracy on
/// the validation split (the task [`fit`] runs; pruning and distillation wrap it).
pub struct Supervised<'a> {
    net: &'a DigitsNet,
    data: &'a DigitsSplit,
}

impl<'a> Supervised<'a> {
    /// The task of training `net` on `data`.
    pub fn new(net: &'a DigitsNet, data: &'a DigitsSplit) -> Self {
        Self { net, data }
    }
}

impl TrainTask for Supervised<'_> {
    fn loss(&mut self, batch: &[u32]) -> pare_core_tensor::Result<Tensor> {
        let b = self.data.train.select(batch)?;
        let logits = self.net.forward(&b.x).map_err(Error::into_core)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &b.y)?)
    }
    /// Validation accuracy, with ties (common: one validation error is 0.4%) broken by the
    /// lower validation cross-entropy, which moves the metric by far less than one example.
    fn evaluate(&mut self) -> pare_core_tensor::Result<f64> {
        let v = &self.data.validation;
        let logits = self.net.forward(&v.x).map_err(Error::into_core)?;
        let acc = metrics::accuracy(&logits, &v.y)?;
        let loss = f64::from(candle_nn::loss::cross_entropy(&logits, &v.y)?.to_scalar::<f32>()?);
        Ok(acc - 1e-4 * loss.min(10.0))
    }
}

/// Trains `net` (whose parameters are the `Var`s in `varmap`) on the digits, selecting the
/// epoch with the best validation accuracy.
pub fn fit(
    net: &DigitsNet,
    varmap: &VarMap,
    data: &DigitsSplit,
    cfg: &TrainConfig,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainReport> {
    let mut task = Supervised { net, data };
    Ok(train(&mut task, varmap, data.train.len(), cfg, on_event)?)
}

/// Runs `net` on the batch `x` once to warm up, then `reps` times, and returns the mean seconds
/// per forward pass of the whole batch.
pub fn time_forward(net: &DigitsNet, x: &Tensor, reps: usize) -> Result<f64> {
    let _ = net.forward(x)?.argmax(D::Minus1)?; // warm-up
    let start = std::time::Instant::now();
    for _ in 0..reps.max(1) {
        net.forward(x)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    }
    Ok(start.elapsed().as_secs_f64() / reps.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_parse_and_print_back() {
        for spec in ["cnn:16,32:64", "cnn:4,8:32", "mlp:128,64", "mlp"] {
            let arch: DigitsArch = spec.parse().unwrap();
            assert_eq!(arch.to_string(), spec);
        }
        assert_eq!("cnn:16,32:64".parse::<DigitsArch>().unwrap(), DigitsArch::default_cnn());
        for bad in ["cnn:16,32", "rnn:4", "mlp:128,x", "cnn:0,8:32", "cnn:4,8:0", ""] {
            let e = bad.parse::<DigitsArch>().unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")) || e.contains("widths must be"), "{bad}: {e}");
        }
    }
}
