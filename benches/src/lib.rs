//! pare-benches: the workspace's criterion benchmarks (in `benches/`), each printing ratios
//! against a peer measured in the same run. Run them with `cargo bench -p pare-benches`.

/// Runs `f` once to warm up, then `reps` times, and returns the median seconds per run: the
/// figure every `RATIO` line compares.
pub fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = std::time::Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Median seconds of `ours` and of `peer`, run alternately (`reps` times each after one warm-up
/// of each) so that load from other processes on a shared machine falls on both alike.
pub fn median_pair(reps: usize, ours: impl FnMut(), peer: impl FnMut()) -> (f64, f64) {
    median_pair_blocks(reps, 1, ours, peer)
}

/// [`median_pair`] where each sample is the mean of `block` consecutive calls: the steady state
/// a model sees when it runs layer after layer, for calls short enough (a GEMV) that waking a
/// thread pool or refilling caches after the other side ran would dominate a single call.
/// When `block > 1`, `block` untimed calls precede each timed block, on both sides alike: a
/// side's first calls after the other side's block run up to twice as slow here, and the
/// effect fades only after ten or more calls (`INTERFERE=1 N=4096 gemv_probe` shows it:
/// pool threads still yielding, memory freed by the other side being reclaimed), which would
/// charge one library for the other's after-effects.
pub fn median_pair_blocks(reps: usize, block: usize, ours: impl FnMut(), peer: impl FnMut()) -> (f64, f64) {
    median_pair_warm(reps, block, if block > 1 { block } else { 0 }, ours, peer)
}

/// [`median_pair_blocks`] with `warm` untimed calls (instead of `block`) before each timed
/// block, for calls whose after-effects on the other side last longer than one block.
pub fn median_pair_warm(
    reps: usize,
    block: usize,
    warm: usize,
    mut ours: impl FnMut(),
    mut peer: impl FnMut(),
) -> (f64, f64) {
    ours();
    peer();
    let block = block.max(1);
    let time = |f: &mut dyn FnMut()| {
        for _ in 0..warm {
            f();
        }
        let s = std::time::Instant::now();
        for _ in 0..block {
            f();
        }
        s.elapsed().as_secs_f64() / block as f64
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        a.push(time(&mut ours));
        b.push(time(&mut peer));
    }
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    (a[a.len() / 2], b[b.len() / 2])
}

/// The median time of one call of `f` over `reps` blocks of `block` calls, after `block`
/// untimed calls: a kernel's steady state on its own, as a bandwidth loop is timed.
pub fn median_alone(reps: usize, block: usize, mut f: impl FnMut()) -> f64 {
    let block = block.max(1);
    for _ in 0..block {
        f();
    }
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = std::time::Instant::now();
            for _ in 0..block {
                f();
            }
            s.elapsed().as_secs_f64() / block as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Whether the bench runs in quick mode (`PARE_BENCH_QUICK=1`, set by `cargo xtask bench
/// --quick`): fewer repetitions and no criterion sampling, ratios only.
pub fn quick() -> bool {
    std::env::var("PARE_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// One comparison: pare's figure against a peer's, measured in the same run.
#[derive(Debug, Clone)]
pub struct Comparison<'a> {
    /// What is compared (`w8a8 gemm`, `q4 gemv`, …).
    pub name: &'a str,
    /// The problem shape in words (`4096x384x1536`).
    pub shape: String,
    /// pare's figure.
    pub pare: f64,
    /// The peer's name.
    pub peer: &'a str,
    /// The peer's figure.
    pub peer_value: f64,
    /// The unit of both figures (`ms`, `GB/s`, `GFLOP/s`).
    pub unit: &'a str,
    /// Whether a larger figure is better (throughputs) or a smaller one (times).
    pub higher_is_better: bool,
    /// The goal for the ratio (pare over peer, oriented so that larger is better).
    pub goal: f64,
}

impl Comparison<'_> {
    /// pare's advantage over the peer: peer time / pare time, or pare rate / peer rate.
    pub fn ratio(&self) -> f64 {
        if self.higher_is_better { self.pare / self.peer_value } else { self.peer_value / self.pare }
    }

    /// Prints the `RATIO` line and, when `PARE_BENCH_JSON` names a file, appends the record to
    /// it as one JSON line (`cargo xtask bench` collects them into bench-report.json).
    pub fn report(&self) {
        let ratio = self.ratio();
        println!(
            "RATIO {} {}: pare {:.3} {u}, {} {:.3} {u}, ratio {ratio:.2}x (goal {:.2}x) {}",
            self.name,
            self.shape,
            self.pare,
            self.peer,
            self.peer_value,
            self.goal,
            if ratio >= self.goal { "MET" } else { "MISSED" },
            u = self.unit
        );
        if let Some(path) = std::env::var_os("PARE_BENCH_JSON") {
            let rec = serde_json::json!({
                "name": self.name, "shape": self.shape, "pare": self.pare, "peer": self.peer,
                "peer_value": self.peer_value, "unit": self.unit, "higher_is_better": self.higher_is_better,
                "ratio": ratio, "goal": self.goal, "met": ratio >= self.goal,
            });
            use std::io::Write;
            let mut f =
                std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("PARE_BENCH_JSON file");
            writeln!(f, "{rec}").expect("append a bench record");
        }
    }
}
