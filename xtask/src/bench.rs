//! `cargo xtask bench`: runs pare's benchmarks (each compares pare with a peer measured in the
//! same process), optionally ONNX Runtime's MiniLM peer first, and writes `bench-report.md` and
//! `bench-report.json` with the machine's CPU and thread count.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

/// The benches `cargo xtask bench` runs, in order.
const BENCHES: [&str; 5] = ["gemm", "weight_only", "w8a8", "sparse", "encoder"];

#[derive(clap::Args)]
pub struct Args {
    /// Fewer repetitions and no criterion sampling: ratios only, a few minutes in all.
    #[arg(long)]
    quick: bool,
    /// Build pare and candle alike with `RUSTFLAGS="-C target-cpu=native"` (a default candle
    /// build runs its quantized kernels without AVX2), in `target/native`.
    #[arg(long)]
    native: bool,
    /// Skip ONNX Runtime's MiniLM peer (`../shared/tools/ort-peer/run.sh`, ~10 minutes the
    /// first time: it builds a Python venv).
    #[arg(long)]
    no_ort: bool,
    /// Run only these benches (comma-separated: gemm, weight_only, w8a8, sparse, encoder).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Use this `ort-bench.json` (from `../shared/tools/ort-peer/run.sh`) instead of running the
    /// peer again; its figures should come from the same sitting.
    #[arg(long, conflicts_with = "no_ort")]
    ort_json: Option<PathBuf>,
    /// The MiniLM folder for the encoder bench and the ONNX Runtime peer.
    #[arg(long, env = "PARE_MINILM_DIR")]
    minilm: Option<PathBuf>,
    /// Re-render the Markdown and SVG from this bench-report JSON instead of running anything.
    #[arg(long)]
    render: Option<PathBuf>,
    /// Where bench-report.md, .json and .svg go (bench-report-native.* with --native).
    #[arg(long, default_value = "reports")]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(json_path) = args.render.clone() {
        let text = std::fs::read_to_string(&json_path).with_context(|| format!("read {}", json_path.display()))?;
        let report: Value = serde_json::from_str(&text).with_context(|| format!("parse {}", json_path.display()))?;
        let records = report["records"].as_array().context("no `records` array")?.clone();
        let notes: Vec<String> =
            report["notes"].as_array().into_iter().flatten().filter_map(|n| n.as_str().map(String::from)).collect();
        let native = report["machine"]["native"].as_bool() == Some(true);
        let stem = json_path.file_stem().and_then(|s| s.to_str()).unwrap_or("bench-report").to_string();
        let out = json_path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let quick = report["machine"]["quick"].as_bool() == Some(true);
        let args = Args { native, quick, ..args };
        return write_views(&args, &out, &stem, &report["machine"], &records, &notes);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("xtask has a parent folder")?.to_path_buf();
    for name in &args.only {
        if !BENCHES.contains(&name.as_str()) {
            bail!("--only: expected some of {}, found `{name}`", BENCHES.join(", "));
        }
    }
    if let Some(dir) = &args.minilm
        && !dir.join("model.safetensors").is_file()
    {
        bail!("--minilm {}: no model.safetensors there (run ../shared/tools/fetch-minilm.sh)", dir.display());
    }
    let benches: Vec<&str> =
        BENCHES.iter().copied().filter(|b| args.only.is_empty() || args.only.iter().any(|o| o == b)).collect();
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let work = root.join("target/bench-report");
    std::fs::create_dir_all(&work)?;
    let records_path = work.join("records.jsonl");
    let _ = std::fs::remove_file(&records_path);

    if let Some(j) = &args.ort_json
        && !j.is_file()
    {
        bail!("--ort-json {}: no such file", j.display());
    }
    let ort_json = match (&args.minilm, args.no_ort || !benches.contains(&"encoder")) {
        // Absolute: the benches run from their own package folder.
        _ if args.ort_json.is_some() => args.ort_json.as_ref().map(std::fs::canonicalize).transpose()?,
        (Some(dir), false) => run_ort(&root, dir, args.quick)?,
        _ => None,
    };

