//! The report of a `cargo xtask compress` run: `report.json` (for other tools), `report.md`
//! (the summary, every stage against the original and against candle f32, the final model
//! layer by layer) and two plots, `tradeoff.svg` (quality against size, stage by stage) and
//! `sensitivity.svg` (what each layer's compression costs on its own). `cargo xtask report DIR`
//! re-renders the Markdown and the plots from the JSON.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// One row of the report: the original or a stage's output, measured.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Row {
    /// `original`, or `N kind`.
    pub stage: String,
    /// Where the model is.
    pub path: PathBuf,
    /// Bytes of the weights as stored (codes, scales, sparse indices).
    pub bytes: usize,
    /// Logical parameters.
    pub params: usize,
    /// Stored bits per logical parameter.
    pub bits_per_weight: f64,
    /// Fraction of zero weights in the linear, convolution and embedding layers.
    pub sparsity: f64,
    /// Multiply-accumulates of the linear and convolution layers per example (one image, or
    /// one sequence of the timed length), counted dense.
    pub macs: u64,
    /// The quality metric's value.
    pub quality: f64,
    /// Milliseconds per timed batch on the runtime (median).
    pub latency_ms: f64,
    /// Examples (images or sequences) per second on the runtime.
    pub throughput: f64,
    /// Seconds the stage took (absent for the original and for stages resumed from an earlier
    /// run).
    pub seconds: Option<f64>,
}

/// The peer every row is also compared with: the original model in f32 on candle's ops.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Baseline {
    /// What ran.
    pub name: String,
    /// Milliseconds per timed batch (median, timed in the same rounds as the rows).
    pub latency_ms: f64,
    /// Examples per second.
    pub throughput: f64,
}

/// One weighted layer of the final model.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct LayerRow {
    /// Parameter path.
    pub path: String,
    /// The weight's format, as `Weight::describe` says it.
    pub format: String,
    /// The weight's logical shape.
    pub shape: Vec<usize>,
    /// Stored bytes of the weight.
    pub bytes: usize,
    /// Stored bits per weight.
    pub bits: f64,
    /// Fraction of zero weights.
    pub sparsity: f64,
    /// The row (`original` or a stage) in which the layer took its final form.
    pub changed_in: String,
    /// The row before `changed_in`, whose same-shaped layer the error and sensitivity are
    /// measured against. Absent when the layer never changed, or took a new shape there.
    pub against: Option<String>,
    /// ‖W − W_against‖ / ‖W_against‖ (Frobenius).
    pub rel_error: Option<f64>,
    /// The quality of `against` with only this layer replaced by the final one, minus the
    /// quality of `against`: what the last change to this layer costs (or gains) on its own.
    pub quality_delta: Option<f64>,
}

/// A `bench` stage's timing: the model at that point against the original on the same
/// runtime and on candle f32, at the stage's batch shape.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct BenchRow {
    /// The bench stage.
    pub stage: String,
    /// The batch timed.
    pub batch: String,
    /// Examples per batch.
    pub examples: usize,
    /// Milliseconds per batch (median of alternating rounds).
    pub latency_ms: f64,
    /// Examples per second.
    pub throughput: f64,
    /// The original on the same runtime, milliseconds per batch.
    pub original_ms: f64,
    /// The original on candle f32, milliseconds per batch.
    pub candle_f32_ms: f64,
}

/// An outside engine timed on the same model and batch shape in the same sitting (ONNX
/// Runtime's graphs from `../shared/tools/ort-peer`), compared with the final model.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Peer {
    /// What ran (`onnxruntime f32-fused, 2 threads`).
    pub name: String,
    /// Milliseconds per timed batch (the peer's median).
    pub latency_ms: f64,
    /// Examples per second.
    pub throughput: f64,
    /// Where the figure comes from.
    pub source: PathBuf,
}

