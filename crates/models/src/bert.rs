//! A BERT encoder built from core-tensor layers, loading Hugging Face checkpoints such as
//! all-MiniLM-L6-v2, and a sentence encoder (tokenizer + encoder + mean pooling + L2
//! normalisation) that produces sentence-transformers embeddings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarMap;
use pare_core_tensor::io::load_weights;
use pare_core_tensor::{
    Activation, AttentionPrecision, Embedding, Graph, Hooks, Init, LayerMut, LayerNorm, LayerRef, Linear,
    LoadedWeights, Module, Step, Weight, WeightSource,
};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The fields of a Hugging Face `config.json` that a BERT encoder needs, plus pare's per-layer
/// sizes after structured pruning.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Activation of the feed-forward layer (`gelu`, ...).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest sequence the position table covers.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Head width when it is not `hidden_size / num_attention_heads` (after head pruning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_head_size: Option<usize>,
    /// Attention heads of each layer when structured pruning made them differ
    /// (`pare_heads_per_layer` in config.json); `num_attention_heads` otherwise.
    #[serde(default, rename = "pare_heads_per_layer", skip_serializing_if = "Option::is_none")]
    pub heads_per_layer: Option<Vec<usize>>,
    /// FFN width of each layer when structured pruning made them differ
    /// (`pare_intermediate_per_layer`); `intermediate_size` otherwise.
    #[serde(default, rename = "pare_intermediate_per_layer", skip_serializing_if = "Option::is_none")]
    pub intermediate_per_layer: Option<Vec<usize>>,
    /// The precision of attention's two products (`pare_attention_precision`: absent means
    /// f32; `bf16` where a pipeline chose it, see [`BertEncoder::set_attention_precision`]).
    #[serde(default, rename = "pare_attention_precision", skip_serializing_if = "is_f32")]
    pub attention_precision: AttentionPrecision,
}

fn is_f32(p: &AttentionPrecision) -> bool {
    *p == AttentionPrecision::F32
}

fn default_act() -> String {
    "gelu".into()
}
fn default_types() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| pare_core_tensor::Error::io("read", path, e))?;
        let cfg: BertConfig = serde_json::from_str(&text)
            .map_err(|e| pare_core_tensor::Error::Json { path: path.to_path_buf(), cause: e })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Width of one attention head.
    pub fn head_size(&self) -> usize {
        self.attention_head_size.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Attention heads of layer `l`.
    pub fn heads_of(&self, l: usize) -> usize {
        self.heads_per_layer.as_ref().map_or(self.num_attention_heads, |h| h[l])
    }

    /// FFN width of layer `l`.
    pub fn intermediate_of(&self, l: usize) -> usize {
        self.intermediate_per_layer.as_ref().map_or(self.intermediate_size, |v| v[l])
    }

    fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(Error::Config { what: "BERT", detail });
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.intermediate_size == 0 || self.vocab_size == 0
        {
            return bad(format!("sizes must be ≥ 1, found {self:?}"));
        }
        if self.attention_head_size.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "{} attention heads do not divide hidden size {}",
                self.num_attention_heads, self.hidden_size
            ));
        }
        for (what, v) in [
            ("pare_heads_per_layer", &self.heads_per_layer),
            ("pare_intermediate_per_layer", &self.intermediate_per_layer),
        ] {
            if let Some(v) = v
                && (v.len() != self.num_hidden_layers || v.contains(&0))
            {
                return bad(format!(
                    "{what} must give each of the {} layers at least 1, found {v:?}",
                    self.num_hidden_layers
                ));
            }
        }
        Activation::from_hf_name(&self.hidden_act)?;
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

/// A BERT encoder: embeddings, then `num_hidden_layers` post-norm transformer layers.
#[derive(Debug, Clone)]
pub struct BertEncoder {
    config: BertConfig,
    act: Activation,
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<BertLayer>,
}

fn linear(src: &mut dyn WeightSource, path: String, i: usize, o: usize) -> Result<Linear> {
    crate::linear(src, &path, i, o, Init::Normal { std: 0.02 }, Init::Zeros)
}

fn norm(src: &mut dyn WeightSource, path: String, dim: usize, eps: f64) -> Result<LayerNorm> {
    let w = src.tensor(&format!("{path}.weight"), &[dim], Init::Ones)?;
    let b = src.tensor(&format!("{path}.bias"), &[dim], Init::Zeros)?;
    Ok(LayerNorm::new(path, w, b, eps)?)
}

fn embedding(src: &mut dyn WeightSource, path: String, n: usize, dim: usize) -> Result<Embedding> {
    let w = src.weight(&format!("{path}.weight"), &[n, dim], Init::Normal { std: 0.02 })?;
    Ok(Embedding::new(path, w)?)
}

