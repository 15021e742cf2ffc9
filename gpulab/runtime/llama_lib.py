"""Lazy access to llama-cpp-python and the ggml libraries it ships in `llama_cpp/lib`.

Nothing is loaded at import. The ggml libraries are opened by soname (`libggml.so.0`,
`libggml-rpc.so.0`), the names libllama's own DT_NEEDED entries use, so there is exactly one
copy of ggml's backend registry in the process: the `libggml.so` files next to them are
separate copies, and opening those would give a second, empty registry.

`llama_devices()` lists the devices ggml has registered (ggml_backend_dev_*), as gpulab
`Device`s. An RPC device whose server no longer answers is left out: asking it anything makes
llama.cpp's RPC client call GGML_ABORT, which kills the whole process.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from ..core.devices import Device, DeviceKind, split_endpoint
from ..core.errors import ConfigError, DeviceSpecError, RuntimeUnavailableError
from .ggml import buft_name, dev_description, dev_name, device_handles, device_names, reg_name, text

__all__ = [
    "require", "lib_dir", "llama_cpp", "ggml", "rpc_lib", "rpc_supported", "llama_devices",
    "device_handle", "default_device_names", "endpoint_reachable",
    "DEV_TYPE_NAMES",
]

# measuring needs the `run` extra (pyproject.toml): llama-cpp-python, built here with the RPC backend
_INSTALL_HINT = ("""install gpulab's run extra with the RPC backend: CMAKE_ARGS="-DGGML_RPC=ON" """
                 """pip install 'gpulab[run]' (builds llama-cpp-python 0.3.36, about 5 minutes), """
                 "or run scripts/setup.sh")

# enum ggml_backend_dev_type (ggml/include/ggml-backend.h)
DEV_TYPE_NAMES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}
_KIND_OF_TYPE: dict[int, DeviceKind] = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}

_lock = threading.RLock()
_libs: dict[str, Any] = {}   # loaded CDLLs and the llama_cpp module


class _DevCaps(ctypes.Structure):  # struct ggml_backend_dev_caps
    _fields_ = [("async_", ctypes.c_bool), ("host_buffer", ctypes.c_bool),
                ("buffer_from_host_ptr", ctypes.c_bool), ("events", ctypes.c_bool),
                ("mmap_support", ctypes.c_bool)]


class _DevProps(ctypes.Structure):  # struct ggml_backend_dev_props
    _fields_ = [("name", ctypes.c_char_p), ("description", ctypes.c_char_p),
                ("memory_free", ctypes.c_size_t), ("memory_total", ctypes.c_size_t),
                ("type", ctypes.c_int), ("device_id", ctypes.c_char_p), ("caps", _DevCaps)]


_P = ctypes.c_void_p
_GGML_SIGNATURES = {
    "ggml_backend_dev_count": ([], ctypes.c_size_t),
    "ggml_backend_dev_get": ([ctypes.c_size_t], _P),
    "ggml_backend_dev_by_name": ([ctypes.c_char_p], _P),
    "ggml_backend_dev_by_type": ([ctypes.c_int], _P),
    "ggml_backend_dev_name": ([_P], ctypes.c_char_p),
    "ggml_backend_dev_description": ([_P], ctypes.c_char_p),
    "ggml_backend_dev_type": ([_P], ctypes.c_int),
    "ggml_backend_dev_get_props": ([_P, ctypes.POINTER(_DevProps)], None),
    "ggml_backend_dev_backend_reg": ([_P], _P),
    "ggml_backend_reg_name": ([_P], ctypes.c_char_p),
    "ggml_backend_reg_count": ([], ctypes.c_size_t),
    "ggml_backend_reg_get": ([ctypes.c_size_t], _P),
    "ggml_backend_register": ([_P], None),
    # buffer types (ggml-backend.h), for tensor overrides and RPC buffer names
    "ggml_backend_dev_buffer_type": ([_P], _P),
    "ggml_backend_dev_host_buffer_type": ([_P], _P),
    "ggml_backend_buft_name": ([_P], ctypes.c_char_p),
    "ggml_backend_cpu_buffer_type": ([], _P),
}
_RPC_SIGNATURES = {
    "ggml_backend_rpc_add_server": ([ctypes.c_char_p], _P),
    "ggml_backend_rpc_start_server": ([ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                       ctypes.c_size_t, _P], None),
}


def require() -> None:
    """RuntimeUnavailableError, one line naming the `run` extra, where llama-cpp-python is not
    installed: the commands that measure call this before they start."""
    lib_dir()


