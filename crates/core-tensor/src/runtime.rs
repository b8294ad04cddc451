//! The `Runtime` trait — prepare a layer's weights once, then run its forward many times —
//! and `ReferenceRuntime`, which dequantizes every format and runs candle: the semantics every
//! fast runtime is tested against.

use std::fmt::Debug;
use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};

use crate::act::ActQuant;
use crate::{Activation, Error, Result, Weight};

/// Convolution hyper-parameters of a [`crate::Conv2d`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    /// Zero padding on each side.
    pub padding: usize,
    /// Stride in both dimensions.
    pub stride: usize,
    /// Dilation in both dimensions.
    pub dilation: usize,
    /// Number of channel groups.
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self { padding: 0, stride: 1, dilation: 1, groups: 1 }
    }
}

/// One layer's forward, prepared by a [`Runtime`] (its weights already in the kernels' layout).
pub trait PreparedOp: Send + Sync + Debug {
    /// Runs the layer on `x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// The op as `Any`, for a runtime that recognises its own ops inside a [`crate::Graph`]
    /// (`None`, the default, makes such a runtime fall back to running the graph op by op).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// `act(forward(x))` with the activation applied while the op's output is still in cache,
    /// where the op can: the same bits as the preparing runtime's
    /// [`Runtime::activation`] of [`PreparedOp::forward`]'s output. `None` (the default) when
    /// it cannot; the caller then runs the two steps.
    fn forward_activated(&self, _x: &Tensor, _act: crate::layers::Activation) -> Option<Result<Tensor>> {
        None
    }

    /// `next(act(self(x)))`: this op, `act`, then `next` on the result, fused where the op
    /// can keep the intermediate in cache (the CPU runtime's W8A8 pair of a feed-forward
    /// block never writes its `[tokens, neurons]` intermediate out): the same bits as
    /// [`PreparedOp::forward_activated`] followed by `next`'s [`PreparedOp::forward`] on the
    /// preparing runtime. `None` (the default) when it cannot; the caller then runs the steps.
    fn forward_chain(
        &self,
        _act: crate::layers::Activation,
        _next: &dyn PreparedOp,
        _x: &Tensor,
    ) -> Option<Result<Tensor>> {
        None
    }

    /// This op and `others` on the same input `x`, sharing the work they have in common (the
    /// CPU runtime's W8A8 ops quantize `x` once for all of them): the outputs in order, this
    /// op's first, each the same bits as that op's [`PreparedOp::forward`]. `None` (the
    /// default) when the op cannot; the caller then runs each op on its own.
    fn forward_shared(&self, _others: &[&dyn PreparedOp], _x: &Tensor) -> Option<Result<Vec<Tensor>>> {
        None
    }
}

/// Something that runs layers: it prepares each layer's weights once, returning the op that
/// runs its forward. Models built from core-tensor layers run on any runtime.
pub trait Runtime: Send + Sync + Debug {
    /// A short name for reports (`reference`, `cpu`, `wgpu`, `cuda`).
    fn name(&self) -> &str;

    /// The candle device activations live on.
    fn device(&self) -> &Device;

    /// Prepares `y = x Wᵀ + b` for `weight` of shape `[out, in]` and `x` of shape `[..., in]`.
    fn prepare_linear(&self, layer: &str, weight: &Weight, bias: Option<&Tensor>) -> Result<Arc<dyn PreparedOp>>;

    /// Prepares a 2-D convolution: `weight` `[out, in/groups, kh, kw]`, `x` `[batch, in, h, w]`.
    fn prepare_conv2d(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
        params: Conv2dParams,
    ) -> Result<Arc<dyn PreparedOp>>;

    /// Prepares an embedding lookup: `weight` `[vocab, dim]`, `x` integer ids of any shape.
    fn prepare_embedding(&self, layer: &str, weight: &Weight) -> Result<Arc<dyn PreparedOp>>;

