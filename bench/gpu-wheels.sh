#!/usr/bin/env bash
# Builds the Python wheels that travel to the offline GPU machine (H200, x86-64, Python 3.12.3, glibc 2.39;
# its image already holds torch 2.11.0+cu130, transformers 5.17.0, numpy 2.5.2, ... see IMAGE_FREEZE below).
# See docs/VLLM.md, "GPU machine without network: carried environments".
#
#   bash bench/gpu-wheels.sh            # build from the pinned lists below (reproducible; re-runs reuse downloads)
#   bash bench/gpu-wheels.sh --resolve  # re-resolve both sets against the image; print the differences to the
#                                       # pinned lists (paste them in below after review); builds nothing
#   bash bench/gpu-wheels.sh --force    # rebuild the vLLM site archive even when its inputs did not change
#
# Outputs (all under the git-ignored .whl/):
#   .whl/main/*.whl                      qpipe's main environment beyond the image (llm-compressor, lm-eval, ...)
#   .whl/vllm/site.tar.xz.part-aa, -ab.. vLLM 0.26.0 and what it needs beyond the image, unpacked into one site
#                                        directory, tar'ed, xz -9, split into pieces of at most 50 MiB
#   .whl/vllm/SHA256SUMS                 sha256 of the whole site.tar.xz (check after `cat` of the pieces)
#   .whl/vllm/MANIFEST.txt               the name==version list inside the archive
#   .whl/.work/                          scratch: downloads, scratch venv, unpacked site (safe to delete)
#
# Needs here: python3.12 (PYTHON312=... to choose one), network access to PyPI, unzip, tar, xz, split, sha256sum.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=build
FORCE=0
for arg in "$@"; do
  case "$arg" in
    --resolve) MODE=resolve ;;
    --force) FORCE=1 ;;
    *) echo "usage: $0 [--resolve] [--force]" >&2; exit 2 ;;
  esac
done

PY="${PYTHON312:-$(command -v python3.12 || true)}"
if [ -z "$PY" ] || ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  echo "needs a Python 3.12 interpreter (set PYTHON312=/path/to/python3.12)" >&2
  exit 1
fi

OUT=.whl
WORK=$OUT/.work
mkdir -p "$WORK"
grep -qxF '/.whl/' .gitignore || echo '/.whl/' >>.gitignore

