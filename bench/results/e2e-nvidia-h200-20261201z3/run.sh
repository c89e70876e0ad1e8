#!/usr/bin/env bash
# session 15, third call (nvidia-h200): `qpipe run` with liger-kernel's RoPE and RMSNorm on a fresh machine: GPTQ
# three times (the first compiles the Triton kernels), AWQ with the previous tree (.carry/old, commit 5017847) and
# with this one, then KL of the last GPTQ and AWQ artifacts
set -uo pipefail
O=$OUT; export OUT=/tmp/o; mkdir -p $OUT
snap() { tar czf $O/all.tgz -C /tmp o; }
R=/tmp/qpipe-e2e
P="--set calibrate.pack=true --set calibrate.num_samples=128"; G="$P --set calibrate.max_seq_length=2048"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; date -u; } > $OUT/gpus.txt 2>&1
timeout 220 bash bench/gpu-e2e.sh setup corpus > $OUT/setup.log 2>&1; snap
run() { (cd $1 && DATASET=$R/mmlu-text.jsonl RUN_TAG=$2 RUN_ARGS="$4 --force" timeout 100 bash bench/gpu-e2e.sh run $3 calibrate,quantize,export > $OUT/$2.log 2>&1); snap; }
run . g1 gptq "$G"; run .carry/old oa awq "$P"; run . a1 awq "$P"; run . g2 gptq "$G"; run . g3 gptq "$G"
timeout 90 bash bench/gpu-e2e.sh kl g3,a1 > $OUT/kl.log 2>&1
date -u >> $OUT/gpus.txt; snap
