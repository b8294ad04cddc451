//! Runs MiniLM on `CpuRuntime` at batch `B` × `S` tokens (32 × 128 by default) `ITERS` times
//! (for `perf record`); `W8A8=1`
//! quantizes every encoder linear to int8 weights × int8 per-token inputs first (`W7A8=1`: 7-bit
//! weights, codes in −64..=63, which AVX2 runs on `vpmaddubsw`), `W4A8=1` to
//! int4 weights (groups of 32) × int8 per-token inputs, `W4=1` to int4 weights alone.
use candle_core::{DType, Device, Tensor};
use pare_core_tensor::{Hooks, Module, Runtime};
use pare_models::bert::SentenceEncoder;
use std::sync::Arc;
fn main() {
    let dev = Device::Cpu;
    let dir = std::path::PathBuf::from(std::env::var("PARE_MINILM_DIR").expect("PARE_MINILM_DIR"));
    let mut enc = SentenceEncoder::load(&dir, &dev).unwrap();
    let rt: Arc<dyn Runtime> = Arc::new(
        pare_runtime_cpu::CpuRuntime::new(std::env::var("T").ok().and_then(|v| v.parse().ok()).unwrap_or(2)).unwrap(),
    );
    let on = |k: &str| std::env::var(k).is_ok_and(|v| v == "1");
    let weights = if on("W8A8") {
        Some(("int8", "channel"))
    } else if on("W7A8") {
        Some(("int7", "channel"))
    } else if on("W4A8") || on("W4") {
        Some(("int4", "group:32"))
    } else {
        None
    };
    if let Some((scheme, granularity)) = weights {
        use pare_quant::weight_only::{Method, Selection, quantize_model};
        let method = Method::parse(scheme, granularity, true).unwrap();
        let selection = Selection { include: Vec::new(), exclude: Vec::new() };
        quantize_model(&mut enc.bert, &method, &selection, &mut |_| {}).unwrap();
        if !on("W4") {
            let paths = selection.resolve(&enc.bert).unwrap();
            let spec = pare_quant::ptq::ActSpec { bits: 8, symmetric: true };
            let specs = pare_quant::ptq::dynamic_specs(&enc.bert, &paths, spec, true).unwrap();
            pare_quant::ptq::apply(&mut enc.bert, &specs).unwrap();
        }
    }
    enc.bert.prepare(&rt).unwrap();
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (b, s) = (env("B", 32), env("S", 128));
    let ids =
        Tensor::from_vec((0..b * s).map(|i| (i * 7 % 20000 + 1000) as u32).collect::<Vec<_>>(), (b, s), &dev).unwrap();
    let mask = Tensor::ones((b, s), DType::U32, &dev).unwrap();
    let iters: usize = std::env::var("ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    for _ in 0..iters {
        let t = std::time::Instant::now();
        drop(enc.bert.forward_hooked(&ids, None, &mask, &mut Hooks::none()).unwrap());
        eprintln!("{:.3} ms", t.elapsed().as_secs_f64() * 1e3);
    }
}
