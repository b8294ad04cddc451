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
    Weight, WeightSource, metrics,
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

/// A small CNN: convolutions (3×3 unless `kernels` says otherwise, "same" padding) each
/// followed by the activation, a 2×2 max-pool, then a hidden linear layer (activation again)
/// and the classifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CnnConfig {
    /// Output channels of each convolution.
    pub channels: Vec<usize>,
    /// Width of the hidden linear layer.
    pub hidden: usize,
    /// Odd kernel size of each convolution; empty means 3×3 everywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<usize>,
    /// The activation, by its Hugging Face name (`relu`, `gelu`, `silu`, `tanh`, ...).
    #[serde(default = "relu", skip_serializing_if = "is_relu")]
    pub activation: String,
}

fn relu() -> String {
    "relu".into()
}

fn is_relu(a: &String) -> bool {
    a == "relu"
}

impl CnnConfig {
    /// The demo CNN's layout with these channels and hidden width: 3×3 kernels, ReLU.
    pub fn new(channels: Vec<usize>, hidden: usize) -> Self {
        Self { channels, hidden, kernels: Vec::new(), activation: relu() }
    }

    /// The kernel size of convolution `k`.
    pub fn kernel(&self, k: usize) -> usize {
        self.kernels.get(k).copied().unwrap_or(3)
    }
}

/// The operation on one edge of a cell (the NAS-Bench-201 operation set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CellOp {
    /// No connection: the edge contributes zeros.
    None,
    /// Identity.
    Skip,
    /// ReLU then a 1×1 convolution.
    Conv1x1,
    /// ReLU then a 3×3 convolution (padding 1).
    Conv3x3,
    /// 3×3 average pooling, stride 1, zero padding 1 (counted in the average).
    Avg3x3,
}

impl CellOp {
    /// Every operation, in the order their indices refer to.
    pub const ALL: [CellOp; 5] = [CellOp::None, CellOp::Skip, CellOp::Conv1x1, CellOp::Conv3x3, CellOp::Avg3x3];

    /// The spec name (`none`, `skip`, `conv1x1`, `conv3x3`, `avg3x3`).
    pub fn name(self) -> &'static str {
        match self {
            CellOp::None => "none",
            CellOp::Skip => "skip",
            CellOp::Conv1x1 => "conv1x1",
            CellOp::Conv3x3 => "conv3x3",
            CellOp::Avg3x3 => "avg3x3",
        }
    }

    /// The kernel size of a convolution, `None` for the parameter-free operations.
    pub fn kernel(self) -> Option<usize> {
        match self {
            CellOp::Conv1x1 => Some(1),
            CellOp::Conv3x3 => Some(3),
            _ => None,
        }
    }

    /// Applies a parameter-free operation (`None`: zeros; `Skip`; `Avg3x3`); a convolution is
    /// `conv.forward(relu(x))` and is the caller's.
    pub fn apply_fixed(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            CellOp::None => x.zeros_like(),
            CellOp::Skip => Ok(x.clone()),
            CellOp::Avg3x3 => {
                let p = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
                if !p.track_op() {
                    return p.avg_pool2d_with_stride(3, 1);
                }
                // Under autograd: the sum of the nine shifted windows (candle's avg_pool2d has
                // no gradient when windows overlap, and DARTS trains through this operation).
                let (h, w) = (x.dim(2)?, x.dim(3)?);
                let mut sum = p.narrow(2, 0, h)?.narrow(3, 0, w)?;
                for k in 1..9 {
                    sum = (sum + p.narrow(2, k / 3, h)?.narrow(3, k % 3, w)?)?;
                }
                sum / 9.0
            }
            CellOp::Conv1x1 | CellOp::Conv3x3 => {
                Err(candle_core::Error::Msg(format!("{} has weights: apply it with its convolution", self.name())))
            }
        }
    }
}

