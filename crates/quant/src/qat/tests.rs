use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use pare_core_tensor::testing::max_abs_diff;
use pare_models::digits::{DigitsArch, DigitsNet, MlpConfig};

use super::*;
use crate::observer::ObserverKind;
use crate::ptq::{ActSpec, apply, calibrate};

fn batch(seed: u32, n: usize) -> Tensor {
    let v: Vec<f32> = (0..n * 64).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 17) as f32 / 16.0).collect();
    Tensor::from_vec(v, (n, 64), &Device::Cpu).unwrap()
}

fn trainable_mlp(vars: &VarMap) -> DigitsNet {
    DigitsNet::init(DigitsArch::Mlp(MlpConfig { hidden: vec![24] }), 7, &Device::Cpu, vars).unwrap()
}

#[test]
fn the_straight_through_gradient_of_the_step_is_lsqs() {
    // x / s = [0.3, 1.7, 9.0, -9.0] at s = 0.5 with codes in [-4, 3]: the first two round, the
    // last two clip. LSQ: ∂x̂/∂s = round(v) − v inside the range, q_max or q_min outside; the
    // log parameterisation multiplies by s.
    let dev = Device::Cpu;
    let x = Var::new(&[0.15f32, 0.85, 4.5, -4.5], &dev).unwrap();
    let t = Var::new(&[0.5f32.ln()], &dev).unwrap();
    let y = fake_quant(x.as_tensor(), &t, 0.0, -4.0, 3.0).unwrap();
    assert_eq!(y.to_vec1::<f32>().unwrap(), [0.0, 1.0, 1.5, -2.0]);
    let grads = y.sum_all().unwrap().backward().unwrap();
    let gs = grads.get(&t).unwrap().to_vec1::<f32>().unwrap()[0];
    let lsq = (0.0 - 0.3) + (2.0 - 1.7) + 3.0 + -4.0;
    assert!((gs - 0.5 * lsq).abs() < 1e-5, "{gs} vs {}", 0.5 * lsq);
    // The input's gradient passes straight through inside the range and stops outside.
    assert_eq!(grads.get(&x).unwrap().to_vec1::<f32>().unwrap(), [1.0, 1.0, 0.0, 0.0]);
}

#[test]
fn the_mse_step_never_loses_to_absmax() {
    let row: Vec<f32> =
        (0..64).map(|i| ((i * 37 % 64) as f32 - 32.0) / 10.0 + if i == 5 { 20.0 } else { 0.0 }).collect();
    let err = |s: f32| -> f32 { row.iter().map(|v| (v - s * (v / s).clamp(-2.0, 1.0).round()).powi(2)).sum() };
    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = mse_step(&row, -2.0, 1.0);
    assert!(err(s) <= err(amax / 2.0), "{} > {}", err(s), err(amax / 2.0));
    assert_eq!(mse_step(&[0.0; 8], -2.0, 1.0), 1.0);
}

#[test]
fn conversion_computes_what_training_computed() {
    let vars = VarMap::new();
    let mut net = trainable_mlp(&vars);
    let paths: Vec<String> = vec!["layers.0".into(), "layers.1".into()];
    let specs = calibrate(&paths, ObserverKind::MinMax, ActSpec { bits: 4, symmetric: false }, &mut |hooks| {
        net.forward_hooked(&batch(1, 32), hooks)?;
        Ok(32)
    })
    .unwrap();
    apply(&mut net, &specs).unwrap();
    let rt = prepare(&mut net, &vars, QatConfig { bits: 3, per_channel: true }, &paths).unwrap();
    assert_eq!(vars.all_vars().len(), 4 + 4, "two weights, two biases, two weight steps, two input steps");

    // One gradient step moves the steps away from their initial values.
    let x = batch(2, 16);
    let loss = net.forward(&x).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in vars.data().lock().unwrap().iter() {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        v.set(&(v.as_tensor() - (g * 0.05).unwrap()).unwrap()).unwrap();
    }
    let trained = net.forward(&x).unwrap();

    let reference: Arc<dyn Runtime> = ReferenceRuntime::shared(Device::Cpu);
    let reports = convert(&mut net, &rt, &reference).unwrap();
    assert_eq!(reports.len(), 2);
    for r in &reports {
        assert!(r.format.contains("int3"), "{}", r.format);
    }
    let l0 = net.layer("layers.0").unwrap();
    let Weight::Quantized(q) = &l0.parameters()[0].1 else { panic!("quantized weight expected") };
    assert_eq!(q.scales(), rt.weight_steps("layers.0").unwrap());
    let Some(ActQuant { range: ActRange::Static { scale, .. }, .. }) = l0.input_quant() else { panic!("static") };
    assert_eq!(scale, rt.input_step_value("layers.0").unwrap().unwrap());
    let converted = net.forward(&x).unwrap();
    let d = max_abs_diff(&trained, &converted).unwrap();
    assert!(d < 1e-4, "converted model differs from the QAT model by {d}");
}

#[test]
fn bad_qat_options_are_refused_before_the_model_changes() {
    let vars = VarMap::new();
    let mut net = trainable_mlp(&vars);
    let e = prepare(&mut net, &vars, QatConfig { bits: 9, per_channel: true }, &["layers.0".into()]).unwrap_err();
    assert!(e.to_string().contains("bits must be 2..=8, found 9"), "{e}");
    let e = prepare(&mut net, &vars, QatConfig { bits: 4, per_channel: false }, &["layers.7".into()]).unwrap_err();
    assert!(e.to_string().contains("layers.7"), "{e}");
    let dynamic = crate::ptq::dynamic_specs(&net, &["layers.0".into()], ActSpec { bits: 8, symmetric: true }, true);
    apply(&mut net, &dynamic.unwrap()).unwrap();
    let e = prepare(&mut net, &vars, QatConfig { bits: 4, per_channel: false }, &["layers.0".into()]).unwrap_err();
    assert!(e.to_string().contains("expected a static unsmoothed spec"), "{e}");
    let pare_core_tensor::LayerRef::Linear(l) = net.layer("layers.0").unwrap() else { panic!("linear") };
    assert_eq!(l.runtime().name(), "reference");
    assert_eq!(vars.all_vars().len(), 4, "no step was registered");
}
