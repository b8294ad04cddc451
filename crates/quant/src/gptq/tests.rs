use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use super::*;
use crate::linear::quantize_linear;

fn normal(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

/// Output error ‖XWᵀ − XŴᵀ‖² of a quantized weight on inputs `x` `[n, in]`.
fn output_error(x: &Tensor, w: &Tensor, q: &QuantizedTensor) -> f32 {
    let wq = q.dequantize(&Device::Cpu).unwrap();
    let d = (x.matmul(&w.t().unwrap()).unwrap() - x.matmul(&wq.t().unwrap()).unwrap()).unwrap();
    d.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Correlated inputs (as real activations are) so that error compensation has something to use.
fn correlated_inputs(rng: &mut rand_chacha::ChaCha8Rng, n: usize, cols: usize) -> Tensor {
    let base = Tensor::from_vec(normal(rng, n * 8), (n, 8), &Device::Cpu).unwrap();
    let mix = Tensor::from_vec(normal(rng, 8 * cols), (8, cols), &Device::Cpu).unwrap();
    let noise = Tensor::from_vec(normal(rng, n * cols), (n, cols), &Device::Cpu).unwrap();
    (base.matmul(&mix).unwrap() + (noise * 0.3).unwrap()).unwrap()
}

fn hessian_of(x: &Tensor) -> Vec<f64> {
    let n = x.dim(0).unwrap() as f64;
    x.t()
        .unwrap()
        .matmul(x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| 2.0 * f64::from(*v) / n)
        .collect()
}

#[test]
fn cholesky_inverse_factor_reproduces_the_inverse() {
    let h = [4.0, 2.0, 0.6, 2.0, 5.0, 1.0, 0.6, 1.0, 3.0];
    let u = inverse_upper_factor(&h, 3).unwrap();
    // UᵀU · H = I.
    let mut inv = [0.0; 9];
    for i in 0..3 {
        for j in 0..3 {
            inv[i * 3 + j] = (0..3).map(|k| u[k * 3 + i] * u[k * 3 + j]).sum();
        }
    }
    for i in 0..3 {
        for j in 0..3 {
            let v: f64 = (0..3).map(|k| inv[i * 3 + k] * h[k * 3 + j]).sum();
            assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12, "{v}");
        }
    }
    assert!(inverse_upper_factor(&[1.0, 2.0, 2.0, 1.0], 2).is_none(), "indefinite");
}

#[test]
fn gptq_has_less_output_error_than_round_to_nearest() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (rows, cols) = (24, 64);
    let w = Tensor::from_vec(normal(&mut rng, rows * cols), (rows, cols), &Device::Cpu).unwrap();
    let x = correlated_inputs(&mut rng, 512, cols);
    let h = hessian_of(&x);
    for (bits, gran) in
        [(4, Granularity::PerGroup { size: 32 }), (3, Granularity::PerChannel { axis: 0 }), (4, Granularity::PerTensor)]
    {
        let spec = LinearSpec { bits, symmetric: false, granularity: gran };
        let rtn = output_error(&x, &w, &quantize_linear("w", &w, spec).unwrap());
        for act_order in [false, true] {
            let cfg = GptqConfig { act_order, ..Default::default() };
            let q = gptq_quantize("w", &w, &h, spec, cfg).unwrap();
            assert_eq!(q.scales().len(), spec.scheme().num_scales(&[rows, cols]).unwrap());
            let g = output_error(&x, &w, &q);
            assert!(g < 0.7 * rtn, "{bits} bits act_order={act_order}: gptq {g} vs rtn {rtn}");
        }
        let c = output_error(&x, &w, &clip_search("w", &w, spec).unwrap());
        assert!(c <= rtn * 1.0001, "clip search {c} vs rtn {rtn}");
    }
}

/// A pruned weight quantized with `keep_zeros` keeps every zero (int4 and NF4), and its
/// compensation still beats round-to-nearest; without it GPTQ fills the zeros in.
#[test]
fn gptq_keeps_a_pruned_weights_zeros_when_asked() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(29);
    let (rows, cols) = (16, 64);
    let mut v = normal(&mut rng, rows * cols);
    v.iter_mut().enumerate().filter(|(i, _)| (i * 7) % 10 < 6).for_each(|(_, x)| *x = 0.0);
    let pruned: Vec<bool> = v.iter().map(|x| *x == 0.0).collect();
    let w = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
    let x = correlated_inputs(&mut rng, 512, cols);
    let h = hessian_of(&x);
    // Pruned positions that came back non-zero.
    let filled = |q: &QuantizedTensor| {
        let d = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        d.iter().zip(&pruned).filter(|(x, p)| **p && **x != 0.0).count()
    };
    let spec = LinearSpec { bits: 4, symmetric: true, granularity: Granularity::PerGroup { size: 32 } };
    let keep = GptqConfig { keep_zeros: true, ..Default::default() };
    let q = gptq_quantize("w", &w, &h, spec, keep).unwrap();
    assert_eq!(filled(&q), 0);
    let rtn = output_error(&x, &w, &quantize_linear("w", &w, spec).unwrap());
    assert!(output_error(&x, &w, &q) < rtn, "masked GPTQ still compensates");
    let unmasked = filled(&gptq_quantize("w", &w, &h, spec, GptqConfig::default()).unwrap());
    assert!(unmasked > 0, "unmasked GPTQ fills pruned weights in");
    assert_eq!(filled(&gptq_nf4("w", &w, &h, 32, keep).unwrap()), 0);
}