/// `report.json`.
#[derive(Serialize, Deserialize, Debug)]
pub struct Report {
    /// The recipe's name.
    pub recipe: String,
    /// The `cargo xtask compress` command that made this report.
    #[serde(default)]
    pub command: String,
    /// The input model.
    pub model: PathBuf,
    /// The runtime every row was measured on.
    pub runtime: String,
    /// `test accuracy` (digits) or `mean cosine to the original` (sentence encoders).
    pub metric: String,
    /// What one latency measurement runs.
    pub batch: String,
    /// The original in f32 on candle.
    pub baseline: Baseline,
    /// Sentence encoders: candle-transformers' f32 `BertModel` on the original's weights,
    /// timed in the same rounds (the peer issue 10's speed goal names).
    #[serde(default)]
    pub candle_transformers: Option<Baseline>,
    /// The original, then every stage.
    pub rows: Vec<Row>,
    /// The final model, layer by layer.
    pub layers: Vec<LayerRow>,
    /// The `bench` stages' timings.
    #[serde(default)]
    pub benches: Vec<BenchRow>,
    /// Outside engines on the same batch (`--ort-json`).
    #[serde(default)]
    pub peers: Vec<Peer>,
}

impl Report {
    /// Reads `DIR/report.json`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("report.json");
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let r: Report = serde_json::from_slice(&bytes)
            .with_context(|| format!("parse {} (written by `cargo xtask compress`?)", path.display()))?;
        if r.rows.is_empty() {
            bail!("{}: no rows", path.display());
        }
        Ok(r)
    }

    /// Writes report.json, report.md, tradeoff.svg and sensitivity.svg into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        pare_core_tensor::io::write_file_atomic(dir.join("report.json"), &serde_json::to_vec_pretty(self)?)?;
        self.render_files(dir).map(|_| ())
    }

    /// Writes report.md and the plots from this report.
    fn render_files(&self, dir: &Path) -> anyhow::Result<String> {
        plot_tradeoff(self, &dir.join("tradeoff.svg")).context("plot tradeoff.svg")?;
        if self.layers.iter().any(|l| l.quality_delta.is_some()) {
            plot_sensitivity(self, &dir.join("sensitivity.svg")).context("plot sensitivity.svg")?;
        }
        let md = self.render();
        pare_core_tensor::io::write_file_atomic(dir.join("report.md"), md.as_bytes())?;
        Ok(md)
    }

    /// The first row (the original) and the last (the final model).
    fn ends(&self) -> (&Row, &Row) {
        (&self.rows[0], self.rows.last().expect("a report has rows"))
    }

    /// The before/after summary: size, quality and speed of the final model against the
    /// original on the same runtime and against candle f32.
    pub fn summary(&self) -> String {
        let (first, last) = self.ends();
        let bert = self.candle_transformers.as_ref().map_or(String::new(), |b| {
            format!(
                "; {:.2}× candle-transformers' f32 BertModel's {:.3} ms",
                ratio(b.latency_ms, last.latency_ms),
                b.latency_ms
            )
        });
        format!(
            "{}: {} → {} weight bytes ({:.2}× smaller, {:.2} → {:.2} bits per weight); {} {:.4} → {:.4} ({:+.2} points); \
             {:.3} → {:.3} ms per batch of {} on `{}` ({:.2}× faster; {:.2}× candle f32's {:.3} ms{bert})",
            self.recipe,
            first.bytes,
            last.bytes,
            ratio(first.bytes as f64, last.bytes as f64),
            first.bits_per_weight,
            last.bits_per_weight,
            self.metric,
            first.quality,
            last.quality,
            100.0 * (last.quality - first.quality),
            first.latency_ms,
            last.latency_ms,
            self.batch,
            self.runtime,
            ratio(first.latency_ms, last.latency_ms),
            ratio(self.baseline.latency_ms, last.latency_ms),
            self.baseline.latency_ms,
        )
    }

    /// The stage table alone (what the demo prints).
    pub fn table(&self) -> String {
        let first = &self.rows[0];
        let bert = self.candle_transformers.as_ref();
        let mut s = String::from(
            "| stage | weight bytes | bits/w | smaller | parameters | sparsity | MACs/example | quality | Δ quality | latency (ms) | per second | vs original | vs candle f32 |",
        );
        s.push_str(if bert.is_some() { " vs candle-transformers |\n" } else { "\n" });
        s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        s.push_str(if bert.is_some() { "---:|\n" } else { "\n" });
        for row in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {:.2} | {:.2}× | {} | {:.1}% | {} | {:.4} | {:+.4} | {:.3} | {:.0} | {:.2}× | {:.2}× |",
                row.stage,
                row.bytes,
                row.bits_per_weight,
                ratio(first.bytes as f64, row.bytes as f64),
                row.params,
                100.0 * row.sparsity,
                row.macs,
                row.quality,
                row.quality - first.quality,
                row.latency_ms,
                row.throughput,
                ratio(first.latency_ms, row.latency_ms),
                ratio(self.baseline.latency_ms, row.latency_ms),
            ));
            match bert {
                Some(b) => s.push_str(&format!(" {:.2}× |\n", ratio(b.latency_ms, row.latency_ms))),
                None => s.push('\n'),
            }
        }
        s
    }

    /// `report.md`.
    pub fn render(&self) -> String {
        let mut s = format!(
            "# Compression report: {}\n\nRegenerate: `{}` (stages already done in DIR are skipped; `cargo xtask report DIR` re-renders this file and the plots from report.json).\n\n\
             Model `{}`. Every row measured on the `{}` runtime, in the same process and in alternating rounds (median), \
             latency per batch of {}; quality is {}. *vs candle f32*: against {}, \
             {:.3} ms per batch, {:.0} per second.{}\n\n**{}**\n\n",
            self.recipe,
            self.command,
            self.model.display(),
            self.runtime,
            self.batch,
            self.metric,
            self.baseline.name,
            self.baseline.latency_ms,
            self.baseline.throughput,
            self.candle_transformers.as_ref().map_or(String::new(), |b| format!(
                " *vs candle-transformers*: against {}, timed in the same rounds, {:.3} ms per batch, {:.0} per second.",
                b.name, b.latency_ms, b.throughput
            )),
            self.summary(),
        );
        s.push_str(&self.table());
        let stage_secs: Vec<String> = self
            .rows
            .iter()
            .skip(1)
            .map(|r| match r.seconds {
                Some(t) => format!("{} {t:.1} s", r.stage),
                None => format!("{} (resumed)", r.stage),
            })
            .collect();
        s.push_str(&format!("\nStage times: {}.\n", stage_secs.join(", ")));
        if !self.peers.is_empty() {
            let last = self.ends().1;
            s.push_str(&format!(
                "\n## Against ONNX Runtime\n\nThe same original weights as ONNX Runtime graphs (`../shared/tools/ort-peer`), timed by it on the same \
                 batch of {} in the same sitting (read from `{}`); *final model's speed*: its throughput over the peer's.\n\n\
                 | peer | latency (ms) | per second | final model's speed |\n|---|---:|---:|---:|\n",
                self.batch,
                self.peers[0].source.display()
            ));
            for p in &self.peers {
                s.push_str(&format!(
                    "| {} | {:.3} | {:.1} | {:.2}× |\n",
                    p.name,
                    p.latency_ms,
                    p.throughput,
                    ratio(last.throughput, p.throughput)
                ));
            }
        }
        if !self.benches.is_empty() {
            s.push_str(&format!(
                "\n## Benchmarks\n\nOn the `{}` runtime, each model timed against the original on the same runtime and on candle f32 in alternating rounds (median).\n\n\
                 | stage | batch | latency (ms) | per second | original (ms) | vs original | candle f32 (ms) | vs candle f32 |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
                self.runtime
            ));
            for b in &self.benches {
                s.push_str(&format!(
                    "| {} | {} | {:.3} | {:.1} | {:.3} | {:.2}× | {:.3} | {:.2}× |\n",
                    b.stage,
                    b.batch,
                    b.latency_ms,
                    b.throughput,
                    b.original_ms,
                    ratio(b.original_ms, b.latency_ms),
                    b.candle_f32_ms,
                    ratio(b.candle_f32_ms, b.latency_ms)
                ));
            }
        }
        s.push_str("\n![quality against weight bytes, stage by stage](tradeoff.svg)\n");
        if !self.layers.is_empty() {
            s.push_str(&format!(
                "\n## The final model, layer by layer\n\n*changed in*: the stage that gave the layer its final form; *against*: the model \
                 before it (— where the layer never changed, or took a new shape there); *error*: relative Frobenius error of the weight \
                 against the same layer in *against*; *Δ quality alone*: {} of *against* with only this layer replaced by the final one, \
                 minus that of *against* — what that last change costs on its own.\n\n",
                self.metric
            ));
            s.push_str(
                "| layer | format | shape | bytes | bits/w | sparsity | changed in | against | error | Δ quality alone |\n",
            );
            s.push_str("|---|---|---|---:|---:|---:|---|---|---:|---:|\n");
            for l in &self.layers {
                s.push_str(&format!(
                    "| {} | {} | {:?} | {} | {:.2} | {:.1}% | {} | {} | {} | {} |\n",
                    l.path,
                    l.format,
                    l.shape,
                    l.bytes,
                    l.bits,
                    100.0 * l.sparsity,
                    l.changed_in,
                    l.against.as_deref().unwrap_or("—"),
                    l.rel_error.map_or("—".into(), |e| format!("{e:.4}")),
                    l.quality_delta.map_or("—".into(), |d| format!("{d:+.4}")),
                ));
            }
            if self.layers.iter().any(|l| l.quality_delta.is_some()) {
                s.push_str("\n![quality lost or gained by each layer's last change alone](sensitivity.svg)\n");
            }
        }
        s
    }
}

