"""NVML probe: the GPUs the driver reports, as typed snapshots, and the CUDA names they get.

In the style of nvitop's `api/`: a small hardware core with typed results and lazy NVML
initialisation. Nothing happens at import; `pynvml` (the nvidia-ml-py package) is imported and
`nvmlInit` called on the first query. Tests inject a fake module object instead of `pynvml`:

    probe = NvmlProbe()              # real NVML
    probe = NvmlProbe(nvml=fake)     # anything with the nvml* functions used below
    if probe.available():
        devices, warnings = probe.cuda_devices()

Two orders matter. NVML enumerates GPUs by PCI bus id; CUDA (and so llama.cpp's CUDA0..N-1)
numbers them FASTEST_FIRST unless CUDA_DEVICE_ORDER=PCI_BUS_ID, and CUDA_VISIBLE_DEVICES
filters and reorders them. `cuda_order` mirrors those rules, and says when it cannot know.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from ..core.devices import Device
from ..core.errors import DeviceError

__all__ = ["NvmlProbe", "GpuInfo", "GpuProcess", "cuda_order", "NVML_FUNCTIONS"]

# Every nvml* function the probe may call: a fake only needs the ones its test exercises
# (a missing optional function reads as "not supported"), and tests check that the real
# pynvml has all of them, so a typo here cannot hide behind a fake.
NVML_FUNCTIONS = (
    "nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetPciInfo", "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetMaxClockInfo",
    "nvmlDeviceGetMemoryBusWidth", "nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex", "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetComputeInstanceId",
)
_NVML_CLOCK_MEM = 2          # pynvml.NVML_CLOCK_MEM
_NVML_DEVICE_MIG_ENABLE = 1  # pynvml.NVML_DEVICE_MIG_ENABLE


class GpuProcess(NamedTuple):
    pid: int
    used_bytes: int | None   # None where the driver does not say (WDDM, MIG without privileges)
    name: str | None         # from /proc/PID/comm when visible (not across PID namespaces)
    argv: tuple[str, ...] = ()   # from /proc/PID/cmdline, when visible: which model it serves


@dataclass(frozen=True)
class GpuInfo:
    """One NVML device at one moment. A field NVML could not report is None."""

    index: int                 # NVML index (PCI bus order); for a MIG device, its index on the parent
    name: str                  # 'NVIDIA GeForce RTX 4090'
    uuid: str                  # 'GPU-8932f937-...' or, for a MIG device, 'MIG-...'
    pci_bus_id: str            # '00000000:01:00.0' as NVML writes it
    total_bytes: int | None
    free_bytes: int | None
    used_bytes: int | None
    utilization_gpu_percent: int | None = None
    utilization_memory_percent: int | None = None
    processes: tuple[GpuProcess, ...] = ()
    memory_clock_mhz: int | None = None       # the maximum memory clock, not the (idle) current one
    memory_bus_width_bits: int | None = None
    mig_enabled: bool = False                 # MIG mode is on: CUDA sees its MIG devices, not it
    mig_devices: tuple[GpuInfo, ...] = ()   # the MIG devices of a MIG-enabled GPU
    parent_index: int | None = None           # set on MIG devices: the physical GPU's NVML index
    gpu_instance_id: int | None = None        # MIG: for the legacy MIG-GPU-<uuid>/<gi>/<ci> ids
    compute_instance_id: int | None = None

    @property
    def is_mig_device(self) -> bool:
        return self.parent_index is not None

    @property
    def peak_bandwidth_bytes_per_s(self) -> float | None:
        """Theoretical peak memory bandwidth: max memory clock x 2 (double data rate) x bus width.

        With the clock NVML reports this gives the datasheet numbers for GDDR and HBM alike
        (RTX 4090: 10501 MHz x 2 x 384 bit = 1008 GB/s; H100 SXM: 2619 MHz x 2 x 5120 bit =
        3.35 TB/s). An upper bound: measured copies reach roughly 80-90% of it.
        """
        if not self.memory_clock_mhz or not self.memory_bus_width_bits:
            return None
        return self.memory_clock_mhz * 1e6 * 2 * self.memory_bus_width_bits / 8


def _text(value: Any) -> str:
    # pynvml returns str since 11.5; older versions (and some fakes) return bytes.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _process_name(pid: int) -> str | None:
    # Cheap on Linux and never an NVML call; GPU processes of other containers have host
    # PIDs that /proc here does not show, which is why the name is optional.
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _process_argv(pid: int) -> tuple[str, ...]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return tuple(a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a)
    except OSError:
        return ()


class NvmlProbe:
    """The GPUs NVML sees. `nvml` is the pynvml module (imported on first use) or a fake."""

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = nvml
        self._initialized = False
        self._unavailable: str | None = None   # why NVML cannot be used, once known
        self.warnings: list[str] = []          # problems of the last devices() call

    # -- lifecycle ---------------------------------------------------------------------

    def _ensure(self) -> bool:
        if self._initialized:
            return True
        if self._unavailable is not None:
            return False
        if self._nvml is None:
            try:
                import pynvml  # nvidia-ml-py; imported here so `import gpulab` stays light
            except ImportError as exc:
                self._unavailable = f"nvidia-ml-py is not installed ({exc})"
                return False
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - no library, no driver, driver/library mismatch...
            self._unavailable = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return False
        self._initialized = True
        return True

    def available(self) -> bool:
        """True when NVML initialises (a driver and its library are present). Never raises."""
        return self._ensure()

    @property
    def unavailable_reason(self) -> str | None:
        """Why `available()` is False ('NVMLError_LibraryNotFound: ...'), else None."""
        self._ensure()
        return self._unavailable

    def shutdown(self) -> None:
        """Balance the nvmlInit of the first query; a later query initialises again."""
        if self._initialized:
            self._initialized = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down is best effort
                pass
        self._unavailable = None

    def __enter__(self) -> NvmlProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- queries -----------------------------------------------------------------------

    def _errors(self) -> tuple[type[BaseException], ...]:
        errs = [getattr(self._nvml, "NVMLError", None),
                # pynvml raises this (not an NVMLError) when an unversioned function is missing
                getattr(self._nvml, "NVMLLibraryMismatchError", None)]
        return tuple(e for e in errs if isinstance(e, type)) or (Exception,)

    def _q(self, fn_name: str, *args: Any) -> Any:
        """One NVML query; None when it is not supported or fails (never fails the probe)."""
        fn = getattr(self._nvml, fn_name, None)
        if fn is None:       # an older pynvml, or a fake that leaves this query out
            return None
        try:
            return fn(*args)
        except self._errors():
            return None

    def devices(self) -> list[GpuInfo]:
        """Every GPU NVML sees, in NVML (PCI bus) order, with MIG devices under their parent.

        Raises DeviceError when NVML is not available; a GPU whose handle cannot be had
        (lost, no permission in this container) is left out with a note in `self.warnings`.
        """
        if not self._ensure():
            raise DeviceError(f"NVML is not available: {self._unavailable}")
        self.warnings = []
        try:
            count = int(self._nvml.nvmlDeviceGetCount())
        except self._errors() as exc:
            raise DeviceError(f"NVML could not count the GPUs: {exc}") from exc
        gpus = []
        for i in range(count):
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(i)
            except self._errors() as exc:
                self.warnings.append(f"NVML GPU {i} left out: {exc}")
                continue
            gpus.append(self._info(handle, i))
        return gpus

    def _info(self, handle: Any, index: int, parent: GpuInfo | None = None) -> GpuInfo:
        q = self._q
        mem = q("nvmlDeviceGetMemoryInfo", handle)
        util = q("nvmlDeviceGetUtilizationRates", handle)
        pci = q("nvmlDeviceGetPciInfo", handle) if parent is None else None
        mig_mode = q("nvmlDeviceGetMigMode", handle) if parent is None else None
        mig_enabled = mig_mode is not None and bool(mig_mode) and mig_mode[0] == getattr(
            self._nvml, "NVML_DEVICE_MIG_ENABLE", _NVML_DEVICE_MIG_ENABLE)
        info = GpuInfo(
            index=index,
            name=_text(q("nvmlDeviceGetName", handle)),
            uuid=_text(q("nvmlDeviceGetUUID", handle)),
            pci_bus_id=_text(pci.busId) if pci is not None else (parent.pci_bus_id if parent else ""),
            total_bytes=int(mem.total) if mem is not None else None,
            free_bytes=int(mem.free) if mem is not None else None,
            used_bytes=int(mem.used) if mem is not None else None,
            utilization_gpu_percent=int(util.gpu) if util is not None else None,
            utilization_memory_percent=int(util.memory) if util is not None else None,
            processes=self._processes(handle),
            # A MIG slice shares the parent's memory bus; its own clock queries are not supported.
            memory_clock_mhz=_int_or_none(q("nvmlDeviceGetMaxClockInfo", handle, getattr(
                self._nvml, "NVML_CLOCK_MEM", _NVML_CLOCK_MEM))) if parent is None else None,
            memory_bus_width_bits=_int_or_none(q("nvmlDeviceGetMemoryBusWidth", handle))
            if parent is None else None,
            mig_enabled=mig_enabled,
            parent_index=parent.index if parent is not None else None,
            gpu_instance_id=_int_or_none(q("nvmlDeviceGetGpuInstanceId", handle)) if parent else None,
            compute_instance_id=_int_or_none(q("nvmlDeviceGetComputeInstanceId", handle))
            if parent else None,
        )
        if mig_enabled:
            migs = []
            for m in range(_int_or_none(q("nvmlDeviceGetMaxMigDeviceCount", handle)) or 0):
                mh = q("nvmlDeviceGetMigDeviceHandleByIndex", handle, m)  # NotFound: slot unused
                if mh is not None:
                    migs.append(self._info(mh, m, parent=info))
            info = replace(info, mig_devices=tuple(migs))
        return info

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        found: dict[int, GpuProcess] = {}
        for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            for p in self._q(fn, handle) or ():
                pid = int(p.pid)
                used = getattr(p, "usedGpuMemory", None)
                used = int(used) if used is not None else None
                old = found.get(pid)
                if old is not None and old.used_bytes is not None and (used is None or old.used_bytes >= used):
                    continue   # a process both computing and drawing is listed twice
                found[pid] = (GpuProcess(pid, used, old.name, old.argv) if old else
                              GpuProcess(pid, used, _process_name(pid), _process_argv(pid)))
        return tuple(found.values())

    # -- CUDA's view -------------------------------------------------------------------

    def cuda_devices(self, env: Mapping[str, str] | None = None) -> tuple[list[Device], list[str]]:
        """The GPUs as llama.cpp's CUDA backend names them (CUDA0..N-1), and any warnings."""
        gpus = self.devices()
        ordered, warnings = cuda_order(gpus, env)
        warnings = list(self.warnings) + warnings
        out = []
        for i, g in enumerate(ordered):
            name = f"CUDA{i}"
            total, free = g.total_bytes, g.free_bytes
            if total is None or free is None:
                warnings.append(f"{name} ({g.name}): NVML gave no memory figures; counted as 0 bytes")
                total = free = 0
            out.append(Device(
                name=name, total_bytes=total, free_bytes=min(free, total), source="nvml", kind="gpu",
                description=g.name, uuid=g.uuid, pci_bus_id=g.pci_bus_id,
                bandwidth_bytes_per_s=g.peak_bandwidth_bytes_per_s))
        return out, warnings

    def as_devices(self, env: Mapping[str, str] | None = None) -> list[Device]:
        """`cuda_devices` without the warnings (they stay readable in `cuda_devices`)."""
        return self.cuda_devices(env)[0]


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


