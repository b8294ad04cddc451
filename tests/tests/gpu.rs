//! pare-runtime-gpu's wgpu runtime against `ReferenceRuntime`, in its own test binary
//! (`cargo test --workspace --features pare-tests/wgpu --test gpu`; .ci/run installs Mesa's
//! lavapipe and runs it there). The kernel problems of runtime-cpu's suite — every weight format
//! at ragged shapes — then the digits nets and MiniLM through `Module::prepare`, and the
//! errors a user meets.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use pare_core_tensor::data::digits;
use pare_core_tensor::metrics::mean_cosine;
use pare_core_tensor::testing::input;
use pare_core_tensor::{Activation, Conv2dParams, Module, ReferenceRuntime, Runtime, SparseTensor, Weight};
use pare_quant::weight_only::{Method, Override, Selection, quantize_model_plan};
use pare_runtime_gpu::{GpuError, WgpuOptions, WgpuRuntime, gpu_error};
use proptest::prelude::*;

/// One adapter for the whole binary (creating a device takes a while on lavapipe).
fn gpu() -> Arc<WgpuRuntime> {
    static RT: OnceLock<Arc<WgpuRuntime>> = OnceLock::new();
    RT.get_or_init(|| {
        let rt = WgpuRuntime::new()
            .unwrap_or_else(|e| panic!("{e}\n(install a Vulkan driver: Debian's mesa-vulkan-drivers gives lavapipe)"));
        eprintln!("wgpu adapter: {}", rt.adapter());
        Arc::new(rt)
    })
    .clone()
}

fn reference() -> ReferenceRuntime {
    ReferenceRuntime::cpu()
}

fn hash(i: usize, salt: u64, seed: u64) -> u64 {
    (i as u64 ^ salt).wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(seed) >> 17
}

