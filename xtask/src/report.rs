//! `cargo xtask quant-report`: gathers `cargo xtask quantize --json` runs into one report — a
//! Markdown summary table and per-layer SQNR table (printed), the runs as one JSON file, and
//! an SVG of quality against bits per weight.

use std::path::PathBuf;

use anyhow::{Context, bail};
use plotters::prelude::*;
use serde_json::Value;

/// Arguments of `cargo xtask quant-report`.
#[derive(clap::Args)]
pub struct Args {
    /// One run per line: `LABEL<TAB>RUN.json` (files written by `quantize --json`).
    #[arg(long)]
    rows: PathBuf,
    /// Output prefix: writes PREFIX.json and PREFIX.svg; the Markdown goes to stdout.
    #[arg(long)]
    out: PathBuf,
    /// The quality metric: mean_cosine (plotted as 1 − cosine) or accuracy.
    #[arg(long, default_value = "mean_cosine")]
    metric: String,
    /// The plot's title.
    #[arg(long, default_value = "quality against size")]
    title: String,
}

struct Row {
    label: String,
    run: Value,
}

impl Row {
    fn metric(&self, key: &str) -> Option<f64> {
        self.run["metrics"][key].as_f64()
    }
    fn bits(&self) -> f64 {
        self.run["bits_per_weight"].as_f64().unwrap_or(f64::NAN)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !matches!(args.metric.as_str(), "mean_cosine" | "accuracy") {
        bail!("--metric: expected mean_cosine or accuracy, found `{}`", args.metric);
    }
    let text = std::fs::read_to_string(&args.rows).with_context(|| format!("read {}", args.rows.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let (label, path) = line
            .split_once('\t')
            .with_context(|| format!("{}:{}: expected LABEL<TAB>RUN.json", args.rows.display(), i + 1))?;
        let json = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
        let run: Value = serde_json::from_str(&json).with_context(|| format!("{path} is not a run's JSON"))?;
        if run["metrics"][&args.metric].as_f64().is_none() {
            bail!("{path}: no `{}` metric (run quantize with --eval, or on a digits model)", args.metric);
        }
        rows.push(Row { label: label.to_string(), run });
    }
    if rows.is_empty() {
        bail!("{}: no runs listed", args.rows.display());
    }

    // The summary table.
    let metric_name = if args.metric == "accuracy" { "test accuracy" } else { "cosine" };
    println!("| # | configuration | bits/w | {metric_name} | top-1 | ratio | options |");
    println!("|---:|---|---:|---:|---:|---:|---|");
    for (i, r) in rows.iter().enumerate() {
        let cmd: Vec<&str> =
            r.run["command"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let opts = options_of(&cmd);
        let opts = if opts.is_empty() { "(defaults)".to_string() } else { opts };
        let ratio =
            r.run["bytes_before"].as_f64().unwrap_or(0.0) / r.run["bytes_after"].as_f64().unwrap_or(1.0).max(1.0);
        println!(
            "| {} | {} | {:.3} | {:.5} | {} | {ratio:.2}x | `{opts}` |",
            i + 1,
            r.label,
            r.bits(),
            r.metric(&args.metric).unwrap_or(f64::NAN),
            r.metric("top1_agreement").map_or("–".to_string(), |a| format!("{a:.4}")),
        );
    }

    // Per-layer SQNR: one column per run.
    println!("\n### Per-layer weight SQNR (dB)\n");
    print!("| layer |");
    for i in 0..rows.len() {
        print!(" {} |", i + 1);
    }
    println!();
    print!("|---|");
    for _ in &rows {
        print!("---:|");
    }
    println!();
    let layers: Vec<String> = rows[0].run["layers"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l["path"].as_str().map(String::from)).collect())
        .unwrap_or_default();
    for layer in &layers {
        print!("| {layer} |");
        for r in &rows {
            let sqnr = r.run["layers"]
                .as_array()
                .and_then(|a| a.iter().find(|l| l["path"].as_str() == Some(layer)))
                .and_then(|l| l["sqnr_db"].as_f64());
            match sqnr {
                Some(v) if v.is_finite() => print!(" {v:.1} |"),
                Some(_) => print!(" exact |"),
                None => print!(" – |"),
            }
        }
        println!();
    }

    // All runs as one JSON document.
    let json =
        serde_json::json!(rows.iter().map(|r| serde_json::json!({"label": r.label, "run": r.run})).collect::<Vec<_>>());
    let json_path = args.out.with_extension("json");
    pare_core_tensor::io::write_file_atomic(&json_path, &serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("write {}", json_path.display()))?;
    let svg_path = args.out.with_extension("svg");
    plot(&rows, &args, &svg_path).with_context(|| format!("plot {}", svg_path.display()))?;
    eprintln!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}

/// The options of a `quantize` command line, without the paths.
fn options_of(cmd: &[&str]) -> String {
    let mut out = Vec::new();
    let mut skip = false;
    for a in cmd.iter().skip(1) {
        if skip {
            skip = false;
            continue;
        }
        if matches!(*a, "--model" | "--out" | "--calib" | "--eval" | "--json") {
            skip = true;
            continue;
        }
        out.push(*a);
    }
    out.join(" ")
}

fn plot(rows: &[Row], args: &Args, path: &std::path::Path) -> anyhow::Result<()> {
    // Quality as an error that shrinks toward 0, on a log axis: 1 − cosine, or 1 − accuracy.
    // Runs that land on the same point share one label: "7, 8, 9". Points are labelled with
    // their row numbers in the Markdown table.
    let mut pts: Vec<(f64, f64, Vec<usize>)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let Some(m) = r.metric(&args.metric) else { continue };
        let (x, y) = (r.bits(), (1.0 - m).max(1e-6));
        match pts.iter_mut().find(|p| (p.0 - x).abs() < 1e-9 && (p.1 - y).abs() < 1e-12) {
            Some(p) => p.2.push(i),
            None => pts.push((x, y, vec![i])),
        }
    }
    let pts: Vec<(f64, f64, String)> = pts
        .into_iter()
        .map(|(x, y, ids)| {
            // Row numbers only (the table names them): long labels collide on dense plots.
            let label = ids.iter().map(|i| (i + 1).to_string()).collect::<Vec<_>>().join(", ");
            (x, y, label)
        })
        .collect();
    let (xmin, xmax) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let tmp = path.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (960, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&args.title, ("sans-serif", 22))
            .margin(24)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d((xmin - 0.5)..(xmax + 0.5), ((ymin / 1.6)..(ymax * 1.6)).log_scale())?;
        let what = if args.metric == "accuracy" { "1 − test accuracy" } else { "1 − mean cosine to float" };
        chart
            .configure_mesh()
            .x_desc("bits per weight (codes, scales, zero points)")
            .y_desc(format!("{what} (log; lower is better)"))
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .light_line_style(WHITE)
            .draw()?;
        chart.draw_series(pts.iter().map(|(x, y, label)| {
            EmptyElement::at((*x, *y))
                + Circle::new((0, 0), 5, BLUE.filled())
                + Text::new(label.clone(), (8, -6), ("sans-serif", 12).into_font())
        }))?;
        root.present()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