    /// Prepares `y = Q(x) Wᵀ + b` with the input quantized by `input`. The default runs
    /// [`ActQuant::fake_quantize`] before [`Runtime::prepare_linear`]'s op; runtimes with
    /// integer kernels (W8A8) override it and must agree with that reference.
    fn prepare_linear_quantized_input(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
        input: &ActQuant,
    ) -> Result<Arc<dyn PreparedOp>> {
        Ok(Arc::new(QuantizedInput { act: input.clone(), op: self.prepare_linear(layer, weight, bias)? }))
    }

    /// Multi-head scaled dot-product attention over projections `q`, `k`, `v` laid out
    /// `[batch, seq, heads·head_dim]`: per head, `softmax(Q Kᵀ·scale + mask) V`, returned as
    /// `[batch, seq, heads·head_dim]`. `mask` is additive over keys, `[batch, seq]` (0 to
    /// attend, a large negative number to ignore). The default is [`attention_reference`].
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        mask: Option<&Tensor>,
        scale: f64,
    ) -> Result<Tensor> {
        attention_reference(q, k, v, heads, mask, scale)
    }

    /// [`Runtime::attention`] at `precision`: with [`AttentionPrecision::Bf16`] the two
    /// products take bf16 operands with f32 sums ([`attention_reference_bf16`] gives the
    /// semantics, and is the default for that precision).
    #[allow(clippy::too_many_arguments)]
    fn attention_with(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        mask: Option<&Tensor>,
        scale: f64,
        precision: AttentionPrecision,
    ) -> Result<Tensor> {
        match precision {
            AttentionPrecision::F32 => self.attention(q, k, v, heads, mask, scale),
            AttentionPrecision::Bf16 => attention_reference_bf16(q, k, v, heads, mask, scale),
        }
    }

    /// `act(x)` element-wise. The default is [`Activation::forward`] in candle.
    fn activation(&self, act: Activation, x: &Tensor) -> Result<Tensor> {
        act.forward(x)
    }

    /// Layer normalisation of `x + residual` (or `x`) over the last dimension with `gamma`,
    /// `beta` and `eps`. The default is [`layer_norm_reference`].
    fn layer_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
    ) -> Result<Tensor> {
        layer_norm_reference(x, residual, gamma, beta, eps)
    }

    /// Runs `f`, a whole forward of op after op, in the runtime's execution context. The CPU
    /// runtime runs it on a thread of its pool, so each op starts its parallel work on the
    /// spot instead of handing it to the pool and sleeping until it is done (two thread
    /// switches per op, which at a few tokens cost as much as the arithmetic). The default
    /// calls `f`. Models call it through [`in_runtime`]; results are the same either way.
    fn run_scoped(&self, f: &mut (dyn FnMut() + Send)) {
        f()
    }

    /// Whether activations can stay on this runtime's device between ops, so that models hand
    /// it their whole forward as a [`crate::Graph`] ([`Runtime::run_graph`]) instead of one
    /// call per op. `false` by default.
    fn resident(&self) -> bool {
        false
    }

    /// Runs `graph` on `inputs`. The default interprets it op by op ([`crate::Graph::interpret`]);
    /// resident runtimes run it on their device with one upload and one read-back.
    fn run_graph(&self, graph: &crate::Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        graph.interpret(self, inputs)
    }

    /// Prepares a convolution whose input is quantized by `input` (see
    /// [`Runtime::prepare_linear_quantized_input`]).
    fn prepare_conv2d_quantized_input(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
        params: Conv2dParams,
        input: &ActQuant,
    ) -> Result<Arc<dyn PreparedOp>> {
        Ok(Arc::new(QuantizedInput { act: input.clone(), op: self.prepare_conv2d(layer, weight, bias, params)? }))
    }
}

