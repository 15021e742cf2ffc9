#!/usr/bin/env bash
# The llama-cpp-python wheel for this host, with the RPC backend: from the cache, or built now.
#   scripts/llama-wheel.sh              print the wheel's path (building it when none is cached)
#   scripts/llama-wheel.sh --find-only  print the cached wheel's path, or exit 1 when there is none
# The version is the pin in pyproject.toml. The wheel lives in $GPULAB_WHEEL_CACHE/<version>-<key>/,
# where the key (gpulab/sources/cpu_features.py build_key) names the CMake arguments and the CPU
# features the build assumes: a wheel built with other flags, or for another CPU, is never reused.
# CPU features this CPU advertises but its kernel does not enable are left out (one line says which).
#   GPULAB_REBUILD=1        build again even when a wheel is cached for this key
#   GPULAB_CMAKE_ARGS=...   extra CMake arguments (-DGGML_NATIVE=OFF: a portable build)
#   GPULAB_CPU_OFF=AMX,...  leave these feature groups out whatever the probe says (AVX, AVX-512, AMX)
#   PY                      the Python that runs the probe and pip (default python3)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
CACHE=${GPULAB_WHEEL_CACHE:-$HOME/.cache/gpulab/wheels}
say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

LCP_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -n1)
[ -n "$LCP_VERSION" ] || { say "no llama-cpp-python==X pin in $ROOT/pyproject.toml"; exit 2; }
BASE_CMAKE_ARGS="-DGGML_RPC=ON -DLLAVA_BUILD=OFF${GPULAB_CMAKE_ARGS:+ $GPULAB_CMAKE_ARGS}"
probe=("$PY" "$ROOT/gpulab/sources/cpu_features.py" --lcp-version="$LCP_VERSION" --cmake-args="$BASE_CMAKE_ARGS")
eval "$("${probe[@]}" --shell)"
say "$GPULAB_CPU_NOTE"
WHEELS="$CACHE/$LCP_VERSION-$GPULAB_BUILD_KEY"

has_rpc() { "$PY" - "$1" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
sys.exit(0 if any(n.endswith("libggml-rpc.so") for n in names) else 1)
PYEOF
}
if [ "${GPULAB_REBUILD:-0}" = 1 ] && [ "${1:-}" != --find-only ] && [ -d "$WHEELS" ]; then
  say "GPULAB_REBUILD=1: building again"; rm -rf "$WHEELS"
fi
wheel=$(ls "$WHEELS"/llama_cpp_python-"$LCP_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$wheel" ] && ! has_rpc "$wheel"; then say "cached wheel lacks RPC: not used"; wheel=""; fi
if [ -n "$wheel" ]; then echo "$wheel"; exit 0; fi
[ "${1:-}" = --find-only ] && exit 1

say "building llama-cpp-python $LCP_VERSION with RPC (about 5 minutes on 2 cores): CMAKE_ARGS=$GPULAB_CMAKE_ARGS_FULL"
rm -rf "$WHEELS"; mkdir -p "$WHEELS"
# --no-cache-dir: pip's own wheel cache would hand back a wheel built earlier with other CMAKE_ARGS
CMAKE_ARGS="$GPULAB_CMAKE_ARGS_FULL" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "$PY" -m pip -q --disable-pip-version-check wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
  -w "$WHEELS" "llama-cpp-python==$LCP_VERSION" >&2
"${probe[@]}" --json > "$WHEELS/build.json"
ls "$WHEELS"/llama_cpp_python-"$LCP_VERSION"-*.whl | head -n1
