#!/usr/bin/env bash
# Issue 18's 1 vs 2 GPU comparison on one two-GPU machine (nvidia-h200-x2; docs/BENCHMARKS.md, "Two GPUs"): GPTQ
# 128 x 2048 and AWQ 128 x 512 on the 8B shape through `qpipe run --steps calibrate,quantize,export`, packed MMLU
# text. Each one-GPU run comes twice, so that the ratio compares runs that both find the Triton kernels compiled:
#   w            calibrate only, on GPU 0 (writes the calibration set and the checkpoint's fingerprint)
#   g1, g1b      GPTQ on GPU 0, then again with --force;  g2: GPTQ with quantize.num_gpus=2 between them
#   a1, a1b      AWQ on GPU 0, likewise;                   a2: AWQ on two GPUs
#   kl           KL against the checkpoint of g1b, g2, a1b and a2 (each the last run to write its directory)
#   int4         per-module int4 code histograms, 1 vs 2 GPUs, for GPTQ and AWQ (saturated modules show here)
# On the device machine, carrying .whl/main and .carry (see bench/gpu-e2e.sh): `bash bench/two-gpus.sh`;
# everything lands in $OUT/all.tgz (re-written after each step, so a run cut short keeps what it finished).
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/device-steps.sh
source bench/device-steps.sh
timeout 220 bash bench/gpu-e2e.sh setup corpus >$OUT/setup.log 2>&1
snap
P="--set calibrate.pack=true --set calibrate.num_samples=128"
G="$P --set calibrate.max_seq_length=2048"
run() {  # TAG GPUS RECIPE ARGS STEPS
  local visible=0
  [ "$2" = 2 ] && visible=0,1
  CUDA_VISIBLE_DEVICES=$visible DATASET=$R/mmlu-text.jsonl RUN_TAG=$1 RUN_ARGS="$4" \
    timeout 120 bash bench/gpu-e2e.sh run "$3" "$5" >"$OUT/$1.log" 2>&1
  snap
}
run w 1 gptq "$G" calibrate
run g1 1 gptq "$G" calibrate,quantize,export
run g2 2 gptq "$G --set quantize.num_gpus=2" calibrate,quantize,export
run g1b 1 gptq "$G --force" calibrate,quantize,export
run a1 1 awq "$P" calibrate,quantize,export
run a2 2 awq "$P --set quantize.num_gpus=2" calibrate,quantize,export
run a1b 1 awq "$P --force" calibrate,quantize,export
CUDA_VISIBLE_DEVICES=0 timeout 120 bash bench/gpu-e2e.sh kl g1b,g2,a1b,a2 >$OUT/kl.log 2>&1
snap
for pair in "g1b g2" "a1b a2"; do
  # shellcheck disable=SC2086
  timeout 60 bash bench/gpu-e2e.sh int4 $pair >>$OUT/int4.log 2>&1
done
finish
