//! pare-parallel on the real models: data, pipeline and tensor parallel runs of the digits
//! networks and MiniLM equal one worker's outputs (data and pipeline bit for bit, tensor
//! parallel within 1e-5), and a worker that fails, panics or hangs makes every other worker
//! fail within the timeout instead of hanging or returning a partial result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use pare_core_tensor::data::{digits, sentences};
use pare_core_tensor::testing::max_abs_diff;
use pare_core_tensor::{Hooks, Module, Runtime};
use pare_models::bert::{SentenceEncoder, mean_pool_normalize};
use pare_models::digits::{DigitsArch, DigitsNet};
use pare_parallel::data::data_parallel;
use pare_parallel::pipeline::{BertStages, DigitsStages, Schedule, Stages, measure_costs, partition, pipeline_forward};
use pare_parallel::tensor::{shard_bert, shard_digits, tp_bert_embed, tp_digits_forward};
use pare_parallel::{Communicator, Error, first_error, run_threads};
use pare_runtime_cpu::CpuRuntime;
use pare_tests::{minilm_dir, workspace_root};

const TIMEOUT: Duration = Duration::from_secs(120);

/// One single-threaded CPU runtime per worker, as each MPI process would have.
fn runtime() -> Arc<dyn Runtime> {
    Arc::new(CpuRuntime::new(1).unwrap())
}

fn prepared<M: Module + Clone>(m: &M) -> M {
    let mut m = m.clone();
    m.prepare(&runtime()).unwrap();
    m
}

