"""llama.cpp RPC servers: serve a device, start local servers, register endpoints as devices.

An RPC server makes one device of its machine (here usually the CPU) a device of another
process's llama.cpp. To llama.cpp they are GPU-type devices listed before the real GPUs, so
`tensor_split` spreads layers across them: several of them on one machine stand in for several
GPUs, and servers on other hosts make one model span machines.

Two properties of llama.cpp's RPC backend shape this module:
- The protocol has no authentication or encryption. Servers bind 127.0.0.1 unless told
  otherwise, and `serve` warns loudly on any other address.
- Its client calls GGML_ABORT, ending the whole process, when it cannot connect, when the
  handshake fails, and when a server dies in the middle of a load or a run. `register` checks
  an endpoint with its own handshake first; nothing can save a process whose server dies
  mid-run, so keep the servers alive while models loaded on them are open.

A server serves one client connection at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..core.devices import Device, split_endpoint
from ..core.errors import DeviceError
from . import ggml, llama_lib

__all__ = ["serve", "RpcServer", "RpcCluster", "start_servers", "register", "probe",
           "registered_endpoints", "is_loopback", "insecure_bind_warning", "ServerBuffers", "server_buffers"]

# ggml/include/ggml-rpc.h of the vendored llama.cpp: the client aborts on another major version
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
_RPC_CMD_HELLO = 14          # enum rpc_cmd (ggml-rpc.cpp): HELLO is always 14
_RPC_CMD_DEVICE_COUNT = 15
_RPC_CONN_CAPS_SIZE = 24     # transport.h


# --- serving -------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """True when `host` only ever means this machine (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def insecure_bind_warning(host: str, port: int) -> str | None:
    """The warning `serve` prints for a non-loopback address, or None for loopback."""
    if is_loopback(host):
        return None
    return (
        f"\n{'!' * 78}\n"
        f"WARNING: serving on {host}:{port}, which other machines can reach.\n"
        "llama.cpp's RPC protocol has NO authentication and NO encryption: anyone who can\n"
        "connect can allocate memory on this machine, read and overwrite it, and run\n"
        "computations. Use it only on a network you trust (or through an SSH tunnel);\n"
        "bind to 127.0.0.1 otherwise.\n"
        f"{'!' * 78}\n")


def _bind_address(host: str) -> str:
    """ggml's server binds with inet_addr(): IPv4 literals only ('localhost' is mapped here)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise DeviceError(f"cannot serve on {host!r}: llama.cpp's RPC server binds IPv4 addresses only; "
                          "give one such as 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    return host


def serve(host: str = "127.0.0.1", port: int = 50052, device: str = "CPU",
          threads: int | None = None, cache_dir: str | os.PathLike | None = None) -> None:
    """Serve one llama.cpp device over RPC until interrupted (blocking).

    ggml_backend_rpc_start_server (ggml-rpc.cpp). `device` is the ggml device name ('CPU',
    'CUDA0'), `threads` the CPU backend's thread count (default: all cores), `cache_dir` a
    folder where the server caches large tensors by hash so a reload skips the transfer
    (rpc-server -c). Returns after Ctrl-C; raises DeviceError if the server cannot start (for
    instance the port is taken).
    """
    host = _bind_address(host)
    warning = insecure_bind_warning(host, port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    g = llama_lib.ggml()
    rpc = llama_lib.rpc_lib()
    dev = g.ggml_backend_dev_by_name(device.encode())
    if not dev:
        raise DeviceError(f"no device {device!r} to serve; this llama.cpp has {', '.join(ggml.device_names(g))}")
    n_threads = int(threads) if threads else (os.cpu_count() or 1)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    endpoint = f"{host}:{port}".encode()
    cache = os.fsencode(cache_dir) if cache_dir is not None else None
    devs = (ctypes.c_void_p * 1)(dev)
    # The server loops in C forever; run it on a thread so the main thread still takes Ctrl-C.
    t = threading.Thread(target=rpc.ggml_backend_rpc_start_server,
                         args=(endpoint, cache, n_threads, 1, devs), name="ggml-rpc-server", daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.5)
    except KeyboardInterrupt:
        print(f"RPC server on {host}:{port} stopped", file=sys.stderr, flush=True)
        return
    raise DeviceError(f"the RPC server on {host}:{port} stopped: it could not listen there "
                      "(port in use, or an address this machine does not have?)")


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpulab.runtime.rpc",
                                 description="Serve a llama.cpp device over RPC (no authentication!).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=50052)
    ap.add_argument("--device", default="CPU")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--parent-pid", type=int, default=0,
                    help="exit when this process is gone (servers started by RpcServer)")
    a = ap.parse_args(argv)
    if a.parent_pid:
        def watch() -> None:
            while os.getppid() == a.parent_pid:
                time.sleep(0.5)
            os._exit(0)
        threading.Thread(target=watch, daemon=True).start()
    try:
        serve(a.host, a.port, a.device, a.threads, a.cache_dir)
    except Exception as e:  # noqa: BLE001
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


# --- local servers in child processes -------------------------------------------------------

def _free_port(host: str, port: int = 0) -> int:
    """A port nobody listens on (port=0: any free one). SO_REUSEADDR as ggml's server sets it,
    so a port left in TIME_WAIT by a stopped server counts as free."""
    with socket.socket(socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise DeviceError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
        return s.getsockname()[1]


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host == "0.0.0.0" else host


def _kill(proc: subprocess.Popen, log_path: str) -> None:
    # also the weakref finalizer: runs at interpreter exit for servers nobody stopped
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3)
    except Exception:  # noqa: BLE001
        pass
    with contextlib.suppress(OSError):
        os.unlink(log_path)


def _warn_if_registered(endpoints: list[str]) -> None:
    registered = [e for e in endpoints if e in _registered]
    if registered:
        warnings.warn(
            f"stopped RPC server(s) {', '.join(registered)} that this process registered with llama.cpp: "
            "their devices stay registered (ggml cannot remove them), and any later load that lets "
            "llama.cpp pick its devices itself (e.g. llama_cpp.Llama) will abort this process. Keep "
            "registered servers running until the process ends, or register them in a separate process. "
            "(gpulab's open_model and llama_devices step around them.)", RuntimeWarning, stacklevel=3)


class RpcServer:
    """One RPC server in a child process (`python -m gpulab.runtime.rpc`).

        with RpcServer() as srv:          # a free port on 127.0.0.1
            devices = register([srv.endpoint])

    `start()` returns once the port accepts connections. The child ends with `stop()`, the
    `with` block, garbage collection, interpreter exit, or the death of this process.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, device: str = "CPU",
                 threads: int | None = 1, cache_dir: str | os.PathLike | None = None,
                 startup_timeout: float = 30.0, debug_log: bool = False):
        self.host, self.port, self.device = _bind_address(host), int(port), device
        # GGML_RPC_DEBUG=1 (ggml-rpc.cpp): the server logs every command, its buffer allocations
        # included; server_buffers() reads them (the per-device truth behind a Meta() device)
        self.debug_log = debug_log
        self.threads, self.cache_dir, self.startup_timeout = threads, cache_dir, startup_timeout
        self._proc: subprocess.Popen | None = None
        self._log_path = ""
        self._finalizer: weakref.finalize | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def output(self) -> str:
        """What the server printed so far (its banner, 'Accepted client connection'...)."""
        try:
            return Path(self._log_path).read_text(errors="replace") if self._log_path else ""
        except OSError:
            return ""

    def _launch(self) -> None:
        # checked here because the readiness test below only sees that *someone* listens
        self.port = _free_port(self.host, self.port)
        fd, self._log_path = tempfile.mkstemp(prefix="gpulab-rpc-", suffix=".log")
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("GGML_RPC_DEBUG", None)
        if self.debug_log:
            env["GGML_RPC_DEBUG"] = "1"
        cmd = [sys.executable, "-m", "gpulab.runtime.rpc", "--host", self.host, "--port", str(self.port),
               "--device", self.device, "--parent-pid", str(os.getpid())]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if self.cache_dir is not None:
            cmd += ["--cache-dir", os.fspath(self.cache_dir)]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True)
        finally:
            os.close(fd)
        self._finalizer = weakref.finalize(self, _kill, self._proc, self._log_path)

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        host = _connect_host(self.host)
        while True:
            if self._proc.poll() is not None:
                out = self.output().strip().splitlines()[-5:]
                raise DeviceError(f"RPC server for {self.endpoint} exited with code {self._proc.returncode}: "
                                  + (" | ".join(out) or "no output"))
            try:
                with socket.create_connection((host, self.port), timeout=0.5):
                    pass
                time.sleep(0.05)
                if self._proc.poll() is None:
                    return
                continue   # someone else answered and our child died: report its output
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise DeviceError(f"RPC server for {self.endpoint} did not accept connections within "
                                  f"{self.startup_timeout:.0f} s")
            time.sleep(0.05)

    def start(self) -> RpcServer:
        if self.alive:
            return self
        llama_lib.rpc_lib()  # fail here, clearly, when llama.cpp has no RPC backend
        self._launch()
        self._wait_ready(time.monotonic() + self.startup_timeout)
        return self

    def stop(self) -> None:
        """Terminate the child (SIGTERM, then SIGKILL after 3 s) and wait for it.

        Warns (RuntimeWarning) when this process registered the server with llama.cpp: its
        device stays registered, and a later load that lets llama.cpp choose its own devices
        (llama_cpp.Llama, llama_model_load_from_file without a device list) aborts the process.
        gpulab's own open_model() and llama_devices() step around it."""
        if self._stop():
            _warn_if_registered([self.endpoint])

    def _stop(self) -> bool:
        fin, self._finalizer = self._finalizer, None
        if fin is None or not fin.alive:
            return False
        fin()  # runs _kill once
        return True

    def __enter__(self) -> RpcServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RpcServer({self.endpoint!r}, pid={self.pid}, alive={self.alive})"


