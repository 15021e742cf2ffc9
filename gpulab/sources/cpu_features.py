"""Which CPU features a native llama.cpp build may use on this host: advertised AND enabled.

A native build (GGML_NATIVE, `-march=native`) compiles for every feature the CPU advertises
in CPUID. Some of them also need the operating system to enable their register state in XSAVE
(XCR0); where the OS does not, their instructions fault. Seen on cloud/VM hosts (Sapphire,
Emerald, Granite Rapids under Firecracker): `amx_tile amx_int8 amx_bf16` in /proc/cpuinfo, but
the kernel's ARCH_GET_XCOMP_SUPP mask is 0x200e7, tile config (bit 17) without tile data
(bit 18). ggml's AMX init (ggml-cpu/amx/amx.cpp ggml_amx_init) only checks that
ARCH_REQ_XCOMP_PERM returns 0, so the first 32-token batch dies on `ldtilecfg` (SIGSEGV).

`decide()` is pure (the probe's readings come in as arguments, so tests inject masks);
`probe()` reads this host. Every build of the vendored llama.cpp (scripts/setup.sh's wheel,
bench/llama_bench_compare.py's llama-bench, binder/postBuild, bench/gpu_truth.sh) asks this
module, so they all build the same code, and the wheel cache is keyed by `build_key()`.

Standard library only and no package imports: scripts run it by path before gpulab is
installed:

    python3 gpulab/sources/cpu_features.py --shell --lcp-version 0.3.36 --cmake-args "-DGGML_RPC=ON"
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import sys
from dataclasses import dataclass, field

__all__ = ["FeatureGroup", "FEATURE_GROUPS", "HostCpu", "BuildDecision", "probe", "decide",
           "build_key", "library_has_amx", "host_decision"]


@dataclass(frozen=True)
class FeatureGroup:
    name: str
    flags: tuple[str, ...]           # /proc/cpuinfo flags that make -march=native use the group
    components: tuple[int, ...]      # XSAVE state components (XCR0 bits) the OS must enable
    off_flags: tuple[str, ...]       # compiler flags that keep the group out of a native build


# XSAVE components: 1 SSE, 2 AVX (YMM upper halves), 5-7 AVX-512 (opmask, ZMM_Hi256, Hi16_ZMM),
# 17 AMX tile config, 18 AMX tile data (Intel SDM vol. 1, 13.1). GCC's -mno-X also turns off
# every feature that depends on X (-mno-avx: AVX2, FMA, F16C, AVX-512 ...).
FEATURE_GROUPS: tuple[FeatureGroup, ...] = (
    FeatureGroup("AVX", ("avx",), (1, 2), ("-mno-avx",)),
    FeatureGroup("AVX-512", ("avx512f",), (5, 6, 7), ("-mno-avx512f",)),
    FeatureGroup("AMX", ("amx_tile",), (17, 18), ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")),
)
_DYNAMIC = {"AMX"}   # needs ARCH_REQ_XCOMP_PERM (Linux >= 5.16): unknown mask means unusable

_COMPONENT_NAMES = {1: "SSE", 2: "AVX", 5: "opmask", 6: "ZMM_Hi256", 7: "Hi16_ZMM", 17: "tile config",
                    18: "tile data"}


@dataclass(frozen=True)
class HostCpu:
    """What a probe read: the advertised flags and the OS's XSAVE feature mask."""

    system: str                      # platform.system(): 'Linux', 'Darwin', ...
    machine: str                     # platform.machine(): 'x86_64', 'aarch64', ...
    flags: frozenset[str] = frozenset()
    os_mask: int | None = None       # enabled XSAVE components, None when unreadable
    mask_source: str = ""            # 'ARCH_GET_XCOMP_SUPP', 'XCR0', or why there is none


@dataclass(frozen=True)
class BuildDecision:
    off: tuple[str, ...] = ()                        # FeatureGroup names kept out of the build
    compiler_flags: tuple[str, ...] = ()             # for CMAKE_C_FLAGS and CMAKE_CXX_FLAGS
    reasons: tuple[str, ...] = ()                    # one clause per group turned off
    notes: tuple[str, ...] = field(default=())       # why nothing could be decided, if so

    def cmake_args(self) -> list[str]:
        """Arguments for a direct `cmake` configure (one argv entry each)."""
        if not self.compiler_flags:
            return []
        flags = " ".join(self.compiler_flags)
        return [f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]

    def cmake_args_string(self, base: str = "") -> str:
        """The CMAKE_ARGS environment string pip/scikit-build-core splits (shell-quoted)."""
        return " ".join(x for x in (base.strip(), " ".join(shlex.quote(a) for a in self.cmake_args())) if x)

    def summary(self) -> str:
        """One line for the set-up: what was turned off and why, or that nothing was."""
        if self.off:
            return (f"CPU features: building llama.cpp without {', '.join(self.off)}: "
                    + "; ".join(self.reasons) + ". Every other feature of this CPU stays on.")
        if self.notes:
            return "CPU features: native build, nothing turned off (" + "; ".join(self.notes) + ")."
        return "CPU features: native build; every feature this CPU advertises is enabled by the OS."


