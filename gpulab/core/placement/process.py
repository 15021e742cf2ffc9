"""A whole llama-server process: the main model's Plan, the draft model's Plan (-md), the MTP
context (--spec-type draft-mtp, gpulab.core.placement.mtp), the vision / audio projector (--mmproj)
and each GPU's own base cost, added up per device.

    pp = plan_process(main_plan, draft_plan, projector, devices)
    pp.rows          # one ProcessRow per device: main, draft, projector, base cost, free, fits

The draft is planned by the same planner on its own devices (common_base_params_to_speculative);
the projector is placed as clip_ctx's constructor does (tools/mtmd/clip.cpp) and its compute
buffer is an estimate of clip's warm-up reserve (see ProjectorProfile.compute_bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..devices import HOST_NAME, Device
from .mtp import MtpContext
from .plan import Plan

__all__ = [
    "DEFAULT_CUDA_OVERHEAD_BYTES",
    "ProcessPlan",
    "ProcessRow",
    "ProjectorPlacement",
    "ProjectorProfile",
    "plan_process",
    "projector_device",
]

MiB = 1024 * 1024

# What a CUDA process takes on a GPU before any llama.cpp buffer (the CUDA context, cuBLAS
# workspaces, the memory pool's first block), where nothing was learned on that GPU yet: the
# H200 run of docs/BENCHMARKS.md learned 523 MiB (gpulab.storage.overheads). A default, and
# labelled so wherever it shows; a learned value replaces it.
DEFAULT_CUDA_OVERHEAD_BYTES = 523 * MiB


@dataclass(frozen=True)
class ProjectorProfile:
    """A clip projector GGUF (tools/mtmd/clip.cpp clip_model_loader), read without its weights."""
    path: str
    projector_type: str
    weights_bytes: int                 # every tensor: clip loads them all into one backend buffer
    has_vision: bool
    has_audio: bool
    image_size: int = 0
    patch_size: int = 0
    n_embd: int = 0
    n_ff: int = 0
    n_head: int = 0
    n_layer: int = 0
    audio_n_embd: int = 0
    audio_n_ff: int = 0
    audio_n_head: int = 0
    warmup_tokens: int = 0             # patches (or audio frames) of the warm-up input

    def compute_bytes(self, flash_attn: bool) -> int:
        """An ESTIMATE of the compute buffer clip's warm-up reserves on the projector's device
        (clip_model_loader::warmup -> ggml_backend_sched_reserve on the graph of the warm-up image):
        the larger of one encoder block's two phases, in f32 rows of n_pos: the FFN (its up
        projection [n_ff] beside the residual, the norm and the attention output [n_embd] each) and
        the attention (the residual, the norm, Q, K, V, their f16 copies and the output: about 6
        [n_embd] rows), plus without flash attention the KQ scores and their softmax
        [n_pos, n_pos, n_head] f32. Not mirrored from clip's graph builders (checked against
        llama-server's log: tests/integration/test_process_vs_llama_server.py)."""
        out = 0
        for n_pos, n_embd, n_ff, n_head in ((self.warmup_tokens if self.has_vision else 0, self.n_embd, self.n_ff,
                                             self.n_head),
                                            (self.warmup_tokens if not self.has_vision else 0, self.audio_n_embd,
                                             self.audio_n_ff, self.audio_n_head)):
            if n_pos <= 0 or n_embd <= 0:
                continue
            b = 4 * n_pos * max(n_ff + 3 * n_embd, 6 * n_embd)
            if not flash_attn:
                b = max(b, 4 * n_pos * 3 * n_embd + 2 * 4 * max(n_head, 1) * n_pos * n_pos)
            out = max(out, b)
        return out

    def host_compute_bytes(self) -> int:
        """The CPU's compute buffer beside it: the graph's input, the warm-up image (3 x side x side
        f32), which clip's scheduler keeps on the CPU backend where the image is set."""
        side = self.patch_size * round(self.warmup_tokens ** 0.5) if self.has_vision else 0
        return 4 * 3 * side * side


@dataclass(frozen=True)
class ProjectorPlacement:
    device: str              # where clip puts the weights and the compute buffer
    weights_bytes: int
    compute_bytes: int
    why: str                 # which rule chose the device
    host_compute_bytes: int = 0   # clip's CPU compute buffer (the image input), on the host


