#!/usr/bin/env bash
# `qpipe run` on a real-size checkpoint on an offline GPU machine (docs/BENCHMARKS.md, "Every stage on the GPU").
# Everything it installs lives under /tmp, so consecutive calls on one warm machine build on each other:
#   bash bench/gpu-e2e.sh qenv                the main env alone, from .whl/main (enough for `bench`)
#   bash bench/gpu-e2e.sh setup               qenv, MMLU from .carry/mmlu.tar.gz, the checkpoint
#   bash bench/gpu-e2e.sh piece               keep the .whl/vllm/site.tar.xz.part-* carried in this call
#   bash bench/gpu-e2e.sh vllm                reassemble the vLLM site dir and link it as qpipe's vLLM env
#   bash bench/gpu-e2e.sh corpus              $ROOT/mmlu-text.jsonl: the MMLU test questions as calibration
#                                             text (about 1 M tokens: enough for 128 packed x 2048-token samples)
#   bash bench/gpu-e2e.sh run RECIPE [STEPS]  qpipe run RECIPE on the checkpoint (RUN_ARGS: more options, e.g.
#                                             "--set smoke.serve_check=true"; RUN_TAG names its tarball and
#                                             remembers its run directory; DATASET: calibration text, default
#                                             the bundled corpus); reports and its stderr (with the
#                                             bench/trace-run.py timeline) into $OUT
#   bash bench/gpu-e2e.sh kl T1,T2,...        next-token KL(checkpoint || artifact) of tagged runs on the eval
#                                             stage's fidelity set (pipeline/eval/fidelity.py) into $OUT/kl.json
#   bash bench/gpu-e2e.sh int4 TAG_A TAG_B    per-module int4 code histograms of two tagged runs' artifacts and
#                                             the share of equal codes (pipeline/bench/int4.py) into $OUT
#   bash bench/gpu-e2e.sh serve R1,R2,...     qpipe bench serve on those recipes' artifacts (and the base
#                                             checkpoint unless SERVE_ARGS has --no-base); figures into $OUT
#   bash bench/gpu-e2e.sh pytest FILE EXPR    pytest FILE -k EXPR in the main env (the tests that need a GPU)
#   bash bench/gpu-e2e.sh bench               qpipe bench $BENCH_ARGS (e.g. "--methods awq --modes default tuned
#                                             --quality") in the main env; its JSON into $OUT
# Several subcommands may follow each other in one call: `bash bench/gpu-e2e.sh setup run gptq calibrate,...,eval`.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=${QPIPE_E2E_ROOT:-/tmp/qpipe-e2e}
SYNTH_ARGS=${SYNTH_ARGS:-}        # e.g. "--layers 1 --scale 0.03125" for a dry run of this script on a CPU
QENV=$ROOT/qenv                   # the main env: carried wheels over the image's torch/transformers
CKPT=$ROOT/qwen3-8b-synth          # `qpipe synth-model` output
ART=$ROOT/artifacts
SITE=$ROOT/vllm-site
PIECES=$ROOT/vllm-pieces
SYSPY=$(command -v python3)        # the image's python, whose torch 2.11 vllm 0.26.0 was built against
export QPIPE_CACHE=$ROOT/cache QPIPE_VLLM_ENV=$ROOT/vllm-env
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export NCCL_NVLS_ENABLE=0
# The wheels go in with --no-compile and the image's packages may lack bytecode: without a writable cache every
# process (and every quantize rank) would compile its imports again, which an installed environment never does
WAS_DONTWRITE=${PYTHONDONTWRITEBYTECODE:-}
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=$ROOT/pycache
EVAL_LIMIT=${EVAL_LIMIT:-5}        # MMLU questions per subject (57 subjects)
DATASET=${DATASET:-calibration/demo-calibration.jsonl}
# main-env wheels that must not shadow the vLLM site's own (compressed-tensors 0.17, its pydantic, loguru), and
# liger-kernel, which only the quantize stage uses
NOT_FOR_VLLM='/(auto_round|liger_kernel|compressed_tensors|llmcompressor|loguru|pydantic|pydantic_core|annotated_types|typing_inspection)-'

