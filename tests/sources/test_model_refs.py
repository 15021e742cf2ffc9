"""Model references resolved against stores the tests lay out themselves: Ollama's (manifests and
blobs) and llama.cpp's cache (the Hugging Face hub layout of common/hf-cache.cpp)."""

from __future__ import annotations

import hashlib
import json

import pytest

from gpulab.core.errors import ConfigError
from gpulab.sources.model_refs import llama_cache_dir, resolve_model


def _ollama_store(root, name_parts, tag, payload=b"GGUF fake"):
    """An Ollama store with one model: manifests/<host>/<ns>/<model>/<tag> -> blobs/sha256-<hex>."""
    digest = hashlib.sha256(payload).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    blob = root / "blobs" / f"sha256-{digest}"
    blob.write_bytes(payload)
    other = hashlib.sha256(b"template").hexdigest()
    (root / "blobs" / f"sha256-{other}").write_text("{{ .Prompt }}")
    manifest = root.joinpath("manifests", *name_parts, tag)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64,
                   "size": 10},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{other}", "size": 13},
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(payload)},
        ]}))
    return blob


def test_ollama_library_name_resolves_to_its_blob(tmp_path):
    store = tmp_path / "ollama"
    blob = _ollama_store(store, ["registry.ollama.ai", "library", "qwen3"], "30b")
    env = {"OLLAMA_MODELS": str(store)}
    assert resolve_model("ollama:qwen3:30b", env=env) == str(blob)


def test_ollama_namespaced_name_and_default_tag(tmp_path):
    store = tmp_path / "ollama"
    blob = _ollama_store(store, ["registry.ollama.ai", "someone", "coder"], "latest")
    assert resolve_model("ollama:someone/coder", env={"OLLAMA_MODELS": str(store)}) == str(blob)


def test_ollama_default_store_is_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    blob = _ollama_store(tmp_path / ".ollama" / "models", ["registry.ollama.ai", "library", "m"], "latest")
    assert resolve_model("ollama:m", env={}) == str(blob)


def test_ollama_missing_pieces_say_what(tmp_path):
    store = tmp_path / "ollama"
    env = {"OLLAMA_MODELS": str(store)}
    with pytest.raises(ConfigError, match="no manifest at .*qwen3/30b.*ollama pull qwen3:30b"):
        resolve_model("ollama:qwen3:30b", env=env)
    blob = _ollama_store(store, ["registry.ollama.ai", "library", "qwen3"], "30b")
    blob.unlink()
    with pytest.raises(ConfigError, match="model blob .* is missing"):
        resolve_model("ollama:qwen3:30b", env=env)


def _hf_cache(root, repo, files, commit="a" * 40, ref="main"):
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / ref).write_text(commit + "\n")
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    out = {}
    for f in files:
        (snap / f).parent.mkdir(parents=True, exist_ok=True)
        (snap / f).write_bytes(b"GGUF")
        out[f] = snap / f
    return out


def test_llama_cache_entry_by_tag(tmp_path):
    files = _hf_cache(tmp_path, "org/Model-GGUF", ["Model-Q4_K_M.gguf", "Model-Q8_0.gguf", "mmproj-Model-F16.gguf",
                                                  "big/Model-F16-00001-of-00002.gguf",
                                                  "big/Model-F16-00002-of-00002.gguf"])
    env = {"LLAMA_CACHE": str(tmp_path)}
    assert resolve_model("hf:org/Model-GGUF:Q8_0", env=env) == str(files["Model-Q8_0.gguf"])
    assert resolve_model("hf:org/Model-GGUF:q4_k_m", env=env) == str(files["Model-Q4_K_M.gguf"])
    # a split model: its first shard, as llama.cpp loads it
    assert resolve_model("hf:org/Model-GGUF:F16", env=env) == str(files["big/Model-F16-00001-of-00002.gguf"])
    with pytest.raises(ConfigError, match="give the tag, one of F16, Q4_K_M, Q8_0"):
        resolve_model("hf:org/Model-GGUF", env=env)
    with pytest.raises(ConfigError, match="the cache holds F16, Q4_K_M, Q8_0"):
        resolve_model("hf:org/Model-GGUF:Q2_K", env=env)
    with pytest.raises(ConfigError, match="not in llama.cpp's cache"):
        resolve_model("hf:org/Other:Q8_0", env=env)


def test_llama_cache_folder_follows_get_cache_directory(tmp_path):
    assert llama_cache_dir({"LLAMA_CACHE": "/a", "HF_HOME": "/b"}) == type(tmp_path)("/a")
    assert llama_cache_dir({"HF_HOME": "/b"}) == type(tmp_path)("/b/hub")
    assert llama_cache_dir({"XDG_CACHE_HOME": "/c"}) == type(tmp_path)("/c/huggingface/hub")


def test_paths_are_relative_to_the_fleet_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model("m.gguf", base=tmp_path) == str(tmp_path / "m.gguf")
    with pytest.raises(ConfigError, match="no such file"):
        resolve_model("nope.gguf", base=tmp_path)
    assert resolve_model("https://h/m.gguf") == "https://h/m.gguf"


def test_ollama_name_with_a_host(tmp_path):
    store = tmp_path / "ollama"
    blob = _ollama_store(store, ["localhost:5000", "team", "model"], "latest")
    assert resolve_model("ollama:localhost:5000/team/model", env={"OLLAMA_MODELS": str(store)}) == str(blob)
