#!/usr/bin/env bash
# session 15, fourth call (nvidia-h200): mixed-length text (the bundled corpus) with this session's code: packed
# and tuned against llm-compressor's defaults (`tuning: off`, one text per sample)
set -uo pipefail
O=$OUT; export OUT=/tmp/o; mkdir -p $OUT
snap() { tar czf $O/all.tgz -C /tmp o; }
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; date -u; } > $OUT/gpus.txt 2>&1
timeout 120 bash bench/gpu-e2e.sh setup > $OUT/setup.log 2>&1; snap
RUN_TAG=mixpack RUN_ARGS="--set calibrate.pack=true --set calibrate.num_samples=35 --force" timeout 60 bash bench/gpu-e2e.sh run gptq calibrate,quantize,export > $OUT/mixpack.log 2>&1; snap
RUN_TAG=mixoff RUN_ARGS="--set quantize.tuning=off --force" timeout 110 bash bench/gpu-e2e.sh run gptq calibrate,quantize,export > $OUT/mixoff.log 2>&1; snap
date -u >> $OUT/gpus.txt; snap
