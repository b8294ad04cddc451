use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

/// Inputs with correlated features of very different scales, a random weight, and the
/// Hessian 2XᵀX/n.
fn problem(rows: usize, cols: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let scale: Vec<f32> = (0..cols).map(|j| 0.2 + (j % 7) as f32).collect();
    let x: Vec<f32> = (0..n * cols)
        .map(|i| {
            let (r, j) = (i / cols, i % cols);
            (rng.random::<f32>() - 0.5 + 0.5 * ((r * 31 + j / 3) % 5) as f32 / 5.0) * scale[j]
        })
        .collect();
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.random::<f32>() - 0.5).collect();
    let mut h = vec![0f64; cols * cols];
    for r in 0..n {
        for a in 0..cols {
            for b in 0..cols {
                h[a * cols + b] += 2.0 * f64::from(x[r * cols + a]) * f64::from(x[r * cols + b]) / n as f64;
            }
        }
    }
    (x, w, h)
}

/// ‖X·Wᵀ − X·Ŵᵀ‖² over the calibration rows.
fn output_error(x: &[f32], w: &[f32], w2: &[f32], rows: usize, cols: usize) -> f64 {
    let n = x.len() / cols;
    let mut e = 0.0;
    for r in 0..n {
        for o in 0..rows {
            let d: f64 =
                (0..cols).map(|j| f64::from(x[r * cols + j]) * f64::from(w[o * cols + j] - w2[o * cols + j])).sum();
            e += d * d;
        }
    }
    e
}

#[test]
fn sparsegpt_prunes_exactly_and_beats_magnitude_on_the_outputs() {
    let (rows, cols, n) = (12, 160, 400);
    let (x, w, h) = problem(rows, cols, n, 1);
    for (pattern, magnitude) in [
        (
            Pattern::Unstructured(0.5),
            crate::select::mask_lowest(&w.iter().map(|v| v.abs()).collect::<Vec<_>>(), rows * cols / 2),
        ),
        (
            Pattern::Nm { n: 2, m: 4 },
            crate::select::mask_nm(&w.iter().map(|v| v.abs()).collect::<Vec<_>>(), rows, cols, 2, 4),
        ),
    ] {
        let mut ws = w.clone();
        let keep = prune("fc", &mut ws, rows, cols, &h, pattern, 0.01).unwrap();
        assert_eq!(keep.iter().filter(|k| !**k).count(), rows * cols / 2, "{pattern:?}");
        assert!(ws.iter().zip(&keep).all(|(v, k)| *k || *v == 0.0), "pruned weights are zero");
        if let Pattern::Nm { n, m } = pattern {
            assert!(keep.chunks(m).all(|g| g.iter().filter(|k| **k).count() == n));
        }
        let wm: Vec<f32> = w.iter().zip(&magnitude).map(|(v, k)| if *k { *v } else { 0.0 }).collect();
        let (e_gpt, e_mag) = (output_error(&x, &w, &ws, rows, cols), output_error(&x, &w, &wm, rows, cols));
        assert!(e_gpt < 0.7 * e_mag, "{pattern:?}: sparsegpt {e_gpt} vs magnitude {e_mag}");
    }
}

#[test]
fn a_singular_hessian_is_dampened_and_dead_inputs_are_dropped() {
    let (rows, cols) = (3, 8);
    let mut h = vec![0f64; cols * cols];
    for j in 0..cols - 1 {
        h[j * cols + j] = 1.0 + j as f64;
    }
    let mut w = vec![1f32; rows * cols];
    prune("fc", &mut w, rows, cols, &h, Pattern::Unstructured(0.25), 0.01).unwrap();
    assert!((0..rows).all(|r| w[r * cols + cols - 1] == 0.0), "the input that never fired is dropped");
    assert!(
        prune("fc", &mut w, rows, cols, &h, Pattern::Unstructured(0.25), 0.0)
            .unwrap_err()
            .to_string()
            .contains("dampening")
    );
}
