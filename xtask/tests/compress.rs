//! `cargo xtask compress` as a user runs it: recipe errors (file, line, stage, key; nothing
//! written), and a resumed run and a run on another thread count writing the same bytes as an
//! uninterrupted one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).output().expect("run xtask")
}

fn ok(args: &[&str]) -> String {
    let o = xtask(args);
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "xtask {args:?} failed:\n{text}");
    text
}

/// `cargo xtask compress` of `recipe` on `model` into `out`.
fn compress(model: &Path, recipe: &Path, out: &Path) -> Output {
    compress_with(model, recipe, out, &[])
}

/// [`compress`] with extra `flags` (`--check`).
fn compress_with(model: &Path, recipe: &Path, out: &Path, flags: &[&str]) -> Output {
    let paths =
        ["--model", model.to_str().unwrap(), "--recipe", recipe.to_str().unwrap(), "--out", out.to_str().unwrap()];
    xtask(&[&["compress"], flags, &paths[..]].concat())
}

/// A small digits teacher trained once for the tests of this file.
fn teacher(dir: &Path) -> PathBuf {
    let p = dir.join("teacher.safetensors");
    ok(&["train", "--arch", "mlp:24", "--epochs", "4", "--out", p.to_str().unwrap()]);
    p
}

#[test]
fn recipe_errors_name_the_file_line_stage_and_key_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = teacher(dir.path());
    let cases = [
        (
            "[recipe]\nname = \"x\"\n\n[[stage]]\nkind = \"prune\"\nsparsty = 0.5\n",
            "line 6: stage 1 (prune): unknown key `sparsty` (did you mean `sparsity`?)",
        ),
        (
            "[[stage]]\nkind = \"prune\"\nsparsity = 1.5\n",
            "line 3: stage 1 (prune): invalid --sparsity: sparsity must be in [0, 1), found 1.5",
        ),
        (
            "[[stage]]\nkind = \"prune\"\nsparsity = \"half\"\n",
            "line 3: stage 1 (prune): invalid value `half` for `sparsity`: invalid float literal",
        ),
        (
            "[[stage]]\nkind = \"sparsify\"\n",
            "line 2: stage 1: unknown kind `sparsify`: expected one of nas, distill, prune, finetune, quantize, export, evaluate, bench",
        ),
        (
            "[[stage]]\nkind = \"prune\"\nsparsity = 0.5\n\n[[stage]]\nkind = \"finetune\"\n",
            "line 5: stage 2 (finetune): finetune trains every weight, so it would fill in the zeros stage 1 (prune, unstructured) made: give that stage `finetune = EPOCHS` (masked fine-tuning) instead, or prune structurally",
        ),
        (
            "[[stage]]\nkind = \"finetune\"\nstudent = \"mlp:8\"\n",
            "line 3: stage 1 (finetune): `student` is set by the pipeline: remove it",
        ),
        (
            "[[stage]]\nkind = \"bench\"\nseq_len = 64\n",
            "line 3: stage 1 (bench): `seq_len` applies to sentence encoders, not digits",
        ),
        ("[[stage]]\nkind = \"bench\"\nbatch = 0\n", "line 3: stage 1 (bench): `batch` must be at least 1, found 0"),
        (
            "[[stage]]\nkind = \"bench\"\nbatches = 4\n",
            "line 3: stage 1 (bench): unknown key `batches` (did you mean `batch`?)",
        ),
        (
            "[[stage]]\nkind = \"quantize\"\n\n[[stage]]\nkind = \"prune\"\nsparsity = 0.5\n",
            "line 4: stage 2 (prune): prune needs float weights but stage 1 (quantize) comes first: put prune before quantize",
        ),
        (
            "[[stage]]\nkind = \"prune\"\nsparsity = 0.5\nlayers = [\"fc9*\"]\n",
            "line 4: stage 1 (prune): `fc9*`: unknown layer pattern `fc9*`",
        ),
        (
            "[[stage]]\nkind = \"prune\"\nsparsity = 0.5\noverride = [\"fc9=0.2\"]\n",
            "line 4: stage 1 (prune): `fc9`: unknown layer pattern `fc9`",
        ),
        (
            "[[stage]]\nkind = \"prune\"\nmethod = \"channels\"\nsparsity = 0.5\noverride = [\"conv1=nm:2:4\"]\n",
            "line 5: stage 1 (prune): --override `conv1`: structured pruning removes whole units; give a sparsity, not an N:M pattern",
        ),
        (
            "[[stage]]\nkind = \"distill\"\nout = \"x\"\n",
            "line 3: stage 1 (distill): `out` is set by the pipeline: remove it",
        ),
        ("[[stage]]\nkind = \"distill\"\n", "line 1: stage 1 (distill): missing key `student`"),
        (
            "[[stage]]\nkind = \"distill\"\nstudent = \"every-other\"\n",
            "line 3: stage 1 (distill): --student `every-other` picks a sentence encoder's layers, but the teacher is a digits model",
        ),
        (
            "[[stage]]\nkind = \"evaluate\"\nreps = 3\n",
            "line 3: stage 1 (evaluate): unknown key `reps`: evaluate takes no options",
        ),
        (
            "[[stage]]\nkind = \"quantize\"\nattention = \"bf16\"\n",
            "line 3: stage 1 (quantize): `attention` applies to sentence encoders, not digits",
        ),
        ("[stage]\nkind = \"prune\"\n", "line 1: `stage` must be an array of tables: write [[stage]]"),
        (
            "[recipe]\nseed = -1\n[[stage]]\nkind = \"evaluate\"\n",
            "line 2: [recipe] seed must be an integer ≥ 0, found -1",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let recipe = dir.path().join(format!("r{i}.toml"));
        std::fs::write(&recipe, text).unwrap();
        let out = dir.path().join(format!("out{i}"));
        let o = compress(&model, &recipe, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "recipe {i} was accepted");
        assert!(err.contains(&format!("recipe `{}` {want}", recipe.display())), "recipe {i}:\n{err}\nexpected: {want}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "recipe {i}: the run wrote {}", out.display());
    }
    // The output folder may not be the input.
    let r = dir.path().join("ok.toml");
    std::fs::write(&r, "[[stage]]\nkind = \"evaluate\"\n").unwrap();
    let o = compress(&model, &r, &model);
    assert!(String::from_utf8_lossy(&o.stderr).contains("holds the input model"));
    // `--check` checks the shipped digits recipes whole and writes nothing; it refuses the
    // cases above as a run does.
    let out = dir.path().join("checked");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for name in ["digits.toml", "digits-nas.toml"] {
        let recipe = root.join("recipes").join(name);
        let o = compress_with(&model, &recipe, &out, &["--check"]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && text.contains("every stage checks out"), "{text}");
        assert!(!out.exists(), "--check wrote {}", out.display());
    }
    let o = compress_with(&model, &dir.path().join("r0.toml"), &out, &["--check"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("unknown key `sparsty`"));
    assert!(!out.exists());
}

#[test]
fn a_resumed_run_on_another_thread_count_writes_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let model = teacher(dir.path());
    let stages = [
        "[[stage]]\nkind = \"distill\"\nstudent = \"mlp:12\"\nepochs = 3\n",
        "[[stage]]\nkind = \"prune\"\nsparsity = 0.5\nfinetune = 1\noverride = [\"layers.0=0.7\"]\n",
        "[[stage]]\nkind = \"quantize\"\nscheme = \"int4\"\ngranularity = \"group:16\"\n",
    ];
    let full = dir.path().join("full.toml");
    std::fs::write(&full, format!("[recipe]\nseed = 7\n\n{}", stages.join("\n"))).unwrap();
    let first = dir.path().join("first.toml");
    std::fs::write(&first, format!("[recipe]\nseed = 7\n\n{}", stages[..2].join("\n"))).unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let run = |recipe: &Path, out: &Path, threads: &str| {
        ok(&[
            "compress",
            "--model",
            model.to_str().unwrap(),
            "--recipe",
            recipe.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--threads",
            threads,
        ])
    };
    run(&full, &a, "1");
    // B: the first two stages, then (as after a kill) the whole recipe again, on 2 threads.
    run(&first, &b, "2");
    let resumed = run(&full, &b, "2");
    assert!(
        resumed.contains("stage 1 distill: done in an earlier run")
            && resumed.contains("stage 2 prune: done in an earlier run"),
        "{resumed}"
    );
    assert!(resumed.contains("stage 3 quantize: running"), "{resumed}");
    for f in ["01-distill.safetensors", "02-prune.safetensors", "03-quantize.safetensors"] {
        let (x, y) =
            (std::fs::read(a.join("stages").join(f)).unwrap(), std::fs::read(b.join("stages").join(f)).unwrap());
        assert!(x == y, "{f} differs between the uninterrupted 1-thread run and the resumed 2-thread run");
    }
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(a.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["rows"].as_array().unwrap().len(), 4);
    assert_eq!(report["metric"], "test accuracy");
    // The prune stage's override set layers.0's sparsity (0.7, not the stage's 0.5); the
    // quantized zeros stay zeros.
    let l0 = report["layers"].as_array().unwrap().iter().find(|l| l["path"] == "layers.0").unwrap();
    assert!(l0["sparsity"].as_f64().unwrap() >= 0.7, "{l0}");
    // `report` re-renders the Markdown from the JSON.
    std::fs::remove_file(a.join("report.md")).unwrap();
    let md = ok(&["report", a.to_str().unwrap()]);
    assert!(md.contains("| 3 quantize |") && a.join("report.md").exists(), "{md}");
}

/// `cargo xtask demo` is the whole pipeline on the embedded digits: the final model must be
/// at least 10× smaller than the CNN teacher and lose at most one test-accuracy point (its
/// speed goal, ≥ 3× on the CPU runtime, is a timing: the demo prints it, no test asserts it).
/// The report holds every stage, the candle f32 baseline, the final model layer by layer and
/// both plots.
#[test]
fn the_demo_pipeline_meets_its_size_and_accuracy_goals() {
    let dir = tempfile::tempdir().unwrap();
    let text = ok(&["demo", "--out", dir.path().to_str().unwrap()]);
    assert!(text.contains("goal ≥ 10× smaller than the teacher") && text.contains("(met)"), "{text}");
    let out = dir.path().join("compressed");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "original + 4 stages");
    let (first, last) = (&rows[0], &rows[4]);
    let smaller = first["bytes"].as_f64().unwrap() / last["bytes"].as_f64().unwrap();
    let lost = first["quality"].as_f64().unwrap() - last["quality"].as_f64().unwrap();
    assert!(smaller >= 10.0, "only {smaller:.2}× smaller");
    assert!(lost <= 0.01, "lost {:.2} accuracy points", 100.0 * lost);
    for row in rows {
        for key in ["bits_per_weight", "latency_ms", "throughput", "quality"] {
            assert!(row[key].as_f64().is_some_and(|v| v.is_finite() && v > 0.0), "{key} in {row}");
        }
        assert!(row["macs"].as_u64().unwrap() > 0, "{row}");
    }
    assert!(report["baseline"]["latency_ms"].as_f64().unwrap() > 0.0);
    // The final model's layers: the first layer took its final form in the quantize stage and
    // is measured against the pruned model before it; the classifier, left float, last
    // changed in the prune stage's fine-tuning.
    let layers = report["layers"].as_array().unwrap();
    let l0 = layers.iter().find(|l| l["path"] == "layers.0").unwrap();
    assert_eq!((&l0["changed_in"], &l0["against"]), (&"3 quantize".into(), &"2 prune".into()), "{l0}");
    let l1 = layers.iter().find(|l| l["path"] == "layers.1").unwrap();
    assert_eq!((&l1["changed_in"], &l1["against"]), (&"2 prune".into(), &"1 distill".into()), "{l1}");
    assert!((l0["sparsity"].as_f64().unwrap() - 0.5).abs() < 1e-9, "{l0}");
    assert!(l0["rel_error"].as_f64().unwrap() > 0.0 && l0["quality_delta"].as_f64().is_some(), "{l0}");
    for f in ["report.md", "tradeoff.svg", "sensitivity.svg", "manifest.json"] {
        let bytes = std::fs::read(out.join(f)).unwrap();
        assert!(bytes.len() > 500, "{f} is {} bytes", bytes.len());
    }
    let svg = std::fs::read_to_string(out.join("tradeoff.svg")).unwrap();
    assert!(svg.contains("3 quantize") && svg.contains("original"), "the trade-off plot labels every stage");
}

