//! Which layers a transform touches: globs or regular expressions over layer paths, checked
//! against the model before any work starts (a pattern that matches nothing is an error).

use globset::Glob;

use crate::hooks::LayerKind;
use crate::{Error, Module, Result};

/// A layer-path pattern: a glob (`encoder.layer.*.output.dense`), or a regular expression
/// after `re:` that must match the whole path (`re:encoder\.layer\.[0-2]\..*`).
#[derive(Debug, Clone)]
pub enum PathPattern {
    /// A glob (`*` also crosses dots).
    Glob(globset::GlobMatcher),
    /// An anchored regular expression.
    Regex(regex::Regex),
}

impl PathPattern {
    /// Parses `text`; `flag` names the option in errors.
    pub fn parse(text: &str, flag: &str) -> Result<Self> {
        match text.strip_prefix("re:") {
            Some(re) => regex::Regex::new(&format!("^(?:{re})$"))
                .map(PathPattern::Regex)
                .map_err(|e| Error::invalid(flag, format!("bad regular expression `{re}`: {e}"))),
            None => Glob::new(text)
                .map(|g| PathPattern::Glob(g.compile_matcher()))
                .map_err(|e| Error::invalid(flag, format!("bad glob `{text}`: {e}"))),
        }
    }

    /// Whether `path` matches.
    pub fn is_match(&self, path: &str) -> bool {
        match self {
            PathPattern::Glob(g) => g.is_match(path),
            PathPattern::Regex(r) => r.is_match(path),
        }
    }
}

/// Which layers a transform touches.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Globs over layer paths (`encoder.layer.*.attention.*`), or regexes after `re:`; empty
    /// means every linear and convolution except the final classifier. A layer named by a
    /// pattern is taken even if it is an embedding or the classifier.
    pub include: Vec<String>,
    /// Globs of layers to leave alone, applied after `include`.
    pub exclude: Vec<String>,
}

impl Selection {
    /// The selected layer paths of `model` (linear, convolution and embedding layers only), in
    /// forward order. Every pattern must match at least one layer, so a typo is an error
    /// before any work starts.
    pub fn resolve(&self, model: &dyn Module) -> Result<Vec<String>> {
        let layers = model.layers();
        let build = |pats: &[String]| -> Result<Vec<PathPattern>> {
            pats.iter()
                .map(|p| {
                    let m = PathPattern::parse(p, "--layers")?;
                    if !layers.iter().any(|l| m.is_match(l.path())) {
                        return Err(Error::unknown("layer pattern", p, layers.iter().map(|l| l.path())));
                    }
                    Ok(m)
                })
                .collect()
        };
        let (inc, exc) = (build(&self.include)?, build(&self.exclude)?);
        let classifier = model.classifier_path();
        Ok(layers
            .iter()
            .filter(|l| {
                let p = l.path();
                let weighted = matches!(l.kind(), LayerKind::Linear | LayerKind::Conv2d | LayerKind::Embedding);
                let chosen = if inc.is_empty() {
                    matches!(l.kind(), LayerKind::Linear | LayerKind::Conv2d) && classifier.as_deref() != Some(p)
                } else {
                    inc.iter().any(|m| m.is_match(p))
                };
                weighted && chosen && !exc.iter().any(|m| m.is_match(p))
            })
            .map(|l| l.path().to_string())
            .collect())
    }
}
