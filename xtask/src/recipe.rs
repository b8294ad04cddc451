//! TOML recipes for `cargo xtask compress`: ordered stages, each a transform with the options
//! of its own command (`prune`, `quantize`, `distill`) written as TOML keys, or `evaluate`.
//!
//! ```toml
//! [recipe]
//! name = "digits: distil, prune, quantize"
//! seed = 42
//!
//! [[stage]]
//! kind = "prune"
//! method = "magnitude"     # any `cargo xtask prune` option: --method magnitude
//! sparsity = 0.5
//! layers = ["conv*"]       # repeated options are arrays
//! ```
//!
//! A key is the command's flag without `--` (`calib_size` or `calib-size`); `true` switches a
//! flag on. The pipeline sets `model`, `out`, `teacher`, `json`, `runtime` and `threads`, so a
//! recipe may not. The whole recipe is parsed and checked — every key by the command's own
//! parser and checks, the stage order, the layer selectors against the model — before any
//! stage runs, and errors name the file, line, stage and key.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;

/// The stages a recipe may hold.
pub const KINDS: &[&str] = &["nas", "distill", "prune", "finetune", "quantize", "export", "evaluate", "bench"];

/// Structured pruning methods: they remove units, so later training keeps the model small.
const STRUCTURED: &[&str] = &["neurons", "channels", "heads", "layers"];

/// Keys the pipeline sets itself.
const RESERVED: &[&str] = &["model", "out", "teacher", "json", "runtime", "threads"];

/// What a stage does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Search an architecture (`cargo xtask nas`); the winner, trained, becomes the model (a
    /// digits architecture trained on the labels, or a sub-network of the input encoder).
    Nas,
    /// Distil the current model (the teacher) into a student (`cargo xtask distill`).
    Distill,
    /// Train the current model to reproduce the recipe's original model (`cargo xtask
    /// distill` with the original as teacher and the current model as the student to start
    /// from): the repair after structured pruning.
    Finetune,
    /// Prune the current model (`cargo xtask prune`).
    Prune,
    /// Quantize the current model (`cargo xtask quantize`).
    Quantize,
    /// Write the current model in a deployment format (GGUF, compressed-tensors) that holds
    /// it exactly; the written file is loaded back and measured like any stage's output.
    Export,
    /// Measure the current model (every stage's output is measured anyway; this adds a row).
    Evaluate,
    /// Time the current model at a batch shape of the recipe's choosing against the original
    /// on the same runtime and on candle f32.
    Bench,
}

impl Kind {
    /// The recipe's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Nas => "nas",
            Kind::Distill => "distill",
            Kind::Finetune => "finetune",
            Kind::Prune => "prune",
            Kind::Quantize => "quantize",
            Kind::Export => "export",
            Kind::Evaluate => "evaluate",
            Kind::Bench => "bench",
        }
    }
}

/// One stage: its kind, its options (the recipe's keys but `kind`) and where it starts.
#[derive(Debug, Clone)]
pub struct Stage {
    /// 1-based position in the recipe.
    pub index: usize,
    /// What it does.
    pub kind: Kind,
    /// Its options, as written.
    pub options: toml::Table,
    /// The line of its `[[stage]]` header.
    pub line: usize,
}

/// A parsed recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its text, recorded in the manifest.
    pub text: String,
    /// `[recipe] name`.
    pub name: String,
    /// `[recipe] seed`: every stage that takes a seed gets it unless it sets its own.
    pub seed: u64,
    /// The stages in order.
    pub stages: Vec<Stage>,
}

/// The line (1-based) where `key = ` appears in the `index`-th `[[stage]]` section, else that
/// section's header line.
fn line_of(text: &str, index: usize, key: Option<&str>) -> usize {
    let mut seen = 0;
    let mut header = 0;
    for (i, l) in text.lines().enumerate() {
        let t = l.trim_start();
        if t.starts_with("[[stage]]") {
            seen += 1;
            if seen == index {
                header = i + 1;
            } else if seen > index {
                break;
            }
            continue;
        }
        if seen == index
            && let Some(k) = key
            && let Some(rest) = t.strip_prefix(k)
            && rest.trim_start().starts_with('=')
        {
            return i + 1;
        }
    }
    header
}