fn trained_mlp() -> (DigitsNet, Tensor) {
    let net = pare_tests::trained_digits("mlp:128,64", 8).unwrap();
    let test = digits(42, &Device::Cpu).unwrap().test;
    assert!(net.accuracy(&test).unwrap() > 0.9);
    (net, test.x)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Runs the pipeline over `mbs` on `world` in-process stages and returns the outputs.
fn pipelined(stages: &dyn Stages, world: usize, schedule: Schedule, mbs: &[Vec<Tensor>]) -> Vec<Tensor> {
    let costs = measure_costs(stages, &mbs[0], 1).unwrap();
    let plan = partition(&costs, world).unwrap();
    let out = run_threads(world, TIMEOUT, |c| {
        let inputs = if c.rank() == 0 { mbs.to_vec() } else { Vec::new() };
        pipeline_forward(c, stages, &plan, schedule, inputs)
    })
    .unwrap();
    let (outs, stats) = first_error(out).unwrap().remove(0).unwrap();
    assert_eq!(stats.micro_batches, mbs.len());
    assert!(stats.bubble.is_finite() && stats.wall_s > 0.0, "{stats:?}");
    if schedule == Schedule::OneFOneB {
        assert!(stats.peak_in_flight <= world, "{stats:?}");
    }
    outs.into_iter().map(|mut o| o.remove(0)).collect()
}

#[test]
fn the_digits_mlp_gives_the_same_logits_in_every_mode() {
    let (net, x) = trained_mlp();
    let one = prepared(&net);
    let want = one.forward(&x).unwrap();

    for world in [2, 3] {
        let out = run_threads(world, TIMEOUT, |c| {
            let local = prepared(&net);
            let inputs = if c.rank() == 0 { vec![x.clone()] } else { vec![] };
            data_parallel(c, 0, &inputs, &mut |b| Ok(local.forward(&b[0])?))
        })
        .unwrap();
        let got = first_error(out).unwrap().remove(0).unwrap();
        assert_eq!(bits(&got), bits(&want), "data parallel, {world} workers");
    }

    let mbs: Vec<Vec<Tensor>> = (0..x.dim(0).unwrap())
        .step_by(64)
        .map(|s| vec![x.narrow(0, s, 64.min(x.dim(0).unwrap() - s)).unwrap()])
        .collect();
    for schedule in [Schedule::GPipe, Schedule::OneFOneB] {
        for world in [2, 3] {
            let got = Tensor::cat(&pipelined(&DigitsStages(&one), world, schedule, &mbs), 0).unwrap();
            assert_eq!(bits(&got), bits(&want), "pipeline {schedule}, {world} stages");
        }
    }

    let out = run_threads(2, TIMEOUT, |c| {
        let shard = prepared(&shard_digits(c, &net)?);
        tp_digits_forward(c, &shard, (c.rank() == 0).then_some(&x))
    })
    .unwrap();
    let results = first_error(out).unwrap();
    let (got, traffic) = &results[0];
    let diff = max_abs_diff(got, &want).unwrap();
    assert!(diff <= 1e-5, "tensor parallel differs by {diff}");
    assert_eq!(traffic.all_reduces, 1, "one all-reduce per layer pair");
    // Both ranks hold the same logits.
    assert_eq!(bits(&results[1].0), bits(got));
    assert_eq!(got.argmax(1).unwrap().to_vec1::<u32>().unwrap(), want.argmax(1).unwrap().to_vec1::<u32>().unwrap());
}

#[test]
fn a_cnn_pipelines_bit_for_bit() {
    let dev = Device::Cpu;
    let x = digits(42, &dev).unwrap().test.x.narrow(0, 0, 96).unwrap();
    let net = prepared(&DigitsNet::init(DigitsArch::default_cnn(), 3, &dev, &candle_nn::VarMap::new()).unwrap());
    let want = net.forward(&x).unwrap();
    let mbs: Vec<Vec<Tensor>> = (0..3).map(|i| vec![x.narrow(0, 32 * i, 32).unwrap()]).collect();
    let got = Tensor::cat(&pipelined(&DigitsStages(&net), 2, Schedule::OneFOneB, &mbs), 0).unwrap();
    assert_eq!(bits(&got), bits(&want));
}

#[test]
fn minilm_gives_the_same_embeddings_in_every_mode() -> anyhow::Result<()> {
    let Some(dir) = minilm_dir("parallel::minilm_gives_the_same_embeddings_in_every_mode")? else { return Ok(()) };
    let dev = Device::Cpu;
    let text = sentences(workspace_root().join("data/sentences.txt"))?;
    let enc = SentenceEncoder::load(&dir, &dev)?;
    let bert = prepared(&enc.bert);
    let texts: Vec<&str> = text.iter().take(24).map(String::as_str).collect();
    let embed = |b: &[Tensor]| -> pare_parallel::Result<Tensor> {
        let h = bert.forward_hooked(&b[0], Some(&b[1]), &b[2], &mut Hooks::none())?;
        Ok(mean_pool_normalize(&h, &b[2])?)
    };

    // Data parallel: the batch is tokenized (and padded) once at the root.
    let batch = enc.encode_batch(&texts, &dev)?;
    let inputs = vec![batch.input_ids.clone(), batch.token_type_ids.clone(), batch.attention_mask.clone()];
    let want = embed(&inputs)?;
    let out = run_threads(2, TIMEOUT, |c| {
        let local = prepared(&enc.bert);
        let mine = if c.rank() == 0 { inputs.clone() } else { vec![] };
        data_parallel(c, 0, &mine, &mut |b| {
            let h = local.forward_hooked(&b[0], Some(&b[1]), &b[2], &mut Hooks::none())?;
            Ok(mean_pool_normalize(&h, &b[2])?)
        })
    })
    .unwrap();
    let got = first_error(out)?.remove(0).unwrap();
    assert_eq!(bits(&got), bits(&want), "data parallel");

    // Pipeline: four micro-batches of six sentences, through 2 and 3 stages.
    let mbs: Vec<Vec<Tensor>> = texts
        .chunks(6)
        .map(|c| {
            let b = enc.encode_batch(c, &dev).unwrap();
            vec![b.input_ids, b.token_type_ids, b.attention_mask]
        })
        .collect();
    let per_mb: Vec<Tensor> = mbs.iter().map(|mb| embed(mb).unwrap()).collect();
    for (world, schedule) in [(2, Schedule::GPipe), (3, Schedule::OneFOneB)] {
        let got = pipelined(&BertStages(&bert), world, schedule, &mbs);
        for (g, w) in got.iter().zip(&per_mb) {
            assert_eq!(bits(g), bits(w), "pipeline {schedule}, {world} stages");
        }
    }

    // Tensor parallel: heads and FFN neurons split over 2 and 3 workers.
    for world in [2, 3] {
        let out = run_threads(world, TIMEOUT, |c| {
            let shard = prepared(&shard_bert(c, &enc.bert)?);
            tp_bert_embed(c, &shard, if c.rank() == 0 { inputs.clone() } else { vec![] })
        })
        .unwrap();
        let (got, traffic) = first_error(out)?.remove(0);
        let diff = max_abs_diff(&got, &want)?;
        eprintln!("MiniLM tensor parallel over {world}: max |Δ| {diff:.2e}, {traffic:?}");
        assert!(diff <= 1e-5, "tensor parallel over {world} differs by {diff}");
        assert_eq!(traffic.all_reduces, 2 * 6, "two all-reduces per layer");
    }
    Ok(())
}

/// Stages that fail (or panic, or hang) at one unit on one micro-batch.
struct Faulty<'a> {
    inner: DigitsStages<'a>,
    unit: usize,
    fault: &'static str,
    calls: std::sync::atomic::AtomicUsize,
}

