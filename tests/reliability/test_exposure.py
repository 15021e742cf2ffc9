"""Exposure (issue 7): where RPC servers listen, what outlives the process, what gpulab decodes.

Already covered in tests/runtime/test_runtime_rpc.py and not repeated here:
test_loopback, test_non_loopback_bind_warns_loudly (serve() warns on 0.0.0.0, not on 127.0.0.1),
test_serve_needs_an_ipv4_address, test_servers_die_with_their_parent (exit and SIGKILL).
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpulab.runtime import llama_lib, rpc
from processes import wait_gone

REPO = Path(__file__).resolve().parents[2]


def _listening_addresses(port: int) -> set[str]:
    """IPv4 addresses listening on `port`, from /proc/net/tcp (state 0A = LISTEN)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        addr, p = f[1].split(":")
        if int(p, 16) == port and f[3] == "0A":
            out.add(".".join(str(b) for b in reversed(bytes.fromhex(addr))))
    return out


def test_every_way_to_start_a_server_defaults_to_loopback():
    assert inspect.signature(rpc.serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(rpc.RpcServer).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(rpc.start_servers).parameters["host"].default == "127.0.0.1"
    # the CLI (python -m gpulab.runtime.rpc / gpulab rpc-server) too
    src = inspect.getsource(rpc._main)
    assert 'add_argument("--host", default="127.0.0.1")' in src


@pytest.mark.skipif(not llama_lib.rpc_supported(), reason="llama-cpp-python built without RPC")
def test_default_server_listens_on_loopback_only():
    with rpc.RpcServer() as s:
        assert _listening_addresses(s.port) == {"127.0.0.1"}
        assert "WARNING" not in s.output()


@pytest.mark.skipif(not llama_lib.rpc_supported(), reason="llama-cpp-python built without RPC")
def test_any_other_address_must_be_asked_for_and_warns():
    with rpc.RpcServer(host="0.0.0.0") as s:
        assert _listening_addresses(s.port) == {"0.0.0.0"}
        deadline = time.monotonic() + 5
        while "NO authentication" not in s.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = s.output()
        assert "WARNING" in out and "NO authentication" in out and f"0.0.0.0:{s.port}" in out


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_workers_die_with_their_parent(ending):
    """A worker left open by a kernel that exits (or is killed) sees its stdin close and ends."""
    code = textwrap.dedent(f"""
        import os, signal
        from gpulab.runtime.worker import Worker
        w = Worker()
        w.call("dev_count")
        print(w.proc.pid, flush=True)
        if {ending!r} == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1, out.stderr
    assert wait_gone(pids[0], 10), f"worker {pids[0]} outlived its parent ({ending})"


# --- no pickle, marshal, eval or exec on anything read from files or the network -------------

FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
# numpy/torch loaders that unpickle unless told not to
FORBIDDEN_ATTRS = {"loads", "load"}   # only when called on a forbidden module (checked below)


def _sources():
    files = sorted((REPO / "gpulab").rglob("*.py"))
    assert len(files) > 20
    return files


def _scan(source: str, rel: str) -> list[str]:
    """Imports of pickle-like modules, eval/exec/compile/__import__ calls, allow_pickle, yaml.load."""
    bad: list[str] = []
    tree = ast.parse(source, filename=rel)
    aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in FORBIDDEN_MODULES:
                    bad.append(f"{rel}:{node.lineno}: import {a.name}")
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                bad.append(f"{rel}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in FORBIDDEN_CALLS:
                bad.append(f"{rel}:{node.lineno}: {f.id}()")
            elif isinstance(f, ast.Attribute) and f.attr in FORBIDDEN_CALLS and \
                    isinstance(f.value, ast.Name) and f.value.id == "builtins":
                bad.append(f"{rel}:{node.lineno}: builtins.{f.attr}()")
            elif isinstance(f, ast.Attribute) and f.attr in FORBIDDEN_ATTRS and \
                    isinstance(f.value, ast.Name) and f.value.id in aliases:
                bad.append(f"{rel}:{node.lineno}: {f.value.id}.{f.attr}()")
            # numpy.load(..., allow_pickle=True) unpickles object arrays
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    bad.append(f"{rel}:{node.lineno}: allow_pickle={ast.unparse(kw.value)}")
            # yaml.load without SafeLoader runs arbitrary constructors
            if isinstance(f, ast.Attribute) and f.attr in {"load", "load_all", "unsafe_load"} and \
                    isinstance(f.value, ast.Name) and f.value.id == "yaml":
                bad.append(f"{rel}:{node.lineno}: yaml.{f.attr}()")
    return bad


def test_no_unsafe_deserialisation_in_gpulab():
    bad = []
    for path in _sources():
        bad += _scan(path.read_text(), str(path.relative_to(REPO)))
    assert bad == [], "unsafe deserialisation or dynamic code in gpulab/:\n" + "\n".join(bad)


def test_the_scan_catches_what_it_should(tmp_path):
    """The scanner itself: a planted pickle/eval is found (guards against a scan that sees nothing)."""
    src = ("import pickle\nimport marshal as m\nfrom shelve import open\nx = eval('1')\nexec('y=1')\n"
           "pickle.loads(b'')\nimport numpy as np\nnp.load('f', allow_pickle=True)\nimport yaml\nyaml.load(s)\n"
           "np.load('f', allow_pickle=False)\nimport json\njson.loads('1')\n")
    found = _scan(src, "planted.py")
    assert [f.split(": ", 1)[1] for f in found] == [
        "import pickle", "import marshal", "from shelve import ...", "eval()", "exec()", "pickle.loads()",
        "allow_pickle=True", "yaml.load()"]