impl std::str::FromStr for CellOp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        CellOp::ALL.into_iter().find(|o| o.name() == s).ok_or_else(|| Error::Config {
            what: "cell operation",
            detail: format!("expected one of {}, found `{s}`", CellOp::ALL.map(CellOp::name).join(", ")),
        })
    }
}

/// A cell-based CNN (the NAS-Bench-201 design, sized for 8×8 digits): a 3×3 stem convolution
/// to `channels`, then `cells` copies of one cell, ReLU, a 2×2 max-pool and the classifier.
///
/// A cell is a DAG on nodes 0..=k: node 0 is the cell's input and node j > 0 sums one
/// operation applied to each earlier node; node k is the output. `ops` lists the operation of
/// each edge i→j ordered by j, then i — for k = 3: 0→1, 0→2, 1→2, 0→3, 1→3, 2→3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellConfig {
    /// Channels of the stem and of every cell.
    pub channels: usize,
    /// How many times the cell is repeated.
    pub cells: usize,
    /// One operation per edge (k(k+1)/2 of them for k intermediate nodes).
    pub ops: Vec<CellOp>,
}

impl CellConfig {
    /// Intermediate nodes of a cell with `edges` edges (`None` unless `edges` = k(k+1)/2).
    pub fn nodes_for(edges: usize) -> Option<usize> {
        (1..=16).find(|k| k * (k + 1) / 2 == edges)
    }

    /// The edges `(from, to)` in `ops` order, for a cell with `nodes` intermediate nodes.
    pub fn edges(nodes: usize) -> Vec<(usize, usize)> {
        (1..=nodes).flat_map(|j| (0..j).map(move |i| (i, j))).collect()
    }

    /// Runs one cell of `nodes` intermediate nodes on `input` (node 0): node j is the sum, in
    /// order, of the terms `edge(e, node_i)` returns for its incoming edges e = (i, j) in
    /// [`CellConfig::edges`] order (none for a `none` edge, one per operation of a mixed edge),
    /// or zeros when nothing reaches it. Returns the last node. The cell network and the
    /// search supernets share this walk; they differ only in `edge`.
    pub fn walk<E: From<candle_core::Error>>(
        nodes: usize,
        input: Tensor,
        mut edge: impl FnMut(usize, &Tensor) -> std::result::Result<Vec<Tensor>, E>,
    ) -> std::result::Result<Tensor, E> {
        let edges = Self::edges(nodes);
        let mut node = vec![input];
        for j in 1..=nodes {
            let mut sum: Option<Tensor> = None;
            for (e, &(i, _)) in edges.iter().enumerate().filter(|(_, (_, to))| *to == j) {
                for y in edge(e, &node[i])? {
                    sum = Some(match sum {
                        Some(s) => (s + y)?,
                        None => y,
                    });
                }
            }
            let zeros = node[0].zeros_like()?;
            node.push(sum.unwrap_or(zeros));
        }
        Ok(node.pop().expect("the output node"))
    }
}

/// The architecture of a digits model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "arch")]
pub enum DigitsArch {
    /// See [`MlpConfig`].
    Mlp(MlpConfig),
    /// See [`CnnConfig`].
    Cnn(CnnConfig),
    /// See [`CellConfig`].
    Cell(CellConfig),
}

impl std::str::FromStr for DigitsArch {
    type Err = Error;

