"""gpulab.sources.remote: the header of a GGUF over HTTP Range requests, from a local server.

The server is a small http.server handler on 127.0.0.1 that answers Range requests (206 with
Content-Range) and counts the bytes it serves; its other modes misbehave on purpose."""

from __future__ import annotations

import dataclasses
import io
import socket
import threading
import time
import urllib.error
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import gpulab  # noqa: E402
from gpulab.core.errors import ModelFormatError, RemoteModelError  # noqa: E402
from gpulab.sources.gguf_file import read_local_profile  # noqa: E402
from gpulab.sources.remote import read_remote_profile  # noqa: E402

MiB = 1024**2


def write_gguf(path: Path, n_vocab: int, n_embd: int = 16, n_layer: int = 2, scores: bool = False) -> Path:
    """A small llama GGUF whose header size is set by its vocabulary (one string per token; with
    `scores`, a float32 score and an int32 token type per token after them, as SentencePiece's)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("remote-test")
    w.add_block_count(n_layer)
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(2 * n_embd)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_token_list([f"token-{i:07d}" for i in range(n_vocab)])
    if scores:
        w.add_token_scores([float(-i) for i in range(n_vocab)])
        w.add_token_types([1] * n_vocab)
    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, n_embd)).astype(np.float16))
    for i in range(n_layer):
        for name, shape in (("attn_q", (n_embd, n_embd)), ("attn_k", (n_embd // 2, n_embd)),
                            ("attn_v", (n_embd // 2, n_embd)), ("attn_output", (n_embd, n_embd)),
                            ("ffn_up", (2 * n_embd, n_embd)), ("ffn_down", (n_embd, 2 * n_embd))):
            w.add_tensor(f"blk.{i}.{name}.weight", rng.standard_normal(shape).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """~2.2 MiB of header (100k tokens) in front of ~3 MiB of weights."""
    return write_gguf(tmp_path_factory.mktemp("remote") / "big.gguf", n_vocab=100_000)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("remote") / "small.gguf", n_vocab=64)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):   # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append(self.headers.get("Range"))
        if srv.mode == "404" or self.path != "/model.gguf":
            self.send_error(404, "Not Found")
            return
        if srv.mode == "stall":    # hold the answer well past the client's timeout
            srv.release.wait(10)
            return
        data = srv.payload
        if srv.mode == "no-range-small":   # http.server's own behaviour: 200, whole file
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self._send(data)
            return
        if srv.mode == "ignore-range":
            # the whole file, and then some: a client that reads it would hang here
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
            self._send(data)
            zeros = bytes(1 << 16)
            for _ in range(((1 << 30) - len(data)) >> 16):
                if not self._send(zeros):
                    return
            return
        start, end = self.headers["Range"].removeprefix("bytes=").split("-")
        start, end = int(start), min(int(end), len(data) - 1)
        body = data[start:end + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.mode == "trickle":  # headers and a few bytes, then nothing
            self._send(body[:100])
            srv.release.wait(10)
            return
        self._send(body)

    def _send(self, body: bytes) -> bool:
        view = memoryview(body)
        try:
            for i in range(0, len(view), 1 << 16):
                # count before writing: the client may finish before write() returns here
                self.server.served += min(1 << 16, len(view) - i)
                self.wfile.write(view[i:i + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            return False   # the client hung up: what it should do when a 200 brings the whole file
        return True


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.mode, srv.payload, srv.served, srv.requests = "range", b"", 0, []
    srv.release = threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/model.gguf"
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def same_profile(remote, local, url):
    assert remote == dataclasses.replace(local, path=url)
    assert remote.metadata == local.metadata   # excluded from == on purpose; check it here


def test_remote_equals_local_and_reads_only_the_header(server, big):
    server.payload = big.read_bytes()
    local = read_local_profile(big)
    remote = read_remote_profile(server.url)
    same_profile(remote, local, server.url)
    assert remote.file_bytes == len(server.payload) and remote.n_vocab == 100_000
    header = local.file_bytes - local.weights_bytes   # data padding aside
    assert header > 2 * MiB   # the test needs a header past the first 1 MiB fetch
    # 1 MiB, then to where the token array ends by the strings read so far (+ 1/8, + 4 KiB)
    assert server.served <= max(2 * header, MiB) and server.served < len(server.payload)
    assert server.requests == ["bytes=0-1048575", "bytes=1048576-2235982"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> Path:
    """100k tokens (2.1 MiB), then 400 KB of scores and 400 KB of token types, then tensor infos."""
    return write_gguf(tmp_path_factory.mktemp("remote") / "scored.gguf", n_vocab=100_000, scores=True)


def test_skipped_arrays_are_not_fetched(server, scored):
    server.payload = scored.read_bytes()
    local = read_local_profile(scored)
    same_profile(read_remote_profile(server.url), local, server.url)
    header = local.file_bytes - local.weights_bytes
    skipped = 100_000 * 4 * 2   # scores and token types
    # 1 MiB; the rest of the tokens (+ 1/8 + 4 KiB); past the scores, 64 KiB for the next KV pair;
    # past the token types, 64 KiB for the tensor infos. Never the 800 KB in between.
    assert server.requests == ["bytes=0-1048575", "bytes=1048576-2235982",
                               "bytes=2500437-2565972", "bytes=2900486-2966021"]
    assert header - skipped < server.served < header - skipped + 2 * 65536 + 140_000


def test_small_file_in_one_request(server, small):
    server.payload = small.read_bytes()
    remote = read_remote_profile(server.url)
    same_profile(remote, read_local_profile(small), server.url)
    assert len(server.requests) == 1 and server.served == len(server.payload)


def test_gpulab_read_profile_dispatches_urls(server, small):
    server.payload = small.read_bytes()
    assert gpulab.read_profile(server.url, timeout_s=5).path == server.url


def test_header_over_max_bytes(server, big):
    server.payload = big.read_bytes()
    with pytest.raises(RemoteModelError, match="larger than max_bytes=524288"):
        read_remote_profile(server.url, max_bytes=512 * 1024)
    assert server.served <= 512 * 1024


def test_server_ignoring_range(server, small):
    server.mode, server.payload = "ignore-range", small.read_bytes()
    start = time.monotonic()
    with pytest.raises(RemoteModelError, match="does not support range requests"):
        read_remote_profile(server.url, timeout_s=10)
    assert time.monotonic() - start < 5   # it hung up instead of reading 1 GiB
    time.sleep(0.2)
    assert server.served < 64 * MiB


def test_server_without_range_support_and_a_small_file(server, small):
    # the 200 body is the whole file and announced to fit max_bytes: take it
    server.mode, server.payload = "no-range-small", small.read_bytes()
    same_profile(read_remote_profile(server.url), read_local_profile(small), server.url)
    with pytest.raises(RemoteModelError, match="does not support range requests"):
        read_remote_profile(server.url, max_bytes=len(server.payload) - 1)


def test_404(server):
    server.mode = "404"
    with pytest.raises(RemoteModelError, match="HTTP 404"):
        read_remote_profile(server.url)


def test_closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteModelError, match="cannot connect"):
        read_remote_profile(f"http://127.0.0.1:{port}/model.gguf", timeout_s=5)


@pytest.mark.parametrize("mode", ["stall", "trickle"])
def test_stalling_server_times_out(server, small, mode):
    server.mode, server.payload = mode, small.read_bytes()
    start = time.monotonic()
    with pytest.raises(RemoteModelError, match="timed out after 0.5 s"):
        read_remote_profile(server.url, timeout_s=0.5)
    assert time.monotonic() - start < 3


def test_not_a_gguf_over_http(server):
    server.payload = b"<html>hello</html>" * 10
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        read_remote_profile(server.url)


def test_truncated_remote_file(server, small):
    server.payload = small.read_bytes()[:-1000]
    with pytest.raises(ModelFormatError, match="truncated"):
        read_remote_profile(server.url)


def test_not_http():
    with pytest.raises(RemoteModelError, match="not an http"):
        read_remote_profile("ftp://example.com/m.gguf")


# --- an injected transport (no sockets) ---------------------------------------------------------

class FakeResponse(io.BytesIO):
    def __init__(self, status: int, body: bytes, headers: dict):
        super().__init__(body)
        self.status = status
        self.headers = Message()
        for k, v in headers.items():
            self.headers[k] = v

    def getcode(self):
        return self.status


class FakeOpener:
    """urllib's OpenerDirector.open(request, timeout=) over bytes in memory."""

    def __init__(self, data: bytes, content_range=None, error=None):
        self.data, self.content_range, self.error, self.calls = data, content_range, error, []

    def open(self, req, timeout=None):
        self.calls.append((req.get_header("Range"), timeout))
        if self.error is not None:
            raise self.error
        start, end = (int(x) for x in req.get_header("Range").removeprefix("bytes=").split("-"))
        end = min(end, len(self.data) - 1)
        cr = self.content_range or f"bytes {start}-{end}/{len(self.data)}"
        return FakeResponse(206, self.data[start:end + 1], {"Content-Range": cr})


