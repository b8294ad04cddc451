//! Layer taps: intermediate outputs of named layers, captured during an ordinary forward pass
//! through core-tensor's [`Hooks`](pare_core_tensor::Hooks) — no rewritten model, no second forward. A student's taps
//! keep their autograd graph (the hint loss trains through them); a teacher's are detached.
//!
//! A [`FeatureMap`] pairs student layers with teacher layers (`student=teacher,...` on the
//! command line); [`FeatureMap::check`] names any path that is not a layer of its model.

use std::collections::BTreeMap;

use candle_core::Tensor;
use pare_core_tensor::hooks::{Observer, Site};
use pare_core_tensor::{Error, Module, Result};

/// Captures the outputs of the layers at the given parameter paths (a convolution's output
/// before its activation, a linear layer's before its activation, a layer norm's output).
/// A layer called more than once per forward pass keeps its last output.
#[derive(Debug, Default, Clone)]
pub struct Taps {
    wanted: Vec<String>,
    captured: BTreeMap<String, Tensor>,
    detach: bool,
}

impl Taps {
    /// Taps on `paths`; their outputs keep the autograd graph (for a student).
    pub fn new<S: AsRef<str>>(paths: &[S]) -> Self {
        Self {
            wanted: paths.iter().map(|p| p.as_ref().to_string()).collect(),
            captured: BTreeMap::new(),
            detach: false,
        }
    }

    /// Taps on `paths` whose outputs are detached (for a frozen teacher).
    pub fn detached<S: AsRef<str>>(paths: &[S]) -> Self {
        Self { detach: true, ..Self::new(paths) }
    }

    /// Whether nothing is tapped.
    pub fn is_empty(&self) -> bool {
        self.wanted.is_empty()
    }

    /// Takes the captured output of `path`, or an error naming the layer when the last forward
    /// pass did not run through it.
    pub fn take(&mut self, path: &str) -> Result<Tensor> {
        self.captured.remove(path).ok_or_else(|| {
            Error::invalid(format!("layer tap `{path}`"), "the forward pass did not run through this layer")
        })
    }

    /// Forgets everything captured (before the next forward pass).
    pub fn clear(&mut self) {
        self.captured.clear();
    }
}

impl Observer for Taps {
    fn observe(&mut self, site: &Site<'_>, _input: &Tensor, output: &Tensor) -> Result<()> {
        if self.wanted.iter().any(|w| w == site.path) {
            let t = if self.detach { output.detach() } else { output.clone() };
            self.captured.insert(site.path.to_string(), t);
        }
        Ok(())
    }
}

/// Pairs of (student layer, teacher layer) whose outputs a hint loss brings together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeatureMap {
    /// `(student path, teacher path)` in the order given.
    pub pairs: Vec<(String, String)>,
}

impl std::str::FromStr for FeatureMap {
    type Err = Error;

    /// `student=teacher[,student=teacher...]`, e.g. `layers.0=fc1` or
    /// `encoder.layer.0.output.LayerNorm=encoder.layer.1.output.LayerNorm`. Empty is no map.
    fn from_str(s: &str) -> Result<Self> {
        let mut pairs = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                Some((a, b)) if !a.trim().is_empty() && !b.trim().is_empty() => {
                    pairs.push((a.trim().to_string(), b.trim().to_string()));
                }
                _ => {
                    return Err(Error::invalid(
                        "--features",
                        format!("expected student_layer=teacher_layer pairs separated by commas, found `{item}`"),
                    ));
                }
            }
        }
        Ok(Self { pairs })
    }
}

impl FeatureMap {
    /// Whether the map pairs no layers.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The student-side paths.
    pub fn student_paths(&self) -> Vec<&str> {
        self.pairs.iter().map(|(s, _)| s.as_str()).collect()
    }

    /// The teacher-side paths.
    pub fn teacher_paths(&self) -> Vec<&str> {
        self.pairs.iter().map(|(_, t)| t.as_str()).collect()
    }

    /// Checks every path against the layers of its model: an unknown one is an error naming
    /// it, which side it was on, and the layers that model has.
    pub fn check(&self, student: &dyn Module, teacher: &dyn Module) -> Result<()> {
        for (side, model, paths) in
            [("student", student, self.student_paths()), ("teacher", teacher, self.teacher_paths())]
        {
            let layers = model.layers();
            let known: Vec<&str> = layers.iter().map(|l| l.path()).collect();
            if let Some(bad) = paths.iter().find(|p| !known.contains(p)) {
                return Err(Error::unknown(
                    if side == "student" { "student layer" } else { "teacher layer" },
                    bad,
                    known.iter().copied(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pare_core_tensor::{Hooks, LayerKind};

    #[test]
    fn feature_maps_parse_pairs_and_refuse_anything_else() {
        let m: FeatureMap = " layers.0=fc1 , layers.1 = fc2 ".parse().unwrap();
        assert_eq!(m.pairs, vec![("layers.0".into(), "fc1".into()), ("layers.1".into(), "fc2".into())]);
        assert!("".parse::<FeatureMap>().unwrap().is_empty());
        for bad in ["fc1", "=fc1", "layers.0=", "a=b,c"] {
            let e = bad.parse::<FeatureMap>().unwrap_err().to_string();
            assert!(e.contains("--features") && e.contains("student_layer=teacher_layer"), "{bad}: {e}");
        }
    }

    #[test]
    fn taps_capture_only_the_named_layers_and_detach_when_asked() {
        let x =
            candle_core::Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &candle_core::Device::Cpu).unwrap()).unwrap();
        let y = (x.as_tensor() * 3.0).unwrap();
        let site = |path| Site { path, kind: LayerKind::Linear, weight_shape: &[2, 2] };
        let (mut live, mut frozen) = (Taps::new(&["a"]), Taps::detached(&["a"]));
        for taps in [&mut live, &mut frozen] {
            let mut hooks = Hooks::with(taps);
            hooks.emit(&site("a"), x.as_tensor(), &y).unwrap();
            hooks.emit(&site("b"), x.as_tensor(), &y).unwrap();
        }
        let g = live.take("a").unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some(), "a student's tap keeps its graph");
        let g = frozen.take("a").unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_none(), "a teacher's tap is detached");
        assert!(live.take("b").unwrap_err().to_string().contains("layer tap `b`"));
    }
}
