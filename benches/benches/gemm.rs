//! pare's f32 GEMM (dense linear on `CpuRuntime`, 2 threads) against candle's f32 matmul at
//! MiniLM's linear shapes, and against the machine's FMA peak measured in the same run
//! (issue 4, goal 6: ≥ 75% of peak). `PARE_BENCH_M` sets the token count (4096 by default).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use criterion::{Criterion, criterion_main};
use pare_benches::{Comparison, median_pair, quick};
use pare_core_tensor::{Runtime, Weight};
use pare_runtime_cpu::{CpuRuntime, probe};

fn bench(c: &mut Criterion) {
    let quick = quick();
    let m: usize = std::env::var("PARE_BENCH_M").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    let threads = 2;
    let dev = Device::Cpu;
    let rt: Arc<dyn Runtime> = Arc::new(CpuRuntime::new(threads).expect("runtime"));
    let probe = probe::FmaProbe::new(threads);
    let reps = if quick { 3 } else { 7 };
    for (k, n) in [(384usize, 384usize), (384, 1536), (1536, 384)] {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let op = rt.prepare_linear("fc", &Weight::Dense(w.clone()), None).unwrap();
        let wt = w.t().unwrap();
        let ours = || op.forward(&x).unwrap();
        let theirs = || x.matmul(&wt).unwrap();
        if !quick {
            let mut g = c.benchmark_group(format!("f32 linear {m}x{k} · {k}x{n}"));
            g.sample_size(10).warm_up_time(std::time::Duration::from_millis(500));
            g.bench_function("pare gemm", |b| b.iter(ours));
            g.bench_function("candle f32 matmul", |b| b.iter(theirs));
            g.finish();
        }
        let (t_ours, t_peer) = median_pair(reps, || drop(ours()), || drop(theirs()));
        let shape = format!("{m}x{k}x{n}");
        Comparison {
            name: "f32 gemm",
            shape: shape.clone(),
            pare: t_ours * 1e3,
            peer: "candle f32 matmul",
            peer_value: t_peer * 1e3,
            unit: "ms",
            higher_is_better: false,
            goal: 1.0,
        }
        .report();
        // The peak is sampled alternately with pare's GEMM, so both see the same load.
        let mut peak = Vec::new();
        let (t, _) = median_pair(reps, || drop(ours()), || peak.push(probe.sample()));
        peak.sort_by(f64::total_cmp);
        let (gflops, peak) = (2.0 * (m * n * k) as f64 / t / 1e9, peak[peak.len() / 2]);
        Comparison {
            name: "f32 gemm vs FMA peak",
            shape,
            pare: gflops,
            peer: "FMA peak loop",
            peer_value: peak,
            unit: "GFLOP/s",
            higher_is_better: true,
            goal: 0.75,
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
