//! Knowledge distillation on real data through pare-distill's library API: a digits CNN
//! teacher distilled into an MLP with ≥ 10× fewer parameters (soft targets, and FitNets hints
//! through layer taps), bit-identical resume after an interruption mid-epoch, bad input refused
//! before training, and MiniLM distilled into a 3-layer student made of every other layer.

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use pare_core_tensor::data::{DigitsSplit, digits, sentences};
use pare_core_tensor::train::{LrSchedule, OptimizerKind, TrainConfig, TrainTask, train};
use pare_core_tensor::{Error, Module};
use pare_distill::digits::{FeatureLoss, agreement};
use pare_distill::encoder::mean_cosine_to;
use pare_distill::{
    DigitsDistill, EncoderDistill, EncoderSettings, FeatureMap, Settings, every_other_layer, split_sentences,
    teacher_logits,
};
use pare_models::bert::SentenceEncoder;
use pare_models::digits::{DigitsArch, DigitsNet, fit};
use pare_tests::{minilm_dir, workspace_root};

fn cfg(epochs: usize, lr: f64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        optimizer: OptimizerKind::adamw(lr),
        schedule: LrSchedule::Cosine { warmup_steps: 20, min_factor: 0.02 },
        seed: 7,
        patience: None,
        checkpoint: None,
    }
}

fn teacher(data: &DigitsSplit) -> DigitsNet {
    let vars = VarMap::new();
    let net = DigitsNet::init(DigitsArch::default_cnn(), 7, &Device::Cpu, &vars).unwrap();
    fit(&net, &vars, data, &cfg(12, 3e-3), &mut |_| {}).unwrap();
    net
}

fn student(seed: u64) -> (DigitsNet, VarMap) {
    student_of("mlp:32", seed)
}

fn student_of(arch: &str, seed: u64) -> (DigitsNet, VarMap) {
    let vars = VarMap::new();
    let net = DigitsNet::init(arch.parse().unwrap(), seed, &Device::Cpu, &vars).unwrap();
    (net, vars)
}