/// A weight of `shape` in format `format`: 0 f32, 1 f16, 2 bf16, 3 quantized, 4 CSR,
/// 5 2:4, 6 block 1×4 (sparse formats need the row length to be a multiple of 4).
fn weight(shape: &[usize], format: usize, q: (u8, usize, usize), seed: u64) -> Weight {
    let dev = Device::Cpu;
    let numel: usize = shape.iter().product();
    let dense = Tensor::from_vec(input(1, numel, seed), shape, &dev).unwrap();
    let sparse = |keep: u64| {
        let v: Vec<f32> = input(1, numel, seed)
            .into_iter()
            .enumerate()
            .map(|(i, x)| if hash(i, 9, seed) % 10 < keep { x } else { 0.0 })
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let back = |s: SparseTensor| Weight::Sparse(s);
    match format {
        0 => Weight::Dense(dense),
        1 => Weight::Dense(dense.to_dtype(DType::F16).unwrap()),
        2 => Weight::Dense(dense.to_dtype(DType::BF16).unwrap()),
        3 => Weight::Quantized(pare_core_tensor::testing::random_quantized(shape, q.0, q.1, q.2, seed)),
        4 => back(SparseTensor::csr_from_dense(&sparse(3), "w").unwrap()),
        5 => {
            // Keep the two largest magnitudes of every four.
            let mut v = input(1, numel, seed);
            for g in v.chunks_mut(4) {
                let mut order = [0, 1, 2, 3];
                order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
                g[order[2]] = 0.0;
                g[order[3]] = 0.0;
            }
            back(SparseTensor::nm_from_dense(&Tensor::from_vec(v, shape, &dev).unwrap(), 2, 4, "w").unwrap())
        }
        _ => back(SparseTensor::block_from_dense(&sparse(4), 1, 4, "w").unwrap()),
    }
}

/// The same weight for the reference runtime: half-precision dense weights widened to f32
/// (candle's matmul takes one dtype; the GPU widens them in the shader).
fn as_reference(w: &Weight) -> Weight {
    match w {
        Weight::Dense(t) if t.dtype() != DType::F32 => Weight::Dense(t.to_dtype(DType::F32).unwrap()),
        other => other.clone(),
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Every element within `tol(i)` of the reference.
fn close(got: &Tensor, want: &Tensor, what: &str, tol: impl Fn(usize) -> f32) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.dims(), want.dims(), "{}: shapes", what);
    let (g, w) = (values(got), values(want));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let t = tol(i);
        prop_assert!((a - b).abs() <= t, "{}: element {} is {} vs reference {} (tolerance {})", what, i, a, b, t);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Linear layers in every format at ragged M, N, K (tails of the 16-wide tiles), within
    /// the float-summation bound `8·k·ε·Σ|x·w|` of the reference.
    #[test]
    fn linear_in_every_format_matches_the_reference(
        m in prop_oneof![1usize..5, 14usize..40], n in 1usize..40, kq in 1usize..20, format in 0usize..7,
        bits in 1u8..9, kind in 0usize..4, gran in 0usize..4, bias in any::<bool>(), seed in any::<u64>()
    ) {
        let k = kq * 4 + usize::from(format < 4) * (seed as usize % 4);
        let w = weight(&[n, k], format, (bits, kind, gran), seed);
        let dev = Device::Cpu;
        let x = Tensor::from_vec(input(m, k, seed ^ 1), (m, k), &dev).unwrap();
        let b = bias.then(|| Tensor::from_vec(input(1, n, seed ^ 3), n, &dev).unwrap());
        let want = reference().prepare_linear("fc", &as_reference(&w), b.as_ref()).unwrap().forward(&x).unwrap();
        let got = gpu().prepare_linear("fc", &w, b.as_ref()).unwrap().forward(&x).unwrap();
        let (xv, wv) = (input(m, k, seed ^ 1), values(&w.to_dense(&dev).unwrap()));
        close(&got, &want, &format!("linear {}", w.describe()), |i| {
            let (r, j) = (i / n, i % n);
            let s: f32 = (0..k).map(|p| (xv[r * k + p] * wv[j * k + p]).abs()).sum();
            8.0 * k as f32 * f32::EPSILON * s + 1e-6
        })?;
    }

    /// Convolutions with padding, stride, dilation and groups, in every weight format.
    #[test]
    fn conv2d_in_every_format_matches_the_reference(
        b in 1usize..3, g in 1usize..3, cig in 1usize..4, cog in 1usize..4, h in 3usize..9, wd in 3usize..9,
        kh in 1usize..4, pad in 0usize..2, stride in 1usize..3, dil in 1usize..3, format in 0usize..7,
        bits in 2u8..9, kind in 0usize..4, seed in any::<u64>()
    ) {
        // Sparse layouts need a row (cin/groups·kh·kw) that 4 divides: use a 2×2 kernel then.
        let kh = if format >= 4 { 2 } else { kh };
        let shape = [g * cog, cig, kh, kh];
        prop_assume!(h + 2 * pad > dil * (kh - 1) && wd + 2 * pad > dil * (kh - 1));
        let w = weight(&shape, format, (bits, kind, 3), seed);
        let p = Conv2dParams { padding: pad, stride, dilation: dil, groups: g };
        let x = Tensor::from_vec(input(1, b * g * cig * h * wd, seed ^ 1), (b, g * cig, h, wd), &Device::Cpu).unwrap();
        let bias = Tensor::from_vec(input(1, g * cog, seed ^ 2), g * cog, &Device::Cpu).unwrap();
        let want = reference().prepare_conv2d("c", &as_reference(&w), Some(&bias), p).unwrap().forward(&x).unwrap();
        let got = gpu().prepare_conv2d("c", &w, Some(&bias), p).unwrap().forward(&x).unwrap();
        let row = cig * kh * kh;
        close(&got, &want, &format!("conv2d {}", w.describe()), |_| 8.0 * row as f32 * f32::EPSILON * 9.0 * row as f32 + 1e-5)?;
    }

    /// Element-wise activations, residual + layer norm, and attention with and without a mask.
    #[test]
    fn nonlinear_ops_match_the_reference(
        rows in 1usize..20, width in 1usize..200, act in 0usize..7, residual in any::<bool>(),
        bsz in 1usize..3, t in 1usize..12, heads in 1usize..4, hs in 1usize..40, masked in any::<bool>(),
        seed in any::<u64>()
    ) {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(input(rows, width, seed), (rows, width), &dev).unwrap();
        let a = [Activation::Relu, Activation::Gelu, Activation::GeluTanh, Activation::Tanh, Activation::Sigmoid,
            Activation::Silu, Activation::Identity][act];
        close(&gpu().activation(a, &x).unwrap(), &reference().activation(a, &x).unwrap(), &format!("{a:?}"), |_| 2e-6)?;
        let r = Tensor::from_vec(input(rows, width, seed ^ 1), (rows, width), &dev).unwrap();
        let gamma = Tensor::from_vec(input(1, width, seed ^ 2), width, &dev).unwrap();
        let beta = Tensor::from_vec(input(1, width, seed ^ 3), width, &dev).unwrap();
        let res = residual.then_some(&r);
        let want = reference().layer_norm(&x, res, &gamma, &beta, 1e-12).unwrap();
        let got = gpu().layer_norm(&x, res, &gamma, &beta, 1e-12).unwrap();
        close(&got, &want, "layer norm", |_| 2e-5 * (width as f32).sqrt())?;
        let hidden = heads * hs;
        let mk = |s: u64| Tensor::from_vec(input(bsz * t, hidden, s), (bsz, t, hidden), &dev).unwrap();
        let (q, k, v) = (mk(seed ^ 4), mk(seed ^ 5), mk(seed ^ 6));
        // BERT's mask: 0 for tokens, the lowest f32 for padding; the first key is always a token.
        let mask: Vec<f32> = (0..bsz * t).map(|i| if i % t != 0 && hash(i, 7, seed).is_multiple_of(3) { f32::MIN } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (bsz, t), &dev).unwrap();
        let m = masked.then_some(&mask);
        let scale = 1.0 / (hs as f64).sqrt();
        let want = reference().attention(&q, &k, &v, heads, m, scale).unwrap();
        let got = gpu().attention(&q, &k, &v, heads, m, scale).unwrap();
        close(&got, &want, "attention", |_| 2e-5 * hs as f32)?;
    }
}

#[test]
fn embeddings_in_every_dense_and_quantized_format_match_the_reference() {
    let ids = Tensor::new(&[[3u32, 0, 7], [1, 1, 9]], &Device::Cpu).unwrap();
    for format in 0..4 {
        for (bits, kind, gran) in [(4, 0, 3), (3, 1, 1), (8, 2, 0), (4, 3, 2)] {
            let w = weight(&[10, 12], format, (bits, kind, gran), 7);
            let want = reference().prepare_embedding("e", &w).unwrap().forward(&ids).unwrap();
            let got = gpu().prepare_embedding("e", &w).unwrap().forward(&ids).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(values(&got), values(&want), "embedding {}", w.describe());
        }
    }
    // An id past the table is an error naming it, never an out-of-bounds read.
    let w = weight(&[10, 12], 0, (8, 0, 0), 7);
    let e =
        gpu().prepare_embedding("emb", &w).unwrap().forward(&Tensor::new(&[10u32], &Device::Cpu).unwrap()).unwrap_err();
    assert_eq!(e.to_string(), "invalid embedding `emb`: id 10 at flat index 0 is outside the table of 10 rows");
}

/// The errors a user meets: a GPU that is not there, a format the runtime refuses without an
/// opt-in fallback, wrong shapes.
#[test]
fn bad_requests_are_typed_errors_naming_the_device() {
    let e = WgpuRuntime::with_options(WgpuOptions { adapter: Some("no-such-gpu".into()), ..Default::default() })
        .unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("no usable wgpu compute adapter matching `no-such-gpu`: found "), "{text}");
    assert!(text.contains(gpu().adapter()), "the message lists the adapters that exist: {text}");
    // A sparse embedding table is refused unless the user asks for it to run dense.
    let sparse = weight(&[10, 12], 4, (8, 0, 0), 1);
    let e = gpu().prepare_embedding("emb", &sparse).unwrap_err();
    assert!(matches!(gpu_error(&e), Some(GpuError::Unsupported { .. })), "{e}");
    assert!(e.to_string().contains("sparse_as_dense"), "{e}");
    let dense_ok = WgpuRuntime::with_options(WgpuOptions { sparse_as_dense: true, ..Default::default() }).unwrap();
    let ids = Tensor::new(&[2u32, 5], &Device::Cpu).unwrap();
    let want = reference().prepare_embedding("emb", &sparse).unwrap().forward(&ids).unwrap();
    assert_eq!(values(&dense_ok.prepare_embedding("emb", &sparse).unwrap().forward(&ids).unwrap()), values(&want));
    // Shapes: the input width, the bias, a conv's channels.
    let w = weight(&[4, 8], 0, (8, 0, 0), 1);
    let x = Tensor::zeros((2, 9), DType::F32, &Device::Cpu).unwrap();
    let e = gpu().prepare_linear("enc.fc", &w, None).unwrap().forward(&x).unwrap_err();
    assert_eq!(e.to_string(), "`input of `enc.fc``: expected shape [8], found [2, 9]");
    let bad_bias = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
    let e = gpu().prepare_linear("enc.fc", &w, Some(&bad_bias)).unwrap_err();
    assert_eq!(e.to_string(), "`enc.fc.bias`: expected shape [4], found [5]");
    let cw = weight(&[2, 3, 3, 3], 0, (8, 0, 0), 1);
    let op = gpu().prepare_conv2d("conv", &cw, None, Conv2dParams::default()).unwrap();
    let e = op.forward(&Tensor::zeros((1, 2, 5, 5), DType::F32, &Device::Cpu).unwrap()).unwrap_err();
    assert!(e.to_string().contains("input of `conv` (channels)"), "{e}");
}