# -- CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER -------------------------------------------

_LEGACY_MIG = re.compile(r"^MIG-(GPU-[0-9A-Fa-f-]+)/(\d+)/(\d+)$")  # MIG-GPU-<uuid>/<gi>/<ci>
_INDEX = re.compile(r"^\+?(\d+)")  # CUDA reads indices like strtoul: '1gpu' is 1


def _by_uuid_prefix(prefix: str, candidates: Sequence[GpuInfo]) -> tuple[GpuInfo | None, str]:
    hits = [g for g in candidates if g.uuid.lower().startswith(prefix.lower())]
    if len(hits) == 1:
        return hits[0], ""
    return None, ("matches no GPU" if not hits else f"is ambiguous ({len(hits)} GPUs share the prefix)")


def _resolve(token: str, physical: Sequence[GpuInfo]) -> tuple[GpuInfo | None, str, str]:
    """(device, kind 'index'|'uuid', why-not) for one CUDA_VISIBLE_DEVICES item."""
    m = _INDEX.match(token)
    if m:
        i = int(m.group(1))
        if i < len(physical):
            return physical[i], "index", ""
        return None, "index", f"there are only {len(physical)} GPUs"
    if token.upper().startswith("GPU-"):
        dev, why = _by_uuid_prefix(token, physical)
        return dev, "uuid", why
    if token.upper().startswith("MIG-"):
        legacy = _LEGACY_MIG.match(token)
        if legacy:
            parent, why = _by_uuid_prefix(legacy.group(1), physical)
            if parent is None:
                return None, "uuid", why
            gi, ci = int(legacy.group(2)), int(legacy.group(3))
            for mig in parent.mig_devices:
                if (mig.gpu_instance_id, mig.compute_instance_id) == (gi, ci):
                    return mig, "uuid", ""
            return None, "uuid", f"GPU {parent.uuid} has no MIG device {gi}/{ci}"
        dev, why = _by_uuid_prefix(token, [m for g in physical for m in g.mig_devices])
        return dev, "uuid", why.replace("GPU", "MIG device")
    return None, "", "is neither an index nor a GPU-/MIG- UUID"


