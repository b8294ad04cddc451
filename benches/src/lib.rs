//! pare-benches: the workspace's criterion benchmarks (in `benches/`), each printing ratios
//! against a peer measured in the same run. Run them with `cargo bench -p pare-benches`.