qpipe() { "$QENV/bin/python" -m pipeline.cli "$@"; }
traced_qpipe() { "$QENV/bin/python" bench/trace-run.py "$@"; }  # plus "trace" lines: time outside the stages

timed() {  # whole-command wall time; per-stage time, RSS and GPU memory are in each run's manifest
  local start=$SECONDS status=0
  "$@" || status=$?
  echo "timed: $* -> exit $status in $((SECONDS - start)) s"
  return $status
}

qenv() {
  mkdir -p "$ROOT"
  if [ ! -x "$QENV/bin/python" ]; then
    "$SYSPY" -m venv --without-pip "$QENV"
    local site
    site=$("$QENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # the image's python is itself a venv, so --system-site-packages would not reach its torch: a .pth does
    "$SYSPY" -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_paths()["purelib"])' \
      >"$site/image-site.pth"
    "$SYSPY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/main/*.whl
    # lm-eval and what it needs beyond the image, kept for the vLLM site (`vllm` below): not llm-compressor's
    mkdir -p "$ROOT/lm-eval-wheels"
    find .whl/main -name '*.whl' | grep -vE "$NOT_FOR_VLLM" | xargs cp -t "$ROOT/lm-eval-wheels"
  fi
  if [ ! -d "$PYTHONPYCACHEPREFIX" ]; then  # what an installed environment has: its imports' bytecode
    echo "PYTHONDONTWRITEBYTECODE was '${WAS_DONTWRITE:-}'; image transformers .pyc files:" \
      "$(find "$("$SYSPY" -c 'import transformers, os; print(os.path.dirname(transformers.__file__))')" -name '*.pyc' | wc -l)"
    timed "$QENV/bin/python" -c 'import pipeline.cli, datasets, lm_eval, llmcompressor.entrypoints, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer' || true
  fi
}

setup() {
  qenv
  if [ ! -d "$ROOT/mmlu/test" ]; then
    mkdir -p "$ROOT/mmlu" && tar -xzf .carry/mmlu.tar.gz -C "$ROOT/mmlu"
  fi
  if [ ! -f "$CKPT/config.json" ]; then
    # shellcheck disable=SC2086
    timed qpipe synth-model "$CKPT" $SYNTH_ARGS
  fi
  du -sh "$CKPT"
}

corpus() {
  "$QENV/bin/python" - "$ROOT/mmlu/test" "$ROOT/mmlu-text.jsonl" <<'PY'
import csv, json, pathlib, sys
rows = [r for f in sorted(pathlib.Path(sys.argv[1]).glob("*.csv")) for r in csv.reader(f.open(encoding="utf-8"))]
with open(sys.argv[2], "w", encoding="utf-8") as out:
    for q, *choices, answer in rows:
        text = q + "\n" + "\n".join(f"{k}. {c}" for k, c in zip("ABCD", choices)) + f"\nAnswer: {answer}"
        out.write(json.dumps({"text": text}) + "\n")
print(f"{len(rows)} questions -> {sys.argv[2]}")
PY
}

piece() {
  mkdir -p "$PIECES"
  cp -v .whl/vllm/site.tar.xz.part-* .whl/vllm/SHA256SUMS "$PIECES"/ 2>/dev/null || true
  ls -la "$PIECES"
}

