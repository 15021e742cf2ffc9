#!/usr/bin/env bash
# llama.cpp's own tools, built from the source vendored by the pinned llama-cpp-python: the real
# consumers gpulab's outputs are checked against (llama-server parses exported flags and router
# presets, llama-bench its argument lists and JSON, llama-fit-params is --fit's own answer).
#   scripts/llama-tools.sh [--find-only] [TARGET ...]   print the folder holding the binaries
# Default targets: llama-server llama-bench llama-fit-params. Built once per build key (the CMake
# arguments and the CPU features, as scripts/llama-wheel.sh decides them: the same code as the
# wheel) into $GPULAB_TOOLS_CACHE/<version>-<key>/ (default ~/.cache/gpulab/llama-tools); about
# 10 minutes on 2 cores the first time. --find-only exits 1 instead of building.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
CACHE=${GPULAB_TOOLS_CACHE:-$HOME/.cache/gpulab/llama-tools}
say() { printf '\033[1m[tools]\033[0m %s\n' "$*" >&2; }

find_only=no
if [ "${1:-}" = --find-only ]; then find_only=yes; shift; fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(llama-server llama-bench llama-fit-params)

LCP_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -n1)
BASE=(-DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF)
eval "$("$PY" "$ROOT/gpulab/sources/cpu_features.py" --shell --lcp-version="$LCP_VERSION" --cmake-args="${BASE[*]}")"
DIR="$CACHE/$LCP_VERSION-$GPULAB_BUILD_KEY"
BIN="$DIR/build/bin"

missing=()
for t in "${targets[@]}"; do [ -x "$BIN/$t" ] || missing+=("$t"); done
if [ ${#missing[@]} -eq 0 ]; then echo "$BIN"; exit 0; fi
[ "$find_only" = yes ] && exit 1

say "$GPULAB_CPU_NOTE"
mkdir -p "$DIR"
SRC="$DIR/src"
if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
  say "fetching the llama-cpp-python $LCP_VERSION sdist (its vendored llama.cpp is what the wheel was built from)"
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$LCP_VERSION" -d "$tmp" >&2
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  rm -rf "$SRC"; mv "$tmp"/llama_cpp_python-*/ "$SRC"; rm -rf "$tmp"
fi
cpu=()
if [ -n "$GPULAB_CPU_CFLAGS" ]; then cpu=("-DCMAKE_C_FLAGS=$GPULAB_CPU_CFLAGS" "-DCMAKE_CXX_FLAGS=$GPULAB_CPU_CFLAGS"); fi
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
say "building ${missing[*]} in $DIR/build (about 10 minutes on 2 cores the first time)"
t0=$(date +%s)
{ cmake -S "$SRC/vendor/llama.cpp" -B "$DIR/build" "${gen[@]}" "${BASE[@]}" "${cpu[@]}" \
  && cmake --build "$DIR/build" --target "${missing[@]}" -j"$(nproc)"; } > "$DIR/build.log" 2>&1 \
  || { tail -40 "$DIR/build.log" >&2; say "build failed: the whole log is $DIR/build.log"; exit 1; }
"$PY" "$ROOT/gpulab/sources/cpu_features.py" --json --lcp-version="$LCP_VERSION" --cmake-args="${BASE[*]}" > "$DIR/build.json"
say "built ${missing[*]} in $(( $(date +%s) - t0 )) s"
echo "$BIN"
