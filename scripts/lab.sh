#!/usr/bin/env bash
# JupyterLab on a notebook, the way `make lab` starts it (the browser test starts it this way too).
#   scripts/lab.sh [NOTEBOOK] [extra jupyter lab arguments...]
# - as root (containers, VMs, CI) it passes --allow-root, and says so;
# - with no display it starts no browser; it prints the URL with its token once Jupyter answers;
# - it binds to 127.0.0.1 unless GPULAB_LAB_IP says otherwise (the kernel runs code: do not expose it).
#   GPULAB_LAB_IP, GPULAB_LAB_PORT (default: the first free port from 8888), GPULAB_LAB_TOKEN
#   (default: a random one; set it empty for no token, as the browser test does).
# It runs in the current folder (JupyterLab's root): `make lab` runs it from the repository.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${GPULAB_PYTHON:-$ROOT/.venv/bin/python}
say() { printf '\033[1m[lab]\033[0m %s\n' "$*"; }

NOTEBOOK=${1:-notebooks/01-tour.ipynb}
[ $# -gt 0 ] && shift
IP=${GPULAB_LAB_IP:-127.0.0.1}
PORT=${GPULAB_LAB_PORT:-$("$PY" - <<'PYEOF'
import socket
for port in range(8888, 8988):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(port)
        break
PYEOF
)}
if [ -z "${GPULAB_LAB_TOKEN+set}" ]; then
  TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(24))')
else
  TOKEN=$GPULAB_LAB_TOKEN
fi

args=(--ip="$IP" --port="$PORT" --ServerApp.port_retries=0 --IdentityProvider.token="$TOKEN")
# the root is this folder, so the URL below is right (given a notebook, Jupyter would root at its folder)
case " $* " in *" --ServerApp.root_dir="*|*" --notebook-dir="*) ;; *) args+=(--ServerApp.root_dir="$PWD") ;; esac
if [ "$(id -u)" = 0 ]; then
  say "running as root: passing --allow-root to Jupyter (it refuses root otherwise)"
  args+=(--allow-root)
fi
browser=yes
if [ "$(uname -s)" = Linux ] && [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ]; then
  browser=no
fi
[ "${GPULAB_LAB_BROWSER:-}" = no ] && browser=no
[ "$browser" = no ] && args+=(--no-browser)
[ "$IP" = 127.0.0.1 ] || say "WARNING: listening on $IP: anyone who reaches it can run code as $(id -un)"

# the URL opens the notebook itself; JupyterLab resolves it against its root (this folder)
rel=${NOTEBOOK#./}
URL="http://$IP:$PORT/lab/tree/$rel${TOKEN:+?token=$TOKEN}"
"$PY" -m jupyterlab "$NOTEBOOK" "${args[@]}" "$@" &
JUPYTER=$!
trap 'kill -TERM "$JUPYTER" 2>/dev/null; wait "$JUPYTER"; exit 143' TERM
trap 'kill -INT "$JUPYTER" 2>/dev/null; wait "$JUPYTER"; exit 130' INT
# the URL only once Jupyter answers: opened sooner, the browser would be refused
probe=$IP; [ "$IP" = 0.0.0.0 ] && probe=127.0.0.1
if "$PY" - "http://$probe:$PORT/api/status" "$JUPYTER" <<'PYEOF'
import os, sys, time, urllib.error, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)             # any HTTP answer (403 without the token): it listens
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(2)         # Jupyter ended: its own message says why
        time.sleep(0.25)
sys.exit(1)
PYEOF
then
  say "open $URL"
  [ "$browser" = no ] && say "(no display here: no browser started; open the URL above in yours, through an SSH tunnel if remote)"
else
  say "Jupyter did not answer on $probe:$PORT (its log is above)"
fi
wait "$JUPYTER"