def _mask_text(mask: int) -> str:
    return f"0x{mask:x}"


def decide(host: HostCpu, force_off: tuple[str, ...] = ()) -> BuildDecision:
    """The features a native build of llama.cpp must leave out on `host` (pure).

    force_off: group names to leave out whatever the probe says ($GPULAB_CPU_OFF, e.g. 'AMX')."""
    unknown = [n for n in force_off if n not in {g.name for g in FEATURE_GROUPS}]
    if unknown:
        raise ValueError(f"unknown CPU feature group(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(g.name for g in FEATURE_GROUPS)}")
    if force_off:
        groups = [g for g in FEATURE_GROUPS if g.name in force_off]
        return BuildDecision(off=tuple(g.name for g in groups),
                             compiler_flags=tuple(f for g in groups for f in g.off_flags),
                             reasons=tuple(f"{g.name}: asked for by GPULAB_CPU_OFF" for g in groups))
    if host.system != "Linux":
        return BuildDecision(notes=(f"{host.system or 'this OS'}: only Linux hosts are probed",))
    if host.machine not in ("x86_64", "AMD64", "i686", "i386"):
        return BuildDecision(notes=(f"{host.machine}: no XSAVE-gated features to check",))
    off: list[str] = []
    flags: list[str] = []
    reasons: list[str] = []
    for g in FEATURE_GROUPS:
        advertised = [f for f in g.flags if f in host.flags]
        if not advertised:
            continue
        if host.os_mask is None:
            if g.name not in _DYNAMIC:
                # no mask (kernel < 5.16 and no XGETBV): AVX and AVX-512 are enabled wherever
                # such kernels run them, and building without them costs 2-4x; keep them
                continue
            why = (f"the CPU advertises {advertised[0]}, but the kernel's XSAVE mask cannot be read "
                   f"({host.mask_source or 'unknown'}), so it cannot grant AMX tile data")
        else:
            missing = [c for c in g.components if not (host.os_mask >> c) & 1]
            if not missing:
                continue
            names = ", ".join(f"{_COMPONENT_NAMES.get(c, 'component')} (bit {c})" for c in missing)
            why = (f"the CPU advertises {advertised[0]}, but the kernel enables XSAVE components "
                   f"{_mask_text(host.os_mask)} ({host.mask_source}), without {names}, so its instructions fault")
        off.append(g.name)
        flags.extend(f for f in g.off_flags if f not in flags)
        reasons.append(f"{g.name}: {why}")
    return BuildDecision(off=tuple(off), compiler_flags=tuple(flags), reasons=tuple(reasons))


# --- reading this host ---------------------------------------------------------------------------

_SYS_ARCH_PRCTL = 158          # x86_64 syscall number
_ARCH_GET_XCOMP_SUPP = 0x1022  # asm/prctl.h (Linux 5.16+)

# xor ecx,ecx; xgetbv; shl rdx,32; or rax,rdx; ret  -> XCR0 in rax
_XGETBV = "31c90f01d048c1e22048 09d0c3".replace(" ", "")
_XCR0_CHILD = f"""
import ctypes, mmap
buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(bytes.fromhex({_XGETBV!r}))
fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
print(fn())
"""


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _xcomp_supp() -> tuple[int | None, str]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        mask = ctypes.c_uint64(0)
        if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_SUPP, ctypes.byref(mask)) == 0:
            return mask.value, "ARCH_GET_XCOMP_SUPP"
        return None, f"arch_prctl(ARCH_GET_XCOMP_SUPP) failed: {os.strerror(ctypes.get_errno())} (kernel < 5.16?)"
    except (OSError, AttributeError) as e:
        return None, f"no arch_prctl: {e}"


def uname() -> tuple[str, str]:
    """(platform.system(), platform.machine()), without importing `platform` where os.uname has them."""
    try:
        u = os.uname()
    except AttributeError:   # Windows
        import platform

        return platform.system(), platform.machine()
    return u.sysname, u.machine


