"""open_model in this process on the CPU: reports, dry runs, progress, closing, failed loads.

Loads here keep every layer on the CPU (n_gpu_layers=0), so they mean the same on any machine.
Loads across devices run against RPC servers in test_runtime_rpc.py.
"""

from __future__ import annotations

import logging
import os

import pytest

from gpulab.core.config import SplitConfig
from gpulab.core.errors import LoadError
from gpulab.runtime import logcapture
from gpulab.runtime.logcapture import LogCapture, parse_load_log
from gpulab.runtime.model import open_model

pytest.importorskip("llama_cpp")

MiB = 1024 * 1024
N_LAYER = 30                     # SmolLM2-135M
KV_PER_LAYER_512 = 512 * (192 + 192) * 2   # cells x (n_embd_k_gqa + n_embd_v_gqa) x f16
CPU_ONLY = SplitConfig(n_gpu_layers=0, n_ctx=512, n_batch=512)


def test_cpu_load_report(smollm2_path):
    with open_model(smollm2_path, CPU_ONLY) as m:
        r = m.report
        assert not m.closed and m.model and m.ctx
    assert r.layer_devices == ("CPU",) * (N_LAYER + 1)
    assert r.kv_layer_devices == ("CPU",) * N_LAYER
    assert r.bytes_on("CPU", "kv") == N_LAYER * KV_PER_LAYER_512
    # every weight is on the host: the mapped file range is the whole tensor data (92.10 MiB)
    assert abs(r.bytes_on("CPU", "model") - round(92.10 * MiB)) < 0.05 * MiB
    assert r.bytes_on("CPU", "compute") > 0 and r.bytes_on("CPU", "output") > 0
    assert not r.dry_run and r.kv_total_bytes == N_LAYER * KV_PER_LAYER_512
    assert m.closed and m.model is None and m.ctx is None
    m.close()   # idempotent
    assert m.load_seconds > 0 and m.context_seconds > 0


def test_dry_run_on_cpu(smollm2_path):
    with open_model(smollm2_path, CPU_ONLY, dry_run=True) as m:
        r = m.report
    assert r.dry_run and m.dry_run
    assert r.layer_devices == ("CPU",) * (N_LAYER + 1)
    # no_alloc: model and KV buffers are zero-size dummies; the KV total line is real
    assert r.bytes_on("CPU", "model") == 0 and r.bytes_on("CPU", "kv") == 0
    assert any(b.kind == "model" for b in r.buffers) and any(b.kind == "kv" for b in r.buffers)
    assert r.kv_total_bytes == N_LAYER * KV_PER_LAYER_512
    assert r.bytes_on("CPU", "compute") > 0 and r.bytes_on("CPU", "output") > 0


def test_progress(smollm2_path):
    seen: list[float] = []
    with open_model(smollm2_path, CPU_ONLY, progress=seen.append):
        pass
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)


def test_progress_that_raises_cancels_the_load(smollm2_path):
    class Stop(Exception):
        pass

    def progress(fraction: float) -> None:
        if fraction > 0.1:
            raise Stop

    with pytest.raises(Stop):
        open_model(smollm2_path, CPU_ONLY, progress=progress)
    with open_model(smollm2_path, CPU_ONLY, dry_run=True) as m:   # still usable afterwards
        assert m.report.n_layer == N_LAYER


def test_verbose_echoes_the_log(smollm2_path, capsys):
    with open_model(smollm2_path, CPU_ONLY, dry_run=True, verbose=True):
        pass
    err = capsys.readouterr().err
    assert "model buffer size" in err and "assigned to device" not in err   # info level, not debug


def test_real_log_parses_the_same_offline(smollm2_path):
    with open_model(smollm2_path, CPU_ONLY) as m:
        r = m.report
    again = parse_load_log(r.log)
    assert again == r


