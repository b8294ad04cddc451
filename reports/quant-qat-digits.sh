#!/usr/bin/env bash
# Regenerates reports/quant-qat-digits.{md,json,svg}:  bash reports/quant-qat-digits.sh
# PTQ against QAT at 2, 3 and 4 bits (weights and activations, every layer including the
# classifier) on a compact digits CNN trained here, and on the demo's 38k-parameter teacher.
set -euo pipefail
cd "$(dirname "$0")/.."
W=target/report-qat
# REPORT_ONLY=1 re-renders the report from the runs of the last full run.
[ -n "${REPORT_ONLY:-}" ] || { rm -rf "$W" && mkdir -p "$W"; }
cargo build --release -q -p xtask --target-dir target/xtask
X=target/xtask/release/xtask
[ -n "${REPORT_ONLY:-}" ] || "$X" train --arch cnn:4,8:32 --out "$W/compact.safetensors" > "$W/train-compact.log" 2>&1
[ -n "${REPORT_ONLY:-}" ] || "$X" train --arch cnn:16,32:64 --out "$W/teacher.safetensors" > "$W/train-teacher.log" 2>&1
n=0
row() {
  [ -z "${REPORT_ONLY:-}" ] || return 0
  local label=$1 model=$2; shift 2
  n=$((n + 1))
  "$X" quantize --model "$W/$model.safetensors" --out "$W/q$n.safetensors" --layers '*' "$@" \
    --json "$W/run$n.json" > "$W/run$n.log" 2>&1 || { cat "$W/run$n.log" >&2; exit 1; }
  printf '%s\t%s\n' "$label" "$W/run$n.json" >> "$W/rows.tsv"
  echo "$label: $(grep -oE 'test accuracy [0-9.]+%' "$W/run$n.log")" >&2
}
for b in 2 3 4; do
  row "compact W${b}A${b} PTQ clip" compact --scheme int$b --algo clip --mode static --act-bits $b
  row "compact W${b}A${b} PTQ GPTQ" compact --scheme int$b --algo gptq --mode static --act-bits $b
  row "compact W${b}A${b} QAT" compact --scheme int$b --mode qat --act-bits $b
done
row "compact W2A8 PTQ GPTQ" compact --scheme int2 --algo gptq --mode static
row "compact W2A8 QAT" compact --scheme int2 --mode qat
row "teacher W2A2 PTQ GPTQ" teacher --scheme int2 --algo gptq --mode static --act-bits 2
row "teacher W2A2 QAT" teacher --scheme int2 --mode qat --act-bits 2
OUT=reports/quant-qat-digits.md.tmp
{
  echo "# Quantization-aware training on the digits"
  echo
  echo "Regenerate: \`bash reports/quant-qat-digits.sh\` ($(date -u +%Y-%m-%d), pare $(git rev-parse --short HEAD))."
  echo
  echo "Two CNNs trained by \`cargo xtask train\` on the embedded digits (seed 42): a compact"
  echo "\`cnn:4,8:32\` ($(grep -oE '[0-9]+ parameters' "$W/train-compact.log"), $(grep -oE 'test accuracy [0-9.]+%' "$W/train-compact.log"))"
  echo "and the demo's teacher \`cnn:16,32:64\` ($(grep -oE '[0-9]+ parameters' "$W/train-teacher.log"), $(grep -oE 'test accuracy [0-9.]+%' "$W/train-teacher.log"))."
  echo "Every layer is quantized, the classifier included (\`--layers '*'\`): weights symmetric per"
  echo "channel at the width shown, activations asymmetric static at the width shown. *PTQ* rows"
  echo "calibrate on 128 training images (MSE observer) after rounding the weights by clipping"
  echo "search or GPTQ; *QAT* rows start from the same static ranges and MSE-optimal weight steps and"
  echo "fine-tune weights and learned step sizes (LSQ, straight-through rounding) for 30 epochs"
  echo "(AdamW 3e-3, cosine), keep the best validation epoch, and convert to integer weights; the"
  echo "accuracy is the converted model's on the 269 test images (one image is 0.37 points)."
  echo
  echo "![1 − test accuracy against bits per weight; points are numbered by table row](quant-qat-digits.svg)"
  echo
  "$X" quant-report --rows "$W/rows.tsv" --out reports/quant-qat-digits --metric accuracy \
    --title "digits CNNs: test error against bits per weight (PTQ vs QAT)"
  echo
  cat reports/quant-qat-digits.notes.md
} > "$OUT"
mv "$OUT" reports/quant-qat-digits.md
echo "wrote reports/quant-qat-digits.md" >&2
