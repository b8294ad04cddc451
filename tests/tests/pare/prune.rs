//! Pruning on real data through pare-prune's library API: the digits MLP pruned gradually to
//! 90% during fine-tuning, the CNN losing half its channels, MiniLM pruned by magnitude, Wanda
//! and SparseGPT, and a head-pruned MiniLM folder that loads and embeds like the original.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Device;
use candle_nn::VarMap;
use pare_core_tensor::data::{digits, sentences};
use pare_core_tensor::metrics::{MacCounter, mean_cosine};
use pare_core_tensor::select::Selection;
use pare_core_tensor::train::{LrSchedule, OptimizerKind, TrainConfig, train};
use pare_core_tensor::{Hooks, LoadedWeights, Module, ReferenceRuntime, Runtime, Weight};
use pare_models::bert::SentenceEncoder;
use pare_models::digits::{DigitsArch, DigitsNet, Supervised, fit};
use pare_prune::structured::{Importance, Structured, Unit, importance, prune_units};
use pare_prune::{Calibration, Criterion, Cubic, MaskedTask, Pattern};
use pare_runtime_cpu::CpuRuntime;
use pare_tests::{minilm_dir, workspace_root};

fn cfg(epochs: usize, lr: f64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        optimizer: OptimizerKind::adamw(lr),
        schedule: LrSchedule::Cosine { warmup_steps: 0, min_factor: 0.05 },
        seed: 7,
        patience: None,
        checkpoint: None,
    }
}

fn teacher(arch: &str, epochs: usize) -> DigitsNet {
    let data = digits(42, &Device::Cpu).unwrap();
    let vars = VarMap::new();
    let net = DigitsNet::init(arch.parse::<DigitsArch>().unwrap(), 7, &Device::Cpu, &vars).unwrap();
    fit(&net, &vars, &data, &cfg(epochs, 3e-3), &mut |_| {}).unwrap();
    net
}

/// The same network with its weights as fresh trainable variables.
fn trainable(net: &DigitsNet) -> (DigitsNet, VarMap) {
    let vars = VarMap::new();
    let t = DigitsNet::build(
        net.arch().clone(),
        &mut LoadedWeights::trainable(net.named_weights(), Device::Cpu, vars.clone()),
    )
    .unwrap();
    (t, vars)
}

#[test]
fn digits_mlp_pruned_gradually_to_90_percent_loses_at_most_a_point() {
    let data = digits(42, &Device::Cpu).unwrap();
    let net = teacher("mlp:128,64", 30);
    let before = net.accuracy(&data.test).unwrap();
    let (tuned, vars) = trainable(&net);
    let paths = Selection::default().resolve(&tuned).unwrap();
    // Masks start empty (everything kept) and grow by magnitude on the cubic schedule.
    let masks: BTreeMap<String, Vec<bool>> = paths
        .iter()
        .map(|p| (format!("{p}.weight"), vec![true; tuned.layer(p).unwrap().parameters()[0].1.numel()]))
        .collect();
    let c = cfg(30, 1e-3);
    let steps = c.epochs * data.train.len().div_ceil(c.batch_size);
    let mut inner = Supervised::new(&tuned, &data);
    let mut task = MaskedTask::new(&mut inner, &vars, &masks).unwrap().gradual(Cubic::over(steps, 10, 0.9).unwrap());
    train(&mut task, &vars, data.train.len(), &c, &mut |_| {}).unwrap();
    let masks = task.masks().unwrap();
    for (name, keep) in &masks {
        let pruned = keep.iter().filter(|k| !**k).count();
        assert_eq!(pruned, (0.9 * keep.len() as f64).round() as usize, "{name}: exact sparsity");
    }
    let after = tuned.accuracy(&data.test).unwrap();
    eprintln!("digits MLP: test accuracy {before:.4} dense → {after:.4} at 90% sparsity");
    assert!(after >= before - 0.01, "lost {:.2} points", 100.0 * (before - after));
    // Stored as CSR, it runs on the CPU runtime's sparse kernel and agrees with the reference.
    let mut sparse = tuned.clone();
    let pruned = pare_prune::plan(
        &tuned,
        &paths,
        Criterion::Magnitude,
        Pattern::Unstructured { sparsity: 0.9, global: None },
        None,
    )
    .unwrap();
    pare_prune::store_sparse(&mut sparse, &pruned, Pattern::Unstructured { sparsity: 0.9, global: None }).unwrap();
    assert!(sparse.storage_bytes() * 3 < net.storage_bytes(), "CSR at 10% density is far smaller");
    let (reference, cpu): (Arc<dyn Runtime>, Arc<dyn Runtime>) =
        (ReferenceRuntime::shared(Device::Cpu), Arc::new(CpuRuntime::new(2).unwrap()));
    let (mut a, mut b) = (sparse.clone(), sparse);
    a.prepare(&reference).unwrap();
    b.prepare(&cpu).unwrap();
    let d = (a.forward(&data.test.x).unwrap() - b.forward(&data.test.x).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "sparse kernel vs reference: {d}");
}