class RpcCluster:
    """Several local RpcServers; `.endpoints` in start order; a context manager."""

    def __init__(self, servers: list[RpcServer]):
        self.servers = list(servers)

    @property
    def endpoints(self) -> list[str]:
        return [s.endpoint for s in self.servers]

    def stop(self) -> None:
        """Stop every server (warns as RpcServer.stop does, once for all)."""
        stopped = [s.endpoint for s in self.servers if s._stop()]
        _warn_if_registered(stopped)

    def __enter__(self) -> RpcCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __len__(self) -> int:
        return len(self.servers)

    def __iter__(self):
        return iter(self.servers)

    def __repr__(self) -> str:
        return f"RpcCluster({self.endpoints})"


def start_servers(n: int, host: str = "127.0.0.1", threads: int | None = 1, *, device: str = "CPU",
                  startup_timeout: float = 30.0, debug_log: bool = False) -> RpcCluster:
    """Start n RPC servers on free ports of `host`, in parallel; returns when all accept.
    debug_log: the servers log their allocations (see RpcServer, server_buffers)."""
    if n < 1:
        raise ValueError("start_servers needs n >= 1")
    llama_lib.rpc_lib()
    servers = [RpcServer(host, 0, device=device, threads=threads, startup_timeout=startup_timeout,
                         debug_log=debug_log) for _ in range(n)]
    try:
        for s in servers:
            s._launch()
        deadline = time.monotonic() + startup_timeout
        for i, s in enumerate(servers):
            for attempt in range(3):
                try:
                    s._wait_ready(deadline)
                    break
                except DeviceError:
                    # most likely the free port was taken between picking and binding: retry
                    if attempt == 2 or time.monotonic() > deadline:
                        raise
                    s.stop()
                    servers[i] = s = RpcServer(host, 0, device=device, threads=threads,
                                               startup_timeout=startup_timeout, debug_log=debug_log)
                    s._launch()
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return RpcCluster(servers)