/// Runs `f` through [`Runtime::run_scoped`] and returns its result (if a runtime's
/// `run_scoped` returned without calling it, `f` runs here).
pub fn in_runtime<T: Send>(rt: &dyn Runtime, f: impl FnOnce() -> T + Send) -> T {
    let mut f = Some(f);
    let mut out = None;
    rt.run_scoped(&mut || {
        if let Some(f) = f.take() {
            out = Some(f());
        }
    });
    match (out, f) {
        (Some(out), _) => out,
        (None, Some(f)) => f(),
        (None, None) => unreachable!("f ran, so out holds its result"),
    }
}

/// The reference semantics of [`Runtime::attention`] in candle.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (scores, v) = attention_scores(q, k, v, heads, mask, scale, Ok)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape(q.dims())?)
}

/// What both attention references share: the shapes checked, `q`, `k` and `v` split into
/// heads (`[batch, heads, seq, head_dim]`) and passed through `operand`, and the scores
/// `q·kᵀ·scale` plus the mask; returns the scores and the values.
fn attention_scores(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    scale: f64,
    operand: impl Fn(Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (b, t, hidden) = q.dims3()?;
    check_attention(q, k, v, heads, mask)?;
    let hs = hidden / heads;
    let split =
        |x: &Tensor| -> Result<Tensor> { operand(x.reshape((b, t, heads, hs))?.transpose(1, 2)?.contiguous()?) };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(&m.to_dtype(scores.dtype())?.reshape((b, 1, 1, t))?)?;
    }
    Ok((scores, v))
}

/// The precision of attention's two products (`Q Kᵀ` and the probabilities times `V`), a
/// property of a model like its weights' formats: the quality a pipeline measures is the
/// quality it ships.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionPrecision {
    /// f32 operands and sums.
    #[default]
    F32,
    /// Operands rounded to bf16 (to nearest, ties to even), products summed in f32: half the
    /// work where the CPU multiplies bf16 pairs (`vdpbf16ps`), with each operand's relative
    /// error at most 2⁻⁹ — below the int8 activations' of a W8A8 model.
    Bf16,
}

impl AttentionPrecision {
    /// Parses `f32` or `bf16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(Error::invalid("attention precision", format!("expected `f32` or `bf16`, found `{other}`"))),
        }
    }

    /// `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

/// The reference semantics of [`Runtime::attention_with`] at [`AttentionPrecision::Bf16`]:
/// per head, `q` and `k` rounded to bf16, scores `q·k` summed in f32, times `scale`, plus the
/// mask; the softmax numerators `e_j = exp(s_j − max)` in f32; the output
/// `Σ_j bf16(e_j)·bf16(v_j) / Σ_j e_j` (the numerators rounded, their sum not).
pub fn attention_reference_bf16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let bf = |x: &Tensor| -> Result<Tensor> { Ok(x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?) };
    let (scores, v) = attention_scores(q, k, v, heads, mask, scale, |x| bf(&x.to_dtype(DType::F32)?))?;
    let max = scores.max_keepdim(3)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let total = e.sum_keepdim(3)?;
    let out = bf(&e)?.matmul(&v)?.broadcast_div(&total)?;
    Ok(out.transpose(1, 2)?.reshape(q.dims())?)
}

/// Checks the shapes [`Runtime::attention`] takes: three equal `[batch, seq, hidden]`
/// projections, `hidden` divisible by `heads`, a `[batch, seq]` mask.
pub fn check_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<()> {
    let dims = q.dims();
    if dims.len() != 3 || k.dims() != dims || v.dims() != dims {
        return Err(Error::invalid(
            "attention",
            format!("q, k, v must be equal [batch, seq, hidden], found {dims:?}, {:?}, {:?}", k.dims(), v.dims()),
        ));
    }
    if heads == 0 || !dims[2].is_multiple_of(heads) {
        return Err(Error::invalid("attention", format!("{heads} heads do not divide the hidden size {}", dims[2])));
    }
    if let Some(m) = mask
        && m.dims() != &dims[..2]
    {
        return Err(Error::Shape {
            name: "attention mask".into(),
            expected: dims[..2].to_vec(),
            found: m.dims().to_vec(),
        });
    }
    Ok(())
}

