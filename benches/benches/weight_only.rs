//! 4-bit weight-only linear layers (pare-runtime-cpu, 2 threads) against candle in the same
//! run (issue 4, goals 2 and 3):
//! - GEMV 1×4096 · 4096×4096 with the weights out of cache (several copies, larger than the
//!   L3 together, used in turn): against candle's f32 matmul, its `QMatMul` Q4_0 and Q4K, and
//!   against the machine's read bandwidth (a triad loop measured in the same run); then the
//!   same with int8 activations quantized per token on the fly (W4A8: the arithmetic of
//!   candle's `QMatMul`, which quantizes its input to Q8 blocks).
//! - GEMM at M = 32 and M = 4096 tokens on MiniLM's FFN shapes: against `QMatMul` Q4_0 and
//!   candle's f32 matmul.
//!
//! pare's weights are symmetric signed 4-bit codes with one f32 scale per 32 inputs, the same
//! information Q4_0 holds (Q4_0 stores its scale as f16).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use criterion::{Criterion, criterion_main};
use pare_benches::{Comparison, median_alone, median_pair_blocks, median_pair_warm, quick};
use pare_core_tensor::{ActQuant, ActRange, Granularity, Mapping, QuantScheme, QuantizedTensor, Runtime, Weight};
use pare_runtime_cpu::{CpuRuntime, probe};

/// `w` (`[n, k]`) as symmetric 4-bit codes with one scale per 32 inputs.
fn q4(w: &Tensor) -> QuantizedTensor {
    let (n, k) = w.dims2().unwrap();
    let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut codes = Vec::with_capacity(v.len());
    let mut scales = Vec::with_capacity(v.len() / 32);
    for g in v.chunks(32) {
        let s = g.iter().fold(0f32, |m, x| m.max(x.abs())) / 7.0;
        let s = if s > 0.0 { s } else { 1.0 };
        scales.push(s);
        codes.extend(g.iter().map(|x| ((x / s).round().clamp(-8.0, 7.0) as i32 + 8) as u8));
    }
    let scheme = QuantScheme {
        bits: 4,
        signed: true,
        symmetric: true,
        mapping: Mapping::Linear,
        granularity: Granularity::PerGroup { size: 32 },
    };
    QuantizedTensor::from_codes(&codes, scheme, scales, None, None, vec![n, k], DType::F32).unwrap()
}

