#!/usr/bin/env bash
# Issue 17's mixed-length comparison on a warm machine (docs/BENCHMARKS.md): GPTQ (or RECIPE=awq) on the 8B shape
# through `qpipe run`, calibrating on the bundled corpus (texts of 25-283 tokens). Runs, in this order:
#   w        packed (35 x 512 = 17,920 tokens) and tuned: the warm-up, which compiles the Triton kernels
#   p1       the same again: what a machine pays from its second run on
#   off      `tuning: off`, one text per sample: llm-compressor's defaults on the same texts
#   offpack  packed with `tuning: off`: the same tokens as p1 without the tuned engine
#   kl       KL of p1's and offpack's artifacts against the checkpoint (before p2 overwrites p1's directory)
#   p2       packed and tuned once more
#   pytest   the GPU tests of the liger-kernel stand-ins
# SHORT=1 keeps w, p1 and off, each without export: about 240 s instead of about 390 s (GPTQ). RECIPE=awq: use SHORT=1.
# On the device machine, carrying .whl/main and .carry (see bench/gpu-e2e.sh): `bash bench/mixed-length.sh`;
# everything lands in $OUT/all.tgz (re-written after each step, so a run cut short keeps what it finished).
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/device-steps.sh
source bench/device-steps.sh
timeout 150 bash bench/gpu-e2e.sh setup >$OUT/setup.log 2>&1
snap
P="--set calibrate.pack=true --set calibrate.num_samples=35"
STEPS=calibrate,quantize,export
[ "${SHORT:-0}" = 1 ] && STEPS=calibrate,quantize
RECIPE=${RECIPE:-gptq}
SCALE=1  # the timeouts fit GPTQ; AWQ's search re-runs each layer per grid point, and `off` runs it text by text
[ "$RECIPE" = awq ] && SCALE=3
run() {  # TAG ARGS TIMEOUT (GPTQ's; times SCALE)
  RUN_TAG=$1 RUN_ARGS="$2 --force" timeout "$(($3 * SCALE))" bash bench/gpu-e2e.sh run "$RECIPE" "$STEPS" \
    >"$OUT/$1.log" 2>&1
  snap
}
run w "$P" 70
run p1 "$P" 60
run off "--set quantize.tuning=off" 110
if [ "${SHORT:-0}" != 1 ]; then
  run offpack "$P --set quantize.tuning=off" 110
  timeout 90 bash bench/gpu-e2e.sh kl p1,offpack >$OUT/kl.log 2>&1
  snap
  run p2 "$P" 60
  timeout 90 bash bench/gpu-e2e.sh pytest tests/test_tuning.py "liger or rotary or norm" >$OUT/pytest.log 2>&1
fi
finish
