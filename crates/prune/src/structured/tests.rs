use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use pare_core_tensor::{Hooks, LoadedWeights, Module, Weight};
use pare_models::bert::{BertConfig, BertEncoder};
use pare_models::digits::{DigitsArch, DigitsNet};

use super::*;

/// `model`'s weights with `edit(name, values)` applied to each, as a name → weight map.
fn edited(model: &dyn Module, mut edit: impl FnMut(&str, &[usize], &mut Vec<f32>)) -> BTreeMap<String, Weight> {
    model
        .named_weights()
        .into_iter()
        .map(|(n, w)| {
            let Weight::Dense(t) = w else { panic!("dense") };
            let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            edit(&n, t.dims(), &mut v);
            (n, Weight::Dense(Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()))
        })
        .collect()
}

/// Zeroes, along `axis` of a tensor of `shape`, the indices `lo..hi`.
fn zero(shape: &[usize], v: &mut [f32], axis: usize, lo: usize, hi: usize) {
    let inner: usize = shape[axis + 1..].iter().product();
    for (i, x) in v.iter_mut().enumerate() {
        if (lo..hi).contains(&(i / inner % shape[axis])) {
            *x = 0.0;
        }
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Scores that make exactly `dead` the lowest units of each group.
fn scores_for(groups: &[Group], dead: &[usize]) -> Vec<Vec<f32>> {
    groups
        .iter()
        .map(|g| (0..g.units).map(|u| if dead.contains(&u) { 0.0 } else { 1.0 + u as f32 }).collect())
        .collect()
}

#[test]
fn removing_dead_mlp_neurons_and_cnn_channels_changes_no_output() {
    let x = Tensor::randn(0f32, 1.0, (7, 64), &Device::Cpu).unwrap();
    // Groups of one width each, so one sparsity removes the same two units from every group.
    for (spec, unit) in [("mlp:12,12", Unit::Neurons), ("cnn:6,6:10", Unit::Channels), ("cnn:6,6:10", Unit::Neurons)] {
        let arch: DigitsArch = spec.parse().unwrap();
        let net = DigitsNet::init(arch.clone(), 3, &Device::Cpu, &VarMap::new()).unwrap();
        let groups = net.groups(unit).unwrap();
        // Units 1 and 2 of every group produce nothing: their incoming weights and bias are 0.
        let w = edited(&net, |n, s, v| {
            for g in &groups {
                for m in g.members.iter().filter(|m| m.axis == 0 && m.param == n) {
                    zero(s, v, 0, m.block, 3 * m.block);
                }
            }
        });
        let net = DigitsNet::build(arch, &mut LoadedWeights::new(w, Device::Cpu)).unwrap();
        let half = 2.0 / groups.iter().map(|g| g.units).min().unwrap() as f64;
        let (small, stats) = prune_units(&net, unit, half, &scores_for(&groups, &[1, 2])).unwrap();
        assert!(stats.iter().all(|s| s.removed == vec![1, 2]), "{spec}: {stats:?}");
        assert!(small.parameter_count() < net.parameter_count());
        let d = max_diff(&net.forward(&x).unwrap(), &small.forward(&x).unwrap());
        assert!(d < 1e-5, "{spec} {unit:?}: outputs differ by {d}");
    }
}

fn tiny_bert() -> BertEncoder {
    let cfg: BertConfig = serde_json::from_str(
        r#"{"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 4,
            "intermediate_size": 24, "hidden_act": "gelu", "max_position_embeddings": 16}"#,
    )
    .unwrap();
    BertEncoder::build(cfg, &mut pare_core_tensor::InitWeights::new(5, Device::Cpu, VarMap::new())).unwrap()
}

fn run(b: &BertEncoder) -> Tensor {
    let ids =
        Tensor::from_vec((0..2 * 9).map(|i| (i * 7 % 40) as u32).collect::<Vec<_>>(), (2, 9), &Device::Cpu).unwrap();
    let mask = Tensor::ones((2, 9), DType::U32, &Device::Cpu).unwrap();
    b.forward_hooked(&ids, None, &mask, &mut Hooks::none()).unwrap()
}

#[test]
fn removing_dead_heads_and_ffn_neurons_changes_no_output() {
    let bert = tiny_bert();
    // Head 1 of every layer has zero values (its context is 0); FFN neurons 0 and 5 have zero
    // input weights and bias (GELU(0) = 0).
    let w = edited(&bert, |n, s, v| {
        if n.ends_with("attention.self.value.weight") || n.ends_with("attention.self.value.bias") {
            zero(s, v, 0, 4, 8);
        }
        if n.ends_with("intermediate.dense.weight") || n.ends_with("intermediate.dense.bias") {
            zero(s, v, 0, 0, 1);
            zero(s, v, 0, 5, 6);
        }
    });
    let bert = BertEncoder::build(bert.config().clone(), &mut LoadedWeights::new(w, Device::Cpu)).unwrap();
    let want = run(&bert);
    let heads = bert.groups(Unit::Heads).unwrap();
    let (fewer, _) = prune_units(&bert, Unit::Heads, 0.25, &scores_for(&heads, &[1])).unwrap();
    assert_eq!(fewer.config().heads_per_layer, Some(vec![3, 3, 3]));
    assert!(max_diff(&want, &run(&fewer)) < 1e-5);
    let ffn = fewer.groups(Unit::Neurons).unwrap();
    let (slim, stats) = prune_units(&fewer, Unit::Neurons, 2.0 / 24.0, &scores_for(&ffn, &[0, 5])).unwrap();
    assert!(stats.iter().all(|s| s.removed == vec![0, 5]));
    assert_eq!(slim.config().intermediate_per_layer, Some(vec![22, 22, 22]));
    assert!(max_diff(&want, &run(&slim)) < 1e-5);
    // Dropping a layer renumbers the rest and keeps the per-layer sizes in step.
    let two = drop_layers(&slim, &[1]).unwrap();
    assert_eq!(two.config().num_hidden_layers, 2);
    assert_eq!(two.config().heads_per_layer, Some(vec![3, 3]));
    assert!(two.named_weights().keys().all(|k| !k.starts_with("encoder.layer.2.")));
}

#[test]
fn impossible_structured_requests_are_errors() {
    let net = DigitsNet::init("mlp:4".parse().unwrap(), 1, &Device::Cpu, &VarMap::new()).unwrap();
    let g = net.groups(Unit::Neurons).unwrap();
    let e = prune_units(&net, Unit::Neurons, 0.9, &scores_for(&g, &[])).unwrap_err().to_string();
    assert!(e.contains("all 4 units"), "{e}");
    assert!(net.groups(Unit::Channels).unwrap_err().to_string().contains("MLP"));
    assert!(tiny_bert().groups(Unit::Channels).is_err());
    assert!(drop_layers(&tiny_bert(), &[0, 1, 2]).unwrap_err().to_string().contains("at least one"));
    assert!(drop_layers(&tiny_bert(), &[7]).unwrap_err().to_string().contains("0..3"));
}

#[test]
fn norms_rank_units_and_taylor_needs_gradients() {
    let net = DigitsNet::init("mlp:6".parse().unwrap(), 2, &Device::Cpu, &VarMap::new()).unwrap();
    let groups = net.groups(Unit::Neurons).unwrap();
    let l1 = importance(&net, &groups, Importance::L1, None, None).unwrap();
    let l2 = importance(&net, &groups, Importance::L2, None, None).unwrap();
    assert_eq!(l1[0].len(), 6);
    assert!(l1[0].iter().zip(&l2[0]).all(|(a, b)| a >= b && *b > 0.0), "L1 ≥ L2 of the same slices");
    assert!(importance(&net, &groups, Importance::Taylor, None, None).is_err());
    assert!(importance(&net, &groups, Importance::Activation, None, None).is_err());
}

proptest::proptest! {
    /// The slice of indices `lo..hi` along `axis` is exactly the values whose index along that
    /// axis falls in the range, in storage order (the definition, checked element by element).
    #[test]
    fn slice_values_visits_exactly_the_unit_in_storage_order(
        shape in proptest::collection::vec(1usize..5, 1..5),
        axis_pick in 0usize..4,
        a in 0usize..5,
        b in 0usize..5,
    ) {
        let axis = axis_pick % shape.len();
        let (a, b) = (a % (shape[axis] + 1), b % (shape[axis] + 1));
        let (lo, hi) = (a.min(b), a.max(b));
        let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|i| i as f32).collect();
        let inner: usize = shape[axis + 1..].iter().product();
        let want: Vec<f32> =
            v.iter().enumerate().filter(|(i, _)| (lo..hi).contains(&(i / inner % shape[axis]))).map(|(_, x)| *x).collect();
        let got: Vec<f32> = slice_values(&shape, &v, axis, lo, hi).collect();
        proptest::prop_assert_eq!(got, want);
    }
}
