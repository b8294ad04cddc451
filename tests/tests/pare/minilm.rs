//! MiniLM (all-MiniLM-L6-v2) through pare's BERT encoder agrees with candle-transformers'
//! `BertModel`, the peer a Rust user would pick, on every other sentence of data/sentences.txt.

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use pare_core_tensor::Module;
use pare_core_tensor::data::sentences;
use pare_core_tensor::testing::max_abs_diff;
use pare_models::bert::{SentenceEncoder, mean_pool_normalize};
use pare_tests::{minilm_dir, workspace_root};

#[test]
fn embeddings_match_candle_transformers_within_1e_4() -> anyhow::Result<()> {
    let Some(dir) = minilm_dir("minilm::embeddings_match_candle_transformers_within_1e_4")? else { return Ok(()) };
    let dev = Device::Cpu;
    // Every other sentence (576 of 1152): the agreement is per sentence, and CI time is finite.
    let text: Vec<String> = sentences(workspace_root().join("data/sentences.txt"))?.into_iter().step_by(2).collect();
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

#[test]
fn weight_only_quantized_minilm_keeps_its_embeddings() -> anyhow::Result<()> {
    use pare_core_tensor::metrics::mean_cosine;
    use pare_quant::weight_only::{Method, Selection, quantize_model};

    let Some(dir) = minilm_dir("minilm::weight_only_quantized_minilm_keeps_its_embeddings")? else { return Ok(()) };
    let dev = Device::Cpu;
    // Every third sentence (384 of 1152) keeps CI short; reports/quant-minilm.md has them all.
    let text: Vec<String> = sentences(workspace_root().join("data/sentences.txt"))?.into_iter().step_by(3).collect();
    let float = SentenceEncoder::load(&dir, &dev)?;
    let reference = float.embed(&text, 32, &mut |_| {})?;
    // (scheme, granularity, symmetric, minimum mean cosine to the float embeddings). INT8 holds
    // issue 3's bar (0.999). The 4-bit floors are what round-to-nearest reaches today (0.965,
    // 0.973, 0.972 measured; candle's Q4_0 reaches 0.970 at 4.5 bits per weight): issue 3's
    // 0.98 for 4 bits needs the error-compensating methods (clipping search, GPTQ, AWQ).
    for (scheme, gran, sym, bar) in [
        ("int8", "channel", true, 0.999),
        ("int4", "group:64", false, 0.96),
        ("int4", "group:32", false, 0.97),
        ("nf4", "group:64", true, 0.97),
    ] {
        let mut enc = float.clone();
        let reports =
            quantize_model(&mut enc.bert, &Method::parse(scheme, gran, sym)?, &Selection::default(), &mut |_| {})?;
        assert_eq!(reports.len(), 36, "every linear of the 6 layers, no embedding");
        let cos = mean_cosine(&reference, &enc.embed(&text, 32, &mut |_| {})?)?;
        eprintln!("MiniLM {scheme} {gran}: mean cosine {cos:.5} over {} sentences", text.len());
        assert!(cos >= bar, "{scheme} {gran}: mean cosine {cos} < {bar}");
    }
    Ok(())
}

#[test]
fn a_quantized_folder_loads_like_the_original() -> anyhow::Result<()> {
    use pare_quant::weight_only::{Method, Selection, quantize_model};

    let Some(dir) = minilm_dir("minilm::a_quantized_folder_loads_like_the_original")? else { return Ok(()) };
    let dev = Device::Cpu;
    let mut enc = SentenceEncoder::load(&dir, &dev)?;
    quantize_model(&mut enc.bert, &Method::parse("int8", "channel", true)?, &Selection::default(), &mut |_| {})?;
    let out = tempfile::tempdir()?;
    enc.bert.save_folder(&dir, out.path(), &Default::default())?;
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(out.path().join(f).is_file(), "{f} missing");
    }
    let back = SentenceEncoder::load(out.path(), &dev)?;
    let few: Vec<String> = sentences(workspace_root().join("data/sentences.txt"))?.into_iter().take(8).collect();
    assert_eq!(max_abs_diff(&enc.embed(&few, 8, &mut |_| {})?, &back.embed(&few, 8, &mut |_| {})?)?, 0.0);
    let original = std::fs::metadata(dir.join("model.safetensors"))?.len();
    let quantized = std::fs::metadata(out.path().join("model.safetensors"))?.len();
    assert!(quantized * 10 < original * 7, "{quantized} vs {original} bytes"); // word embeddings stay f32
    // Writing the folder onto itself is refused.
    assert!(enc.bert.save_folder(&dir, &dir, &Default::default()).is_err());
    Ok(())
}

