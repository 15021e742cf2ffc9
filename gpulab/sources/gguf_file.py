"""Read a ModelProfile from a local GGUF file: the header only, never the weights. (gpulab.sources.read.
read_profile takes a path or a URL and comes here for paths.)

The header is walked over a read-only memory map (gguf_header: bounded, as llama.cpp's
gguf_init_from_reader checks it) and turned into a profile by llama.cpp's rules (gguf_arch).
"""

from __future__ import annotations

import mmap
import os
import stat

from ..core.errors import ModelFormatError
from ..core.profile import ModelProfile
from .gguf_arch import build_profile
from .gguf_header import Truncated, parse_header

__all__ = ["read_local_profile"]


def read_local_profile(path: str | os.PathLike) -> ModelProfile:
    """The ModelProfile of a local GGUF, read from its header (the weights are never read).

    Raises ModelFormatError, one line naming the file, for a missing or unreadable file and for
    anything llama.cpp would refuse (wrong magic, truncation, absurd counts, unknown types)."""
    src = os.fspath(path)

    def fail(msg: str) -> ModelFormatError:
        return ModelFormatError(f"{src}: {msg}")

    try:
        st = os.stat(src)
    except OSError as e:
        raise fail(f"cannot read the file ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):   # a FIFO or device would block or never end
        raise fail("not a regular file")
    if st.st_size == 0:
        raise fail("empty file, not a GGUF")
    try:
        with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            size = len(mm)
            try:
                header = parse_header(mm, size, size, fail)
            except Truncated as t:   # unreachable with the whole file at hand; kept as a guard
                raise fail(f"truncated: the header needs {t.needed} bytes, the file has {size}") from None
    except OSError as e:
        raise fail(f"cannot read the file ({e.strerror or e})") from None
    return build_profile(header, src, size, fail)
