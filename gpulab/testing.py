"""One set of fakes and synthetic models for tests, bench scripts and notebooks: no GPU, no
llama.cpp, no files unless asked.

- NVML: FakeNvml, a pynvml module over FakeGpu records (inject as NvmlProbe(FakeNvml([...])));
- runtime: FakeWorker, a gpulab.core.protocols.Runtime with canned placements and speeds;
- synthetic models: hand-built ModelProfiles (make_profile, make_hand_moe_profile,
  make_llama_profile) and the tensor-override cases written as GGUF files by
  gpulab.sources.synth (OVERRIDE_MODELS, OVERRIDE_CASES).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

from .core.config import SplitConfig
from .core.devices import Device
from .core.profile import LayerProfile, ModelProfile, TensorInfo
from .core.report import BufferReport, LoadReport
from .core.run import Run, Throughput
from .sources.synth import SynthSpec

__all__ = ["FakeNVMLError", "FakeNotSupported", "FakeGpu", "FakeNvml", "fake_gpu", "FakeWorker",
           "make_profile", "make_hand_moe_profile", "make_llama_profile", "OVERRIDE_MODELS", "OVERRIDE_CASES",
           "MiB", "GiB"]

MiB = 1024**2
GiB = 1024**3


# -- NVML: a fake pynvml, just the nvml* functions the probe calls ---------------------------------

class FakeNVMLError(Exception):
    pass


class FakeNotSupported(FakeNVMLError):
    pass


@dataclass
class FakeGpu:
    name: str = "NVIDIA GeForce RTX 4090"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    bus_id: str = "00000000:01:00.0"
    total: int = 24 * GiB
    used: int = 1 * GiB
    util: tuple[int, int] | None = (7, 3)       # None: utilization not supported
    procs: list = field(default_factory=list)   # [(pid, used_bytes)]
    mem_clock: int | None = 10501
    bus_width: int | None = 384
    mig: list = field(default_factory=list)     # MIG devices (FakeGpu) when MIG is on
    gi_ci: tuple[int, int] | None = None        # for MIG devices
    lost: bool = False                          # nvmlDeviceGetHandleByIndex fails


class FakeNvml:
    """pynvml as gpulab.sources.nvml.NvmlProbe calls it, over `gpus` (FakeGpu); inject it as
    NvmlProbe(FakeNvml([...])). `calls` lists the functions called."""

    NVMLError = FakeNVMLError
    NVML_CLOCK_MEM = 2
    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, gpus=(), init_error: Exception | None = None, count_error: Exception | None = None):
        self.gpus = list(gpus)
        self.init_error = init_error      # nvmlInit raises it: no driver, no library
        self.count_error = count_error    # nvmlDeviceGetCount raises it: init worked, then the driver failed
        self.calls: list[str] = []

    def _log(self, name):
        self.calls.append(name)

    def nvmlInit(self):
        self._log("nvmlInit")
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self._log("nvmlShutdown")

    def nvmlDeviceGetCount(self):
        if self.count_error:
            raise self.count_error
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        if self.gpus[i].lost:
            raise FakeNVMLError("GPU is lost")
        return self.gpus[i]

    def nvmlDeviceGetName(self, h):
        return h.name

    def nvmlDeviceGetUUID(self, h):
        return h.uuid

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=h.bus_id)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=h.total, used=h.used, free=h.total - h.used)

    def nvmlDeviceGetUtilizationRates(self, h):
        if h.util is None:
            raise FakeNotSupported("Not Supported")
        return SimpleNamespace(gpu=h.util[0], memory=h.util[1])

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in h.procs]

    def nvmlDeviceGetMaxClockInfo(self, h, clock):
        assert clock == self.NVML_CLOCK_MEM
        if h.mem_clock is None:
            raise FakeNotSupported("Not Supported")
        return h.mem_clock

    def nvmlDeviceGetMemoryBusWidth(self, h):
        if h.bus_width is None:
            raise FakeNotSupported("Not Supported")
        return h.bus_width

    def nvmlDeviceGetMigMode(self, h):
        if h.gi_ci is not None:
            raise FakeNotSupported("Not Supported")   # asked of a MIG device
        return [1 if h.mig else 0, 1 if h.mig else 0]

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        return 7 if h.mig else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, m):
        if m >= len(h.mig):
            raise FakeNVMLError("Not Found")
        return h.mig[m]

    def nvmlDeviceGetGpuInstanceId(self, h):
        return h.gi_ci[0]

    def nvmlDeviceGetComputeInstanceId(self, h):
        return h.gi_ci[1]
    # nvmlDeviceGetGraphicsRunningProcesses is left out on purpose: a missing optional
    # query reads as "not supported".


def fake_gpu(i: int, **kw) -> FakeGpu:
    """GPU i: its own UUID and PCI bus (i + 1)."""
    return FakeGpu(uuid=f"GPU-{i:x}{i:x}{i:x}{i:x}aaaa-0000-0000-0000-00000000000{i}",
                   bus_id=f"00000000:{i + 1:02X}:00.0", **kw)


# -- runtime: a worker without llama.cpp ------------------------------------------------------------

class FakeWorker:
    """A gpulab.core.protocols.Runtime for UI tests: canned answers, no llama.cpp, no planner.

    Its "llama.cpp" places layers as `placement` says (default: the tiny model's 7 layers and the
    output split 1/1 over RPC0/RPC1 as llama.cpp's upper_bound rule does by hand: layers 0-3 on
    RPC0, 4-6 and the output on RPC1) and reports fixed buffer sizes; `measure` returns fixed
    tokens/s after reporting each phase. `fail_with` is raised instead, as the real worker
    raises LoadError when llama.cpp aborted it; `busy` makes try_devices() answer None.
    """

    PP_TS, TG_TS = 123.0, 45.0

    def __init__(self, n: int = 2, free: int = 8 * GiB):
        self._devices = [Device(f"RPC{i}", free, free, "rpc", "rpc", description=f"127.0.0.1:{5000 + i}",
                                endpoint=f"127.0.0.1:{5000 + i}") for i in range(n)]
        self.placement: tuple[str, ...] = ("RPC0",) * 4 + ("RPC1",) * 4
        self.fail_with: Exception | None = None
        self.busy = False
        self.loads: list = []
        self.closed = False

    def devices(self):
        return list(self._devices) + [Device("CPU", 16 * GiB, 12 * GiB, "llama", "cpu")]

    def try_devices(self):
        return None if self.busy else self.devices()

    def _report(self) -> LoadReport:
        used = list(dict.fromkeys(self.placement))
        bufs = tuple(b for name in used for b in (BufferReport(name, name, "model", 3 << 20),
                                                  BufferReport(name, name, "kv", 1 << 20)))
        return LoadReport(layer_devices=self.placement, buffers=bufs, devices=tuple(d.name for d in self._devices))

    def load(self, path, config, **_):
        self.loads.append(config)
        if self.fail_with is not None:
            raise self.fail_with
        return self._report(), {"load_seconds": 0.01}

    def measure(self, path, config=None, *, n_prompt=512, n_gen=128, repetitions=5, progress=None, **_):
        report, _ = self.load(path, config)
        for phase in ("load", "warmup", "pp", "tg"):
            if progress is not None:
                progress(phase, 0.5)
        pp = Throughput(n_prompt, 0, (1,), (self.PP_TS,), self.PP_TS, 1.0)
        tg = Throughput(0, n_gen, (1,), (self.TG_TS,), self.TG_TS, 0.5)
        return Run(str(path), 1, config, report, pp=pp, tg=tg)

    def close(self):
        self.closed = True


# -- synthetic models ---------------------------------------------------------------------------------

def _laid_out(tensors):
    """The tensors with file offsets, one after the other (the host's mapped span needs them)."""
    out, at = [], 1 << 20
    for t in tensors:
        out.append(replace(t, offset=at))
        at += t.n_bytes
    return out


def make_profile(n_layer: int = 30, layer_bytes: int = 60 * MiB, n_head: int = 32, n_head_kv: int = 8,
                 head_dim: int = 128, embd_bytes: int = 300 * MiB, out_bytes: int = 400 * MiB,
                 tied: bool = False, swa_layers: tuple[int, ...] = (), n_swa: int = 0,
                 n_vocab: int = 128256, n_embd: int = 4096) -> ModelProfile:
    """A hand-built profile for planner rules; its shape, not its file, matters."""
    layers = tuple(
        LayerProfile(index=i, tensors=(TensorInfo(f"blk.{i}.ffn_down.weight", "Q4_0", (n_embd, n_embd), layer_bytes),),
                     n_head=n_head, n_head_kv=n_head_kv, n_embd_head_k=head_dim, n_embd_head_v=head_dim,
                     is_swa=i in swa_layers)
        for i in range(n_layer))
    out: tuple[TensorInfo, ...] = (TensorInfo("output_norm.weight", "F32", (n_embd,), 4 * n_embd),)
    if not tied:
        out += (TensorInfo("output.weight", "Q6_K", (n_embd, n_vocab), out_bytes),)
    emb = (TensorInfo("token_embd.weight", "Q4_0", (n_embd, n_vocab), embd_bytes),)
    placed = iter(_laid_out([*emb, *(t for layer in layers for t in layer.tensors), *out]))
    emb = (next(placed),)
    layers = tuple(replace(layer, tensors=tuple(next(placed) for _ in layer.tensors)) for layer in layers)
    out = tuple(next(placed) for _ in out)
    return ModelProfile(path="hand-built", arch="llama", name="hand-built", file_bytes=0, n_layer=n_layer,
                        n_embd=n_embd, n_ff=4 * n_embd, n_vocab=n_vocab, n_ctx_train=8192, layers=layers,
                        input_tensors=emb, output_tensors=out, tied_output=tied, n_swa=n_swa)


def make_hand_moe_profile(n_layer: int = 8, expert_bytes: int = 40 * MiB, dense_bytes: int = 4 * MiB,
                          n_expert: int = 8, n_embd: int = 1024, n_vocab: int = 32000) -> ModelProfile:
    """A small hand-built MoE (sizes in bytes, not shapes): each layer an attention matrix, the router and
    three expert stacks. For a MoE shaped like a real one, make_moe_profile (gpulab.sources.synth)."""
    base = make_profile(n_layer=n_layer, layer_bytes=dense_bytes, n_embd=n_embd, n_vocab=n_vocab,
                        embd_bytes=20 * MiB, out_bytes=20 * MiB)
    layers = []
    for layer in base.layers:
        i = layer.index
        ts = (TensorInfo(f"blk.{i}.attn_q.weight", "Q8_0", (n_embd, n_embd), dense_bytes),
              TensorInfo(f"blk.{i}.ffn_gate_inp.weight", "F32", (n_embd, n_expert), 4 * n_embd * n_expert),
              *(TensorInfo(f"blk.{i}.ffn_{k}_exps.weight", "Q8_0", (n_embd, 512, n_expert), expert_bytes // 3)
                for k in ("gate", "up", "down")))
        layers.append(replace(layer, tensors=ts))
    return replace(base, layers=tuple(layers), n_expert=n_expert, n_expert_used=2)
_BYTES_PER_BLOCK = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_K": (256, 144)}


def _tensor(name: str, shape: tuple[int, ...], gtype: str) -> TensorInfo:
    block, size = _BYTES_PER_BLOCK[gtype]
    n = 1
    for d in shape:
        n *= d
    return TensorInfo(name, gtype, shape, n // block * size)


def make_llama_profile(n_layer: int = 4, n_embd: int = 512, n_ff: int = 1536, n_head: int = 8, n_head_kv: int = 2,
                       n_vocab: int = 4096, weight_type: str = "F16", n_expert: int = 0, n_ff_exp: int = 0,
                       tied: bool = False, arch: str = "llama", swa_layers: tuple[int, ...] = ()) -> ModelProfile:
    """Every tensor of a llama-shaped model (or a qwen3moe-shaped one with n_expert), with the
    names and shapes llama.cpp gives them: for rules that cut tensors (split mode tensor)."""
    hd = n_embd // n_head
    wt = weight_type
    layers = []
    for i in range(n_layer):
        b = f"blk.{i}."
        ts = [_tensor(b + "attn_norm.weight", (n_embd,), "F32"),
              _tensor(b + "attn_q.weight", (n_embd, n_head * hd), wt),
              _tensor(b + "attn_k.weight", (n_embd, n_head_kv * hd), wt),
              _tensor(b + "attn_v.weight", (n_embd, n_head_kv * hd), wt),
              _tensor(b + "attn_output.weight", (n_head * hd, n_embd), wt),
              _tensor(b + "ffn_norm.weight", (n_embd,), "F32")]
        if n_expert:
            ts += [_tensor(b + "ffn_gate_inp.weight", (n_embd, n_expert), "F32"),
                   _tensor(b + "ffn_gate_exps.weight", (n_embd, n_ff_exp, n_expert), wt),
                   _tensor(b + "ffn_up_exps.weight", (n_embd, n_ff_exp, n_expert), wt),
                   _tensor(b + "ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert), wt)]
        else:
            ts += [_tensor(b + "ffn_gate.weight", (n_embd, n_ff), wt),
                   _tensor(b + "ffn_up.weight", (n_embd, n_ff), wt),
                   _tensor(b + "ffn_down.weight", (n_ff, n_embd), wt)]
        layers.append(LayerProfile(index=i, tensors=tuple(ts), n_head=n_head, n_head_kv=n_head_kv, n_embd_head_k=hd,
                                   n_embd_head_v=hd, is_swa=i in swa_layers))
    emb = (_tensor("token_embd.weight", (n_embd, n_vocab), wt),)
    out: tuple[TensorInfo, ...] = (_tensor("output_norm.weight", (n_embd,), "F32"),)
    if not tied:
        out += (_tensor("output.weight", (n_embd, n_vocab), wt),)
    placed = iter(_laid_out([*emb, *(t for layer in layers for t in layer.tensors), *out]))
    emb = (next(placed),)
    layers = [replace(layer, tensors=tuple(next(placed) for _ in layer.tensors)) for layer in layers]
    out = tuple(next(placed) for _ in out)
    return ModelProfile(path="hand-built", arch=arch, name=f"hand-built {arch}", file_bytes=0, n_layer=n_layer,
                        n_embd=n_embd, n_ff=n_ff, n_vocab=n_vocab, n_ctx_train=4096, layers=tuple(layers),
                        input_tensors=emb, output_tensors=out, tied_output=tied, n_expert=n_expert,
                        n_expert_used=2 if n_expert else 0, n_swa=256 if swa_layers else 0)


# the models and configs of tests/integration/test_overrides_vs_llama.py (and bench/host_row.py):
# each expert tensor over 1 MiB, so a misplaced one shows beyond the 1%-or-1-MiB tolerance
OVERRIDE_MODELS = {
    "mixtral-4x": SynthSpec(arch="llama", n_layer=6, n_embd=512, n_ff=1024, n_head=8, n_head_kv=4, n_vocab=1024,
                            n_expert=4, n_expert_used=2, weight_type="Q8_0"),
    "qwen3moe-8x-tied": SynthSpec(arch="qwen3moe", n_layer=5, n_embd=512, n_ff=512, n_head=8, n_head_kv=2,
                                  n_vocab=1024, n_expert=8, n_expert_used=2, n_ff_exp=512, weight_type="Q8_0",
                                  tied_output=True),
    "dense-q4": SynthSpec(arch="llama", n_layer=6, n_embd=512, n_ff=1536, n_head=8, n_head_kv=4, n_vocab=1024,
                          weight_type="Q4_0"),
    # moe-balance: 8 experts of 4.25 MiB a tensor, so whole tensors can even the devices out
    "mixtral-8x": SynthSpec(arch="llama", n_layer=6, n_embd=512, n_ff=1024, n_head=8, n_head_kv=4, n_vocab=1024,
                            n_expert=8, n_expert_used=2, weight_type="Q8_0"),
    # the host row without any rule: a tied Q4_0 model, its output copy of token_embd repacked
    "tied-q4": SynthSpec(arch="llama", n_layer=5, n_embd=512, n_ff=1024, n_head=8, n_head_kv=4, n_vocab=4096,
                         weight_type="Q4_0", tied_output=True),
}
_CTX: dict[str, Any] = dict(n_ctx=512)
OVERRIDE_CASES = [
    ("mixtral-4x", "cpu-moe", SplitConfig(tensor_split=(1, 1), cpu_moe=True, **_CTX)),
    ("qwen3moe-8x-tied", "cpu-moe", SplitConfig(tensor_split=(1, 1, 1), cpu_moe=True, **_CTX)),
    ("mixtral-4x", "ncmoe-3-full", SplitConfig(tensor_split=(1, 1), n_cpu_moe=3, **_CTX)),
    ("mixtral-4x", "ncmoe-2-ngl-4", SplitConfig(tensor_split=(1, 1), n_gpu_layers=4, n_cpu_moe=2, **_CTX)),
    ("qwen3moe-8x-tied", "ncmoe-5-no-fa", SplitConfig(tensor_split=(2, 1, 1), n_cpu_moe=5, flash_attn="off",
                                                       n_ctx=1024)),
    ("mixtral-4x", "experts-to-rpc1",
     SplitConfig(tensor_split=(1, 1), tensor_overrides=(r"blk\.[0-2]\.ffn_.*_exps=RPC1",), **_CTX)),
    ("qwen3moe-8x-tied", "experts-to-rpc2-llama-name",
     SplitConfig(tensor_split=(1, 1, 1), tensor_overrides=(r"blk\.[0-1]\.ffn_.*_exps=RPC2",), **_CTX)),
    ("mixtral-4x", "first-match-wins",
     SplitConfig(tensor_split=(1, 1), tensor_overrides=(r"blk\.1\.=CPU", r"blk\.[0-3]\.=RPC1"), **_CTX)),
    ("mixtral-4x", "attention-and-router", SplitConfig(tensor_split=(1, 1), tensor_overrides=(
        "attn_q=CPU", "ffn_gate_inp=RPC0"), **_CTX)),
    ("dense-q4", "ncffn-3", SplitConfig(tensor_split=(1, 1), n_cpu_ffn=3, **_CTX)),
    ("dense-q4", "attn-output-cpu", SplitConfig(tensor_split=(1, 1), tensor_overrides=("attn_output=CPU",), **_CTX)),
    ("dense-q4", "ffn-to-rpc0", SplitConfig(tensor_split=(1, 1), tensor_overrides=(r"blk\.[45]\.ffn=RPC0",), **_CTX)),
    ("dense-q4", "ncffn-all-no-fa", SplitConfig(tensor_split=(1, 1, 1), n_cpu_ffn=6, flash_attn="off", **_CTX)),
    ("tied-q4", "no-rules-ngl-0", SplitConfig(n_gpu_layers=0, **_CTX)),
    ("tied-q4", "no-rules-ngl-3", SplitConfig(n_gpu_layers=3, tensor_split=(1, 1), **_CTX)),
    ("tied-q4", "no-repack", SplitConfig(n_gpu_layers=0, use_extra_bufts=False, **_CTX)),
]


# -- fleets: random small fleets for the fleet search against the exhaustive one (issue 28) -------
def random_small_fleet(rng):
    """(Fleet, profiles, devices): 2-3 models of 8-40 layers on 3-4 devices of mixed sizes whose
    memory adds up to 1.0-1.5x the models' weights: tight, so that the choice of device sets
    matters, and small enough for the exhaustive search."""
    from .core.fleet.model import Fleet, FleetModel
    n_models, n_dev = rng.randint(2, 3), rng.randint(3, 4)
    profs, models = {}, []
    for i in range(n_models):
        name = f"m{i}"
        layers, size = rng.randint(8, 40), rng.randint(40, 400)
        profs[name] = make_profile(n_layer=layers, layer_bytes=size * MiB)
        models.append(FleetModel(name, f"{name}.gguf", ctx=rng.choice((2048, 4096, 8192))))
    need = sum(p.weights_bytes for p in profs.values())
    shares = [rng.uniform(0.5, 1.5) for _ in range(n_dev)]
    scale = rng.uniform(1.0, 1.5) * need / sum(shares)
    devices = [Device(f"SIM{i}", int(s * scale), int(s * scale), "sim") for i, s in enumerate(shares)]
    return Fleet(tuple(models)), profs, devices


def heuristic_loss(objective: str, heuristic: float, exhaustive: float) -> float:
    """How much worse the heuristic's objective value is than the exhaustive optimum, relative
    (0: as good). fewest counts device slots (fewer is better); balanced (bytes left on the
    tightest device) and tg (tokens/s) are better larger."""
    if objective == "fewest":
        return (heuristic - exhaustive) / exhaustive
    return (exhaustive - heuristic) / exhaustive if exhaustive > 0 else 0.0


def heuristic_vs_exhaustive(objective: str, n: int, seed: int) -> tuple[int, int, list[float]]:
    """On n random small fleets (seeded): (fleets the exhaustive search fits, those the heuristic
    then misses, the heuristic's loss on each fleet both fit). objective 'tg' targets the first
    model. Raises AssertionError where the heuristic fits a fleet the exhaustive search does not."""
    import random

    from .core.fleet.planner import plan_fleet
    rng = random.Random(seed)
    fits, missed, losses = 0, 0, []
    for _ in range(n):
        fleet, profs, devices = random_small_fleet(rng)
        obj = objective if objective != "tg" else f"tg:{fleet.models[0].name}"
        ex = plan_fleet(fleet, profs, devices, objective=obj, exhaustive_limit=10**6, advise=False)
        he = plan_fleet(fleet, profs, devices, objective=obj, exhaustive_limit=0, advise=False)
        assert ex.search == "exhaustive" and he.search == "heuristic"
        assert not (he.fits and not ex.fits), "the heuristic fit a fleet the exhaustive search did not"
        if ex.fits:
            fits += 1
            if not he.fits:
                missed += 1
            elif he.value is not None and ex.value is not None:
                losses.append(heuristic_loss(objective, he.value, ex.value))
    return fits, missed, losses
