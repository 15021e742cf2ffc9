"""Capture llama.cpp's log during a load, and parse it into a `LoadReport`.

llama.cpp reports its own placement decisions in the log: `load_tensors: layer N assigned to
device X` (debug level) and one `... buffer size = NNN.NN MiB` line per buffer. One process-wide
ctypes callback is installed with `llama_cpp.llama_log_set` (which also sets ggml's logger);
it forwards to the innermost active `LogCapture`, and when none is active it is quiet: only
error lines reach stderr (everything but debug lines once `llama_cpp.Llama(verbose=True)` has
asked for them). The callback object lives as long as the module, so llama.cpp never
calls into freed memory.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable, Iterable

from ..core.devices import HOST_NAME, Device
from ..core.report import BufferReport, LoadReport
from . import ggml

__all__ = ["LogCapture", "capture_log", "parse_load_log", "install_quiet_logger",
           "LEVEL_DEBUG", "LEVEL_INFO", "LEVEL_WARN", "LEVEL_ERROR", "LEVEL_CONT"]

# enum ggml_log_level (ggml/include/ggml.h). Not the order llama_cpp/_logger.py's comment gives.
LEVEL_NONE, LEVEL_DEBUG, LEVEL_INFO, LEVEL_WARN, LEVEL_ERROR, LEVEL_CONT = range(6)

_lock = threading.Lock()
_sinks: list[LogCapture] = []
_callback = None          # the ctypes callback; referenced for the life of the process
_last_level = LEVEL_INFO  # for LEVEL_CONT pieces in quiet mode
_lcp_logger = logging.getLogger("llama-cpp-python")


def _dispatch(level: int, text: bytes | None, _user) -> None:
    # Called from C, possibly on a llama.cpp thread: must never raise.
    global _last_level
    try:
        s = ggml.text(text)
        sink = _sinks[-1] if _sinks else None
        if sink is not None:
            sink._write(level, s)
            return
        if level != LEVEL_CONT:
            _last_level = level
        # llama_cpp.Llama(verbose=True) sets this logger to DEBUG and expects to see the log
        verbose = 0 < _lcp_logger.level <= logging.DEBUG
        if _last_level == LEVEL_ERROR or (verbose and _last_level != LEVEL_DEBUG):
            sys.stderr.write(s)
    except Exception:  # noqa: BLE001
        pass


def _get_callback(llama_cpp):
    global _callback
    if _callback is None:
        _callback = llama_cpp.llama_log_callback(_dispatch)
    return _callback


_module = None           # the llama_cpp module the callback was installed in


def install_quiet_logger(llama_cpp) -> None:
    """Route llama.cpp's and ggml's log to gpulab's callback (quiet outside captures).
    gpulab.runtime.llama_lib.llama_cpp() calls this once, as it imports llama_cpp."""
    global _module
    _module = llama_cpp
    llama_cpp.llama_log_set(_get_callback(llama_cpp), None)


class LogCapture:
    """Context manager: everything llama.cpp logs (debug level included) while it is active.

        with LogCapture(echo=sys.stderr.write) as cap:
            ...load...
        report = parse_load_log(cap.text, devices)

    Captures nest (the innermost receives the text). `echo`, when given, is called with each
    piece of text logged at `echo_level` or above as it arrives (LEVEL_DEBUG: everything, some
    thousands of lines per load; LEVEL_INFO, the default: what llama.cpp's tools print).
    """

    def __init__(self, echo: Callable[[str], object] | None = None, echo_level: int = LEVEL_INFO):
        self.echo = echo
        self.echo_level = echo_level
        self.records: list[tuple[int, str]] = []   # (ggml_log_level, text piece)
        self._level = LEVEL_INFO

    def _write(self, level: int, text: str) -> None:
        if level == LEVEL_CONT:
            level = self._level
        else:
            self._level = level
        self.records.append((level, text))
        if self.echo is not None and level >= self.echo_level:
            try:
                self.echo(text)
            except Exception:  # noqa: BLE001
                self.echo = None

    def __enter__(self) -> LogCapture:
        lc = _module
        if lc is None:
            raise RuntimeError("LogCapture before llama.cpp was loaded: "
                               "call gpulab.runtime.llama_lib.llama_cpp() first")
        with _lock:
            _sinks.append(self)
            # (re)install: someone (e.g. llama_cpp.Llama) may have set another logger since
            lc.llama_log_set(_get_callback(lc), None)
        return self

    def __exit__(self, *exc) -> None:
        with _lock:
            if self in _sinks:
                _sinks.remove(self)

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.records)

    def lines(self, level: int | None = None) -> list[str]:
        """Whole lines, optionally only those logged at one level (e.g. LEVEL_ERROR)."""
        if level is None:
            return self.text.splitlines()
        return "".join(t for lv, t in self.records if lv == level).splitlines()

    def error_lines(self, n: int = 5) -> list[str]:
        """The last n error lines (what to show when a load fails)."""
        return [ln.strip() for ln in self.lines(LEVEL_ERROR) if ln.strip()][-n:]


capture_log = LogCapture


# --- parsing -------------------------------------------------------------------------------

_MiB = 1024 * 1024
_LAYER = re.compile(r"load_tensors: layer +(\d+) assigned to device (\S+?), is_swa")
_KV_LAYER = re.compile(r"llama_kv_cache: layer +(\d+): dev = (\S+)")
_USING = re.compile(r"using device (\S+) \((.*)\) \(([^()]*)\) - (\d+) MiB free")
_BUFFER = re.compile(
    r"^\s*(?P<fn>[\w~]+): +(?P<buf>\S+) +(?P<what>model|KV|RS|DSV4 \S+ state|compute|output) buffer size = +"
    r"(?P<mib>[\d.]+) MiB")
_KV_TOTAL = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB")
# create_tensor (debug level): "tensor blk.0.ffn_up_exps.weight (3 MiB q8_0) buffer type overridden to CPU_REPACK"
_OVERRIDDEN = re.compile(r"tensor (\S+) \(\d+ MiB \S+\) buffer type overridden to (\S+)")
_NO_ALLOC = re.compile(r"print_info: no_alloc += (\d)")
_RESERVING = re.compile(r"sched_reserve: reserving \.\.\.")
_RPC_BUF = re.compile(r"^RPC(\d+)\[(.+)\]$")
_KIND = {"model": "model", "KV": "kv", "RS": "state", "compute": "compute", "output": "output"}


def _mib(text: str) -> int:
    return int(round(float(text) * _MiB))


def _is_host_buffer(name: str) -> bool:
    # CPU, CPU_Mapped, CPU_REPACK, CPU_KLEIDIAI, CUDA_Host, Vulkan_Host, AMX ...: host memory
    return name.startswith("CPU") or name.endswith("_Host") or name in ("AMX", "BLAS")


class _BufferNames:
    """Maps a logged buffer name to the device it lives on."""

    def __init__(self, devices: Iterable[Device], using: list[tuple[str, str]]):
        self.names: set[str] = set()
        by_ep: dict[str, list[str]] = {}
        for d in devices:
            self.names.add(d.name)
            if d.kind == "rpc" and d.endpoint:
                by_ep.setdefault(d.endpoint, []).append(d.name)
        for name, desc in using:  # 'using device RPC0 (127.0.0.1:50052)': the log's own map
            self.names.add(name)
            if name.startswith("RPC") and name not in by_ep.get(desc, []):
                by_ep.setdefault(desc, []).append(name)
        # an RPC buffer is 'RPC<index within its server>[<endpoint>]'; devices are 'RPC<global>'
        # in registration order, a server's devices consecutively
        self.rpc = {ep: sorted(names, key=_rpc_number) for ep, names in by_ep.items()}

    def device_of(self, buf: str) -> str:
        m = _RPC_BUF.match(buf)
        if m:
            idx, ep = int(m.group(1)), m.group(2)
            names = self.rpc.get(ep, [])
            return names[idx] if idx < len(names) else buf
        if buf in self.names:
            return buf
        if _is_host_buffer(buf):
            return HOST_NAME
        for n in sorted(self.names, key=len, reverse=True):  # 'CUDA0_Split' style names
            if buf.startswith(n) and not buf[len(n):len(n) + 1].isalnum():
                return n
        return buf


def _rpc_number(name: str) -> int:
    digits = name[3:]
    return int(digits) if digits.isdigit() else 1 << 30


_TOOL_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [DIWE] ")


def parse_load_log(text: str, devices: list[Device] | None = None) -> LoadReport:
    """Parse llama.cpp's log of `llama_model_load_from_file` + `llama_init_from_model`.

    Reads 'using device' (the offload devices, in order), 'layer N assigned to device X',
    'llama_kv_cache: layer N: dev = X' and the model / KV / compute / output 'buffer size'
    lines (MiB with two decimals, so each size is exact to +-5 KiB). RPC buffers, named
    'RPC<index in server>[<endpoint>]', are mapped to their device by endpoint (from `devices`
    and from the log's own 'using device' lines); host buffers (CPU, CPU_Mapped, CUDA_Host...)
    to 'CPU'. Compute buffers are those of the last 'sched_reserve' (a context reserves again
    when its graph changes); the '~llama_context: ... compute buffer size is' lines written
    when a context is freed are not counted. The tools' own prefix ('0.00.428.543 I ', common/log.cpp
    with timestamps, as llama-server writes) is dropped first.
    """
    lines = [_TOOL_PREFIX.sub("", ln, count=1) for ln in text.splitlines()]
    using: list[tuple[str, str]] = []
    layers: dict[int, str] = {}
    kv_layers: dict[int, str] = {}
    raw: list[tuple[str, str, int]] = []      # (buffer, kind, bytes) in log order
    compute: list[tuple[str, str, int]] = []  # the current reservation's compute buffers
    kv_total = 0
    dry_run = False
    overridden: list[tuple[str, str]] = []
    for line in lines:
        if "using device" in line:
            m = _USING.search(line)
            if m and (m.group(1), m.group(2)) not in using:
                using.append((m.group(1), m.group(2)))
            continue
        m = _LAYER.search(line)
        if m:
            layers[int(m.group(1))] = m.group(2)
            continue
        m = _KV_LAYER.search(line)
        if m:
            kv_layers[int(m.group(1))] = m.group(2)
            continue
        if _RESERVING.search(line):
            compute = []
            continue
        m = _BUFFER.match(line)
        if m:
            if m.group("fn").startswith("~"):
                continue
            what = m.group("what")
            kind = _KIND.get(what, "kv")
            entry = (m.group("buf"), kind, _mib(m.group("mib")))
            if kind == "compute":
                if any(b == entry[0] for b, _, _ in compute):
                    compute = []   # a new reservation without a 'reserving' line
                compute.append(entry)
            else:
                raw.append(entry)
            continue
        m = _KV_TOTAL.search(line)
        if m:
            kv_total += _mib(m.group(1))
            continue
        if "overridden" in line:
            m = _OVERRIDDEN.search(line)
            if m:
                overridden.append((m.group(1), m.group(2)))
                continue
        m = _NO_ALLOC.search(line)
        if m:
            dry_run = m.group(1) == "1"
    names = _BufferNames(devices or [], using)
    buffers = tuple(BufferReport(device=names.device_of(b), buffer_type=b, kind=k, n_bytes=n)
                    for b, k, n in raw + compute)
    n_layers = max(layers) + 1 if layers else 0
    n_kv = max(kv_layers) + 1 if kv_layers else 0
    return LoadReport(
        layer_devices=tuple(layers.get(i, "") for i in range(n_layers)),
        buffers=buffers,
        devices=tuple(n for n, _ in using),
        log=text,
        kv_layer_devices=tuple(kv_layers.get(i, "") for i in range(n_kv)),
        dry_run=dry_run,
        kv_total_bytes=kv_total,
        overridden=tuple(overridden),
    )