    /// `mlp:H1,H2,...` (hidden widths), `cnn:C1,C2,...:H` (convolution channels, hidden
    /// width) or `cell:CxN:OP,OP,...` (channels, cell repeats, one operation per edge):
    /// `cnn:16,32:64` is the demo's teacher, `mlp:128,64` the default MLP,
    /// `cell:16x2:conv3x3,skip,conv3x3,avg3x3,none,conv1x1` a cell network.
    fn from_str(spec: &str) -> Result<Self> {
        let bad = |why: &str| Error::Config {
            what: "digits architecture",
            detail: format!("expected mlp:H1,H2,..., cnn:C1,C2,...:H or cell:CxN:OP,..., found `{spec}` ({why})"),
        };
        let widths = |list: &str| -> Result<Vec<usize>> {
            list.split(',')
                .map(|w| w.trim().parse::<usize>().map_err(|_| bad("widths are positive integers")))
                .collect()
        };
        let arch = match spec.split(':').collect::<Vec<_>>().as_slice() {
            ["mlp", hidden] => DigitsArch::Mlp(MlpConfig { hidden: widths(hidden)? }),
            ["mlp"] => DigitsArch::Mlp(MlpConfig { hidden: Vec::new() }),
            ["cnn", channels, hidden, rest @ ..] if rest.len() <= 1 => {
                // Each channel count may carry its kernel size: `16k5`.
                let (mut chans, mut kernels) = (Vec::new(), Vec::new());
                for c in channels.split(',') {
                    let (ch, k) = c.trim().split_once('k').unwrap_or((c.trim(), "3"));
                    chans.push(ch.parse::<usize>().map_err(|_| bad("widths are positive integers"))?);
                    kernels.push(
                        k.parse::<usize>().map_err(|_| bad("a kernel size is written CHANNELSkSIZE, e.g. 16k5"))?,
                    );
                }
                if kernels.iter().all(|&k| k == 3) {
                    kernels.clear();
                }
                DigitsArch::Cnn(CnnConfig {
                    channels: chans,
                    hidden: hidden.trim().parse().map_err(|_| bad("the hidden width is a positive integer"))?,
                    kernels,
                    activation: rest.first().map_or_else(relu, |a| a.trim().to_string()),
                })
            }
            ["cell", size, ops] => {
                let (c, n) = size.split_once('x').ok_or_else(|| bad("the cell size is CHANNELSxCELLS"))?;
                let num = |v: &str| v.trim().parse::<usize>().map_err(|_| bad("the cell size is CHANNELSxCELLS"));
                DigitsArch::Cell(CellConfig {
                    channels: num(c)?,
                    cells: num(n)?,
                    ops: ops.split(',').map(|o| o.trim().parse()).collect::<Result<_>>()?,
                })
            }
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
            DigitsArch::Cnn(c) => {
                let chans: Vec<String> = c
                    .channels
                    .iter()
                    .enumerate()
                    .map(|(k, ch)| if c.kernel(k) == 3 { ch.to_string() } else { format!("{ch}k{}", c.kernel(k)) })
                    .collect();
                write!(f, "cnn:{}:{}", chans.join(","), c.hidden)?;
                if !is_relu(&c.activation) {
                    write!(f, ":{}", c.activation)?;
                }
                Ok(())
            }
            DigitsArch::Cell(c) => write!(
                f,
                "cell:{}x{}:{}",
                c.channels,
                c.cells,
                c.ops.iter().map(|o| o.name()).collect::<Vec<_>>().join(",")
            ),
        }
    }
}