def projector_device(devices: Sequence[Device], *, offload: bool, device: str,
                     main_devices: Sequence[str]) -> tuple[str, str]:
    """clip_ctx ctor (tools/mtmd/clip.cpp): use_gpu off -> the CPU; -mmdev -> that device; else
    common/arg.cpp's default, the first --device; else ggml_backend_init_by_type(GPU): the first GPU
    in ggml's registry, where CUDA (and the other GPU backends) come before the RPC servers' devices,
    which --rpc registers last."""
    if not offload:
        return HOST_NAME, "--no-mmproj-offload: the CPU"
    if device:
        return device, f"-mmdev {device}"
    if main_devices and main_devices != ("none",):
        return main_devices[0], f"the first --device ({main_devices[0]})"
    gpus = [d for d in devices if d.kind == "gpu"] + [d for d in devices if d.kind == "rpc"]
    gpus = gpus or [d for d in devices if d.kind == "igpu"]
    if not gpus:
        return HOST_NAME, "no GPU: the CPU"
    return gpus[0].name, f"the first GPU in ggml's registry ({gpus[0].name})"


@dataclass(frozen=True)
class ProcessRow:
    name: str
    free_bytes: int
    main_bytes: int
    draft_bytes: int
    projector_bytes: int
    overhead_bytes: int
    overhead_is_default: bool
    is_host: bool
    mtp_bytes: int = 0       # --spec-type draft-mtp: the MTP context's KV and compute (its weights are main's)

    @property
    def used_bytes(self) -> int:
        return self.main_bytes + self.draft_bytes + self.projector_bytes + self.mtp_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.is_host or self.used_bytes <= self.free_bytes


@dataclass(frozen=True)
class ProcessPlan:
    main: Plan
    draft: Plan | None
    projector: ProjectorPlacement | None
    rows: tuple[ProcessRow, ...]
    mtp: MtpContext | None = None

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.rows)

    def row(self, name: str) -> ProcessRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict:
        return {
            "devices": [{"name": r.name, "free_bytes": r.free_bytes, "main_bytes": r.main_bytes,
                         "draft_bytes": r.draft_bytes, "projector_bytes": r.projector_bytes,
                         "mtp_bytes": r.mtp_bytes,
                         "overhead_bytes": r.overhead_bytes, "overhead_is_default": r.overhead_is_default,
                         "used_bytes": r.used_bytes, "fits": r.fits} for r in self.rows],
            "draft": self.draft.to_dict() if self.draft is not None else None,
            "mtp": None if self.mtp is None else {
                "layer_devices": list(self.mtp.layer_devices), "kv_bytes": dict(self.mtp.kv_bytes),
                "compute_bytes": dict(self.mtp.compute_bytes)},
            "projector": None if self.projector is None else {
                "device": self.projector.device, "weights_bytes": self.projector.weights_bytes,
                "compute_bytes": self.projector.compute_bytes, "compute_is_estimate": True,
                "host_compute_bytes": self.projector.host_compute_bytes,
                "why": self.projector.why},
            "fits": self.fits,
        }


def base_cost(d: Device) -> tuple[int, bool]:
    """(bytes, is the default): the learned overhead where a run learned one, else the CUDA default
    for CUDA devices (RPC, CPU and simulated devices: 0, none known)."""
    if d.overhead_bytes:
        return d.overhead_bytes, d.overhead_is_default
    if d.name.startswith("CUDA"):
        return DEFAULT_CUDA_OVERHEAD_BYTES, True
    return 0, False


def plan_process(main: Plan, draft: Plan | None, projector: ProjectorPlacement | None,
                 devices: Sequence[Device], mtp: MtpContext | None = None) -> ProcessPlan:
    """The per-device sum. The main Plan's rows already count a learned overhead; the base cost is
    counted once per device here (learned or the CUDA default), the plans' own overhead left out."""
    by_name = {d.name: d for d in devices}
    names = [d.name for d in main.offload_devices]
    for p in (draft,):
        if p is not None:
            names += [d.name for d in p.offload_devices if d.name not in names]
    if projector is not None and projector.device != HOST_NAME and projector.device not in names:
        names.append(projector.device)
    names.append(HOST_NAME)

    def part(p: Plan | None, name: str) -> int:
        if p is None:
            return 0
        d = next((x for x in p.devices if x.name == name), None)
        return 0 if d is None else d.buffer_bytes

    rows = []
    for name in names:
        is_host = name == HOST_NAME
        dev = by_name.get(name)
        over, default = (0, False) if is_host or dev is None else base_cost(dev)
        host_free = main.host.free_bytes if is_host else 0
        proj = (projector.weights_bytes + projector.compute_bytes
                if projector is not None and projector.device == name else 0)
        if projector is not None and is_host:
            proj += projector.host_compute_bytes
        rows.append(ProcessRow(name=name, free_bytes=host_free if is_host else (dev.free_bytes if dev else 0),
                               main_bytes=part(main, name), draft_bytes=part(draft, name), projector_bytes=proj,
                               overhead_bytes=over, overhead_is_default=default, is_host=is_host,
                               mtp_bytes=mtp.bytes_on(name) if mtp is not None else 0))
    return ProcessPlan(main=main, draft=draft, projector=projector, rows=tuple(rows), mtp=mtp)
