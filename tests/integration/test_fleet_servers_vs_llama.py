"""Fleet exports run by llama-server itself (built from the vendored source), on CPU RPC servers:
- the router: `llama-server --models-preset fleet.ini` reads the INI gpulab wrote, starts one
  child per resident model with its planned --rpc/--device and context, and both load (GET
  /models says "loaded"); the children's arguments, as the router lists them, are the plan's;
- llama-swap's side: every `cmd` of the config.yaml started at once, as a `swap: false` group is,
  with ${PORT} filled in as llama-swap does; each server loads and answers /health.
(llama-swap itself is not at hand; what it runs is these command lines.)
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import time
import urllib.request

import pytest

from gpulab.core.devices import Device
from gpulab.core.exports.fleet import llama_swap_doc, router_ini
from gpulab.core.fleet.model import Fleet, FleetModel
from gpulab.core.fleet.planner import plan_fleet
from gpulab.sources.read import read_profile
from gpulab.sources.synth import SynthSpec, write_model
from llama_tools import NOT_BUILT, tools_bin
from processes import stop

GiB = 1024**3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=5) as r:
        return {m["id"]: m for m in json.load(r)["data"]}


SPECS = {"chat": SynthSpec(n_layer=5, n_embd=256, n_ff=512, n_head=8, n_head_kv=2, n_vocab=512),
         "coder": SynthSpec(n_layer=4, n_embd=256, n_ff=512, n_head=4, n_head_kv=4, n_vocab=512)}


def _fleet(tmp_path, endpoints):
    """Two models, each on its own RPC server (a server serves one process at a time)."""
    paths = {n: str(write_model(tmp_path / f"{n}.gguf", s)) for n, s in SPECS.items()}
    profiles = {n: read_profile(p) for n, p in paths.items()}
    # described, not registered: this process must not hold the servers the servers under test need
    devices = [Device(f"RPC{i}", 4 * GiB, 4 * GiB, "rpc", "rpc", endpoint=e) for i, e in enumerate(endpoints)]
    fleet = Fleet((FleetModel("chat", paths["chat"], ctx=1024, devices=("RPC1",)),
                   FleetModel("coder", paths["coder"], ctx=512, type_k="q8_0", type_v="q8_0", flash_attn="on")))
    fp = plan_fleet(fleet, profiles, devices)
    assert fp.fits and fp.placement("coder").devices == ("RPC0",)
    return fp, paths, devices




@pytest.mark.skipif(tools_bin() is None, reason=NOT_BUILT)
def test_llama_swap_cmds_serve_together(tmp_path):
    from gpulab.runtime.rpc import start_servers
    with start_servers(2) as servers:
        fp, paths, devices = _fleet(tmp_path, servers.endpoints)
        doc, gaps = llama_swap_doc(fp, paths, devices)
        assert gaps == [] and doc["groups"]["fleet"]["swap"] is False
        procs, ports = {}, {}
        try:
            for name in doc["groups"]["fleet"]["members"]:     # a swap: false group: all at once
                ports[name] = _free_port()
                argv = shlex.split(doc["models"][name]["cmd"].replace("${PORT}", str(ports[name])))
                assert argv[0] == "llama-server"
                procs[name] = subprocess.Popen([str(tools_bin() / "llama-server"), *argv[1:], "--host", "127.0.0.1"],
                                               stdout=subprocess.DEVNULL, stderr=(tmp_path / f"{name}.log").open("w"))
            healthy, deadline = set(), time.monotonic() + 120
            while time.monotonic() < deadline and len(healthy) < len(procs):
                for name, port in ports.items():
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                            if json.load(r).get("status") == "ok":
                                healthy.add(name)
                    except OSError:
                        assert procs[name].poll() is None, (tmp_path / f"{name}.log").read_text()[-2000:]
                time.sleep(1)
            assert healthy == set(procs)
            for name in procs:
                assert "model loaded" in (tmp_path / f"{name}.log").read_text()
        finally:
            for p in procs.values():
                stop(p, 30)


@pytest.mark.skipif(tools_bin() is None, reason=NOT_BUILT)
def test_router_loads_the_exported_presets(tmp_path):
    from gpulab.runtime.rpc import start_servers
    with start_servers(2) as servers:
        fp, paths, devices = _fleet(tmp_path, servers.endpoints)
        text, gaps = router_ini(fp, paths, devices)
        assert gaps == []
        ini = tmp_path / "fleet.ini"
        ini.write_text(text)
        port = _free_port()
        log = (tmp_path / "router.log").open("w")
        router = subprocess.Popen([str(tools_bin() / "llama-server"), "--models-preset", str(ini), "--models-max", "2",
                                   "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                  cwd=tmp_path)
        try:
            status, deadline = {}, time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    models = _models(port)
                    status = {n: m["status"]["value"] for n, m in models.items()}
                    if status == {"chat": "loaded", "coder": "loaded"} or router.poll() is not None:
                        break
                except OSError:
                    pass
                time.sleep(1)
            assert status == {"chat": "loaded", "coder": "loaded"}, \
                (status, (tmp_path / "router.log").read_text()[-2000:])
            for name in ("chat", "coder"):
                args = models[name]["status"]["args"]
                endpoint = next(d.endpoint for d in devices if d.name == fp.placement(name).devices[0])
                assert args[args.index("--rpc") + 1] == endpoint
                assert args[args.index("--device") + 1] == "RPC0"      # the only server its process registers
                assert args[args.index("--ctx-size") + 1] == str(fp.placement(name).plan.config.n_ctx)
                assert args[args.index("--model") + 1] == paths[name]
            coder_args = models["coder"]["status"]["args"]
            assert coder_args[coder_args.index("--cache-type-k") + 1] == "q8_0"
        finally:
            stop(router, 30)
            log.close()