/// `a / b`, with b floored away from zero.
fn ratio(a: f64, b: f64) -> f64 {
    a / b.max(1e-12)
}

/// Quality against weight bytes (log), one labelled point per stage, joined in order.
fn plot_tradeoff(r: &Report, path: &Path) -> anyhow::Result<()> {
    // x is log10(bytes) on a linear axis, so that labels fall at even steps whatever the range.
    let pts: Vec<(f64, f64)> = r.rows.iter().map(|row| ((row.bytes.max(1) as f64).log10(), row.quality)).collect();
    let (xmin, xmax) = pts.iter().fold((f64::INFINITY, 0f64), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = ((ymax - ymin) * 0.25).max(0.002);
    let tmp = path.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{}: {} against size", r.recipe, r.metric), ("sans-serif", 20))
            .margin(24)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d((xmin - 0.12)..(xmax + 0.12), (ymin - pad)..(ymax + pad))?;
        chart
            .configure_mesh()
            .x_desc("weight bytes (log)")
            .x_labels(8)
            .y_desc(r.metric.clone())
            .x_label_formatter(&|v| human_bytes(10f64.powf(*v)))
            .light_line_style(WHITE)
            .draw()?;
        chart.draw_series(LineSeries::new(pts.iter().copied(), BLUE.mix(0.4)))?;
        chart.draw_series(r.rows.iter().zip(&pts).enumerate().map(|(i, (row, p))| {
            // Alternate labels above and below so neighbouring stages do not overprint.
            let dy = if i % 2 == 0 { -18 } else { 8 };
            EmptyElement::at(*p)
                + Circle::new((0, 0), 5, BLUE.filled())
                + Text::new(row.stage.clone(), (8, dy), ("sans-serif", 13).into_font())
        }))?;
        root.present()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Quality lost (red) or gained (green) per layer when only that layer takes its last change:
/// one bar per layer.
fn plot_sensitivity(r: &Report, path: &Path) -> anyhow::Result<()> {
    let rows: Vec<(&str, f64)> =
        r.layers.iter().filter_map(|l| l.quality_delta.map(|d| (l.path.as_str(), -d))).collect();
    let n = rows.len();
    let xmax = rows.iter().map(|r| r.1).fold(0f64, f64::max).max(1e-4) * 1.15;
    let xmin = rows.iter().map(|r| r.1).fold(0f64, f64::min) * 1.15;
    let tmp = path.with_extension("svg.tmp");
    {
        let height = (120 + 18 * n as u32).max(260);
        let root = SVGBackend::new(&tmp, (900, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let names: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{} lost (red) or gained (green) by each layer's last change alone", r.metric),
                ("sans-serif", 18),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(260)
            // Integer ranges are inclusive: n segments.
            .build_cartesian_2d(xmin..xmax, (0..n.saturating_sub(1)).into_segmented())?;
        // The first layer on top.
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n.max(1))
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) if *i < n => names[n - 1 - *i].clone(),
                _ => String::new(),
            })
            .x_desc(format!("loss in {} (negative: a gain)", r.metric))
            .light_line_style(WHITE)
            .draw()?;
        chart.draw_series(rows.iter().enumerate().map(|(i, (_, v))| {
            let y = n - 1 - i;
            let mut bar = Rectangle::new(
                [(0.0, SegmentValue::Exact(y)), (*v, SegmentValue::Exact(y + 1))],
                if *v >= 0.0 { RED.mix(0.6).filled() } else { GREEN.mix(0.6).filled() },
            );
            bar.set_margin(3, 3, 0, 0);
            bar
        }))?;
        root.present()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn human_bytes(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1} MB", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} kB", v / 1e3)
    } else {
        format!("{v:.0} B")
    }
}

