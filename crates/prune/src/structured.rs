//! Structured pruning: whole neurons, convolution channels, attention heads, FFN neurons or
//! encoder layers are removed, with their dependency groups, so the result is a genuinely
//! smaller dense model (fewer parameters, MACs and bytes) with a config that says so.
//!
//! A [`Group`] ties together every parameter slice one unit owns: a hidden neuron is a row of
//! its layer's weight, an entry of its bias and a column of the next layer's weight; a
//! convolution channel is a filter, a bias entry and an input channel of the next convolution
//! (or, after the flatten, a 16-column block of the first linear layer); an attention head is
//! `d` rows of the query, key and value weights and biases and `d` columns of the attention
//! output; an FFN neuron is a row of the intermediate layer and a column of the output layer.
//! Tied dimensions — the residual stream, the q/k/v of one head — are therefore never cut
//! apart.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use pare_core_tensor::calib::InputNormObserver;
use pare_core_tensor::{Error, LoadedWeights, Module, Result, Weight};
use pare_models::bert::BertEncoder;
use pare_models::digits::{CnnConfig, DigitsArch, DigitsNet, MlpConfig};
use serde::{Deserialize, Serialize};

use crate::select;

/// What is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Hidden neurons of MLP layers (the digits MLP and CNN's hidden linear layer), or FFN
    /// neurons of a BERT encoder.
    Neurons,
    /// Output channels of convolutions.
    Channels,
    /// Attention heads.
    Heads,
    /// Whole encoder layers.
    Layers,
}

impl std::str::FromStr for Unit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "neurons" => Unit::Neurons,
            "channels" => Unit::Channels,
            "heads" => Unit::Heads,
            "layers" => Unit::Layers,
            other => {
                return Err(Error::invalid(
                    "structured unit",
                    format!("expected neurons, channels, heads or layers, found `{other}`"),
                ));
            }
        })
    }
}

/// How units are ranked (the lowest go).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Importance {
    /// L1 norm of every parameter slice the unit owns.
    L1,
    /// L2 norm of every parameter slice the unit owns.
    L2,
    /// L2 norm of the unit's activations on calibration data (what the consuming layer sees).
    Activation,
    /// First-order Taylor estimate of the loss change, `|Σ w·∂L/∂w|` over the unit's slices,
    /// from gradients on calibration batches.
    Taylor,
}

impl std::str::FromStr for Importance {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "l1" => Importance::L1,
            "l2" => Importance::L2,
            "activation" => Importance::Activation,
            "taylor" => Importance::Taylor,
            other => {
                return Err(Error::invalid(
                    "--importance",
                    format!("expected l1, l2, activation or taylor, found `{other}`"),
                ));
            }
        })
    }
}

/// One parameter slice per unit: along `axis` of `param`, unit `u` owns indices
/// `u·block .. (u+1)·block`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Parameter name (`layers.0.weight`).
    pub param: String,
    /// Axis the units run along.
    pub axis: usize,
    /// Indices per unit.
    pub block: usize,
}

/// A dependency group: units that must be removed from every member together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// What the units are (`layers.0 neurons`, `encoder.layer.3 heads`).
    pub name: String,
    /// Number of units.
    pub units: usize,
    /// Every slice a unit owns.
    pub members: Vec<Member>,
    /// The layer whose input the units feed (for activation importance), with the block of
    /// input features per unit.
    pub consumer: (String, usize),
}

impl Group {
    /// The part of the model the group lives in: its name up to the unit (`encoder.layer.3`
    /// of `encoder.layer.3 heads`, `layers.0` of `layers.0 neurons`), what per-group
    /// overrides match.
    pub fn scope(&self) -> &str {
        self.name.split_once(' ').map_or(self.name.as_str(), |(s, _)| s)
    }
}

fn member(param: impl Into<String>, axis: usize, block: usize) -> Member {
    Member { param: param.into(), axis, block }
}

/// A model that can be pruned structurally.
pub trait Structured: Module + Sized {
    /// The dependency groups of `unit` (an error when the model has no such units).
    fn groups(&self, unit: Unit) -> Result<Vec<Group>>;
    /// The model rebuilt from `weights` with each group's units cut to `kept` (in the order of
    /// [`Structured::groups`]).
    fn rebuild(&self, unit: Unit, kept: &[usize], weights: BTreeMap<String, Weight>) -> Result<Self>;
}