# Wheels for the GPU machine: CPython 3.12, manylinux x86_64 up to glibc 2.39 (pip matches each tag exactly).
PLATFORMS=(--python-version 3.12 --implementation cp --only-binary=:all:
  --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
for n in $(seq 5 39); do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done

# ---------------------------------------------------------------------------------------------------------------
# What the GPU image already has (`python3 -m pip list --format=freeze` there, 2026-11-29). Used for the
# resolution only: each becomes a metadata-only stand-in in a scratch venv, so pip installs just what is missing.
IMAGE_FREEZE='
absl-py==2.5.0 accelerate==1.15.0 aiofiles==25.1.0 aiohappyeyeballs==2.7.1 aiohttp==3.14.3 aiosignal==1.4.0
annotated-doc==0.0.5 anyio==4.15.1 attrs==26.1.0 botorch==0.18.1 build==1.6.1 certifi==2026.7.22
charset-normalizer==3.5.1 chex==0.1.92 click==8.5.0 cloudpickle==3.1.2 cmake==4.4.3 colorama==0.4.6
contourpy==1.4.0 coverage==7.16.2 cuda-bindings==13.3.1 cuda-core==1.2.0 cuda-pathfinder==1.8.1
cuda-toolkit==13.0.2 cupy-cuda13x==14.2.0 cycler==0.12.1 Cython==3.3.0 diffrax==0.7.2 e3nn==0.6.0 einops==0.8.2
equinox==0.13.8 etils==1.14.0 execnet==2.1.2 filelock==3.32.5 flatbuffers==25.12.19 flax==0.12.10
fonttools==4.66.1 formulaic==1.2.2 frozenlist==1.8.0 fsspec==2026.7.0 gpytorch==1.15.2 grpcio==1.84.0 h11==0.16.0
h5py==3.16.0 hf-xet==1.6.0 httpcore==1.0.9 httpx==0.28.1 huggingface_hub==1.33.0 humanize==4.16.0
hypothesis==6.168.3 idna==3.19 ImageIO==2.38.0 iniconfig==2.3.0 interface_meta==2.0.1 jax==0.11.2
jax-cuda13-pjrt==0.11.2 jax-cuda13-plugin==0.11.2 jaxlib==0.11.2 jaxtyping==0.3.11 Jinja2==3.1.6 joblib==1.6.0
kiwisolver==1.5.1 lazy-loader==0.6 lightning==2.6.6 lightning-utilities==0.15.3 linear_operator==0.6.1
lineax==0.1.1 llvmlite==0.50.0 lxml==6.1.3 Markdown==3.11 markdown-it-py==4.2.0 MarkupSafe==3.0.3
matplotlib==3.11.2 mdurl==0.1.2 meson==1.12.1 ml_dtypes==0.6.0 mpi4py==4.1.2 mpmath==1.3.0 msgpack==1.2.3
multidict==6.9.1 multipledispatch==1.0.0 mypy_extensions==1.1.0 nanobind==3.1.0 narwhals==2.26.0 networkx==3.6.1
ninja==1.13.2 numba==0.68.0 numba-cuda==0.30.4 numpy==2.5.2 numpyro==0.21.0 nvidia-cublas==13.1.0.3
nvidia-cuda-cupti==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cudnn-cu13==9.19.0.56
nvidia-cufft==12.0.0.61 nvidia-cufile==1.15.1.6 nvidia-curand==10.4.0.35 nvidia-cusolver==12.0.4.66
nvidia-cusparse==12.6.3.3 nvidia-cusparselt-cu13==0.8.0 nvidia-ml-py==13.610.43 nvidia-nccl-cu13==2.28.9
nvidia-nvjitlink==13.0.88 nvidia-nvshmem-cu13==3.4.5 nvidia-nvtx==13.0.85 onnx==1.23.1 onnx-ir==1.0.0
onnxruntime==1.30.0 onnxscript==0.7.2 opencv-python-headless==5.0.0.93 opt_einsum==3.4.0 opt-einsum-fx==0.1.4
optax==0.2.8 optimistix==0.1.0 orbax-checkpoint==0.12.4 packaging==26.3 pandas==3.0.6 pathspec==1.1.1
patsy==1.0.3 peft==0.21.0 pillow==12.3.0 pluggy==1.6.0 portalocker==4.4.0 prometheus_client==0.26.0
propcache==0.5.4 protobuf==7.36.2 psutil==7.2.2 py-cpuinfo==9.0.0 pyarrow==25.0.1 pybind11==3.1.0
Pygments==2.21.0 pyparsing==3.3.3 pyproject_hooks==1.3.3 pyre-extensions==0.0.32 pytest==9.1.1
pytest-benchmark==5.2.3 pytest-cov==7.1.0 pytest-mock==3.16.0 pytest-timeout==2.5.0 pytest-xdist==3.8.0
python-dateutil==2.9.0.post0 pytorch-lightning==2.6.6 PyYAML==6.0.3 regex==2026.9.3 requests==2.34.2
rich==15.0.0 sacrebleu==2.6.0 safetensors==0.8.0 scikit_build_core==1.1.0 scikit-image==0.26.0
scikit-learn==1.9.1 scipy==1.18.1 seaborn==0.13.2 sentence-transformers==6.0.1 sentencepiece==0.2.2
setuptools==81.0.0 shellingham==1.5.4 simplejson==4.1.2 six==1.17.0 sortedcontainers==2.4.0
statsmodels==0.15.0 sympy==1.14.0 tabulate==0.10.0 tensorboard==2.21.0 tensorboard-data-server==0.7.2
tensorstore==0.1.85 threadpoolctl==3.7.0 tifffile==2026.9.20 tiktoken==0.14.0 timm==1.0.29
tokenizers==0.23.2 toolz==1.1.0 torch==2.11.0 torch-geometric==2.8.0.post1 torchaudio==2.11.0
torchdiffeq==0.2.5 torchmetrics==1.9.0 torchvision==0.26.0 tqdm==4.70.1 transformers==5.17.0
treescope==0.1.10 triton==3.6.0 typer==0.27.2 typing_extensions==4.16.0 typing-inspect==0.9.0 urllib3==2.7.0
uvloop==0.23.0 wadler_lindig==0.1.7 Werkzeug==3.1.9 wheel==0.48.0 wrapt==2.5.0 xarray==2026.9.0 xxhash==4.0.1
yarl==1.25.1 zipp==4.1.0
'

# ---------------------------------------------------------------------------------------------------------------
# (a) qpipe's main environment. Top-level requirements (pyproject.toml without gptqmodel/optimum, which stay
# out; torch, transformers, accelerate, ... come from the image). Versions of anything else come from
# constraints.txt (the CPU environment's pins) where it names the package and the image does not have it.
MAIN_TOP=(llmcompressor==0.14.0.1 compressed-tensors==0.19.0 auto-round==0.15.1 datasets==5.2.0
  'lm_eval[hf]==0.4.13' pydantic==2.14.4 liger-kernel==0.8.5)
# The resolved set (`--resolve`, 2026-11-29; liger-kernel added 2026-12-01): 29 wheels, about 19 MB.
MAIN_PINS='
annotated-types==0.8.0 auto-round==0.15.1 chardet==6.0.0.post1 compressed-tensors==0.19.0 DataProperty==1.1.1
datasets==5.2.0 defusedxml==0.7.1 dill==0.4.1 evaluate==0.4.6 liger-kernel==0.8.5 llmcompressor==0.14.0.1
lm_eval==0.4.13 loguru==0.7.3 mbstrdecoder==1.1.5 more-itertools==11.2.1 multiprocess==0.70.19 nltk==3.10.4
pathvalidate==3.3.1 pydantic==2.14.4 pydantic_core==2.50.5 pytablewriter==1.2.1 pytz==2026.6
rouge_score==0.1.2 sqlitedict==2.1.0 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 typing-inspection==0.4.5
word2number==1.1
'
# PyPI has only source archives of these (pure Python): built here into py3-none-any wheels.
SDIST_ONLY=(rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1)

# ---------------------------------------------------------------------------------------------------------------
# (b) vLLM 0.26.0 (pins torch==2.11.0, the image's). pydantic is pinned to the main environment's version.
VLLM_TOP=(vllm==0.26.0)
VLLM_CONSTRAINTS=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)
# The resolved set (`--resolve`, 2026-11-29): 117 wheels before VLLM_DROP.
VLLM_PINS='
agent-detector==2.0.0 annotated-types==0.8.0 anthropic==2.14.0 apache-tvm-ffi==0.1.10 astor==0.8.1
blake3==1.0.11 cachetools==8.0.2 cbor2==6.3.0 cffi==2.1.1 compressed-tensors==0.17.0 cryptography==50.0.2
cuda-bindings==13.4.4 cuda-python==13.4.4 cuda-tile==1.7.0 depyf==0.20.0 detect-installer==0.2.1 dill==0.4.1
dnspython==2.9.2 docstring_parser==0.18.0 email-validator==2.4.0 fastapi-cli==0.0.34 fastapi-cloud-cli==0.28.0
fastapi==0.136.3 fastar==0.12.0 fastsafetensors==0.5.0 flashinfer-python==0.6.14
googleapis-common-protos==1.76.0 httpcore2==2.16.2 httptools==0.9.0 httpx2==2.16.2 humming-kernels==0.1.10
ijson==3.6.0 interegular==0.3.3 jiter==0.19.0 jmespath==1.1.0 jsonschema-specifications==2025.9.1
jsonschema==4.26.0 lark==1.2.2 llguidance==1.7.6 llvmlite==0.47.0 lm-format-enforcer==0.11.3 loguru==0.7.3
mcp-types==2.3.0 mcp==2.3.0 mistral_common==1.13.1 model-hosting-container-standards==0.1.16 msgspec==0.23.0
numba==0.65.0 numpy==2.3.5 nvidia-cuda-cccl==13.3.5.0.6 nvidia-cuda-crt==13.5.37 nvidia-cuda-nvcc==13.5.37
nvidia-cuda-nvdisasm==13.5.37 nvidia-cudnn-frontend==1.28.0 nvidia-cutlass-dsl-libs-base==4.6.0
nvidia-cutlass-dsl-libs-core==4.6.0 nvidia-cutlass-dsl-libs-cu12==4.6.0 nvidia-cutlass-dsl-libs-cu13==4.6.0
nvidia-cutlass-dsl==4.6.0 nvidia-nvvm==13.5.37 nvtx==0.2.15 openai-harmony==0.0.8 openai==3.57.0
opentelemetry-api==1.45.2 opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-proto-grpc==1.45.2
opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp==1.45.2 opentelemetry-proto==1.45.2
opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions-ai==0.5.1 opentelemetry-semantic-conventions==0.66b2
outlines_core==0.2.14 partial-json-parser==0.2.1.1.post7 prometheus-fastapi-instrumentator==8.1.0
protobuf==6.33.6 pybase64==1.5.1 pycountry==26.2.16 pycparser==3.12 pydantic-extra-types==2.11.1
pydantic-settings==2.16.3 pydantic==2.14.4 pydantic_core==2.50.5 pyelftools==0.33 PyJWT==2.15.1
pynvvideocodec==2.0.4 python-dotenv==1.2.4 python-json-logger==4.2.0 python-multipart==0.0.34 pyzmq==27.3.0
quack-kernels==0.6.3 referencing==0.37.0 rich-toolkit==0.20.6 rignore==0.8.1 rpds-py==2026.9.1
sentry-sdk==2.75.0 setproctitle==1.3.8 setuptools==80.10.2 sniffio==1.3.1 sse-starlette==3.7.0
starlette==1.10.0 supervisor==4.3.0 tilelang==0.1.9 tokenspeed-mla==0.1.8 tokenspeed-triton==3.9.10.post20261028
torchcodec==0.17.0 torch_c_dlpack_ext==0.1.5 truststore==0.10.5 typing-inspection==0.4.5 uvicorn==0.54.0
vllm==0.26.0 watchfiles==1.3.0 websockets==17.4 xgrammar==0.2.7 z3-solver==4.15.4.0
'
# Left out of the vLLM site (normalized names). Plain offline LLM(...) inference of dense models on Hopper does
# not import these (shared/docs/DEVICE-VLLM.md, tried on the H200), or the image's own copy is kept:
#  - kernels for other paths: tokenspeed-triton/-mla (MLA), nvidia-cutlass-dsl* (CuTe DSL kernels), quack-kernels,
#    humming-kernels, tilelang, cuda-tile; and what only they need: z3-solver (tilelang), pyelftools (humming),
#    torch-c-dlpack-ext (quack, tilelang), nvidia-cuda-nvdisasm and cuda-python (cutlass-dsl)
#  - CUDA toolchain wheels (the image has nvcc 13.0 and the CUDA runtime): nvidia-nvvm, nvidia-cuda-nvcc,
#    nvidia-cuda-crt, nvidia-cuda-cccl
#  - video decoding: torchcodec, pynvvideocodec
#  - numba 0.65 / llvmlite 0.47 / numpy 2.3.5: the image's numba 0.68 + llvmlite 0.50 + numpy 2.5.2 stay
#    (vllm imports numba in v1/spec_decode/ngram_proposer.py; a carried llvmlite 0.47 would break the image's
#    numba 0.68, so llvmlite goes with numba)
#  - cuda-bindings 13.4.4: the image's 13.3.1 (matches its CUDA 13.0 driver) stays
VLLM_DROP=(tokenspeed-triton tokenspeed-mla nvidia-cutlass-dsl nvidia-cutlass-dsl-libs-base
  nvidia-cutlass-dsl-libs-core nvidia-cutlass-dsl-libs-cu12 nvidia-cutlass-dsl-libs-cu13 quack-kernels
  humming-kernels tilelang cuda-tile z3-solver pyelftools torch-c-dlpack-ext nvidia-cuda-nvdisasm cuda-python
  nvidia-nvvm nvidia-cuda-nvcc nvidia-cuda-crt nvidia-cuda-cccl torchcodec pynvvideocodec numba llvmlite numpy
  cuda-bindings)