impl BertEncoder {
    /// Builds the encoder, taking every parameter (Hugging Face names) from `src`.
    pub fn build(config: BertConfig, src: &mut dyn WeightSource) -> Result<Self> {
        config.validate()?;
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let d = config.head_size();
        let word = embedding(src, "embeddings.word_embeddings".into(), config.vocab_size, h)?;
        let position = embedding(src, "embeddings.position_embeddings".into(), config.max_position_embeddings, h)?;
        let token_type = embedding(src, "embeddings.token_type_embeddings".into(), config.type_vocab_size, h)?;
        let emb_norm = norm(src, "embeddings.LayerNorm".into(), h, eps)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = |s: &str| format!("encoder.layer.{i}.{s}");
            let (inner, ffn) = (config.heads_of(i) * d, config.intermediate_of(i));
            layers.push(BertLayer {
                query: linear(src, p("attention.self.query"), h, inner)?,
                key: linear(src, p("attention.self.key"), h, inner)?,
                value: linear(src, p("attention.self.value"), h, inner)?,
                attn_out: linear(src, p("attention.output.dense"), inner, h)?,
                attn_norm: norm(src, p("attention.output.LayerNorm"), h, eps)?,
                intermediate: linear(src, p("intermediate.dense"), h, ffn)?,
                output: linear(src, p("output.dense"), ffn, h)?,
                out_norm: norm(src, p("output.LayerNorm"), h, eps)?,
            });
        }
        let act = Activation::from_hf_name(&config.hidden_act)?;
        Ok(Self { config, act, word, position, token_type, emb_norm, layers })
    }

    /// Loads `config.json` and `model.safetensors` (or, failing that, `model.gguf`, dequantized)
    /// from a Hugging Face model folder. A config.json with a compressed-tensors
    /// `quantization_config` has its quantized layers read as pare quantized weights.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let st = dir.join("model.safetensors");
        let (mut weights, meta) = if let Some(qc) = compressed_tensors_config(&dir.join("config.json"))? {
            pare_core_tensor::io::compressed_tensors::load(st, &qc, device)?
        } else if st.is_file() {
            load_weights(st, device)?
        } else {
            pare_core_tensor::io::load_gguf(dir.join("model.gguf"), device)?
        };
        // Checkpoints saved from `BertForX` carry a `bert.` prefix; accept both spellings.
        if weights.keys().any(|k| k.starts_with("bert.")) {
            weights =
                weights.into_iter().map(|(k, v)| (k.strip_prefix("bert.").map(String::from).unwrap_or(k), v)).collect();
        }
        let mut src = LoadedWeights::new(weights, device.clone());
        let mut enc = Self::build(config, &mut src)?;
        pare_core_tensor::act::apply_metadata(&mut enc, &meta)?;
        let ignored: Vec<&str> = src.unused();
        if !ignored.is_empty() {
            tracing::debug!(?ignored, "tensors the encoder does not use (pooler, position ids)");
        }
        Ok(enc)
    }

    /// Writes a model folder that loads like the original: the encoder's weights (in whatever
    /// formats they now are) as `out/model.safetensors`, and every other file of `src` (config,
    /// tokenizer, pooling config) copied beside them. `out` must not be `src`.
    pub fn save_folder(
        &self,
        src: &Path,
        out: &Path,
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        refuse_same_folder(src, out)?;
        std::fs::create_dir_all(out).map_err(|e| pare_core_tensor::Error::io("create folder", out, e))?;
        let weights = src.join("model.safetensors");
        let mut meta = metadata.clone();
        meta.extend(pare_core_tensor::act::to_metadata(self));
        pare_core_tensor::io::save_weights(out.join("model.safetensors"), &self.named_weights(), &meta, &[&weights])?;
        copy_tree(src, out)?;
        self.rewrite_config(src, out)
    }

    /// Writes `out/config.json` from `src`'s with this encoder's settings when they differ
    /// from it (after structured pruning: layer count, head width, per-layer heads and FFN
    /// widths; the attention precision).
    fn rewrite_config(&self, src: &Path, out: &Path) -> Result<()> {
        if BertConfig::from_file(&src.join("config.json"))? == self.config {
            return Ok(());
        }
        let json = serde_json::to_vec_pretty(&self.merged_config(src)?).expect("JSON values serialise");
        Ok(pare_core_tensor::io::write_file_atomic(out.join("config.json"), &json)?)
    }

    /// `src/config.json` with this encoder's fields written over it (and pare's attention
    /// precision removed when it is back to f32).
    fn merged_config(&self, src: &Path) -> Result<serde_json::Value> {
        let cfg_path = src.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| pare_core_tensor::Error::io("read", &cfg_path, e))?;
        let mut config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| pare_core_tensor::Error::Json { path: cfg_path.clone(), cause: e })?;
        let ours = serde_json::to_value(&self.config).expect("the config serialises");
        for (k, v) in ours.as_object().expect("an object") {
            config[k] = v.clone();
        }
        if is_f32(&self.config.attention_precision)
            && let Some(obj) = config.as_object_mut()
        {
            obj.remove("pare_attention_precision");
        }
        Ok(config)
    }

    /// Writes a model folder in the compressed-tensors layout that vLLM and transformers load:
    /// `out/model.safetensors` with the quantized layers as `int-quantized` or
    /// `pack-quantized` tensors (see [`pare_core_tensor::io::compressed_tensors`]), `config.json`
    /// with its `quantization_config`, and every other file of `src`. pare's own loader reads
    /// it back to the same weights and activation specs.
    pub fn save_folder_compressed_tensors(
        &self,
        src: &Path,
        out: &Path,
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        refuse_same_folder(src, out)?;
        let inputs: std::collections::BTreeMap<String, pare_core_tensor::ActQuant> =
            self.layers().iter().filter_map(|l| l.input_quant().map(|a| (l.path().to_string(), a))).collect();
        // Everything is encoded (and refused) before anything is written.
        let (tensors, qconfig) = pare_core_tensor::io::compressed_tensors::encode(&self.named_weights(), &inputs)?;
        let mut config = self.merged_config(src)?;
        config["quantization_config"] = qconfig;
        std::fs::create_dir_all(out).map_err(|e| pare_core_tensor::Error::io("create folder", out, e))?;
        let mut meta = metadata.clone();
        meta.insert("format".into(), "pt".into());
        pare_core_tensor::io::save_tensors(
            out.join("model.safetensors"),
            &tensors,
            &meta,
            &[&src.join("model.safetensors")],
        )?;
        copy_tree(src, out)?;
        let json = serde_json::to_vec_pretty(&config).expect("JSON values serialise");
        pare_core_tensor::io::write_file_atomic(out.join("config.json"), &json)?;
        Ok(())
    }

    /// A shallower encoder made of the layers at `keep` (ascending, distinct, each below
    /// `num_hidden_layers`), renumbered from 0, with the embeddings unchanged: the student
    /// DistilBERT initialises from every other teacher layer, and what dropping layers leaves.
    pub fn keep_layers(&self, keep: &[usize]) -> Result<Self> {
        let n = self.config.num_hidden_layers;
        let bad = |detail: String| Error::Config { what: "layers to keep", detail };
        if keep.is_empty() {
            return Err(bad(format!("the encoder has layers 0..{n}; at least one must stay, found none")));
        }
        if let Some(&l) = keep.iter().find(|&&l| l >= n) {
            return Err(bad(format!("the encoder has layers 0..{n}, found {l}")));
        }
        if keep.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad(format!("layer indices must be ascending and distinct, found {keep:?}")));
        }
        let mut weights = BTreeMap::new();
        for (name, w) in self.named_weights() {
            match name.strip_prefix("encoder.layer.").and_then(|r| r.split_once('.')) {
                Some((idx, rest)) => {
                    let idx: usize = idx.parse().map_err(|_| bad(format!("parameter `{name}` has no layer index")))?;
                    if let Some(new) = keep.iter().position(|&k| k == idx) {
                        weights.insert(format!("encoder.layer.{new}.{rest}"), w);
                    }
                }
                None => {
                    weights.insert(name, w);
                }
            }
        }
        let c = &self.config;
        let config = BertConfig {
            num_hidden_layers: keep.len(),
            heads_per_layer: c.heads_per_layer.as_ref().map(|v| keep.iter().map(|&l| v[l]).collect()),
            intermediate_per_layer: c.intermediate_per_layer.as_ref().map(|v| keep.iter().map(|&l| v[l]).collect()),
            ..c.clone()
        };
        let device = self.word.runtime().device().clone();
        Self::build(config, &mut LoadedWeights::new(weights, device))
    }

    /// A narrower encoder that keeps, in each layer `l`, only the attention heads `heads[l]` and
    /// the feed-forward neurons `neurons[l]` (ascending, distinct, in range; at least one of
    /// each): the query/key/value rows and output columns of dropped heads and the
    /// intermediate rows and output columns of dropped neurons are cut, everything else is
    /// unchanged. The sub-network that architecture search and structured pruning inherit.
    pub fn subnetwork(&self, heads: &[Vec<usize>], neurons: &[Vec<usize>]) -> Result<Self> {
        let c = &self.config;
        let n = c.num_hidden_layers;
        let bad = |detail: String| Error::Config { what: "sub-network", detail };
        if heads.len() != n || neurons.len() != n {
            return Err(bad(format!(
                "one list of heads and one of neurons per layer: expected {n}, found {} and {}",
                heads.len(),
                neurons.len()
            )));
        }
        for (l, (h, f)) in heads.iter().zip(neurons).enumerate() {
            for (what, keep, have) in [("heads", h, c.heads_of(l)), ("neurons", f, c.intermediate_of(l))] {
                if keep.is_empty() || keep.windows(2).any(|w| w[0] >= w[1]) || keep.iter().any(|&k| k >= have) {
                    return Err(bad(format!(
                        "layer {l} has {what} 0..{have}; keep a non-empty ascending list of them, found {keep:?}"
                    )));
                }
            }
        }
        let d = c.head_size();
        let device = self.word.runtime().device().clone();
        let mut weights = self.named_weights();
        let mut cut = |name: String, dim: usize, rows: &[u32]| -> Result<()> {
            let w = weights.remove(&name).ok_or_else(|| bad(format!("no parameter `{name}`")))?;
            let idx = Tensor::from_slice(rows, rows.len(), &device)?;
            weights.insert(name, Weight::Dense(w.to_dense(&device)?.index_select(&idx, dim)?));
            Ok(())
        };
        for l in 0..n {
            let p = |s: &str| format!("encoder.layer.{l}.{s}");
            let rows: Vec<u32> = heads[l].iter().flat_map(|&h| (h * d..(h + 1) * d).map(|r| r as u32)).collect();
            for m in ["query", "key", "value"] {
                cut(p(&format!("attention.self.{m}.weight")), 0, &rows)?;
                cut(p(&format!("attention.self.{m}.bias")), 0, &rows)?;
            }
            cut(p("attention.output.dense.weight"), 1, &rows)?;
            let cols: Vec<u32> = neurons[l].iter().map(|&k| k as u32).collect();
            cut(p("intermediate.dense.weight"), 0, &cols)?;
            cut(p("intermediate.dense.bias"), 0, &cols)?;
            cut(p("output.dense.weight"), 1, &cols)?;
        }
        let config = BertConfig {
            attention_head_size: Some(d),
            heads_per_layer: Some(heads.iter().map(Vec::len).collect()),
            intermediate_per_layer: Some(neurons.iter().map(Vec::len).collect()),
            ..c.clone()
        };
        Self::build(config, &mut LoadedWeights::new(weights, device))
    }

    /// The same encoder with its dense parameters as trainable `Var`s registered in `varmap`,
    /// except those whose names start with one of `frozen` (the embeddings, typically), which
    /// stay constants. Quantized or sparse weights stay as they are (not trainable).
    pub fn trainable(&self, varmap: &VarMap, frozen: &[&str]) -> Result<Self> {
        let device = self.word.runtime().device().clone();
        let mut src = LoadedWeights::trainable(self.named_weights(), device, varmap.clone())
            .freeze(frozen.iter().map(|p| p.to_string()).collect());
        Self::build(self.config.clone(), &mut src)
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Runs every layer's attention products at `precision` from now on (saved with the
    /// model as `pare_attention_precision` in config.json, so it loads the same way).
    pub fn set_attention_precision(&mut self, precision: AttentionPrecision) {
        self.config.attention_precision = precision;
    }

    /// Hidden states `[batch, seq, hidden]` for token ids `[batch, seq]` (u32), token types
    /// (zeros when `None`) and an attention mask of 1 (attend) and 0 (padding).
    pub fn forward_hooked(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        hooks: &mut Hooks<'_>,
    ) -> Result<Tensor> {
        let rt = self.word.runtime().clone();
        // The graph's attention step is f32: a model with bf16 attention runs op by op, where
        // `Runtime::attention_with` keeps its precision.
        if hooks.is_empty() && rt.resident() && self.config.attention_precision == AttentionPrecision::F32 {
            return self.forward_resident(rt.as_ref(), input_ids, token_type_ids, attention_mask);
        }
        if hooks.is_empty() {
            // The whole forward on the runtime's own threads (see `Runtime::run_scoped`).
            return pare_core_tensor::in_runtime(rt.as_ref(), || {
                self.forward_ops(input_ids, token_type_ids, attention_mask, &mut Hooks::none())
            });
        }
        self.forward_ops(input_ids, token_type_ids, attention_mask, hooks)
    }

    /// The forward op by op on the layers' runtime.
    fn forward_ops(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        hooks: &mut Hooks<'_>,
    ) -> Result<Tensor> {
        let mut h = self.embed_hooked(input_ids, token_type_ids, hooks)?;
        let mask = attention_bias(attention_mask)?;
        for i in 0..self.layers.len() {
            h = self.layer_forward(i, &h, &mask, hooks, &mut Ok)?;
        }
        Ok(h)
    }

    /// The whole forward as one [`Graph`] (inputs: ids, positions, token types, the additive
    /// mask), run by a resident runtime on its device: the same steps, in the same order, as
    /// the op-by-op path.
    fn forward_resident(
        &self,
        rt: &dyn pare_core_tensor::Runtime,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let (positions, types) = self.position_and_type_ids(input_ids, token_type_ids)?;
        let mask = attention_bias(attention_mask)?;
        let mut g = Graph::new(4);
        let op = |g: &mut Graph, op: &std::sync::Arc<dyn pare_core_tensor::PreparedOp>, x| {
            g.push(Step::Op { op: op.clone(), x })
        };
        let norm = |g: &mut Graph, n: &LayerNorm, x, residual| {
            g.push(Step::LayerNorm { x, residual, gamma: n.weight().clone(), beta: n.bias().clone(), eps: n.eps() })
        };
        let w = op(&mut g, self.word.op(), 0)?;
        let p = op(&mut g, self.position.op(), 1)?;
        let ty = op(&mut g, self.token_type.op(), 2)?;
        let wp = g.push(Step::Add { a: w, b: p })?;
        let emb = g.push(Step::Add { a: wp, b: ty })?;
        let mut h = norm(&mut g, &self.emb_norm, emb, None)?;
        for (i, l) in self.layers.iter().enumerate() {
            let (q, k, v) = (op(&mut g, l.query.op(), h)?, op(&mut g, l.key.op(), h)?, op(&mut g, l.value.op(), h)?);
            let heads = self.config.heads_of(i);
            let scale = 1.0 / (self.config.head_size() as f64).sqrt();
            let ctx = g.push(Step::Attention { q, k, v, heads, mask: Some(3), scale })?;
            let attn = op(&mut g, l.attn_out.op(), ctx)?;
            h = norm(&mut g, &l.attn_norm, attn, Some(h))?;
            let inter = op(&mut g, l.intermediate.op(), h)?;
            let act = g.push(Step::Activation { act: self.act, x: inter })?;
            let out = op(&mut g, l.output.op(), act)?;
            h = norm(&mut g, &l.out_norm, out, Some(h))?;
        }
        g.output(h)?;
        let mut outs = rt.run_graph(&g, &[input_ids.clone(), positions, types, mask])?;
        Ok(outs.pop().expect("one output"))
    }

    /// The position ids `[batch, seq]` (0, 1, … per row) and token types (zeros when `None`)
    /// for token ids `[batch, seq]`, which may be at most `max_position_embeddings` long.
    fn position_and_type_ids(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let (b, t) = input_ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(Error::Config {
                what: "BERT input",
                detail: format!(
                    "sequence of {t} tokens exceeds max_position_embeddings {}",
                    self.config.max_position_embeddings
                ),
            });
        }
        let dev = input_ids.device();
        let positions = Tensor::arange(0u32, t as u32, dev)?.unsqueeze(0)?.broadcast_as((b, t))?.contiguous()?;
        let types = match token_type_ids {
            Some(tt) => tt.clone(),
            None => Tensor::zeros((b, t), DType::U32, dev)?,
        };
        Ok((positions, types))
    }

    /// The embedding stage: word + position + token-type embeddings, then layer norm;
    /// `[batch, seq, hidden]` for token ids `[batch, seq]`. The first stage of
    /// [`BertEncoder::forward_hooked`], exposed for pipeline-parallel execution.
    pub fn embed_hooked(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        hooks: &mut Hooks<'_>,
    ) -> Result<Tensor> {
        let (positions, types) = self.position_and_type_ids(input_ids, token_type_ids)?;
        let emb = self
            .word
            .forward_hooked(input_ids, hooks)?
            .add(&self.position.forward_hooked(&positions, hooks)?)?
            .add(&self.token_type.forward_hooked(&types, hooks)?)?;
        let rt = self.word.runtime().clone();
        Ok(self.emb_norm.forward_on(rt.as_ref(), &emb, None, hooks)?)
    }

    /// Transformer layer `i` on hidden states `h` with the additive mask from [`attention_bias`].
    ///
    /// `reduce` sees the two partial results a tensor-parallel shard computes — the attention
    /// output projection and the feed-forward output projection, each before its residual
    /// add and layer norm — and returns the full result (an all-reduce across the shards of
    /// [`BertEncoder::tensor_shard`]); a whole encoder passes `&mut Ok`.
    pub fn layer_forward(
        &self,
        i: usize,
        h: &Tensor,
        mask: &Tensor,
        hooks: &mut Hooks<'_>,
        reduce: &mut dyn FnMut(Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let layer = self.layers.get(i).ok_or_else(|| Error::Config {
            what: "BERT layer",
            detail: format!("the encoder has layers 0..{}, found {i}", self.layers.len()),
        })?;
        let heads = self.config.heads_of(i);
        let scale = 1.0 / (self.config.head_size() as f64).sqrt();
        let rt = layer.query.runtime().clone();
        let qkv = Linear::forward_shared(&[&layer.query, &layer.key, &layer.value], h, hooks)?;
        let [q, k, v]: [Tensor; 3] = qkv.try_into().map_err(|v: Vec<Tensor>| Error::Config {
            what: "BERT attention projections",
            detail: format!("expected query, key and value outputs, found {} tensors", v.len()),
        })?;
        let ctx = rt.attention_with(&q, &k, &v, heads, Some(mask), scale, self.config.attention_precision)?;
        let attn = reduce(layer.attn_out.forward_hooked(&ctx, hooks)?)?;
        let h = layer.attn_norm.forward_on(rt.as_ref(), &attn, Some(h), hooks)?;
        let out = reduce(layer.intermediate.forward_chain(self.act, &layer.output, &h, hooks)?)?;
        Ok(layer.out_norm.forward_on(rt.as_ref(), &out, Some(&h), hooks)?)
    }

    /// The number of transformer layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Shard `rank` of `world` for Megatron-style tensor parallelism: in every layer the
    /// query/key/value projections keep a contiguous `1/world` of the heads (column parallel),
    /// the attention output projection the matching input columns (row parallel), the
    /// intermediate projection `1/world` of the neurons and the output projection the matching
    /// columns. The two row-parallel biases stay on rank 0 only (zeros elsewhere), so summing
    /// the shards' partial outputs — one all-reduce each, see [`BertEncoder::layer_forward`] —
    /// gives the whole layer's. Embeddings and layer norms are replicated. Every layer's heads
    /// and neurons must divide by `world`.
    pub fn tensor_shard(&self, rank: usize, world: usize) -> Result<Self> {
        let c = &self.config;
        let bad = |detail: String| Error::Config { what: "tensor-parallel split", detail };
        if world == 0 || rank >= world {
            return Err(bad(format!("rank must be below the world size, found rank {rank} of {world}")));
        }
        let mut heads = Vec::new();
        let mut neurons = Vec::new();
        for l in 0..c.num_hidden_layers {
            for (what, have, list) in
                [("attention heads", c.heads_of(l), &mut heads), ("FFN neurons", c.intermediate_of(l), &mut neurons)]
            {
                if !have.is_multiple_of(world) {
                    return Err(bad(format!(
                        "layer {l} has {have} {what}, which {world} workers cannot share evenly (expected a multiple of {world})"
                    )));
                }
                let per = have / world;
                list.push((rank * per..(rank + 1) * per).collect::<Vec<_>>());
            }
        }
        let mut shard = self.subnetwork(&heads, &neurons)?;
        if rank > 0 {
            for layer in &mut shard.layers {
                for lin in [&mut layer.attn_out, &mut layer.output] {
                    let rt = lin.runtime().clone();
                    let bias = lin.bias().map(Tensor::zeros_like).transpose()?;
                    let mut zeroed = Linear::new(lin.path(), lin.weight().clone(), bias)?;
                    zeroed.prepare(&rt)?;
                    *lin = zeroed;
                }
            }
        }
        Ok(shard)
    }
}

