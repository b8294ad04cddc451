//! W8A8 linear (pare-runtime-cpu: int8 per-channel weights × int8 per-token activations,
//! quantization of the activations included) against candle's f32 matmul on the same shapes,
//! measured in the same process: MiniLM's linear layers at M tokens (`PARE_BENCH_M`, 4096 by
//! default). Issue 4's goal is ≥ 1.8×. Then the same with 7-bit weights (codes in −64..=63,
//! ONNX Runtime's `reduce_range`), which AVX2 runs on `vpmaddubsw` instead of `vpmaddwd`.

use pare_benches::{Comparison, median_pair, quick};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_main};
use pare_core_tensor::{ActQuant, ActRange, Granularity, Mapping, QuantScheme, QuantizedTensor, Runtime, Weight};
use pare_runtime_cpu::CpuRuntime;

fn bench(c: &mut Criterion) {
    let m: usize = std::env::var("PARE_BENCH_M").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    let dev = Device::Cpu;
    let rt: Arc<dyn Runtime> = Arc::new(CpuRuntime::new(2).expect("runtime"));
    let act = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    let shapes = [(384usize, 384usize), (384, 1536), (1536, 384)];
    for (bits, name, (k, n)) in
        shapes.map(|s| (8u8, "w8a8 gemm", s)).into_iter().chain(shapes.map(|s| (7u8, "w7a8 gemm", s)))
    {
        let scheme = QuantScheme {
            bits,
            signed: true,
            symmetric: true,
            mapping: Mapping::Linear,
            granularity: Granularity::PerChannel { axis: 0 },
        };
        let codes: Vec<u8> = (0..n * k).map(|i| (i as u64).wrapping_mul(2654435761) as u8 >> (8 - bits)).collect();
        let q = QuantizedTensor::from_codes(&codes, scheme, vec![0.01; n], None, None, vec![n, k], DType::F32).unwrap();
        let wf = q.dequantize(&dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let op = rt.prepare_linear_quantized_input("fc", &Weight::Quantized(q), None, &act).unwrap();
        let wt = wf.t().unwrap();
        let ours = || op.forward(&x).unwrap();
        let theirs = || x.matmul(&wt).unwrap();
        if !quick() {
            let mut g = c.benchmark_group(format!("linear {m}x{k} · {k}x{n}, {bits}-bit weights"));
            g.sample_size(10).warm_up_time(std::time::Duration::from_millis(500));
            g.bench_function(if bits == 8 { "pare W8A8" } else { "pare W7A8" }, |b| b.iter(ours));
            g.bench_function("candle f32 matmul", |b| b.iter(theirs));
            g.finish();
        }
        let (t_ours, t_peer) = median_pair(if quick() { 3 } else { 7 }, || drop(ours()), || drop(theirs()));
        Comparison {
            name,
            shape: format!("{m}x{k}x{n}"),
            pare: t_ours * 1e3,
            peer: "candle f32 matmul",
            peer_value: t_peer * 1e3,
            unit: "ms",
            higher_is_better: false,
            goal: 1.8,
        }
        .report();
    }
}

// criterion's macro generates an undocumented `pub fn benches`.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}
use group::benches;
criterion_main!(benches);
