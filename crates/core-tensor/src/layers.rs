//! Layers that hold [`Weight`]s and run on any [`Runtime`]: `Linear`, `Conv2d`, `Embedding`,
//! `LayerNorm` and activations. Each knows its parameter path, so recipes, masks and reports
//! can name it.

use std::sync::Arc;

use candle_core::Tensor;

use crate::act::{ActQuant, ActRange};
use crate::hooks::{Hooks, LayerKind, Site};
use crate::runtime::{Conv2dParams, PreparedOp, ReferenceRuntime, Runtime};
use crate::{Error, Result, Weight};

fn reference_for(weight: &Weight) -> Arc<dyn Runtime> {
    let device = match weight {
        Weight::Dense(t) => t.device().clone(),
        _ => candle_core::Device::Cpu,
    };
    Arc::new(ReferenceRuntime::new(device))
}

macro_rules! weighted_layer_common {
    () => {
        /// The parameter path (`encoder.layer.0.attention.self.query`).
        pub fn path(&self) -> &str {
            &self.path
        }
        /// The weight.
        pub fn weight(&self) -> &Weight {
            &self.weight
        }
        /// The runtime this layer is prepared on.
        pub fn runtime(&self) -> &Arc<dyn Runtime> {
            &self.runtime
        }
        /// The op the runtime prepared (what a [`crate::graph::Step::Op`] runs).
        pub fn op(&self) -> &Arc<dyn PreparedOp> {
            &self.op
        }
        /// Re-prepares the layer's weights on `runtime`.
        pub fn prepare(&mut self, runtime: &Arc<dyn Runtime>) -> Result<()> {
            self.op = self.build_op(runtime.as_ref())?;
            self.runtime = runtime.clone();
            Ok(())
        }
        /// Replaces the weight (same logical shape) and re-prepares it on the current runtime.
        pub fn set_weight(&mut self, weight: Weight) -> Result<()> {
            if weight.shape() != self.weight.shape() {
                return Err(Error::Shape {
                    name: format!("{}.weight", self.path),
                    expected: self.weight.shape(),
                    found: weight.shape(),
                });
            }
            let old = std::mem::replace(&mut self.weight, weight);
            match self.build_op(self.runtime.clone().as_ref()) {
                Ok(op) => {
                    self.op = op;
                    Ok(())
                }
                Err(e) => {
                    self.weight = old;
                    Err(e)
                }
            }
        }
    };
}

macro_rules! input_quant_common {
    ($per_token_ok:expr) => {
        /// How the layer's input is quantized, if it is.
        pub fn input_quant(&self) -> Option<&ActQuant> {
            self.input_quant.as_ref()
        }
        /// Quantizes (or, with `None`, stops quantizing) the layer's input and re-prepares it.
        /// The spec is validated first; on error the layer is unchanged.
        pub fn set_input_quant(&mut self, spec: Option<ActQuant>) -> Result<()> {
            if let Some(a) = &spec {
                a.validate(&self.path)?;
                let cols: usize = self.weight.shape()[1..].iter().product();
                match &a.smooth {
                    Some(s) if !$per_token_ok || s.len() != cols => {
                        return Err(Error::invalid(
                            format!("activation quantization of `{}`", self.path),
                            format!(
                                "smoothing needs a linear layer and one factor per input channel: expected {cols}, found {}",
                                s.len()
                            ),
                        ));
                    }
                    _ => {}
                }
                if !$per_token_ok && matches!(a.range, ActRange::Dynamic { per_token: true }) {
                    return Err(Error::invalid(
                        format!("activation quantization of `{}`", self.path),
                        "per-token ranges apply to linear layers; use a per-tensor or static range",
                    ));
                }
            }
            let old = std::mem::replace(&mut self.input_quant, spec);
            match self.build_op(self.runtime.clone().as_ref()) {
                Ok(op) => {
                    self.op = op;
                    Ok(())
                }
                Err(e) => {
                    self.input_quant = old;
                    Err(e)
                }
            }
        }
    };
}

/// `y = x Wᵀ + b` with `W` of shape `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    path: String,
    weight: Weight,
    bias: Option<Tensor>,
    input_quant: Option<ActQuant>,
    runtime: Arc<dyn Runtime>,
    op: Arc<dyn PreparedOp>,
}