impl Structured for DigitsNet {
    fn groups(&self, unit: Unit) -> Result<Vec<Group>> {
        let mut out = Vec::new();
        match (self.arch(), unit) {
            (DigitsArch::Mlp(c), Unit::Neurons) => {
                for (k, &h) in c.hidden.iter().enumerate() {
                    let (p, q) = (format!("layers.{k}"), format!("layers.{}", k + 1));
                    out.push(Group {
                        name: format!("{p} neurons"),
                        units: h,
                        members: vec![
                            member(format!("{p}.weight"), 0, 1),
                            member(format!("{p}.bias"), 0, 1),
                            member(format!("{q}.weight"), 1, 1),
                        ],
                        consumer: (q, 1),
                    });
                }
            }
            (DigitsArch::Cnn(c), Unit::Channels) => {
                for (k, &ch) in c.channels.iter().enumerate() {
                    let p = format!("conv{}", k + 1);
                    let (next, block) =
                        if k + 1 < c.channels.len() { (format!("conv{}", k + 2), 1) } else { ("fc1".to_string(), 16) };
                    out.push(Group {
                        name: format!("{p} channels"),
                        units: ch,
                        members: vec![
                            member(format!("{p}.weight"), 0, 1),
                            member(format!("{p}.bias"), 0, 1),
                            member(format!("{next}.weight"), 1, block),
                        ],
                        consumer: (next, block),
                    });
                }
            }
            (DigitsArch::Cnn(c), Unit::Neurons) => out.push(Group {
                name: "fc1 neurons".into(),
                units: c.hidden,
                members: vec![member("fc1.weight", 0, 1), member("fc1.bias", 0, 1), member("fc2.weight", 1, 1)],
                consumer: ("fc2".into(), 1),
            }),
            (arch, unit) => {
                return Err(Error::invalid(
                    "structured pruning",
                    format!(
                        "a digits {} has no {unit:?} to remove (MLP: neurons; CNN: channels, neurons; cell networks: none)",
                        arch_name(arch)
                    ),
                ));
            }
        }
        Ok(out)
    }

    fn rebuild(&self, unit: Unit, kept: &[usize], weights: BTreeMap<String, Weight>) -> Result<Self> {
        let arch = match (self.arch(), unit) {
            (DigitsArch::Mlp(_), Unit::Neurons) => DigitsArch::Mlp(MlpConfig { hidden: kept.to_vec() }),
            (DigitsArch::Cnn(c), Unit::Channels) => DigitsArch::Cnn(CnnConfig { channels: kept.to_vec(), ..c.clone() }),
            (DigitsArch::Cnn(c), Unit::Neurons) => DigitsArch::Cnn(CnnConfig { hidden: kept[0], ..c.clone() }),
            _ => unreachable!("groups() refused this unit"),
        };
        let device = device_of(&weights);
        DigitsNet::build(arch, &mut LoadedWeights::new(weights, device)).map_err(pare_models::Error::into_core)
    }
}

fn arch_name(a: &DigitsArch) -> &'static str {
    match a {
        DigitsArch::Mlp(_) => "MLP",
        DigitsArch::Cnn(_) => "CNN",
        DigitsArch::Cell(_) => "cell network",
    }
}

fn device_of(weights: &BTreeMap<String, Weight>) -> Device {
    weights
        .values()
        .find_map(|w| match w {
            Weight::Dense(t) => Some(t.device().clone()),
            _ => None,
        })
        .unwrap_or(Device::Cpu)
}

impl Structured for BertEncoder {
    fn groups(&self, unit: Unit) -> Result<Vec<Group>> {
        let c = self.config();
        let d = c.head_size();
        (0..c.num_hidden_layers)
            .map(|l| {
                let p = |s: &str| format!("encoder.layer.{l}.{s}");
                Ok(match unit {
                    Unit::Heads => Group {
                        name: format!("encoder.layer.{l} heads"),
                        units: c.heads_of(l),
                        members: ["query", "key", "value"]
                            .iter()
                            .flat_map(|q| {
                                [
                                    member(p(&format!("attention.self.{q}.weight")), 0, d),
                                    member(p(&format!("attention.self.{q}.bias")), 0, d),
                                ]
                            })
                            .chain([member(p("attention.output.dense.weight"), 1, d)])
                            .collect(),
                        consumer: (p("attention.output.dense"), d),
                    },
                    Unit::Neurons => Group {
                        name: format!("encoder.layer.{l} ffn neurons"),
                        units: c.intermediate_of(l),
                        members: vec![
                            member(p("intermediate.dense.weight"), 0, 1),
                            member(p("intermediate.dense.bias"), 0, 1),
                            member(p("output.dense.weight"), 1, 1),
                        ],
                        consumer: (p("output.dense"), 1),
                    },
                    Unit::Channels | Unit::Layers => {
                        return Err(Error::invalid(
                            "structured pruning",
                            format!(
                                "a BERT encoder's structured units are heads, neurons (FFN) and layers, found {unit:?}"
                            ),
                        ));
                    }
                })
            })
            .collect()
    }