# --- what a server allocated, from its own log --------------------------------------------------

@dataclass(frozen=True)
class ServerBuffers:
    """One load's buffers on one RPC server (its device), as the server itself allocated them."""
    model_bytes: int
    kv_bytes: int
    compute_bytes: int


_ALLOC = re.compile(r"\[alloc_buffer\] device: (\d+), size: (\d+) -> remote_ptr: ([0-9a-f]+), remote_size: (\d+)")
_CLEAR = re.compile(r"\[buffer_clear\] remote_ptr: ([0-9a-f]+), value: 0\b")


def server_buffers(output: str, device: int = 0) -> ServerBuffers:
    """Read an RPC server's debug log (RpcServer(debug_log=True)) over one load of a model and
    its context: llama.cpp allocates the weights first (llama_model::load_tensors), then the KV
    cache, which it clears (llama_kv_cache ctor: ggml_backend_buffer_clear), then the compute
    buffer(s) (sched_reserve; a bigger one replaces a smaller). Under -sm tensor llama.cpp's own
    log names only the Meta() device, whose buffer size is the largest member's; this is what
    each member holds."""
    allocs = [(m.group(3), int(m.group(4))) for m in _ALLOC.finditer(output) if int(m.group(1)) == device]
    cleared = {m.group(1) for m in _CLEAR.finditer(output)}
    first_kv = next((i for i, (ptr, _) in enumerate(allocs) if ptr in cleared), None)
    if first_kv is None:
        return ServerBuffers(sum(n for _, n in allocs[:1]), 0, max((n for _, n in allocs[1:]), default=0))
    kv = sum(n for ptr, n in allocs if ptr in cleared)
    rest = [n for ptr, n in allocs[first_kv:] if ptr not in cleared]
    return ServerBuffers(sum(n for _, n in allocs[:first_kv]), kv, max(rest, default=0))


# --- registering endpoints with the in-process llama.cpp -----------------------------------

_registered: dict[str, int] = {}   # endpoint -> ggml_backend_reg_t
_reg_lock = threading.Lock()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def _hello(s: socket.socket, endpoint: str) -> tuple[int, int, int]:
    """The protocol's HELLO on a connected socket: the server's (major, minor, patch)."""
    s.sendall(bytes([_RPC_CMD_HELLO]) + struct.pack("<Q", _RPC_CONN_CAPS_SIZE) + bytes(_RPC_CONN_CAPS_SIZE))
    (size,) = struct.unpack("<Q", _recv_exact(s, 8))
    if size != 4 + _RPC_CONN_CAPS_SIZE:
        raise DeviceError(f"{endpoint} answered the RPC handshake with {size} bytes: not a compatible "
                          "llama.cpp RPC server")
    major, minor, patch = _recv_exact(s, size)[:3]
    return major, minor, patch


