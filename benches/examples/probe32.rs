//! temp
use candle_core::{Device, Tensor};
use pare_core_tensor::{Activation, Runtime, Weight};
use pare_runtime_cpu::CpuRuntime;
use std::time::Instant;
fn time(name: &str, n: usize, mut f: impl FnMut()) {
    f();
    let mut best = f64::MAX;
    for _ in 0..n * 2 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{name}: {:.2} ms (min)", best * 1e3);
}
fn main() {
    let dev = Device::Cpu;
    let rt = CpuRuntime::new(2).unwrap();
    let x = Tensor::randn(0f32, 1.0, (32, 128, 384), &dev).unwrap();
    let x4 = Tensor::randn(0f32, 1.0, (32, 128, 1536), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.05, (384, 384), &dev).unwrap();
    let w1 = Tensor::randn(0f32, 0.05, (1536, 384), &dev).unwrap();
    let w2 = Tensor::randn(0f32, 0.05, (384, 1536), &dev).unwrap();
    let l = rt.prepare_linear("a", &Weight::Dense(w), None).unwrap();
    let l1 = rt.prepare_linear("b", &Weight::Dense(w1), None).unwrap();
    let l2 = rt.prepare_linear("c", &Weight::Dense(w2), None).unwrap();
    let mask = Tensor::zeros((32, 128), candle_core::DType::F32, &dev).unwrap();
    let g = Tensor::ones(384, candle_core::DType::F32, &dev).unwrap();
    let x2 = x.reshape((4096, 384)).unwrap();
    time("linear 384->1536 2d", 5, || drop(l1.forward(&x2).unwrap()));
    time("linear 384->1536 2d", 5, || drop(l1.forward(&x2).unwrap()));
    let mut pool_out = vec![0f32; 4096 * 1536];
    let xv = x2.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let p = pare_runtime_cpu::gemm::PackedF32::pack(&vec![0.01f32; 1536 * 384], 1536, 384);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    time("raw gemm 384->1536 reused out", 5, || {
        pare_runtime_cpu::gemm::gemm(pare_runtime_cpu::SimdLevel::Avx2, &pool, &xv, 4096, &p, None, &mut pool_out)
    });
    time("linear 384x384 (x4 per layer)", 5, || drop(l.forward(&x).unwrap()));
    time("linear 384->1536", 5, || drop(l1.forward(&x).unwrap()));
    time("linear 1536->384", 5, || drop(l2.forward(&x4).unwrap()));
    let r = pare_core_tensor::ReferenceRuntime::cpu();
    for _ in 0..3 {
        time("attention ref", 3, || drop(r.attention(&x, &x, &x, 12, Some(&mask), 0.17).unwrap()));
        time("attention", 3, || drop(rt.attention(&x, &x, &x, 12, Some(&mask), 0.17).unwrap()));
        time("gelu ref", 3, || drop(r.activation(Activation::Gelu, &x4).unwrap()));
        time("gelu", 3, || drop(rt.activation(Activation::Gelu, &x4).unwrap()));
    }
    time("attention", 5, || drop(rt.attention(&x, &x, &x, 12, Some(&mask), 0.17).unwrap()));
    time("gelu", 5, || drop(rt.activation(Activation::Gelu, &x4).unwrap()));
    time("layernorm+res (x2)", 5, || drop(rt.layer_norm(&x, Some(&x), &g, &g, 1e-12).unwrap()));
}