def test_fake_opener(small):
    opener = FakeOpener(small.read_bytes())
    remote = read_remote_profile("https://models.example/m.gguf", opener=opener, timeout_s=7)
    same_profile(remote, read_local_profile(small), "https://models.example/m.gguf")
    assert opener.calls[0][0] == "bytes=0-1048575" and 0 < opener.calls[0][1] <= 7


@pytest.mark.parametrize("content_range,match", [
    ("bytes 0-99/*", "does not say how large"),
    ("bytes 5-99/1000", "sent bytes 5-99/1000"),
    ("pages 0-1/2", "Content-Range"),
])
def test_bad_content_range(small, content_range, match):
    with pytest.raises(RemoteModelError, match=match):
        read_remote_profile("https://models.example/m.gguf",
                            opener=FakeOpener(small.read_bytes(), content_range=content_range))


@pytest.mark.parametrize("error,match", [
    (urllib.error.URLError(socket.gaierror(-2, "Name or service not known")), "cannot connect"),
    (urllib.error.URLError(TimeoutError("timed out")), "timed out"),
    (TimeoutError("timed out"), "timed out"),
    (urllib.error.HTTPError("https://x", 416, "Range Not Satisfiable", Message(), None), "HTTP 416"),
])
def test_transport_errors(error, match):
    with pytest.raises(RemoteModelError, match=match):
        read_remote_profile("https://models.example/m.gguf", opener=FakeOpener(b"", error=error))


# --- the remote path behaves exactly as the local one, on broken files too -----------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "f.gguf"


def outcome(fn, where: str):
    try:
        return fn()
    except ModelFormatError as e:
        return ("error", str(e).replace(where, "<src>"))


@settings(max_examples=200, deadline=2000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 10**6),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=3))
def test_fuzz_remote_equals_local(small, scratch, cut, flips):
    data = bytearray(small.read_bytes())
    for pos, xor in flips:
        data[pos % 2048] ^= xor   # the header of `small` lies within its first 2 KiB
    data = bytes(data[:len(data) - cut % 64 if cut % 3 else len(data)])
    scratch.write_bytes(data)
    url = "https://models.example/f.gguf"
    local = outcome(lambda: read_local_profile(scratch), str(scratch))
    remote = outcome(lambda: read_remote_profile(url, opener=FakeOpener(data)), url)
    if isinstance(local, tuple):
        assert remote == local
    else:
        same_profile(remote, local, url)
