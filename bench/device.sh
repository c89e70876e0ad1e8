#!/usr/bin/env bash
# `qpipe bench` on a GPU machine without network access: installs the wheels carried in .whl/ (see
# docs/BENCHMARKS.md) into /tmp/site once, then runs the benchmark with the given arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && [ ! -f /tmp/site/.qpipe-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/main/*.whl
  touch /tmp/site/.qpipe-wheels
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec python3 -m pipeline.cli bench "$@"