def _xcr0() -> int | None:
    """XCR0 by XGETBV, in a child process: where XGETBV is not allowed the child dies, not us."""
    # here and in _native_macros only: the planner's host row seldom needs subprocess
    import subprocess

    try:
        out = subprocess.run([sys.executable, "-c", _XCR0_CHILD], capture_output=True, text=True, timeout=20)
        return int(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def probe() -> HostCpu:
    """This host's advertised flags and OS-enabled XSAVE mask (the kernel's own answer first,
    XCR0 where the kernel is too old to give it)."""
    system, machine = uname()
    if system != "Linux" or machine not in ("x86_64", "AMD64"):
        return HostCpu(system, machine)
    flags = _cpuinfo_flags()
    mask, source = _xcomp_supp()
    if mask is None and "xsave" in flags:
        xcr0 = _xcr0()
        if xcr0 is not None:
            mask, source = xcr0, "XCR0"
    return HostCpu(system, machine, flags, mask, source)


def _forced() -> tuple[str, ...]:
    return tuple(x.strip() for x in os.environ.get("GPULAB_CPU_OFF", "").split(",") if x.strip())


def host_decision() -> BuildDecision:
    """The decision for this host, honouring $GPULAB_CPU_OFF."""
    return decide(probe(), _forced())


# --- what a build assumes ----------------------------------------------------------------------

def _native_macros(compiler: str, flags: tuple[str, ...]) -> str | None:
    """The predefined macros of `compiler -march=native FLAGS`: exactly the ISA a native build
    of llama.cpp assumes (__AVX2__, __AMX_INT8__, ...)."""
    import subprocess

    try:
        out = subprocess.run([compiler, "-march=native", *flags, "-dM", "-E", "-x", "c", os.devnull],
                             capture_output=True, text=True, timeout=60)
        ver = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    lines = sorted(ln for ln in out.stdout.splitlines() if ln.startswith("#define __"))
    return (ver.stdout.splitlines() or [""])[0] + "\n" + "\n".join(lines)


def build_key(lcp_version: str, cmake_args: str, decision: BuildDecision, host: HostCpu,
              compiler: str | None = None) -> str:
    """16 hex digits naming a build: the llama-cpp-python version, the CMake arguments, and the
    CPU features the build assumes (the compiler's view of -march=native with the decision's
    flags; the advertised flags where there is no compiler). A wheel cached under another key
    is never reused: a cache copied from a CPU with more features would die of SIGILL here."""
    compiler = compiler or os.environ.get("CC") or "cc"
    isa = _native_macros(compiler, decision.compiler_flags)
    if isa is None:
        isa = "flags:" + " ".join(sorted(host.flags))
    import hashlib  # the set-up's build key only, not the planner's host row
    h = hashlib.sha256()
    for part in (lcp_version, cmake_args, " ".join(decision.compiler_flags), host.machine, isa):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


# ldtilecfg (VEX.128.NP.0F38.W0 49 /0): the first AMX instruction ggml's AMX kernels run
_LDTILECFG = b"\xc4\xe2\x78\x49"


def library_has_amx(path: str) -> bool:
    """Whether a shared library (libggml-cpu) contains AMX tile instructions."""
    try:
        with open(path, "rb") as f:
            return _LDTILECFG in f.read()
    except OSError:
        return False


def _main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(description="CPU features a native llama.cpp build may use on this host")
    p.add_argument("--lcp-version", default="", help="llama-cpp-python version, for the build key")
    p.add_argument("--cmake-args", default="", help="the other CMake arguments, for the build key")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--shell", action="store_true", help="print shell assignments (eval them)")
    fmt.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    host = probe()
    try:
        d = decide(host, _forced())
    except ValueError as e:
        print(f"cpu_features: GPULAB_CPU_OFF: {e}", file=sys.stderr)
        return 2
    key = build_key(a.lcp_version, a.cmake_args, d, host)
    if a.shell:
        print(f"GPULAB_CPU_CFLAGS={shlex.quote(' '.join(d.compiler_flags))}")
        print(f"GPULAB_CMAKE_ARGS_FULL={shlex.quote(d.cmake_args_string(a.cmake_args))}")
        print(f"GPULAB_CPU_NOTE={shlex.quote(d.summary())}")
        print(f"GPULAB_BUILD_KEY={key}")
    elif a.json:
        print(json.dumps({"off": d.off, "compiler_flags": d.compiler_flags, "cmake_args": d.cmake_args(),
                          "reasons": d.reasons, "summary": d.summary(), "build_key": key,
                          "os_mask": host.os_mask, "mask_source": host.mask_source,
                          "advertised": sorted(f for g in FEATURE_GROUPS for f in g.flags if f in host.flags)},
                         indent=2))
    else:
        print(d.summary())
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
