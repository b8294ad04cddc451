//! MiniLM end to end (issue 4, goal 5): pare's BERT on `CpuRuntime` (2 threads) in f32, in
//! W8A8 (int8 per-channel weights, int8 per-token dynamic activations) and in W7A8 (the same
//! with 7-bit weights, ONNX Runtime's `reduce_range`, which AVX2 runs on `vpmaddubsw`), against
//! candle-transformers' `BertModel` in f32 and against pare on the reference runtime, at batch
//! 32 × 128 tokens and 1 × 16, measured in the same process. The batches are built as the ONNX
//! Runtime peer builds them (`../shared/tools/ort-peer`): real token ids right-padded to 128
//! with an all-ones mask (dense work). When `PARE_ORT_JSON` names the peer's `ort-bench.json`
//! (from the same sitting: `cargo xtask bench` runs both), its fastest f32 and fastest int8
//! graphs of the sitting are compared too. The accuracy rows measure as the peer measures its
//! own: the first 256 real sentences with their real masks, mean cosine to the float model.
//! Needs `PARE_MINILM_DIR` (skips with a message otherwise).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use criterion::{Criterion, criterion_main};
use pare_benches::{Comparison, median_pair_blocks, median_secs, quick};
use pare_core_tensor::{Hooks, Module, Runtime, metrics::mean_cosine};
use pare_models::bert::{SentenceEncoder, mean_pool_normalize};
use pare_quant::ptq::{ActSpec, apply, dynamic_specs};
use pare_quant::weight_only::{Method, Selection, quantize_model};
use pare_runtime_cpu::CpuRuntime;

/// Real sentences (the first of `data/sentences.txt`) whose embeddings the accuracy rows
/// compare.
const REAL_SENTENCES: usize = 256;

