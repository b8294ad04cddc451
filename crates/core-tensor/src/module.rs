//! Models as trees of named layers: the [`Module`] trait gives path access to every layer, and
//! [`WeightSource`] builds layers from loaded files or from a seeded initialisation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::act::ActQuant;
use crate::hooks::LayerKind;
use crate::layers::{Conv2d, Embedding, LayerNorm, Linear};
use crate::{Error, Result, Runtime, Weight};

/// A shared borrow of one layer of a model.
#[derive(Debug, Clone, Copy)]
pub enum LayerRef<'a> {
    /// A linear layer.
    Linear(&'a Linear),
    /// A convolution.
    Conv2d(&'a Conv2d),
    /// An embedding table.
    Embedding(&'a Embedding),
    /// A layer norm.
    LayerNorm(&'a LayerNorm),
}

/// A mutable borrow of one layer of a model.
#[derive(Debug)]
pub enum LayerMut<'a> {
    /// A linear layer.
    Linear(&'a mut Linear),
    /// A convolution.
    Conv2d(&'a mut Conv2d),
    /// An embedding table.
    Embedding(&'a mut Embedding),
    /// A layer norm.
    LayerNorm(&'a mut LayerNorm),
}

impl<'a> LayerRef<'a> {
    /// The layer's parameter path.
    pub fn path(&self) -> &'a str {
        match self {
            LayerRef::Linear(l) => l.path(),
            LayerRef::Conv2d(l) => l.path(),
            LayerRef::Embedding(l) => l.path(),
            LayerRef::LayerNorm(l) => l.path(),
        }
    }
    /// The layer's kind.
    pub fn kind(&self) -> LayerKind {
        match self {
            LayerRef::Linear(_) => LayerKind::Linear,
            LayerRef::Conv2d(_) => LayerKind::Conv2d,
            LayerRef::Embedding(_) => LayerKind::Embedding,
            LayerRef::LayerNorm(_) => LayerKind::LayerNorm,
        }
    }
    /// How the layer's input is quantized (linear and convolution layers only).
    pub fn input_quant(&self) -> Option<ActQuant> {
        match self {
            LayerRef::Linear(l) => l.input_quant().cloned(),
            LayerRef::Conv2d(l) => l.input_quant().cloned(),
            _ => None,
        }
    }
    /// The layer's named parameters (`path.weight`, `path.bias`) as weights.
    pub fn parameters(&self) -> Vec<(String, Weight)> {
        let p = self.path();
        let mut out = Vec::new();
        let (w, b) = match self {
            LayerRef::Linear(l) => (l.weight().clone(), l.bias().cloned()),
            LayerRef::Conv2d(l) => (l.weight().clone(), l.bias().cloned()),
            LayerRef::Embedding(l) => (l.weight().clone(), None),
            LayerRef::LayerNorm(l) => (Weight::Dense(l.weight().clone()), Some(l.bias().clone())),
        };
        out.push((format!("{p}.weight"), w));
        if let Some(b) = b {
            out.push((format!("{p}.bias"), Weight::Dense(b)));
        }
        out
    }
}

impl LayerMut<'_> {
    /// The layer's parameter path.
    pub fn path(&self) -> &str {
        match self {
            LayerMut::Linear(l) => l.path(),
            LayerMut::Conv2d(l) => l.path(),
            LayerMut::Embedding(l) => l.path(),
            LayerMut::LayerNorm(l) => l.path(),
        }
    }
    /// Replaces the main weight of a weighted layer (linear, conv, embedding).
    pub fn set_weight(&mut self, weight: Weight) -> Result<()> {
        match self {
            LayerMut::Linear(l) => l.set_weight(weight),
            LayerMut::Conv2d(l) => l.set_weight(weight),
            LayerMut::Embedding(l) => l.set_weight(weight),
            LayerMut::LayerNorm(l) => {
                Err(Error::invalid(format!("layer `{}`", l.path()), "a layer norm's weight stays dense"))
            }
        }
    }
    /// Sets how the layer's input is quantized; only linear and convolution layers take one.
    pub fn set_input_quant(&mut self, spec: Option<ActQuant>) -> Result<()> {
        match self {
            LayerMut::Linear(l) => l.set_input_quant(spec),
            LayerMut::Conv2d(l) => l.set_input_quant(spec),
            LayerMut::Embedding(l) if spec.is_some() => {
                Err(Error::invalid(format!("layer `{}`", l.path()), "an embedding's input is integer ids"))
            }
            LayerMut::LayerNorm(l) if spec.is_some() => Err(Error::invalid(
                format!("layer `{}`", l.path()),
                "activation quantization applies to linear and convolution inputs",
            )),
            _ => Ok(()),
        }
    }
    /// Prepares the layer on `runtime` (layer norms run on candle and need nothing).
    pub fn prepare(&mut self, runtime: &Arc<dyn Runtime>) -> Result<()> {
        match self {
            LayerMut::Linear(l) => l.prepare(runtime),
            LayerMut::Conv2d(l) => l.prepare(runtime),
            LayerMut::Embedding(l) => l.prepare(runtime),
            LayerMut::LayerNorm(_) => Ok(()),
        }
    }
}

/// A model whose layers are reachable by parameter path.
pub trait Module {
    /// Every layer, in forward order.
    fn layers(&self) -> Vec<LayerRef<'_>>;
    /// Every layer, mutably, in forward order.
    fn layers_mut(&mut self) -> Vec<LayerMut<'_>>;

    /// The path of the final classifier, if the model has one. Transforms keep it in float by
    /// default, as the field's tools do, because it is small and sensitive.
    fn classifier_path(&self) -> Option<String> {
        None
    }

    /// The layer at `path`, or an [`Error::Unknown`] naming the closest paths.
    fn layer(&self, path: &str) -> Result<LayerRef<'_>> {
        let layers = self.layers();
        match layers.iter().position(|l| l.path() == path) {
            Some(i) => Ok(layers[i]),
            None => Err(Error::unknown("layer", path, layers.iter().map(|l| l.path()))),
        }
    }

    /// The layer at `path`, mutably.
    fn layer_mut(&mut self, path: &str) -> Result<LayerMut<'_>> {
        let known: Vec<String> = self.layers().iter().map(|l| l.path().to_string()).collect();
        match self.layers_mut().into_iter().find(|l| l.path() == path) {
            Some(l) => Ok(l),
            None => Err(Error::unknown("layer", path, known.iter().map(String::as_str))),
        }
    }

    /// Prepares every layer on `runtime`.
    fn prepare(&mut self, runtime: &Arc<dyn Runtime>) -> Result<()> {
        for mut l in self.layers_mut() {
            l.prepare(runtime)?;
        }
        Ok(())
    }

    /// Every parameter by name (`path.weight`, `path.bias`), in sorted order.
    fn named_weights(&self) -> BTreeMap<String, Weight> {
        self.layers().iter().flat_map(|l| l.parameters()).collect()
    }

    /// The number of parameters (logical elements of every weight and bias).
    fn parameter_count(&self) -> usize {
        self.named_weights().values().map(Weight::numel).sum()
    }

    /// Bytes every parameter occupies in storage, in its current format.
    fn storage_bytes(&self) -> usize {
        self.named_weights().values().map(Weight::storage_bytes).sum()
    }
}

/// How a freshly initialised parameter is filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Uniform in `[-bound, bound]` (PyTorch's default for linear and conv: `1/sqrt(fan_in)`).
    Uniform {
        /// Half-width of the interval.
        bound: f64,
    },
    /// Normal with mean 0.
    Normal {
        /// Standard deviation.
        std: f64,
    },
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
}

/// Where a model's parameters come from when it is built.
pub trait WeightSource {
    /// The weight at `name` with `shape`; `init` says how to fill a fresh one.
    fn weight(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Weight>;

    /// A dense tensor (layer-norm parameters, biases) at `name` with `shape`.
    fn tensor(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        match self.weight(name, shape, init)? {
            Weight::Dense(t) => Ok(t),
            other => Err(Error::invalid(
                format!("parameter `{name}`"),
                format!("expected a dense tensor, found {}", other.describe()),
            )),
        }
    }
}

/// Parameters read from a file (see [`crate::io::load_weights`]), checked for shape; every
/// dense parameter becomes a trainable `Var` when `trainable` is set (for fine-tuning).
pub struct LoadedWeights {
    weights: BTreeMap<String, Weight>,
    used: BTreeSet<String>,
    device: Device,
    varmap: Option<VarMap>,
    frozen: Vec<String>,
}

impl LoadedWeights {
    /// Serves `weights` for inference.
    pub fn new(weights: BTreeMap<String, Weight>, device: Device) -> Self {
        Self { weights, used: BTreeSet::new(), device, varmap: None, frozen: Vec::new() }
    }
    /// Serves `weights` with dense ones wrapped as `Var`s registered in `varmap`.
    pub fn trainable(weights: BTreeMap<String, Weight>, device: Device, varmap: VarMap) -> Self {
        Self { weights, used: BTreeSet::new(), device, varmap: Some(varmap), frozen: Vec::new() }
    }
    /// Keeps the parameters whose names start with one of `prefixes` constant (not `Var`s):
    /// a trainable source with frozen parts, such as an encoder's embedding tables.
    pub fn freeze(mut self, prefixes: Vec<String>) -> Self {
        self.frozen = prefixes;
        self
    }
    /// Names that no layer asked for (a sign of a config/weights mismatch).
    pub fn unused(&self) -> Vec<&str> {
        self.weights.keys().filter(|k| !self.used.contains(*k)).map(String::as_str).collect()
    }
}

impl WeightSource for LoadedWeights {
    fn weight(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<Weight> {
        let w = self
            .weights
            .get(name)
            .ok_or_else(|| Error::unknown("tensor", name, self.weights.keys().map(String::as_str)))?;
        if w.shape() != shape {
            return Err(Error::Shape { name: name.to_string(), expected: shape.to_vec(), found: w.shape() });
        }
        self.used.insert(name.to_string());
        Ok(match (w, &self.varmap) {
            (Weight::Dense(t), Some(vm)) if !self.frozen.iter().any(|p| name.starts_with(p.as_str())) => {
                let var = Var::from_tensor(&t.to_device(&self.device)?.to_dtype(DType::F32)?)?;
                let t = var.as_tensor().clone();
                vm.data().lock().expect("varmap lock poisoned").insert(name.to_string(), var);
                Weight::Dense(t)
            }
            (Weight::Dense(t), _) => Weight::Dense(t.to_device(&self.device)?),
            (other, _) => other.clone(),
        })
    }
}

/// Fresh parameters from a seeded ChaCha8 generator, registered as `Var`s in a `VarMap`.
/// Parameters are drawn in the order the model asks for them, so the same seed and
/// architecture give the same bytes on every machine.
pub struct InitWeights {
    rng: ChaCha8Rng,
    device: Device,
    varmap: VarMap,
}

impl InitWeights {
    /// A seeded initialiser that registers its parameters in `varmap`.
    pub fn new(seed: u64, device: Device, varmap: VarMap) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed), device, varmap }
    }
}

impl WeightSource for InitWeights {
    fn weight(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Weight> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Uniform { bound } => (0..n).map(|_| self.rng.random_range(-bound..=bound) as f32).collect(),
            Init::Normal { std } => (0..n)
                .map(|_| {
                    // Box–Muller keeps the stream ours (no distribution crate's algorithm changes).
                    let u1: f64 = self.rng.random_range(f64::EPSILON..1.0);
                    let u2: f64 = self.rng.random();
                    (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                })
                .collect(),
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, &self.device)?)?;
        let t = var.as_tensor().clone();
        self.varmap.data().lock().expect("varmap lock poisoned").insert(name.to_string(), var);
        Ok(Weight::Dense(t))
    }
}

impl std::fmt::Debug for LoadedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedWeights").field("weights", &self.weights.len()).field("used", &self.used.len()).finish()
    }
}

impl std::fmt::Debug for InitWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitWeights").field("device", &self.device).finish()
    }
}