/// The reference semantics of [`Runtime::layer_norm`] in candle: statistics in f32,
/// `(s − mean)/sqrt(var + eps)·γ + β` with `s = x + residual`.
pub fn layer_norm_reference(
    x: &Tensor,
    residual: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let s = match residual {
        Some(r) => (x + r)?,
        None => x.clone(),
    };
    let dtype = s.dtype();
    let xf = s.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed.to_dtype(dtype)?.broadcast_mul(gamma)?.broadcast_add(beta)?)
}

/// An op whose input is fake-quantized first: the reference semantics of activation
/// quantization on any runtime.
#[derive(Debug)]
struct QuantizedInput {
    act: ActQuant,
    op: Arc<dyn PreparedOp>,
}

impl PreparedOp for QuantizedInput {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.op.forward(&self.act.fake_quantize(x)?)
    }
}

/// The reference runtime: dequantize or densify each weight once, then run candle's ops.
/// Dense weights are used as they are, so autograd flows through `Var`s for training.
#[derive(Debug, Clone)]
pub struct ReferenceRuntime {
    device: Device,
}

impl ReferenceRuntime {
    /// A reference runtime on `device`.
    pub fn new(device: Device) -> Self {
        Self { device }
    }
    /// A reference runtime on the CPU.
    pub fn cpu() -> Self {
        Self::new(Device::Cpu)
    }
    /// The same runtime as a shareable trait object.
    pub fn shared(device: Device) -> Arc<dyn Runtime> {
        Arc::new(Self::new(device))
    }
}

#[derive(Debug)]
struct RefLinear {
    w: Tensor,
    b: Option<Tensor>,
}

impl PreparedOp for RefLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear_forward(x, &self.w, self.b.as_ref())
    }
}

/// `x Wᵀ + b` in candle (any leading dimensions): the reference linear op, also used by
/// runtimes that transform `W` or `x` first (QAT's fake quantization).
pub fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// A 2-D convolution plus per-channel bias in candle: the reference conv op.
pub fn conv2d_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
    let y = x.conv2d(w, p.padding, p.stride, p.dilation, p.groups)?;
    Ok(match b {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
        None => y,
    })
}

#[derive(Debug)]
struct RefConv2d {
    w: Tensor,
    b: Option<Tensor>,
    p: Conv2dParams,
}

impl PreparedOp for RefConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d_forward(x, &self.w, self.b.as_ref(), self.p)
    }
}

#[derive(Debug)]
struct RefEmbedding {
    w: Tensor,
}

impl PreparedOp for RefEmbedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        let flat = self.w.index_select(&ids.flatten_all()?, 0)?;
        dims.push(self.w.dim(D::Minus1)?);
        Ok(flat.reshape(dims)?)
    }
}

/// The weight's shape, or an error naming the layer when its rank is not `rank`.
fn check_rank(kind: &str, layer: &str, weight: &Weight, rank: usize) -> Result<Vec<usize>> {
    let shape = weight.shape();
    if shape.len() != rank {
        return Err(Error::invalid(format!("{kind} `{layer}`"), format!("weight must be {rank}-D, found {shape:?}")));
    }
    Ok(shape)
}

/// Checks that a layer's bias holds one value per output (`out`), with a shape error naming
/// `LAYER.bias` otherwise. Every runtime calls it at `prepare`.
pub fn check_bias(layer: &str, bias: Option<&Tensor>, out: usize) -> Result<()> {
    match bias {
        Some(b) if b.dims() != [out] => {
            Err(Error::Shape { name: format!("{layer}.bias"), expected: vec![out], found: b.dims().to_vec() })
        }
        _ => Ok(()),
    }
}