fn all() -> Selection {
    Selection { include: Vec::new(), exclude: Vec::new() }
}

#[test]
fn digits_nets_in_several_formats_agree_with_the_reference() {
    let data = digits(42, &Device::Cpu).unwrap();
    for (arch, second) in [("mlp:64,32", "layers.1"), ("cnn:4,8:32", "fc1")] {
        let float = pare_tests::trained_digits(arch, 4).unwrap();
        let mut q = float.clone();
        let over = [Override::parse(&format!("{second}=nf4,group:8"), true).unwrap()];
        quantize_model_plan(&mut q, &Method::parse("int4", "channel", true).unwrap(), &all(), &over, None, &mut |_| {})
            .unwrap();
        for net in [&float, &q] {
            let (mut a, mut b) = (net.clone(), net.clone());
            a.prepare(&(Arc::new(reference()) as Arc<dyn Runtime>)).unwrap();
            b.prepare(&(gpu() as Arc<dyn Runtime>)).unwrap();
            let (la, lb) = (a.forward(&data.test.x).unwrap(), b.forward(&data.test.x).unwrap());
            let diff = (&la - &lb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-4, "{arch}: logits differ by {diff}");
            let acc = b.accuracy(&data.test).unwrap();
            assert!(acc > 0.8, "{arch} on wgpu is a working classifier ({acc})");
        }
    }
}