#[test]
fn gptq_codes_are_a_valid_tensor_of_the_requested_scheme() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let w = Tensor::from_vec(normal(&mut rng, 6 * 32), (6, 32), &Device::Cpu).unwrap();
    let x = correlated_inputs(&mut rng, 64, 32);
    let spec = LinearSpec { bits: 4, symmetric: true, granularity: Granularity::PerGroup { size: 16 } };
    let q = gptq_quantize("w", &w, &hessian_of(&x), spec, GptqConfig::default()).unwrap();
    assert_eq!(q.scales().len(), 12);
    assert!(q.codes().iter().all(|&c| c < 16));
    // Bad options are named.
    let e = gptq_quantize("enc.fc", &w, &[1.0; 4], spec, GptqConfig::default()).unwrap_err().to_string();
    assert!(e.contains("`enc.fc`") && e.contains("32×32"), "{e}");
    let bad = LinearSpec { granularity: Granularity::PerGroup { size: 10 }, ..spec };
    let e = gptq_quantize("enc.fc", &w, &hessian_of(&x), bad, GptqConfig::default()).unwrap_err().to_string();
    assert!(e.contains("group size 10") && e.contains("32"), "{e}");
}

#[test]
fn gptq_over_the_nf4_codebook_beats_nearest_rounding() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
    let (rows, cols) = (16, 128);
    let w = Tensor::from_vec(normal(&mut rng, rows * cols), (rows, cols), &Device::Cpu).unwrap();
    let x = correlated_inputs(&mut rng, 512, cols);
    let h = hessian_of(&x);
    let plain = crate::codebook::nf4("w", &w, 64).unwrap();
    for clip_search in [false, true] {
        let q = gptq_nf4("w", &w, &h, 64, GptqConfig { clip_search, ..Default::default() }).unwrap();
        // Same format as plain NF4: the codebook, one scale per group.
        assert_eq!(q.scheme(), plain.scheme());
        assert_eq!(q.codebook(), plain.codebook());
        assert_eq!(q.scales().len(), rows * cols / 64);
        let (g, p) = (output_error(&x, &w, &q), output_error(&x, &w, &plain));
        assert!(g < 0.7 * p, "clip={clip_search}: gptq nf4 {g} vs nearest {p}");
    }
    let e = gptq_nf4("w", &w, &h, 48, GptqConfig::default()).unwrap_err().to_string();
    assert!(e.contains("group size 48 must divide the row length 128"), "{e}");
}

/// GPTQ on an embedding table is refused by name before anything is quantized (its inputs are
/// token ids, so it has no input Hessian); with an rtn override for the table, the same run
/// quantizes the table round-to-nearest and the linear layers with GPTQ.
#[test]
fn gptq_names_an_embedding_and_an_rtn_override_lets_the_table_through() {
    use pare_core_tensor::{Hooks, InitWeights, Module};
    use pare_models::bert::{BertConfig, BertEncoder};

    use crate::weight_only::{Method, Override, Selection, quantize_model_plan};
    let cfg = BertConfig {
        vocab_size: 40,
        hidden_size: 64,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 64,
        hidden_act: "gelu".into(),
        max_position_embeddings: 16,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        attention_head_size: None,
        heads_per_layer: None,
        intermediate_per_layer: None,
        attention_precision: Default::default(),
    };
    let bert = BertEncoder::build(cfg, &mut InitWeights::new(3, Device::Cpu, candle_nn::VarMap::new())).unwrap();
    let selection =
        Selection { include: vec!["embeddings.word_embeddings".into(), "encoder.*".into()], exclude: vec![] };
    let paths = selection.resolve(&bert).unwrap();
    let linear: Vec<String> = paths.iter().filter(|p| p.starts_with("encoder.")).cloned().collect();
    let ids =
        Tensor::from_vec((0..24).map(|i| (i * 7 % 40) as u32).collect::<Vec<_>>(), (2, 12), &Device::Cpu).unwrap();
    let mask = Tensor::ones((2, 12), candle_core::DType::U32, &Device::Cpu).unwrap();
    let hess = collect_hessians(&linear, &mut |h: &mut Hooks<'_>| {
        bert.forward_hooked(&ids, None, &mask, h).map_err(pare_models::Error::into_core)?;
        Ok(2)
    })
    .unwrap();
    let gptq = Method::parse("int4", "group:32", true).unwrap().with_algo("gptq").unwrap();
    let mut m = bert.clone();
    let e = quantize_model_plan(&mut m, &gptq, &selection, &[], Some(&hess), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("embeddings.word_embeddings") && e.contains("token ids"), "{e}");
    assert_eq!(m.storage_bytes(), bert.storage_bytes(), "nothing was quantized before the error");
    let rtn = Override::parse("embeddings.word_embeddings=int4,group:32,rtn", true).unwrap();
    let reports = quantize_model_plan(&mut m, &gptq, &selection, &[rtn], Some(&hess), &mut |_| {}).unwrap();
    assert_eq!(reports.len(), paths.len());
    assert!(m.storage_bytes() < bert.storage_bytes() / 3);
}
