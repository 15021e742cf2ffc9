"""RPC servers as devices: real llama.cpp spreading SmolLM2-135M across three CPU servers.

The servers run as child processes of this test process; the loads run in a worker process
(see gpulab.runtime.worker: registered RPC devices never leave a process, and once their servers stop,
llama.cpp's own device selection would abort it). The expected placement is computed here from
llama.cpp's rule (llama_model_base::load_tensors), in float32 as llama.cpp does it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from gpulab.core.config import SplitConfig
from gpulab.core.errors import DeviceError
from gpulab.runtime import llama_lib
from gpulab.runtime.logcapture import parse_load_log
from gpulab.runtime.rpc import RpcServer, insecure_bind_warning, is_loopback, probe, serve, start_servers
from processes import wait_gone

pytestmark = pytest.mark.skipif(not llama_lib.rpc_supported(),
                                reason="llama-cpp-python built without RPC (CMAKE_ARGS=-DGGML_RPC=ON)")

N_LAYER = 30                                  # SmolLM2-135M
KV_PER_LAYER_512 = 512 * (192 + 192) * 2      # cells x (n_embd_k_gqa + n_embd_v_gqa) x f16
ROUND = 6 * 1024                              # llama.cpp logs MiB with two decimals


@pytest.fixture(scope="module")
def cluster():
    with start_servers(3) as c:
        yield c


@pytest.fixture(scope="module")
def worker(cluster, worker_factory):
    w = worker_factory()
    yield w
    w.close()


@pytest.fixture(scope="module")
def rpc_names(worker, cluster) -> list[str]:
    devices = worker.call("register", endpoints=cluster.endpoints)
    return [d["name"] for d in devices]


def expected_layers(names: list[str], split: list[float], ngl: int = -1) -> tuple[str, ...]:
    """llama_model_base::load_tensors: layer il -> upper_bound(splits, (il - start) / act)."""
    n = N_LAYER + 1
    ngl = n if ngl < 0 else ngl
    start, act = max(n - ngl, 0), min(ngl, n)
    cum = np.cumsum(np.asarray(split, dtype=np.float32), dtype=np.float32)
    splits = cum / cum[-1]
    out = []
    for il in range(n):
        if il < start or il - start >= act:
            out.append("CPU")
        else:
            x = np.float32(il - start) / np.float32(act)
            out.append(names[int(np.searchsorted(splits, x, side="right"))])
    return tuple(out)


def check_buffers(r, names: list[str]) -> None:
    """Each device's buffers agree with the layers llama.cpp says it put there."""
    for dev in names + ["CPU"]:
        n_rep = sum(1 for d in r.layer_devices[:N_LAYER] if d == dev)   # repeating layers
        has_layers = dev in r.layer_devices
        assert abs(r.bytes_on(dev, "kv") - n_rep * KV_PER_LAYER_512) <= ROUND, dev
        if dev != "CPU":   # token embeddings always stay on the host
            assert (r.bytes_on(dev, "model") > 0) == has_layers, dev
            assert (r.bytes_on(dev, "compute") > 0) == has_layers, dev
    assert r.bytes_on("CPU", "model") > 0 and r.bytes_on("CPU", "output") > 0
    assert r.kv_layer_devices == r.layer_devices[:N_LAYER]   # a layer's KV lives with it


def test_servers_started(cluster):
    assert len(cluster) == 3 and len(set(cluster.endpoints)) == 3
    assert all(s.alive for s in cluster)
    assert all(e.startswith("127.0.0.1:") for e in cluster.endpoints)


def test_probe(cluster):
    assert probe(cluster.endpoints[0]) == ((7, 0, 0), 1)


def test_register(worker, cluster, rpc_names):
    devices = worker.call("devices")
    rpc = [d for d in devices if d["kind"] == "rpc"]
    assert [d["name"] for d in rpc] == rpc_names == ["RPC0", "RPC1", "RPC2"]
    assert [d["endpoint"] for d in rpc] == cluster.endpoints
    assert all(d["source"] == "rpc" and d["free_bytes"] > 0 for d in rpc)
    cpu = [d for d in devices if d["kind"] == "cpu"]
    assert [d["name"] for d in cpu] == ["CPU"] and cpu[0]["source"] == "llama"


def test_register_is_idempotent(worker, cluster, rpc_names):
    before = worker.call("dev_count")
    again = worker.call("register", endpoints=cluster.endpoints)
    one = worker.call("register", endpoints=[cluster.endpoints[1]])
    assert [d["name"] for d in again] == rpc_names and [d["name"] for d in one] == ["RPC1"]
    assert worker.call("dev_count") == before


