"""A model's title for people: its authors' spelling, not gguf-py's slug of a repository id."""

from __future__ import annotations

from dataclasses import replace

import pytest

from builders import make_profile


@pytest.mark.parametrize("name, path, file_type, title", [
    # gguf-py's Metadata.id_to_title slugs: the file name and quant instead
    ("Smollm2 135M 8k Lc100K Mix1 Ep2", "/m/SmolLM2-135M-Instruct.Q4_1.gguf", "MOSTLY_Q4_1",
     "SmolLM2-135M-Instruct Q4_1"),
    ("Gemma 3 270m", "/c/gemma-3-270m-q4_k_m.gguf", "MOSTLY_Q4_K_M", "gemma-3-270m Q4_K_M"),
    ("", "https://h/x/Qwen3-8B-Q8_0.gguf?download=true", "MOSTLY_Q8_0", "Qwen3-8B Q8_0"),
    ("Gemma 3 270m", "/c/model.gguf", "", "model"),
    # the authors' own casing stays
    ("SmolLM2 135M", "/m/a.gguf", "MOSTLY_Q4_1", "SmolLM2 135M"),
    ("Qwen3-30B-A3B", "/m/a.gguf", "MOSTLY_Q4_K_M", "Qwen3-30B-A3B"),
])
def test_title(name, path, file_type, title):
    assert replace(make_profile(n_layer=2), name=name, path=path, file_type=file_type).title == title


def test_the_demo_models_are_titled_as_their_files(smollm2, gemma3):
    from gpulab.sources.read import read_profile
    assert read_profile(str(smollm2)).title == "SmolLM2-135M-Instruct Q4_1"
    assert read_profile(str(gemma3)).title == "gemma-3-270m Q4_K_M"
