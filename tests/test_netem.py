"""The shaping proxy's own arithmetic (test equipment): the RPC command parser and the token
bucket's burst, without sockets."""

from __future__ import annotations

import collections
import struct

from gpulab.netem import _Commands, _Direction


def _msg(cmd: int, payload: bytes) -> bytes:
    return bytes([cmd]) + struct.pack("<Q", len(payload)) + payload   # ggml-rpc.cpp's send_rpc_cmd


def test_commands_are_counted_across_chunk_boundaries():
    counts: collections.Counter = collections.Counter()
    sizes: collections.Counter = collections.Counter()
    stream = _msg(6, b"x" * 1000) + _msg(6, b"y" * 3) + _msg(16, b"\0" * 4) + _msg(8, b"z" * 312)
    p = _Commands(counts, sizes)
    for i in range(0, len(stream), 7):      # chunks that cut headers and payloads anywhere
        p.feed(stream[i:i + 7])
    assert counts == {6: 2, 16: 1, 8: 1}
    assert sizes == {6: 9 + 1000 + 9 + 3, 16: 13, 8: 321}


def test_a_reply_waits_for_the_rate_beyond_one_frame():
    # 200 KB at 5 MB/s with a 1500-byte burst: due 40 ms - 0.3 ms after it was read, plus the delay
    d = _Direction(None, None, rate=5e6, delay=10e-3, burst=1500, counter=[0])  # type: ignore[arg-type]
    d.t_last = 100.0
    d.take(b"\0" * 200_000, 100.0)
    (due, _), = d.q
    assert abs(due - (100.0 + (200_000 - 1500) / 5e6 + 10e-3)) < 1e-9
