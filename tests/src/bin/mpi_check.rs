//! `mpirun -np 2 pare-mpi-check MODE`: pare-parallel across MPI processes.
//!
//! - `parity`: data, pipeline (GPipe and 1F1B) and tensor parallel runs of the digits MLP and
//!   MiniLM (`PARE_MINILM_DIR`) across the processes, each compared at rank 0 with the same
//!   model run whole in that process: data and pipeline must be bit-identical, tensor
//!   parallel within 1e-5. Prints one `PASS` line per check, then `ALL PASS`.
//! - `fail`, `hang`, `crash`: rank 1 returns an error, hangs, or exits mid-pipeline; every
//!   other rank must report an error (or be ended by mpirun) within the timeout, and the job
//!   must end with a non-zero status without printing `ALL PASS`.
//!
//! Any error makes the process tell its peers, print the error and end the whole job with
//! `MPI_Abort`, so a failure never leaves a process waiting.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use pare_core_tensor::data::{digits, sentences};
use pare_core_tensor::testing::max_abs_diff;
use pare_core_tensor::{Hooks, Module, Runtime};
use pare_models::bert::{SentenceEncoder, mean_pool_normalize};
use pare_models::digits::DigitsNet;
use pare_parallel::data::data_parallel;
use pare_parallel::pipeline::{BertStages, DigitsStages, Schedule, Stages, pipeline_forward};
use pare_parallel::tensor::{shard_bert, shard_digits, tp_bert_embed, tp_digits_forward};
use pare_parallel::{Communicator, MpiComm};
use pare_runtime_cpu::CpuRuntime;

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "parity".into());
    let timeout = if mode == "hang" { Duration::from_secs(3) } else { Duration::from_secs(120) };
    let comm = match MpiComm::init(timeout, Device::Cpu) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pare-mpi-check: {e}");
            std::process::exit(2);
        }
    };
    match run(&comm, &mode) {
        Ok(()) => {
            if comm.rank() == 0 {
                println!("ALL PASS ({mode}, {} processes)", comm.size());
            }
        }
        Err(e) => {
            comm.abort(&format!("{e:#}"));
            eprintln!("rank {}: error: {e:#}", comm.rank());
            // Let the failure notices leave before the job is torn down.
            std::thread::sleep(Duration::from_millis(300));
            comm.abort_job(1);
        }
    }
}

fn runtime() -> Arc<dyn Runtime> {
    Arc::new(CpuRuntime::new(1).expect("one thread is a valid count"))
}

fn prepared<M: Module + Clone>(m: &M) -> anyhow::Result<M> {
    let mut m = m.clone();
    m.prepare(&runtime())?;
    Ok(m)
}

fn bits(t: &Tensor) -> anyhow::Result<Vec<u32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
}

fn pass(comm: &MpiComm, what: &str) {
    if comm.rank() == 0 {
        println!("PASS {what}");
    }
}

