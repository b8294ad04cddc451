//! Per-layer overrides: `GLOB=SPARSITY` or `GLOB=nm:N:M` in place of the run's one pattern,
//! for the layers (unstructured) or groups (structured) a glob matches; the last matching
//! override wins, as in quantization's overrides.
//!
//! Every override must match something the run prunes, and every layer's pattern is checked
//! before any layer is pruned.

use std::collections::BTreeMap;

use pare_core_tensor::select::PathPattern;
use pare_core_tensor::{Error, Module, Result};

use crate::structured::Group;
use crate::unstructured::{Calibration, Criterion, Pattern, Pruned, check, plan_with, store_sparse_with};

/// One override: the layers (or structured groups) `glob` matches take `pattern`.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// Glob over layer paths (`*` also crosses dots), or a regex after `re:`. Structured
    /// pruning matches it against a group's scope (`encoder.layer.3`, `layers.0`, `conv1`).
    pub glob: String,
    /// What those layers get: a layer-wise sparsity or an N:M pattern.
    pub pattern: Pattern,
}

impl Override {
    /// Parses `GLOB=SPARSITY` (a fraction in [0, 1), 0 leaves the layer alone) or
    /// `GLOB=nm:N:M`, e.g. `encoder.layer.0.*=0.3` or `layers.1=nm:2:4`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || Error::invalid("--override", format!("expected GLOB=SPARSITY or GLOB=nm:N:M, found `{text}`"));
        let (glob, spec) = text.split_once('=').ok_or_else(bad)?;
        if glob.is_empty() || spec.is_empty() {
            return Err(bad());
        }
        PathPattern::parse(glob, "--override")?;
        let pattern = match spec.strip_prefix("nm:") {
            Some(nm) => {
                let (n, m) = nm.split_once(':').ok_or_else(bad)?;
                let (n, m) = (n.parse::<usize>().map_err(|_| bad())?, m.parse::<usize>().map_err(|_| bad())?);
                if n == 0 || n >= m {
                    return Err(Error::invalid(
                        format!("--override `{text}`"),
                        format!("an N:M pattern needs 0 < N < M, found {n}:{m}"),
                    ));
                }
                Pattern::Nm { n, m }
            }
            None => {
                let s: f64 = spec.parse().map_err(|_| bad())?;
                crate::select::check_sparsity(&format!("--override `{text}`"), s)?;
                Pattern::Unstructured { sparsity: s, global: None }
            }
        };
        Ok(Self { glob: glob.to_string(), pattern })
    }
}

/// The overrides' matchers, each checked to match at least one of `names` (`what` names
/// them in the error).
fn matchers<'a>(
    overrides: &'a [Override],
    names: &[String],
    what: &'static str,
) -> Result<Vec<(PathPattern, &'a Override)>> {
    overrides
        .iter()
        .map(|o| {
            let m = PathPattern::parse(&o.glob, "--override")?;
            if !names.iter().any(|p| m.is_match(p)) {
                return Err(Error::unknown(what, &o.glob, names.iter().map(String::as_str)));
            }
            Ok((m, o))
        })
        .collect()
}

/// Each of `paths` with its pattern: the last override matching it, else `default`. An
/// override that matches no selected layer, or any override with a `global` default (one
/// threshold across layers has no per-layer sparsity to override), is an error.
pub fn per_layer(paths: &[String], default: Pattern, overrides: &[Override]) -> Result<Vec<(String, Pattern)>> {
    if overrides.is_empty() {
        return Ok(paths.iter().map(|p| (p.clone(), default)).collect());
    }
    if matches!(default, Pattern::Unstructured { global: Some(_), .. }) {
        return Err(Error::invalid(
            "--override",
            "a global threshold sets every layer's sparsity from one ranking; per-layer overrides apply to layer-wise sparsity (drop --global)",
        ));
    }
    let ms = matchers(overrides, paths, "override pattern (among the selected layers)")?;
    Ok(paths
        .iter()
        .map(|p| (p.clone(), ms.iter().rev().find(|(m, _)| m.is_match(p)).map_or(default, |(_, o)| o.pattern)))
        .collect())
}

/// The layers grouped by pattern, in order of each pattern's first layer.
fn by_pattern(layers: &[(String, Pattern)]) -> Vec<(Pattern, Vec<String>)> {
    let mut out: Vec<(Pattern, Vec<String>)> = Vec::new();
    for (p, pat) in layers {
        match out.iter_mut().find(|(q, _)| q == pat) {
            Some((_, v)) => v.push(p.clone()),
            None => out.push((*pat, vec![p.clone()])),
        }
    }
    out
}

