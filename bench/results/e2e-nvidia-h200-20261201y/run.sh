#!/usr/bin/env bash
# session 14 (nvidia-h200): pinned load with the CUDA/Triton warm-up beside it (this tree) against pinned load alone
# (.carry/v2), alternating after one run that compiles Triton's kernels
set -uo pipefail
O=$OUT; export OUT=/tmp/o; mkdir -p $OUT
snap() { tar czf $O/all.tgz -C /tmp o; }
R=/tmp/qpipe-e2e
P="--set calibrate.pack=true --set calibrate.num_samples=128"; G="$P --set calibrate.max_seq_length=2048"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; date -u; } > $OUT/gpus.txt 2>&1
timeout 200 bash bench/gpu-e2e.sh setup corpus > $OUT/setup.log 2>&1; snap
RUN_TAG=w timeout 60 bash bench/gpu-e2e.sh run gptq calibrate > $OUT/w.log 2>&1; snap
run() { (cd $1 && DATASET=$R/mmlu-text.jsonl RUN_TAG=$2 RUN_ARGS="$G --force" timeout 90 bash bench/gpu-e2e.sh run gptq calibrate,quantize,export > $OUT/$2.log 2>&1); snap; }
run . warm; run .carry/v2 none1; run . wu1; run .carry/v2 none2; run . wu2
date -u >> $OUT/gpus.txt; snap
