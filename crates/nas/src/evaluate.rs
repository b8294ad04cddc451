//! Evaluating digits architectures: short training from scratch through core-tensor's trainer
//! (seeded by the search seed and the trial), validation and test accuracy, parameters,
//! bytes, MACs, and the latency of one image measured on a `Runtime` (cached per
//! architecture, so a repeated architecture is not re-timed).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use candle_nn::VarMap;
use pare_core_tensor::data::DigitsSplit;
use pare_core_tensor::metrics::{MacCounter, accuracy};
use pare_core_tensor::train::{LrSchedule, OptimizerKind, TrainConfig};
use pare_core_tensor::{Hooks, Module, Runtime};
use pare_models::digits::{DigitsArch, DigitsNet, fit};

use crate::search::{Evaluator, Metrics};
use crate::space::{Candidate, Space};
use crate::{Error, Result};

/// The latency of one example of `net` on its runtime: the median of `reps` single-image
/// forward passes after a warm-up, in milliseconds.
pub fn latency_ms(net: &DigitsNet, x: &candle_core::Tensor, reps: usize) -> Result<f64> {
    let one = x.narrow(0, 0, 1)?;
    let run = || -> Result<()> {
        net.forward(&one).map_err(pare_models::Error::into_core)?.to_vec2::<f32>()?;
        Ok(())
    };
    run()?;
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            run().map(|()| s.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Multiply-accumulates of one example through `net`.
pub fn macs(net: &DigitsNet, x: &candle_core::Tensor) -> Result<u64> {
    let mut m = MacCounter::default();
    net.forward_hooked(&x.narrow(0, 0, 1)?, &mut Hooks::with(&mut m)).map_err(pare_models::Error::into_core)?;
    Ok(m.total())
}

/// Trains each candidate from scratch for a few epochs on the digits and measures it.
pub struct DigitsEvaluator<'a> {
    data: &'a DigitsSplit,
    runtime: Arc<dyn Runtime>,
    /// Training epochs per candidate.
    pub epochs: usize,
    /// Peak AdamW learning rate.
    pub lr: f64,
    /// Seed mixed with the trial index for initialisation and shuffles.
    pub seed: u64,
    /// Single-image forward passes timed per architecture.
    pub latency_reps: usize,
    latencies: BTreeMap<String, f64>,
}

impl<'a> DigitsEvaluator<'a> {
    /// An evaluator training on `data` and timing on `runtime`.
    pub fn new(data: &'a DigitsSplit, runtime: Arc<dyn Runtime>, epochs: usize, seed: u64) -> Result<Self> {
        if epochs == 0 {
            return Err(Error::invalid("--epochs", "each candidate trains at least 1 epoch, found 0"));
        }
        Ok(Self { data, runtime, epochs, lr: 3e-3, seed, latency_reps: 31, latencies: BTreeMap::new() })
    }

    /// The settings that shape every trial, for [`crate::SearchConfig::evaluator`].
    pub fn describe(&self) -> String {
        format!(
            "digits: {} epochs, AdamW {} cosine, batch 32, latency on `{}`",
            self.epochs,
            self.lr,
            self.runtime.name()
        )
    }

    /// Trains `arch` and measures it (the work of one trial).
    pub fn measure(&mut self, arch: &DigitsArch, index: usize) -> Result<Metrics> {
        let seed = self.seed ^ (index as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
        let vars = VarMap::new();
        let net = DigitsNet::init(arch.clone(), seed, &Device::Cpu, &vars).map_err(pare_models::Error::into_core)?;
        let cfg = TrainConfig {
            epochs: self.epochs,
            batch_size: 32,
            optimizer: OptimizerKind::adamw(self.lr),
            schedule: LrSchedule::Cosine { warmup_steps: 20, min_factor: 0.02 },
            seed,
            patience: None,
            checkpoint: None,
        };
        fit(&net, &vars, self.data, &cfg, &mut |_| {}).map_err(pare_models::Error::into_core)?;
        let mut fast = net.clone();
        fast.prepare(&self.runtime)?;
        let acc = |e: &pare_core_tensor::data::Examples| -> Result<f64> {
            accuracy(&fast.forward(&e.x).map_err(pare_models::Error::into_core)?, &e.y)
        };
        let (validation, test) = (acc(&self.data.validation)?, acc(&self.data.test)?);
        let key = arch.to_string();
        let latency_ms = match self.latencies.get(&key) {
            Some(&l) => l,
            None => {
                let l = latency_ms(&fast, &self.data.test.x, self.latency_reps)?;
                self.latencies.insert(key, l);
                l
            }
        };
        Ok(Metrics {
            validation,
            test,
            params: net.parameter_count(),
            bytes: net.storage_bytes(),
            macs: macs(&net, &self.data.test.x)?,
            latency_ms,
        })
    }
}

impl Evaluator for DigitsEvaluator<'_> {
    fn evaluate(&mut self, space: &Space, c: &Candidate, index: usize) -> Result<Metrics> {
        let arch = space.decode(c)?;
        self.measure(&arch, index)
    }
}
