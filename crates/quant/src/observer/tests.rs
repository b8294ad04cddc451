use proptest::prelude::*;

use super::*;

fn stats_of(x: &[f32]) -> ActStats {
    let mut s = ActStats::new();
    for chunk in x.chunks(100) {
        s.observe_range(chunk, 0.01);
    }
    for chunk in x.chunks(100) {
        s.observe_histogram(chunk);
    }
    s
}

/// A seeded standard-normal sample with two large outliers.
fn gaussian_with_outliers(n: usize) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut v: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    v[0] = 40.0;
    v[1] = -35.0;
    v
}

#[test]
fn min_max_and_moving_average_follow_their_definitions() {
    let mut s = ActStats::new();
    s.observe_range(&[-1.0, 2.0], 0.5);
    s.observe_range(&[-3.0, 4.0], 0.5);
    assert_eq!(s.range(ObserverKind::MinMax, 256, false), (-3.0, 4.0));
    assert_eq!(s.range(ObserverKind::MovingAverage { momentum: 0.5 }, 256, false), (-2.0, 3.0));
}

#[test]
fn clipping_observers_ignore_outliers_that_min_max_keeps() {
    let x = gaussian_with_outliers(20_000);
    let s = stats_of(&x);
    let amax = s.amax();
    assert_eq!(amax, 40.0);
    let (_, p) = s.range(ObserverKind::Percentile { pct: 99.9 }, 256, true);
    assert!((3.0..4.0).contains(&p), "99.9th percentile of |N(0,1)| ≈ 3.29, found {p}");
    // At 4 bits the rounding error of a range stretched to the outliers outweighs clipping them.
    let (_, m) = s.range(ObserverKind::Mse, 16, true);
    assert!(m < amax / 2.0 && m > 2.0, "MSE clips the outliers: {m}");
    let (_, k) = s.range(ObserverKind::Entropy, 256, true);
    assert!(k < amax / 2.0 && k > 2.0, "KL clips the outliers: {k}");
    // The MSE choice really has a lower error on the data than min-max.
    let err = |t: f32| -> f64 {
        let step = 2.0 * t / 15.0;
        x.iter().map(|&v| f64::from(v - (v.clamp(-t, t) / step).round_ties_even() * step).powi(2)).sum()
    };
    assert!(err(m) < err(amax), "mse {} vs minmax {}", err(m), err(amax));
}

#[test]
fn asymmetric_ranges_stay_inside_what_was_seen() {
    let x: Vec<f32> = (0..5000).map(|i| (i % 997) as f32 / 997.0 * 6.0).collect(); // post-ReLU-like
    let s = stats_of(&x);
    for kind in [ObserverKind::Percentile { pct: 99.0 }, ObserverKind::Mse, ObserverKind::Entropy] {
        let (lo, hi) = s.range(kind, 256, false);
        assert!(lo >= s.min - 1e-6 && hi <= s.max + 1e-6 && hi > lo, "{kind}: [{lo}, {hi}]");
    }
}

#[test]
fn observer_names_parse_and_bad_ones_are_refused() {
    assert_eq!(ObserverKind::parse("percentile:99.9").unwrap(), ObserverKind::Percentile { pct: 99.9 });
    assert_eq!(ObserverKind::parse("kl").unwrap(), ObserverKind::Entropy);
    for bad in ["percentile:20", "moving-average:0", "median", "mse:x"] {
        assert!(ObserverKind::parse(bad).is_err(), "{bad} parsed");
    }
    let e = ObserverKind::parse("median").unwrap_err().to_string();
    assert!(e.contains("--observer") && e.contains("`median`"), "{e}");
}

proptest! {
    #[test]
    fn percentile_is_monotone_and_within_the_range(
        counts in proptest::collection::vec(0u64..50, 8..64),
        p1 in 51.0f64..100.0,
        p2 in 51.0f64..100.0,
    ) {
        prop_assume!(counts.iter().sum::<u64>() > 0);
        let (a, b) = (percentile(&counts, -1.0, 3.0, p1.min(p2)), percentile(&counts, -1.0, 3.0, p1.max(p2)));
        prop_assert!(a <= b + 1e-6);
        prop_assert!((-1.0..=3.0 + 1e-6).contains(&a) && (-1.0..=3.0 + 1e-6).contains(&b));
    }

    #[test]
    fn kl_and_mse_thresholds_never_exceed_the_largest_magnitude(
        counts in proptest::collection::vec(0u64..1000, BINS..=BINS),
        amax in 0.1f32..100.0,
    ) {
        let k = kl_threshold(&counts, amax, 128);
        let m = mse_threshold(&counts, amax, 256);
        prop_assert!(k > 0.0 && k <= amax * (1.0 + 1e-6));
        prop_assert!(m > 0.0 && m <= amax * (1.0 + 1e-6));
    }
}
