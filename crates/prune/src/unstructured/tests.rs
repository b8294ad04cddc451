use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use pare_core_tensor::{Hooks, Module, Weight};
use pare_models::digits::DigitsNet;

use super::*;

fn net() -> DigitsNet {
    DigitsNet::init("mlp:32,16".parse().unwrap(), 4, &Device::Cpu, &VarMap::new()).unwrap()
}

/// Inputs whose features have very different scales (where Wanda's norms matter).
fn inputs() -> Tensor {
    let v: Vec<f32> = (0..256 * 64)
        .map(|i| (((i as u64).wrapping_mul(0x9E3779B97F4A7C15) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.4)
        .collect();
    let x = Tensor::from_vec(v, (256, 64), &Device::Cpu).unwrap();
    let s = Tensor::from_vec(
        (0..64).map(|j| if j % 9 == 0 { 8.0f32 } else { 0.3 }).collect::<Vec<_>>(),
        (1, 64),
        &Device::Cpu,
    )
    .unwrap();
    x.broadcast_mul(&s).unwrap()
}

fn paths(n: &DigitsNet) -> Vec<String> {
    pare_core_tensor::select::Selection::default().resolve(n).unwrap()
}

fn calib(n: &DigitsNet, x: &Tensor, c: Criterion) -> Calibration {
    Calibration::collect(&paths(n), c, &mut |h: &mut Hooks<'_>| {
        n.forward_hooked(x, h).map_err(pare_models::Error::into_core)?;
        Ok(x.dim(0)?)
    })
    .unwrap()
}

fn out_err(a: &DigitsNet, b: &DigitsNet, x: &Tensor) -> f32 {
    (a.forward(x).unwrap() - b.forward(x).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn every_criterion_prunes_exactly_and_the_calibrated_ones_beat_magnitude() {
    let (base, x) = (net(), inputs());
    let ps = paths(&base);
    let mut errs = Vec::new();
    for c in
        [Criterion::Magnitude, Criterion::Random { seed: 3 }, Criterion::Wanda, Criterion::SparseGpt { damp: 0.01 }]
    {
        let cal = calib(&base, &x, c);
        let mut m = base.clone();
        let p = prune(&mut m, &ps, c, Pattern::Unstructured { sparsity: 0.5, global: None }, Some(&cal)).unwrap();
        for s in &p.stats {
            assert_eq!(s.pruned, count_of(0.5, s.params), "{c:?} {}", s.path);
            let zeros = m.layer(&s.path).unwrap().parameters()[0]
                .1
                .to_dense(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .filter(|v| **v == 0.0)
                .count();
            assert!(zeros >= s.pruned);
        }
        errs.push(out_err(&base, &m, &x));
    }
    let (mag, rnd, wanda, gpt) = (errs[0], errs[1], errs[2], errs[3]);
    assert!(mag < rnd && wanda < mag && gpt < mag, "magnitude {mag}, random {rnd}, wanda {wanda}, sparsegpt {gpt}");
}

fn count_of(s: f64, n: usize) -> usize {
    crate::select::count(s, n)
}

#[test]
fn global_nm_and_storage_keep_the_masks() {
    let base = net();
    let ps = paths(&base);
    let mut g = base.clone();
    let p = prune(
        &mut g,
        &ps,
        Criterion::Magnitude,
        Pattern::Unstructured { sparsity: 0.8, global: Some(Bounds { min: 0.5, max: 0.95 }) },
        None,
    )
    .unwrap();
    let total: usize = p.stats.iter().map(|s| s.params).sum();
    assert_eq!(p.stats.iter().map(|s| s.pruned).sum::<usize>(), count_of(0.8, total));
    assert!(p.stats.iter().all(|s| s.sparsity() >= 0.5 && s.sparsity() <= 0.95));
    let formats = store_sparse(&mut g, &p, Pattern::Unstructured { sparsity: 0.8, global: None }).unwrap();
    assert!(formats.iter().all(|(_, f)| f.contains("csr")), "{formats:?}");
    let mut nm = base.clone();
    let pat = Pattern::Nm { n: 2, m: 4 };
    let p = prune(&mut nm, &ps, Criterion::Magnitude, pat, None).unwrap();
    let x = inputs();
    let dense_out = nm.forward(&x).unwrap();
    store_sparse(&mut nm, &p, pat).unwrap();
    assert!(matches!(nm.layer(&ps[0]).unwrap().parameters()[0].1, Weight::Sparse(_)));
    let d =
        (dense_out - nm.forward(&x).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-5, "N:M storage changes the outputs by {d}");
}

#[test]
fn bad_requests_fail_before_anything_changes() {
    let base = net();
    let ps = paths(&base);
    let un = |s| Pattern::Unstructured { sparsity: s, global: None };
    let mut m = base.clone();
    let err = |r: Result<Pruned>| r.unwrap_err().to_string();
    assert!(err(prune(&mut m, &ps, Criterion::Magnitude, un(1.0), None)).contains("[0, 1)"));
    assert!(err(prune(&mut m, &ps, Criterion::Wanda, un(0.5), None)).contains("calibration"));
    assert!(
        err(prune(
            &mut m,
            &ps,
            Criterion::Wanda,
            Pattern::Unstructured { sparsity: 0.5, global: Some(Bounds::default()) },
            None
        ))
        .contains("--global")
    );
    assert!(
        err(prune(&mut m, &ps, Criterion::Magnitude, Pattern::Nm { n: 2, m: 3 }, None)).contains("groups of M = 3")
    );
    assert!(err(prune(&mut m, &ps, Criterion::Magnitude, Pattern::Nm { n: 4, m: 4 }, None)).contains("0 < N < M"));
    assert!(err(prune(&mut m, &[], Criterion::Magnitude, un(0.5), None)).contains("no layer"));
    // A calibration set too small for the Hessian of a 64-input layer.
    let tiny = inputs().narrow(0, 0, 10).unwrap();
    let cal = calib(&base, &tiny, Criterion::SparseGpt { damp: 0.01 });
    assert!(
        err(prune(&mut m, &ps, Criterion::SparseGpt { damp: 0.01 }, un(0.5), Some(&cal)))
            .contains("at least 64 calibration rows")
    );
    let vals = |n: &DigitsNet| -> Vec<Vec<f32>> {
        n.named_weights()
            .values()
            .map(|w| w.to_dense(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    assert_eq!(vals(&m), vals(&base), "nothing changed");
}
