//! MiniLM (all-MiniLM-L6-v2) through pare's BERT encoder agrees with candle-transformers'
//! `BertModel`, the peer a Rust user would pick, on every sentence of data/sentences.txt.

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use pare_core_tensor::data::sentences;
use pare_core_tensor::testing::max_abs_diff;
use pare_models::bert::{SentenceEncoder, mean_pool_normalize};
use pare_tests::{minilm_dir, workspace_root};

#[test]
fn embeddings_match_candle_transformers_within_1e_4() -> anyhow::Result<()> {
    let Some(dir) = minilm_dir("minilm::embeddings_match_candle_transformers_within_1e_4")? else { return Ok(()) };
    let dev = Device::Cpu;
    let text = sentences(workspace_root().join("data/sentences.txt"))?;
    let enc = SentenceEncoder::load(&dir, &dev)?;
    let ours = enc.embed(&text, 32, &mut |_| {})?;
    assert_eq!(ours.dims(), &[text.len(), 384]);

    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    // SAFETY: the model file is not modified while mapped (nothing in this test writes to it).
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)? };
    let peer = BertModel::load(vb, &cfg)?;
    let mut worst = 0f32;
    // Same batches for the peer: sort by length so padding is comparable and small.
    let mut order: Vec<usize> = (0..text.len()).collect();
    order.sort_by_key(|&i| (text[i].len(), i));
    for chunk in order.chunks(32) {
        let batch: Vec<&str> = chunk.iter().map(|&i| text[i].as_str()).collect();
        let b = enc.encode_batch(&batch, &dev)?;
        let hidden = peer.forward(&b.input_ids, &b.token_type_ids, Some(&b.attention_mask))?;
        let theirs = mean_pool_normalize(&hidden, &b.attention_mask)?;
        let idx = candle_core::Tensor::new(chunk.iter().map(|&i| i as u32).collect::<Vec<_>>(), &dev)?;
        worst = worst.max(max_abs_diff(&ours.index_select(&idx, 0)?, &theirs)?);
    }
    eprintln!("MiniLM: {} sentences, max abs difference to candle-transformers {worst:.2e}", text.len());
    assert!(worst <= 1e-4, "max abs difference {worst} > 1e-4");

    // Embeddings are unit length and sentences differ.
    let norms = ours.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-4));
    let sim = pare_core_tensor::metrics::cosine_rows(&ours.narrow(0, 0, 1)?, &ours.narrow(0, 1, 1)?)?[0];
    assert!(sim < 0.95, "two different sentences have cosine {sim}");
    Ok(())
}

#[test]
fn a_model_folder_without_weights_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let e = SentenceEncoder::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("missing `model.safetensors`"), "{e}");
}