/// Per-layer targets (recipes' prune overrides): each layer follows the cubic schedule scaled
/// to its own final sparsity, and ends at it exactly.
#[test]
fn gradual_pruning_takes_each_layer_to_its_own_target() {
    let data = digits(42, &Device::Cpu).unwrap();
    let net = teacher("mlp:64,32", 4);
    let (tuned, vars) = trainable(&net);
    let masks: BTreeMap<String, Vec<bool>> = ["layers.0.weight", "layers.1.weight"]
        .iter()
        .map(|p| (p.to_string(), vec![true; tuned.named_weights()[*p].numel()]))
        .collect();
    let targets = BTreeMap::from([("layers.0.weight".to_string(), 0.8), ("layers.1.weight".to_string(), 0.4)]);
    let c = cfg(3, 1e-3);
    let steps = c.epochs * data.train.len().div_ceil(c.batch_size);
    let mut inner = Supervised::new(&tuned, &data);
    let mut task = MaskedTask::new(&mut inner, &vars, &masks)
        .unwrap()
        .gradual(Cubic::over(steps, 4, 0.8).unwrap())
        .with_targets(&targets)
        .unwrap();
    train(&mut task, &vars, data.train.len(), &c, &mut |_| {}).unwrap();
    for (name, keep) in task.masks().unwrap() {
        let pruned = keep.iter().filter(|k| !**k).count();
        assert_eq!(pruned, (targets[&name] * keep.len() as f64).round() as usize, "{name}: exact sparsity");
    }
    let bad = BTreeMap::from([("layers.9.weight".to_string(), 0.5)]);
    let mut inner = Supervised::new(&tuned, &data);
    let e = MaskedTask::new(&mut inner, &vars, &masks).unwrap().with_targets(&bad).err().unwrap().to_string();
    assert!(e.contains("layers.9.weight") && e.contains("layers.0.weight"), "{e}");
}

#[test]
fn half_the_cnn_channels_halve_the_model_and_cost_at_most_1_5_points() {
    let data = digits(42, &Device::Cpu).unwrap();
    let net = teacher("cnn:16,32:64", 12);
    let before = net.accuracy(&data.test).unwrap();
    let groups = net.groups(Unit::Channels).unwrap();
    let scores = importance(&net, &groups, Importance::L2, None, None).unwrap();
    let (small, stats) = prune_units(&net, Unit::Channels, 0.5, &scores).unwrap();
    assert!(stats.iter().all(|s| s.kept * 2 == s.before));
    let (tuned, vars) = trainable(&small);
    fit(&tuned, &vars, &data, &cfg(12, 1e-3), &mut |_| {}).unwrap();
    let after = tuned.accuracy(&data.test).unwrap();
    let macs = |n: &DigitsNet| {
        let mut m = MacCounter::default();
        n.forward_hooked(&data.test.x.narrow(0, 0, 1).unwrap(), &mut Hooks::with(&mut m)).unwrap();
        m.total()
    };
    eprintln!(
        "digits CNN: {} → {} parameters, {} → {} MACs, accuracy {before:.4} → {after:.4}",
        net.parameter_count(),
        tuned.parameter_count(),
        macs(&net),
        macs(&tuned)
    );
    assert!(tuned.parameter_count() * 100 <= net.parameter_count() * 55, "about half the parameters");
    assert!(macs(&tuned) * 2 <= macs(&net), "at most half the MACs");
    assert!(after >= before - 0.015, "lost {:.2} points", 100.0 * (before - after));
}

