"""Measure pp and tg the way llama-bench does, in this process, with llama.cpp's own decode loop.

    run = measure("model.gguf", SplitConfig(n_ctx=640), n_prompt=512, n_gen=128, repetitions=5)
    run.pp.avg_ts, run.tg.avg_ts, run.report.bytes_on("CPU", "kv"), run.plan

    with open_model(path, cfg) as m:          # or re-measure a model already loaded
        run = measure_loaded(m, n_prompt=128, n_gen=32)
        m = resplit(m, cfg.replace(tensor_split=(1, 3)))   # close, reload with the new split
        run2 = measure_loaded(m); m.close()

What is timed, as tools/llama-bench/llama-bench.cpp (test_prompt, test_gen) of the vendored
llama.cpp times it:
- pp: one prompt of n_prompt random tokens (the first is BOS when the vocab adds one),
  decoded in n_batch chunks, then llama_synchronize;
- tg: n_gen single-token decodes of random tokens, llama_synchronize after each;
- a warm-up before each test (the whole prompt; one generated token), not timed;
- llama_memory_clear before each repetition; wall time per repetition in ns; tokens/s per
  repetition = 1e9 * tokens / ns, mean and sample standard deviation over repetitions;
- threads: llama_set_n_threads(n, n) and a ggml CPU threadpool attached to the context, as
  llama-bench does; default: llama-bench's default (physical cores, common_cpu_get_num_math).
The loop calls llama_decode through ctypes with preallocated batches and no Python work
per token beyond the call itself (llama_cpp.Llama.eval's loop measured 0.86x of llama-bench).

llama-bench gives pp and tg separate contexts of n_ctx = n_prompt + n_gen; here both run in
the loaded context, which must hold max(n_prompt, n_gen) tokens per sequence.

RPC devices: an RPC server that dies makes llama.cpp abort the whole process, so runs on RPC
devices belong in a worker process: `gpulab.runtime.worker.Worker(...).measure(...)`.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..core.config import SplitConfig
from ..core.devices import Device
from ..core.errors import ConfigError, LoadError, RuntimeUnavailableError
from ..core.measure.results import BenchRun, throughput_from_samples
from ..core.memory import PlannedMemory
from ..sources.host import default_threads
from . import ggml, llama_lib
from .crash import guard
from .model import LoadedModel, open_model, plan_load

__all__ = ["measure", "measure_loaded", "resplit", "system_facts", "Progress"]

# progress(phase, fraction): phase one of 'load', 'warmup', 'pp', 'tg'; fraction in [0, 1]
Progress = Callable[[str, float], object]

_GGML_MAX_N_THREADS = 512       # ggml.h GGML_MAX_N_THREADS


class _ThreadpoolParams(ctypes.Structure):   # struct ggml_threadpool_params (ggml.h)
    _fields_ = [("cpumask", ctypes.c_bool * _GGML_MAX_N_THREADS), ("n_threads", ctypes.c_int),
                ("prio", ctypes.c_int), ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool),
                ("paused", ctypes.c_bool)]


_extras_lock = threading.Lock()
_extras: dict[str, Any] = {}   # threadpool functions ('tp'), ggml_commit ('commit')


def _threadpool_fns():
    """(params_default, threadpool_new, threadpool_free, attach, detach) or None when this
    llama.cpp build does not export them (then llama.cpp makes a threadpool per graph)."""
    with _extras_lock:
        if "tp" in _extras:
            return _extras["tp"]
        fns = None
        try:
            base, cpu = llama_lib.ggml_base(), llama_lib.ggml_cpu()
            lib = llama_lib.llama_cpp().llama_cpp._lib    # libllama as llama-cpp-python loaded it
            pd = base.ggml_threadpool_params_default
            pd.argtypes, pd.restype = [ctypes.c_int], _ThreadpoolParams
            new = cpu.ggml_threadpool_new
            new.argtypes, new.restype = [ctypes.POINTER(_ThreadpoolParams)], ctypes.c_void_p
            free = cpu.ggml_threadpool_free
            free.argtypes, free.restype = [ctypes.c_void_p], None
            attach = lib.llama_attach_threadpool
            attach.argtypes, attach.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], None
            detach = lib.llama_detach_threadpool
            detach.argtypes, detach.restype = [ctypes.c_void_p], None
            fns = (pd, new, free, attach, detach)
        except (RuntimeUnavailableError, AttributeError):
            fns = None
        _extras["tp"] = fns
        return fns


def system_facts() -> dict:
    """llama-bench's cpu_info, gpu_info and backends, and llama_print_system_info, from the
    ggml devices and backends registered in this process."""
    g = llama_lib.ggml()
    lc = llama_lib.llama_cpp()
    with _extras_lock:
        if "reg_dev_count" not in _extras:
            fn = g.ggml_backend_reg_dev_count
            fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_size_t
            _extras["reg_dev_count"] = fn
    reg_dev_count = _extras["reg_dev_count"]
    cpu, gpu = [], []
    for dev in ggml.device_handles(g):
        t = g.ggml_backend_dev_type(dev)
        desc = ggml.dev_description(g, dev)
        if t in (0, 3):      # CPU, ACCEL
            cpu.append(desc)
        elif t in (1, 2):    # GPU, IGPU (RPC devices are GPU-type)
            gpu.append(desc)
    backends, rpc_used = [], False
    for reg in ggml.reg_handles(g):
        name = ggml.reg_name(g, reg)
        if name.startswith("RPC"):
            rpc_used = rpc_used or reg_dev_count(reg) > 0
        elif name != "CPU":
            backends.append(name)
    if rpc_used:
        backends.append("RPC")
    info = ggml.text(lc.llama_print_system_info()).strip()
    lcp = f"llama-cpp-python {getattr(lc, '__version__', '') or _lcp_version()}"
    return {"cpu_info": ", ".join(cpu), "gpu_info": ", ".join(gpu),
            "backends": ",".join(backends) if backends else "CPU",
            "system_info": f"{lcp} | {info}", "build": _ggml_commit() or lcp.replace(" ", "-")}


def _ggml_commit() -> str:
    """ggml_commit(): the llama.cpp commit the libraries were built from (llama-bench's
    build_commit comes from the same git metadata), '' where unknown."""
    with _extras_lock:
        if "commit" not in _extras:
            commit = ""
            try:
                fn = llama_lib.ggml_base().ggml_commit
                fn.argtypes, fn.restype = [], ctypes.c_char_p
                commit = ggml.text(fn())
            except (RuntimeUnavailableError, AttributeError):
                pass
            _extras["commit"] = "" if commit in ("", "unknown") else commit
        return _extras["commit"]


def _lcp_version() -> str:
    try:
        from importlib.metadata import version
        return version("llama_cpp_python")
    except Exception:  # noqa: BLE001
        return "unknown"


def _model_facts(lc, model) -> dict:
    buf = ctypes.create_string_buffer(256)
    lc.llama_model_desc(model, buf, ctypes.sizeof(buf))
    return {"model_type": ggml.text(buf.value), "model_size": int(lc.llama_model_size(model)),
            "model_n_params": int(lc.llama_model_n_params(model))}


class _Loop:
    """The timed decode loops on one context (test_prompt / test_gen of llama-bench)."""

    def __init__(self, lc, ctx, model, n_batch: int, seed: int | None):
        import numpy as np
        self.lc, self.ctx = lc, ctx
        vocab = lc.llama_model_get_vocab(model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(vocab))
        self.add_bos = bool(lc.llama_vocab_get_add_bos(vocab))
        self.bos = int(lc.llama_vocab_bos(vocab))
        self.mem = lc.llama_get_memory(ctx)
        self.n_batch = n_batch
        self.np = np
        self.rng = np.random.default_rng(seed)
        self.tokens = (lc.llama_token * n_batch)()
        self.batch1 = lc.llama_batch_init(1, 0, 1)
        b = self.batch1
        b.n_tokens = 1
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = 0
        b.logits[0] = 1

    def free(self) -> None:
        if self.batch1 is not None:
            self.lc.llama_batch_free(self.batch1)
            self.batch1 = None

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.mem, False)

    def _fail(self, what: str, rc: int):
        why = {1: "no KV cache slot for the batch (context too small)", 2: "aborted"}.get(rc, "llama.cpp error")
        raise LoadError(f"llama_decode failed during {what}: returned {rc} ({why})")

    def prompt_tokens(self, n_prompt: int) -> list:
        """The random chunks of one prompt, drawn before timing starts."""
        chunks, done = [], 0
        while done < n_prompt:
            n = min(n_prompt - done, self.n_batch)
            arr = self.rng.integers(0, self.n_vocab, n, dtype=self.np.int32)
            if done == 0 and self.add_bos:
                arr[0] = self.bos
            chunks.append(arr)
            done += n
        return chunks

    def prompt(self, chunks: list) -> None:
        lc, ctx, tokens = self.lc, self.ctx, self.tokens
        decode, get_one, memmove = lc.llama_decode, lc.llama_batch_get_one, ctypes.memmove
        for arr in chunks:
            n = len(arr)
            memmove(tokens, arr.ctypes.data, 4 * n)
            rc = decode(ctx, get_one(tokens, n))
            if rc != 0:
                self._fail("prompt processing", rc)
        lc.llama_synchronize(ctx)

    def gen_tokens(self, n_gen: int) -> list[int]:
        toks = self.rng.integers(0, self.n_vocab, n_gen).tolist()
        if self.add_bos and toks:
            toks[0] = self.bos
        return toks

    def gen(self, toks: list[int]) -> None:
        lc, ctx, b = self.lc, self.ctx, self.batch1
        decode, sync = lc.llama_decode, lc.llama_synchronize
        tok_p, pos_p = b.token, b.pos
        pos = int(lc.llama_memory_seq_pos_max(self.mem, 0)) + 1
        for t in toks:
            tok_p[0] = t
            pos_p[0] = pos
            pos += 1
            rc = decode(ctx, b)
            if rc != 0:
                self._fail("generation", rc)
            sync(ctx)


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _planned(loaded: LoadedModel) -> tuple[PlannedMemory | None, str | None]:
    """The prediction the load was checked against, else the planner's for the config llama.cpp
    got, on the devices it saw at load."""
    if loaded.plan is not None:
        return loaded.plan, None
    try:
        return plan_load(loaded.path, loaded.effective_config, list(loaded.devices)), None
    except Exception as e:  # noqa: BLE001 - a run without a prediction is still a run
        return None, f"no plan for this run: {type(e).__name__}: {e}"


def _timed_tests(lc, ctx, model, n_batch: int, n_threads: int, seed: int | None, *, n_prompt: int, n_gen: int,
                 repetitions: int, warmup: bool, report) -> tuple:
    """(pp, tg) Throughputs of llama-bench's test_prompt / test_gen on a loaded context."""
    tp = None
    fns = _threadpool_fns()
    loop = _Loop(lc, ctx, model, n_batch, seed)
    pp = tg = None
    try:
        lc.llama_set_n_threads(ctx, n_threads, n_threads)
        if fns is not None:
            pdefault, tp_new, _free, attach, _detach = fns
            params = pdefault(n_threads)
            tp = tp_new(ctypes.byref(params))
            if tp:
                attach(ctx, tp, None)
        loop.clear()
        if n_prompt > 0:
            if warmup:
                report("warmup", 0.0)
                loop.prompt(loop.prompt_tokens(n_prompt))
            samples = []
            report("pp", 0.0)
            for i in range(repetitions):
                chunks = loop.prompt_tokens(n_prompt)
                loop.clear()
                t0 = time.perf_counter_ns()
                loop.prompt(chunks)
                samples.append(time.perf_counter_ns() - t0)
                report("pp", (i + 1) / repetitions)
            pp = throughput_from_samples(n_prompt, 0, samples)
        if n_gen > 0:
            loop.clear()
            if warmup:
                report("warmup", 0.5 if n_prompt > 0 else 0.0)
                loop.gen(loop.gen_tokens(1))
            samples = []
            report("tg", 0.0)
            for i in range(repetitions):
                toks = loop.gen_tokens(n_gen)
                loop.clear()
                t0 = time.perf_counter_ns()
                loop.gen(toks)
                samples.append(time.perf_counter_ns() - t0)
                report("tg", (i + 1) / repetitions)
            tg = throughput_from_samples(0, n_gen, samples)
        loop.clear()
    finally:
        loop.free()
        if tp:
            fns[4](ctx)      # llama_detach_threadpool, then free it
            fns[2](tp)
    return pp, tg


