"""The host: its memory as llama.cpp's 'CPU' device, its CPU model, llama-bench's default threads.

Read from /proc and /sys (sysconf elsewhere); nothing here raises for a machine it cannot read.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ..core.devices import HOST_NAME, Device

__all__ = ["host_device", "cpu_model", "default_threads", "repack_types"]


def host_device(meminfo_path: str = "/proc/meminfo",
                cgroup_dir: str = "/sys/fs/cgroup") -> Device | None:
    """System memory as the 'CPU' device: MemTotal / MemAvailable, capped by a cgroup v2 limit.

    In a container /proc/meminfo shows the whole machine, but the kernel kills the process
    at memory.max, so that limit is what a CPU-side load can really use. None if nothing
    can be read (never raises).
    """
    total = free = None
    try:
        fields = {}
        with open(meminfo_path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    fields[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
        total = fields.get("MemTotal")
        free = fields.get("MemAvailable", fields.get("MemFree"))
    except OSError:
        pass
    note = ""
    if total is None or free is None:
        try:   # not Linux, or no /proc: free pages rather than 'available', an underestimate
            page = os.sysconf("SC_PAGE_SIZE")
            total = page * os.sysconf("SC_PHYS_PAGES")
            free = page * os.sysconf("SC_AVPHYS_PAGES")
            note = " (sysconf)"
        except (AttributeError, ValueError, OSError):
            return None
    limit = _read_int(os.path.join(cgroup_dir, "memory.max"))
    if limit is not None and 0 < limit < total:
        current = _read_int(os.path.join(cgroup_dir, "memory.current")) or 0
        total, free = limit, min(free, max(limit - current, 0))
        note += " (cgroup memory.max)"
    free = max(0, min(free, total))
    return Device(name=HOST_NAME, total_bytes=total, free_bytes=free, source="host", kind="cpu",
                  description="system memory" + note, repack_types=_this_cpu_repack_types())


@functools.lru_cache(maxsize=1)
def _this_cpu_repack_types() -> tuple[str, ...]:
    return repack_types()


def repack_types(flags: frozenset[str] | None = None, off: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The weight types the CPU backend repacks into CPU_REPACK on this CPU, for a native build
    with the set-up's CPU-feature decision (ggml-cpu/repack.cpp ggml_repack_get_optimal_repack_type,
    x86: Q4_0, Q4_K, IQ4_NL and MXFP4 need AVX2, Q2_K AVX-512). Other architectures: () (not
    modelled yet; the host row then shows no CPU_REPACK copy)."""
    from .cpu_features import _cpuinfo_flags, host_decision, uname

    if flags is None:
        if uname()[1] not in ("x86_64", "AMD64"):
            return ()
        flags = _cpuinfo_flags()
    if off is None:
        off = host_decision().off
    out: list[str] = []
    if "avx2" in flags and "AVX" not in off:
        out += ["Q4_0", "Q4_K", "IQ4_NL", "MXFP4"]
        if "avx512f" in flags and "AVX-512" not in off:
            out.append("Q2_K")
    return tuple(out)


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None   # 'max' = no limit


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo), what llama.cpp's CPU device describes too."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return " ".join(line.partition(":")[2].split())
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "cpu"


def default_threads() -> int:
    """llama-bench's default -t: common_cpu_get_num_math, i.e. physical cores on Linux (the
    distinct thread_siblings sets), else the logical CPU count."""
    siblings = set()
    cpu = 0
    while True:
        p = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings")
        try:
            siblings.add(p.read_text().strip())
        except OSError:
            break
        cpu += 1
    return len(siblings) or os.cpu_count() or 1
