use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use pare_core_tensor::ActRange;
use pare_models::digits::{DigitsArch, DigitsNet, MlpConfig};

use super::*;

fn mlp() -> DigitsNet {
    DigitsNet::init(DigitsArch::Mlp(MlpConfig { hidden: vec![16] }), 3, &Device::Cpu, &VarMap::new()).unwrap()
}

fn batch(seed: u32) -> Tensor {
    let v: Vec<f32> = (0..4 * 64).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 17) as f32 / 16.0).collect();
    Tensor::from_vec(v, (4, 64), &Device::Cpu).unwrap()
}

#[test]
fn static_calibration_stores_a_range_that_covers_what_min_max_saw() {
    let net = mlp();
    let paths: Vec<String> = net.layers().iter().map(|l| l.path().to_string()).collect();
    let spec = ActSpec { bits: 8, symmetric: false };
    let specs = calibrate(&paths, ObserverKind::MinMax, spec, &mut |hooks| {
        for s in 0..3 {
            net.forward_hooked(&batch(s), hooks)?;
        }
        Ok(12)
    })
    .unwrap();
    assert_eq!(specs.len(), paths.len());
    // The first layer's input is pixels in [0, 1]: scale 1/255, zero point 0.
    let first = &specs[&paths[0]];
    let ActRange::Static { scale, zero_point } = first.range else { panic!("static expected") };
    assert!((scale - 1.0 / 255.0).abs() < 1e-6 && zero_point == 0, "{first:?}");

    let mut q = net.clone();
    apply(&mut q, &specs).unwrap();
    let (a, b) = (net.forward(&batch(1)).unwrap(), q.forward(&batch(1)).unwrap());
    let d = pare_core_tensor::testing::max_abs_diff(&a, &b).unwrap();
    assert!(d > 0.0 && d < 0.05, "activation quantization changes logits a little: {d}");
}

#[test]
fn every_observer_runs_and_histogram_ones_take_two_passes() {
    let net = mlp();
    let paths = vec!["layers.0".to_string()];
    for kind in [
        ObserverKind::MinMax,
        ObserverKind::MovingAverage { momentum: 0.1 },
        ObserverKind::Percentile { pct: 99.0 },
        ObserverKind::Mse,
        ObserverKind::Entropy,
    ] {
        let mut calls = 0;
        let specs = calibrate(&paths, kind, ActSpec { bits: 8, symmetric: true }, &mut |hooks| {
            calls += 1;
            net.forward_hooked(&batch(9), hooks)?;
            Ok(4)
        })
        .unwrap();
        assert_eq!(calls, if kind.needs_histogram() { 2 } else { 1 }, "{kind}");
        assert!(matches!(specs["layers.0"].range, ActRange::Static { zero_point: 0, .. }));
    }
}

#[test]
fn an_empty_calibration_set_or_an_unreached_layer_is_an_error() {
    let net = mlp();
    let paths = vec!["layers.0".to_string()];
    let spec = ActSpec { bits: 8, symmetric: false };
    let e = calibrate(&paths, ObserverKind::MinMax, spec, &mut |_| Ok(0)).unwrap_err().to_string();
    assert!(e.contains("calibration set") && e.contains("found 0"), "{e}");
    let e = calibrate(&paths, ObserverKind::MinMax, spec, &mut |_| Ok(5)).unwrap_err().to_string();
    assert!(e.contains("`layers.0`") && e.contains("never reached"), "{e}");
    let bad = ActSpec { bits: 9, symmetric: false };
    assert!(calibrate(&paths, ObserverKind::MinMax, bad, &mut |_| Ok(5)).is_err());
    let _ = net;
}

#[test]
fn dynamic_specs_are_per_token_for_linear_layers() {
    let net = mlp();
    let paths: Vec<String> = net.layers().iter().map(|l| l.path().to_string()).collect();
    let specs = dynamic_specs(&net, &paths, ActSpec { bits: 8, symmetric: true }, true).unwrap();
    assert!(specs.values().all(|a| a.range == ActRange::Dynamic { per_token: true }));
    let mut q = net.clone();
    apply(&mut q, &specs).unwrap();
    let d = pare_core_tensor::testing::max_abs_diff(&net.forward(&batch(2)).unwrap(), &q.forward(&batch(2)).unwrap())
        .unwrap();
    assert!(d > 0.0 && d < 0.05, "{d}");
}
