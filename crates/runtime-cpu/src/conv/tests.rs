use candle_core::{DType, Device, Tensor};
use pare_core_tensor::{
    Conv2dParams, Granularity, Mapping, QuantScheme, QuantizedTensor, ReferenceRuntime, Runtime, Weight,
};
use proptest::prelude::*;

use crate::testkit::input;
use crate::{CpuRuntime, SimdLevel};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    /// Shapes, padding, stride and dilation at random; f32, 4-bit per-channel and pruned (80%
    /// zeros, stored CSR: the sparse kernel) weights: every level and thread count against the
    /// reference convolution, the same bits across threads.
    #[test]
    fn convolutions_match_the_reference(
        b in 1usize..3, cin in 1usize..4, out in 1usize..20, h in 1usize..11, w in 1usize..11,
        kh in 1usize..4, kw in 1usize..4, padding in 0usize..3, stride in 1usize..3, dilation in 1usize..3,
        kind in 0usize..3, bias in any::<bool>(), seed in any::<u64>()
    ) {
        let p = Conv2dParams { padding, stride, dilation, groups: 1 };
        prop_assume!(h + 2 * padding > dilation * (kh - 1) && w + 2 * padding > dilation * (kw - 1));
        let k = cin * kh * kw;
        let dev = Device::Cpu;
        let weight = if kind == 2 {
            let v: Vec<f32> = input(out, k, seed).into_iter().enumerate()
                .map(|(i, x)| if ((i as u64 ^ seed).wrapping_mul(0x9E3779B97F4A7C15) >> 61) < 2 { x } else { 0.0 }).collect();
            let t = Tensor::from_vec(v, (out, cin, kh, kw), &dev).unwrap();
            Weight::Sparse(pare_core_tensor::SparseTensor::csr_from_dense(&t, "conv").unwrap())
        } else if kind == 1 {
            let scheme = QuantScheme { bits: 4, signed: true, symmetric: true, mapping: Mapping::Linear,
                granularity: Granularity::PerChannel { axis: 0 } };
            let codes: Vec<u8> = (0..out * k).map(|i| ((i as u64 ^ seed).wrapping_mul(0x9E3779B97F4A7C15) >> 60) as u8).collect();
            let scales = (0..out).map(|j| 0.01 + 0.003 * j as f32).collect();
            Weight::Quantized(QuantizedTensor::from_codes(&codes, scheme, scales, None, None, vec![out, cin, kh, kw], DType::F32).unwrap())
        } else {
            Weight::Dense(Tensor::from_vec(input(out, k, seed), (out, cin, kh, kw), &dev).unwrap())
        };
        let bias = bias.then(|| Tensor::from_vec(input(1, out, seed ^ 9), out, &dev).unwrap());
        let x = Tensor::from_vec(input(b, cin * h * w, seed ^ 4), (b, cin, h, w), &dev).unwrap();
        let want = ReferenceRuntime::cpu().prepare_conv2d("conv", &weight, bias.as_ref(), p).unwrap().forward(&x).unwrap();
        let wmax = weight.to_dense(&dev).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let tol = 8.0 * (k * k) as f32 * f32::EPSILON * 3.0 * wmax + 1e-6;
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for level in SimdLevel::available() {
            let mut first: Option<Vec<f32>> = None;
            for threads in [1, 3] {
                let rt = CpuRuntime::with_level(threads, level).unwrap();
                let got = rt.prepare_conv2d("conv", &weight, bias.as_ref(), p).unwrap().forward(&x).unwrap();
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                prop_assert_eq!(got.len(), want.len());
                for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                    prop_assert!((g - r).abs() <= tol, "{:?}/{}: [{}] {} vs {} (tol {})", level, threads, i, g, r, tol);
                }
                match &first {
                    None => first = Some(got),
                    Some(f) => prop_assert_eq!(f, &got),
                }
            }
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let rt = CpuRuntime::new(1).unwrap();
    let w = Weight::Dense(Tensor::ones((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap());
    let op = rt.prepare_conv2d("conv", &w, None, Conv2dParams::default()).unwrap();
    let e = op.forward(&Tensor::zeros((1, 3, 5, 5), DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("conv") && e.contains("[2]") && e.contains("[3]"), "{e}");
    let e = op.forward(&Tensor::zeros((1, 2, 2, 2), DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("smaller than the 3×3 kernel"), "{e}");
    assert!(op.forward(&Tensor::zeros((2, 5, 5), DType::F32, &Device::Cpu).unwrap()).is_err());
    let b = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    assert!(
        rt.prepare_conv2d("conv", &w, Some(&b), Conv2dParams::default()).unwrap_err().to_string().contains("conv.bias")
    );
}