/// The additive attention mask for a 1 (attend) / 0 (padding) mask `[batch, seq]`: 0 where
/// attended, a large negative number at padding.
pub fn attention_bias(attention_mask: &Tensor) -> Result<Tensor> {
    Ok(((attention_mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?)
}

impl Module for BertEncoder {
    fn layers(&self) -> Vec<LayerRef<'_>> {
        let mut v = vec![
            LayerRef::Embedding(&self.word),
            LayerRef::Embedding(&self.position),
            LayerRef::Embedding(&self.token_type),
            LayerRef::LayerNorm(&self.emb_norm),
        ];
        for l in &self.layers {
            v.extend([
                LayerRef::Linear(&l.query),
                LayerRef::Linear(&l.key),
                LayerRef::Linear(&l.value),
                LayerRef::Linear(&l.attn_out),
                LayerRef::LayerNorm(&l.attn_norm),
                LayerRef::Linear(&l.intermediate),
                LayerRef::Linear(&l.output),
                LayerRef::LayerNorm(&l.out_norm),
            ]);
        }
        v
    }
    fn layers_mut(&mut self) -> Vec<LayerMut<'_>> {
        let mut v = vec![
            LayerMut::Embedding(&mut self.word),
            LayerMut::Embedding(&mut self.position),
            LayerMut::Embedding(&mut self.token_type),
            LayerMut::LayerNorm(&mut self.emb_norm),
        ];
        for l in &mut self.layers {
            v.extend([
                LayerMut::Linear(&mut l.query),
                LayerMut::Linear(&mut l.key),
                LayerMut::Linear(&mut l.value),
                LayerMut::Linear(&mut l.attn_out),
                LayerMut::LayerNorm(&mut l.attn_norm),
                LayerMut::Linear(&mut l.intermediate),
                LayerMut::Linear(&mut l.output),
                LayerMut::LayerNorm(&mut l.out_norm),
            ]);
        }
        v
    }
}