def measure_loaded(loaded: LoadedModel, *, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 5,
                   n_threads: int | None = None, progress: Progress | None = None, warmup: bool = True,
                   seed: int | None = None, nvml: bool = True, _sampler=None, _load_seconds: float | None = None,
                   ) -> BenchRun:
    """Measure pp (n_prompt tokens) and tg (n_gen tokens) on a model opened by `open_model`.

    n_prompt=0 or n_gen=0 skips that test. Raises LoadError when llama.cpp fails a decode
    and ConfigError when the context is too small for the tests.
    """
    if loaded.closed:
        raise LoadError(f"{Path(loaded.path).name} is closed; open it again (or use resplit)")
    if loaded.dry_run:
        raise ConfigError("a dry-run load (no_alloc) allocated nothing to run; open the model without dry_run")
    if repetitions < 1 or n_prompt < 0 or n_gen < 0 or (n_prompt == 0 and n_gen == 0):
        raise ConfigError("need repetitions >= 1 and n_prompt, n_gen >= 0, not both 0")
    n_threads = int(n_threads) if n_threads else default_threads()
    if n_threads < 1:
        raise ConfigError(f"n_threads must be at least 1, got {n_threads}")
    lc = llama_lib.llama_cpp()
    ctx, model = loaded.ctx, loaded.model
    n_ctx_seq = int(lc.llama_n_ctx_seq(ctx)) if hasattr(lc, "llama_n_ctx_seq") else int(lc.llama_n_ctx(ctx))
    need = max(n_prompt, n_gen)
    if need > n_ctx_seq:
        raise ConfigError(f"the context holds {n_ctx_seq} tokens per sequence but the tests need {need} "
                          f"(n_prompt {n_prompt}, n_gen {n_gen}); load with n_ctx >= {need} "
                          "(llama-bench uses n_prompt + n_gen)")
    n_batch = max(1, min(loaded.effective_config.n_batch, int(lc.llama_n_batch(ctx))))

    def report(phase: str, fraction: float) -> None:
        if progress is not None:
            progress(phase, fraction)

    sampler = _sampler
    own_sampler = sampler is None and nvml
    if own_sampler:
        from .nvml_sampler import NvmlSampler
        sampler = NvmlSampler().start()

    started = _now_iso()
    facts = system_facts()
    mfacts = _model_facts(lc, model)
    plan, plan_note = _planned(loaded)
    try:
        with guard(f"the measurement of {Path(loaded.path).name}"):
            pp, tg = _timed_tests(lc, ctx, model, n_batch, n_threads, seed, n_prompt=n_prompt, n_gen=n_gen,
                                  repetitions=repetitions, warmup=warmup, report=report)
    finally:
        if own_sampler:
            sampler.stop()
    notes = list(loaded.notes)
    if plan_note:
        notes.append(plan_note)
    if sampler is not None and not sampler.available and sampler.reason:
        notes.append(f"no NVML figures: {sampler.reason}")
    load_s = _load_seconds if _load_seconds is not None else loaded.load_seconds + loaded.context_seconds
    run = BenchRun(
        model_path=loaded.path, model_bytes=mfacts["model_size"], config=loaded.effective_config,
        report=loaded.report, pp=pp, tg=tg, load_seconds=load_s, n_threads=n_threads,
        devices=tuple(loaded.report.devices),
        nvml_peak_bytes=dict(sampler.peak_bytes) if sampler is not None else {},
        plan=plan, timestamp=started, build=facts["build"],
        model_type=mfacts["model_type"], model_n_params=mfacts["model_n_params"],
        model_fingerprint=_model_fingerprint(loaded.path), cpu_info=facts["cpu_info"], gpu_info=facts["gpu_info"],
        backends=facts["backends"], system_info=facts["system_info"], context_seconds=loaded.context_seconds,
        warmup=warmup, device_uuids=dict(sampler.uuids) if sampler is not None else {},
        nvml_baseline_bytes=dict(sampler.baseline_bytes) if sampler is not None else {},
        nvml_per_process=bool(sampler.per_process) if sampler is not None else False,
        run_id=uuid.uuid4().hex, notes=tuple(notes))
    if run.nvml_peak_bytes and run.device_uuids:
        # what NVML saw beyond llama.cpp's buffers, kept per GPU for the planner's next "fits"
        from ..storage.overheads import learn_overhead
        try:
            learn_overhead(run)
        except OSError:
            pass
    return run