/// [`check`] for every layer against its own pattern.
pub fn check_each(
    model: &dyn Module,
    layers: &[(String, Pattern)],
    criterion: Criterion,
    calib: Option<&Calibration>,
) -> Result<()> {
    let groups = by_pattern(layers);
    if groups.is_empty() {
        return Err(Error::invalid("layer selection", "no layer to prune (expected ≥ 1, found 0)"));
    }
    groups.iter().try_for_each(|(pat, paths)| check(model, paths, criterion, *pat, calib))
}

/// [`plan_with`] with a pattern per layer (from [`per_layer`]). Every layer is checked
/// against its pattern before any decision is made; a layer whose sparsity is 0 keeps every
/// weight (and is still reported). Statistics come in the order of `layers`.
pub fn plan_each(
    model: &dyn Module,
    layers: &[(String, Pattern)],
    criterion: Criterion,
    calib: Option<&Calibration>,
    on_layer: &mut dyn FnMut(&str),
) -> Result<Pruned> {
    check_each(model, layers, criterion, calib)?;
    let groups = by_pattern(layers);
    let mut out = Pruned::default();
    for (pat, paths) in &groups {
        let part = plan_with(model, paths, criterion, *pat, calib, on_layer)?;
        out.masks.extend(part.masks);
        out.values.extend(part.values);
        out.shapes.extend(part.shapes);
        out.stats.extend(part.stats);
    }
    let order: BTreeMap<&str, usize> = layers.iter().enumerate().map(|(i, (p, _))| (p.as_str(), i)).collect();
    out.stats.sort_by_key(|s| order[s.path.as_str()]);
    Ok(out)
}

/// [`crate::store_sparse`] with each layer's own pattern (N:M layers stored N:M, the rest CSR
/// where that is smaller).
pub fn store_sparse_each(
    model: &mut dyn Module,
    pruned: &Pruned,
    layers: &[(String, Pattern)],
) -> Result<Vec<(String, String)>> {
    let of: BTreeMap<&str, Pattern> = layers.iter().map(|(p, pat)| (p.as_str(), *pat)).collect();
    store_sparse_with(model, pruned, &|p| {
        of.get(p).copied().ok_or_else(|| Error::unknown("pruned layer (with a pattern)", p, of.keys().copied()))
    })
}

