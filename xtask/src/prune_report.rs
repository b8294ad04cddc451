//! `cargo xtask prune-report`: the pruning evidence on real data, regenerated in one command —
//! digits teachers trained here, then unstructured (one-shot, fine-tuned, gradual to 90%),
//! structured (MLP neurons, CNN channels) pruning with fine-tuning; MiniLM at 50% and 2:4 by
//! magnitude, Wanda and SparseGPT, and its heads, FFN neurons and layers — written as
//! `reports/prune-report.md` and `.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Parser;
use pare_core_tensor::data::{digits, sentences};
use pare_models::digits::DigitsArch;

/// Arguments of `cargo xtask prune-report`.
#[derive(clap::Args)]
pub struct Args {
    /// Where prune-report.md and prune-report.json go.
    #[arg(long, default_value = "reports")]
    out: PathBuf,
    /// The MiniLM folder (its rows are skipped without one).
    #[arg(long, env = "PARE_MINILM_DIR")]
    minilm: Option<PathBuf>,
    /// Fine-tuning epochs for the digits runs.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
}

/// One `prune` invocation parsed as the command line would.
#[derive(Parser)]
struct One {
    #[command(flatten)]
    args: crate::prune::Args,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("xtask has a parent folder")?;
    let work = root.join("target/prune-report");
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let dev = Device::Cpu;
    let data = digits(crate::DIGITS_SPLIT_SEED, &dev)?;
    let opts = crate::train::TrainOpts { seed: 42, epochs: 60, lr: 3e-3 };
    let mut teachers = BTreeMap::new();
    for (name, arch) in [("mlp", DigitsArch::default_mlp()), ("cnn", DigitsArch::default_cnn())] {
        let path = work.join(format!("{name}.safetensors"));
        let (net, _) = crate::train::train_digits(arch, &data, &opts)?;
        net.save(&path, &BTreeMap::new(), &[])?;
        teachers.insert(name, path);
    }
    let e = args.epochs.to_string();
    let mut runs: Vec<(String, Vec<String>)> = Vec::new();
    let mlp = teachers["mlp"].display().to_string();
    let cnn = teachers["cnn"].display().to_string();
    let digits_runs: Vec<(&str, String, Vec<&str>)> = vec![
        ("MLP 90% magnitude, one-shot", mlp.clone(), vec!["--method", "magnitude", "--sparsity", "0.9"]),
        (
            "MLP 90% magnitude + fine-tune",
            mlp.clone(),
            vec!["--method", "magnitude", "--sparsity", "0.9", "--finetune", &e],
        ),
        (
            "MLP 90% gradual (10 steps) + fine-tune",
            mlp.clone(),
            vec!["--method", "magnitude", "--sparsity", "0.9", "--gradual", "10", "--finetune", &e],
        ),
        (
            "MLP 90% global magnitude + fine-tune",
            mlp.clone(),
            vec!["--method", "magnitude", "--sparsity", "0.9", "--global", "--global-min", "0.5", "--finetune", &e],
        ),
        ("MLP 90% random + fine-tune", mlp.clone(), vec!["--method", "random", "--sparsity", "0.9", "--finetune", &e]),
        ("MLP 2:4 magnitude + fine-tune", mlp.clone(), vec!["--method", "nm:2:4", "--finetune", &e]),
        (
            "MLP 50% neurons (l2) + fine-tune",
            mlp.clone(),
            vec!["--method", "neurons", "--sparsity", "0.5", "--finetune", &e],
        ),
        (
            "CNN 50% channels (l2) + fine-tune",
            cnn.clone(),
            vec!["--method", "channels", "--sparsity", "0.5", "--finetune", &e],
        ),
        (
            "CNN 50% channels (taylor) + fine-tune",
            cnn.clone(),
            vec!["--method", "channels", "--sparsity", "0.5", "--importance", "taylor", "--finetune", &e],
        ),
        (
            "CNN 90% magnitude + fine-tune",
            cnn.clone(),
            vec!["--method", "magnitude", "--sparsity", "0.9", "--finetune", &e],
        ),
    ];
    for (i, (label, model, extra)) in digits_runs.into_iter().enumerate() {
        let mut a = vec![
            "prune".to_string(),
            "--model".into(),
            model,
            "--out".into(),
            work.join(format!("digits-{i}.safetensors")).display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        runs.push((label.to_string(), a));
    }
    if let Some(dir) = &args.minilm {
        let text = root.join("data/sentences.txt");
        let all = sentences(&text).with_context(|| format!("read {}", text.display()))?;
        let (calib, eval) = (work.join("calib.txt"), work.join("eval.txt"));
        std::fs::write(&calib, all[..256.min(all.len())].join("\n"))?;
        std::fs::write(&eval, all[all.len() / 2..].join("\n"))?;
        let m = |extra: &[&str]| extra.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let minilm_runs: Vec<(&str, Vec<String>)> = vec![
            ("MiniLM 50% magnitude", m(&["--method", "magnitude", "--sparsity", "0.5"])),
            ("MiniLM 50% Wanda", m(&["--method", "wanda", "--sparsity", "0.5"])),
            ("MiniLM 50% SparseGPT", m(&["--method", "sparsegpt", "--sparsity", "0.5"])),
            ("MiniLM 2:4 magnitude", m(&["--method", "magnitude", "--pattern", "nm:2:4"])),
            ("MiniLM 2:4 Wanda", m(&["--method", "wanda", "--pattern", "nm:2:4"])),
            ("MiniLM 2:4 SparseGPT", m(&["--method", "sparsegpt", "--pattern", "nm:2:4"])),
            ("MiniLM 80% Wanda (sparse kernel)", m(&["--method", "wanda", "--sparsity", "0.8"])),
            (
                "MiniLM 25% heads (activation)",
                m(&["--method", "heads", "--sparsity", "0.25", "--importance", "activation"]),
            ),
            (
                "MiniLM 50% FFN neurons (activation)",
                m(&["--method", "neurons", "--sparsity", "0.5", "--importance", "activation"]),
            ),
            ("MiniLM 1/3 of layers (sensitivity)", m(&["--method", "layers", "--sparsity", "0.34"])),
        ];
        for (i, (label, extra)) in minilm_runs.into_iter().enumerate() {
            let mut a = vec![
                "prune".to_string(),
                "--model".into(),
                dir.display().to_string(),
                "--out".into(),
                work.join(format!("minilm-{i}")).display().to_string(),
                "--calib".into(),
                calib.display().to_string(),
                "--eval".into(),
                eval.display().to_string(),
            ];
            a.extend(extra);
            runs.push((label.to_string(), a));
        }
    }
    let mut records = Vec::new();
    for (label, argv) in runs {
        eprintln!("== {label}");
        let one = One::try_parse_from(&argv).with_context(|| format!("arguments of `{label}`"))?;
        let (_, quality, mut map) = crate::prune::execute(one.args)?;
        map.insert("label".into(), label.clone().into());
        map.insert("argv".into(), serde_json::json!(argv[1..]));
        map.insert("quality".into(), serde_json::json!(quality));
        records.push(serde_json::Value::Object(map));
    }
    write(&args.out, &records)
}

fn f(v: &serde_json::Value, k: &str) -> Option<f64> {
    v.get(k).and_then(serde_json::Value::as_f64)
}

fn write(out: &std::path::Path, records: &[serde_json::Value]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let mut md = String::from(
        "# Pruning on real data\n\nRegenerate: `cargo xtask prune-report` (needs `PARE_MINILM_DIR` for the MiniLM rows; about 7 minutes on 2 cores). Each row is one `cargo xtask prune` run (its arguments are in the JSON); speeds are measured on pare's CPU runtime (2 threads) against the unpruned model in the same run, alternating, medians.\n\n",
    );
    md.push_str("## Digits (test split, 269 images)\n\nTeachers trained by the same command (seeded). Accuracy points are against the teacher.\n\n| run | sparsity | parameters | file bytes | test accuracy | Δ points | speed vs teacher |\n|---|---:|---:|---:|---:|---:|---:|\n");
    for r in records.iter().filter(|r| r.get("accuracy").is_some()) {
        let (acc, base) = (f(r, "accuracy").unwrap_or(0.0), f(r, "original_accuracy").unwrap_or(0.0));
        let speed = f(r, "original_seconds").unwrap_or(0.0) / f(r, "seconds").unwrap_or(1.0);
        md.push_str(&format!(
            "| {} | {} | {} → {} | {} → {} | {:.2}% | {:+.2} | {:.2}× |\n",
            r["label"].as_str().unwrap_or(""),
            f(r, "sparsity").map_or("structured".into(), |s| format!("{:.1}%", 100.0 * s)),
            r["original_params"],
            r["params"],
            r["original_file_bytes"],
            r["file_bytes"],
            100.0 * acc,
            100.0 * (acc - base),
            speed
        ));
    }
    md.push_str("\n## MiniLM (all-MiniLM-L6-v2; calibration: the first 256 sentences, evaluation: the held-out second half)\n\nMean cosine of the pruned model's embeddings to the original's; no fine-tuning (Wanda and SparseGPT are the methods for models without a retraining budget).\n\n| run | sparsity | parameters | weight bytes | mean cosine | speed vs original |\n|---|---:|---:|---:|---:|---:|\n");
    for r in records.iter().filter(|r| r.get("mean_cosine").is_some()) {
        let speed = f(r, "original_seconds").unwrap_or(0.0) / f(r, "seconds").unwrap_or(1.0);
        md.push_str(&format!(
            "| {} | {} | {} → {} | {} → {} | {:.4} | {:.2}× |\n",
            r["label"].as_str().unwrap_or(""),
            f(r, "sparsity").map_or("structured".into(), |s| format!("{:.1}%", 100.0 * s)),
            r["original_params"],
            r["params"],
            r["original_bytes"],
            r["bytes"],
            f(r, "mean_cosine").unwrap_or(0.0),
            speed
        ));
    }
    md.push_str("\n## What each run printed\n\n");
    for r in records {
        md.push_str(&format!(
            "- **{}**: {}\n",
            r["label"].as_str().unwrap_or(""),
            r["quality"]
                .as_array()
                .map(|q| q.iter().filter_map(|s| s.as_str()).collect::<Vec<_>>().join("; "))
                .unwrap_or_default()
        ));
    }
    let json = serde_json::to_vec_pretty(&serde_json::json!({ "runs": records }))?;
    pare_core_tensor::io::write_file_atomic(out.join("prune-report.json"), &json)?;
    pare_core_tensor::io::write_file_atomic(out.join("prune-report.md"), md.as_bytes())?;
    println!("wrote {}/prune-report.md and .json", out.display());
    Ok(())
}
