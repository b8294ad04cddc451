#!/usr/bin/env bash
# Regenerates reports/quant-minilm.{md,json,svg}:  PARE_MINILM_DIR=... bash reports/quant-minilm.sh
# Every row is one `cargo xtask quantize --json` run on all-MiniLM-L6-v2 (all 36 linear layers;
# embeddings stay float), calibrated on the first 128 lines of data/sentences.txt and
# evaluated on the other 1024 against the float model; `cargo xtask quant-report` gathers them.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${PARE_MINILM_DIR:?set PARE_MINILM_DIR to the all-MiniLM-L6-v2 folder (bash ../shared/tools/fetch-minilm.sh DIR)}
W=target/report-quant
# REPORT_ONLY=1 re-renders the report from the runs of the last full run.
[ -n "${REPORT_ONLY:-}" ] || { rm -rf "$W" && mkdir -p "$W"; }
[ -n "${REPORT_ONLY:-}" ] || head -n 128 data/sentences.txt > "$W/calib.txt"
[ -n "${REPORT_ONLY:-}" ] || tail -n +129 data/sentences.txt > "$W/eval.txt"
cargo build --release -q -p xtask --target-dir target/xtask
X=target/xtask/release/xtask
n=0
row() {
  [ -z "${REPORT_ONLY:-}" ] || return 0
  local label=$1; shift
  n=$((n + 1))
  rm -rf "$W/q"
  "$X" quantize --model "$M" --out "$W/q" "$@" --calib "$W/calib.txt" --eval "$W/eval.txt" \
    --json "$W/run$n.json" > "$W/run$n.log" 2>&1 || { cat "$W/run$n.log" >&2; exit 1; }
  printf '%s\t%s\n' "$label" "$W/run$n.json" >> "$W/rows.tsv"
  echo "$label: $(grep -oE 'mean cosine to float [0-9.]+' "$W/run$n.log")" >&2
}
row "INT8 per channel, round to nearest" --scheme int8
row "candle Q8_0 (GGUF)" --format gguf --scheme q8_0
row "INT4 g64 asym, round to nearest" --scheme int4 --granularity group:64 --asymmetric
row "INT4 g64 asym, clipping search" --scheme int4 --granularity group:64 --asymmetric --algo clip
row "NF4 g64" --scheme nf4 --granularity group:64
row "NF4 g64, GPTQ" --scheme nf4 --granularity group:64 --algo gptq
row "candle Q4_0 (GGUF)" --format gguf --scheme q4_0
row "candle Q4_1 (GGUF)" --format gguf --scheme q4_1
row "INT4 g64 sym, GPTQ" --scheme int4 --granularity group:64 --algo gptq
row "INT4 g128 asym, GPTQ" --scheme int4 --granularity group:128 --asymmetric --algo gptq
row "INT4 g64 asym, GPTQ" --scheme int4 --granularity group:64 --asymmetric --algo gptq
row "INT4 g64 GPTQ, FFN output INT8" --scheme int4 --granularity group:64 --algo gptq \
  --override 'encoder.layer.*.output.dense=int8'
row "W8A8 dynamic per token" --mode dynamic
row "W8A8 dynamic per token + SmoothQuant 0.5" --mode dynamic --smooth 0.5
row "W8A8 static, min-max observer" --mode static --observer minmax
row "W8A8 static, MSE observer" --mode static --observer mse
row "W8A8 static, entropy observer" --mode static --observer entropy
row "W8A8 static, MSE + SmoothQuant 0.5" --mode static --observer mse --smooth 0.5
row "W8A8 static, MSE + SmoothQuant 0.85" --mode static --observer mse --smooth 0.85
row "W8A8 static, compressed-tensors" --mode static --observer mse --format compressed-tensors
OUT=reports/quant-minilm.md.tmp
{
  echo "# Quantizing all-MiniLM-L6-v2"
  echo
  echo "Regenerate: \`PARE_MINILM_DIR=... bash reports/quant-minilm.sh\` ($(date -u +%Y-%m-%d), pare $(git rev-parse --short HEAD))."
  echo
  echo "All 36 linear layers of the encoder (21.2 M weights, 42.5 MB in f32; word embeddings stay"
  echo "float). Calibration: the first 128 lines of \`data/sentences.txt\`; evaluation: the other 1024."
  echo "*bits/w* counts codes, scales and zero points of the quantized layers (pare stores scales as"
  echo "f32 today; GGUF rows are candle's own blocks with f16 scales). *cosine*: mean cosine of the"
  echo "sentence embeddings to the float model's; *top-1*: share of sentences whose nearest other"
  echo "sentence is unchanged. Each row's options are passed to \`cargo xtask quantize --model DIR --out OUT\`."
  echo "The same runs, layer by layer, are in [quant-minilm.json](quant-minilm.json);"
  echo "[quant-minilm.svg](quant-minilm.svg) plots quality against size."
  echo
  echo "![1 − cosine against bits per weight; points are numbered by table row](quant-minilm.svg)"
  echo
  "$X" quant-report --rows "$W/rows.tsv" --out reports/quant-minilm --metric mean_cosine \
    --title "all-MiniLM-L6-v2: embedding error against bits per weight"
  echo
  cat reports/quant-minilm.notes.md
} > "$OUT"
mv "$OUT" reports/quant-minilm.md
echo "wrote reports/quant-minilm.md" >&2
