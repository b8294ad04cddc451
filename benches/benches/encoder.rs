//! MiniLM encoder throughput: pare's BERT (core-tensor layers on the reference runtime) against
//! candle-transformers' `BertModel` on the same token batch, measured in the same process.
//! Prints the ratio; needs `PARE_MINILM_DIR` (skips with a message otherwise).

use pare_benches::median_secs;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use criterion::{Criterion, criterion_main};
use pare_core_tensor::Hooks;
use pare_models::bert::SentenceEncoder;

fn bench(c: &mut Criterion) {
    let Some(dir) = std::env::var_os("PARE_MINILM_DIR").map(std::path::PathBuf::from) else {
        eprintln!("SKIPPED encoder bench: PARE_MINILM_DIR is not set (see ../shared/tools/fetch-minilm.sh)");
        return;
    };
    let dev = Device::Cpu;
    let enc = SentenceEncoder::load(&dir, &dev).expect("load MiniLM");
    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    // SAFETY: nothing writes to the model file while it is mapped.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev) }.unwrap();
    let peer = BertModel::load(vb, &cfg).unwrap();
    let text = pare_core_tensor::data::sentences(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/sentences.txt"),
    )
    .unwrap();

    for (label, n) in [("32 sentences", 32usize), ("1 sentence", 1)] {
        let batch: Vec<&str> = text.iter().take(n).map(String::as_str).collect();
        let b = enc.encode_batch(&batch, &dev).unwrap();
        let ours = || {
            enc.bert
                .forward_hooked(&b.input_ids, Some(&b.token_type_ids), &b.attention_mask, &mut Hooks::none())
                .unwrap()
        };
        let theirs = || peer.forward(&b.input_ids, &b.token_type_ids, Some(&b.attention_mask)).unwrap();
        let mut g = c.benchmark_group(format!("minilm {label} x {} tokens", b.input_ids.dim(1).unwrap()));
        g.sample_size(10);
        g.bench_function("pare reference", |bch| bch.iter(ours));
        g.bench_function("candle-transformers", |bch| bch.iter(theirs));
        g.finish();
        let reps = if n == 1 { 50 } else { 7 };
        let t_ours = median_secs(reps, || drop(ours()));
        let t_peer = median_secs(reps, || drop(theirs()));
        println!(
            "RATIO minilm {label}: pare {:.2} ms, candle-transformers {:.2} ms, pare/candle = {:.3}",
            t_ours * 1e3,
            t_peer * 1e3,
            t_ours / t_peer
        );
        let _: &Tensor = &ours();
    }
}

// criterion's macro generates an undocumented `pub fn benches`.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}
use group::benches;
criterion_main!(benches);