# Files removed from the unpacked site (paths relative to it):
#  - FlashAttention 2 (Ampere; Hopper uses FA3): 290 MB
VLLM_DROP_FILES=(vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so)
PIECE_SIZE=50M # at most 50 MiB a piece (one device call carries at most 64 MiB with the repo)

# ---------------------------------------------------------------------------------------------------------------
words() { tr -s ' \n' '\n\n' <<<"$1" | sed '/^$/d'; }
norm() { tr 'A-Z_.' 'a-z--' <<<"$1"; }

# Scratch venv with a fixed pip (its choices between equivalent wheels depend on its version). Its
# site-packages also holds metadata-only stand-ins for the image's packages, so that a dry-run install there
# lists just what the image lacks (they do not matter to `pip download` or `pip install --target`).
VENV=$WORK/venv
PIP_VERSION=26.3
make_venv() {
  if ! "$VENV/bin/python" -m pip --version 2>/dev/null | grep -q "^pip $PIP_VERSION "; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "pip==$PIP_VERSION" >&2
  fi
  local sp
  sp=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  find "$sp" -maxdepth 2 -name INSTALLER -path '*.dist-info/*' -exec grep -lx stand-in {} + |
    xargs -r dirname | xargs -r rm -rf || true
  words "$IMAGE_FREEZE" | while IFS='=' read -r name _ ver; do
    local d
    d="$sp/$(tr -- '-.' '__' <<<"$name")-$ver.dist-info"
    mkdir -p "$d"
    printf 'Metadata-Version: 2.1\nName: %s\nVersion: %s\n' "$name" "$ver" >"$d/METADATA"
    echo stand-in >"$d/INSTALLER"
    : >"$d/RECORD"
  done
}
PIPX() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# The sdist-only packages as wheels (pure Python; SOURCE_DATE_EPOCH keeps the zip's timestamps fixed).
build_sdist_wheels() {
  mkdir -p "$WORK/built"
  local spec
  for spec in "${SDIST_ONLY[@]}"; do
    local n=${spec%%==*} v=${spec##*==}
    if ! ls "$WORK/built/$(tr -- '-.' '__' <<<"$n")-$v-"*.whl >/dev/null 2>&1; then
      SOURCE_DATE_EPOCH=315532800 PIPX wheel -q --no-deps -w "$WORK/built" "$spec"
    fi
  done
}

# resolve NAME: pip's dry-run install into the stand-in venv; prints the name==version list that is missing.
resolve() {
  local what=$1
  local -a top cons
  if [ "$what" = main ]; then
    top=("${MAIN_TOP[@]}")
    # constraints.txt minus the image's packages (the image's versions win) and gptqmodel/optimum
    local img
    img=$(words "$IMAGE_FREEZE" | sed 's/==.*//' | tr 'A-Z_.' 'a-z--' | sort -u)
    while read -r line; do
      [ -z "$line" ] && continue
      local n
      n=$(norm "${line%%==*}")
      grep -qxF "$n" <<<"$img" && continue
      case "$n" in gptqmodel | optimum) continue ;; esac
      echo "$line"
    done <constraints.txt >"$WORK/main-constraints.txt"
  else
    top=("${VLLM_TOP[@]}")
    printf '%s\n' "${VLLM_CONSTRAINTS[@]}" >"$WORK/vllm-constraints.txt"
  fi
  PIPX install -q --dry-run --report "$WORK/$what-report.json" \
    --find-links "$WORK/built" "${PLATFORMS[@]}" -c "$WORK/$what-constraints.txt" "${top[@]}" >&2
  "$VENV/bin/python" -c '
import json, sys
for i in json.load(open(sys.argv[1]))["install"]:
    print(i["metadata"]["name"] + "==" + i["metadata"]["version"])' "$WORK/$what-report.json" | sort -f
}