def lib_dir() -> Path:
    """llama_cpp/lib of the installed llama-cpp-python, found without importing it; or
    $LLAMA_CPP_LIB_PATH, where llama-cpp-python itself then loads libllama from (llama_cpp.py
    `_override_base_path`): a llama.cpp built apart, e.g. with CUDA on a GPU machine."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        d = Path(override)
        if not d.is_dir():
            raise RuntimeUnavailableError(f"LLAMA_CPP_LIB_PATH={override} is not a folder; unset it or point it at "
                                          "a llama.cpp build's bin/ (the folder holding libllama.so)")
        return d
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeUnavailableError(f"llama-cpp-python is not installed; {_INSTALL_HINT}")
    d = Path(list(spec.submodule_search_locations)[0]) / "lib"
    if not d.is_dir():
        raise RuntimeUnavailableError(f"llama-cpp-python at {d.parent} has no lib/ folder; {_INSTALL_HINT}")
    return d


def _soname_candidates(base: str) -> list[str]:
    if sys.platform == "darwin":
        return [f"lib{base}.0.dylib", f"lib{base}.dylib"]
    if sys.platform == "win32":
        return [f"{base}.dll", f"lib{base}.dll"]
    return [f"lib{base}.so.0", f"lib{base}.so"]


def _open(base: str, signatures: dict, missing_msg: str) -> ctypes.CDLL:
    with _lock:
        if base in _libs:
            return _libs[base]
        d = lib_dir()
        path = next((d / n for n in _soname_candidates(base) if (d / n).exists()), None)
        if path is None:
            raise RuntimeUnavailableError(missing_msg)
        try:
            # RTLD_LOCAL (ctypes' default), as llama-cpp-python loads libllama. Made global, libggml's
            # dependency tree put libggml-cuda ahead of libstdc++ in the global scope, so libllama's
            # std::ostream calls bound to the copies inside libggml-cuda and every CUDA load died in
            # llama_model::print_info (SIGSEGV; seen on an H200, docs/BENCHMARKS.md "GPU truth"). The
            # registry is shared either way: libllama's libggml.so.0 is this very object.
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise RuntimeUnavailableError(f"cannot load {path}: {e}; {_INSTALL_HINT}") from None
        for name, (argtypes, restype) in signatures.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise RuntimeUnavailableError(f"{path.name} has no {name}: {missing_msg}") from None
            fn.argtypes, fn.restype = argtypes, restype
        _libs[base] = lib
        return lib


def ggml() -> ctypes.CDLL:
    """libggml.so.0 (backend registry and devices), loaded once."""
    return _open("ggml", _GGML_SIGNATURES,
                 f"llama-cpp-python's lib/ has no libggml; {_INSTALL_HINT}")


def ggml_base() -> ctypes.CDLL:
    """libggml-base.so.0 (threadpool parameters, ggml_commit), loaded once; signatures are set by
    the caller (gpulab.runtime.bench), as this llama.cpp may not export them."""
    ggml()
    return _open("ggml-base", {}, f"llama-cpp-python's lib/ has no libggml-base; {_INSTALL_HINT}")


def ggml_cpu() -> ctypes.CDLL:
    """libggml-cpu.so.0 (the CPU backend's threadpools), loaded once."""
    ggml()
    return _open("ggml-cpu", {}, f"llama-cpp-python's lib/ has no libggml-cpu; {_INSTALL_HINT}")


def rpc_lib() -> ctypes.CDLL:
    """libggml-rpc.so.0; RuntimeUnavailableError when llama-cpp-python was built without RPC."""
    ggml()
    return _open("ggml-rpc", _RPC_SIGNATURES,
                 "llama-cpp-python was built without the RPC backend (no libggml-rpc in llama_cpp/lib); "
                 "rebuild it: CMAKE_ARGS=\"-DGGML_RPC=ON\" pip install --force-reinstall --no-cache-dir "
                 "llama-cpp-python==0.3.36 (about 5 minutes), or run scripts/setup.sh")


def rpc_supported() -> bool:
    """True when the installed llama-cpp-python has the RPC backend (client and server)."""
    try:
        rpc_lib()
    except RuntimeUnavailableError:
        return False
    return True


def llama_cpp():
    """The llama_cpp module, imported on first use; backend initialised, logging made quiet."""
    with _lock:
        loaded = _libs.get("llama_cpp")
        if loaded is not None:
            return loaded
        ggml()  # the registry the module's libllama will share (same soname)
        try:
            import llama_cpp as mod
        except ImportError as e:
            raise RuntimeUnavailableError(f"cannot import llama_cpp ({e}); {_INSTALL_HINT}") from None
        except OSError as e:
            raise RuntimeUnavailableError(f"llama_cpp failed to load its library ({e}); {_INSTALL_HINT}") from None
        from .logcapture import install_quiet_logger
        install_quiet_logger(mod)  # importing llama_cpp installs a logger that prints everything
        mod.llama_backend_init()
        _libs["llama_cpp"] = mod
        return mod


# --- devices -------------------------------------------------------------------------------

# RPC endpoints a model loaded in this process holds buffers on: {endpoint: number of models}.
# llama.cpp keeps one connection per endpoint while anything uses it (ggml-rpc.cpp get_dispatcher),
# and the server serves one client at a time with a listen backlog of 1 (transport.cpp listen(fd, 1)):
# while it serves this process, a probe connection queues and the next one times out. Such a
# server is alive by construction, so it is not probed (several models loaded at once: a fleet).
_held_endpoints: dict[str, int] = {}


def hold_endpoints(endpoints) -> None:
    for ep in endpoints:
        _held_endpoints[ep] = _held_endpoints.get(ep, 0) + 1


def release_endpoints(endpoints) -> None:
    for ep in endpoints:
        n = _held_endpoints.get(ep, 0) - 1
        if n > 0:
            _held_endpoints[ep] = n
        else:
            _held_endpoints.pop(ep, None)


def endpoint_reachable(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to the endpoint opens (a listening RPC server, busy or not), or
    a model of this process holds a connection to it (hold_endpoints)."""
    if endpoint in _held_endpoints:
        return True
    try:
        host, port = split_endpoint(endpoint)
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (OSError, DeviceSpecError):
        return False


def _is_rpc(g, dev) -> bool:
    reg = g.ggml_backend_dev_backend_reg(dev)
    return reg_name(g, reg) == "RPC"


def _dev_handles(g, *, skip_unreachable: bool = True) -> list[tuple[int, bool]]:
    """(handle, is_rpc) for every registered device, leaving out RPC devices whose server does
    not accept connections (their props would make llama.cpp abort)."""
    out, alive = [], {}
    for dev in device_handles(g):
        rpc = _is_rpc(g, dev)
        if rpc and skip_unreachable:
            ep = dev_description(g, dev)
            if ep not in alive:
                alive[ep] = endpoint_reachable(ep)
            if not alive[ep]:
                continue
        out.append((dev, rpc))
    return out


def _device(g, dev: int, rpc: bool) -> Device:
    props = _DevProps()
    g.ggml_backend_dev_get_props(dev, ctypes.byref(props))
    name, desc = text(props.name), text(props.description)
    total, free = int(props.memory_total), int(props.memory_free)
    free = min(free, total) if total else free
    total = max(total, free)
    kind: DeviceKind = "rpc" if rpc else _KIND_OF_TYPE.get(props.type, "gpu")
    dev_id = text(props.device_id)
    server_index = 0
    if rpc:   # its buffer type is 'RPC<index within its server>[<endpoint>]' (ggml_backend_rpc_buffer_type)
        bname = buft_name(g, g.ggml_backend_dev_buffer_type(dev))
        if bname.startswith("RPC") and "[" in bname and bname[3:bname.index("[")].isdigit():
            server_index = int(bname[3:bname.index("[")])
    return Device(name=name, total_bytes=total, free_bytes=free, source="rpc" if rpc else "llama",
                  kind=kind, description=desc, pci_bus_id=dev_id if kind in ("gpu", "igpu") else "",
                  endpoint=desc if rpc else "", server_index=server_index)


def llama_devices(*, include_accel: bool = False) -> list[Device]:
    """The devices llama.cpp's ggml has registered, in registration order.

    kind: 'rpc' (an RPC server's device: GPU-type to llama.cpp, `endpoint` set, source 'rpc'),
    'gpu', 'igpu', 'cpu' (the host, named 'CPU'), and with include_accel=True 'accel' (BLAS,
    AMX: helpers of the CPU that never hold layers). Memory is what the device reports now.
    RPC devices whose server does not answer are left out.
    """
    g = ggml()
    devices = [_device(g, dev, rpc) for dev, rpc in _dev_handles(g)]
    return [d for d in devices if include_accel or d.kind != "accel"]


def device_handle(name: str) -> int:
    """ggml_backend_dev_t of a registered device by llama.cpp name (for --device)."""
    g = ggml()
    h = g.ggml_backend_dev_by_name(name.encode())
    if not h:
        raise ConfigError(f"llama.cpp has no device {name!r}; it has {', '.join(device_names(g)) or 'none'}")
    return h


def default_device_names(*, skip_unreachable: bool = True) -> list[str]:
    """The devices llama.cpp picks when none are given: llama_prepare_model_devices
    (src/llama.cpp) without params.devices, split_mode layer/row: RPC servers first, then GPUs
    (one per device id), then integrated GPUs only if there is no discrete GPU. CPU and ACCEL
    devices are never offload devices. Unreachable RPC servers are skipped (see module doc)."""
    g = ggml()
    rpcs: list[str] = []
    gpus: list[tuple[str, str]] = []
    igpus: list[tuple[str, int]] = []
    for dev, rpc in _dev_handles(g, skip_unreachable=skip_unreachable):
        name = dev_name(g, dev)
        t = g.ggml_backend_dev_type(dev)
        if rpc:
            rpcs.append(name)
        elif t == 1:
            props = _DevProps()
            g.ggml_backend_dev_get_props(dev, ctypes.byref(props))
            dev_id = text(props.device_id)
            if not dev_id or all(dev_id != other for _, other in gpus):
                gpus.append((name, dev_id))
        elif t == 2:
            reg = g.ggml_backend_dev_backend_reg(dev)
            if not igpus or igpus[-1][1] == reg:
                igpus.append((name, reg))
    names = rpcs + [n for n, _ in gpus]
    if not gpus:
        names += [n for n, _ in igpus]
    return names