impl Recipe {
    /// Reads and parses `path` (structure only; [`Recipe::stage_args`] checks the options).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read recipe `{}`", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses recipe text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        let doc: toml::Table = text.parse().map_err(|e| anyhow::anyhow!("recipe `{}`: {e}", path.display()))?;
        let at = |line: usize, msg: String| anyhow::anyhow!("recipe `{}` line {line}: {msg}", path.display());
        let top_line = |key: &str| {
            text.lines()
                .position(|l| l.trim_start().starts_with(&format!("[{key}")) || l.trim_start().starts_with(key))
                .map_or(1, |i| i + 1)
        };
        for key in doc.keys() {
            if key != "recipe" && key != "stage" {
                return Err(at(
                    top_line(key),
                    format!("unknown key `{key}`: expected [recipe] and [[stage]] sections"),
                ));
            }
        }
        let (mut name, mut seed) = (path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into()), 42);
        if let Some(r) = doc.get("recipe") {
            let Some(r) = r.as_table() else { return Err(at(top_line("recipe"), "`recipe` must be a table".into())) };
            for (k, v) in r {
                let line = text.lines().position(|l| l.trim_start().starts_with(k.as_str())).map_or(1, |i| i + 1);
                match (k.as_str(), v) {
                    ("name", toml::Value::String(s)) => name = s.clone(),
                    ("seed", toml::Value::Integer(i)) if *i >= 0 => seed = *i as u64,
                    ("description", toml::Value::String(_)) => {}
                    ("name" | "description", _) => return Err(at(line, format!("[recipe] {k} must be a string"))),
                    ("seed", _) => return Err(at(line, format!("[recipe] seed must be an integer ≥ 0, found {v}"))),
                    _ => {
                        return Err(at(
                            line,
                            format!("unknown key `{k}` in [recipe]: expected name, description, seed"),
                        ));
                    }
                }
            }
        }
        let stages = match doc.get("stage") {
            None => return Err(at(1, "no stages: add at least one [[stage]] with a `kind`".into())),
            Some(toml::Value::Array(a)) => a,
            Some(_) => return Err(at(top_line("stage"), "`stage` must be an array of tables: write [[stage]]".into())),
        };
        let mut out = Vec::new();
        for (i, s) in stages.iter().enumerate() {
            let index = i + 1;
            let line = line_of(text, index, None);
            let Some(table) = s.as_table() else { return Err(at(line, format!("stage {index} must be a table"))) };
            let mut options = table.clone();
            let kind = match options.remove("kind") {
                Some(toml::Value::String(k)) => match k.as_str() {
                    "nas" => Kind::Nas,
                    "distill" => Kind::Distill,
                    "finetune" => Kind::Finetune,
                    "prune" => Kind::Prune,
                    "quantize" => Kind::Quantize,
                    "export" => Kind::Export,
                    "evaluate" => Kind::Evaluate,
                    "bench" => Kind::Bench,
                    other => {
                        return Err(at(
                            line_of(text, index, Some("kind")),
                            format!("stage {index}: unknown kind `{other}`: expected one of {}", KINDS.join(", ")),
                        ));
                    }
                },
                Some(v) => return Err(at(line, format!("stage {index}: `kind` must be a string, found {v}"))),
                None => {
                    return Err(at(line, format!("stage {index}: no `kind`: expected one of {}", KINDS.join(", "))));
                }
            };
            out.push(Stage { index, kind, options, line });
        }
        let recipe = Recipe { path: path.to_path_buf(), text: text.to_string(), name, seed, stages: out };
        recipe.check_order()?;
        Ok(recipe)
    }

    /// An error at `key` of `stage` (its line, or the stage's header).
    pub fn error(&self, stage: &Stage, key: Option<&str>, msg: impl std::fmt::Display) -> anyhow::Error {
        let line = key.map_or(stage.line, |k| line_of(&self.text, stage.index, Some(k)).max(stage.line));
        anyhow::anyhow!(
            "recipe `{}` line {line}: stage {} ({}): {msg}",
            self.path.display(),
            stage.index,
            stage.kind.name()
        )
    }

    /// Stages that need float weights must come before the first quantize stage, and a
    /// finetune stage would fill in the zeros of an unstructured prune before it.
    fn check_order(&self) -> anyhow::Result<()> {
        let mut quantized: Option<&Stage> = None;
        let mut sparse: Option<&Stage> = None;
        for s in &self.stages {
            match s.kind {
                Kind::Prune => {
                    let method = s.options.get("method").and_then(|m| m.as_str()).unwrap_or("magnitude");
                    if !STRUCTURED.contains(&method) {
                        sparse = Some(s);
                    }
                }
                Kind::Distill | Kind::Nas => sparse = None,
                Kind::Finetune => {
                    if let Some(p) = sparse {
                        return Err(self.error(s, None, format!(
                            "finetune trains every weight, so it would fill in the zeros stage {} (prune, unstructured) made: \
                             give that stage `finetune = EPOCHS` (masked fine-tuning) instead, or prune structurally",
                            p.index
                        )));
                    }
                }
                _ => {}
            }
            match (s.kind, quantized) {
                (Kind::Quantize, None) => quantized = Some(s),
                (Kind::Quantize, Some(q)) => {
                    return Err(self.error(s, None, format!(
                        "stage {} already quantized the model; quantizing quantized weights again is not supported: merge the two stages",
                        q.index
                    )));
                }
                (Kind::Prune | Kind::Distill | Kind::Finetune | Kind::Nas, Some(q)) => {
                    return Err(self.error(
                        s,
                        None,
                        format!(
                            "{} needs float weights but stage {} (quantize) comes first: put {} before quantize",
                            s.kind.name(),
                            q.index,
                            s.kind.name()
                        ),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The command-line arguments `stage`'s options stand for, after `fixed` (the pipeline's
    /// own: `--model`, `--out`, ...; a `?key` there is a default the stage may set itself),
    /// with the recipe's seed unless the stage sets one.
    fn cli(&self, stage: &Stage, fixed: &[(&str, String)], takes_seed: bool) -> anyhow::Result<Vec<String>> {
        let mut args = Vec::new();
        for (k, v) in fixed {
            // `?key` is a default: the stage's own value wins.
            if let Some(k) = k.strip_prefix('?') {
                if stage.options.keys().any(|o| o.replace('-', "_") == k.replace('-', "_")) {
                    continue;
                }
                args.push(format!("--{}", k.replace('_', "-")));
            } else {
                args.push(format!("--{k}"));
            }
            args.push(v.clone());
        }
        let mut seeded = false;
        for (key, v) in &stage.options {
            let flag = key.replace('_', "-");
            if RESERVED.contains(&flag.as_str()) || (stage.kind == Kind::Finetune && flag == "student") {
                return Err(self.error(stage, Some(key), format!("`{key}` is set by the pipeline: remove it")));
            }
            seeded |= flag == "seed";
            let scalar = |v: &toml::Value| -> anyhow::Result<String> {
                match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    toml::Value::Float(f) => Ok(f.to_string()),
                    other => Err(self.error(
                        stage,
                        Some(key),
                        format!("`{key}` must be a string or a number, found {other}"),
                    )),
                }
            };
            match v {
                toml::Value::Boolean(true) => args.push(format!("--{flag}")),
                toml::Value::Boolean(false) => {}
                toml::Value::Array(items) => {
                    for item in items {
                        args.push(format!("--{flag}"));
                        args.push(scalar(item)?);
                    }
                }
                other => {
                    args.push(format!("--{flag}"));
                    args.push(scalar(other)?);
                }
            }
        }
        if takes_seed && !seeded {
            args.push("--seed".into());
            args.push(self.seed.to_string());
        }
        Ok(args)
    }

    /// `stage`'s options parsed by its command's own parser (`A`), errors naming the key.
    pub fn stage_args<A: clap::Args>(
        &self,
        stage: &Stage,
        fixed: &[(&str, String)],
        takes_seed: bool,
    ) -> anyhow::Result<A> {
        #[derive(clap::Parser)]
        #[command(no_binary_name = true)]
        struct Wrap<T: clap::Args> {
            #[command(flatten)]
            args: T,
        }
        let cli = self.cli(stage, fixed, takes_seed)?;
        match Wrap::<A>::try_parse_from(&cli) {
            Ok(w) => Ok(w.args),
            Err(e) => Err(self.clap_error(stage, &e)),
        }
    }

    fn clap_error(&self, stage: &Stage, e: &clap::Error) -> anyhow::Error {
        use std::error::Error as _;

        use clap::error::{ContextKind, ContextValue, ErrorKind};
        let arg = match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(s)) => Some(s.clone()),
            Some(ContextValue::Strings(v)) => v.first().cloned(),
            _ => None,
        };
        // `--calib-size <CALIB_SIZE>` → `calib_size` as a recipe would spell it.
        let key = arg
            .as_deref()
            .map(|a| a.trim_start_matches('-').split([' ', '=']).next().unwrap_or_default().replace('-', "_"));
        let suggestion = match e.get(ContextKind::SuggestedArg) {
            Some(ContextValue::String(s)) => {
                format!(" (did you mean `{}`?)", s.trim_start_matches('-').replace('-', "_"))
            }
            _ => String::new(),
        };
        let value = match e.get(ContextKind::InvalidValue) {
            Some(ContextValue::String(s)) => s.clone(),
            _ => String::new(),
        };
        let first = e.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
        let k = key.clone().unwrap_or_default();
        let lookup = stage.options.keys().find(|o| o.replace('-', "_") == k).cloned();
        let msg = match e.kind() {
            ErrorKind::UnknownArgument => format!("unknown key `{k}`{suggestion}"),
            ErrorKind::MissingRequiredArgument => format!("missing key `{k}`"),
            ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
                let detail = e.source().map(|s| format!(": {s}")).unwrap_or_default();
                format!("invalid value `{value}` for `{k}`{detail}")
            }
            _ => first,
        };
        self.error(stage, lookup.as_deref(), msg)
    }
}