/// Writing a model folder onto the folder it was read from is refused.
fn refuse_same_folder(src: &Path, out: &Path) -> Result<()> {
    match (src.canonicalize(), out.canonicalize()) {
        (Ok(a), Ok(b)) if a == b => Err(pare_core_tensor::Error::OverwriteInput { path: out.to_path_buf() }.into()),
        _ => Ok(()),
    }
}

/// The `quantization_config` of a config.json when it is compressed-tensors'.
fn compressed_tensors_config(path: &Path) -> Result<Option<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| pare_core_tensor::Error::io("read", path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| pare_core_tensor::Error::Json { path: path.to_path_buf(), cause: e })?;
    Ok(v.get("quantization_config")
        .filter(|q| {
            q.get("quant_method").and_then(|m| m.as_str())
                == Some(pare_core_tensor::io::compressed_tensors::QUANT_METHOD)
        })
        .cloned())
}

/// Copies every file of model folder `src` into `out` (recursively) except the weights
/// (`model.safetensors`, `model.gguf`): config, tokenizer and pooling files for a rewritten model.
pub fn copy_model_files(src: &Path, out: &Path) -> Result<()> {
    copy_tree(src, out)
}

fn copy_tree(src: &Path, out: &Path) -> Result<()> {
    let entries = std::fs::read_dir(src).map_err(|e| pare_core_tensor::Error::io("list", src, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| pare_core_tensor::Error::io("list", src, e))?;
        let (from, to) = (entry.path(), out.join(entry.file_name()));
        if from.is_dir() {
            std::fs::create_dir_all(&to).map_err(|e| pare_core_tensor::Error::io("create folder", &to, e))?;
            copy_tree(&from, &to)?;
        } else if entry.file_name() != "model.safetensors" && entry.file_name() != "model.gguf" {
            std::fs::copy(&from, &to).map_err(|e| pare_core_tensor::Error::io("copy", &from, e))?;
        }
    }
    Ok(())
}