def cuda_order(gpus: Sequence[GpuInfo], env: Mapping[str, str] | None = None
               ) -> tuple[list[GpuInfo], list[str]]:
    """The GPUs CUDA will use, in CUDA's order (CUDA0 first), and warnings about that order.

    `gpus` are NVML's physical GPUs in NVML order (PCI bus id). Rules mirrored from CUDA's
    documentation of CUDA_VISIBLE_DEVICES (and nvitop, which checks them against libcuda):
    items are indices into CUDA's order, or GPU-/MIG- UUIDs (any unique prefix); devices are
    enumerated in the order listed; an invalid item ends the list (`0,2,-1,1` is `0,2`); a
    repeated device makes no device visible; indices and UUIDs cannot be mixed; `""` hides
    every GPU. CUDA uses a single MIG device: the first one listed, or, when a listed GPU has
    MIG enabled, the first MIG device of the first such GPU.
    """
    env = os.environ if env is None else env
    warnings: list[str] = []
    physical = [g for g in gpus if not g.is_mig_device]
    pci_order = env.get("CUDA_DEVICE_ORDER", "").strip().upper() == "PCI_BUS_ID"
    if pci_order and all(g.pci_bus_id for g in physical):
        physical.sort(key=lambda g: g.pci_bus_id.lower())
    # else: FASTEST_FIRST. CUDA's heuristic is not exposed; among identical models it comes
    # down to PCI bus order, which is NVML's, so keep that and warn below when models differ.

    raw = env.get("CUDA_VISIBLE_DEVICES")
    kind: str | None = None
    if raw is None:
        selected = list(physical)
    else:
        selected = []
        seen: set[str] = set()
        for item in raw.split(","):
            token = item.strip()
            dev, tkind, why = _resolve(token, physical) if token else (None, "", "")
            if dev is None:
                if token and not re.fullmatch(r"-\d+", token):   # '-1': the usual 'no GPU' idiom
                    warnings.append(f"CUDA_VISIBLE_DEVICES={raw!r}: {token!r} {why}; CUDA ignores it "
                                    "and everything after it")
                break
            if kind is not None and tkind != kind:
                warnings.append(f"CUDA_VISIBLE_DEVICES={raw!r} mixes indices and UUIDs; CUDA stops "
                                f"at {token!r}")
                break
            key = dev.uuid or f"{dev.parent_index}:{dev.index}"
            if token in seen or key in seen:
                warnings.append(f"CUDA_VISIBLE_DEVICES={raw!r} names a device twice ({token!r}): "
                                "CUDA then sees no GPU at all")
                selected = []
                break
            seen.update((token, key))
            kind = tkind
            selected.append(dev)

    migs = [d for d in selected if d.is_mig_device]
    if migs:
        if len(selected) > 1:
            warnings.append(f"CUDA uses a single MIG device: only {migs[0].uuid} of the "
                            f"{len(selected)} listed in CUDA_VISIBLE_DEVICES")
        selected = migs[:1]
    elif any(g.mig_enabled for g in selected):
        kept: list[GpuInfo] = []
        for g in selected:
            if not g.mig_enabled:
                kept.append(g)
            elif g.mig_devices:
                kept = [g.mig_devices[0]]
                warnings.append(f"GPU {g.index} ({g.name}) has MIG enabled: CUDA uses only its first "
                                f"MIG device {g.mig_devices[0].uuid}; choose one with "
                                "CUDA_VISIBLE_DEVICES=MIG-...")
                break
            else:
                warnings.append(f"GPU {g.index} ({g.name}) has MIG enabled but no MIG device: "
                                "CUDA cannot use it")
        selected = kept

    models = sorted({g.name for g in physical})
    if not pci_order and len(models) > 1 and kind != "uuid" and selected:
        warnings.append(
            f"these GPUs are different models ({', '.join(models)}) and CUDA_DEVICE_ORDER is not "
            "PCI_BUS_ID: CUDA numbers the fastest GPU first, so CUDA0.. may differ from NVML's "
            "order shown here. Set CUDA_DEVICE_ORDER=PCI_BUS_ID (as llama.cpp advises) so they agree")
    return selected, warnings