/// ONNX Runtime's median seconds per model and shape at 2 threads, from `ort-bench.json`.
fn ort_figures() -> BTreeMap<(String, String), f64> {
    let Some(path) = std::env::var_os("PARE_ORT_JSON") else { return BTreeMap::new() };
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("PARE_ORT_JSON: cannot read {}", PathBuf::from(path).display());
        return BTreeMap::new();
    };
    let v: serde_json::Value = serde_json::from_str(&text).expect("ort-bench.json is JSON");
    v["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["threads"].as_u64() == Some(2))
        .filter_map(|r| {
            // Model names carry the variant in parentheses: `f32-fused(tf-optimizer)`.
            let model = r["model"].as_str()?.split('(').next()?.to_string();
            Some(((model, r["shape"].as_str()?.to_string()), r["median_s"].as_f64()?))
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let Some(dir) = std::env::var_os("PARE_MINILM_DIR").map(PathBuf::from) else {
        eprintln!("SKIPPED encoder bench: PARE_MINILM_DIR is not set (see ../shared/tools/fetch-minilm.sh)");
        return;
    };
    let quick = quick();
    let dev = Device::Cpu;
    let float = SentenceEncoder::load(&dir, &dev).expect("load MiniLM");
    let cpu: Arc<dyn Runtime> = Arc::new(CpuRuntime::new(2).expect("runtime"));
    let mut f32_cpu = float.clone();
    f32_cpu.bert.prepare(&cpu).unwrap();
    // W8A8: int8 symmetric per-channel weights, int8 per-token dynamic inputs, every linear
    // layer of the encoder (embeddings stay float); W7A8 the same with 7-bit weights.
    let quantized = |scheme: &str| {
        let mut e = float.clone();
        let method = Method::parse(scheme, "channel", true).unwrap();
        let selection = Selection { include: Vec::new(), exclude: Vec::new() };
        quantize_model(&mut e.bert, &method, &selection, &mut |_| {}).unwrap();
        let paths = selection.resolve(&e.bert).unwrap();
        let specs = dynamic_specs(&e.bert, &paths, ActSpec { bits: 8, symmetric: true }, true).unwrap();
        apply(&mut e.bert, &specs).unwrap();
        e.bert.prepare(&cpu).unwrap();
        e
    };
    let (int8, int7) = (quantized("int8"), quantized("int7"));

    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    // SAFETY: nothing writes to the model file while it is mapped.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev) }.unwrap();
    let peer = BertModel::load(vb, &cfg).unwrap();
    let text = pare_core_tensor::data::sentences(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/sentences.txt"),
    )
    .unwrap();
    let ort = ort_figures();

    // Accuracy as ONNX Runtime's peer measures its own (`bench_ort.py accuracy`, the source of
    // the 0.9918 for its int8 graph): real sentences with their real masks, in batches
    // of 32 padded to each batch's longest, mean cosine of the pooled embeddings to the float
    // model's. The timing batches below (right-padded to 128 under an all-ones mask) give
    // cosines of their own, printed as notes: mostly [PAD] positions, they are not embeddings
    // anyone computes.
    let real: Vec<String> = text.iter().take(REAL_SENTENCES).cloned().collect();
    let embed = |e: &SentenceEncoder| e.embed(&real, 32, &mut |_| {}).unwrap();
    let real_reference = embed(&float);
    for (name, model) in [("minilm w8a8 mean cosine", &int8), ("minilm w7a8 mean cosine", &int7)] {
        let cos = mean_cosine(&real_reference, &embed(model)).unwrap();
        println!("NOTE {name} on {} real sentences (real masks): {cos:.5}", real.len());
        Comparison {
            name,
            shape: format!("{} sentences", real.len()),
            pare: cos,
            peer: "goal",
            peer_value: 0.995,
            unit: "cos",
            higher_is_better: true,
            goal: 1.0,
        }
        .report();
    }

    for (shape, n, len) in [("32x128", 32usize, 128usize), ("1x16", 1, 16)] {
        // Real token ids, right-padded with [PAD] = 0 (or cut) to `len`, mask all ones.
        let mut ids = vec![0u32; n * len];
        for (i, s) in text.iter().take(n).enumerate() {
            let b = float.encode_batch(&[s.as_str()], &dev).unwrap();
            let row = b.input_ids.flatten_all().unwrap().to_vec1::<u32>().unwrap();
            for (j, id) in row.into_iter().take(len).enumerate() {
                ids[i * len + j] = id;
            }
        }
        let ids = Tensor::from_vec(ids, (n, len), &dev).unwrap();
        let types = Tensor::zeros((n, len), DType::U32, &dev).unwrap();
        let mask = Tensor::ones((n, len), DType::U32, &dev).unwrap();
        let run = |e: &SentenceEncoder| {
            let h = e.bert.forward_hooked(&ids, Some(&types), &mask, &mut Hooks::none()).unwrap();
            mean_pool_normalize(&h, &mask).unwrap()
        };
        let theirs = || peer.forward(&ids, &types, Some(&mask)).unwrap();
        if !quick {
            let mut g = c.benchmark_group(format!("minilm {shape}"));
            g.sample_size(10).warm_up_time(std::time::Duration::from_millis(500));
            g.bench_function("pare cpu f32", |b| b.iter(|| run(&f32_cpu)));
            g.bench_function("pare cpu w8a8", |b| b.iter(|| run(&int8)));
            g.bench_function("pare cpu w7a8", |b| b.iter(|| run(&int7)));
            g.bench_function("candle-transformers f32", |b| b.iter(theirs));
            g.finish();
        }
        let reference = run(&float);
        let cos_f32 = mean_cosine(&reference, &run(&f32_cpu)).unwrap();
        let cos_int8 = mean_cosine(&reference, &run(&int8)).unwrap();
        let cos_int7 = mean_cosine(&reference, &run(&int7)).unwrap();
        println!(
            "NOTE minilm {shape}: mean cosine to the float reference on this timing batch: cpu f32 {cos_f32:.6}, \
             cpu w8a8 {cos_int8:.5}, cpu w7a8 {cos_int7:.5}"
        );
        // A one-sentence query is a few milliseconds: each sample is the mean of a block of 10
        // consecutive calls (the steady state of a service answering queries), so that the
        // other side's thread pool still winding down does not land on a single call.
        let (reps, block) = match (quick, n) {
            (true, 32) => (3, 1),
            (false, 32) => (7, 1),
            (true, _) => (6, 10),
            (false, _) => (15, 10),
        };
        let (t_f32, t_candle) = median_pair_blocks(reps, block, || drop(run(&f32_cpu)), || drop(theirs()));
        let (t_int8, t_candle2) = median_pair_blocks(reps, block, || drop(run(&int8)), || drop(theirs()));
        let (t_int7, t_candle3) = median_pair_blocks(reps, block, || drop(run(&int7)), || drop(theirs()));
        let t_ref = median_secs(reps.min(5), || drop(run(&float)));
        println!("NOTE minilm {shape}: pare on the reference runtime {:.2} ms", t_ref * 1e3);
        let cmp = |name: &'static str, pare: f64, peer: &'static str, peer_value: f64, goal: f64| Comparison {
            name,
            shape: shape.to_string(),
            pare: pare * 1e3,
            peer,
            peer_value: peer_value * 1e3,
            unit: "ms",
            higher_is_better: false,
            goal,
        };
        cmp("minilm f32", t_f32, "candle-transformers f32", t_candle, 1.0).report();
        cmp("minilm w8a8", t_int8, "candle-transformers f32", t_candle2, 4.0).report();
        cmp("minilm w7a8", t_int7, "candle-transformers f32", t_candle3, 4.0).report();
        // Against ONNX Runtime's fastest graph of each precision in the sitting (the peer
        // builds several: plain and fused f32; int8 per channel and per tensor, with and
        // without the transformer fusions), whichever it is that day.
        for (prefix, ours, name, label) in [
            ("f32-", t_f32, "minilm f32", "onnxruntime f32"),
            ("int8-", t_int8, "minilm w8a8", "onnxruntime int8"),
            ("int8-", t_int7, "minilm w7a8", "onnxruntime int8"),
        ] {
            let fastest = ort
                .iter()
                .filter(|((m, s), _)| m.starts_with(prefix) && s.as_str() == shape)
                .min_by(|a, b| a.1.total_cmp(b.1));
            match fastest {
                Some(((model, _), &t)) => {
                    let peer = format!("{label} ({model})");
                    Comparison {
                        name,
                        shape: shape.to_string(),
                        pare: ours * 1e3,
                        peer: &peer,
                        peer_value: t * 1e3,
                        unit: "ms",
                        higher_is_better: false,
                        goal: 1.0,
                    }
                    .report()
                }
                None if !ort.is_empty() => eprintln!("ort-bench.json has no {prefix}* graph at {shape}, 2 threads"),
                None => {}
            }
        }
    }
}

// criterion's macro generates an undocumented `pub fn benches`.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}
use group::benches;
criterion_main!(benches);
