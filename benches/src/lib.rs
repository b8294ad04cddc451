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