def test_register_refuses_what_would_abort_llama_cpp(worker):
    # nothing listening: llama.cpp's client would GGML_ABORT("Failed to connect")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DeviceError, match="connection refused"):
        worker.call("register", endpoints=[f"127.0.0.1:{port}"])
    # something listening that is no RPC server: the handshake fails (llama.cpp: abort)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)

        def answer_garbage() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

        t = threading.Thread(target=answer_garbage, daemon=True)
        t.start()
        with pytest.raises(DeviceError, match="not a compatible"):
            worker.call("register", endpoints=[f"127.0.0.1:{srv.getsockname()[1]}"])
        t.join(5)
    assert worker.call("dev_count") == 4   # CPU + the three servers: nothing was added


CASES = {
    "ts-1-1-1": (dict(tensor_split=(1, 1, 1)), [1, 1, 1], -1),
    "ts-1-3-0": (dict(tensor_split=(1, 3, 0)), [1, 3, 0], -1),
    "ts-2-1-1-ngl-10": (dict(tensor_split=(2, 1, 1), n_gpu_layers=10), [2, 1, 1], 10),
    "ngl-1-output-only": (dict(tensor_split=(1, 1, 1), n_gpu_layers=1), [1, 1, 1], 1),
    "ngl-0": (dict(tensor_split=(1, 1, 1), n_gpu_layers=0), [1, 1, 1], 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_split_across_servers(worker, rpc_names, smollm2_path, case):
    settings, split, ngl = CASES[case]
    r, raw = worker.load(smollm2_path, SplitConfig(n_ctx=512, **settings))
    assert r.devices == tuple(rpc_names)
    assert r.layer_devices == expected_layers(rpc_names, split, ngl)
    check_buffers(r, rpc_names)
    assert raw["notes"] == [] and raw["last_progress"] == 1.0


def test_default_split_follows_free_memory(worker, rpc_names, smollm2_path):
    r, _ = worker.load(smollm2_path, SplitConfig(n_ctx=512))
    # the three servers share one machine, so they report about the same free memory
    counts = [r.layer_devices.count(n) for n in rpc_names]
    assert sum(counts) == N_LAYER + 1 and max(counts) - min(counts) <= 1
    check_buffers(r, rpc_names)


def test_split_mode_none_uses_main_gpu_only(worker, rpc_names, smollm2_path):
    r, _ = worker.load(smollm2_path, SplitConfig(n_ctx=512, split_mode="none", main_gpu=1))
    assert r.devices == ("RPC1",)
    assert r.layer_devices == ("RPC1",) * (N_LAYER + 1)
    check_buffers(r, rpc_names)


def test_device_list_sets_order(worker, rpc_names, smollm2_path):
    r, _ = worker.load(smollm2_path, SplitConfig(n_ctx=512, devices=("RPC2", "RPC0"), tensor_split=(1, 1)))
    assert r.devices == ("RPC2", "RPC0")
    assert r.layer_devices == expected_layers(["RPC2", "RPC0"], [1, 1])
    check_buffers(r, rpc_names)


def test_kv_stays_on_host_without_kv_offload(worker, rpc_names, smollm2_path):
    r, _ = worker.load(smollm2_path, SplitConfig(n_ctx=512, tensor_split=(1, 1, 1), offload_kqv=False))
    assert r.layer_devices == expected_layers(rpc_names, [1, 1, 1])
    assert r.kv_layer_devices == ("CPU",) * N_LAYER
    assert all(r.bytes_on(n, "kv") == 0 for n in rpc_names)
    assert abs(r.bytes_on("CPU", "kv") - N_LAYER * KV_PER_LAYER_512) <= ROUND


def test_dry_run_matches_real_load(worker, rpc_names, smollm2_path):
    config = dict(n_ctx=512, tensor_split=(1, 3, 0))
    real, _ = worker.load(smollm2_path, SplitConfig(**config))
    dry, raw = worker.load(smollm2_path, SplitConfig(**config), dry_run=True)
    assert dry.dry_run and not real.dry_run
    assert dry.layer_devices == real.layer_devices and dry.devices == real.devices
    assert dry.kv_layer_devices == real.kv_layer_devices
    # model and KV buffers: the same devices, logged as 0 bytes (dummies); their totals are real
    for kind in ("model", "kv"):
        assert ({b.device for b in dry.buffers if b.kind == kind}
                == {b.device for b in real.buffers if b.kind == kind}), kind
        assert all(b.n_bytes == 0 for b in dry.buffers if b.kind == kind)
    assert abs(dry.kv_total_bytes - sum(b.n_bytes for b in real.buffers if b.kind == "kv")) <= 3 * ROUND
    # compute buffers are planned for real, on the same devices; llama.cpp's no_alloc estimate
    # came out somewhat above the real reservation for the output layer's device (+4% here)
    for dev in rpc_names + ["CPU"]:
        c_real, c_dry = real.bytes_on(dev, "compute"), dry.bytes_on(dev, "compute")
        assert (c_real > 0) == (c_dry > 0), dev
        assert c_real * 0.9 <= c_dry <= c_real * 1.25, (dev, c_real, c_dry)
    assert dry.bytes_on("CPU", "output") == real.bytes_on("CPU", "output")
    assert raw["n_progress"] == 1 and raw["last_progress"] == 1.0   # no weights read


def test_real_rpc_log_parses_the_same_here(worker, rpc_names, cluster, smollm2_path):
    r, _ = worker.load(smollm2_path, SplitConfig(n_ctx=512, tensor_split=(1, 2, 1)))
    assert "RPC0[" + cluster.endpoints[2] + "]" in r.log   # every server's first buffer is 'RPC0[...]'
    # from the log alone ('using device RPCn (endpoint)' names the endpoints)...
    assert parse_load_log(r.log) == r
    # ... and with Device objects that carry the endpoints
    from gpulab.core.devices import Device
    devs = [Device(n, 1, 1, "rpc", "rpc", endpoint=e) for n, e in zip(rpc_names, cluster.endpoints)]
    assert parse_load_log(r.log, devs) == r
    rpc_buffers = [b for b in r.buffers if b.buffer_type.startswith("RPC")]
    assert {b.device for b in rpc_buffers} == set(rpc_names)
    for b in rpc_buffers:
        assert b.buffer_type == f"RPC0[{cluster.endpoints[rpc_names.index(b.device)]}]"


def test_stopped_server_is_left_out(worker, rpc_names, smollm2_path):
    """Last in this module: registers a fourth server and stops it. ggml keeps the device;
    llama_devices() and open_model() step around it instead of letting llama.cpp abort."""
    with RpcServer() as extra:
        names = [d["name"] for d in worker.call("register", endpoints=[extra.endpoint])]
    assert names == ["RPC3"] and not extra.alive
    assert [d["name"] for d in worker.call("devices") if d["kind"] == "rpc"] == rpc_names
    assert worker.call("default_device_names") == rpc_names
    r, raw = worker.load(smollm2_path, SplitConfig(n_ctx=256, tensor_split=(1, 1, 1)))
    assert r.devices == tuple(rpc_names) and raw["effective_devices"] == rpc_names
    assert "RPC3" in raw["notes"][0]
    with pytest.raises(DeviceError, match="RPC3"):
        worker.call("load", path=smollm2_path, config=dict(n_ctx=256, devices=("RPC3",)))
    assert worker.proc.poll() is None


# --- servers: warnings, lifecycle, cleanup (this process; nothing registered here) ----------

def test_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")
    assert insecure_bind_warning("127.0.0.1", 1) is None


def test_non_loopback_bind_warns_loudly(capsys):
    # the device check fails after the warning and before anything binds
    with pytest.raises(DeviceError, match="no device 'NO_SUCH_DEVICE'"):
        serve("0.0.0.0", 50052, device="NO_SUCH_DEVICE")
    err = capsys.readouterr().err
    assert "WARNING" in err and "NO authentication" in err and "0.0.0.0:50052" in err
    with pytest.raises(DeviceError):
        serve("127.0.0.1", 50052, device="NO_SUCH_DEVICE")
    assert "WARNING" not in capsys.readouterr().err


def test_serve_needs_an_ipv4_address():
    with pytest.raises(DeviceError, match="IPv4"):
        serve("example.invalid", 50052)


def test_server_lifecycle(cluster):
    with RpcServer() as s:
        pid = s.pid
        assert s.alive and probe(s.endpoint)[1] == 1
        assert "Starting RPC server" in s.output() or s.output() == ""   # C stdio buffers it
    assert not s.alive
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    s.stop()   # idempotent
    busy_port = int(cluster.endpoints[0].rsplit(":", 1)[1])
    with pytest.raises(DeviceError, match="cannot serve"):
        RpcServer(port=busy_port).start()


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_servers_die_with_their_parent(ending, repo_root):
    """A parent that exits without stop() (weakref finalizer at exit), or is killed outright
    (the server watches its parent pid), leaves no server behind."""
    code = textwrap.dedent(f"""
        import os, signal
        from gpulab.runtime.rpc import RpcServer, start_servers
        c = start_servers(2)
        s = RpcServer().start()
        print(*[x.pid for x in c], s.pid, flush=True)
        if {ending!r} == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 3, out.stderr
    if ending == "sigkill":
        assert out.returncode == -signal.SIGKILL
    for pid in pids:
        assert wait_gone(pid, 5), f"server {pid} outlived its parent ({ending})"


def test_stopping_a_server_registered_here_warns(repo_root):
    """In a fresh process (registering here would leave a device in the test process)."""
    code = textwrap.dedent("""
        import warnings
        from gpulab.runtime.rpc import RpcServer, register
        from gpulab.runtime.llama_lib import llama_devices
        s = RpcServer().start()
        register([s.endpoint])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s.stop()
        print("|".join(str(w.message) for w in caught))
        print([d.name for d in llama_devices()])
    """)
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    message, devices = out.stdout.splitlines()
    assert "stay registered" in message and "will abort" in message
    assert devices == "['CPU']"
