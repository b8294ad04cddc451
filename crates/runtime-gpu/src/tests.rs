use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use pare_core_tensor::testing::input;
use pare_core_tensor::{Granularity, QuantScheme, QuantizedTensor, ReferenceRuntime, Runtime, Weight};
use proptest::prelude::*;

use crate::{CudaRuntime, GpuError, gpu_error};

#[test]
fn constructors_name_the_missing_feature() {
    #[cfg(not(feature = "wgpu"))]
    {
        let e = crate::WgpuRuntime::new().unwrap_err();
        assert_eq!(
            e.to_string(),
            "pare-runtime-gpu is not compiled with the `wgpu` feature (rebuild with `--features wgpu`)"
        );
    }
    #[cfg(not(feature = "cuda"))]
    {
        let e = CudaRuntime::new(0).unwrap_err();
        assert!(matches!(e, GpuError::NotCompiled { feature: "cuda" }), "{e}");
    }
    // Inside core-tensor's error the typed GPU error is kept and can be matched.
    let core: pare_core_tensor::Error = GpuError::NotCompiled { feature: "cuda" }.into();
    assert_eq!(
        core.to_string(),
        "cuda runtime: pare-runtime-gpu is not compiled with the `cuda` feature (rebuild with `--features cuda`)"
    );
    assert!(matches!(gpu_error(&core), Some(GpuError::NotCompiled { feature: "cuda" })));
    let e = GpuError::NoDevice { backend: "CUDA device 0".into(), found: vec!["CUDA_ERROR_NO_DEVICE".into()] };
    assert_eq!(e.to_string(), "no usable CUDA device 0: found CUDA_ERROR_NO_DEVICE");
}

/// A random `[n, k]` signed symmetric per-group-32 weight of `bits` bits (`k` a multiple of 32).
fn ggml_like(n: usize, k: usize, bits: u8, seed: u64) -> QuantizedTensor {
    pare_core_tensor::testing::random_quantized(&[n, k], bits, 0, 3, seed)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Q8_0/Q4_0-shaped weights become GGML blocks that dequantize to our values with each
    /// scale rounded to f16, and candle's quantized matmul on them agrees with the reference
    /// within that rounding plus its 8-bit quantization of the activations.
    #[test]
    fn ggml_blocks_hold_our_codes_and_qmatmul_agrees(
        m in 1usize..9, n in 1usize..24, blocks in 1usize..5, four in any::<bool>(), bias in any::<bool>(),
        seed in any::<u64>()
    ) {
        let (k, bits) = (blocks * 32, if four { 4 } else { 8 });
        let q = ggml_like(n, k, bits, seed);
        let ty = q.ggml_type().unwrap();
        prop_assert_eq!(ty, if four { GgmlDType::Q4_0 } else { GgmlDType::Q8_0 });
        let dev = Device::Cpu;
        // Exact block contents: dequantizing candle's tensor gives our values at f16 scales.
        let rt = CudaRuntime::on_device(dev.clone());
        let want_w: Vec<f32> = {
            let codes = q.codes();
            (0..n * k)
                .map(|i| half::f16::from_f32(q.scales()[i / 32]).to_f32() * (i32::from(codes[i]) + q.scheme().q_min()) as f32)
                .collect()
        };
        let storage = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Owned(q.ggml_blocks().unwrap().1), &dev, ty).unwrap();
        let qt = candle_core::quantized::QTensor::new(storage, (n, k)).unwrap();
        let got_w = qt.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        prop_assert_eq!(&got_w, &want_w);

        let xv = input(m, k, seed);
        let x = Tensor::from_vec(xv.clone(), (m, k), &dev).unwrap();
        let b = bias.then(|| Tensor::from_vec(input(1, n, seed ^ 5), n, &dev).unwrap());
        let w = Weight::Quantized(q.clone());
        let got = rt.prepare_linear("fc", &w, b.as_ref()).unwrap().forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let want = ReferenceRuntime::cpu().prepare_linear("fc", &w, b.as_ref()).unwrap().forward(&x).unwrap()
            .to_vec2::<f32>().unwrap();
        let wv = q.dequantize_f32();
        for r in 0..m {
            for j in 0..n {
                // f16 scales: 2^-11 of Σ|w·x|; activations to 8 bits per block: half a step
                // (max|x| / 127 / 2) times Σ|w| in each block.
                let mut tol = 1e-5f32;
                for blk in 0..blocks {
                    let xs = &xv[r * k + blk * 32..r * k + blk * 32 + 32];
                    let ws = &wv[j * k + blk * 32..j * k + blk * 32 + 32];
                    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let wsum: f32 = ws.iter().map(|v| v.abs()).sum();
                    let dot: f32 = xs.iter().zip(ws).map(|(a, b)| (a * b).abs()).sum();
                    tol += dot * 2f32.powi(-10) + wsum * amax / 254.0 * 1.01;
                }
                prop_assert!((got[r][j] - want[r][j]).abs() <= tol, "y[{r},{j}] {} vs {} (tol {tol})", got[r][j], want[r][j]);
            }
        }
    }
}

#[test]
fn formats_without_ggml_blocks_run_as_the_reference() {
    let dev = Device::Cpu;
    let rt = CudaRuntime::on_device(dev.clone());
    assert_eq!(rt.name(), "cuda");
    // int4 per channel: no GGML block type holds it, so it is dequantized: the reference, exactly.
    let mut q = ggml_like(5, 64, 4, 3);
    let scheme = QuantScheme { granularity: Granularity::PerChannel { axis: 0 }, ..*q.scheme() };
    q = QuantizedTensor::from_codes(&q.codes(), scheme, vec![0.01; 5], None, None, vec![5, 64], DType::F32).unwrap();
    assert!(q.ggml_type().is_none());
    let w = Weight::Quantized(q);
    let x = Tensor::from_vec(input(3, 64, 1), (3, 64), &dev).unwrap();
    let got = rt.prepare_linear("fc", &w, None).unwrap().forward(&x).unwrap();
    let want = ReferenceRuntime::cpu().prepare_linear("fc", &w, None).unwrap().forward(&x).unwrap();
    assert_eq!(pare_core_tensor::testing::max_abs_diff(&got, &want).unwrap(), 0.0);
    // A wrong input width is a shape error naming the layer, on the QMatMul path too.
    let qw = Weight::Quantized(ggml_like(4, 32, 8, 1));
    let e = rt.prepare_linear("enc.fc", &qw, None).unwrap().forward(&x).unwrap_err();
    assert_eq!(e.to_string(), "`input of `enc.fc``: expected shape [32], found [3, 64]");
}