impl Stages for Faulty<'_> {
    fn units(&self) -> usize {
        self.inner.units()
    }
    fn unit_name(&self, k: usize) -> String {
        self.inner.unit_name(k)
    }
    fn forward_unit(&self, k: usize, acts: Vec<Tensor>) -> pare_parallel::Result<Vec<Tensor>> {
        if k == self.unit && self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 2 {
            match self.fault {
                "error" => {
                    return Err(Error::config("unit", "a healthy unit", "a deliberate failure on micro-batch 2"));
                }
                "panic" => panic!("unit {k} exploded on micro-batch 2"),
                _ => std::thread::sleep(Duration::from_secs(4)),
            }
        }
        self.inner.forward_unit(k, acts)
    }
}

#[test]
fn a_failing_panicking_or_hung_stage_fails_every_worker_within_the_timeout() {
    let (net, x) = trained_mlp();
    let net = prepared(&net);
    let mbs: Vec<Vec<Tensor>> = (0..6).map(|i| vec![x.narrow(0, 16 * i, 16).unwrap()]).collect();
    let plan = vec![0..1, 1..2, 2..3];
    for (fault, timeout, expect) in [
        ("error", TIMEOUT, "deliberate failure"),
        ("panic", TIMEOUT, "exploded"),
        ("hang", Duration::from_millis(800), "timed out after 800ms"),
    ] {
        let stages = Faulty { inner: DigitsStages(&net), unit: 1, fault, calls: Default::default() };
        let start = Instant::now();
        let out = run_threads(3, timeout, |c| {
            let inputs = if c.rank() == 0 { mbs.clone() } else { Vec::new() };
            pipeline_forward(c, &stages, &plan, Schedule::GPipe, inputs)
        })
        .unwrap();
        assert!(start.elapsed() < Duration::from_secs(10), "{fault}: took {:?}", start.elapsed());
        // No rank reports success; rank 0 (which would hold the result) reports an error.
        assert!(out[0].is_err(), "{fault}: rank 0 returned a result");
        let e = first_error(out).unwrap_err().to_string();
        assert!(e.contains(expect), "{fault}: {e}");
    }
}

