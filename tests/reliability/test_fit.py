"""Impossible configurations are refused before loading (open_model / Worker.load check_fit=True)."""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest

from gpulab.core.config import SplitConfig
from gpulab.core.errors import DoesNotFitError, GpulabError
from gpulab.runtime import llama_lib
from gpulab.runtime.model import open_model
from gpulab.runtime.rpc import start_servers
from gpulab.runtime.worker import Worker

CFG = SplitConfig(n_ctx=256, n_batch=16, n_ubatch=16)


def test_host_too_small_is_refused_before_loading(smollm2_path):
    devs = [dataclasses.replace(d, free_bytes=2**20) if d.kind == "cpu" else d for d in llama_lib.llama_devices()]
    with pytest.raises(DoesNotFitError, match=r"does not fit with this configuration: CPU: needs .* more than "
                                              r"its 1(\.00)? MiB free") as err:
        open_model(smollm2_path, CFG, devices=devs, check_fit=True)
    assert isinstance(err.value, GpulabError) and "\n" not in str(err.value)
    print(f"FAULT does-not-fit-host: {type(err.value).__name__}: {err.value}")
    with open_model(smollm2_path, CFG, check_fit=True) as m:     # what fits still loads
        assert m.report.layer_devices


@pytest.mark.skipif(not llama_lib.rpc_supported(), reason="llama-cpp-python built without RPC")
def test_rpc_split_too_large_names_each_device(smollm2_path):
    huge = SplitConfig(tensor_split=(1, 1), n_ctx=2**24, n_batch=16, n_ubatch=16)   # ~16M tokens of KV
    with start_servers(2) as c, Worker(c.endpoints) as w:
        with pytest.raises(DoesNotFitError, match=r"RPC0: needs .* more .*RPC1: needs .* more") as err:
            w.load(smollm2_path, huge, check_fit=True)
        print(f"FAULT does-not-fit-rpc: {type(err.value).__name__}: {err.value}")
        pid = w.proc.pid
        report, _ = w.load(smollm2_path, huge.replace(n_ctx=256), check_fit=True)   # same worker, still fine
        assert w.proc.pid == pid and set(report.layer_devices) >= {"RPC0", "RPC1"}


def test_isolated_load_survives_an_rpc_server_dying(tmp_path):
    """gpulab.load(..., rpc=...) loads in a worker: killing its RPC server ends the worker, not us,
    and the error says so."""
    import gpulab
    from gpulab import LoadError, SplitConfig
    from gpulab.runtime.rpc import start_servers
    from gpulab.sources.demo import demo_model_path

    with start_servers(1) as cluster:
        remote = gpulab.load(demo_model_path(), SplitConfig(n_ctx=256), rpc=cluster.endpoints)
        assert remote.report.layers_on("RPC0")
        os.kill(cluster.servers[0].pid, signal.SIGKILL)
        with pytest.raises(LoadError):
            remote.measure(n_prompt=16, n_gen=4, repetitions=1)
        remote.close()   # the worker is gone: closing is a no-op, not an error
    assert not remote.worker.alive