/// Mean of `hidden` `[b, t, h]` over the positions where `mask` `[b, t]` is 1, then L2-normalised:
/// sentence-transformers' pooling for all-MiniLM-L6-v2.
pub fn mean_pool_normalize(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&m)?.sum(1)?;
    let counts = m.sum(1)?.clamp(1e-9f32, f32::MAX)?;
    let mean = summed.broadcast_div(&counts)?;
    let norm = mean.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    Ok(mean.broadcast_div(&norm)?)
}

/// Token ids, token types and attention mask for one batch, padded to its longest sentence.
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    /// `[b, t]` u32 token ids.
    pub input_ids: Tensor,
    /// `[b, t]` u32 token types.
    pub token_type_ids: Tensor,
    /// `[b, t]` u32, 1 for tokens and 0 for padding.
    pub attention_mask: Tensor,
}

/// A sentence encoder: tokenizer, BERT encoder, mean pooling and L2 normalisation.
#[derive(Debug, Clone)]
pub struct SentenceEncoder {
    /// The encoder (its layers may be quantized, sparse or pruned).
    pub bert: BertEncoder,
    tokenizer: tokenizers::Tokenizer,
    tokenizer_path: PathBuf,
    max_len: usize,
}

/// The sentence-transformers `max_seq_length` when no `sentence_bert_config.json` says otherwise.
pub const DEFAULT_MAX_SEQ_LEN: usize = 256;

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

