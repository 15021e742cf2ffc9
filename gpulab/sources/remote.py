"""Read a ModelProfile from a GGUF at an http(s) URL by fetching only its header.

HTTP Range requests fetch the header (1 MiB, then doubling) until the header walker of
`gguf_header` gets through the KV pairs and tensor infos; the total size comes from
Content-Range. The bytes the walker skips (a tokenizer's scores and token types) are not
fetched: the walker says where it goes on (Truncated.start), and the buffer keeps zeros there,
which it never reads. Inside a string array the next request ends where the walker guesses the
array ends (Truncated.hint); after a skip the doubling starts again from _AFTER_SKIP. The
walker is the same one the local reader uses, so both give the same profile.
Standard library only: `opener` is anything with urllib's `OpenerDirector.open(request,
timeout=...)`, which lets tests inject a fake transport.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request

from ..core.errors import ModelFormatError, RemoteModelError
from ..core.profile import ModelProfile
from .gguf_arch import build_profile
from .gguf_header import Truncated, parse_header

__all__ = ["read_remote_profile"]

_FIRST_FETCH = 1 << 20
_AFTER_SKIP = 1 << 16    # after a skipped array: the next KV pair, or tensor infos (~100 bytes each)
_READ_CHUNK = 1 << 16
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def read_remote_profile(url: str, *, max_bytes: int = 64 * 1024**2, timeout_s: float = 30.0,
                        opener=None) -> ModelProfile:
    """The ModelProfile of the GGUF at `url`, reading at most `max_bytes` of it within `timeout_s`.

    Raises RemoteModelError (unreachable, HTTP error, no range support, header over max_bytes,
    timeout) or ModelFormatError (what was fetched is not a valid GGUF header)."""
    if not url.startswith(("http://", "https://")):
        raise RemoteModelError(f"{url}: not an http(s) URL")
    if max_bytes < 1 or timeout_s <= 0:
        raise RemoteModelError(f"{url}: max_bytes and timeout_s must be positive")
    fetch = _Fetcher(url, opener or urllib.request.build_opener(), time.monotonic() + timeout_s,
                     timeout_s, max_bytes)

    def fail(msg: str) -> ModelFormatError:
        return ModelFormatError(f"{url}: {msg}")

    buf = bytearray()   # bytes 0..len(buf) of the file, but for the holes the walker skipped
    total = None
    start, want = 0, min(_FIRST_FETCH, max_bytes)
    run = 0   # bytes fetched since the last hole
    while True:
        if start > len(buf):
            buf += bytes(start - len(buf))   # a hole: skipped by the walker, never read
        chunk, total = fetch(start, want - 1)   # inclusive range, clamped by the server
        buf[start:] = chunk
        run += len(chunk)
        try:
            header = parse_header(buf, len(buf), total, fail)
            return build_profile(header, url, total, fail)
        except Truncated as t:
            needed, hint = t.needed, t.hint
            hole = t.start > len(buf)
            start = max(t.start, len(buf))
        if needed > max_bytes:
            raise RemoteModelError(f"{url}: the GGUF header is larger than max_bytes={max_bytes} "
                                   f"(at least {needed} bytes); raise max_bytes to read it")
        if hole:
            run = 0
        # Doubling what was fetched keeps the number of round trips logarithmic in the header size.
        guess = hint or start + max(run, _AFTER_SKIP)
        want = min(max(needed, guess), max_bytes, total)


class _Fetcher:
    """One Range request per call, all within one deadline."""

    def __init__(self, url: str, opener, deadline: float, timeout_s: float, max_bytes: int):
        self.url, self.opener, self.deadline, self.timeout_s = url, opener, deadline, timeout_s
        self.max_bytes = max_bytes

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RemoteModelError(f"{self.url}: timed out after {self.timeout_s:g} s")
        return left

    def __call__(self, start: int, end: int) -> tuple[bytes, int]:
        req = urllib.request.Request(self.url, headers={
            "Range": f"bytes={start}-{end}", "Accept-Encoding": "identity",
            "User-Agent": "gpulab (GGUF header reader)"})
        try:
            resp = self.opener.open(req, timeout=self._left())
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416:
                raise RemoteModelError(f"{self.url}: HTTP 416, the file is shorter than "
                                       f"{start + 1} bytes") from None
            raise RemoteModelError(f"{self.url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise RemoteModelError(f"{self.url}: timed out after {self.timeout_s:g} s") from None
            raise RemoteModelError(f"{self.url}: cannot connect ({e.reason})") from None
        except TimeoutError:
            raise RemoteModelError(f"{self.url}: timed out after {self.timeout_s:g} s") from None
        except (OSError, ValueError) as e:   # http.client errors, bad URLs
            raise RemoteModelError(f"{self.url}: request failed ({e})") from None
        with resp:
            return self._read(resp, start, end)

    def _read(self, resp, start: int, end: int) -> tuple[bytes, int]:
        status = getattr(resp, "status", None) or resp.getcode()
        if status == 200 and start == 0:
            # No range support: the body is the whole file. Take it only when it is announced
            # to fit max_bytes; otherwise close it unread rather than download gigabytes.
            length = (resp.headers.get("Content-Length") or "").strip()
            if length.isdigit() and int(length) <= self.max_bytes:
                return self._read_body(resp, int(length)), int(length)
            raise RemoteModelError(f"{self.url}: the server does not support range requests "
                                   f"(HTTP 200 with the whole file, {length or 'unknown'} bytes, "
                                   f"over max_bytes={self.max_bytes})")
        if status != 206:
            raise RemoteModelError(f"{self.url}: HTTP {status} to a range request (expected 206)")
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", "") or "")
        if not m:
            raise RemoteModelError(f"{self.url}: bad or missing Content-Range in a 206 answer")
        first, last, total = int(m[1]), int(m[2]), m[3]
        if total == "*":
            raise RemoteModelError(f"{self.url}: the server does not say how large the file is")
        total = int(total)
        if first != start or last < first or last >= total or last > end:
            raise RemoteModelError(f"{self.url}: the server sent bytes {first}-{last}/{total} "
                                   f"for a request of {start}-{end}")
        return self._read_body(resp, last - first + 1), total

    def _read_body(self, resp, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            self._set_socket_timeout(resp)
            try:
                chunk = resp.read(min(_READ_CHUNK, length - len(out)))
            except TimeoutError:
                raise RemoteModelError(f"{self.url}: timed out after {self.timeout_s:g} s") from None
            except OSError as e:
                raise RemoteModelError(f"{self.url}: connection failed ({e})") from None
            if not chunk:
                raise RemoteModelError(f"{self.url}: the server closed the connection after "
                                       f"{len(out)} of {length} bytes")
            out += chunk
        return bytes(out)

    def _set_socket_timeout(self, resp) -> None:
        # urllib applies its timeout to each socket operation, not to the whole transfer; shrink
        # it before every read so a server that trickles bytes cannot outlast the deadline.
        # (http.client keeps the socket at resp.fp.raw._sock; fakes simply lack it.)
        left = self._left()
        sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
        if sock is not None:
            try:
                sock.settimeout(left)
            except OSError:
                pass
