"""Measure the link to an RPC server through llama.cpp's RPC protocol itself: the round trip of
the smallest command that answers, and the rate of tensor uploads of a few sizes.

Speaks the wire format of the vendored ggml/src/ggml-rpc/ggml-rpc.cpp (protocol 7):
request = | cmd (1 byte) | size (8 bytes) | payload |, answer = | size (8 bytes) | payload |.
- round trip: RPC_CMD_GET_DEVICE_MEMORY (a 4-byte request, a 16-byte answer), what the client
  asks before a load;
- upload: RPC_CMD_ALLOC_BUFFER and RPC_CMD_BUFFER_GET_BASE, then RPC_CMD_SET_TENSOR of n bytes
  into the buffer (no answer: ggml-rpc.cpp's server loop replies to SET_TENSOR with nothing), closed
  by a GET_DEVICE_MEMORY whose answer comes once the server has taken the upload (it serves one
  command at a time). Time = round trip + n / rate: a line through the sizes gives the rate
  (its slope) apart from the round trip (its intercept). This is the direction a model load and
  the activations to a server take; the way back (get_tensor) crosses the same link.
The fastest of the repetitions counts, as ping's minimum does: anything else on either machine
only ever adds time.

The server serves one client at a time: probe before llama.cpp connects to it, not during.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from ..core.devices import split_endpoint
from ..core.errors import DeviceError
from .rpc import _hello, _recv_exact

__all__ = ["LinkMeasurement", "probe_link", "DEFAULT_SIZES"]

# enum rpc_cmd (ggml-rpc.cpp)
_ALLOC_BUFFER, _BUFFER_GET_BASE, _FREE_BUFFER, _SET_TENSOR, _GET_DEVICE_MEMORY = 0, 3, 4, 6, 11
_GGML_TYPE_F32 = 0
# struct rpc_tensor (packed): id, type, buffer, ne[4], nb[4], op, op_params[16], flags, src[10],
# view_src, view_offs, data, name[64], use_count
_RPC_TENSOR = struct.Struct("<QIQ4I4II16iI10QQQQ64si")
assert _RPC_TENSOR.size == 296   # sizeof(rpc_tensor) in ggml-rpc.cpp

DEFAULT_SIZES = (64 * 1024, 256 * 1024, 1024 * 1024)


@dataclass(frozen=True)
class LinkMeasurement:
    endpoint: str
    rtt_s: float                 # fastest round trip of GET_DEVICE_MEMORY
    bytes_per_s: float          # upload rate: the slope of time against bytes
    samples: tuple[tuple[int, float], ...]   # (bytes, fastest seconds of upload + round trip)

    def describe(self) -> str:
        return (f"{self.endpoint}: round trip {self.rtt_s * 1e3:.3g} ms, "
                f"upload {self.bytes_per_s * 8 / 1e6:.4g} Mbit/s "
                f"({', '.join(f'{n >> 10} KiB in {t * 1e3:.3g} ms' for n, t in self.samples)})")


def _call(s: socket.socket, cmd: int, payload: bytes, answer: int | None) -> bytes:
    s.sendall(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)
    if answer is None:
        return b""
    (size,) = struct.unpack("<Q", _recv_exact(s, 8))
    if size != answer:
        raise DeviceError(f"the RPC server answered command {cmd} with {size} bytes, expected {answer}")
    return _recv_exact(s, size)


def _device_memory(s: socket.socket) -> None:
    _call(s, _GET_DEVICE_MEMORY, struct.pack("<I", 0), 16)


def _tensor(buffer: int, base: int, n: int) -> bytes:
    return _RPC_TENSOR.pack(1, _GGML_TYPE_F32, buffer, n // 4, 1, 1, 1, 4, n, n, n, 0, *([0] * 16), 0,
                            *([0] * 10), 0, 0, base, b"gpulab-probe", 0)


def probe_link(endpoint: str, *, sizes: tuple[int, ...] = DEFAULT_SIZES, repeats: int = 5, n_rtt: int = 20,
               timeout: float = 10.0, max_seconds: float = 60.0) -> LinkMeasurement:
    """Round trip and upload rate to the RPC server at endpoint (see the module docstring).
    Bounded: stops taking samples after max_seconds (what it has is used)."""
    host, port = split_endpoint(endpoint)
    sizes = tuple(sorted({int(n) // 4 * 4 for n in sizes if n >= 4}))
    if len(sizes) < 2:
        raise ValueError("probe_link needs at least two upload sizes")
    deadline = time.monotonic() + max_seconds
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _hello(s, endpoint)
            rtts = []
            for _ in range(max(1, n_rtt)):
                t0 = time.perf_counter()
                _device_memory(s)
                rtts.append(time.perf_counter() - t0)
                if time.monotonic() > deadline:
                    break
            ptr, _size = struct.unpack("<QQ", _call(s, _ALLOC_BUFFER, struct.pack("<IQ", 0, max(sizes)), 16))
            if not ptr:
                raise DeviceError(f"the RPC server at {endpoint} could not allocate {max(sizes)} bytes to probe with")
            (base,) = struct.unpack("<Q", _call(s, _BUFFER_GET_BASE, struct.pack("<Q", ptr), 8))
            samples = []
            try:
                for n in sizes:
                    head = _tensor(ptr, base, n) + b"\0" + struct.pack("<Q", 0)
                    payload = head + bytes(n)
                    times = []
                    for _ in range(max(1, repeats)):
                        t0 = time.perf_counter()
                        _call(s, _SET_TENSOR, payload, None)
                        _device_memory(s)
                        times.append(time.perf_counter() - t0)
                        if time.monotonic() > deadline:
                            break
                    samples.append((n, min(times)))
            finally:
                _call(s, _FREE_BUFFER, struct.pack("<Q", ptr), None)
                _device_memory(s)
    except TimeoutError:
        raise DeviceError(f"the RPC server at {endpoint} did not answer within {timeout:g} s (it serves one "
                          "client at a time: is llama.cpp connected to it?)") from None
    except ConnectionRefusedError:
        raise DeviceError(f"no RPC server at {endpoint} (connection refused)") from None
    except (OSError, ConnectionError, struct.error) as e:
        raise DeviceError(f"cannot probe the RPC server at {endpoint}: {e}") from None
    # least squares line through (bytes, seconds): slope = 1 / rate
    xs = [float(n) for n, _ in samples]
    ys = [t for _, t in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    if slope <= 0:
        raise DeviceError(f"uploads to {endpoint} took no longer for more bytes ({samples}): the link is too fast "
                          "to measure with these sizes; give larger --sizes")
    return LinkMeasurement(endpoint, min(rtts), 1.0 / slope, tuple(samples))