#[test]
fn minilm_float_and_quantized_agree_with_the_reference() {
    let Some(dir) = pare_tests::minilm_dir("gpu::minilm_float_and_quantized_agree_with_the_reference").unwrap() else {
        return;
    };
    let text = pare_core_tensor::data::sentences(pare_tests::workspace_root().join("data/sentences.txt")).unwrap();
    let batch: Vec<String> = text.into_iter().take(8).collect();
    let float = pare_models::bert::SentenceEncoder::load(&dir, &Device::Cpu).unwrap();
    let mut q = float.clone();
    let over = [Override::parse("encoder.layer.[0-2].*=nf4,group:64", true).unwrap()];
    quantize_model_plan(
        &mut q.bert,
        &Method::parse("int4", "group:32", true).unwrap(),
        &all(),
        &over,
        None,
        &mut |_| {},
    )
    .unwrap();
    let gpu_rt: Arc<dyn Runtime> = gpu();
    let reference: Arc<dyn Runtime> = Arc::new(reference());
    for (name, model) in [("float", &float), ("int4 + nf4", &q)] {
        let (mut a, mut b) = (model.clone(), model.clone());
        a.bert.prepare(&reference).unwrap();
        b.bert.prepare(&gpu_rt).unwrap();
        let (ea, eb) = (a.embed(&batch, 8, &mut |_| {}).unwrap(), b.embed(&batch, 8, &mut |_| {}).unwrap());
        let cos = mean_cosine(&ea, &eb).unwrap();
        let diff = pare_core_tensor::testing::max_abs_diff(&ea, &eb).unwrap();
        eprintln!("MiniLM {name}: wgpu vs reference mean cosine {cos:.7}, max |Δ| {diff:.2e}");
        assert!(cos >= 0.99999 && diff <= 1e-4, "MiniLM {name} on wgpu: mean cosine {cos}, max |Δ| {diff}");
    }
}