impl Runtime for ReferenceRuntime {
    fn name(&self) -> &str {
        "reference"
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn prepare_linear(&self, layer: &str, weight: &Weight, bias: Option<&Tensor>) -> Result<Arc<dyn PreparedOp>> {
        let shape = check_rank("linear layer", layer, weight, 2)?;
        check_bias(layer, bias, shape[0])?;
        Ok(Arc::new(RefLinear { w: weight.to_dense(&self.device)?, b: bias.cloned() }))
    }

    fn prepare_conv2d(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
        params: Conv2dParams,
    ) -> Result<Arc<dyn PreparedOp>> {
        let shape = check_rank("conv2d layer", layer, weight, 4)?;
        check_bias(layer, bias, shape[0])?;
        Ok(Arc::new(RefConv2d { w: weight.to_dense(&self.device)?, b: bias.cloned(), p: params }))
    }

    fn prepare_embedding(&self, layer: &str, weight: &Weight) -> Result<Arc<dyn PreparedOp>> {
        check_rank("embedding", layer, weight, 2)?;
        Ok(Arc::new(RefEmbedding { w: weight.to_dense(&self.device)? }))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::testing::max_abs_diff;
    use crate::{SparseTensor, Weight};

    #[test]
    fn every_format_runs_as_its_dense_equivalent() {
        let dev = Device::Cpu;
        // A conv weight with 2:4 structure along the flattened input axis (in·kh·kw = 8).
        let w = Tensor::new(&[1f32, 0., -2., 0., 0., 3., 0., 0.5, 0., 0., 1., 1., -1., 0., 0., 2.], &dev)
            .unwrap()
            .reshape((2, 2, 2, 2))
            .unwrap();
        let x = Tensor::arange(0f32, 32., &dev).unwrap().reshape((1, 2, 4, 4)).unwrap();
        let b = Tensor::new(&[0.5f32, -1.0], &dev).unwrap();
        let rt = ReferenceRuntime::cpu();
        let p = Conv2dParams { padding: 1, ..Default::default() };
        let dense = rt.prepare_conv2d("c", &Weight::Dense(w.clone()), Some(&b), p).unwrap().forward(&x).unwrap();
        for sparse in [
            SparseTensor::nm_from_dense(&w, 2, 4, "c").unwrap(),
            SparseTensor::csr_from_dense(&w, "c").unwrap(),
            SparseTensor::block_from_dense(&w, 1, 2, "c").unwrap(),
        ] {
            let y = rt.prepare_conv2d("c", &Weight::Sparse(sparse), Some(&b), p).unwrap().forward(&x).unwrap();
            assert_eq!(max_abs_diff(&dense, &y).unwrap(), 0.0);
        }
        // Embedding lookups of any id shape.
        let table = Tensor::arange(0f32, 12., &dev).unwrap().reshape((4, 3)).unwrap();
        let ids = Tensor::new(&[[3u32, 0], [1, 1]], &dev).unwrap();
        let e = rt.prepare_embedding("e", &Weight::Dense(table)).unwrap().forward(&ids).unwrap();
        assert_eq!(e.dims(), &[2, 2, 3]);
        assert_eq!(
            e.to_dtype(DType::F32).unwrap().get(0).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap(),
            [9., 10., 11.]
        );
    }

    #[test]
    fn shape_errors_name_the_layer() {
        let dev = Device::Cpu;
        let rt = ReferenceRuntime::cpu();
        let w = Weight::Dense(Tensor::zeros((3, 4), DType::F32, &dev).unwrap());
        let e = rt.prepare_linear("enc.fc", &w, Some(&Tensor::zeros(4, DType::F32, &dev).unwrap())).unwrap_err();
        assert_eq!(e.to_string(), "`enc.fc.bias`: expected shape [3], found [4]");
        let e = rt.prepare_conv2d("enc.conv", &w, None, Conv2dParams::default()).unwrap_err();
        assert!(e.to_string().contains("conv2d layer `enc.conv`") && e.to_string().contains("4-D"), "{e}");
    }
}
