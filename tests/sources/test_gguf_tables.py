"""gguf_tables against the installed gguf-py: the written-out tables cannot drift from it."""

from __future__ import annotations

import pytest

from gpulab.sources import gguf_tables as T

gguf = pytest.importorskip("gguf")


def test_value_types_are_gguf_pys():
    assert T.VALUE_TYPE_NAMES == {int(t): t.name for t in gguf.GGUFValueType}
    assert (T.STRING, T.ARRAY, T.BOOL, T.UINT32) == (8, 9, 7, 4)
    assert T.DEFAULT_ALIGNMENT == gguf.GGUF_DEFAULT_ALIGNMENT


def test_ggml_types_cover_gguf_pys():
    theirs = {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType
              if t in gguf.GGML_QUANT_SIZES}
    assert {k: T.GGML_TYPES[k] for k in theirs} == theirs
    assert T.GGML_TYPES[42] == ("Q2_0", 64, 18)   # the vendored ggml's, ahead of gguf-py


def test_file_type_names_cover_gguf_pys():
    theirs = {int(t): t.name for t in gguf.LlamaFileType}
    assert {k: T.FILE_TYPE_NAMES[k] for k in theirs} == theirs
