//! Search spaces: a typed, serialisable list of decisions (each a name and its integer
//! options), a candidate being one option index per decision. Strategies work on that generic
//! form — sample, enumerate, mutate, encode — and [`Space::decode`] turns a candidate into a
//! buildable `pare-models` architecture.
//!
//! Built-in global spaces for the digits models:
//! - `mlp`: depth 1–3, each hidden width in {16, 32, 64, 128};
//! - `cnn`: 1–3 convolutions of {4, 8, 16, 32} channels, a hidden layer of {16, 32, 64, 128};
//! - `cnn-ka`: the same with each kernel 3×3 or 5×5 and the activation ReLU, GELU or SiLU.
//!
//! A transformer-encoder space, whose candidates are sub-networks of a pretrained encoder:
//! - `encoder`: {2, 3, 4, 6} layers, {4, 6, 8, 12} heads and {384, 768, 1152, 1536} FFN
//!   neurons per layer, hidden width 384 (all-MiniLM-L6-v2's).
//!
//! And a cell-based space (NAS-Bench-201's, sized for the digits):
//! - `cell`: a 16-channel stem, two copies of one cell — a DAG on 4 nodes whose 6 edges each
//!   take one of none, skip, 1×1 conv, 3×3 conv, 3×3 average pool (5⁶ = 15 625 cells).
//!
//! Decisions a candidate does not use (the widths of layers beyond its depth) are
//! canonicalised to index 0, so equal architectures have equal candidates.

use pare_core_tensor::{Error, Result};
use pare_models::digits::{CellConfig, CellOp, CnnConfig, DigitsArch, MlpConfig};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The activations a CNN space's `activation` choice indexes.
pub const ACTIVATIONS: [&str; 4] = ["relu", "gelu", "silu", "tanh"];

/// One decision and the values it may take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    /// The decision's name (`depth`, `width.1`, `channels.0`, ...).
    pub name: String,
    /// Its options, in order.
    pub options: Vec<usize>,
}

/// What a space's candidates build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpaceKind {
    /// Digits MLPs: choices `depth`, then `width.0 .. width.{D−1}` for the deepest option D.
    DigitsMlp,
    /// Digits CNNs: choices `convs`, `channels.0 .. channels.{C−1}`, `hidden`, and optionally
    /// `kernel.0 .. kernel.{C−1}` (odd kernel sizes; 3 when absent) and `activation` (indices
    /// into [`ACTIVATIONS`]; ReLU when absent).
    DigitsCnn,
    /// Digits cell networks ([`CellConfig`]): choices `channels`, `cells`, then one per edge
    /// `edge.I-J` (in [`CellConfig::edges`] order), whose options are indices into
    /// [`CellOp::ALL`] (0 none, 1 skip, 2 conv1x1, 3 conv3x3, 4 avg3x3) — list a subset to
    /// restrict an edge's operations.
    DigitsCell,
    /// Transformer encoders ([`EncoderArch`]): choices `layers`, `heads` (per layer), `ffn`
    /// (neurons per layer) and `hidden`.
    Encoder,
}

/// A transformer encoder's shape: what an `encoder` space's candidates decode to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncoderArch {
    /// Encoder layers.
    pub layers: usize,
    /// Attention heads per layer.
    pub heads: usize,
    /// Feed-forward neurons per layer.
    pub ffn: usize,
    /// Width of the residual stream.
    pub hidden: usize,
}

impl std::fmt::Display for EncoderArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "encoder:L{},H{},F{},D{}", self.layers, self.heads, self.ffn, self.hidden)
    }
}

/// A search space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    /// What the candidates are.
    pub kind: SpaceKind,
    /// The decisions, in order.
    pub choices: Vec<Choice>,
}

/// One point of a space: an option index per decision.
pub type Candidate = Vec<usize>;

fn choice(name: impl Into<String>, options: &[usize]) -> Choice {
    Choice { name: name.into(), options: options.to_vec() }
}