/// Each group's sparsity for structured pruning: the last override matching the group's
/// [`Group::scope`], else `default`. Structured overrides take a sparsity, not an N:M pattern.
pub fn per_group(groups: &[Group], default: f64, overrides: &[Override]) -> Result<Vec<f64>> {
    for o in overrides {
        if let Pattern::Nm { n, m } = o.pattern {
            return Err(Error::invalid(
                format!("--override `{}`", o.glob),
                format!("structured pruning removes whole units: give a sparsity, found the N:M pattern {n}:{m}"),
            ));
        }
    }
    let scopes: Vec<String> = groups.iter().map(|g| g.scope().to_string()).collect();
    let ms = matchers(overrides, &scopes, "override pattern (among the groups)")?;
    Ok(scopes
        .iter()
        .map(|s| ms.iter().rev().find(|(m, _)| m.is_match(s)).map_or(default, |(_, o)| o.pattern.sparsity()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sparsities_and_patterns_and_names_bad_ones() {
        let o = Override::parse("encoder.layer.0.*=0.3").unwrap();
        assert_eq!(o.glob, "encoder.layer.0.*");
        assert_eq!(o.pattern, Pattern::Unstructured { sparsity: 0.3, global: None });
        assert_eq!(Override::parse("layers.1=nm:2:4").unwrap().pattern, Pattern::Nm { n: 2, m: 4 });
        for (bad, says) in [
            ("layers.1", "expected GLOB=SPARSITY or GLOB=nm:N:M, found `layers.1`"),
            ("=0.5", "found `=0.5`"),
            ("layers.1=half", "found `layers.1=half`"),
            ("layers.1=1.0", "[0, 1)"),
            ("layers.1=nm:4:4", "0 < N < M, found 4:4"),
            ("layers.[=0.5", "bad glob"),
        ] {
            let e = Override::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn last_match_wins_and_every_override_must_match() {
        let paths: Vec<String> = ["layers.0", "layers.1", "layers.2"].map(String::from).to_vec();
        let d = Pattern::Unstructured { sparsity: 0.5, global: None };
        let ov = [Override::parse("layers.*=0.2").unwrap(), Override::parse("layers.2=nm:2:4").unwrap()];
        let got = per_layer(&paths, d, &ov).unwrap();
        let want = Pattern::Unstructured { sparsity: 0.2, global: None };
        assert_eq!(got.iter().map(|(_, p)| *p).collect::<Vec<_>>(), [want, want, Pattern::Nm { n: 2, m: 4 }]);
        let e = per_layer(&paths, d, &[Override::parse("fc9=0.1").unwrap()]).unwrap_err().to_string();
        assert!(e.contains("fc9") && e.contains("layers.0"), "{e}");
        let global = Pattern::Unstructured { sparsity: 0.5, global: Some(crate::Bounds { min: 0.0, max: 0.9 }) };
        assert!(per_layer(&paths, global, &ov).unwrap_err().to_string().contains("global"));
        assert_eq!(per_layer(&paths, global, &[]).unwrap().len(), 3);
    }

    fn mlp(spec: &str) -> pare_models::digits::DigitsNet {
        let vars = candle_nn::VarMap::new();
        pare_models::digits::DigitsNet::init(spec.parse().unwrap(), 4, &candle_core::Device::Cpu, &vars).unwrap()
    }

    #[test]
    fn each_layer_gets_its_own_exact_sparsity_or_pattern_and_keeps_it_in_storage() {
        let net = mlp("mlp:32,16");
        let paths = pare_core_tensor::select::Selection::default().resolve(&net).unwrap();
        assert_eq!(paths, ["layers.0", "layers.1"]);
        let d = Pattern::Unstructured { sparsity: 0.5, global: None };
        let ov = [Override::parse("layers.1=nm:2:4").unwrap()];
        let layers = per_layer(&paths, d, &ov).unwrap();
        let p = plan_each(&net, &layers, Criterion::Magnitude, None, &mut |_| {}).unwrap();
        assert_eq!(p.stats.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(), paths);
        assert_eq!(p.stats[0].pruned, 32 * 64 / 2);
        assert_eq!(p.stats[1].requested, 0.5);
        // Two of every four consecutive inputs of each row of layers.1 kept.
        assert!(p.masks["layers.1"].chunks(4).all(|g| g.iter().filter(|k| **k).count() == 2));
        let mut stored = net.clone();
        crate::apply(&mut stored, &p).unwrap();
        let formats = store_sparse_each(&mut stored, &p, &layers).unwrap();
        assert!(formats[1].1.contains("2:4"), "{formats:?}");
        // An override of 0 keeps a layer whole.
        let none = per_layer(&paths, d, &[Override::parse("layers.0=0").unwrap()]).unwrap();
        let p = plan_each(&net, &none, Criterion::Magnitude, None, &mut |_| {}).unwrap();
        assert_eq!((p.stats[0].pruned, p.stats[1].pruned), (0, 16 * 32 / 2));
        // A pattern one layer cannot take is found before any decision: 2:4 of 30 inputs.
        let odd = mlp("mlp:30,16");
        let bad = per_layer(&paths, Pattern::Nm { n: 2, m: 4 }, &[]).unwrap();
        let e = plan_each(&odd, &bad, Criterion::Magnitude, None, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("layers.1"), "{e}");
    }

    #[test]
    fn structured_overrides_set_each_groups_sparsity() {
        use crate::structured::{Structured, Unit, prune_units_each};
        let net = mlp("mlp:12,12");
        let groups = net.groups(Unit::Neurons).unwrap();
        assert_eq!(groups.iter().map(Group::scope).collect::<Vec<_>>(), ["layers.0", "layers.1"]);
        let s = per_group(&groups, 0.25, &[Override::parse("layers.1=0").unwrap()]).unwrap();
        assert_eq!(s, [0.25, 0.0]);
        let scores: Vec<Vec<f32>> = groups.iter().map(|g| (0..g.units).map(|u| u as f32).collect()).collect();
        let (small, stats) = prune_units_each(&net, Unit::Neurons, &s, &scores).unwrap();
        assert_eq!(stats.iter().map(|g| g.kept).collect::<Vec<_>>(), [9, 12]);
        assert!(small.parameter_count() < net.parameter_count());
        let e = per_group(&groups, 0.25, &[Override::parse("layers.*=nm:2:4").unwrap()]).unwrap_err().to_string();
        assert!(e.contains("N:M"), "{e}");
        let e = per_group(&groups, 0.25, &[Override::parse("conv1=0.5").unwrap()]).unwrap_err().to_string();
        assert!(e.contains("conv1") && e.contains("layers.0"), "{e}");
        let e = prune_units_each(&net, Unit::Neurons, &[0.25], &scores).unwrap_err().to_string();
        assert!(e.contains("[2]") || e.contains("2"), "{e}");
    }
}