vllm() {
  piece
  if [ ! -f "$SITE/vllm/__init__.py" ]; then
    (cd "$PIECES" && cat site.tar.xz.part-* >site.tar.xz && sha256sum -c SHA256SUMS)
    mkdir -p "$SITE" && xz -d -T0 <"$PIECES/site.tar.xz" | tar -x -C "$SITE"
    rm -f "$PIECES/site.tar.xz"
    # `eval.backend: vllm` runs lm-eval in this env; the site archive holds only vLLM (not yet run on a GPU)
    "$SYSPY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$ROOT"/lm-eval-wheels/*.whl
  fi
  qpipe vllm-env --site "$SITE" --python "$SYSPY"
}

run() {
  local recipe=$1 steps=${2:-calibrate,quantize,export,eval,smoke} status=0
  mkdir -p "$OUT"
  # shellcheck disable=SC2086
  timed traced_qpipe run "$recipe" --model "$CKPT" --output "$ART" --steps "$steps" \
    --set calibrate.dataset="$DATASET" --set eval.mmlu_dir="$ROOT/mmlu" \
    --set eval.limit="$EVAL_LIMIT" --set eval.batch_size=16 ${RUN_ARGS:-} \
    2> >(tee "$OUT/$recipe${RUN_TAG:+-$RUN_TAG}.stderr" >&2) || status=$?
  local dir
  dir=$(ls -td "$ART"/*/"$recipe"-* 2>/dev/null | head -1) || true  # the newest: RUN_ARGS may change the hash
  [ -z "${RUN_TAG:-}" ] || echo "$dir" >"$ROOT/run-$RUN_TAG"
  tar -czf "$OUT/$recipe${RUN_TAG:+-$RUN_TAG}-run.tar.gz" -C "$dir" manifest.json recipe.yaml reports logs model/README.md \
    model/config.json 2>/dev/null || true
  echo "qpipe run $recipe exit $status"
}

tagged_model() {  # the artifact of the run `run` remembered under RUN_TAG=$1
  echo "$(cat "$ROOT/run-$1")/model"
}

int4() {
  mkdir -p "$OUT"
  "$QENV/bin/python" -m pipeline.bench.int4 "$(tagged_model "$1")" "$(tagged_model "$2")" \
    --out "$OUT/int4-$1-vs-$2.json"
}

kl() {
  mkdir -p "$OUT"
  local tags=$1 dirs=() t
  for t in ${tags//,/ }; do dirs+=("$t=$(tagged_model "$t")"); done
  "$QENV/bin/python" - "$CKPT" "$OUT/kl.json" "${dirs[@]}" <<'PY'
import json, sys
from pipeline.eval.fidelity import held_out_fidelity
from pipeline.recipe.schema import EvalSpec

base, out, runs = sys.argv[1], sys.argv[2], dict(arg.split("=", 1) for arg in sys.argv[3:])
results = {}
for tag, model in runs.items():
    fid = held_out_fidelity(EvalSpec(), base, model)
    results[tag] = {k: fid[k] for k in ("kl_mean", "top1_agreement", "wall_s")}
    print(tag, results[tag], flush=True)
json.dump(results, open(out, "w"), indent=2)
PY
}

serve() {
  local recipes=$1 r status=0
  local -a dirs=()
  for r in ${recipes//,/ }; do dirs+=("$(ls -d "$ART"/*/"$r"-* | head -1)"); done
  mkdir -p "$OUT"
  # shellcheck disable=SC2086
  timed qpipe bench serve "${dirs[@]}" --out "$ROOT/serve-${recipes//,/-}" ${SERVE_ARGS:-} || status=$?
  tar -czf "$OUT/serve-${recipes//,/-}.tar.gz" -C "$ROOT" "serve-${recipes//,/-}" || true
  echo "qpipe bench serve $recipes exit $status"
}

gpu_pytest() {  # FILE EXPR
  timed "$QENV/bin/python" -m pytest -q -p no:cacheprovider "$1" -k "$2"
}

bench() {
  mkdir -p "$OUT"
  # shellcheck disable=SC2086
  timed qpipe bench ${BENCH_ARGS:-} --out "$OUT"
}

while [ $# -gt 0 ]; do
  case $1 in
    qenv | setup | corpus | piece | vllm | bench) "$1"; shift ;;
    int4) int4 "$2" "$3"; shift 3 ;;
    kl) kl "$2"; shift 2 ;;
    pytest) gpu_pytest "$2" "$3"; shift 3 ;;
    serve) serve "$2"; shift 2 ;;
    run)
      # STEPS is a comma list of stage names; anything else is the next subcommand
      if [ $# -ge 3 ] && [[ $3 =~ ^(calibrate|quantize|export|eval|smoke)(,|$) ]]; then
        run "$2" "$3"; shift 3
      else
        run "$2"; shift 2
      fi ;;
    *) echo "unknown subcommand $1" >&2; exit 2 ;;
  esac
done
