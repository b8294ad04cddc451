//! Runs MiniLM on `CpuRuntime` at batch 32 × 128 a few times (for `perf record`).
use candle_core::{DType, Device, Tensor};
use pare_core_tensor::{Hooks, Module, Runtime};
use pare_models::bert::SentenceEncoder;
use std::sync::Arc;
fn main() {
    let dev = Device::Cpu;
    let dir = std::path::PathBuf::from(std::env::var("PARE_MINILM_DIR").expect("PARE_MINILM_DIR"));
    let mut enc = SentenceEncoder::load(&dir, &dev).unwrap();
    let rt: Arc<dyn Runtime> = Arc::new(pare_runtime_cpu::CpuRuntime::new(2).unwrap());
    enc.bert.prepare(&rt).unwrap();
    let ids =
        Tensor::from_vec((0..32 * 128).map(|i| (i * 7 % 20000 + 1000) as u32).collect::<Vec<_>>(), (32, 128), &dev)
            .unwrap();
    let mask = Tensor::ones((32, 128), DType::U32, &dev).unwrap();
    for _ in 0..4 {
        let t = std::time::Instant::now();
        drop(enc.bert.forward_hooked(&ids, None, &mask, &mut Hooks::none()).unwrap());
        eprintln!("{:.3} s", t.elapsed().as_secs_f64());
    }
}
