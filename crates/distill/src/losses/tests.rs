use candle_core::{Device, Tensor, Var};

use super::*;

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn scalar(x: &Tensor) -> f64 {
    f64::from(x.to_scalar::<f32>().unwrap())
}

#[test]
fn soft_target_is_t_squared_kl_of_softened_distributions() {
    let (s, te) = (t(&[1.0, 2.0, 0.5, -1.0, 0.0, 3.0], &[2, 3]), t(&[2.0, 1.0, 0.0, 0.5, 0.5, 1.0], &[2, 3]));
    for temp in [1.0, 2.0, 4.0] {
        let got = scalar(&soft_target(&s, &te, temp).unwrap());
        let soft = |row: &[f32]| -> Vec<f64> {
            let e: Vec<f64> = row.iter().map(|v| (f64::from(*v) / temp).exp()).collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|v| v / z).collect()
        };
        let sv = s.to_vec2::<f32>().unwrap();
        let tv = te.to_vec2::<f32>().unwrap();
        let want: f64 = (0..2)
            .map(|r| {
                let (p, q) = (soft(&tv[r]), soft(&sv[r]));
                p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum::<f64>()
            })
            .sum::<f64>()
            * temp
            * temp
            / 2.0;
        assert!((got - want).abs() < 1e-5, "T = {temp}: {got} vs {want}");
    }
    assert!(scalar(&soft_target(&s, &s, 3.0).unwrap()).abs() < 1e-6, "zero for identical logits");
}

#[test]
fn the_teacher_gets_no_gradient_and_the_student_does() {
    let s = Var::from_tensor(&t(&[1.0, 2.0, 0.5, -1.0, 0.0, 3.0], &[2, 3])).unwrap();
    let te = Var::from_tensor(&t(&[2.0, 1.0, 0.0, 0.5, 0.5, 1.0], &[2, 3])).unwrap();
    let labels = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
    let loss = combined(s.as_tensor(), te.as_tensor(), &labels, 4.0, 0.7).unwrap();
    let g = loss.backward().unwrap();
    assert!(g.get(s.as_tensor()).is_some());
    assert!(g.get(te.as_tensor()).is_none());
}

#[test]
fn combined_weighs_soft_and_hard() {
    let (s, te) = (t(&[1.0, 2.0, 0.5, -1.0, 0.0, 3.0], &[2, 3]), t(&[2.0, 1.0, 0.0, 0.5, 0.5, 1.0], &[2, 3]));
    let labels = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
    let (soft, hard) = (scalar(&soft_target(&s, &te, 2.0).unwrap()), scalar(&hard_label(&s, &labels).unwrap()));
    for a in [0.0, 0.3, 1.0] {
        let c = scalar(&combined(&s, &te, &labels, 2.0, a).unwrap());
        assert!((c - (a * soft + (1.0 - a) * hard)).abs() < 1e-5);
    }
}

#[test]
fn embedding_and_feature_losses() {
    let a = t(&[1.0, 0.0, 0.0, 2.0], &[2, 2]);
    assert!(scalar(&embedding_cosine(&a, &(&a * 3.0).unwrap()).unwrap()).abs() < 1e-6, "scale-invariant");
    let b = t(&[0.0, 1.0, 0.0, -2.0], &[2, 2]);
    assert!((scalar(&embedding_cosine(&a, &b).unwrap()) - 1.5).abs() < 1e-6, "orthogonal and opposite: 1 − (0 − 1)/2");
    assert!((scalar(&embedding_mse(&a, &b).unwrap()) - 4.5).abs() < 1e-6, "(1 + 1 + 0 + 16) / 4");
    assert!(scalar(&hint(&a, &a, None).unwrap()) == 0.0);
    // Attention maps ignore the channel count and the overall scale, not the spatial pattern.
    let f = Tensor::arange(0f32, 2.0 * 3.0 * 2.0 * 2.0, &Device::Cpu).unwrap().reshape((2, 3, 2, 2)).unwrap();
    let wider = (f.repeat((1, 2, 1, 1)).unwrap() * 7.0).unwrap();
    assert!(scalar(&attention_transfer(&wider, &f).unwrap()).abs() < 1e-9);
    let flipped = f.flip(&[3]).unwrap();
    assert!(scalar(&attention_transfer(&flipped, &f).unwrap()) > 1e-3);
}

#[test]
fn bad_options_and_shapes_are_errors() {
    let (s, te) = (t(&[1.0, 2.0, 3.0], &[1, 3]), t(&[1.0, 2.0], &[1, 2]));
    assert!(soft_target(&s, &s, 0.0).unwrap_err().to_string().contains("> 0"));
    assert!(soft_target(&s, &s, f64::NAN).is_err());
    assert!(soft_target(&s, &te, 2.0).unwrap_err().to_string().contains("student vs teacher"));
    let labels = Tensor::new(&[0u32], &Device::Cpu).unwrap();
    assert!(combined(&s, &s, &labels, 2.0, 1.5).unwrap_err().to_string().contains("[0, 1]"));
    assert!(hard_label(&s, &Tensor::new(&[0u32, 1], &Device::Cpu).unwrap()).is_err());
    assert!(attention_transfer(&s, &s).is_err());
}
