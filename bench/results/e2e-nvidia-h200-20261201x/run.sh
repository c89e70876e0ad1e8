#!/usr/bin/env bash
# session 14 (nvidia-h200): pinned loading against transformers' own copies (fresh processes), its byte check, then
# GPTQ three times (the first compiles Triton), AWQ once and KL with this session's code
set -uo pipefail
O=$OUT; export OUT=/tmp/o; mkdir -p $OUT
snap() { tar czf $O/all.tgz -C /tmp o; }
R=/tmp/qpipe-e2e
P="--set calibrate.pack=true --set calibrate.num_samples=128"; G="$P --set calibrate.max_seq_length=2048"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; date -u; } > $OUT/gpus.txt 2>&1
timeout 220 bash bench/gpu-e2e.sh setup corpus > $OUT/setup.log 2>&1; snap
RUN_TAG=w timeout 100 bash bench/gpu-e2e.sh run gptq calibrate > $OUT/w.log 2>&1; snap
export PYTHONPYCACHEPREFIX=$R/pycache HF_HUB_OFFLINE=1
for v in "hf 4 0" "pin 4 0" "hf 4 0" "pin 4 0" "pin 8 0" "pin 4 1"; do
  PYTHONPATH=. timeout 60 $R/qenv/bin/python .carry/diag-pin.py $R/qwen3-8b-synth $v >> $OUT/pin.jsonl 2>>$OUT/pin.err
done; snap
PYTHONPATH=. timeout 60 $R/qenv/bin/python -m pytest -q -p no:cacheprovider tests/test_pinned_load.py > $OUT/pytest.log 2>&1; snap
run() { DATASET=$R/mmlu-text.jsonl RUN_TAG=$1 RUN_ARGS="$3 --force" timeout 120 bash bench/gpu-e2e.sh run $2 calibrate,quantize,export > $OUT/$1.log 2>&1; snap; }
run g1 gptq "$G"; run g2 gptq "$G"; run g3 gptq "$G"
run a1 awq "$P"
timeout 60 bash bench/gpu-e2e.sh kl g3 > $OUT/kl.log 2>&1
date -u >> $OUT/gpus.txt; snap
