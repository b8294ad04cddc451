use proptest::prelude::*;

use super::*;

fn scores(n: usize, seed: u64) -> Vec<f32> {
    // Few distinct values, so ties are common and must still give exact counts.
    (0..n).map(|i| (((i as u64 ^ seed).wrapping_mul(0x9E3779B97F4A7C15) >> 40) % 17) as f32).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    /// A layer prunes exactly round(s·n), the lowest scores, whatever the ties.
    #[test]
    fn layer_wise_selection_is_exact(n in 1usize..400, s in 0.0f64..1.0, seed in any::<u64>()) {
        let sc = scores(n, seed);
        let keep = mask_lowest(&sc, count(s, n));
        prop_assert_eq!(keep.iter().filter(|k| !**k).count(), count(s, n));
        let max_pruned = sc.iter().zip(&keep).filter(|(_, k)| !**k).map(|(v, _)| *v).fold(f32::NEG_INFINITY, f32::max);
        let min_kept = sc.iter().zip(&keep).filter(|(_, k)| **k).map(|(v, _)| *v).fold(f32::INFINITY, f32::min);
        prop_assert!(max_pruned <= min_kept);
    }

    /// Per-row selection (Wanda) prunes exactly k in all, rows differing by at most one.
    #[test]
    fn per_row_selection_is_exact(rows in 1usize..20, cols in 1usize..40, s in 0.0f64..1.0, seed in any::<u64>()) {
        let sc = scores(rows * cols, seed);
        let k = count(s, rows * cols);
        let keep = mask_per_row(&sc, rows, cols, k);
        prop_assert_eq!(keep.iter().filter(|k| !**k).count(), k);
        let per: Vec<usize> = keep.chunks(cols).map(|r| r.iter().filter(|k| !**k).count()).collect();
        prop_assert!(per.iter().max().unwrap() - per.iter().min().unwrap() <= 1);
    }

    /// Every group of M holds exactly N kept, the N highest scores.
    #[test]
    fn nm_masks_hold_the_pattern_in_every_group(rows in 1usize..10, groups in 1usize..12, nm in prop_oneof![Just((2usize, 4usize)), Just((4, 8)), Just((1, 4)), Just((3, 8))], seed in any::<u64>()) {
        let (n, m) = nm;
        let cols = groups * m;
        let sc = scores(rows * cols, seed);
        let keep = mask_nm(&sc, rows, cols, n, m);
        for (g, kg) in keep.chunks(m).enumerate() {
            prop_assert_eq!(kg.iter().filter(|k| **k).count(), n);
            let s = &sc[g * m..(g + 1) * m];
            let lo_kept = s.iter().zip(kg).filter(|(_, k)| **k).map(|(v, _)| *v).fold(f32::INFINITY, f32::min);
            let hi_cut = s.iter().zip(kg).filter(|(_, k)| !**k).map(|(v, _)| *v).fold(f32::NEG_INFINITY, f32::max);
            prop_assert!(hi_cut <= lo_kept);
        }
    }

    /// A global threshold prunes exactly round(s·Σn) and respects every layer's bounds.
    #[test]
    fn global_selection_is_exact_within_bounds(sizes in prop::collection::vec(1usize..200, 1..6), s in 0.0f64..0.9, lo in 0.0f64..0.3, seed in any::<u64>()) {
        let layers: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| scores(n, seed ^ i as u64).iter().map(|v| v * (1 + i) as f32).collect()).collect();
        let refs: Vec<&[f32]> = layers.iter().map(Vec::as_slice).collect();
        let bounds = Bounds { min: lo, max: 0.95 };
        let total: usize = sizes.iter().sum();
        match mask_global(&refs, s, bounds) {
            Ok(masks) => {
                let pruned: Vec<usize> = masks.iter().map(|m| m.iter().filter(|k| !**k).count()).collect();
                prop_assert_eq!(pruned.iter().sum::<usize>(), count(s, total));
                for (p, &n) in pruned.iter().zip(&sizes) {
                    let hi = (0.95 * n as f64).floor() as usize;
                    prop_assert!(*p >= ((lo * n as f64).ceil() as usize).min(hi) && *p <= hi);
                }
            }
            Err(e) => {
                // Only when the bounds cannot hold the requested count.
                let need: usize = sizes.iter().map(|&n| ((lo * n as f64).ceil() as usize).min((0.95 * n as f64).floor() as usize)).sum();
                let room: usize = sizes.iter().map(|&n| (0.95 * n as f64).floor() as usize).sum();
                let k = count(s, total);
                prop_assert!(k < need || k > room, "{e}");
            }
        }
    }

    /// Spread counts sum exactly and never exceed a group.
    #[test]
    fn spread_sums_exactly(sizes in prop::collection::vec(0usize..50, 1..10), frac in 0.0f64..1.0) {
        let n: usize = sizes.iter().sum();
        let total = count(frac, n);
        let c = spread(total, &sizes);
        prop_assert_eq!(c.iter().sum::<usize>(), total);
        prop_assert!(c.iter().zip(&sizes).all(|(a, b)| a <= b));
    }
}

#[test]
fn bad_sparsities_and_patterns_are_errors() {
    for s in [-0.1, 1.0, 1.5, f64::NAN] {
        assert!(check_sparsity("--sparsity", s).unwrap_err().to_string().contains("[0, 1)"));
    }
    assert!(check_nm("layer `fc`", 4, 4, 16).unwrap_err().to_string().contains("0 < N < M"));
    assert!(check_nm("layer `fc`", 2, 4, 18).unwrap_err().to_string().contains("18 inputs"));
    let e = mask_global(&[&[1.0; 10][..]], 0.5, Bounds { min: 0.0, max: 0.3 }).unwrap_err().to_string();
    assert!(e.contains("bounds"), "{e}");
}