impl Space {
    /// The space's kind as its built-in name's stem: `mlp`, `cnn`, `cell` or `encoder`.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            SpaceKind::DigitsMlp => "mlp",
            SpaceKind::DigitsCnn => "cnn",
            SpaceKind::DigitsCell => "cell",
            SpaceKind::Encoder => "encoder",
        }
    }

    /// A built-in space by name: `mlp`, `cnn`, `cnn-ka`, `cell` or `encoder`.
    pub fn builtin(name: &str) -> Result<Self> {
        let widths = [16, 32, 64, 128];
        let space = match name {
            "mlp" => Space {
                kind: SpaceKind::DigitsMlp,
                choices: vec![
                    choice("depth", &[1, 2, 3]),
                    choice("width.0", &widths),
                    choice("width.1", &widths),
                    choice("width.2", &widths),
                ],
            },
            "cnn" => Space {
                kind: SpaceKind::DigitsCnn,
                choices: vec![
                    choice("convs", &[1, 2, 3]),
                    choice("channels.0", &[4, 8, 16, 32]),
                    choice("channels.1", &[4, 8, 16, 32]),
                    choice("channels.2", &[4, 8, 16, 32]),
                    choice("hidden", &widths),
                ],
            },
            "cnn-ka" => {
                let mut s = Space::builtin("cnn")?;
                s.choices.extend((0..3).map(|l| choice(format!("kernel.{l}"), &[3, 5])));
                s.choices.push(choice("activation", &[0, 1, 2]));
                s
            }
            "encoder" => Space {
                kind: SpaceKind::Encoder,
                choices: vec![
                    choice("layers", &[2, 3, 4, 6]),
                    choice("heads", &[4, 6, 8, 12]),
                    choice("ffn", &[384, 768, 1152, 1536]),
                    choice("hidden", &[384]),
                ],
            },
            "cell" => Space {
                kind: SpaceKind::DigitsCell,
                choices: [choice("channels", &[16]), choice("cells", &[2])]
                    .into_iter()
                    .chain(
                        CellConfig::edges(3)
                            .into_iter()
                            .map(|(i, j)| choice(format!("edge.{i}-{j}"), &[0, 1, 2, 3, 4])),
                    )
                    .collect(),
            },
            other => {
                return Err(Error::unknown("search space", other, ["mlp", "cnn", "cnn-ka", "cell", "encoder"]));
            }
        };
        space.validate()?;
        Ok(space)
    }

    /// Reads a space from JSON or TOML text (by `path`'s extension) and validates it.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
        let space: Space = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| Error::Json { path: path.to_path_buf(), cause: e })?
        } else {
            toml::from_str(&text)
                .map_err(|e| Error::invalid(format!("search space `{}`", path.display()), e.to_string()))?
        };
        space.validate()?;
        Ok(space)
    }

    fn index_of(&self, name: &str) -> Result<usize> {
        self.choices
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| Error::unknown("search-space choice", name, self.choices.iter().map(|c| c.name.as_str())))
    }

    /// Checks the space: every decision has options, none is 0, names are distinct, the depth
    /// decision exists and each layer it can reach has a width decision.
    pub fn validate(&self) -> Result<()> {
        let bad = |d: String| Err(Error::invalid("search space", d));
        for (i, c) in self.choices.iter().enumerate() {
            if c.options.is_empty() {
                return bad(format!("choice `{}` has no options", c.name));
            }
            let is_edge = self.kind == SpaceKind::DigitsCell && c.name.starts_with("edge.");
            if self.kind == SpaceKind::DigitsCnn && c.name == "activation" {
                if let Some(o) = c.options.iter().find(|&&o| o >= ACTIVATIONS.len()) {
                    return bad(format!(
                        "choice `activation` offers {o}; its options index {}",
                        ACTIVATIONS.iter().enumerate().map(|(i, a)| format!("{i} {a}")).collect::<Vec<_>>().join(", ")
                    ));
                }
                continue;
            }
            if self.kind == SpaceKind::DigitsCnn
                && c.name.starts_with("kernel.")
                && let Some(k) = c.options.iter().find(|&&k| k % 2 == 0 || k > 7)
            {
                return bad(format!("choice `{}` offers kernel size {k}; kernel sizes are odd and at most 7", c.name));
            }
            if is_edge && c.options.iter().any(|&o| o >= CellOp::ALL.len()) {
                return bad(format!(
                    "choice `{}` offers {:?}; edge options index the operations {}",
                    c.name,
                    c.options,
                    CellOp::ALL
                        .iter()
                        .enumerate()
                        .map(|(i, o)| format!("{i} {}", o.name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if !is_edge && c.options.contains(&0) {
                return bad(format!("choice `{}` offers 0, found options {:?}; every size is ≥ 1", c.name, c.options));
            }
            if self.choices[..i].iter().any(|o| o.name == c.name) {
                return bad(format!("choice `{}` appears twice", c.name));
            }
        }
        let (depth, per_layer, extra): (&str, &str, &[&str]) = match self.kind {
            SpaceKind::DigitsMlp => ("depth", "width", &[]),
            SpaceKind::DigitsCnn => ("convs", "channels", &["hidden"]),
            SpaceKind::Encoder => {
                for name in ["layers", "heads", "ffn", "hidden"] {
                    self.index_of(name)?;
                }
                return Ok(());
            }
            SpaceKind::DigitsCell => {
                self.index_of("channels")?;
                self.index_of("cells")?;
                let edges: Vec<&str> = self
                    .choices
                    .iter()
                    .filter_map(|c| c.name.starts_with("edge.").then_some(c.name.as_str()))
                    .collect();
                let Some(nodes) = CellConfig::nodes_for(edges.len()) else {
                    return bad(format!(
                        "a cell of k nodes has k(k+1)/2 edge choices (1, 3, 6, 10, ...), found {}",
                        edges.len()
                    ));
                };
                let want: Vec<String> = CellConfig::edges(nodes).iter().map(|(i, j)| format!("edge.{i}-{j}")).collect();
                if edges != want {
                    return bad(format!(
                        "the edge choices must be {} in that order, found {}",
                        want.join(", "),
                        edges.join(", ")
                    ));
                }
                return Ok(());
            }
        };
        let d = self.index_of(depth)?;
        let deepest = *self.choices[d].options.iter().max().expect("options are not empty");
        for l in 0..deepest {
            self.index_of(&format!("{per_layer}.{l}"))?;
        }
        for e in extra {
            self.index_of(e)?;
        }
        Ok(())
    }

    /// The number of distinct candidates (before canonicalisation), saturating.
    pub fn size(&self) -> u128 {
        self.choices.iter().fold(1u128, |n, c| n.saturating_mul(c.options.len() as u128))
    }

    /// A candidate drawn uniformly, canonicalised.
    pub fn sample(&self, rng: &mut impl Rng) -> Candidate {
        let c: Candidate = self.choices.iter().map(|c| rng.random_range(0..c.options.len())).collect();
        self.canonical(c)
    }

    /// The candidate with one decision, chosen uniformly among those that matter for it,
    /// changed to another option (the mutation of regularized evolution), canonicalised.
    pub fn mutate(&self, c: &Candidate, rng: &mut impl Rng) -> Candidate {
        let active: Vec<usize> =
            (0..self.choices.len()).filter(|&i| self.is_active(c, i) && self.choices[i].options.len() > 1).collect();
        if active.is_empty() {
            return c.clone();
        }
        let i = active[rng.random_range(0..active.len())];
        let n = self.choices[i].options.len();
        let mut out = c.clone();
        out[i] = (c[i] + 1 + rng.random_range(0..n - 1)) % n;
        self.canonical(out)
    }

    /// Whether decision `i` affects the architecture of `c` (a width beyond the depth does not).
    pub fn is_active(&self, c: &Candidate, i: usize) -> bool {
        let name = &self.choices[i].name;
        let (depth, per_layer) = match self.kind {
            SpaceKind::DigitsMlp => ("depth", "width."),
            SpaceKind::DigitsCnn => ("convs", "channels."),
            SpaceKind::DigitsCell | SpaceKind::Encoder => return true,
        };
        let layer = name.strip_prefix(per_layer).or_else(|| name.strip_prefix("kernel."));
        match layer.and_then(|l| l.parse::<usize>().ok()) {
            Some(l) => {
                let d = self.index_of(depth).expect("validated");
                l < self.choices[d].options[c[d]]
            }
            None => true,
        }
    }

    /// `c` with its inactive decisions set to 0.
    pub fn canonical(&self, mut c: Candidate) -> Candidate {
        for i in 0..c.len() {
            if !self.is_active(&c, i) {
                c[i] = 0;
            }
        }
        c
    }

    /// Every distinct candidate, in mixed-radix order (grid search); `None` above `limit`.
    pub fn enumerate(&self, limit: usize) -> Option<Vec<Candidate>> {
        if self.size() > limit as u128 * 64 {
            return None;
        }
        let mut out: Vec<Candidate> = Vec::new();
        let mut c = vec![0; self.choices.len()];
        loop {
            let k = self.canonical(c.clone());
            if !out.contains(&k) {
                out.push(k);
                if out.len() > limit {
                    return None;
                }
            }
            let mut i = c.len();
            loop {
                if i == 0 {
                    return Some(out);
                }
                i -= 1;
                c[i] += 1;
                if c[i] < self.choices[i].options.len() {
                    break;
                }
                c[i] = 0;
            }
        }
    }

    /// Checks that `c` is a candidate of this space.
    pub fn check(&self, c: &Candidate) -> Result<()> {
        if c.len() != self.choices.len() || c.iter().zip(&self.choices).any(|(&i, ch)| i >= ch.options.len()) {
            return Err(Error::invalid(
                "candidate",
                format!(
                    "{c:?} is not a point of a space with choices {:?}",
                    self.choices.iter().map(|c| c.options.len()).collect::<Vec<_>>()
                ),
            ));
        }
        Ok(())
    }

    /// The value of decision `name` in `c`.
    pub fn value(&self, c: &Candidate, name: &str) -> Result<usize> {
        let i = self.index_of(name)?;
        Ok(self.choices[i].options[c[i]])
    }

    /// The architecture `c` builds, as its spec string (`cnn:16,32:64`, `encoder:L3,H12,F768,D384`).
    pub fn describe(&self, c: &Candidate) -> Result<String> {
        match self.kind {
            SpaceKind::Encoder => Ok(self.decode_encoder(c)?.to_string()),
            _ => Ok(self.decode(c)?.to_string()),
        }
    }

    /// The encoder shape `c` builds (an error unless this is an encoder space).
    pub fn decode_encoder(&self, c: &Candidate) -> Result<EncoderArch> {
        self.check(c)?;
        if self.kind != SpaceKind::Encoder {
            return Err(Error::invalid("candidate", format!("a {:?} space does not build encoders", self.kind)));
        }
        Ok(EncoderArch {
            layers: self.value(c, "layers")?,
            heads: self.value(c, "heads")?,
            ffn: self.value(c, "ffn")?,
            hidden: self.value(c, "hidden")?,
        })
    }

    /// The digits architecture `c` builds (an error for an encoder space: see
    /// [`Space::decode_encoder`]).
    pub fn decode(&self, c: &Candidate) -> Result<DigitsArch> {
        self.check(c)?;
        Ok(match self.kind {
            SpaceKind::Encoder => {
                return Err(Error::invalid(
                    "candidate",
                    "an encoder space builds encoders, not digits models: use decode_encoder",
                ));
            }
            SpaceKind::DigitsMlp => {
                let depth = self.value(c, "depth")?;
                DigitsArch::Mlp(MlpConfig {
                    hidden: (0..depth).map(|l| self.value(c, &format!("width.{l}"))).collect::<Result<_>>()?,
                })
            }
            SpaceKind::DigitsCnn => {
                let convs = self.value(c, "convs")?;
                let has = |name: &str| self.choices.iter().any(|ch| ch.name == name);
                let mut kernels: Vec<usize> = (0..convs)
                    .map(|l| if has(&format!("kernel.{l}")) { self.value(c, &format!("kernel.{l}")) } else { Ok(3) })
                    .collect::<Result<_>>()?;
                if kernels.iter().all(|&k| k == 3) {
                    kernels.clear();
                }
                let activation =
                    if has("activation") { ACTIVATIONS[self.value(c, "activation")?] } else { "relu" }.to_string();
                DigitsArch::Cnn(CnnConfig {
                    channels: (0..convs).map(|l| self.value(c, &format!("channels.{l}"))).collect::<Result<_>>()?,
                    hidden: self.value(c, "hidden")?,
                    kernels,
                    activation,
                })
            }
            SpaceKind::DigitsCell => DigitsArch::Cell(CellConfig {
                channels: self.value(c, "channels")?,
                cells: self.value(c, "cells")?,
                ops: self
                    .choices
                    .iter()
                    .zip(c)
                    .filter(|(ch, _)| ch.name.starts_with("edge."))
                    .map(|(ch, &i)| CellOp::ALL[ch.options[i]])
                    .collect(),
            }),
        })
    }

    /// `c` as numbers in [0, 1] (option index over the last index), for model-based strategies.
    pub fn encode(&self, c: &Candidate) -> Vec<f64> {
        c.iter()
            .zip(&self.choices)
            .map(|(&i, ch)| if ch.options.len() > 1 { i as f64 / (ch.options.len() - 1) as f64 } else { 0.0 })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn builtin_spaces_decode_enumerate_and_mutate() {
        let mlp = Space::builtin("mlp").unwrap();
        // depth 1: 4, depth 2: 16, depth 3: 64 distinct MLPs.
        let all = mlp.enumerate(1000).unwrap();
        assert_eq!(all.len(), 4 + 16 + 64);
        assert_eq!(mlp.decode(&all[0]).unwrap().to_string(), "mlp:16");
        let cnn = Space::builtin("cnn").unwrap();
        assert_eq!(cnn.enumerate(10_000).unwrap().len(), (4 + 16 + 64) * 4);
        assert!(cnn.enumerate(10).is_none());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let c = cnn.sample(&mut rng);
            assert_eq!(c, cnn.canonical(c.clone()));
            let m = cnn.mutate(&c, &mut rng);
            assert_ne!(cnn.decode(&m).unwrap(), cnn.decode(&c).unwrap(), "a mutation changes the architecture");
            assert!(cnn.encode(&m).iter().all(|v| (0.0..=1.0).contains(v)));
        }
    }

    #[test]
    fn the_cell_space_decodes_every_edge_and_refuses_bad_edges() {
        let cell = Space::builtin("cell").unwrap();
        assert_eq!(cell.size(), 15_625);
        assert_eq!(
            cell.decode(&vec![0, 0, 3, 1, 0, 4, 2, 3]).unwrap().to_string(),
            "cell:16x2:conv3x3,skip,none,avg3x3,conv1x1,conv3x3"
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        for _ in 0..50 {
            let c = cell.sample(&mut rng);
            assert_ne!(cell.decode(&cell.mutate(&c, &mut rng)).unwrap(), cell.decode(&c).unwrap());
        }
        let mut s = cell.clone();
        s.choices[3].options = vec![1, 5];
        assert!(s.validate().unwrap_err().to_string().contains("`edge.0-2` offers [1, 5]"));
        let mut s = cell.clone();
        s.choices.pop();
        assert!(s.validate().unwrap_err().to_string().contains("found 5"));
        let mut s = cell.clone();
        s.choices.swap(2, 3);
        assert!(s.validate().unwrap_err().to_string().contains("in that order"));
    }

    #[test]
    fn the_cnn_space_with_kernels_and_activations_decodes_them() {
        let s = Space::builtin("cnn-ka").unwrap();
        // convs 2, channels 16, 32, (unused), hidden 64, kernels 5, 3, (unused), gelu.
        let c = vec![1, 2, 3, 0, 2, 1, 0, 0, 1];
        assert_eq!(s.decode(&c).unwrap().to_string(), "cnn:16k5,32:64:gelu");
        assert_eq!(
            s.canonical(vec![0, 2, 3, 1, 2, 1, 1, 1, 0]),
            vec![0, 2, 0, 0, 2, 1, 0, 0, 0],
            "unused layers' kernels are inactive"
        );
        assert_eq!(s.decode(&vec![0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap().to_string(), "cnn:4:16");
        let mut bad = s.clone();
        bad.choices[5].options = vec![3, 4];
        assert!(bad.validate().unwrap_err().to_string().contains("kernel size 4"));
        let mut bad = s.clone();
        bad.choices[8].options = vec![0, 7];
        assert!(bad.validate().unwrap_err().to_string().contains("`activation` offers 7"));
    }

    #[test]
    fn the_encoder_space_decodes_shapes() {
        let enc = Space::builtin("encoder").unwrap();
        assert_eq!(enc.size(), 64);
        assert_eq!(enc.describe(&vec![1, 3, 1, 0]).unwrap(), "encoder:L3,H12,F768,D384");
        assert!(enc.decode(&vec![1, 3, 1, 0]).is_err());
        assert!(Space::builtin("cnn").unwrap().decode_encoder(&vec![0; 5]).is_err());
        let mut s = enc.clone();
        s.choices.retain(|c| c.name != "ffn");
        assert!(s.validate().unwrap_err().to_string().contains("`ffn`"));
    }

    #[test]
    fn spaces_read_from_toml_and_json_and_bad_files_say_where() {
        let dir = tempfile::tempdir().unwrap();
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../spaces/cnn-wide.toml");
        let wide = Space::from_file(&shipped).unwrap();
        assert_eq!(wide.kind, SpaceKind::DigitsCnn);
        assert_eq!(wide.decode(&vec![1, 5, 0, 0, 3]).unwrap().to_string(), "cnn:32,4:64");
        let json = dir.path().join("mlp.json");
        std::fs::write(&json, serde_json::to_string(&Space::builtin("mlp").unwrap()).unwrap()).unwrap();
        assert_eq!(Space::from_file(&json).unwrap(), Space::builtin("mlp").unwrap());
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "kind = \"digits_cnn\"\n[[choices]]\nname = \"convs\"\noptions = [1, \"two\"]\n").unwrap();
        let e = Space::from_file(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("line 4"), "{e}");
        std::fs::write(&bad, "kind = \"digits_cnn\"\n[[choices]]\nname = \"convs\"\noptions = [2]\n").unwrap();
        let e = Space::from_file(&bad).unwrap_err().to_string();
        assert!(e.contains("unknown search-space choice `channels.0`"), "{e}");
        assert!(Space::from_file(&dir.path().join("missing.toml")).unwrap_err().to_string().contains("missing.toml"));
    }

    #[test]
    fn bad_spaces_are_refused_with_the_choice_named() {
        assert!(Space::builtin("rnn").unwrap_err().to_string().contains("unknown search space `rnn`"));
        let mut s = Space::builtin("mlp").unwrap();
        s.choices[1].options.clear();
        assert!(s.validate().unwrap_err().to_string().contains("`width.0` has no options"));
        let mut s = Space::builtin("mlp").unwrap();
        s.choices[0].options = vec![1, 4];
        assert!(s.validate().unwrap_err().to_string().contains("width.3"));
        let mut s = Space::builtin("cnn").unwrap();
        s.choices[4].options = vec![0, 8];
        assert!(s.validate().unwrap_err().to_string().contains("offers 0"));
        let s = Space::builtin("mlp").unwrap();
        assert!(s.decode(&vec![0, 9, 0, 0]).is_err());
    }
}