fn bench(c: &mut Criterion) {
    let quick = quick();
    let dev = Device::Cpu;
    let threads = 2;
    let rt: Arc<dyn Runtime> = Arc::new(CpuRuntime::new(threads).expect("runtime"));
    let reps = if quick { 5 } else { 15 };

    // GEMV, weights out of cache: 4 copies of each format (≥ 37 MiB together, past the L3).
    let (n, k, copies) = (4096usize, 4096usize, 4);
    let ws: Vec<Tensor> = (0..copies).map(|_| Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap()).collect();
    let pare: Vec<_> = ws
        .iter()
        .map(|w| {
            let q = q4(w);
            let bytes = q.storage_bytes();
            (rt.prepare_linear("fc", &Weight::Quantized(q), None).unwrap(), bytes)
        })
        .collect();
    let cq = |dt: GgmlDType| -> Vec<QMatMul> {
        ws.iter().map(|w| QMatMul::from_qtensor(QTensor::quantize(w, dt).unwrap()).unwrap()).collect()
    };
    let (q40, q4k) = (cq(GgmlDType::Q4_0), cq(GgmlDType::Q4K));
    let wts: Vec<Tensor> = ws.iter().take(2).map(|w| w.t().unwrap()).collect();
    let x = Tensor::randn(0f32, 1.0, (1, k), &dev).unwrap();
    let mut turn = 0usize;
    let mut next = || {
        turn += 1;
        turn
    };
    // The same weights with int8 activations quantized per token on the fly (W4A8), the
    // arithmetic candle's `QMatMul` performs (it quantizes the activations to Q8 blocks).
    let act = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    let a8: Vec<_> = ws
        .iter()
        .map(|w| rt.prepare_linear_quantized_input("fc", &Weight::Quantized(q4(w)), None, &act).unwrap())
        .collect();
    let shape = format!("1x{k}x{n}");
    for (name, ops) in [("q4 gemv", pare.iter().map(|p| &p.0).collect::<Vec<_>>()), ("w4a8 gemv", a8.iter().collect())]
    {
        let t_pare = |i: usize| drop(ops[i % copies].forward(&x).unwrap());
        if !quick {
            let mut g = c.benchmark_group(format!("{name} 1x{k} · {k}x{n}"));
            g.sample_size(20).warm_up_time(std::time::Duration::from_millis(500));
            g.bench_function("pare", |b| b.iter(|| t_pare(next())));
            g.bench_function("candle QMatMul Q4_0", |b| b.iter(|| drop(q40[next() % copies].forward(&x).unwrap())));
            g.finish();
        }
        /// A peer: its name, the goal against it, and one call (on weight copy `i`).
        type Peer<'a> = (&'a str, f64, Box<dyn FnMut(usize) + 'a>);
        let peers: [Peer; 3] = [
            ("candle f32 matmul", 6.0, Box::new(|i: usize| drop(x.matmul(&wts[i % 2]).unwrap()))),
            ("candle QMatMul Q4_0", 2.0, Box::new(|i: usize| drop(q40[i % copies].forward(&x).unwrap()))),
            ("candle QMatMul Q4K", 1.3, Box::new(|i: usize| drop(q4k[i % copies].forward(&x).unwrap()))),
        ];
        for (peer, goal, mut run) in peers {
            let (mut a, mut b) = (0, 0);
            // 60 untimed calls per side before each timed block of 20: after candle's f32
            // matmul (64 MB of weights per call) pare's calls ran up to twice as slow for tens
            // of calls (`INTERFERE=1 N=4096 gemv_probe`), which 20 did not cover.
            let (t_ours, t_peer) = median_pair_warm(
                reps,
                20,
                60,
                || {
                    a += 1;
                    t_pare(a)
                },
                || {
                    b += 1;
                    run(b)
                },
            );
            Comparison {
                name,
                shape: shape.clone(),
                pare: t_ours * 1e3,
                peer,
                peer_value: t_peer * 1e3,
                unit: "ms",
                higher_is_better: false,
                goal,
            }
            .report();
        }
        // The stream rate is pare's kernel on its own, as the triad loop is timed on its own:
        // the interleaved blocks above carry the peers' after-effects.
        let mut c = 0;
        let alone = median_alone(reps, 20, || {
            c += 1;
            t_pare(c)
        });
        let gbs = pare[0].1 as f64 / alone / 1e9;
        let triad = probe::triad_gbs(threads, 256);
        Comparison {
            name: if name == "q4 gemv" { "q4 gemv weight stream" } else { "w4a8 gemv weight stream" },
            shape: shape.clone(),
            pare: gbs,
            peer: "triad bandwidth",
            peer_value: triad,
            unit: "GB/s",
            higher_is_better: true,
            goal: 0.7,
        }
        .report();
    }
    drop((pare, a8, q40, q4k, wts, ws));

    // GEMM at MiniLM's FFN shapes.
    for m in [32usize, 4096] {
        for (k, n) in [(384usize, 1536usize), (1536, 384)] {
            let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let op = rt.prepare_linear("fc", &Weight::Quantized(q4(&w)), None).unwrap();
            let q40 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_0).unwrap()).unwrap();
            let wt = w.t().unwrap();
            let shape = format!("{m}x{k}x{n}");
            let r = if m > 32 { reps.min(7) } else { reps };
            let block = if m > 32 { 1 } else { 10 };
            let (t_ours, t_q) =
                median_pair_blocks(r, block, || drop(op.forward(&x).unwrap()), || drop(q40.forward(&x).unwrap()));
            let (t_ours2, t_f) =
                median_pair_blocks(r, block, || drop(op.forward(&x).unwrap()), || drop(x.matmul(&wt).unwrap()));
            for (t, peer, tp, goal) in
                [(t_ours, "candle QMatMul Q4_0", t_q, 4.0), (t_ours2, "candle f32 matmul", t_f, 1.0)]
            {
                if m == 32 && goal == 1.0 {
                    // The issue sets no f32 goal at M = 32; the figure is still worth printing.
                    println!(
                        "NOTE q4 gemm {shape} against candle f32 (no goal at M = 32): pare {:.3} ms, candle {:.3} ms",
                        t * 1e3,
                        tp * 1e3
                    );
                    continue;
                }
                Comparison {
                    name: "q4 gemm",
                    shape: shape.clone(),
                    pare: t * 1e3,
                    peer,
                    peer_value: tp * 1e3,
                    unit: "ms",
                    higher_is_better: false,
                    goal,
                }
                .report();
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