def _model_fingerprint(path: str) -> str:
    from ..sources.fingerprint import model_fingerprint
    try:
        return model_fingerprint(path)
    except OSError:
        return ""


def measure(path: str | os.PathLike, config: SplitConfig | None = None, *, n_prompt: int = 512,
            n_gen: int = 128, repetitions: int = 5, n_threads: int | None = None,
            devices: list[Device] | None = None, progress: Progress | None = None, warmup: bool = True,
            seed: int | None = None, nvml: bool = True, verbose: bool = False,
            plan: PlannedMemory | None = None) -> BenchRun:
    """Load `path` with `config`, measure pp and tg as llama-bench does, close; the Run.

    config: default SplitConfig(n_ctx=n_prompt + n_gen), llama-bench's context size.
    devices: the devices llama.cpp sees (default llama_devices()), as open_model takes them.
    progress(phase, fraction): 'load', 'warmup', 'pp', 'tg'.
    nvml: sample GPU memory with NVML during load and run, where NVML is available.
    plan: the caller's prediction for this load (Plan.memory()): checked and kept instead of
      planning again (open_model's `plan`).
    """
    config = config or SplitConfig(n_ctx=max(1, n_prompt + n_gen))
    sampler = None
    if nvml:
        from .nvml_sampler import NvmlSampler
        sampler = NvmlSampler().start()
    try:
        load_progress = (lambda f: progress("load", f)) if progress is not None else None
        with open_model(path, config, devices=devices, progress=load_progress, verbose=verbose,
                        plan=plan) as m:
            return measure_loaded(m, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, n_threads=n_threads,
                                  progress=progress, warmup=warmup, seed=seed, nvml=nvml, _sampler=sampler)
    finally:
        if sampler is not None:
            sampler.stop()


def resplit(loaded: LoadedModel, new_config: SplitConfig, *, devices: list[Device] | None = None,
            progress: Callable[[float], object] | None = None, verbose: bool = False) -> LoadedModel:
    """Change the split of a loaded model: close it and load it again with `new_config`.

    llama.cpp cannot move the layers of a loaded model, so this is a reload; the weights come
    back from the page cache through mmap (and, for RPC devices, are sent to the servers again).
    The old LoadedModel is closed. The new one's `ready_seconds` is the time from this call to
    a context ready to measure, the close of the old model included.
    """
    t0 = time.perf_counter()
    path = loaded.path
    devs = devices if devices is not None else None
    loaded.close()
    m = open_model(path, new_config, devices=devs, progress=progress, verbose=verbose)
    m.ready_seconds = time.perf_counter() - t0
    return m
