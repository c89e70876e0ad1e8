#!/usr/bin/env bash
# session 14 (nvidia-h200): start-up diagnostics, GPTQ twice, AWQ once, KL, then GPTQ twice with a Qwen-sized tokenizer
set -uo pipefail
O=$OUT; export OUT=/tmp/o; mkdir -p $OUT
snap() { tar czf $O/all.tgz -C /tmp o; }
R=/tmp/qpipe-e2e
P="--set calibrate.pack=true --set calibrate.num_samples=128"; G="$P --set calibrate.max_seq_length=2048"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; date -u; } > $OUT/gpus.txt 2>&1
timeout 220 bash bench/gpu-e2e.sh setup corpus > $OUT/setup.log 2>&1; snap
RUN_TAG=w timeout 100 bash bench/gpu-e2e.sh run gptq calibrate > $OUT/w.log 2>&1; snap
export PYTHONPYCACHEPREFIX=$R/pycache HF_HUB_OFFLINE=1
for v in "4 0" "8 0" "16 0" "4 1" "4 0"; do
  timeout 60 $R/qenv/bin/python .carry/diag-load.py $R/qwen3-8b-synth $v >> $OUT/diag.jsonl 2>>$OUT/diag.err
done; snap
run() { DATASET=$R/mmlu-text.jsonl RUN_TAG=$1 RUN_ARGS="$3" timeout 120 bash bench/gpu-e2e.sh run $2 calibrate,quantize,export > $OUT/$1.log 2>&1; snap; }
run g1 gptq "$G"
run g1b gptq "$G --force"
run a1 awq "$P"
timeout 60 bash bench/gpu-e2e.sh kl g1b > $OUT/kl.log 2>&1; snap
cp .carry/tok/tokenizer.json .carry/tok/tokenizer_config.json $R/qwen3-8b-synth/
run t1 gptq "$G --force"
run t2 gptq "$G --force"
date -u >> $OUT/gpus.txt; snap
