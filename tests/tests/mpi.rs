//! pare-parallel across MPI processes: `mpirun -np 2 pare-mpi-check MODE`, in its own test
//! binary (`cargo test -p pare-tests --features mpi --test mpi`; .ci/run installs Open MPI and
//! runs it). Parity of every mode with one process on the digits MLP and MiniLM, and a
//! failing, hung or crashed rank ending the job with an error within the timeout — never a
//! hang, never `ALL PASS`.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pare_tests::minilm_dir;

fn mpirun(mode: &str) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new("mpirun")
        // CI runs as root in a container; Open MPI refuses root without this flag.
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", env!("CARGO_BIN_EXE_pare-mpi-check"), mode])
        .output()
        .expect("mpirun (Open MPI) is on PATH: install openmpi-bin");
    (out, start.elapsed())
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn every_mode_matches_one_process_under_mpirun() -> anyhow::Result<()> {
    if minilm_dir("mpi::every_mode_matches_one_process_under_mpirun")?.is_none() {
        return Ok(());
    }
    let (out, took) = mpirun("parity");
    let t = text(&out);
    eprintln!("{t}");
    assert!(out.status.success(), "mpirun failed after {took:?}:\n{t}");
    for check in [
        "PASS data parallel, digits MLP: bit-identical",
        "PASS pipeline gpipe, digits MLP: bit-identical",
        "PASS pipeline 1f1b, digits MLP: bit-identical",
        "PASS tensor parallel, digits MLP",
        "PASS data parallel, MiniLM: bit-identical",
        "PASS pipeline 1f1b, MiniLM: bit-identical",
        "PASS tensor parallel, MiniLM",
        "ALL PASS (parity, 2 processes)",
    ] {
        assert!(t.contains(check), "missing `{check}` in:\n{t}");
    }
    Ok(())
}

#[test]
fn a_failing_hung_or_crashed_rank_ends_the_job_with_an_error() {
    for (mode, expect) in [
        ("fail", "rank 0: rank 1 failed: invalid stage: expected a healthy stage, found a deliberate failure"),
        ("hang", "rank 0: recv with rank 1 timed out after 3s"),
        ("crash", "exiting mid-run"),
    ] {
        let (out, took) = mpirun(mode);
        let t = text(&out);
        assert!(!out.status.success(), "{mode}: the job succeeded:\n{t}");
        assert!(!t.contains("ALL PASS"), "{mode}: reported success:\n{t}");
        assert!(t.contains(expect), "{mode}: missing `{expect}` in:\n{t}");
        // The rank-1 fault comes after a few seconds of training; the hang times out after 3 s.
        assert!(took < Duration::from_secs(60), "{mode}: took {took:?}");
    }
}