#[test]
fn compressed_tensors_folders_reload_to_the_same_model() -> anyhow::Result<()> {
    use pare_core_tensor::io::SafeTensorsFile;
    use pare_quant::ptq::{ActSpec, apply, dynamic_specs};
    use pare_quant::weight_only::{Method, Selection, quantize_model};

    let Some(dir) = minilm_dir("minilm::compressed_tensors_folders_reload_to_the_same_model")? else { return Ok(()) };
    let dev = Device::Cpu;
    let float = SentenceEncoder::load(&dir, &dev)?;
    let few: Vec<String> = sentences(workspace_root().join("data/sentences.txt"))?.into_iter().take(8).collect();
    // INT4 group-64 asymmetric weight-only: pack-quantized, zero points packed down the columns.
    // W8A8 with dynamic per-token activations: int-quantized.
    for (scheme, gran, sym, dynamic, format) in
        [("int4", "group:64", false, false, "pack-quantized"), ("int8", "channel", true, true, "int-quantized")]
    {
        let mut enc = float.clone();
        quantize_model(&mut enc.bert, &Method::parse(scheme, gran, sym)?, &Selection::default(), &mut |_| {})?;
        if dynamic {
            let paths = Selection::default().resolve(&enc.bert)?;
            let specs = dynamic_specs(&enc.bert, &paths, ActSpec { bits: 8, symmetric: true }, true)?;
            apply(&mut enc.bert, &specs)?;
        }
        let out = tempfile::tempdir()?;
        enc.bert.save_folder_compressed_tensors(&dir, out.path(), &Default::default())?;
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json"))?)?;
        let qc = &config["quantization_config"];
        assert_eq!(qc["quant_method"], "compressed-tensors");
        assert_eq!(qc["format"], format);
        assert_eq!(config["hidden_size"], 384, "the model's own config is kept");
        let targets = qc["config_groups"]["group_0"]["targets"].as_array().unwrap();
        assert_eq!(targets.len(), 36, "every linear layer of the six blocks");
        let file = SafeTensorsFile::open(out.path().join("model.safetensors"))?;
        let q = "encoder.layer.0.attention.self.query";
        if format == "pack-quantized" {
            let packed = file.info(&format!("{q}.weight_packed"))?;
            assert_eq!((packed.dtype.name(), packed.shape.clone()), ("I32", vec![384, 48]));
            assert_eq!(file.info(&format!("{q}.weight_scale"))?.shape, vec![384, 6]);
            assert_eq!(file.info(&format!("{q}.weight_zero_point"))?.shape, vec![48, 6]);
        } else {
            assert_eq!(file.info(&format!("{q}.weight"))?.dtype.name(), "I8");
            assert_eq!(file.info(&format!("{q}.weight_scale"))?.shape, vec![384, 1]);
        }
        let back = SentenceEncoder::load(out.path(), &dev)?;
        assert_eq!(back.bert.layer(q)?.input_quant(), enc.bert.layer(q)?.input_quant());
        assert_eq!(max_abs_diff(&enc.embed(&few, 8, &mut |_| {})?, &back.embed(&few, 8, &mut |_| {})?)?, 0.0);
    }
    Ok(())
}