/// A model too big for the device's buffers is refused at `prepare`, naming the device, the
/// limit and both sizes; a shader the driver rejects is a typed error with its message.
#[test]
fn device_limits_and_shader_failures_are_typed_errors() {
    let small =
        WgpuRuntime::with_options(WgpuOptions { max_buffer_bytes: Some(1 << 20), ..Default::default() }).unwrap();
    let w = weight(&[512, 1024], 0, (8, 0, 0), 1); // 2 MiB of f32
    let e = small.prepare_linear("enc.big", &w, None).unwrap_err();
    match gpu_error(&e) {
        Some(GpuError::Limit { device, limit, needed, max, .. }) => {
            assert_eq!((*needed, *max), (2 << 20, 1 << 20));
            assert!(device.contains(small.adapter()) && limit.contains("max_"), "{e}");
        }
        other => panic!("expected a limit error, found {other:?}"),
    }
    assert!(e.to_string().contains("`enc.big` weight"), "{e}");
    // The same layer stored as int4 codes fits (256 KiB plus scales).
    let q = weight(&[512, 1024], 3, (4, 0, 3), 1);
    small.prepare_linear("enc.big", &q, None).unwrap();
    // An activation over the cap is refused before any upload.
    let x = Tensor::zeros((600, 1024), DType::F32, &Device::Cpu).unwrap();
    let e = small.prepare_linear("enc.big", &q, None).unwrap().forward(&x).unwrap_err();
    assert!(matches!(gpu_error(&e), Some(GpuError::Limit { .. })), "{e}");
    let e = gpu().compile("broken", "@compute @workgroup_size(1) fn main() { let x: f32 = 1u; }").unwrap_err();
    assert!(matches!(e, GpuError::Shader { .. }), "{e}");
    assert!(e.to_string().contains("shader `user:broken` failed to compile"), "{e}");
    gpu().compile("fine", "@compute @workgroup_size(1) fn main() { }").unwrap();
}

/// The wgpu runtime's ops, with `resident` off: models then call it op by op (one upload and
/// one read-back each), the path the resident graph must agree with.
#[derive(Debug)]
struct OpByOp(Arc<WgpuRuntime>);

impl Runtime for OpByOp {
    fn name(&self) -> &str {
        "wgpu, op by op"
    }
    fn device(&self) -> &Device {
        self.0.device()
    }
    fn prepare_linear(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
    ) -> pare_core_tensor::Result<Arc<dyn pare_core_tensor::PreparedOp>> {
        self.0.prepare_linear(layer, weight, bias)
    }
    fn prepare_conv2d(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
        params: Conv2dParams,
    ) -> pare_core_tensor::Result<Arc<dyn pare_core_tensor::PreparedOp>> {
        self.0.prepare_conv2d(layer, weight, bias, params)
    }
    fn prepare_embedding(
        &self,
        layer: &str,
        weight: &Weight,
    ) -> pare_core_tensor::Result<Arc<dyn pare_core_tensor::PreparedOp>> {
        self.0.prepare_embedding(layer, weight)
    }
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        mask: Option<&Tensor>,
        scale: f64,
    ) -> pare_core_tensor::Result<Tensor> {
        self.0.attention(q, k, v, heads, mask, scale)
    }
    fn activation(&self, act: Activation, x: &Tensor) -> pare_core_tensor::Result<Tensor> {
        self.0.activation(act, x)
    }
    fn layer_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
    ) -> pare_core_tensor::Result<Tensor> {
        self.0.layer_norm(x, residual, gamma, beta, eps)
    }
}

