#!/usr/bin/env bash
# session 15 (nvidia-h200): liger-kernel's RoPE and RMSNorm. GPU tests; `qpipe bench` without and with them (same
# process, --quality); then `qpipe run` GPTQ with this tree and the previous one (.carry/old, commit 5017847)
# alternating after one run that compiles, AWQ once, KL
set -uo pipefail
O=$OUT; export OUT=/tmp/o; mkdir -p $OUT
snap() { tar czf $O/all.tgz -C /tmp o; }
R=/tmp/qpipe-e2e
P="--set calibrate.pack=true --set calibrate.num_samples=128"; G="$P --set calibrate.max_seq_length=2048"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; date -u; } > $OUT/gpus.txt 2>&1
timeout 220 bash bench/gpu-e2e.sh setup corpus > $OUT/setup.log 2>&1; snap
export PYTHONPYCACHEPREFIX=$R/pycache HF_HUB_OFFLINE=1
PYTHONPATH=. timeout 60 $R/qenv/bin/python -c "import time, torch, llmcompressor.entrypoints; t = time.perf_counter()
import liger_kernel.transformers.functional; print('liger import s', round(time.perf_counter() - t, 2))" > $OUT/import.txt 2>&1
PYTHONPATH=. timeout 120 $R/qenv/bin/python -m pytest -q -p no:cacheprovider tests/test_tuning.py -k "liger or rotary or norm" > $OUT/pytest.log 2>&1; snap
BENCH_ARGS="--methods gptq --modes tuned:liger=off,rope=off tuned --quality" timeout 200 bash bench/gpu-e2e.sh bench > $OUT/bench.log 2>&1; snap
run() { (cd $1 && DATASET=$R/mmlu-text.jsonl RUN_TAG=$2 RUN_ARGS="$4 --force" timeout 100 bash bench/gpu-e2e.sh run $3 calibrate,quantize,export > $OUT/$2.log 2>&1); snap; }
run . g1 gptq "$G"; run .carry/old o1 gptq "$G"; run . g2 gptq "$G"; run .carry/old o2 gptq "$G"
run . a1 awq "$P"
timeout 60 bash bench/gpu-e2e.sh kl g2 > $OUT/kl.log 2>&1  # measured o2's artifact: o2 wrote the same directory after g2
date -u >> $OUT/gpus.txt; snap