impl SentenceEncoder {
    /// Loads a sentence-transformers folder (`config.json`, `model.safetensors`, `tokenizer.json`,
    /// optional `sentence_bert_config.json` for the maximum sequence length).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let missing = |f: &str| Error::Model { path: dir.to_path_buf(), detail: format!("missing `{f}`") };
        if !dir.join("config.json").is_file() {
            return Err(missing("config.json"));
        }
        if !dir.join("model.safetensors").is_file() && !dir.join("model.gguf").is_file() {
            return Err(missing("model.safetensors` (or `model.gguf`"));
        }
        if !dir.join("tokenizer.json").is_file() {
            return Err(missing("tokenizer.json"));
        }
        let bert = BertEncoder::load(dir, device)?;
        let sbert = dir.join("sentence_bert_config.json");
        let max_len = if sbert.is_file() {
            let text = std::fs::read_to_string(&sbert).map_err(|e| pare_core_tensor::Error::io("read", &sbert, e))?;
            serde_json::from_str::<SentenceBertConfig>(&text)
                .map_err(|e| pare_core_tensor::Error::Json { path: sbert.clone(), cause: e })?
                .max_seq_length
        } else {
            DEFAULT_MAX_SEQ_LEN
        }
        .min(bert.config().max_position_embeddings);
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| Error::Tokenizer { path: tokenizer_path.clone(), detail: e.to_string() })?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| Error::Tokenizer { path: tokenizer_path.clone(), detail: e.to_string() })?;
        tokenizer.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        Ok(Self { bert, tokenizer, tokenizer_path, max_len })
    }

    /// Longest tokenized sentence the encoder accepts; longer ones are truncated.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenizes `sentences` into one padded batch on `device`.
    pub fn encode_batch(&self, sentences: &[&str], device: &Device) -> Result<EncodedBatch> {
        let enc = self
            .tokenizer
            .encode_batch(sentences.to_vec(), true)
            .map_err(|e| Error::Tokenizer { path: self.tokenizer_path.clone(), detail: e.to_string() })?;
        let (b, t) = (enc.len(), enc.first().map_or(0, |e| e.get_ids().len()));
        let gather = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Result<Tensor> {
            let v: Vec<u32> = enc.iter().flat_map(|e| f(e).iter().copied()).collect();
            Ok(Tensor::from_vec(v, (b, t), device)?)
        };
        Ok(EncodedBatch {
            input_ids: gather(&|e| e.get_ids())?,
            token_type_ids: gather(&|e| e.get_type_ids())?,
            attention_mask: gather(&|e| e.get_attention_mask())?,
        })
    }

    /// L2-normalised sentence embeddings `[n, hidden]`, one row per sentence in input order.
    /// Sentences are sorted by length into batches of `batch_size` so padding stays small;
    /// `on_batch` is called with the number of sentences done after each batch.
    pub fn embed(&self, sentences: &[String], batch_size: usize, on_batch: &mut dyn FnMut(usize)) -> Result<Tensor> {
        self.embed_hooked(sentences, batch_size, &mut Hooks::none(), on_batch)
    }

    /// [`SentenceEncoder::embed`] with `hooks` seeing every layer of every batch (calibration).
    pub fn embed_hooked(
        &self,
        sentences: &[String],
        batch_size: usize,
        hooks: &mut Hooks<'_>,
        on_batch: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        let device = self.bert.word.runtime().device().clone();
        if sentences.is_empty() {
            return Ok(Tensor::zeros((0, self.bert.config.hidden_size), DType::F32, &device)?);
        }
        let mut order: Vec<usize> = (0..sentences.len()).collect();
        order.sort_by_key(|&i| (sentences[i].len(), i));
        let mut rows: Vec<Option<Tensor>> = vec![None; sentences.len()];
        let mut done = 0;
        for chunk in order.chunks(batch_size.max(1)) {
            let texts: Vec<&str> = chunk.iter().map(|&i| sentences[i].as_str()).collect();
            let batch = self.encode_batch(&texts, &device)?;
            let hidden = self.bert.forward_hooked(
                &batch.input_ids,
                Some(&batch.token_type_ids),
                &batch.attention_mask,
                hooks,
            )?;
            let emb = mean_pool_normalize(&hidden, &batch.attention_mask)?;
            for (k, &i) in chunk.iter().enumerate() {
                rows[i] = Some(emb.get(k)?);
            }
            done += chunk.len();
            on_batch(done);
        }
        let rows: Vec<Tensor> = rows.into_iter().map(|r| r.expect("every sentence embedded")).collect();
        Ok(Tensor::stack(&rows, 0)?)
    }
}
