#!/usr/bin/env bash
# session 13 (nvidia-h200): GPTQ through qpipe run with a Qwen-sized tokenizer, session 12's code (.carry/old,
# commit 9dd9ed4) against this session's, alternating after one warm-up run
set -uo pipefail
O=$OUT; export OUT=/tmp/o; mkdir -p $OUT
snap() { tar czf $O/all.tgz -C /tmp o; }
R=/tmp/qpipe-e2e
P="--set calibrate.pack=true --set calibrate.num_samples=128"; G="$P --set calibrate.max_seq_length=2048"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; date -u; } > $OUT/gpus.txt 2>&1
timeout 200 bash bench/gpu-e2e.sh setup corpus > $OUT/setup.log 2>&1
cp .carry/tok/tokenizer.json .carry/tok/tokenizer_config.json $R/qwen3-8b-synth/
RUN_TAG=w timeout 150 bash bench/gpu-e2e.sh run gptq calibrate > $OUT/w.log 2>&1; snap
run() { (cd $1 && DATASET=$R/mmlu-text.jsonl RUN_TAG=$2 RUN_ARGS="$G --force" timeout 150 bash bench/gpu-e2e.sh run gptq calibrate,quantize,export > $OUT/$2.log 2>&1); snap; }
run . warm; run .carry/old old1; run . new1; run .carry/old old2; run . new2
date -u >> $OUT/gpus.txt; snap
