#!/usr/bin/env bash
# GPU truth in one device call (issue 17): build the vendored llama.cpp with CUDA and RPC, write the
# synthetic models meanwhile, then run bench/gpu_truth.py (placement, memory, throughput, re-split,
# monitor, out-of-memory). Results: $OUT/gpu_truth.json and gpu_truth.md; the summary is printed last.
#
# Prepare once, on a machine with network, from the project root (.offline/ is git-ignored, ~10 MB):
#   EXTRA_WHEELS="tomli-w" ../shared/gpu/prepare-offline.sh .offline
# On the GPU machine (no network; its python3 has numpy and nvidia-ml-py), about 8 minutes:
#   bench/gpu_truth.sh
# Anywhere, with the project's .venv (the test suite runs this, so the script cannot rot):
#   bench/gpu_truth.sh --quick
#
# The CPU part of the CUDA build takes the set-up's CPU-feature decision (gpulab/sources/cpu_features.py):
# a GPU host that advertises AMX without kernel tile support gets a llama.cpp without AMX, as here.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PATH=$PATH:/usr/local/cuda/bin
cd "$ROOT"
OUT=${OUT:-$ROOT/test-artifacts/gpu-truth}
mkdir -p "$OUT"
say() { printf '[gpu-truth] %s\n' "$*" >&2; }

if [ "${1:-}" = --quick ]; then
  shift
  PY=${PY:-$ROOT/.venv/bin/python}
  lb=()
  if bin=$(PY="$PY" scripts/llama-tools.sh --find-only llama-bench 2>/dev/null); then lb=(--llama-bench "$bin/llama-bench"); fi
  exec "$PY" bench/gpu_truth.py --quick --out "$OUT" "${lb[@]}" "$@"
fi

OFF=${GPULAB_OFFLINE:-$ROOT/.offline}
[ -f "$OFF/lcp.tar.gz" ] || { say "no $OFF/lcp.tar.gz: prepare it first (see the top of $0)"; exit 2; }
LCP_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n1)
T0=$(date +%s)

SITE=/tmp/gpulab-site
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$OFF"/wheels/*.whl
mkdir -p /tmp/lcp-src && tar xzf "$OFF/lcp.tar.gz" -C /tmp/lcp-src
SRC=$(echo /tmp/lcp-src/llama_cpp_python-"$LCP_VERSION")
export PYTHONPATH=$ROOT:$SRC:$SITE${PYTHONPATH:+:$PYTHONPATH}
MODELS=${GPULAB_TRUTH_MODELS:-/tmp/gpulab-truth-models}

# the models are written while llama.cpp compiles (disk and one core against nvcc's sixteen)
{ python3 bench/gpu_truth.py --write-models --quick --models-dir "$MODELS" --out "$OUT" \
  && python3 bench/gpu_truth.py --write-models --models-dir "$MODELS" --out "$OUT"; } >"$OUT/models.log" 2>&1 &
models_pid=$!

BASE=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_CUDA=ON -DGGML_RPC=ON ${GPULAB_CUDA_CMAKE_ARGS:-}
      -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF)
eval "$(python3 gpulab/sources/cpu_features.py --shell --lcp-version="$LCP_VERSION" --cmake-args="${BASE[*]}")"
say "$GPULAB_CPU_NOTE"
cpu=()
if [ -n "$GPULAB_CPU_CFLAGS" ]; then cpu=("-DCMAKE_C_FLAGS=$GPULAB_CPU_CFLAGS" "-DCMAKE_CXX_FLAGS=$GPULAB_CPU_CFLAGS"); fi
B=${GPULAB_CUDA_BUILD:-/tmp/lcp-cuda}
targets=(llama ggml-rpc llama-bench)
[ -d "$SRC/vendor/llama.cpp/tools/fit-params" ] && targets+=(llama-fit-params)
if [ -f "$B/bin/libllama.so" ] && [ -x "$B/bin/llama-bench" ]; then
  say "reusing the CUDA build in $B (a second call on the same machine)"
else
  say "building ${targets[*]} with CUDA (sm_${CUDA_ARCH:-90}) in $B (about 5 minutes on 16 cores)"
  { cmake -S "$SRC/vendor/llama.cpp" -B "$B" -G Ninja "${BASE[@]}" "${cpu[@]}" \
    && cmake --build "$B" --target "${targets[@]}" -j"$(nproc)"; } >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log" >&2; say "the CUDA build failed (whole log: $OUT/build.log)"; exit 1; }
  say "built in $(( $(date +%s) - T0 )) s"
fi
wait "$models_pid" || { cat "$OUT/models.log" >&2; say "writing the models failed"; exit 1; }

export LLAMA_CPP_LIB_PATH=$B/bin
# a tiny load in a child first: where it crashes, a backtrace and the remedies tried (bench/gpu_preflight.py)
fix=$(python3 bench/gpu_preflight.py "$MODELS/$(ls "$MODELS" | grep -m1 quick || true)" "$OUT") \
  || { say "llama.cpp cannot load a model in this Python (see $OUT/preflight.log)"; [ "${GPULAB_TRUTH_FORCE:-0}" = 1 ] || exit 1; }
[ -n "$fix" ] && { say "preflight remedy: $fix"; eval "$fix"; }
# what is left of a 9-minute call, less a minute for the summary and the transfers
budget=$(( ${GPULAB_TRUTH_CALL_S:-540} - ($(date +%s) - T0) - 60 ))
python3 bench/gpu_truth.py --out "$OUT" --models-dir "$MODELS" --llama-bench "$B/bin/llama-bench" \
  --budget-s "$budget" "$@"