/// Whole models stay on the adapter: the digits MLP and CNN and MiniLM (float and 4-bit) run
/// as one graph in one submission, giving exactly the op-by-op path's values; a W8A8 model,
/// whose input quantization the adapter does not take resident, still runs, op by op.
#[test]
fn whole_models_run_resident_in_one_submission_and_match_op_by_op() {
    // Its own adapter: the other tests, running alongside, would add to a shared one's count.
    let rt = Arc::new(WgpuRuntime::new().unwrap());
    let resident: Arc<dyn Runtime> = rt.clone();
    let op_by_op: Arc<dyn Runtime> = Arc::new(OpByOp(rt.clone()));
    let data = digits(42, &Device::Cpu).unwrap();
    for arch in ["mlp:64,32", "cnn:4,8:32"] {
        let net = pare_tests::trained_digits(arch, 2).unwrap();
        let (mut a, mut b) = (net.clone(), net.clone());
        a.prepare(&op_by_op).unwrap();
        b.prepare(&resident).unwrap();
        let before = rt.submissions();
        let got = b.forward(&data.test.x).unwrap();
        let submits = rt.submissions() - before;
        let want = a.forward(&data.test.x).unwrap();
        let diff = pare_core_tensor::testing::max_abs_diff(&got, &want).unwrap();
        assert!(diff == 0.0, "{arch}: resident and op-by-op logits differ by {diff}");
        assert_eq!(submits, 1, "{arch}: the whole net in one submission");
    }
    // Input quantization runs through the default fake-quantizing wrapper: op by op.
    let mut w8a8 = pare_tests::trained_digits("mlp:64,32", 2).unwrap();
    let paths = pare_core_tensor::select::Selection::default().resolve(&w8a8).unwrap();
    let spec = pare_quant::ptq::ActSpec { bits: 8, symmetric: true };
    let specs = pare_quant::ptq::dynamic_specs(&w8a8, &paths, spec, true).unwrap();
    pare_quant::ptq::apply(&mut w8a8, &specs).unwrap();
    let (mut a, mut b) = (w8a8.clone(), w8a8);
    a.prepare(&op_by_op).unwrap();
    b.prepare(&resident).unwrap();
    let before = rt.submissions();
    let got = b.forward(&data.test.x).unwrap();
    assert!(rt.submissions() - before > 1, "W8A8 layers fall back to op by op");
    let diff = pare_core_tensor::testing::max_abs_diff(&got, &a.forward(&data.test.x).unwrap()).unwrap();
    assert!(diff == 0.0, "W8A8 MLP: the fallback differs by {diff}");
    let Some(dir) = pare_tests::minilm_dir("gpu::whole_models_run_resident").unwrap() else { return };
    let text = pare_core_tensor::data::sentences(pare_tests::workspace_root().join("data/sentences.txt")).unwrap();
    let batch: Vec<String> = text.into_iter().take(6).collect();
    let float = pare_models::bert::SentenceEncoder::load(&dir, &Device::Cpu).unwrap();
    let mut q = float.clone();
    quantize_model_plan(&mut q.bert, &Method::parse("int4", "group:32", true).unwrap(), &all(), &[], None, &mut |_| {})
        .unwrap();
    for (name, model) in [("float", &float), ("int4", &q)] {
        let (mut a, mut b) = (model.clone(), model.clone());
        a.bert.prepare(&op_by_op).unwrap();
        b.bert.prepare(&resident).unwrap();
        let before = rt.submissions();
        let t = std::time::Instant::now();
        let eb = b.embed(&batch, 6, &mut |_| {}).unwrap();
        let (submits, resident_s) = (rt.submissions() - before, t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        let ea = a.embed(&batch, 6, &mut |_| {}).unwrap();
        let (op_submits, op_s) = (rt.submissions() - before - submits, t.elapsed().as_secs_f64());
        let diff = pare_core_tensor::testing::max_abs_diff(&ea, &eb).unwrap();
        assert!(diff == 0.0, "MiniLM {name}: resident and op-by-op embeddings differ by {diff}");
        assert_eq!(submits, 1, "MiniLM {name}: six layers in one submission");
        eprintln!(
            "MiniLM {name}, {} sentences: resident {:.0} ms in {submits} submission; op by op {:.0} ms in {op_submits} (same values; the adapter: {})",
            batch.len(),
            resident_s * 1e3,
            op_s * 1e3,
            rt.adapter()
        );
    }
}