    fn rebuild(&self, unit: Unit, kept: &[usize], weights: BTreeMap<String, Weight>) -> Result<Self> {
        let mut cfg = self.config().clone();
        match unit {
            Unit::Heads => {
                cfg.attention_head_size = Some(cfg.head_size());
                cfg.heads_per_layer = Some(kept.to_vec());
            }
            Unit::Neurons => cfg.intermediate_per_layer = Some(kept.to_vec()),
            _ => unreachable!("groups() refused this unit"),
        }
        let device = device_of(&weights);
        BertEncoder::build(cfg, &mut LoadedWeights::new(weights, device)).map_err(pare_models::Error::into_core)
    }
}

/// What structured pruning did to one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupStats {
    /// The group (`layers.0 neurons`).
    pub name: String,
    /// Units before.
    pub before: usize,
    /// Units kept.
    pub kept: usize,
    /// Indices of the removed units, ascending.
    pub removed: Vec<usize>,
}

/// A parameter's shape and row-major f32 values.
type Values = (Vec<usize>, Vec<f32>);

/// Dense f32 values of every parameter, by name.
fn values(model: &dyn Module) -> Result<BTreeMap<String, Values>> {
    model
        .named_weights()
        .into_iter()
        .map(|(n, w)| match &w {
            Weight::Dense(t) => Ok((n, (t.dims().to_vec(), t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))),
            other => Err(Error::invalid(
                format!("parameter `{n}`"),
                format!(
                    "structured pruning needs dense weights (prune before quantizing or sparsifying), found {}",
                    other.describe()
                ),
            )),
        })
        .collect()
}

/// Visits, in storage order, the values of indices `lo..hi` along `axis` of a parameter
/// `[d0, d1, ...]` stored row-major in `v`: one contiguous run per index of the axes before
/// `axis`, so a unit costs its own size, not the whole parameter's.
fn slice_values<'a>(
    shape: &'a [usize],
    v: &'a [f32],
    axis: usize,
    lo: usize,
    hi: usize,
) -> impl Iterator<Item = f32> + 'a {
    let inner: usize = shape[axis + 1..].iter().product();
    let along = shape[axis];
    let outer: usize = shape[..axis].iter().product();
    debug_assert!(outer * along * inner == v.len() && lo <= hi && hi <= along);
    (0..outer).flat_map(move |o| v[(o * along + lo) * inner..(o * along + hi) * inner].iter().copied())
}

/// Per-unit importance of every group. `norms` (activation) are the consumers' input norms;
/// `grads` (Taylor) gradients by parameter name.
pub fn importance(
    model: &dyn Module,
    groups: &[Group],
    how: Importance,
    norms: Option<&InputNormObserver>,
    grads: Option<&BTreeMap<String, Vec<f32>>>,
) -> Result<Vec<Vec<f32>>> {
    let vals = values(model)?;
    let get = |p: &str| vals.get(p).ok_or_else(|| Error::unknown("parameter", p, vals.keys().map(String::as_str)));
    groups
        .iter()
        .map(|g| {
            (0..g.units)
                .map(|u| -> Result<f32> {
                    Ok(match how {
                        Importance::L1 | Importance::L2 => {
                            let pw = if how == Importance::L1 { 1 } else { 2 };
                            let mut s = 0f64;
                            for m in &g.members {
                                let (shape, v) = get(&m.param)?;
                                s += slice_values(shape, v, m.axis, u * m.block, (u + 1) * m.block)
                                    .map(|x| f64::from(x.abs()).powi(pw))
                                    .sum::<f64>();
                            }
                            (if pw == 1 { s } else { s.sqrt() }) as f32
                        }
                        Importance::Activation => {
                            let obs = norms.ok_or_else(|| {
                                Error::invalid("--importance activation", "needs a calibration set, found none")
                            })?;
                            let n = obs.norms(&g.consumer.0)?;
                            let b = g.consumer.1;
                            n[u * b..(u + 1) * b].iter().map(|x| x * x).sum::<f64>().sqrt() as f32
                        }
                        Importance::Taylor => {
                            let gr = grads.ok_or_else(|| {
                                Error::invalid(
                                    "--importance taylor",
                                    "needs gradients from a calibration set, found none",
                                )
                            })?;
                            let mut s = 0f64;
                            for m in &g.members {
                                let (shape, v) = get(&m.param)?;
                                let gv = gr.get(&m.param).ok_or_else(|| {
                                    Error::unknown("gradient", &m.param, gr.keys().map(String::as_str))
                                })?;
                                let w = slice_values(shape, v, m.axis, u * m.block, (u + 1) * m.block);
                                let g = slice_values(shape, gv, m.axis, u * m.block, (u + 1) * m.block);
                                s += w.zip(g).map(|(a, b)| f64::from(a) * f64::from(b)).sum::<f64>();
                            }
                            s.abs() as f32
                        }
                    })
                })
                .collect()
        })
        .collect()
}