/// bf16 attention is a model property: on the CPU runtime a W8A8 MiniLM with bf16 attention
/// products stays as close to the float model on real sentences as the same W8A8 model with
/// f32 ones (within 0.001 mean cosine: per-token int8 activations turn any tiny change
/// upstream into different codes, so the two W8A8 variants are only ~0.998 to each other,
/// whichever precision changed); saved (both layouts) it reloads with
/// `pare_attention_precision` and the same embeddings, and a model set back to f32 saved from
/// that folder drops the key.
#[test]
fn bf16_attention_is_saved_with_the_model_and_keeps_its_embeddings() -> anyhow::Result<()> {
    use std::sync::Arc;

    use pare_core_tensor::{AttentionPrecision, Runtime, metrics::mean_cosine};
    use pare_quant::ptq::{ActSpec, apply, dynamic_specs};
    use pare_quant::weight_only::{Method, Selection, quantize_model};

    let Some(dir) = minilm_dir("minilm::bf16_attention_is_saved_with_the_model_and_keeps_its_embeddings")? else {
        return Ok(());
    };
    let dev = Device::Cpu;
    let text: Vec<String> = sentences(workspace_root().join("data/sentences.txt"))?.into_iter().step_by(8).collect();
    let float = SentenceEncoder::load(&dir, &dev)?;
    let mut w8a8 = float.clone();
    quantize_model(&mut w8a8.bert, &Method::parse("int8", "channel", true)?, &Selection::default(), &mut |_| {})?;
    let paths = Selection::default().resolve(&w8a8.bert)?;
    let specs = dynamic_specs(&w8a8.bert, &paths, ActSpec { bits: 8, symmetric: true }, true)?;
    apply(&mut w8a8.bert, &specs)?;
    let mut bf16 = w8a8.clone();
    bf16.bert.set_attention_precision(AttentionPrecision::Bf16);
    let rt: Arc<dyn Runtime> = Arc::new(pare_runtime_cpu::CpuRuntime::new(2)?);
    let embed = |m: &SentenceEncoder| -> anyhow::Result<candle_core::Tensor> {
        let mut m = m.clone();
        m.bert.prepare(&rt)?;
        Ok(m.embed(&text, 32, &mut |_| {})?)
    };
    let (ef, ea, eb) = (embed(&float)?, embed(&w8a8)?, embed(&bf16)?);
    let (with_f32, with_bf16) = (mean_cosine(&ef, &ea)?, mean_cosine(&ef, &eb)?);
    println!(
        "W8A8 MiniLM on {} sentences, mean cosine to the float model: f32 attention {with_f32:.5}, bf16 attention {with_bf16:.5}",
        text.len()
    );
    assert!(with_bf16 >= with_f32 - 1e-3, "bf16 attention {with_bf16} against f32 attention {with_f32}");
    assert!(max_abs_diff(&ea, &eb)? > 0.0, "the bf16 products ran");

    let few: Vec<String> = text.iter().take(8).cloned().collect();
    let out = tempfile::tempdir()?;
    let (pare_dir, ct_dir) = (out.path().join("pare"), out.path().join("ct"));
    bf16.bert.save_folder(&dir, &pare_dir, &Default::default())?;
    bf16.bert.save_folder_compressed_tensors(&dir, &ct_dir, &Default::default())?;
    for folder in [&pare_dir, &ct_dir] {
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(folder.join("config.json"))?)?;
        assert_eq!(config["pare_attention_precision"], "bf16", "{}", folder.display());
        let back = SentenceEncoder::load(folder, &dev)?;
        assert_eq!(back.bert.config().attention_precision, AttentionPrecision::Bf16);
        assert_eq!(max_abs_diff(&bf16.embed(&few, 8, &mut |_| {})?, &back.embed(&few, 8, &mut |_| {})?)?, 0.0);
    }
    let mut f32_again = SentenceEncoder::load(&pare_dir, &dev)?;
    f32_again.bert.set_attention_precision(AttentionPrecision::F32);
    let again = out.path().join("again");
    f32_again.bert.save_folder(&pare_dir, &again, &Default::default())?;
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(again.join("config.json"))?)?;
    assert!(config.get("pare_attention_precision").is_none(), "{config}");
    Ok(())
}
