"""Cheap identity of a model file at any size: its size and its first and last MiB.

The first MiB holds the GGUF header (every tensor's name, type, shape and offset) for all but
huge vocabularies, the last MiB the end of the weights, so re-quantisations and fine-tunes of
the same shape differ; hashing a 40 GB file whole would take minutes. `model_fingerprint` is
the one identity results and saved allocations are both keyed by, so they can be joined.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["model_fingerprint"]

SAMPLE_BYTES = 1 << 20


def model_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity for a GGUF, 16 hex digits: sha256 of its size, first and (if distinct)
    last MiB (the header, which names every tensor, its type, shape and offset, and the end of
    the weights). Raises OSError when the file cannot be read."""
    size = os.stat(path).st_size
    h = hashlib.sha256(str(size).encode() + b":")
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]