/// Keeps `idx` (ascending unit indices) of `t` along `axis`, `block` indices per unit.
fn keep_along(t: &Tensor, axis: usize, block: usize, idx: &[usize]) -> Result<Tensor> {
    let ids: Vec<u32> = idx.iter().flat_map(|&u| (u * block..(u + 1) * block).map(|i| i as u32)).collect();
    let ids = Tensor::from_vec(ids, idx.len() * block, t.device())?;
    Ok(t.index_select(&ids, axis)?.contiguous()?)
}

/// Removes `sparsity` of the units of every group of `unit` (the lowest by `scores`, from
/// [`importance`]), keeping at least one per group, and returns the rebuilt smaller model and
/// what was removed. Everything is checked before the model is rebuilt; `model` is untouched.
pub fn prune_units<M: Structured>(
    model: &M,
    unit: Unit,
    sparsity: f64,
    scores: &[Vec<f32>],
) -> Result<(M, Vec<GroupStats>)> {
    select::check_sparsity("--sparsity", sparsity)?;
    let n = model.groups(unit)?.len();
    prune_units_each(model, unit, &vec![sparsity; n], scores)
}

/// [`prune_units`] with a sparsity per group (in the order of [`Structured::groups`], e.g.
/// from [`crate::per_group`]); a group at 0 keeps every unit.
pub fn prune_units_each<M: Structured>(
    model: &M,
    unit: Unit,
    sparsities: &[f64],
    scores: &[Vec<f32>],
) -> Result<(M, Vec<GroupStats>)> {
    let groups = model.groups(unit)?;
    if sparsities.len() != groups.len() {
        return Err(Error::Shape {
            name: format!("per-group sparsities ({unit:?})"),
            expected: vec![groups.len()],
            found: vec![sparsities.len()],
        });
    }
    assert!(scores.len() == groups.len());
    let mut weights = model.named_weights();
    let mut stats = Vec::new();
    let mut kept_counts = Vec::new();
    let mut plan = Vec::new();
    for ((g, sc), &sparsity) in groups.iter().zip(scores).zip(sparsities) {
        select::check_sparsity(&format!("sparsity of {}", g.name), sparsity)?;
        let k = select::count(sparsity, g.units);
        if k >= g.units {
            return Err(Error::invalid(
                format!("{} ({} units)", g.name, g.units),
                format!("sparsity {sparsity} would remove all {} units; a layer keeps at least one", g.units),
            ));
        }
        let removed = select::lowest(sc, k);
        let kept: Vec<usize> = (0..g.units).filter(|u| !removed.contains(u)).collect();
        kept_counts.push(kept.len());
        stats.push(GroupStats { name: g.name.clone(), before: g.units, kept: kept.len(), removed });
        plan.push((g, kept));
    }
    for (g, kept) in plan {
        for m in &g.members {
            let t = match weights.get(&m.param) {
                Some(Weight::Dense(t)) => t.clone(),
                Some(other) => {
                    return Err(Error::invalid(
                        format!("parameter `{}`", m.param),
                        format!("needs dense values, found {}", other.describe()),
                    ));
                }
                None => return Err(Error::unknown("parameter", &m.param, weights.keys().map(String::as_str))),
            };
            weights.insert(m.param.clone(), Weight::Dense(keep_along(&t, m.axis, m.block, &kept)?));
        }
    }
    Ok((model.rebuild(unit, &kept_counts, weights)?, stats))
}

/// The encoder without the layers `remove` (indices), the rest renumbered in order and the
/// config's layer count and per-layer sizes updated. At least one layer must stay.
pub fn drop_layers(model: &BertEncoder, remove: &[usize]) -> Result<BertEncoder> {
    let n = model.config().num_hidden_layers;
    if let Some(&bad) = remove.iter().find(|&&l| l >= n) {
        return Err(Error::invalid("layers to remove", format!("the encoder has layers 0..{n}, found {bad}")));
    }
    let keep: Vec<usize> = (0..n).filter(|l| !remove.contains(l)).collect();
    if keep.is_empty() {
        return Err(Error::invalid("layers to remove", format!("would remove all {n} layers; at least one stays")));
    }
    model.keep_layers(&keep).map_err(pare_models::Error::into_core)
}

#[cfg(test)]
mod tests;
