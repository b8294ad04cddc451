//! The shared trainer: an interrupted run resumes from its checkpoint to exactly the weights
//! of an uninterrupted one; bad configs are refused before any work.

use candle_core::{Device, Tensor};
use pare_core_tensor::data::{DigitsSplit, digits};
use pare_core_tensor::train::{LrSchedule, OptimizerKind, TrainConfig, TrainTask, train};
use pare_core_tensor::{Error, Module, Weight};
use pare_models::digits::{DigitsArch, DigitsNet};

/// Cross-entropy on the digits that fails on purpose at step `fail_at` (a crash stand-in).
struct Task<'a> {
    net: &'a DigitsNet,
    data: &'a DigitsSplit,
    steps: usize,
    fail_at: Option<usize>,
}

impl TrainTask for Task<'_> {
    fn loss(&mut self, batch: &[u32]) -> pare_core_tensor::Result<Tensor> {
        self.steps += 1;
        if Some(self.steps) == self.fail_at {
            return Err(Error::invalid("test", "simulated crash"));
        }
        let b = self.data.train.select(batch)?;
        let logits = self.net.forward(&b.x).map_err(pare_models::Error::into_core)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &b.y)?)
    }
    fn evaluate(&mut self) -> pare_core_tensor::Result<f64> {
        self.net.accuracy(&self.data.validation).map_err(pare_models::Error::into_core)
    }
}

fn weights_bytes(net: &DigitsNet) -> Vec<Vec<u32>> {
    net.named_weights()
        .values()
        .map(|w| match w {
            Weight::Dense(t) => {
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
            }
            _ => unreachable!(),
        })
        .collect()
}

fn run(data: &DigitsSplit, cfg: &TrainConfig, fail_at: Option<usize>) -> (DigitsNet, Result<(), Error>) {
    let vars = candle_nn::VarMap::new();
    let net = DigitsNet::init(DigitsArch::default_mlp(), 3, &Device::Cpu, &vars).unwrap();
    let r = {
        let mut task = Task { net: &net, data, steps: 0, fail_at };
        train(&mut task, &vars, data.train.len(), cfg, &mut |_| {}).map(|_| ())
    };
    (net, r)
}

#[test]
fn an_interrupted_run_resumes_to_identical_weights() {
    let data = digits(5, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for optimizer in [OptimizerKind::adamw(2e-3), OptimizerKind::Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-4 }] {
        let mut cfg = TrainConfig {
            epochs: 4,
            batch_size: 64,
            optimizer,
            schedule: LrSchedule::Cosine { warmup_steps: 5, min_factor: 0.1 },
            seed: 11,
            patience: None,
            checkpoint: None,
        };
        let (straight, r) = run(&data, &cfg, None);
        r.unwrap();

        let ck = dir.path().join(format!("ck-{}.safetensors", matches!(optimizer, OptimizerKind::Sgd { .. })));
        cfg.checkpoint = Some(ck.clone());
        let steps_per_epoch = data.train.len().div_ceil(64);
        // Crash in the middle of epoch 3: the checkpoint holds epochs 1 and 2.
        let (_, r) = run(&data, &cfg, Some(2 * steps_per_epoch + 3));
        assert!(r.unwrap_err().to_string().contains("simulated crash"));
        assert!(ck.exists());
        let (resumed, r) = run(&data, &cfg, None);
        r.unwrap();
        assert_eq!(weights_bytes(&straight), weights_bytes(&resumed), "{optimizer:?}");

        // A checkpoint from another config is refused, not silently mixed in.
        let mut other = cfg.clone();
        other.seed = 12;
        let (_, r) = run(&data, &other, None);
        assert!(r.unwrap_err().to_string().contains("delete it to start afresh"));
    }
}

#[test]
fn impossible_configs_and_empty_sets_are_refused() {
    let data = digits(5, &Device::Cpu).unwrap();
    let base = TrainConfig {
        epochs: 1,
        batch_size: 8,
        optimizer: OptimizerKind::adamw(1e-3),
        schedule: LrSchedule::Constant,
        seed: 0,
        patience: None,
        checkpoint: None,
    };
    let mut c = base.clone();
    c.batch_size = 0;
    assert!(run(&data, &c, None).1.unwrap_err().to_string().contains("batch_size must be at least 1"));
    let mut c = base.clone();
    c.optimizer = OptimizerKind::adamw(f64::NAN);
    assert!(run(&data, &c, None).1.unwrap_err().to_string().contains("learning rate must be finite"));
    let vars = candle_nn::VarMap::new();
    let net = DigitsNet::init(DigitsArch::default_mlp(), 3, &Device::Cpu, &vars).unwrap();
    let mut task = Task { net: &net, data: &data, steps: 0, fail_at: None };
    let e = train(&mut task, &vars, 0, &base, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("no examples to train on"), "{e}");
}