fn run(comm: &MpiComm, mode: &str) -> anyhow::Result<()> {
    if comm.size() != 2 {
        bail!("pare-mpi-check runs on 2 processes (mpirun -np 2), found {}", comm.size());
    }
    let dev = Device::Cpu;
    // Every process trains the same MLP from the same seed: training is deterministic.
    let data = digits(42, &dev)?;
    let mlp = pare_tests::trained_digits("mlp:128,64", 8)?;
    let mlp = prepared(&mlp)?;
    let x = data.test.x.clone();
    let rows = x.dim(0)?;
    let mbs: Vec<Vec<Tensor>> =
        (0..rows).step_by(64).map(|s| x.narrow(0, s, 64.min(rows - s)).map(|t| vec![t])).collect::<Result<_, _>>()?;

    if mode != "parity" {
        return faulty(comm, &mlp, mbs, mode);
    }
    let want = mlp.forward(&x)?;
    let root = comm.rank() == 0;

    let inputs = if root { vec![x.clone()] } else { vec![] };
    if let Some(got) = data_parallel(comm, 0, &inputs, &mut |b| Ok(mlp.forward(&b[0])?))? {
        anyhow::ensure!(bits(&got)? == bits(&want)?, "data parallel digits MLP differs from one process");
    }
    pass(comm, "data parallel, digits MLP: bit-identical");
    for schedule in [Schedule::GPipe, Schedule::OneFOneB] {
        let plan = vec![0..2, 2..3];
        let inputs = if root { mbs.clone() } else { vec![] };
        if let Some((outs, stats)) = pipeline_forward(comm, &DigitsStages(&mlp), &plan, schedule, inputs)? {
            let got = Tensor::cat(&outs.into_iter().map(|mut o| o.remove(0)).collect::<Vec<_>>(), 0)?;
            anyhow::ensure!(bits(&got)? == bits(&want)?, "pipeline ({schedule}) digits MLP differs from one process");
            println!(
                "  {schedule}: bubble {:.3} (equal-stage formula {:.3}), peak {} micro-batches in flight \
                 (64-row micro-batches of a 17k-parameter MLP: mostly messaging)",
                stats.bubble, stats.ideal_bubble, stats.peak_in_flight
            );
        }
        pass(comm, &format!("pipeline {schedule}, digits MLP: bit-identical"));
    }
    let shard = prepared(&shard_digits(comm, &mlp)?)?;
    let (got, traffic) = tp_digits_forward(comm, &shard, root.then_some(&x))?;
    let diff = max_abs_diff(&got, &want)?;
    anyhow::ensure!(diff <= 1e-5, "tensor parallel digits MLP differs by {diff}");
    pass(comm, &format!("tensor parallel, digits MLP: max |Δ| {diff:.1e}, {} all-reduce(s)", traffic.all_reduces));

    let dir = std::env::var_os("PARE_MINILM_DIR").context("PARE_MINILM_DIR must name the all-MiniLM-L6-v2 folder")?;
    let enc = SentenceEncoder::load(std::path::Path::new(&dir), &dev)?;
    let bert = prepared(&enc.bert)?;
    let root_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/sentences.txt");
    let text = sentences(root_dir)?;
    let texts: Vec<&str> = text.iter().take(24).map(String::as_str).collect();
    let b = enc.encode_batch(&texts, &dev)?;
    let inputs = vec![b.input_ids, b.token_type_ids, b.attention_mask];
    let embed = |b: &[Tensor]| -> pare_parallel::Result<Tensor> {
        let h = bert.forward_hooked(&b[0], Some(&b[1]), &b[2], &mut Hooks::none())?;
        Ok(mean_pool_normalize(&h, &b[2])?)
    };
    let want = embed(&inputs)?;
    let mine = if root { inputs.clone() } else { vec![] };
    if let Some(got) = data_parallel(comm, 0, &mine, &mut |b| embed(b))? {
        anyhow::ensure!(bits(&got)? == bits(&want)?, "data parallel MiniLM differs from one process");
    }
    pass(comm, "data parallel, MiniLM: bit-identical");
    let mbs: Vec<Vec<Tensor>> = texts
        .chunks(6)
        .map(|c| enc.encode_batch(c, &dev).map(|b| vec![b.input_ids, b.token_type_ids, b.attention_mask]))
        .collect::<Result<_, _>>()?;
    let stages = BertStages(&bert);
    let plan = vec![0..4, 4..stages.units()];
    let mine = if root { mbs.clone() } else { vec![] };
    if let Some((outs, _)) = pipeline_forward(comm, &stages, &plan, Schedule::OneFOneB, mine)? {
        for (o, mb) in outs.iter().zip(&mbs) {
            anyhow::ensure!(bits(&o[0])? == bits(&embed(mb)?)?, "pipeline MiniLM differs from one process");
        }
    }
    pass(comm, "pipeline 1f1b, MiniLM: bit-identical");
    let shard = prepared(&shard_bert(comm, &enc.bert)?)?;
    let (got, traffic) = tp_bert_embed(comm, &shard, if root { inputs.clone() } else { vec![] })?;
    let diff = max_abs_diff(&got, &want)?;
    anyhow::ensure!(diff <= 1e-5, "tensor parallel MiniLM differs by {diff}");
    pass(
        comm,
        &format!(
            "tensor parallel, MiniLM: max |Δ| {diff:.1e}, {} all-reduces, {} payload bytes sent by rank 0",
            traffic.all_reduces, traffic.bytes_sent
        ),
    );
    Ok(())
}

/// A pipeline whose second stage (rank 1) fails, hangs or exits on its third micro-batch.
fn faulty(comm: &MpiComm, mlp: &DigitsNet, mbs: Vec<Vec<Tensor>>, mode: &str) -> anyhow::Result<()> {
    struct Faulty<'a>(DigitsStages<'a>, &'a str, std::sync::atomic::AtomicUsize);
    impl Stages for Faulty<'_> {
        fn units(&self) -> usize {
            self.0.units()
        }
        fn unit_name(&self, k: usize) -> String {
            self.0.unit_name(k)
        }
        fn forward_unit(&self, k: usize, acts: Vec<Tensor>) -> pare_parallel::Result<Vec<Tensor>> {
            if k == 2 && self.2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 2 {
                match self.1 {
                    "fail" => {
                        return Err(pare_parallel::Error::config("stage", "a healthy stage", "a deliberate failure"));
                    }
                    "crash" => {
                        eprintln!("rank 1: exiting mid-run (simulated crash)");
                        std::process::exit(3);
                    }
                    _ => {
                        eprintln!("rank 1: hanging (simulated)");
                        std::thread::sleep(Duration::from_secs(60));
                    }
                }
            }
            self.0.forward_unit(k, acts)
        }
    }
    let stages = Faulty(DigitsStages(mlp), mode, Default::default());
    let inputs = if comm.rank() == 0 { mbs } else { vec![] };
    pipeline_forward(comm, &stages, &[0..2, 2..3], Schedule::GPipe, inputs)?;
    bail!("the {mode} fault did not happen")
}