fn weights(net: &DigitsNet) -> Vec<Vec<f32>> {
    net.named_weights()
        .values()
        .map(|w| w.to_dense(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn a_digits_mlp_with_10x_fewer_parameters_learns_the_cnn_teacher() {
    let data = digits(42, &Device::Cpu).unwrap();
    let t = teacher(&data);
    let logits = teacher_logits(&t, &data.train).unwrap();
    assert_eq!(logits.dims(), &[data.train.len(), 10]);
    let runs = [
        ("mlp:32", "", FeatureLoss::Hint, 0),
        ("mlp:32", "layers.0=fc1", FeatureLoss::Hint, 2),
        ("cnn:4,8:16", "conv2=conv2", FeatureLoss::Attention, 0),
    ];
    for (arch, features, feature_loss, projections_wanted) in runs {
        let (s, vars) = student_of(arch, 3);
        assert!(t.parameter_count() >= 10 * s.parameter_count(), "{} vs {}", t.parameter_count(), s.parameter_count());
        let map: FeatureMap = features.parse().unwrap();
        let settings = Settings { temperature: 2.0, alpha: 0.5, feature_weight: 0.1, feature_loss };
        let mut task = DigitsDistill::new(&s, &t, &data, logits.clone(), &map, settings, &vars, 3).unwrap();
        let first = f64::from(task.loss(&(0..64).collect::<Vec<u32>>()).unwrap().to_scalar::<f32>().unwrap());
        let report = train(&mut task, &vars, data.train.len(), &cfg(30, 3e-3), &mut |_| {}).unwrap();
        // The hint's projection (student width 32 → the teacher's fc1 width 64) trains with the student.
        let projections = vars.data().lock().unwrap().keys().filter(|k| k.starts_with("distill.hint")).count();
        assert_eq!(projections, projections_wanted, "{arch} `{features}`");
        let last = report.history.last().unwrap().train_loss;
        let (sa, ta) = (s.accuracy(&data.test).unwrap(), t.accuracy(&data.test).unwrap());
        let agree = agreement(&t, &s, &data.test).unwrap();
        eprintln!(
            "{arch} `{features}` {feature_loss:?}: loss {first:.3} → {last:.3}; student test accuracy {sa:.4} (teacher {ta:.4}), agreement {agree:.4}"
        );
        assert!(last < first / 3.0, "the distillation loss fell only from {first} to {last}");
        assert!(sa >= 0.95, "student test accuracy {sa}");
        assert!(agree >= 0.95, "student agrees with the teacher on only {agree} of the test digits");
    }
}

/// A task that fails (as a killed process would stop) at optimiser step `k`.
struct Interrupted<'a> {
    inner: DigitsDistill<'a>,
    steps: usize,
    k: usize,
}

impl TrainTask for Interrupted<'_> {
    fn loss(&mut self, batch: &[u32]) -> pare_core_tensor::Result<Tensor> {
        self.steps += 1;
        if self.steps == self.k {
            return Err(Error::invalid("run", format!("interrupted at step {}", self.k)));
        }
        self.inner.loss(batch)
    }
    fn evaluate(&mut self) -> pare_core_tensor::Result<f64> {
        self.inner.evaluate()
    }
}

#[test]
fn a_run_interrupted_mid_epoch_and_resumed_ends_with_the_same_weights() {
    let data = digits(42, &Device::Cpu).unwrap();
    let t = teacher(&data);
    let logits = teacher_logits(&t, &data.train).unwrap();
    let map: FeatureMap = "layers.0=fc1".parse().unwrap();
    let settings = Settings { temperature: 4.0, alpha: 0.9, feature_weight: 0.1, ..Default::default() };
    let epochs = 4;

    let (s, vars) = student(5);
    let mut task = DigitsDistill::new(&s, &t, &data, logits.clone(), &map, settings, &vars, 5).unwrap();
    let whole = train(&mut task, &vars, data.train.len(), &cfg(epochs, 3e-3), &mut |_| {}).unwrap();
    let want = weights(&s);

    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("distill.ckpt");
    let resumable = TrainConfig { checkpoint: Some(ck.clone()), ..cfg(epochs, 3e-3) };
    let steps_per_epoch = data.train.len().div_ceil(32);
    let (s, vars) = student(5);
    let inner = DigitsDistill::new(&s, &t, &data, logits.clone(), &map, settings, &vars, 5).unwrap();
    let mut killed = Interrupted { inner, steps: 0, k: 2 * steps_per_epoch + 7 };
    let err = train(&mut killed, &vars, data.train.len(), &resumable, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("interrupted"), "{err}");
    assert!(ck.is_file(), "two epochs finished, so a checkpoint exists");

    // A fresh process: new student, new projection, resumed from the checkpoint.
    let (s, vars) = student(5);
    let mut task = DigitsDistill::new(&s, &t, &data, logits, &map, settings, &vars, 5).unwrap();
    let resumed = train(&mut task, &vars, data.train.len(), &resumable, &mut |_| {}).unwrap();
    assert_eq!(resumed.resumed_at, Some(2));
    assert_eq!(resumed.history, whole.history);
    assert_eq!(weights(&s), want, "resumed weights differ from the uninterrupted run's");
}

#[test]
fn bad_options_and_mismatched_models_are_refused_before_training() {
    let data = digits(42, &Device::Cpu).unwrap();
    let vars = VarMap::new();
    let t = DigitsNet::init(DigitsArch::default_cnn(), 1, &Device::Cpu, &vars).unwrap();
    let (s, vars) = student(1);
    let logits = teacher_logits(&t, &data.train).unwrap();
    let ok = Settings { temperature: 2.0, alpha: 0.5, feature_weight: 1.0, ..Default::default() };
    let none = FeatureMap::default();
    let err = |settings: Settings, map: &FeatureMap, logits: Tensor| {
        DigitsDistill::new(&s, &t, &data, logits, map, settings, &vars, 1).err().expect("refused").to_string()
    };
    assert!(err(Settings { temperature: 0.0, ..ok }, &none, logits.clone()).contains("--temperature"));
    assert!(err(Settings { temperature: -1.0, ..ok }, &none, logits.clone()).contains("> 0"));
    assert!(err(Settings { alpha: 1.5, ..ok }, &none, logits.clone()).contains("[0, 1], found 1.5"));
    // Teacher outputs whose width is not the student's.
    let narrow = logits.narrow(1, 0, 5).unwrap();
    let e = err(ok, &none, narrow);
    assert!(e.contains("teacher logits") && e.contains("[1259, 10]") && e.contains("[1259, 5]"), "{e}");
    // A feature map naming a layer the model does not have, on either side.
    let e = err(ok, &"layers.7=fc1".parse().unwrap(), logits.clone());
    assert!(e.contains("unknown student layer `layers.7`") && e.contains("layers.0"), "{e}");
    let e = err(ok, &"layers.0=fc9".parse().unwrap(), logits.clone());
    assert!(e.contains("unknown teacher layer `fc9`") && e.contains("fc1"), "{e}");
    // A convolution's [n, c, h, w] map against a linear layer's [n, d].
    let e = err(ok, &"layers.0=conv2".parse().unwrap(), logits.clone());
    assert!(e.contains("hint feature of student layer `layers.0`"), "{e}");
    // Attention transfer compares convolution maps only.
    let attention = Settings { feature_loss: FeatureLoss::Attention, ..ok };
    let e = err(attention, &"layers.0=fc1".parse().unwrap(), logits.clone());
    assert!(e.contains("hint feature of student layer `layers.0`"), "{e}");
    assert!("cosine".parse::<FeatureLoss>().unwrap_err().to_string().contains("hint or attention"));
    assert!("fc1".parse::<FeatureMap>().unwrap_err().to_string().contains("student_layer=teacher_layer"));
    // Encoder loss weights that leave nothing to train on.
    assert!(EncoderSettings { cosine: 0.0, mse: 0.0, feature_weight: 0.0 }.check().is_err());
}

#[test]
fn minilm_three_layer_student_from_every_other_layer_gets_closer_to_the_teacher() {
    let Some(dir) =
        minilm_dir("distill::minilm_three_layer_student_from_every_other_layer_gets_closer_to_the_teacher").unwrap()
    else {
        return;
    };
    let dev = Device::Cpu;
    let teacher = SentenceEncoder::load(&dir, &dev).unwrap();
    let all = sentences(workspace_root().join("data/sentences.txt")).unwrap();
    let split = split_sentences(&all, 42).unwrap();
    let train_part: Vec<String> = split.train.iter().take(320).cloned().collect();
    let emb = |s: &[String]| teacher.embed(s, 64, &mut |_| {}).unwrap();
    let (t_train, t_val, t_test) = (emb(&train_part), emb(&split.validation), emb(&split.test));

    let mut init = teacher.clone();
    init.bert = teacher.bert.keep_layers(&every_other_layer(6)).unwrap();
    assert_eq!(init.bert.config().num_hidden_layers, 3);
    let before = mean_cosine_to(&init, &split.test, &t_test).unwrap();

    let vars = VarMap::new();
    let mut student = init.clone();
    student.bert = init.bert.trainable(&vars, &["embeddings."]).unwrap();
    let trainable = vars.data().lock().unwrap().len();
    assert_eq!(trainable, 3 * 16, "every layer parameter of 3 layers trains; the embeddings stay frozen");
    // Hidden-state hints: the student's last layer towards the teacher's last.
    let map: FeatureMap = "encoder.layer.2.output.LayerNorm=encoder.layer.5.output.LayerNorm".parse().unwrap();
    let settings = EncoderSettings { cosine: 1.0, mse: 0.0, feature_weight: 0.05 };
    let mut task =
        EncoderDistill::new(&student, &teacher, &train_part, t_train, &split.validation, t_val, &map, settings)
            .unwrap();
    train(&mut task, &vars, train_part.len(), &cfg(1, 5e-4), &mut |_| {}).unwrap();
    drop(task);
    let after = mean_cosine_to(&student, &split.test, &t_test).unwrap();
    eprintln!(
        "MiniLM 3 of 6 layers: held-out mean cosine {before:.4} before → {after:.4} after one epoch on 320 sentences"
    );
    assert!(after > before + 0.1, "distillation moved the held-out cosine only from {before} to {after}");
}