impl DigitsArch {
    /// The demo's teacher CNN: conv 16, conv 32, max-pool, linear 64, linear 10 (≈38k parameters).
    pub fn default_cnn() -> Self {
        DigitsArch::Cnn(CnnConfig::new(vec![16, 32], 64))
    }
    /// The default MLP: 64 → 128 → 64 → 10 (≈17k parameters).
    pub fn default_mlp() -> Self {
        DigitsArch::Mlp(MlpConfig { hidden: vec![128, 64] })
    }
    fn validate(&self) -> Result<()> {
        if let DigitsArch::Cell(c) = self
            && CellConfig::nodes_for(c.ops.len()).is_none()
        {
            return Err(Error::Config {
                what: "digits cell",
                detail: format!(
                    "a cell with k nodes has k(k+1)/2 edges (1, 3, 6, 10, ...), found {} operations",
                    c.ops.len()
                ),
            });
        }
        if let DigitsArch::Cnn(c) = self {
            let bad = |detail: String| Err(Error::Config { what: "digits CNN", detail });
            if !c.kernels.is_empty() && c.kernels.len() != c.channels.len() {
                return bad(format!(
                    "one kernel size per convolution: {} convolutions, found {} kernel sizes",
                    c.channels.len(),
                    c.kernels.len()
                ));
            }
            if let Some(k) = c.kernels.iter().find(|&&k| k % 2 == 0 || k > 7) {
                return bad(format!("kernel sizes are odd and at most 7 (the images are 8×8), found {k}"));
            }
            if let Err(e) = Activation::from_hf_name(&c.activation) {
                return bad(e.to_string());
            }
        }
        let zero = match self {
            DigitsArch::Mlp(c) => c.hidden.contains(&0),
            DigitsArch::Cnn(c) => c.channels.is_empty() || c.channels.contains(&0) || c.hidden == 0,
            DigitsArch::Cell(c) => c.channels == 0 || c.cells == 0,
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
    act: Activation,
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
                    let ks = c.kernel(k);
                    let fan = cin * ks * ks;
                    let w = src.weight(&format!("{path}.weight"), &[cout, cin, ks, ks], uniform(fan))?;
                    let b = src.tensor(&format!("{path}.bias"), &[cout], uniform(fan))?;
                    let params = Conv2dParams { padding: ks / 2, ..Default::default() };
                    convs.push(Conv2d::new(path, w, Some(b), params)?);
                    cin = cout;
                }
                let flat = cin * 4 * 4;
                linears.push(linear(src, "fc1", flat, c.hidden)?);
                linears.push(linear(src, "fc2", c.hidden, DIGITS_CLASSES)?);
            }
            DigitsArch::Cell(c) => {
                let conv = |src: &mut dyn WeightSource, path: String, cin: usize, k: usize| -> Result<Conv2d> {
                    let fan = cin * k * k;
                    let w = src.weight(&format!("{path}.weight"), &[c.channels, cin, k, k], uniform(fan))?;
                    let b = src.tensor(&format!("{path}.bias"), &[c.channels], uniform(fan))?;
                    let params = Conv2dParams { padding: k / 2, ..Default::default() };
                    Ok(Conv2d::new(path, w, Some(b), params)?)
                };
                convs.push(conv(src, "stem".into(), 1, 3)?);
                let nodes = CellConfig::nodes_for(c.ops.len()).expect("validated");
                for cell in 0..c.cells {
                    for (&(i, j), op) in CellConfig::edges(nodes).iter().zip(&c.ops) {
                        if let Some(k) = op.kernel() {
                            convs.push(conv(src, format!("cells.{cell}.e{i}{j}"), c.channels, k)?);
                        }
                    }
                }
                linears.push(linear(src, "fc", c.channels * 4 * 4, DIGITS_CLASSES)?);
            }
        }
        let act = match &arch {
            DigitsArch::Cnn(c) => Activation::from_hf_name(&c.activation)?,
            _ => Activation::Relu,
        };
        Ok(Self { arch, act, convs, linears })
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
        let rt = self.linears[0].runtime().clone();
        if hooks.is_empty() && !matches!(self.arch, DigitsArch::Cell(_)) && rt.resident() {
            // The net as one graph: a resident runtime keeps the activations on its device.
            use pare_core_tensor::Step;
            let mut g = pare_core_tensor::Graph::new(1);
            let mut h = 0;
            if !self.convs.is_empty() {
                let n = x.dim(0)?;
                h = g.push(Step::Reshape { x: h, dims: vec![n, 1, 8, 8] })?;
                for conv in &self.convs {
                    h = g.push(Step::Op { op: conv.op().clone(), x: h })?;
                    h = g.push(Step::Activation { act: self.act, x: h })?;
                }
                h = g.push(Step::MaxPool2d { x: h, size: 2 })?;
                let flat = self.linears[0].dims().1;
                h = g.push(Step::Reshape { x: h, dims: vec![n, flat] })?;
            }
            let last = self.linears.len() - 1;
            for (k, l) in self.linears.iter().enumerate() {
                h = g.push(Step::Op { op: l.op().clone(), x: h })?;
                if k < last {
                    h = g.push(Step::Activation { act: self.act, x: h })?;
                }
            }
            g.output(h)?;
            return Ok(rt.run_graph(&g, std::slice::from_ref(x))?.pop().expect("one output"));
        }
        if hooks.is_empty() {
            // The whole forward on the runtime's own threads (see `Runtime::run_scoped`).
            return pare_core_tensor::in_runtime(rt.as_ref(), || self.forward_ops(x, &mut Hooks::none()));
        }
        self.forward_ops(x, hooks)
    }

    /// The forward op by op on the layers' runtime.
    fn forward_ops(&self, x: &Tensor, hooks: &mut Hooks<'_>) -> Result<Tensor> {
        let n = x.dim(0)?;
        let mut h = x.clone();
        if let DigitsArch::Cell(c) = &self.arch {
            let nodes = CellConfig::nodes_for(c.ops.len()).expect("validated");
            let mut convs = self.convs.iter();
            h = convs.next().expect("the stem").forward_hooked(&h.reshape((n, 1, 8, 8))?, hooks)?;
            for _ in 0..c.cells {
                h = CellConfig::walk(nodes, h, |e, x| -> Result<Vec<Tensor>> {
                    Ok(match c.ops[e] {
                        CellOp::None => Vec::new(),
                        CellOp::Conv1x1 | CellOp::Conv3x3 => vec![
                            convs.next().expect("one convolution per conv edge").forward_hooked(&x.relu()?, hooks)?,
                        ],
                        fixed => vec![fixed.apply_fixed(x)?],
                    })
                })?;
            }
            h = h.relu()?.max_pool2d(2)?.flatten_from(1)?;
        } else if !self.convs.is_empty() {
            h = h.reshape((n, 1, 8, 8))?;
            for conv in &self.convs {
                h = self.act.forward(&conv.forward_hooked(&h, hooks)?)?;
            }
            h = h.max_pool2d(2)?.flatten_from(1)?;
        }
        let last = self.linears.len() - 1;
        for (k, l) in self.linears.iter().enumerate() {
            h = l.forward_hooked(&h, hooks)?;
            if k < last {
                h = self.act.forward(&h)?;
            }
        }
        Ok(h)
    }

    /// How many units [`DigitsNet::unit_forward`] chains: one per convolution and one per
    /// linear layer (a cell network is one unit). Pipeline parallelism cuts between units.
    pub fn units(&self) -> usize {
        match self.arch {
            DigitsArch::Cell(_) => 1,
            _ => self.convs.len() + self.linears.len(),
        }
    }

    /// Unit `k` of the forward (see [`DigitsNet::units`]): a convolution and its activation (the
    /// first reshapes the pixels, the last pools and flattens), or a linear layer and its
    /// activation (none after the classifier). Chaining units `0..units()` computes exactly the
    /// operations of [`DigitsNet::forward`], so the logits are bit-identical.
    pub fn unit_forward(&self, k: usize, x: &Tensor) -> Result<Tensor> {
        let units = self.units();
        if k >= units {
            return Err(Error::Config {
                what: "digits unit",
                detail: format!("the network has units 0..{units}, found {k}"),
            });
        }
        if matches!(self.arch, DigitsArch::Cell(_)) {
            return self.forward(x);
        }
        let nc = self.convs.len();
        if k < nc {
            let mut h = if k == 0 { x.reshape((x.dim(0)?, 1, 8, 8))? } else { x.clone() };
            h = self.act.forward(&self.convs[k].forward_hooked(&h, &mut Hooks::none())?)?;
            if k + 1 == nc {
                h = h.max_pool2d(2)?.flatten_from(1)?;
            }
            return Ok(h);
        }
        let j = k - nc;
        let h = self.linears[j].forward(x)?;
        Ok(if j + 1 < self.linears.len() { self.act.forward(&h)? } else { h })
    }

    /// Shard `rank` of `world` of an MLP for Megatron-style tensor parallelism. Linear layers
    /// pair up: the first of each pair keeps a contiguous `1/world` of its output neurons
    /// (column parallel), the second the matching input columns (row parallel, its bias on
    /// rank 0 only), so one all-reduce per pair — see [`DigitsNet::forward_reduced`] — gives
    /// the pair's output. With an odd number of layers the classifier is replicated. The first
    /// layer of each pair must have a width divisible by `world`. A shard must be run with
    /// [`DigitsNet::forward_reduced`], not [`DigitsNet::forward`].
    pub fn tensor_shard(&self, rank: usize, world: usize) -> Result<Self> {
        let bad = |detail: String| Error::Config { what: "tensor-parallel split", detail };
        let DigitsArch::Mlp(c) = &self.arch else {
            return Err(bad(format!("tensor parallelism splits MLPs (mlp:...), found `{}`", self.arch)));
        };
        if world == 0 || rank >= world {
            return Err(bad(format!("rank must be below the world size, found rank {rank} of {world}")));
        }
        let device = self.linears[0].runtime().device().clone();
        let mut weights = BTreeMap::new();
        let mut hidden = c.hidden.clone();
        let pairs = self.linears.len() / 2;
        for (k, l) in self.linears.iter().enumerate() {
            let w = l.weight().to_dense(&device)?;
            let b = l.bias().cloned();
            let (w, b) = if k < 2 * pairs && k % 2 == 0 {
                let out = w.dim(0)?;
                if !out.is_multiple_of(world) {
                    return Err(bad(format!(
                        "layer `{}` has {out} outputs, which {world} workers cannot share evenly (expected a multiple of {world})",
                        l.path()
                    )));
                }
                let per = out / world;
                hidden[k] = per;
                (w.narrow(0, rank * per, per)?, b.map(|b| b.narrow(0, rank * per, per)).transpose()?)
            } else if k < 2 * pairs {
                let per = w.dim(1)? / world;
                let b = if rank == 0 { b } else { b.map(|b| b.zeros_like()).transpose()? };
                (w.narrow(1, rank * per, per)?.contiguous()?, b)
            } else {
                (w, b)
            };
            weights.insert(format!("{}.weight", l.path()), Weight::Dense(w));
            if let Some(b) = b {
                weights.insert(format!("{}.bias", l.path()), Weight::Dense(b));
            }
        }
        let arch = DigitsArch::Mlp(MlpConfig { hidden });
        Self::build(arch, &mut LoadedWeights::new(weights, device))
    }

    /// Logits of a tensor-parallel shard (see [`DigitsNet::tensor_shard`]): after the second
    /// layer of each pair, `reduce` (an all-reduce over the shards) turns the partial output
    /// into the whole one. On a whole network with `&mut Ok` this is [`DigitsNet::forward`].
    pub fn forward_reduced(&self, x: &Tensor, reduce: &mut dyn FnMut(Tensor) -> Result<Tensor>) -> Result<Tensor> {
        if !matches!(self.arch, DigitsArch::Mlp(_)) {
            return self.forward(x);
        }
        let pairs = self.linears.len() / 2;
        let last = self.linears.len() - 1;
        let mut h = x.clone();
        for (k, l) in self.linears.iter().enumerate() {
            h = l.forward(&h)?;
            if k < 2 * pairs && k % 2 == 1 {
                h = reduce(h)?;
            }
            if k < last {
                h = self.act.forward(&h)?;
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
        for spec in
            ["cnn:16,32:64", "cnn:4,8:32", "mlp:128,64", "mlp", "cell:8x2:conv3x3,skip,conv1x1,avg3x3,none,conv3x3"]
        {
            let arch: DigitsArch = spec.parse().unwrap();
            assert_eq!(arch.to_string(), spec);
        }
        assert_eq!("cnn:16,32:64".parse::<DigitsArch>().unwrap(), DigitsArch::default_cnn());
        for bad in ["cnn:16,32", "rnn:4", "mlp:128,x", "cnn:0,8:32", "cnn:4,8:0", "", "cell:8:skip", "cell:8x0:skip"] {
            let e = bad.parse::<DigitsArch>().unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")) || e.contains("widths must be"), "{bad}: {e}");
        }
        for (bad, why) in [("cnn:16k4:32", "odd"), ("cnn:16:32:swoosh", "swoosh"), ("cnn:16k9:32", "at most 7")] {
            let e = bad.parse::<DigitsArch>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // A 5×5 GELU CNN builds, runs and keeps 8×8 maps ("same" padding).
        let net = DigitsNet::init("cnn:4k5,6:16:gelu".parse().unwrap(), 1, &Device::Cpu, &VarMap::new()).unwrap();
        assert_eq!(net.convs[0].weight().shape(), vec![4, 1, 5, 5]);
        assert_eq!(net.forward(&Tensor::zeros((2, 64), DType::F32, &Device::Cpu).unwrap()).unwrap().dims(), &[2, 10]);
        let e = "cell:8x1:skip,conv5x5,none".parse::<DigitsArch>().unwrap_err().to_string();
        assert!(e.contains("found `conv5x5`") && e.contains("conv3x3"), "{e}");
        let e = "cell:8x1:skip,skip".parse::<DigitsArch>().unwrap_err().to_string();
        assert!(e.contains("found 2 operations"), "{e}");
    }

    #[test]
    fn a_cell_network_computes_its_dag() {
        // One cell, one node: node 1 = skip(node 0), so the output is relu(stem(x)) pooled.
        let vars = VarMap::new();
        let x = Tensor::rand(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
        let skip = DigitsNet::init("cell:4x1:skip".parse().unwrap(), 1, &Device::Cpu, &vars).unwrap();
        let none = DigitsNet::init("cell:4x1:none".parse().unwrap(), 1, &Device::Cpu, &vars).unwrap();
        assert_eq!(skip.layers().len(), 2, "stem and classifier");
        let (ys, yn) = (skip.forward(&x).unwrap(), none.forward(&x).unwrap());
        // `none` zeroes the features: every image gets the classifier's bias.
        let bias = none.linears[0].bias().unwrap().unsqueeze(0).unwrap().broadcast_as((3, 10)).unwrap();
        assert_eq!(yn.to_vec2::<f32>().unwrap(), bias.to_vec2::<f32>().unwrap());
        assert_ne!(ys.to_vec2::<f32>().unwrap(), yn.to_vec2::<f32>().unwrap());
        // Two conv edges per cell, two cells: stem + 4 convolutions + classifier, named by edge.
        let net = DigitsNet::init("cell:4x2:conv3x3,avg3x3,conv1x1".parse().unwrap(), 1, &Device::Cpu, &vars).unwrap();
        let names: Vec<String> = net.layers().iter().map(|l| l.path().to_string()).collect();
        assert_eq!(names, ["stem", "cells.0.e01", "cells.0.e12", "cells.1.e01", "cells.1.e12", "fc"]);
        assert_eq!(net.forward(&x).unwrap().dims(), &[3, 10]);
        // Average pooling keeps a constant map's interior and counts the zero padding.
        let ones = Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let avg = CellOp::Avg3x3.apply_fixed(&ones).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((avg[4] - 1.0).abs() < 1e-6 && (avg[0] - 4.0 / 9.0).abs() < 1e-6, "{avg:?}");
        // The differentiable form (taken under autograd) computes the same, and has a gradient.
        let var = candle_core::Var::from_tensor(&ones.affine(2.0, 0.5).unwrap()).unwrap();
        let fast = CellOp::Avg3x3.apply_fixed(&var.as_tensor().detach()).unwrap();
        let tracked = CellOp::Avg3x3.apply_fixed(var.as_tensor()).unwrap();
        let diff = (fast - &tracked).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
        let grads = tracked.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(var.as_tensor()).is_some());
    }
}