# download DIR PINS...: the exact wheels (no dependencies) into a fresh DIR; pip's own cache makes re-runs cheap.
download() {
  local dir=$1
  shift
  rm -rf "$dir"
  mkdir -p "$dir"
  printf '%s\n' "$@" >"$dir.txt"
  PIPX download -q --no-deps --find-links "$WORK/built" \
    "${PLATFORMS[@]}" -d "$dir" -r "$dir.txt"
}

# wheel_for DIR NAME VERSION: the one wheel file in DIR for that release.
wheel_for() {
  local f
  f=$(ls "$1" | awk -v n="$(norm "$2")" -v v="$3" '{
      split($0, p, "-"); name = tolower(p[1]); gsub(/[_.]/, "-", name)
      if (name == n && p[2] == v) print }')
  [ "$(wc -l <<<"$f")" = 1 ] && [ -n "$f" ] || { echo "no single wheel for $2 $3 in $1: $f" >&2; return 1; }
  echo "$1/$f"
}

make_venv
build_sdist_wheels
if [ "$MODE" = resolve ]; then
  for what in main vllm; do
    resolve "$what" >"$WORK/$what-resolved.txt"
    if [ "$what" = main ]; then pinned=$MAIN_PINS; else pinned=$VLLM_PINS; fi
    echo "== $what: $(wc -l <"$WORK/$what-resolved.txt") packages resolved; diff against the pinned list:"
    diff <(words "$pinned" | sort -f) "$WORK/$what-resolved.txt" && echo "(same)"
    echo "as one line: $(tr '\n' ' ' <"$WORK/$what-resolved.txt")"
  done
  exit 0