/// Arguments of `cargo xtask report`.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// A `compress` output folder (holding report.json).
    dir: PathBuf,
}

/// Re-renders DIR/report.md and the plots from DIR/report.json.
pub fn report(args: ReportArgs) -> anyhow::Result<()> {
    let r = Report::load(&args.dir)?;
    print!("{}", r.render_files(&args.dir)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report written before the candle-transformers peer existed still loads and renders
    /// as before; with the peer, the summary and the stage table compare every row with it.
    #[test]
    fn the_candle_transformers_peer_is_optional_and_shown_when_timed() {
        let old = Report::load(&crate::workspace_root().join("reports/compress-digits")).unwrap();
        assert!(old.candle_transformers.is_none());
        assert!(!old.render().contains("candle-transformers"));
        let mut r = old;
        let last = r.rows.last().unwrap().latency_ms;
        r.candle_transformers = Some(Baseline {
            name: "candle-transformers' f32 `BertModel`".into(),
            latency_ms: 4.0 * last,
            throughput: 1.0,
        });
        let md = r.render();
        assert!(r.summary().ends_with(&format!("4.00× candle-transformers' f32 BertModel's {:.3} ms)", 4.0 * last)));
        let header = md.lines().find(|l| l.starts_with("| stage | weight bytes")).unwrap();
        assert!(header.ends_with("| vs candle-transformers |"), "{header}");
        let final_row = md.lines().find(|l| l.starts_with(&format!("| {} |", r.rows.last().unwrap().stage))).unwrap();
        assert!(final_row.ends_with("| 4.00× |"), "{final_row}");
        // Every line of the stage table has as many cells as its header.
        let cells = |l: &str| l.matches('|').count();
        let table: Vec<&str> = md.lines().skip_while(|l| *l != header).take_while(|l| l.starts_with('|')).collect();
        assert_eq!(table.len(), r.rows.len() + 2);
        assert!(table.iter().all(|l| cells(l) == cells(header)), "{table:#?}");
    }
}