#[test]
fn a_tensor_parallel_peer_failure_stays_a_typed_peer_failure() {
    let (net, x) = trained_mlp();
    let out = run_threads(2, TIMEOUT, |c| {
        if c.rank() == 1 {
            return Err(Error::config("shard", "a loaded shard", "a deliberate failure"));
        }
        let shard = prepared(&shard_digits(c, &net)?);
        tp_digits_forward(c, &shard, Some(&x))
    })
    .unwrap();
    match &out[0] {
        Err(Error::PeerFailed { peer: 1, reason, .. }) => assert!(reason.contains("deliberate"), "{reason}"),
        other => panic!("rank 0: expected PeerFailed from rank 1, got {other:?}"),
    }
}

#[test]
fn impossible_splits_are_refused_before_any_work() {
    let dev = Device::Cpu;
    let cnn = DigitsNet::init(DigitsArch::default_cnn(), 1, &dev, &candle_nn::VarMap::new()).unwrap();
    let e = cnn.tensor_shard(0, 2).unwrap_err().to_string();
    assert!(e.contains("splits MLPs") && e.contains("cnn:"), "{e}");
    let mlp = DigitsNet::init("mlp:100,64".parse().unwrap(), 1, &dev, &candle_nn::VarMap::new()).unwrap();
    let e = mlp.tensor_shard(0, 3).unwrap_err().to_string();
    assert!(e.contains("layers.0") && e.contains("100 outputs") && e.contains("multiple of 3"), "{e}");

    // A plan for 2 stages on 3 workers, and more stages than units.
    let out = run_threads(3, TIMEOUT, |c| {
        pipeline_forward(c, &DigitsStages(&mlp), &[0..1, 1..3], Schedule::GPipe, vec![vec![]])
    })
    .unwrap();
    let e = first_error(out).unwrap_err().to_string();
    assert!(e.contains("one stage per worker (3)") && e.contains("2 stages"), "{e}");
    assert!(partition(&[1.0, 1.0, 1.0], 4).is_err());

    // Workers that loaded different models, or were given different plans, find out before work.
    let wide = DigitsNet::init("mlp:128,64".parse().unwrap(), 1, &dev, &candle_nn::VarMap::new()).unwrap();
    let out =
        run_threads(2, TIMEOUT, |c| shard_digits(c, if c.rank() == 0 { &mlp } else { &wide }).map(|_| ())).unwrap();
    let e = first_error(out).unwrap_err().to_string();
    assert!(e.contains("digits architecture across workers") && e.contains("at rank 1"), "{e}");
    let out = run_threads(2, TIMEOUT, |c| {
        let plan = if c.rank() == 0 { vec![0..1, 1..3] } else { vec![0..2, 2..3] };
        let inputs =
            if c.rank() == 0 { vec![vec![Tensor::zeros((1, 64), candle_core::DType::F32, &dev)?]] } else { vec![] };
        pipeline_forward(c, &DigitsStages(&mlp), &plan, Schedule::GPipe, inputs).map(|_| ())
    })
    .unwrap();
    let e = first_error(out).unwrap_err().to_string();
    assert!(e.contains("stage plan across workers") && e.contains("[3, 0, 2, 2, 3] at rank 1"), "{e}");
    assert!("zigzag".parse::<Schedule>().unwrap_err().to_string().contains("gpipe or 1f1b"));
}

#[test]
fn minilm_heads_that_do_not_divide_are_refused() -> anyhow::Result<()> {
    let Some(dir) = minilm_dir("parallel::minilm_heads_that_do_not_divide_are_refused")? else { return Ok(()) };
    let enc = SentenceEncoder::load(&dir, &Device::Cpu)?;
    let e = enc.bert.tensor_shard(0, 5).unwrap_err().to_string();
    assert!(e.contains("12 attention heads") && e.contains("multiple of 5"), "{e}");
    let e = enc.bert.tensor_shard(2, 2).unwrap_err().to_string();
    assert!(e.contains("rank 2 of 2"), "{e}");
    Ok(())
}
