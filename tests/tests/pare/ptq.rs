//! Activation quantization and GPTQ on MiniLM: W8A8 (dynamic per token, and static with
//! calibrated ranges that reload with the model) and INT4 GPTQ against the float embeddings.
//! Calibration uses the first 128 sentences of data/sentences.txt, evaluation the next 256
//! (the figures in README and reports/ use all 1024 held-out sentences).

use candle_core::Device;
use pare_core_tensor::data::sentences;
use pare_core_tensor::metrics::mean_cosine;
use pare_core_tensor::testing::max_abs_diff;
use pare_core_tensor::{ActRange, Hooks, Module};
use pare_models::bert::SentenceEncoder;
use pare_quant::gptq::collect_hessians;
use pare_quant::observer::ObserverKind;
use pare_quant::ptq::{ActSpec, apply, calibrate, calibrate_smoothed, dynamic_specs};
use pare_quant::smooth::{collect_channel_max, smooth_model};
use pare_quant::weight_only::{Method, Selection, quantize_model, quantize_model_with};
use pare_tests::{minilm_dir, workspace_root};

#[test]
fn w8a8_and_gptq_minilm_keep_their_embeddings() -> anyhow::Result<()> {
    let Some(dir) = minilm_dir("ptq::w8a8_and_gptq_minilm_keep_their_embeddings")? else { return Ok(()) };
    let dev = Device::Cpu;
    let text = sentences(workspace_root().join("data/sentences.txt"))?;
    let (calib, rest) = text.split_at(128);
    let eval = &rest[..256];
    let float = SentenceEncoder::load(&dir, &dev)?;
    let reference = float.embed(eval, 32, &mut |_| {})?;
    let run = |e: &SentenceEncoder, hooks: &mut Hooks<'_>| -> pare_quant::Result<usize> {
        e.embed_hooked(calib, 32, hooks, &mut |_| {})?;
        Ok(calib.len())
    };
    let mut w8 = float.clone();
    quantize_model(&mut w8.bert, &Method::parse("int8", "channel", true)?, &Selection::default(), &mut |_| {})?;
    let paths = Selection::default().resolve(&w8.bert)?;

    // Dynamic per-token int8 activations: issue 3's W8A8 bar (ONNX Runtime reaches 0.9918).
    let mut dynamic = w8.clone();
    let specs = dynamic_specs(&dynamic.bert, &paths, ActSpec { bits: 8, symmetric: true }, true)?;
    apply(&mut dynamic.bert, &specs)?;
    let cos = mean_cosine(&reference, &dynamic.embed(eval, 32, &mut |_| {})?)?;
    eprintln!("MiniLM W8A8 dynamic per-token: mean cosine {cos:.5}");
    assert!(cos >= 0.995, "W8A8 dynamic mean cosine {cos} < 0.995");

    // SmoothQuant (α = 0.5) moves the activation outliers into the weights before W8A8.
    let amax = collect_channel_max(&paths, &mut |h| run(&float, h))?;
    let mut smooth = float.clone();
    let factors = smooth_model(&mut smooth.bert, &paths, &amax, 0.5)?;
    quantize_model(&mut smooth.bert, &Method::parse("int8", "channel", true)?, &Selection::default(), &mut |_| {})?;
    let mut specs = dynamic_specs(&smooth.bert, &paths, ActSpec { bits: 8, symmetric: true }, true)?;
    specs.iter_mut().for_each(|(p, a)| a.smooth = factors.get(p).cloned());
    apply(&mut smooth.bert, &specs)?;
    let smoothed = mean_cosine(&reference, &smooth.embed(eval, 32, &mut |_| {})?)?;
    eprintln!("MiniLM W8A8 dynamic per-token + SmoothQuant: mean cosine {smoothed:.5}");
    assert!(smoothed > cos && smoothed >= 0.999, "smoothing {smoothed} vs plain {cos}");
    // Static W8A8: ranges of the smoothed inputs, calibrated on the float model (the smoothed one
    // is only right once its specs divide the inputs). One per-tensor range per layer input needs
    // more migration than per-token ranges do: α = 0.85 measures 0.9976 on the 1024 held-out
    // sentences (0.7: 0.9973, 0.5: 0.9912, 0.3: 0.87), against 0.9938 unsmoothed.
    let mut smooth = float.clone();
    let factors = smooth_model(&mut smooth.bert, &paths, &amax, 0.85)?;
    quantize_model(&mut smooth.bert, &Method::parse("int8", "channel", true)?, &Selection::default(), &mut |_| {})?;
    let specs =
        calibrate_smoothed(&paths, ObserverKind::Mse, ActSpec { bits: 8, symmetric: false }, &factors, &mut |h| {
            run(&float, h)
        })?;
    apply(&mut smooth.bert, &specs)?;
    let smooth_static = mean_cosine(&reference, &smooth.embed(eval, 32, &mut |_| {})?)?;
    eprintln!("MiniLM W8A8 static (mse) + SmoothQuant 0.85: mean cosine {smooth_static:.5}");
    assert!(smooth_static >= 0.995, "W8A8 static + SmoothQuant mean cosine {smooth_static} < 0.995");

    // Static without smoothing: one calibrated scale per layer input; MSE clipping, asymmetric,
    // measures 0.9938 — BERT's outlier channels are why smoothing is needed for 0.995.
    let specs = calibrate(&paths, ObserverKind::Mse, ActSpec { bits: 8, symmetric: false }, &mut |h| run(&w8, h))?;
    assert!(specs.values().all(|a| matches!(a.range, ActRange::Static { .. })));
    let mut stat = w8.clone();
    apply(&mut stat.bert, &specs)?;
    let cos = mean_cosine(&reference, &stat.embed(eval, 32, &mut |_| {})?)?;
    eprintln!("MiniLM W8A8 static (mse observer): mean cosine {cos:.5}");
    assert!(cos >= 0.99, "W8A8 static mean cosine {cos} < 0.99");
    // The calibrated scales travel with the folder.
    let out = tempfile::tempdir()?;
    stat.bert.save_folder(&dir, out.path(), &Default::default())?;
    let back = SentenceEncoder::load(out.path(), &dev)?;
    assert_eq!(back.bert.layer(&paths[0])?.input_quant(), stat.bert.layer(&paths[0])?.input_quant());
    let few = &eval[..8];
    assert_eq!(max_abs_diff(&stat.embed(few, 8, &mut |_| {})?, &back.embed(few, 8, &mut |_| {})?)?, 0.0);

    // GPTQ INT4, symmetric group 64 — 4.5 bits per weight, as llama.cpp's Q4_0 — against
    // candle's own Q4_0 on the same layers: issue 3's 4-bit bar and its peer.
    let hessians = collect_hessians(&paths, &mut |h| run(&float, h))?;
    let mut g4 = float.clone();
    let gptq = Method::parse("int4", "group:64", true)?.with_algo("gptq")?;
    let reports = quantize_model_with(&mut g4.bert, &gptq, &Selection::default(), Some(&hessians), &mut |_| {})?;
    let bits = |r: &[pare_quant::weight_only::LayerReport]| {
        8.0 * r.iter().map(|r| r.bytes_after).sum::<usize>() as f64
            / r.iter().map(|r| r.shape.iter().product::<usize>()).sum::<usize>() as f64
    };
    let cos = mean_cosine(&reference, &g4.embed(eval, 32, &mut |_| {})?)?;
    let mut q40 = float.clone();
    let q40_reports =
        quantize_model(&mut q40.bert, &Method::parse("q4_0", "channel", true)?, &Selection::default(), &mut |_| {})?;
    let peer = mean_cosine(&reference, &q40.embed(eval, 32, &mut |_| {})?)?;
    // Q4_0 is 4.5 bits per weight in GGUF (f16 block scales); pare stores its scales as f32.
    let (ours_bits, peer_bits) = (bits(&reports), 4.5);
    assert!((bits(&q40_reports) - 5.0).abs() < 1e-9);
    eprintln!(
        "MiniLM INT4 g64 GPTQ: mean cosine {cos:.5} at {ours_bits:.3} bits/weight; candle Q4_0 {peer:.5} at {peer_bits:.3}"
    );
    assert!(cos >= 0.98, "INT4 GPTQ mean cosine {cos} < 0.98");
    assert!(cos > peer && ours_bits <= peer_bits, "GPTQ {cos} at {ours_bits} vs Q4_0 {peer} at {peer_bits}");

    // NF4 group 64 (4.5 bits): nearest-entry rounding measures 0.972; GPTQ's error
    // compensation over the same codebook 0.9905 on the 1024 held-out sentences.
    let mut nf4 = float.clone();
    quantize_model(&mut nf4.bert, &Method::parse("nf4", "group:64", true)?, &Selection::default(), &mut |_| {})?;
    let plain = mean_cosine(&reference, &nf4.embed(eval, 32, &mut |_| {})?)?;
    let mut nf4g = float.clone();
    let method = Method::parse("nf4", "group:64", true)?.with_algo("gptq")?;
    let reports = quantize_model_with(&mut nf4g.bert, &method, &Selection::default(), Some(&hessians), &mut |_| {})?;
    let cos = mean_cosine(&reference, &nf4g.embed(eval, 32, &mut |_| {})?)?;
    eprintln!("MiniLM NF4 g64: nearest {plain:.5}, GPTQ {cos:.5} at {:.3} bits/weight", bits(&reports));
    assert!(reports.iter().all(|r| r.format.starts_with("uint4 codebook")), "{:?}", reports[0].format);
    assert!(cos >= 0.98 && cos > plain, "NF4 GPTQ mean cosine {cos} (nearest {plain})");
    Ok(())
}
