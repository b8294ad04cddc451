//! Tensor parallelism, Megatron-style: each worker holds a shard of every layer — a
//! contiguous share of the attention heads and FFN neurons of a BERT layer
//! ([`BertEncoder::tensor_shard`]), or of the hidden neurons of an MLP's layer pairs
//! ([`DigitsNet::tensor_shard`]) — and the workers sum their partial outputs with one
//! all-reduce after each row-parallel linear: two per transformer layer (attention output,
//! FFN output), one per MLP layer pair. Results match one worker's to float rounding (the
//! partial sums are added in a different order).

use candle_core::Tensor;
use pare_core_tensor::Hooks;
use pare_models::bert::{BertEncoder, attention_bias, mean_pool_normalize};
use pare_models::digits::DigitsNet;
use serde::Serialize;

use crate::{CommStats, Communicator, Error, Result};

/// Communication of one tensor-parallel forward, as seen by one worker.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TpTraffic {
    /// All-reduces run.
    pub all_reduces: usize,
    /// Payload bytes this worker sent.
    pub bytes_sent: u64,
    /// Bytes of each all-reduced tensor, summed (what a ring all-reduce would move
    /// `2 (p − 1)/p` times per worker).
    pub reduced_bytes: u64,
}

fn traffic(comm: &dyn Communicator, before: CommStats, all_reduces: usize, reduced_bytes: u64) -> TpTraffic {
    TpTraffic { all_reduces, bytes_sent: comm.stats().bytes - before.bytes, reduced_bytes }
}

/// This worker's shard of a digits MLP, after checking that every worker holds the same
/// architecture: `net.tensor_shard(comm.rank(), comm.size())`, so shards always match the
/// world they run in.
pub fn shard_digits(comm: &dyn Communicator, net: &DigitsNet) -> Result<DigitsNet> {
    let shape: Vec<u32> = net.arch().to_string().bytes().map(u32::from).collect();
    comm.check_agreement("digits architecture across workers", &shape)?;
    Ok(net.tensor_shard(comm.rank(), comm.size())?)
}

/// This worker's shard of a BERT encoder, after checking that every worker loaded the same
/// configuration: `bert.tensor_shard(comm.rank(), comm.size())`. A split the model does not
/// allow (heads or neurons not divisible by the world) fails on every rank before any work.
pub fn shard_bert(comm: &dyn Communicator, bert: &BertEncoder) -> Result<BertEncoder> {
    let c = bert.config();
    let mut shape = vec![c.hidden_size as u32, c.num_hidden_layers as u32, c.vocab_size as u32];
    shape.extend((0..c.num_hidden_layers).flat_map(|l| [c.heads_of(l) as u32, c.intermediate_of(l) as u32]));
    comm.check_agreement("BERT configuration across workers", &shape)?;
    Ok(bert.tensor_shard(comm.rank(), comm.size())?)
}

/// Logits of a digits MLP run tensor-parallel: every worker passes its shard
/// ([`shard_digits`]); `x` (pixels `[n, 64]`) is broadcast from
/// rank 0 (other ranks pass anything, e.g. `None`). Every rank returns the logits.
pub fn tp_digits_forward(
    comm: &dyn Communicator,
    shard: &DigitsNet,
    x: Option<&Tensor>,
) -> Result<(Tensor, TpTraffic)> {
    let before = comm.stats();
    let x = broadcast_inputs(comm, x.into_iter().cloned().collect())?;
    let x =
        x.into_iter().next().ok_or_else(|| Error::config("tensor-parallel input", "pixels at rank 0", "nothing"))?;
    let (mut n, mut bytes) = (0usize, 0u64);
    let logits = shard.forward_reduced(&x, &mut |t| {
        n += 1;
        bytes += (t.elem_count() * 4) as u64;
        comm.all_reduce_sum(&t).map_err(to_model_error)
    })?;
    Ok((logits, traffic(comm, before, n, bytes)))
}

/// Sentence embeddings (mean-pooled, L2-normalised) of a BERT encoder run tensor-parallel:
/// every worker passes its shard ([`shard_bert`]); the batch
/// `[input_ids, token_type_ids, attention_mask]` is broadcast from rank 0. Every rank returns
/// the embeddings.
pub fn tp_bert_embed(comm: &dyn Communicator, shard: &BertEncoder, batch: Vec<Tensor>) -> Result<(Tensor, TpTraffic)> {
    let before = comm.stats();
    let batch = broadcast_inputs(comm, batch)?;
    let [ids, types, mask]: [Tensor; 3] = batch.try_into().map_err(|v: Vec<Tensor>| {
        Error::config(
            "tensor-parallel batch",
            "[input_ids, token_type_ids, attention_mask]",
            format!("{} tensors", v.len()),
        )
    })?;
    let hooks = &mut Hooks::none();
    let mut h = shard.embed_hooked(&ids, Some(&types), hooks)?;
    let bias = attention_bias(&mask)?;
    let (mut n, mut bytes) = (0usize, 0u64);
    for l in 0..shard.num_layers() {
        h = shard.layer_forward(l, &h, &bias, hooks, &mut |t| {
            n += 1;
            bytes += (t.elem_count() * 4) as u64;
            comm.all_reduce_sum(&t).map_err(to_model_error)
        })?;
    }
    Ok((mean_pool_normalize(&h, &mask)?, traffic(comm, before, n, bytes)))
}

fn broadcast_inputs(comm: &dyn Communicator, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
    if comm.rank() == 0 && inputs.is_empty() {
        return Err(Error::config("tensor-parallel input", "the batch at rank 0", "nothing"));
    }
    comm.broadcast(0, &inputs)
}

/// Carries a communication error through a model's `reduce` callback (which speaks
/// pare-models' error type); [`Error::from`] unwraps it again, so a peer's failure stays a
/// [`Error::PeerFailed`] and a hang an [`Error::Timeout`].
fn to_model_error(e: Error) -> pare_models::Error {
    pare_models::Error::External(Box::new(e))
}