def _device_count(s: socket.socket) -> int:
    s.sendall(bytes([_RPC_CMD_DEVICE_COUNT]) + struct.pack("<Q", 0))
    (size,) = struct.unpack("<Q", _recv_exact(s, 8))
    (count,) = struct.unpack("<I", _recv_exact(s, size)[:4])
    return int(count)


def probe(endpoint: str, timeout: float = 5.0) -> tuple[tuple[int, int, int], int]:
    """((major, minor, patch), n_devices) of the RPC server at endpoint, by the protocol's own
    HELLO and DEVICE_COUNT (ggml-rpc.cpp). Raises DeviceError for anything llama.cpp's client
    would abort on: no server, not an RPC server, an incompatible protocol version."""
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            major, minor, patch = _hello(s, endpoint)
            if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
                raise DeviceError(f"the RPC server at {endpoint} speaks protocol {major}.{minor}.{patch}; this "
                                  f"llama.cpp needs {RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}.x: run the same "
                                  "llama.cpp version on both sides")
            return (major, minor, patch), _device_count(s)
    except TimeoutError:
        raise DeviceError(f"the RPC server at {endpoint} did not answer within {timeout:g} s; it serves one "
                          "client at a time, so another process may be connected to it") from None
    except ConnectionRefusedError:
        raise DeviceError(f"no RPC server at {endpoint} (connection refused); start one with "
                          f"`gpulab rpc-server --port {port}`") from None
    except (OSError, ConnectionError, struct.error) as e:
        raise DeviceError(f"cannot talk to an RPC server at {endpoint}: {e}") from None


def round_trip(endpoint: str, n: int = 20, timeout: float = 5.0) -> float:
    """Median seconds of one request/answer with an RPC server (DEVICE_COUNT after HELLO, the
    smallest command of the protocol): the latency prior of the throughput model. The server
    serves one client at a time: measure before registering it. Raises DeviceError when
    nothing answers."""
    host, port = split_endpoint(endpoint)
    times = []
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _hello(s, endpoint)
            for _ in range(max(1, n)):
                t0 = time.perf_counter()
                _device_count(s)
                times.append(time.perf_counter() - t0)
    except (OSError, ConnectionError, struct.error) as e:
        raise DeviceError(f"cannot time a round trip to the RPC server at {endpoint}: {e}") from None
    times.sort()
    return times[len(times) // 2]


def registered_endpoints() -> list[str]:
    """Endpoints this process has registered with llama.cpp (they stay registered: ggml has
    no way to remove a backend)."""
    return list(_registered)


def _in_registry(g, reg: int) -> bool:
    return any(g.ggml_backend_reg_get(i) == reg for i in range(g.ggml_backend_reg_count()))


def register(endpoints: Iterable[str] | str, *, timeout: float = 5.0) -> list[Device]:
    """Make RPC servers devices of this process's llama.cpp; returns their Devices in the
    order given (a server with several devices gives several, RPC<n> named in registration
    order).

    ggml_backend_rpc_add_server + ggml_backend_register. Idempotent per endpoint: registering
    one again adds no device. Each new endpoint is first checked with `probe`, since llama.cpp
    aborts the process on an unreachable or incompatible server.
    """
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    endpoints = list(endpoints)
    g = llama_lib.ggml()
    rpc = llama_lib.rpc_lib()
    with _reg_lock:
        for ep in endpoints:
            split_endpoint(ep)
            reg = _registered.get(ep)
            if reg is None:
                _, count = probe(ep, timeout)
                if count < 1:
                    raise DeviceError(f"the RPC server at {ep} serves no device")
                reg = rpc.ggml_backend_rpc_add_server(ep.encode())
                if not reg:
                    raise DeviceError(f"llama.cpp could not add the RPC server at {ep}")
            if not _in_registry(g, reg):
                g.ggml_backend_register(reg)
            _registered[ep] = reg
    by_ep: dict[str, list[Device]] = {}
    for d in llama_lib.llama_devices():
        if d.kind == "rpc":
            by_ep.setdefault(d.endpoint, []).append(d)
    out: list[Device] = []
    for ep in dict.fromkeys(endpoints):
        if ep not in by_ep:
            raise DeviceError(f"the RPC server at {ep} does not answer (registered earlier, then stopped?)")
        out.extend(by_ep[ep])
    return out


if __name__ == "__main__":
    code = _main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
