//! The digits models on real data: training reaches the bar, files round-trip, layers are
//! reachable by path, hooks see every layer, and quantized weights run in the whole model.

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use pare_core_tensor::data::digits;
use pare_core_tensor::hooks::MinMaxObserver;
use pare_core_tensor::metrics::MacCounter;
use pare_core_tensor::testing::max_abs_diff;
use pare_core_tensor::train::{LrSchedule, OptimizerKind, TrainConfig};
use pare_core_tensor::{Error, Hooks, Module, Weight};
use pare_models::digits::{DigitsArch, DigitsNet, fit};
use pare_quant::observer::ObserverKind;
use pare_quant::ptq::{ActSpec, apply, calibrate};
use pare_quant::weight_only::{Method, Override, Selection, quantize_model, quantize_model_plan};

fn demo_config(seed: u64) -> TrainConfig {
    TrainConfig {
        epochs: 60,
        batch_size: 32,
        optimizer: OptimizerKind::adamw(3e-3),
        schedule: LrSchedule::Cosine { warmup_steps: 40, min_factor: 0.02 },
        seed,
        patience: Some(15),
        checkpoint: None,
    }
}

#[test]
fn the_cnn_teacher_trains_to_97_percent_and_survives_every_round_trip() {
    let dev = Device::Cpu;
    let data = digits(42, &dev).unwrap();
    let vars = candle_nn::VarMap::new();
    let net = DigitsNet::init(DigitsArch::default_cnn(), 42, &dev, &vars).unwrap();
    let report = fit(&net, &vars, &data, &demo_config(42), &mut |_| {}).unwrap();
    let acc = net.accuracy(&data.test).unwrap();
    assert!(acc >= 0.97, "test accuracy {acc:.4} < 0.97 (report {report:?})");

    // Save and load: identical logits.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("teacher.safetensors");
    net.save(&path, &BTreeMap::new(), &[]).unwrap();
    let back = DigitsNet::load(&path, &dev).unwrap();
    assert_eq!(back.arch(), net.arch());
    let (a, b) = (net.forward(&data.test.x).unwrap(), back.forward(&data.test.x).unwrap());
    assert_eq!(max_abs_diff(&a, &b).unwrap(), 0.0);

    // Hooks see every layer once; MACs match the architecture.
    let mut ranges = MinMaxObserver::default();
    let mut macs = MacCounter::default();
    let one = data.test.x.narrow(0, 0, 1).unwrap();
    let mut hooks = Hooks::with(&mut ranges);
    hooks.push(&mut macs);
    net.forward_hooked(&one, &mut hooks).unwrap();
    assert_eq!(ranges.ranges.keys().collect::<Vec<_>>(), ["conv1", "conv2", "fc1", "fc2"]);
    assert!(ranges.ranges["conv1"].input_min >= 0.0 && ranges.ranges["conv1"].input_max <= 1.0);
    // conv1: 64 positions × 16 × 9; conv2: 64 × 32 × 16·9; fc1: 512 × 64; fc2: 64 × 10.
    assert_eq!(macs.total(), 64 * 16 * 9 + 64 * 32 * 144 + 512 * 64 + 64 * 10);

    // Layers by path; an unknown path names the closest ones.
    let mut q = back.clone();
    let e = q.layer("fc3").unwrap_err();
    assert!(matches!(e, Error::Unknown { .. }) && e.to_string().contains("closest: fc1, fc2"), "{e}");

    // Weight-only quantization with pare-quant, in place (the classifier stays float by default).
    let dense_bytes = q.storage_bytes();
    let int8 = Method::parse("int8", "channel", true).unwrap();
    let reports = quantize_model(&mut q, &int8, &Selection::default(), &mut |_| {}).unwrap();
    assert_eq!(reports.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(), ["conv1", "conv2", "fc1"]);
    let q_acc = q.accuracy(&data.test).unwrap();
    assert!((q_acc - acc).abs() <= 0.005, "int8 weight-only accuracy {q_acc} vs float {acc}");
    assert!(q.storage_bytes() * 3 < dense_bytes, "{} vs {dense_bytes}", q.storage_bytes());
    // INT4: group 32 along the reduction axis where the row allows it (fc1: 512), per channel
    // for the convolutions (rows of 9 and 144) — a per-layer override.
    let mut q4 = back.clone();
    let convs = Override::parse("conv*=int4,channel", true).unwrap();
    let reports = quantize_model_plan(
        &mut q4,
        &Method::parse("int4", "group:32", true).unwrap(),
        &Selection::default(),
        &[convs],
        None,
        &mut |_| {},
    )
    .unwrap();
    let formats: Vec<&str> = reports.iter().map(|r| r.format.as_str()).collect();
    assert_eq!(
        formats,
        ["int4 linear sym per-channel(0)", "int4 linear sym per-channel(0)", "int4 linear sym per-group(32)"]
    );
    let q4_acc = q4.accuracy(&data.test).unwrap();
    // An override that matches no selected layer is an error before any layer changes.
    let mut untouched = back.clone();
    let stray = Override::parse("fc2=int8", true).unwrap();
    let e = quantize_model_plan(&mut untouched, &int8, &Selection::default(), &[stray], None, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("`fc2`"), "{e}");
    assert!(matches!(untouched.layer("conv1").unwrap().parameters()[0].1, Weight::Dense(_)));
    assert!(acc - q4_acc <= 0.02, "int4 accuracy {q4_acc} vs float {acc}");
    // A group size that does not divide a selected layer's row fails before any layer changes.
    let mut untouched = back.clone();
    let e = quantize_model(
        &mut untouched,
        &Method::parse("int4", "group:32", true).unwrap(),
        &Selection::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("`conv1.weight`") && e.to_string().contains("row length 9"), "{e}");
    assert!(matches!(untouched.layer("fc1").unwrap().parameters()[0].1, Weight::Dense(_)));
    let none = Selection { include: vec!["fc1".into()], exclude: vec!["fc*".into()] };
    let e = quantize_model(&mut untouched, &int8, &none, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("matches no linear, convolution or embedding layer"), "{e}");
    let e = Selection { include: vec!["fc9*".into()], exclude: vec![] }.resolve(&untouched).unwrap_err();
    assert!(e.to_string().contains("unknown layer pattern `fc9*`"), "{e}");
    // Regular expressions after `re:` match whole paths.
    let re = Selection { include: vec!["re:conv[12]|fc1".into()], exclude: vec![] }.resolve(&untouched).unwrap();
    assert_eq!(re, ["conv1", "conv2", "fc1"]);
    let e = Selection { include: vec!["re:conv(".into()], exclude: vec![] }.resolve(&untouched).unwrap_err();
    assert!(e.to_string().contains("bad regular expression `conv(`"), "{e}");
    // And the quantized model round-trips through a file exactly.
    let qpath = dir.path().join("int8.safetensors");
    q.save(&qpath, &BTreeMap::new(), &[path.as_path()]).unwrap();
    let q2 = DigitsNet::load(&qpath, &dev).unwrap();
    assert_eq!(max_abs_diff(&q.forward(&data.test.x).unwrap(), &q2.forward(&data.test.x).unwrap()).unwrap(), 0.0);
    // Saving over the teacher, an input of this step, is refused.
    let e = q.save(&path, &BTreeMap::new(), &[path.as_path()]).unwrap_err();
    assert!(e.to_string().contains("refusing to overwrite input file"), "{e}");

    // INT8 static: per-channel weights and asymmetric activations calibrated (min-max) on 256
    // training images, within half a point of float; the activation scales reload with the file.
    let mut st = back.clone();
    quantize_model(&mut st, &int8, &Selection::default(), &mut |_| {}).unwrap();
    let paths = Selection::default().resolve(&st).unwrap();
    let calib = data.train.select(&(0..256).collect::<Vec<u32>>()).unwrap();
    let specs = calibrate(&paths, ObserverKind::MinMax, ActSpec { bits: 8, symmetric: false }, &mut |hooks| {
        for b in calib.batches(64)? {
            st.forward_hooked(&b.x, hooks)?;
        }
        Ok(calib.len())
    })
    .unwrap();
    apply(&mut st, &specs).unwrap();
    let st_acc = st.accuracy(&data.test).unwrap();
    assert!((st_acc - acc).abs() <= 0.005, "int8 static accuracy {st_acc} vs float {acc}");
    let spath = dir.path().join("int8-static.safetensors");
    st.save(&spath, &BTreeMap::new(), &[path.as_path()]).unwrap();
    let st2 = DigitsNet::load(&spath, &dev).unwrap();
    assert_eq!(st2.layer("conv2").unwrap().input_quant(), st.layer("conv2").unwrap().input_quant());
    assert_eq!(max_abs_diff(&st.forward(&data.test.x).unwrap(), &st2.forward(&data.test.x).unwrap()).unwrap(), 0.0);

    // A wrong shape is refused and the layer keeps its weight.
    let mut layer = q.layer_mut("fc2").unwrap();
    let e = layer.set_weight(Weight::Dense(candle_core::Tensor::zeros((3, 3), DType::F32, &dev).unwrap())).unwrap_err();
    assert!(e.to_string().contains("`fc2.weight`: expected shape [10, 64], found [3, 3]"), "{e}");
}

