"""Test equipment, not product: a shaping TCP proxy that makes a loopback connection behave like a
network link (a token-bucket rate and a one-way delay, each direction on its own), so that
llama.cpp's RPC servers on this machine look like hosts across a network.

This machine's kernel has no netem or tbf queueing discipline, so the shaping is done in user
space. Every address is 127.0.0.1; every loop is bounded in time (each proxy stops by itself
after `lifetime_s`) and in count (connections accepted); `stop()` ends it at once.

    with ShapingProxy(("127.0.0.1", 50052), bytes_per_s=12.5e6, delay_s=1e-3) as px:
        ...   # connect to px.endpoint instead of 127.0.0.1:50052

A chunk read from one side leaves the proxy's queue when the bucket has room for it (the rate,
with a burst of `burst_bytes`) and is delivered `delay_s` later, in order: a round trip costs
2 x delay_s, and a transfer of n bytes n / rate more. The burst is one Ethernet frame, as a
link's serialisation has it: a larger one (it was 16 KiB) lets every reply of a request/response
protocol start that many bytes ahead (a 196 KB logits reply at 40 Mbit/s came 3.3 ms early).
"""

from __future__ import annotations

import collections
import selectors
import socket
import threading
import time

__all__ = ["ShapingProxy", "LinkProfile", "PROFILES", "UNSHAPED"]

_CHUNK = 64 * 1024
_MAX_EARLY = 0.3e-3  # seconds: the most a chunk is sent ahead of its time to make up for late wake-ups
UNSHAPED = 1e13      # bytes/s: no shaping (a finite rate keeps the bucket's arithmetic finite)


class LinkProfile:
    """A link to emulate: rate (bytes/s, each direction) and round-trip time."""

    def __init__(self, name: str, bytes_per_s: float, rtt_s: float):
        self.name, self.bytes_per_s, self.rtt_s = name, float(bytes_per_s), float(rtt_s)

    def __repr__(self) -> str:
        return f"LinkProfile({self.name!r}, {self.bytes_per_s * 8 / 1e6:g} Mbit/s, rtt {self.rtt_s * 1e3:g} ms)"


# 1 Gbit/s with 1 ms and 10 Gbit/s with 0.1 ms, scaled to CPU RPC devices (about 50x slower
# than GPUs) and to what a Python proxy on a loaded 2-core machine shapes faithfully (it adds
# about 0.1 ms to a round trip there: a 2 ms one keeps that under 10%): the same tenfold step
# between them, in rate and in round trip
PROFILES = {
    "slow": LinkProfile("slow", 40e6 / 8, 20e-3),     # 40 Mbit/s, 20 ms: the '1 Gbit/s, 1 ms' link
    "fast": LinkProfile("fast", 400e6 / 8, 2e-3),     # 400 Mbit/s, 2 ms: the '10 Gbit/s, 0.1 ms' link
}


class _Direction:
    """One direction of one connection: chunks read from src wait in a timed queue for dst."""

    def __init__(self, src: socket.socket, dst: socket.socket, rate: float, delay: float, burst: int,
                 counter: list[int]):
        self.src, self.dst, self.rate, self.delay, self.burst, self.counter = src, dst, rate, delay, burst, counter
        self.q: collections.deque[tuple[float, bytes]] = collections.deque()
        self.tokens, self.t_last = float(burst), time.monotonic()
        self.eof = False
        self.peer: _Direction | None = None     # the other direction of the same connection
        self.spoke = False                      # data came this way since the peer last answered

    def take(self, data: bytes, now: float) -> None:
        # token bucket: tokens refill at the rate up to the burst; a chunk takes its bytes and,
        # when that leaves a debt, departs once the debt is repaid (FIFO order kept)
        self.tokens = min(float(self.burst), self.tokens + self.rate * (now - self.t_last))
        self.t_last = now
        self.tokens -= len(data)
        self.q.append((now + max(0.0, -self.tokens) / self.rate + self.delay, data))

    def flush(self, now: float, early: float) -> float | None:
        """Send what is due (up to `early` seconds ahead: the loop wakes late by about that
        much); the time the next chunk is due, or None when the queue is empty."""
        while self.q and self.q[0][0] - early <= now:
            data = self.q.popleft()[1]
            self.dst.sendall(data)
            self.counter[0] += len(data)
        return self.q[0][0] if self.q else None


