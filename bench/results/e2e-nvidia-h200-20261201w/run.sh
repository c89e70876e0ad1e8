#!/usr/bin/env bash
# session 14 (nvidia-h200): fastsafetensors against transformers' loader; GPTQ A/B, f635b04 (.carry/old) against the
# warm-up beside the load, alternating; AWQ with the warm-up
set -uo pipefail
O=$OUT; export OUT=/tmp/o; mkdir -p $OUT
snap() { tar czf $O/all.tgz -C /tmp o; }
R=/tmp/qpipe-e2e
P="--set calibrate.pack=true --set calibrate.num_samples=128"; G="$P --set calibrate.max_seq_length=2048"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; date -u; } > $OUT/gpus.txt 2>&1
timeout 220 bash bench/gpu-e2e.sh setup corpus > $OUT/setup.log 2>&1; snap
RUN_TAG=w timeout 100 bash bench/gpu-e2e.sh run gptq calibrate > $OUT/w.log 2>&1; snap
export PYTHONPYCACHEPREFIX=$R/pycache HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-index --target /tmp/fstsite .carry/fst/*.whl > $OUT/fst-install.log 2>&1
for m in hf fst; do
  PYTHONPATH=/tmp/fstsite timeout 60 $R/qenv/bin/python .carry/diag-fst.py $R/qwen3-8b-synth $m >> $OUT/fst.jsonl 2>>$OUT/fst.err
done; snap
run() { (cd $1 && DATASET=$R/mmlu-text.jsonl RUN_TAG=$2 RUN_ARGS="$4 --force" timeout 120 bash bench/gpu-e2e.sh run $3 calibrate,quantize,export > $OUT/$2.log 2>&1); snap; }
run . warm gptq "$G"
run .carry/old old1 gptq "$G"; run . new1 gptq "$G"; run .carry/old old2 gptq "$G"; run . new2 gptq "$G"
run . a1 awq "$P"
date -u >> $OUT/gpus.txt; snap