#[test]
fn wanda_and_sparsegpt_keep_minilm_closer_than_magnitude() -> anyhow::Result<()> {
    let Some(dir) = minilm_dir("prune::wanda_and_sparsegpt_keep_minilm_closer_than_magnitude")? else { return Ok(()) };
    let text = sentences(workspace_root().join("data/sentences.txt"))?;
    let (calib, eval) = (&text[..128], &text[text.len() / 2..text.len() / 2 + 256]);
    let float = SentenceEncoder::load(&dir, &Device::Cpu)?;
    let want = float.embed(eval, 32, &mut |_| {})?;
    // The first two layers (SparseGPT on all six takes a minute; the report has them all).
    let sel = Selection { include: vec!["re:encoder\\.layer\\.[01]\\..*".into()], exclude: Vec::new() };
    let paths = sel.resolve(&float.bert)?;
    let mut cos = BTreeMap::new();
    for (name, c) in [
        ("magnitude", Criterion::Magnitude),
        ("wanda", Criterion::Wanda),
        ("sparsegpt", Criterion::SparseGpt { damp: 0.01 }),
    ] {
        // One calibration per criterion serves both patterns.
        let cal = Calibration::collect(&paths, c, &mut |h| {
            float.embed_hooked(calib, 32, h, &mut |_| {}).map_err(pare_models::Error::into_core)?;
            Ok(calib.len())
        })?;
        for (pname, pattern) in
            [("50%", Pattern::Unstructured { sparsity: 0.5, global: None }), ("2:4", Pattern::Nm { n: 2, m: 4 })]
        {
            let mut e = float.clone();
            let p = pare_prune::prune(&mut e.bert, &paths, c, pattern, Some(&cal))?;
            assert!((p.sparsity() - 0.5).abs() < 1e-9, "{name} {pname}: {}", p.sparsity());
            pare_prune::store_sparse(&mut e.bert, &p, pattern)?;
            cos.insert((pname, name), mean_cosine(&want, &e.embed(eval, 32, &mut |_| {})?)?);
        }
    }
    eprintln!("MiniLM layers 0–1 pruned, mean cosine: {cos:?}");
    for p in ["50%", "2:4"] {
        assert!(
            cos[&(p, "wanda")] > cos[&(p, "magnitude")] && cos[&(p, "sparsegpt")] > cos[&(p, "magnitude")],
            "{p}: {cos:?}"
        );
    }
    Ok(())
}

#[test]
fn a_head_pruned_minilm_folder_loads_and_embeds_like_the_pruned_model() -> anyhow::Result<()> {
    let Some(dir) = minilm_dir("prune::a_head_pruned_minilm_folder_loads_and_embeds_like_the_pruned_model")? else {
        return Ok(());
    };
    let text = sentences(workspace_root().join("data/sentences.txt"))?;
    let float = SentenceEncoder::load(&dir, &Device::Cpu)?;
    let groups = float.bert.groups(Unit::Heads)?;
    let scores = importance(&float.bert, &groups, Importance::L2, None, None)?;
    let mut small = float.clone();
    small.bert = prune_units(&float.bert, Unit::Heads, 0.25, &scores)?.0;
    let ffn = small.bert.groups(Unit::Neurons)?;
    let scores = importance(&small.bert, &ffn, Importance::L2, None, None)?;
    small.bert = prune_units(&small.bert, Unit::Neurons, 0.25, &scores)?.0;
    let out = tempfile::tempdir()?;
    small.bert.save_folder(&dir, out.path(), &BTreeMap::new())?;
    let back = SentenceEncoder::load(out.path(), &Device::Cpu)?;
    assert_eq!(back.bert.config().heads_per_layer, Some(vec![9; 6]));
    assert_eq!(back.bert.config().intermediate_per_layer, Some(vec![1152; 6]));
    assert!(back.bert.parameter_count() < float.bert.parameter_count());
    let batch = &text[..64];
    let d = pare_core_tensor::testing::max_abs_diff(
        &small.embed(batch, 32, &mut |_| {})?,
        &back.embed(batch, 32, &mut |_| {})?,
    )?;
    assert_eq!(d, 0.0, "the saved folder computes the pruned model's embeddings");
    let cos = mean_cosine(&float.embed(batch, 32, &mut |_| {})?, &back.embed(batch, 32, &mut |_| {})?)?;
    eprintln!("MiniLM with 25% of heads and FFN neurons removed: mean cosine {cos:.4}");
    assert!(cos > 0.5, "{cos}");
    // The original config is untouched; weights of the pruned model are dense and smaller.
    assert!(back.bert.named_weights().values().all(|w| matches!(w, Weight::Dense(_))));
    Ok(())
}
