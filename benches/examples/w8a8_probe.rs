//! pare's W8A8 linear alone at MiniLM's shapes (M = 4096), best of 15 runs, in GMAC/s: for
//! `perf record` and for reading the kernel's rate against the `vpmaddwd` loop ceiling, at
//! every SIMD level this CPU has (so AVX2 and VNNI compare in one run), then MiniLM's
//! feed-forward pair (384 → 1536, GELU, → 384) run as two ops and as one fused chain
//! (`PreparedOp::forward_chain`), alternating. `T=1` for one thread; `BITS=7` for 7-bit weights
//! (codes in −64..=63: AVX2's `vpmaddubsw` kernel instead of its `vpmaddwd` one).
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pare_core_tensor::{
    ActQuant, ActRange, Activation, Granularity, Mapping, PreparedOp, QuantScheme, QuantizedTensor, Runtime, Weight,
};
use pare_runtime_cpu::{CpuRuntime, SimdLevel};

fn main() {
    let m = 4096;
    let threads: usize = std::env::var("T").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    for level in SimdLevel::available().into_iter().skip(1) {
        println!("{level:?}, {threads} thread(s)");
        let rt: Arc<dyn Runtime> = Arc::new(CpuRuntime::with_level(threads, level).unwrap());
        run(&rt, m);
    }
}

fn prepare(rt: &Arc<dyn Runtime>, k: usize, n: usize) -> Arc<dyn PreparedOp> {
    let act = ActQuant::new(8, true, ActRange::Dynamic { per_token: true });
    let bits: u8 = std::env::var("BITS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let scheme = QuantScheme {
        bits,
        signed: true,
        symmetric: true,
        mapping: Mapping::Linear,
        granularity: Granularity::PerChannel { axis: 0 },
    };
    let codes: Vec<u8> = (0..n * k).map(|i| (i as u64).wrapping_mul(2654435761) as u8 >> (8 - bits)).collect();
    let q = QuantizedTensor::from_codes(&codes, scheme, vec![0.01; n], None, None, vec![n, k], DType::F32).unwrap();
    rt.prepare_linear_quantized_input("fc", &Weight::Quantized(q), None, &act).unwrap()
}

fn best(f: &mut dyn FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..15 {
        let t = std::time::Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn run(rt: &Arc<dyn Runtime>, m: usize) {
    // (384, 1152): the query, key and value projections as one weight.
    for (k, n) in [(384usize, 384usize), (384, 1152), (384, 1536), (1536, 384)] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let op = prepare(rt, k, n);
        let t = best(&mut || drop(op.forward(&x).unwrap()));
        println!("{m}x{k}x{n}: {:.2} ms, {:.1} GMAC/s", t * 1e3, (m * k * n) as f64 / t / 1e9);
    }
    let (up, down) = (prepare(rt, 384, 1536), prepare(rt, 1536, 384));
    let x = Tensor::randn(0f32, 1.0, (m, 384), &Device::Cpu).unwrap();
    let (mut two, mut one) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        two = two.min(best(&mut || {
            let h = up.forward_activated(&x, Activation::Gelu).unwrap().unwrap();
            drop(down.forward(&h).unwrap())
        }));
        one = one.min(best(&mut || drop(up.forward_chain(Activation::Gelu, down.as_ref(), &x).unwrap().unwrap())));
    }
    let macs = (2 * m * 384 * 1536) as f64;
    println!(
        "FFN {m}x384x1536x384: two ops {:.2} ms ({:.1} GMAC/s), chained {:.2} ms ({:.1} GMAC/s), {:.3}x",
        two * 1e3,
        macs / two / 1e9,
        one * 1e3,
        macs / one / 1e9,
        two / one
    );
}