impl Linear {
    /// A linear layer prepared on the reference runtime.
    pub fn new(path: impl Into<String>, weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        let runtime = reference_for(&weight);
        let path = path.into();
        let op = runtime.prepare_linear(&path, &weight, bias.as_ref())?;
        Ok(Self { path, weight, bias, input_quant: None, runtime, op })
    }
    fn build_op(&self, rt: &dyn Runtime) -> Result<Arc<dyn PreparedOp>> {
        match &self.input_quant {
            Some(a) => rt.prepare_linear_quantized_input(&self.path, &self.weight, self.bias.as_ref(), a),
            None => rt.prepare_linear(&self.path, &self.weight, self.bias.as_ref()),
        }
    }
    weighted_layer_common!();
    input_quant_common!(true);
    /// The bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        let s = self.weight.shape();
        (s[0], s[1])
    }
    /// Runs the layer, reporting to `hooks`.
    pub fn forward_hooked(&self, x: &Tensor, hooks: &mut Hooks<'_>) -> Result<Tensor> {
        let y = self.op.forward(x)?;
        if !hooks.is_empty() {
            let shape = self.weight.shape();
            hooks.emit(&Site { path: &self.path, kind: LayerKind::Linear, weight_shape: &shape }, x, &y)?;
        }
        Ok(y)
    }
    /// Runs the layer.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.op.forward(x)
    }
    /// Several layers on the same input `x` (an attention block's query, key and value
    /// projections), reporting to `hooks`: one call of the first op for all when it can share
    /// their common work ([`PreparedOp::forward_shared`], the same bits) and no hook needs to
    /// see the layers one by one; each layer's own forward otherwise.
    pub fn forward_shared(layers: &[&Linear], x: &Tensor, hooks: &mut Hooks<'_>) -> Result<Vec<Tensor>> {
        if let [first, rest @ ..] = layers
            && hooks.is_empty()
        {
            let others: Vec<&dyn PreparedOp> = rest.iter().map(|l| l.op.as_ref()).collect();
            if let Some(ys) = first.op.forward_shared(&others, x) {
                let ys = ys?;
                if ys.len() != layers.len() {
                    return Err(Error::invalid(
                        format!("shared forward of `{}`", first.path),
                        format!("one output per layer ({}), found {}", layers.len(), ys.len()),
                    ));
                }
                return Ok(ys);
            }
        }
        layers.iter().map(|l| l.forward_hooked(x, hooks)).collect()
    }
    /// Runs the layer, reporting to `hooks`, then `act` on its runtime: fused into the op
    /// when the op offers it ([`PreparedOp::forward_activated`], the same bits) and no hook
    /// needs the output before the activation.
    pub fn forward_activated(&self, x: &Tensor, act: Activation, hooks: &mut Hooks<'_>) -> Result<Tensor> {
        if hooks.is_empty()
            && let Some(y) = self.op.forward_activated(x, act)
        {
            return y;
        }
        let y = self.forward_hooked(x, hooks)?;
        self.runtime.activation(act, &y)
    }
    /// `next(act(self(x)))` (a feed-forward block), reporting to `hooks`: one fused call when
    /// the op offers it ([`PreparedOp::forward_chain`], the same bits) and no hook needs the
    /// intermediate; [`Linear::forward_activated`] then `next`'s forward otherwise.
    pub fn forward_chain(&self, act: Activation, next: &Linear, x: &Tensor, hooks: &mut Hooks<'_>) -> Result<Tensor> {
        if hooks.is_empty()
            && let Some(y) = self.op.forward_chain(act, next.op.as_ref(), x)
        {
            return y;
        }
        let h = self.forward_activated(x, act, hooks)?;
        next.forward_hooked(&h, hooks)
    }
}

/// A 2-D convolution with weight `[out, in/groups, kh, kw]`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    path: String,
    weight: Weight,
    bias: Option<Tensor>,
    params: Conv2dParams,
    input_quant: Option<ActQuant>,
    runtime: Arc<dyn Runtime>,
    op: Arc<dyn PreparedOp>,
}

impl Conv2d {
    /// A convolution prepared on the reference runtime.
    pub fn new(path: impl Into<String>, weight: Weight, bias: Option<Tensor>, params: Conv2dParams) -> Result<Self> {
        let runtime = reference_for(&weight);
        let path = path.into();
        let op = runtime.prepare_conv2d(&path, &weight, bias.as_ref(), params)?;
        Ok(Self { path, weight, bias, params, input_quant: None, runtime, op })
    }
    fn build_op(&self, rt: &dyn Runtime) -> Result<Arc<dyn PreparedOp>> {
        match &self.input_quant {
            Some(a) => rt.prepare_conv2d_quantized_input(&self.path, &self.weight, self.bias.as_ref(), self.params, a),
            None => rt.prepare_conv2d(&self.path, &self.weight, self.bias.as_ref(), self.params),
        }
    }
    weighted_layer_common!();
    input_quant_common!(false);
    /// The bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// Padding, stride, dilation, groups.
    pub fn params(&self) -> Conv2dParams {
        self.params
    }
    /// Runs the layer, reporting to `hooks`.
    pub fn forward_hooked(&self, x: &Tensor, hooks: &mut Hooks<'_>) -> Result<Tensor> {
        let y = self.op.forward(x)?;
        if !hooks.is_empty() {
            let shape = self.weight.shape();
            hooks.emit(&Site { path: &self.path, kind: LayerKind::Conv2d, weight_shape: &shape }, x, &y)?;
        }
        Ok(y)
    }
}