@pytest.fixture(scope="module")
def corrupt_files(tmp_path_factory, smollm2_path):
    root = tmp_path_factory.mktemp("corrupt")
    data = open(smollm2_path, "rb").read(2 << 20)
    size = os.path.getsize(smollm2_path)
    files = {
        "empty": b"",
        "not-gguf": b"\x89PNG\r\n\x1a\n" + bytes(4000),
        "bad-header": b"GGUF" + bytes([3, 0, 0, 0]) + (2**62).to_bytes(8, "little") + bytes(4000),
        "cut-in-metadata": data[:1000],
        "cut-in-tensor-data": None,   # first half of the real file
    }
    out = {}
    for name, content in files.items():
        p = root / f"{name}.gguf"
        if content is None:
            with open(smollm2_path, "rb") as src, open(p, "wb") as dst:
                dst.write(src.read(size // 2))
        else:
            p.write_bytes(content)
        out[name] = str(p)
    return out


@pytest.mark.parametrize("name,message", [
    ("empty", "failed to read magic"),
    ("not-gguf", "invalid magic"),
    ("bad-header", "failed to read"),
    ("cut-in-metadata", "failed to read"),
    ("cut-in-tensor-data", "not within the file bounds"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_corrupt_file_is_a_load_error(corrupt_files, name, message, dry_run):
    # llama.cpp rejects these with an exception it catches itself: the process survives
    # (check_fit=False: hand the file to llama.cpp without gpulab's own reader in front)
    with pytest.raises(LoadError, match=message):
        open_model(corrupt_files[name], CPU_ONLY, dry_run=dry_run, check_fit=False)


@pytest.mark.parametrize("name", ["empty", "not-gguf", "bad-header", "cut-in-metadata", "cut-in-tensor-data"])
def test_corrupt_file_is_refused_before_llama_cpp_by_default(corrupt_files, name):
    from gpulab.core.errors import ModelFormatError
    with pytest.raises(ModelFormatError):
        open_model(corrupt_files[name], CPU_ONLY)


def test_missing_file():
    with pytest.raises(LoadError, match="no model file"):
        open_model("/nonexistent/model.gguf", CPU_ONLY)


def test_context_failure_frees_the_model(smollm2_path):
    # llama_context's constructor throws for n_seq_max > LLAMA_MAX_SEQ (256)
    with pytest.raises(LoadError, match="n_seq_max must be <= 256") as exc:
        open_model(smollm2_path, CPU_ONLY.replace(n_seq_max=1000))
    assert "create a context" in str(exc.value)


def test_nested_captures_and_quiet_default(smollm2_path, capsys):
    with LogCapture() as outer:
        with LogCapture() as inner:
            with open_model(smollm2_path, CPU_ONLY, dry_run=True):
                pass
    assert "assigned to device" not in inner.text   # open_model's own capture is innermost
    assert outer.records == []
    lcp_logger = logging.getLogger("llama-cpp-python")
    saved = lcp_logger.level

    def log_some() -> str:
        logcapture._dispatch(logcapture.LEVEL_INFO, b"info line\n", None)
        logcapture._dispatch(logcapture.LEVEL_ERROR, b"error line", None)
        logcapture._dispatch(logcapture.LEVEL_CONT, b" continued\n", None)
        logcapture._dispatch(logcapture.LEVEL_DEBUG, b"debug line\n", None)
        return capsys.readouterr().err

    try:
        for level in (logging.NOTSET, logging.ERROR):   # untouched, or Llama(verbose=False)
            lcp_logger.setLevel(level)
            err = log_some()   # outside captures only error lines reach stderr
            assert "error line continued" in err and "info line" not in err and "debug line" not in err
        lcp_logger.setLevel(logging.DEBUG)                # what Llama(verbose=True) sets
        err = log_some()
        assert "info line" in err and "error line continued" in err and "debug line" not in err
    finally:
        lcp_logger.setLevel(saved)


def test_a_load_given_its_plan_neither_rereads_the_header_nor_plans(smollm2_path, monkeypatch):
    """What `gpulab bench` relies on: it plans once and hands the plan to the load."""
    from gpulab.core.memory import PlannedMemory
    from gpulab.runtime import llama_lib
    from gpulab.runtime import model as model_mod
    devices = llama_lib.llama_devices()
    given = model_mod.plan_load(smollm2_path, CPU_ONLY, devices)

    def no_planning(*_a, **_k):
        raise AssertionError("planned again")
    monkeypatch.setattr(model_mod, "plan_load", no_planning)
    with open_model(smollm2_path, CPU_ONLY, devices=devices, plan=given) as m:
        assert m.plan is given and isinstance(given, PlannedMemory)
    # the plan given is the one the load is checked against: over-full, refused before llama.cpp is called
    from gpulab.core.errors import DoesNotFitError
    full = PlannedMemory.from_dict({**given.to_dict(), "devices": [
        {**d, "free_bytes": MiB, "total_bytes": MiB} for d in given.to_dict()["devices"]]})
    with pytest.raises(DoesNotFitError, match=r"CPU: needs .* more than its 1.00 MiB free"):
        open_model(smollm2_path, CPU_ONLY, devices=devices, plan=full)