/// A `nas` stage makes the search's winner the model (trained as its trial was), `finetune`
/// distils the recipe's original model into it, `export` writes the Q8_0 result as GGUF that
/// loads back to the same bytes and accuracy, and a `bench` stage times it at its own batch
/// shape against the original and candle f32.
#[test]
fn nas_then_finetune_export_and_bench() {
    let dir = tempfile::tempdir().unwrap();
    let model = teacher(dir.path());
    let recipe = dir.path().join("nas.toml");
    std::fs::write(
        &recipe,
        "[[stage]]\nkind = \"nas\"\nspace = \"mlp\"\nstrategy = \"random\"\nbudget = 2\nepochs = 1\n\n\
         [[stage]]\nkind = \"finetune\"\nepochs = 2\n\n[[stage]]\nkind = \"quantize\"\nscheme = \"q8_0\"\n\n\
         [[stage]]\nkind = \"export\"\nformat = \"gguf\"\n\n[[stage]]\nkind = \"bench\"\nbatch = 8\nrounds = 2\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = compress(&model, &recipe, &out);
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{text}");
    assert!(out.join("stages/01-nas/best-model.safetensors").is_file(), "{text}");
    assert!(out.join("stages/01-nas/trials.json").is_file());
    assert!(out.join("stages/02-finetune.safetensors").is_file());
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "original, nas, finetune, quantize, export, bench");
    // The winner is an MLP, not the teacher.
    assert_ne!(rows[1]["params"], rows[0]["params"]);
    // The GGUF file holds the Q8_0 codes exactly: same bytes, same accuracy once loaded back.
    let gguf = out.join("stages/04-export.gguf");
    assert_eq!(rows[4]["bytes"], rows[3]["bytes"]);
    // `inspect` reads it: GGML types, and the int8 codes pare loads from them.
    let shown = ok(&["inspect", gguf.to_str().unwrap()]);
    assert!(shown.contains(": GGUF, ") && shown.contains("Q8_0") && shown.contains("int8"), "{shown}");
    assert_eq!(rows[4]["quality"], rows[3]["quality"]);
    let bench = &report["benches"][0];
    assert_eq!(bench["batch"], "8 test images");
    assert!(bench["latency_ms"].as_f64().unwrap() > 0.0 && bench["candle_f32_ms"].as_f64().unwrap() > 0.0);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Benchmarks") && md.contains("| 5 bench | 8 test images |"), "{md}");
}
