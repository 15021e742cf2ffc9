"""The two real models the suite and the notebooks use are found where set-up puts them."""

from __future__ import annotations

import hashlib

import gpulab


def test_gemma3_is_joined_to_the_published_file(gemma3):
    h = hashlib.sha256()
    with open(gemma3, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_gemma3_header_reads_as_gemma3_with_a_sliding_window(gemma3):
    p = gpulab.read_profile(gemma3)
    assert p.arch == "gemma3" and p.n_layer == 18
    assert p.n_vocab == 262144