#[test]
fn the_split_is_stratified_seeded_and_disjoint() {
    let dev = Device::Cpu;
    let a = digits(7, &dev).unwrap();
    let b = digits(7, &dev).unwrap();
    assert_eq!(a.train.y.to_vec1::<u32>().unwrap(), b.train.y.to_vec1::<u32>().unwrap());
    assert_eq!(a.train.len() + a.validation.len() + a.test.len(), 1797);
    for split in [&a.train, &a.validation, &a.test] {
        let y = split.y.to_vec1::<u32>().unwrap();
        for c in 0..10 {
            let share = y.iter().filter(|v| **v == c).count() as f64 / y.len() as f64;
            assert!((0.08..0.12).contains(&share), "class {c} is {share:.3} of a split");
        }
    }
    // Disjoint: no image row appears in two splits.
    let rows = |e: &pare_core_tensor::data::Examples| -> std::collections::HashSet<Vec<u32>> {
        e.x.to_vec2::<f32>().unwrap().into_iter().map(|r| r.iter().map(|v| v.to_bits()).collect()).collect()
    };
    let (tr, te) = (rows(&a.train), rows(&a.test));
    // The UCI set has a handful of exact duplicate images; allow those, nothing more.
    assert!(tr.intersection(&te).count() <= 3);
    let c = digits(8, &dev).unwrap();
    assert_ne!(a.train.y.to_vec1::<u32>().unwrap(), c.train.y.to_vec1::<u32>().unwrap());
}