/// A lookup table `[vocab, dim]` indexed by integer ids.
#[derive(Debug, Clone)]
pub struct Embedding {
    path: String,
    weight: Weight,
    runtime: Arc<dyn Runtime>,
    op: Arc<dyn PreparedOp>,
}

impl Embedding {
    /// An embedding prepared on the reference runtime.
    pub fn new(path: impl Into<String>, weight: Weight) -> Result<Self> {
        let runtime = reference_for(&weight);
        let path = path.into();
        let op = runtime.prepare_embedding(&path, &weight)?;
        Ok(Self { path, weight, runtime, op })
    }
    fn build_op(&self, rt: &dyn Runtime) -> Result<Arc<dyn PreparedOp>> {
        rt.prepare_embedding(&self.path, &self.weight)
    }
    weighted_layer_common!();
    /// Looks up `ids` (u32 or i64 of any shape), reporting to `hooks`.
    pub fn forward_hooked(&self, ids: &Tensor, hooks: &mut Hooks<'_>) -> Result<Tensor> {
        let y = self.op.forward(ids)?;
        if !hooks.is_empty() {
            let shape = self.weight.shape();
            hooks.emit(&Site { path: &self.path, kind: LayerKind::Embedding, weight_shape: &shape }, ids, &y)?;
        }
        Ok(y)
    }
}

/// Layer normalisation over the last dimension: `(x − mean) / sqrt(var + eps) · γ + β`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    path: String,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A layer norm with `weight` (γ) and `bias` (β), both `[dim]`.
    pub fn new(path: impl Into<String>, weight: Tensor, bias: Tensor, eps: f64) -> Result<Self> {
        let path = path.into();
        if weight.rank() != 1 || bias.dims() != weight.dims() {
            return Err(Error::Shape {
                name: format!("{path}.bias"),
                expected: weight.dims().to_vec(),
                found: bias.dims().to_vec(),
            });
        }
        Ok(Self { path, weight, bias, eps })
    }
    /// The parameter path.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// γ.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// β.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
    /// ε.
    pub fn eps(&self) -> f64 {
        self.eps
    }
    /// Normalises `x` over its last dimension, reporting to `hooks`.
    pub fn forward_hooked(&self, x: &Tensor, hooks: &mut Hooks<'_>) -> Result<Tensor> {
        let y = crate::runtime::layer_norm_reference(x, None, &self.weight, &self.bias, self.eps)?;
        self.emit(x, &y, hooks)?;
        Ok(y)
    }

    /// Normalises `x + residual` on `runtime` (which may fuse the addition), reporting the sum
    /// and the result to `hooks`.
    pub fn forward_on(
        &self,
        runtime: &dyn Runtime,
        x: &Tensor,
        residual: Option<&Tensor>,
        hooks: &mut Hooks<'_>,
    ) -> Result<Tensor> {
        if hooks.is_empty() {
            return runtime.layer_norm(x, residual, &self.weight, &self.bias, self.eps);
        }
        let s = match residual {
            Some(r) => (x + r)?,
            None => x.clone(),
        };
        let y = runtime.layer_norm(&s, None, &self.weight, &self.bias, self.eps)?;
        self.emit(&s, &y, hooks)?;
        Ok(y)
    }

    fn emit(&self, x: &Tensor, y: &Tensor, hooks: &mut Hooks<'_>) -> Result<()> {
        if !hooks.is_empty() {
            let shape = [self.weight.dim(0)?];
            hooks.emit(&Site { path: &self.path, kind: LayerKind::LayerNorm, weight_shape: &shape }, x, y)?;
        }
        Ok(())
    }
}

/// Element-wise activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// max(0, x).
    Relu,
    /// The exact GELU, x·Φ(x) (BERT's `gelu`).
    Gelu,
    /// GELU's tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// tanh(x).
    Tanh,
    /// 1 / (1 + e^−x).
    Sigmoid,
    /// x·sigmoid(x).
    Silu,
    /// x.
    Identity,
}

impl Activation {
    /// Applies the activation.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Relu => x.relu()?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Tanh => x.tanh()?,
            Activation::Sigmoid => candle_nn::ops::sigmoid(x)?,
            Activation::Silu => x.silu()?,
            Activation::Identity => x.clone(),
        })
    }

    /// Parses a Hugging Face `hidden_act` name.
    pub fn from_hf_name(name: &str) -> Result<Self> {
        Ok(match name {
            "relu" => Activation::Relu,
            "gelu" | "gelu_python" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "tanh" => Activation::Tanh,
            "sigmoid" => Activation::Sigmoid,
            "silu" | "swish" => Activation::Silu,
            "linear" | "identity" => Activation::Identity,
            other => {
                return Err(Error::invalid(
                    "activation",
                    format!("expected one of relu, gelu, gelu_new, tanh, sigmoid, silu; found `{other}`"),
                ));
            }
        })
    }
}