class _Commands:
    """Counts the RPC commands in the head -> server stream (ggml-rpc.cpp's send_rpc_cmd: a
    command byte, a u64 size, that many bytes), so that a test can see how many SET_TENSOR,
    GET_TENSOR and GRAPH_COMPUTE a step sends; not a validating parser."""

    def __init__(self, counts: collections.Counter, sizes: collections.Counter):
        self.counts, self.sizes, self.head, self.left = counts, sizes, b"", 0

    def feed(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self.left:
                k = min(self.left, len(data) - i)
                self.left -= k
                i += k
                continue
            k = min(9 - len(self.head), len(data) - i)
            self.head += data[i:i + k]
            i += k
            if len(self.head) == 9:
                self.counts[self.head[0]] += 1
                self.left = int.from_bytes(self.head[1:], "little")
                self.sizes[self.head[0]] += 9 + self.left
                self.head = b""


class ShapingProxy:
    """Listens on 127.0.0.1 (a free port), forwards each connection to `target` through two shaped
    pipes. bytes_per_s: each direction's rate; delay_s: each direction's one-way delay (a round
    trip: 2 x delay_s). Stops by itself after lifetime_s or max_connections connections."""

    def __init__(self, target: tuple[str, int], *, bytes_per_s: float | None, delay_s: float = 0.0,
                 burst_bytes: int = 1500, lifetime_s: float = 900.0, max_connections: int = 64,
                 count_commands: bool = False):
        if target[0] not in ("127.0.0.1", "localhost"):
            raise ValueError("the shaping proxy forwards to this machine only (127.0.0.1)")
        self.target, self.burst = target, int(burst_bytes)
        self.rate, self.delay = float(bytes_per_s) if bytes_per_s else UNSHAPED, float(delay_s)
        self.lifetime_s, self.max_connections = lifetime_s, max_connections
        # parse the head's stream into RPC commands (commands, command_bytes): off by default, since
        # a stream that is not ggml-rpc's would cost a Python step per 9 bytes
        self.count_commands = count_commands
        self._stop = threading.Event()
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(8)
        self.port = self._lsock.getsockname()[1]
        self.bytes_up = [0]     # head -> server
        self.bytes_down = [0]   # server -> head
        # turns: how often the server answered after the head spoke (a round trip on the link);
        # commands, command_bytes: RPC commands sent and their bytes, by ggml-rpc.cpp's command number
        self.turns = [0]
        self.commands: collections.Counter = collections.Counter()
        self.command_bytes: collections.Counter = collections.Counter()
        self._parsers: dict = {}
        self._socks: list[socket.socket] = []
        self._dirs: dict = {}    # socket -> _Direction, of the open connections
        # select(), not epoll: its timeout has microseconds, epoll's whole milliseconds
        self._sel = selectors.SelectSelector()
        self._deadline = time.monotonic() + lifetime_s
        self._thread = threading.Thread(target=self._loop, name=f"netem-{self.port}", daemon=True)

    @classmethod
    def for_profile(cls, target: tuple[str, int], profile: LinkProfile, **kw) -> ShapingProxy:
        return cls(target, bytes_per_s=profile.bytes_per_s, delay_s=profile.rtt_s / 2, **kw)

    def shape(self, bytes_per_s: float | None, delay_s: float = 0.0) -> None:
        """Change the link from now on, on open connections too (None: as fast as loopback, no
        delay): a model loads over a fast link, then is measured over the slow one."""
        self.rate = float(bytes_per_s) if bytes_per_s else UNSHAPED
        self.delay = float(delay_s)
        for d in list(self._dirs.values()):
            d.rate, d.delay = self.rate, self.delay

    def shape_as(self, profile: LinkProfile | None) -> None:
        self.shape(profile.bytes_per_s if profile else None, profile.rtt_s / 2 if profile else 0.0)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ShapingProxy:
        self._thread.start()
        return self

    def _accept(self, dirs: dict) -> None:
        client, _ = self._lsock.accept()
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(True)
            s.settimeout(5)
            self._socks.append(s)
            self._sel.register(s, selectors.EVENT_READ)
        up = dirs[client] = _Direction(client, server, self.rate, self.delay, self.burst, self.bytes_up)
        down = dirs[server] = _Direction(server, client, self.rate, self.delay, self.burst, self.bytes_down)
        up.peer, down.peer = down, up
        if self.count_commands:
            self._parsers[client] = _Commands(self.commands, self.command_bytes)

    def _loop(self) -> None:
        """One thread for every connection: read what is ready, send what is due, sleep until the
        next is due. Ends at stop(), at the deadline, or after max_connections."""
        dirs = self._dirs
        n = 0
        late = 0.0
        overs: collections.deque[float] = collections.deque(maxlen=32)
        self._sel.register(self._lsock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now > self._deadline:
                    return
                nxt = [d.flush(now, late) for d in list(dirs.values())]
                due = [t for t in nxt if t is not None]
                first = min(due, default=None)
                timeout = 0.2 if first is None else min(0.2, max(0.0, first - late - time.monotonic()))
                t_sel = time.monotonic()
                ready = self._sel.select(timeout)
                if first is not None and not ready and timeout > 0:
                    # woke for a due chunk: how much longer select() slept than asked (a loaded
                    # machine's wake-up). Aim early by the least of the recent oversleeps, so that
                    # a chunk is almost never delivered before its time; bounded besides
                    overs.append(max(0.0, time.monotonic() - t_sel - timeout))
                    late = min(_MAX_EARLY, min(overs))
                for key, _ in ready:
                    sock = key.fileobj
                    if sock is self._lsock:
                        if n < self.max_connections:
                            n += 1
                            self._accept(dirs)
                        continue
                    d = dirs.get(sock)
                    if d is None:
                        continue
                    try:
                        data = sock.recv(_CHUNK)  # type: ignore[union-attr]
                    except OSError:
                        data = b""
                    if data:
                        d.take(data, time.monotonic())
                        d.spoke = True
                        if d.peer is not None and d.peer.spoke and d.counter is self.bytes_down:
                            self.turns[0] += 1      # the server answers what the head sent
                            d.peer.spoke = False
                        if sock in self._parsers:
                            self._parsers[sock].feed(data)
                    else:
                        self._sel.unregister(sock)
                        d.eof = True
                # a side that closed: once its queue is sent, close the other side too
                for sock, d in list(dirs.items()):
                    if d.eof and not d.q:
                        for s in (d.src, d.dst):
                            try:
                                s.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
                        del dirs[sock]
        except OSError:
            return
        finally:
            self._sel.close()
            self._lsock.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2)
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> ShapingProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
