"""llama_lib: the devices ggml lists, and clear errors when llama-cpp-python is not usable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from gpulab.runtime import llama_lib

pytest.importorskip("llama_cpp")


def test_cpu_device():
    devices = llama_lib.llama_devices()
    cpu = [d for d in devices if d.kind == "cpu"]
    assert [d.name for d in cpu] == ["CPU"]
    assert cpu[0].source == "llama" and cpu[0].total_bytes > 0 and 0 < cpu[0].free_bytes <= cpu[0].total_bytes
    assert all(d.kind in ("cpu", "gpu", "igpu", "rpc") for d in devices)   # 'accel' only on request
    assert all(d.kind != "accel" for d in devices)


def test_default_device_names_never_list_the_cpu():
    assert "CPU" not in llama_lib.default_device_names()


def test_libraries_are_the_ones_libllama_uses():
    # ggml opened by soname is the copy libllama links: one backend registry, not two
    import ctypes

    llama_lib.llama_cpp()
    from llama_cpp import llama_cpp as raw  # the module holding libllama's CDLL

    def addr(fn) -> int:
        return ctypes.cast(fn, ctypes.c_void_p).value

    assert addr(raw._lib.ggml_backend_dev_count) == addr(llama_lib.ggml().ggml_backend_dev_count)
    assert addr(raw._lib.ggml_backend_rpc_add_server) == addr(llama_lib.rpc_lib().ggml_backend_rpc_add_server)


def test_endpoints():
    from gpulab.core.devices import parse_endpoints, split_endpoint
    from gpulab.core.errors import DeviceSpecError
    assert split_endpoint("127.0.0.1:50052") == ("127.0.0.1", 50052)
    for bad in ("127.0.0.1", ":50052", "h:0", "h:70000", "h:x"):
        with pytest.raises(DeviceSpecError, match="HOST:PORT"):
            split_endpoint(bad)
        with pytest.raises(DeviceSpecError, match="HOST:PORT"):
            parse_endpoints(f"127.0.0.1:50052,{bad}")
    assert parse_endpoints(" 127.0.0.1:50052, h:1 ,") == ("127.0.0.1:50052", "h:1")
    assert not llama_lib.endpoint_reachable("127.0.0.1:1", timeout=0.5)


def _run(code: str, pythonpath: str) -> str:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_without_rpc_backend_the_error_says_how_to_rebuild(tmp_path, repo_root):
    """A llama_cpp whose lib/ has no libggml-rpc (ggml itself comes from the real one)."""
    real = llama_lib.lib_dir()
    fake = tmp_path / "llama_cpp"
    (fake / "lib").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    for name in ("libggml.so.0", "libggml-base.so.0", "libggml-cpu.so.0"):
        (fake / "lib" / name).symlink_to(real / name)
    out = _run(f"""
        import ctypes
        ctypes.CDLL({str(real / 'libggml.so.0')!r}, mode=ctypes.RTLD_GLOBAL)  # its libggml-rpc is loaded
        from gpulab.runtime import llama_lib
        from gpulab.core.errors import RuntimeUnavailableError
        print(llama_lib.rpc_supported())
        try:
            llama_lib.rpc_lib()
        except RuntimeUnavailableError as e:
            print(e)
    """, f"{tmp_path}{os.pathsep}{repo_root}")
    supported, message = out.splitlines()
    assert supported == "False"
    assert "without the RPC backend" in message and 'CMAKE_ARGS="-DGGML_RPC=ON"' in message
    assert "scripts/setup.sh" in message


def test_broken_install_is_a_runtime_unavailable_error(tmp_path, repo_root):
    (tmp_path / "llama_cpp").mkdir()
    (tmp_path / "llama_cpp" / "__init__.py").write_text("")
    out = _run("""
        from gpulab.runtime import llama_lib
        from gpulab.core.errors import RuntimeUnavailableError
        for f in (llama_lib.llama_devices, llama_lib.llama_cpp, llama_lib.rpc_lib):
            try:
                f()
            except RuntimeUnavailableError as e:
                print(e)
    """, f"{tmp_path}{os.pathsep}{repo_root}")
    lines = out.splitlines()
    assert len(lines) == 3 and all("no lib/ folder" in ln and "-DGGML_RPC=ON" in ln for ln in lines)


def test_llama_cpp_lib_path_points_gpulab_where_llama_cpp_python_loads_from(tmp_path, repo_root):
    """A llama.cpp built apart (CUDA on a GPU machine: bench/gpu_truth.sh) is used through
    LLAMA_CPP_LIB_PATH by llama-cpp-python; gpulab's libggml/libggml-rpc must come from the same folder,
    or the two would hold two device registries."""
    real = llama_lib.lib_dir()
    elsewhere = tmp_path / "build" / "bin"
    elsewhere.mkdir(parents=True)
    for lib in real.glob("lib*.so*"):
        (elsewhere / lib.name).symlink_to(lib)
    code = """
        from gpulab.runtime import llama_lib
        print(llama_lib.lib_dir())
        print(llama_lib.rpc_supported())
    """
    env_path = f"{repo_root}"
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=env_path, LLAMA_CPP_LIB_PATH=str(elsewhere)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(elsewhere), "True"]
    missing = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, PYTHONPATH=env_path, LLAMA_CPP_LIB_PATH=str(tmp_path / "nope")))
    assert missing.returncode != 0 and "LLAMA_CPP_LIB_PATH" in missing.stderr and "is not a folder" in missing.stderr


def test_ggml_stays_out_of_the_global_symbol_scope(repo_root):
    """gpulab opens libggml as llama-cpp-python opens libllama (RTLD_LOCAL). Opened RTLD_GLOBAL, its
    dependency tree (libggml-cuda before libstdc++) took over libllama's C++ runtime symbols and every
    CUDA load crashed in llama_model::print_info (docs/BENCHMARKS.md, GPU truth). No CPU build shows
    that crash, so this checks the cause: no ggml symbol is resolvable from the global scope."""
    out = _run("""
        import ctypes
        from gpulab.runtime import llama_lib
        llama_lib.ggml(); llama_lib.llama_cpp(); llama_lib.rpc_supported()
        print(hasattr(ctypes.CDLL(None), "ggml_backend_dev_count"))
        print(llama_lib.ggml().ggml_backend_dev_count() > 0)
    """, str(repo_root))
    assert out.split() == ["False", "True"]