    let bar = ProgressBar::new(benches.len() as u64).with_style(
        ProgressStyle::with_template("{spinner} bench {pos}/{len} {msg} [{elapsed}]").expect("valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let mut notes = Vec::new();
    for name in &benches {
        bar.set_message(name.to_string());
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(&root)
            .args(["bench", "-q", "-p", "pare-benches", "--bench", name])
            .env("PARE_BENCH_JSON", &records_path)
            .env("PARE_BENCH_QUICK", if args.quick { "1" } else { "0" });
        if args.native {
            cmd.env("RUSTFLAGS", "-C target-cpu=native").env("CARGO_TARGET_DIR", root.join("target/native"));
        }
        if let Some(dir) = &args.minilm {
            cmd.env("PARE_MINILM_DIR", dir);
        }
        if let Some(j) = &ort_json {
            cmd.env("PARE_ORT_JSON", j);
        }
        let out = cmd.output().with_context(|| format!("run cargo bench --bench {name}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let shown = |l: &&str| l.starts_with("RATIO") || l.starts_with("NOTE") || l.contains("SKIPPED");
        bar.suspend(|| text.lines().filter(shown).for_each(|l| println!("{l}")));
        notes.extend(text.lines().filter_map(|l| l.strip_prefix("NOTE ")).map(String::from));
        if !out.status.success() {
            bar.abandon();
            bail!("bench {name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    let records: Vec<Value> = std::fs::read_to_string(&records_path)
        .unwrap_or_default()
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("parse the benches' records")?;
    let machine = json!({
        "cpu": cpu_model(),
        "simd": format!("{:?}", pare_runtime_cpu::SimdLevel::detect()),
        "threads_used": 2,
        "logical_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "native": args.native,
        "quick": args.quick,
        "ort_peer": ort_json.as_ref().map(|p| p.display().to_string()),
    });
    let report = json!({ "machine": machine, "records": records, "notes": notes });
    // A native build's figures sit beside the default build's, not over them.
    let stem = if args.native { "bench-report-native" } else { "bench-report" };
    let json_path = args.out.join(format!("{stem}.json"));
    pare_core_tensor::io::write_file_atomic(&json_path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    println!("wrote {}", json_path.display());
    write_views(&args, &args.out, stem, &machine, &records, &notes)
}

/// Writes `{stem}.md` (the table, rows numbered) and `{stem}.svg` (each row's ratio against
/// its goal, on a log axis) into `out`.
fn write_views(
    args: &Args,
    out: &Path,
    stem: &str,
    machine: &Value,
    records: &[Value],
    notes: &[String],
) -> anyhow::Result<()> {
    let md_path = out.join(format!("{stem}.md"));
    pare_core_tensor::io::write_file_atomic(&md_path, markdown(args, machine, records, notes).as_bytes())?;
    let svg_path = out.join(format!("{stem}.svg"));
    plot(records, args.native, &svg_path)?;
    println!("wrote {} and {}", md_path.display(), svg_path.display());
    Ok(())
}

/// Each comparison's ratio (green: goal met, red: missed) and its goal (a black bar), by row
/// number, on a log axis.
fn plot(records: &[Value], native: bool, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let rows: Vec<(f64, f64, bool)> = records
        .iter()
        .map(|r| (r["ratio"].as_f64().unwrap_or(f64::NAN), r["goal"].as_f64().unwrap_or(f64::NAN), r["met"] == true))
        .filter(|(r, g, _)| r.is_finite() && g.is_finite() && *r > 0.0 && *g > 0.0)
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let lo = rows.iter().map(|r| r.0.min(r.1)).fold(f64::INFINITY, f64::min) / 1.4;
    let hi = rows.iter().map(|r| r.0.max(r.1)).fold(0.0, f64::max) * 1.4;
    let tmp = path.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (1100, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let title =
            format!("pare vs peers, ratio per comparison ({} build)", if native { "native" } else { "default" });
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(24)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(0.5f64..(rows.len() as f64 + 0.5), (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("row of the table in the report")
            .y_desc("pare's advantage over the peer (×, log)")
            .x_labels(rows.len())
            .x_label_formatter(&|v| format!("{}", v.round() as usize))
            .y_label_formatter(&|v| format!("{v:.2}"))
            .light_line_style(WHITE)
            .draw()?;
        chart.draw_series(rows.iter().enumerate().map(|(i, (_, g, _))| {
            let x = i as f64 + 1.0;
            PathElement::new(vec![(x - 0.35, *g), (x + 0.35, *g)], BLACK.stroke_width(3))
        }))?;
        // Each point carries its value: the log axis labels only the decades' multiples.
        chart.draw_series(rows.iter().enumerate().map(|(i, (r, _, met))| {
            EmptyElement::at((i as f64 + 1.0, *r))
                + Circle::new((0, 0), 6, if *met { GREEN.filled() } else { RED.filled() })
                + Text::new(format!("{r:.2}"), (-12, 9), ("sans-serif", 11).into_font())
        }))?;
        root.present()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Runs ONNX Runtime's peer and returns its `ort-bench.json`, or `None` (with a warning) when it
/// cannot run here (no python3 venv, no network for PyPI).
fn run_ort(root: &Path, model: &Path, quick: bool) -> anyhow::Result<Option<PathBuf>> {
    let script = root.join("../shared/tools/ort-peer/run.sh");
    if !script.is_file() {
        eprintln!("warning: {} not found; the ONNX Runtime comparisons are left out", script.display());
        return Ok(None);
    }
    let spinner = ProgressBar::new_spinner().with_message("ONNX Runtime peer (venv, graphs, timing)");
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let out = Command::new("bash")
        .arg(&script)
        .arg(model)
        .arg(root.join("target/ort-peer"))
        .arg(if quick { "1" } else { "3" })
        .output()
        .context("run the ONNX Runtime peer")?;
    spinner.finish_and_clear();
    if !out.status.success() {
        eprintln!(
            "warning: the ONNX Runtime peer failed; its comparisons are left out:\n{}",
            String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join("\n")
        );
        return Ok(None);
    }
    let path = String::from_utf8_lossy(&out.stdout).lines().last().map(PathBuf::from);
    Ok(path.filter(|p| p.is_file()))
}

pub(crate) fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    };
    match (field("model name"), field("cpu family"), field("model")) {
        // The model name alone ("AMD EPYC") does not tell a Zen 3 from a Zen 4.
        (Some(name), Some(family), Some(model)) => format!("{name} (family {family}, model {model})"),
        (Some(name), ..) => name,
        _ => std::env::consts::ARCH.to_string(),
    }
}

fn markdown(args: &Args, machine: &Value, records: &[Value], notes: &[String]) -> String {
    let mut s = String::new();
    s.push_str("# pare-runtime-cpu benchmarks\n\n");
    s.push_str(&format!(
        "Regenerate: `cargo xtask bench{}{}` (needs `PARE_MINILM_DIR` for the MiniLM rows; the ONNX Runtime rows come from `../shared/tools/ort-peer/run.sh`, run first in the same sitting).\n\n",
        if args.quick { " --quick" } else { "" },
        if args.native { " --native" } else { "" }
    ));
    s.push_str(&format!(
        "Machine: {} ({} logical CPUs; pare's kernels at SIMD level {}), pare and every peer on 2 threads{}. Every ratio is pare's advantage over the peer measured in the same process, alternating runs, medians; this machine is shared, so single figures swing by up to 2× between sittings while the ratios hold better.\n\n",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["logical_cpus"],
        machine["simd"].as_str().unwrap_or("not recorded"),
        if args.native { ", built with -C target-cpu=native" } else { ", default build (no target-cpu)" }
    ));
    s.push_str(
        "| # | comparison | shape | pare | peer | peer figure | ratio | goal | |\n|---:|---|---|---:|---|---:|---:|---:|---|\n",
    );
    for (i, r) in records.iter().enumerate() {
        let unit = r["unit"].as_str().unwrap_or("");
        let f = |v: &Value| v.as_f64().map_or("?".into(), |x| format!("{x:.3} {unit}"));
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.2}× | {:.2}× | {} |\n",
            i + 1,
            r["name"].as_str().unwrap_or("?"),
            r["shape"].as_str().unwrap_or("?"),
            f(&r["pare"]),
            r["peer"].as_str().unwrap_or("?"),
            f(&r["peer_value"]),
            r["ratio"].as_f64().unwrap_or(f64::NAN),
            r["goal"].as_f64().unwrap_or(f64::NAN),
            if r["met"].as_bool() == Some(true) { "met" } else { "**missed**" }
        ));
    }
    if !notes.is_empty() {
        s.push_str("\nAlso measured:\n\n");
        for n in notes {
            s.push_str(&format!("- {n}\n"));
        }
    }
    s
}
