//! The FMA-peak probe the benches quote, at one and two threads, several samples each.
fn main() {
    for threads in [1usize, 2] {
        let probe = pare_runtime_cpu::probe::FmaProbe::new(threads);
        let s: Vec<String> = (0..4).map(|_| format!("{:.1}", probe.sample())).collect();
        println!("{threads} thread(s): {} GFLOP/s", s.join(", "));
    }
}