fi

# ----------------------------------------------------------------------------------------- (a) .whl/main
mapfile -t main_pins < <(words "$MAIN_PINS")
download "$WORK/dl-main" "${main_pins[@]}"
rm -rf "$OUT/main.new"
mkdir -p "$OUT/main.new"
for spec in "${main_pins[@]}"; do
  cp "$(wheel_for "$WORK/dl-main" "${spec%%==*}" "${spec##*==}")" "$OUT/main.new/"
done
rm -rf "$OUT/main"
mv "$OUT/main.new" "$OUT/main"
echo "main: $(ls "$OUT/main" | wc -l) wheels, $(du -sh "$OUT/main" | cut -f1)"

# ----------------------------------------------------------------------------------------- (b) .whl/vllm
mapfile -t vllm_all < <(words "$VLLM_PINS")
drop_re="^($(printf '%s|' "${VLLM_DROP[@]}" | sed 's/|$//'))\$"
vllm_pins=()
for spec in "${vllm_all[@]}"; do
  norm "${spec%%==*}" | grep -qE "$drop_re" || vllm_pins+=("$spec")
done
# The archive is rebuilt only when its inputs change (pins, drops, this step's commands).
key=$( {
  printf '%s\n' "${vllm_pins[@]}" "${VLLM_DROP_FILES[@]}" "$PIECE_SIZE"
  sed -n '/^# ---.*(b) .whl\/vllm/,$p' "$0"
} | sha256sum | cut -c1-16)
if [ "$FORCE" = 0 ] && [ -f "$OUT/vllm/.key" ] && [ "$(cat "$OUT/vllm/.key")" = "$key" ] &&
  (cd "$OUT/vllm" && cat site.tar.xz.part-* | sha256sum -c --status <(sed 's/ .*/  -/' SHA256SUMS)); then
  echo "vllm: up to date ($(ls "$OUT"/vllm/site.tar.xz.part-* | wc -l) pieces)"
  exit 0
fi
download "$WORK/dl-vllm" "${vllm_pins[@]}"
wheels=()
for spec in "${vllm_pins[@]}"; do wheels+=("$(wheel_for "$WORK/dl-vllm" "${spec%%==*}" "${spec##*==}")"); done
# pip install --target lays the wheels out as site-packages would (.data/purelib and platlib merged).
site=$WORK/vllm-site
rm -rf "$site"
PIPX install -q --no-index --no-deps --no-compile --target "$site" \
  "${PLATFORMS[@]}" "${wheels[@]}"
for f in "${VLLM_DROP_FILES[@]}"; do rm -f "$site/$f"; done
# Console scripts point at this machine's interpreter, and direct_url.json at this checkout: not wanted there.
rm -rf "$site/bin"
find "$site" -name direct_url.json -path '*.dist-info/*' -delete
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
printf '%s\n' "${vllm_pins[@]}" >"$site/QPIPE-VLLM-MANIFEST.txt"
echo "vllm site: ${#vllm_pins[@]} packages, $(du -sh "$site" | cut -f1) unpacked; compressing (xz -9)..."
rm -rf "$OUT/vllm.new"
mkdir -p "$OUT/vllm.new"
# Fixed order, owners and times, so the same inputs give the same tar.
tar --sort=name --mtime=@315532800 --owner=0 --group=0 --numeric-owner --format=gnu -C "$site" -cf - . |
  xz -9 -T0 -c >"$WORK/site.tar.xz"
(cd "$WORK" && sha256sum site.tar.xz) >"$OUT/vllm.new/SHA256SUMS"
split -b "$PIECE_SIZE" -a 2 "$WORK/site.tar.xz" "$OUT/vllm.new/site.tar.xz.part-"
cp "$site/QPIPE-VLLM-MANIFEST.txt" "$OUT/vllm.new/MANIFEST.txt"
echo "$key" >"$OUT/vllm.new/.key"
rm -f "$WORK/site.tar.xz"
rm -rf "$OUT/vllm"
mv "$OUT/vllm.new" "$OUT/vllm"
echo "vllm: $(ls "$OUT"/vllm/site.tar.xz.part-* | wc -l) pieces, $(du -cb "$OUT"/vllm/site.tar.xz.part-* | tail -1 | cut -f1) bytes"
ls -l "$OUT/vllm"
