"""The CPU-feature probe that keeps features the kernel does not enable out of llama.cpp builds."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gpulab.sources.cpu_features import FEATURE_GROUPS, HostCpu, build_key, decide, library_has_amx, probe

REPO = Path(__file__).resolve().parents[2]
SAPPHIRE = frozenset("fpu sse sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni amx_tile amx_int8 amx_bf16 "
                     "xsave".split())
# the mask of issue 11's host: x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM and tile config, no tile data
FIRECRACKER_MASK = 0x200e7
FULL_MASK = 0x600e7


def _linux(flags=SAPPHIRE, mask=FIRECRACKER_MASK, source="ARCH_GET_XCOMP_SUPP"):
    return HostCpu("Linux", "x86_64", flags, mask, source)


def test_amx_without_tile_data_is_turned_off_and_everything_else_kept():
    d = decide(_linux())
    assert d.off == ("AMX",)
    assert d.compiler_flags == ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
    assert d.cmake_args() == ["-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
                              "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"]
    line = d.summary()
    assert "\n" not in line
    assert "without AMX" in line and "0x200e7" in line and "tile data (bit 18)" in line


def test_amx_with_tile_data_stays_on():
    d = decide(_linux(mask=FULL_MASK))
    assert d.off == () and d.compiler_flags == () and d.cmake_args() == []
    assert "every feature" in d.summary()


def test_amx_with_an_unreadable_mask_is_turned_off_but_avx512_is_kept():
    d = decide(_linux(mask=None, source="arch_prctl failed: Invalid argument"))
    assert d.off == ("AMX",)
    assert "cannot be read" in d.summary()


def test_avx512_without_zmm_state_is_turned_off():
    d = decide(_linux(mask=0x20007 | (1 << 18)))   # x87/SSE/AVX + AMX, no opmask/ZMM
    assert d.off == ("AVX-512",)
    assert "-mno-avx512f" in d.compiler_flags


def test_a_cpu_without_the_features_needs_nothing():
    d = decide(_linux(flags=frozenset({"sse", "sse2", "avx", "avx2"}), mask=0x7))
    assert d.off == ()


@pytest.mark.parametrize("system,machine", [("Darwin", "x86_64"), ("Windows", "AMD64"), ("Linux", "aarch64")])
def test_non_linux_or_non_x86_hosts_keep_the_native_build(system, machine):
    d = decide(HostCpu(system, machine, SAPPHIRE, FIRECRACKER_MASK))
    assert d.off == () and d.notes
    assert "nothing turned off" in d.summary()


def test_forced_groups_and_unknown_names():
    d = decide(_linux(mask=FULL_MASK), force_off=("AVX-512",))
    assert d.off == ("AVX-512",) and d.compiler_flags == ("-mno-avx512f",)
    with pytest.raises(ValueError, match="unknown CPU feature group.*AMX"):
        decide(_linux(), force_off=("amx",))


def test_every_group_has_the_flags_that_turn_it_off():
    for g in FEATURE_GROUPS:
        assert g.off_flags and all(f.startswith("-mno-") for f in g.off_flags)


def test_the_build_key_follows_the_flags_and_the_cpu():
    host = _linux(mask=FULL_MASK)
    native = decide(host)
    without_amx = decide(_linux())
    k = build_key("0.3.36", "-DGGML_RPC=ON", native, host)
    assert k == build_key("0.3.36", "-DGGML_RPC=ON", native, host)
    assert k != build_key("0.3.36", "-DGGML_RPC=ON", without_amx, host)
    assert k != build_key("0.3.36", "-DGGML_RPC=ON -DGGML_NATIVE=OFF", native, host)
    assert k != build_key("0.3.37", "-DGGML_RPC=ON", native, host)
    # no compiler: the advertised flags stand in for the ISA, so another CPU gets another key
    other = _linux(flags=frozenset({"sse", "avx"}), mask=FULL_MASK)
    assert (build_key("0.3.36", "", native, host, compiler="/nonexistent/cc")
            != build_key("0.3.36", "", native, other, compiler="/nonexistent/cc"))


def test_library_scan_finds_ldtilecfg(tmp_path):
    lib = tmp_path / "libggml-cpu.so.0"
    lib.write_bytes(b"\x00" * 100 + b"\xc4\xe2\x78\x49\x00" + b"\x00" * 100)
    assert library_has_amx(str(lib))
    lib.write_bytes(b"\x00" * 200)
    assert not library_has_amx(str(lib))
    assert not library_has_amx(str(tmp_path / "missing.so"))


def test_probe_reads_this_host():
    host = probe()
    if sys.platform.startswith("linux") and host.machine == "x86_64":
        assert host.flags, "no flags read from /proc/cpuinfo"
        assert host.os_mask is not None and host.os_mask & 0b11 == 0b11, host   # x87 and SSE always
    decide(host)


def test_the_script_runs_by_path_before_gpulab_is_installed():
    """scripts/setup.sh runs it with the venv's bare Python: no package imports allowed."""
    out = subprocess.run([sys.executable, "-I", str(REPO / "gpulab" / "sources" / "cpu_features.py"), "--json",
                          "--lcp-version=0.3.36", "--cmake-args=-DGGML_RPC=ON"], capture_output=True, text=True,
                         cwd="/", timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["build_key"]) == 16 and data["summary"].startswith("CPU features:")
    shell = subprocess.run([sys.executable, "-I", str(REPO / "gpulab" / "sources" / "cpu_features.py"), "--shell",
                            "--lcp-version=0.3.36", "--cmake-args=-DGGML_RPC=ON"], capture_output=True, text=True,
                           cwd="/", timeout=60, env={"GPULAB_CPU_OFF": "AMX", "PATH": "/usr/bin:/bin"})
    # what the set-up's `eval` makes of it, and what pip's CMAKE_ARGS splitting (shlex) makes of that
    got = subprocess.run(["bash", "-c", shell.stdout + '\nprintf "%s" "$GPULAB_CMAKE_ARGS_FULL"'],
                         capture_output=True, text=True, timeout=60).stdout
    assert shlex.split(got) == ["-DGGML_RPC=ON", "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
                                "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"]
