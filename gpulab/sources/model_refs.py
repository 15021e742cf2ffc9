"""The GGUF file behind a fleet's model reference: a path, a URL, an Ollama name, or an entry of
llama.cpp's model cache (gpulab.core.fleet.model.ModelRef says which).

Ollama (`ollama:qwen3:30b`), as Ollama's source has it (github.com/ollama/ollama at fb307609,
2026-08-21): the store is $OLLAMA_MODELS, else ~/.ollama/models (envconfig/config.go Models);
a name is [HOST/][NAMESPACE/]MODEL[:TAG], the tag being what follows the last ':' when that
comes after the last '/', with HOST registry.ollama.ai, NAMESPACE library and TAG latest when
left out (types/model/name.go ParseNameBare, DefaultName); its manifest is
manifests/HOST/NAMESPACE/MODEL/TAG (Name.Filepath, manifest/paths.go PathForName), a JSON
document whose `layers` list one entry of mediaType application/vnd.ollama.image.model (the
GGUF: server/model.go), stored as blobs/<digest, ':' replaced by '-'> (manifest/paths.go
BlobsPath, which accepts only sha256[:-]<64 hex>). The tests lay out a store of that shape.

llama.cpp's cache (`hf:user/repo:Q4_K_M`, what `llama-server -hf user/repo:Q4_K_M` downloads).
The vendored llama.cpp keeps Hugging Face's hub layout (common/hf-cache.cpp): the folder is
$LLAMA_CACHE, else $HF_HUB_CACHE, $HUGGINGFACE_HUB_CACHE, $HF_HOME/hub,
$XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub (get_cache_directory); a repo is
models--USER--REPO, its commit in refs/main (else the first ref, get_cached_ref), its files
under snapshots/COMMIT/; the tag of a file is the last [-.]WORD of its name before .gguf and
before -0000i-of-0000n (get_gguf_split_info in common/download.cpp), the first shard being the
one to load (common_list_cached_models).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..core.errors import ConfigError
from ..core.fleet.model import ModelRef, parse_model_ref

__all__ = ["resolve_model", "ollama_store", "ollama_blob", "llama_cache_dir", "llama_cache_file"]

OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
_OLLAMA_HOST = "registry.ollama.ai"
_OLLAMA_NAMESPACE = "library"


def ollama_store(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env["OLLAMA_MODELS"]) if env.get("OLLAMA_MODELS") else Path.home() / ".ollama" / "models"


def ollama_blob(name: str, tag: str = "latest", env: Mapping[str, str] | None = None) -> Path:
    """The GGUF blob of an Ollama model, by its manifest; ConfigError saying what is missing."""
    store = ollama_store(env)
    parts = name.split("/")
    if len(parts) > 3:
        raise ConfigError(f"Ollama name {name!r} has more than HOST/NAMESPACE/MODEL")
    parts = [_OLLAMA_HOST, _OLLAMA_NAMESPACE][: 3 - len(parts)] + parts
    manifest = store.joinpath("manifests", *parts, tag)
    if not manifest.is_file():
        raise ConfigError(f"ollama:{name}:{tag}: no manifest at {manifest} (is it pulled? `ollama pull {name}:{tag}`; "
                          "the store is $OLLAMA_MODELS, else ~/.ollama/models)")
    try:
        doc = json.loads(manifest.read_text())
        layers = doc["layers"]
        digests = [layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"ollama:{name}:{tag}: cannot read the manifest {manifest}: {e}") from None
    if len(digests) != 1:
        raise ConfigError(f"ollama:{name}:{tag}: the manifest {manifest} lists {len(digests)} layers of type "
                          f"{OLLAMA_MODEL_MEDIA_TYPE}, expected one")
    if not re.fullmatch(r"sha256[:-][0-9a-fA-F]{64}", digests[0]):   # BlobsPath's check
        raise ConfigError(f"ollama:{name}:{tag}: bad model digest {digests[0]!r} in {manifest}")
    blob = store / "blobs" / digests[0].replace(":", "-")
    if not blob.is_file():
        raise ConfigError(f"ollama:{name}:{tag}: the model blob {blob} named by its manifest is missing")
    return blob


def llama_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """common/hf-cache.cpp get_cache_directory: the first variable set, else ~/.cache/huggingface/hub."""
    env = os.environ if env is None else env
    for var, sub in (("LLAMA_CACHE", ()), ("HF_HUB_CACHE", ()), ("HUGGINGFACE_HUB_CACHE", ()), ("HF_HOME", ("hub",)),
                     ("XDG_CACHE_HOME", ("huggingface", "hub"))):
        if env.get(var):
            return Path(env[var]).joinpath(*sub)
    return Path.home() / ".cache" / "huggingface" / "hub"


_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.I)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.I)
_COMPANIONS = ("mmproj", "mtp-", "eagle3-", "dflash-", "dspark-")


def _split_info(rel: str) -> tuple[str, int]:
    """get_gguf_split_info (common/download.cpp): (TAG upper-cased, shard index)."""
    prefix = rel[: -len(".gguf")]
    index = 1
    m = _SPLIT.match(prefix)
    if m:
        prefix, index = m.group(1), int(m.group(2))
    t = _TAG.search(prefix)
    return (t.group(1).upper() if t else ""), index


def llama_cache_file(repo: str, tag: str = "", env: Mapping[str, str] | None = None) -> Path:
    """The first shard of the cached GGUF of `repo` with quantization `tag` (common_list_cached_models)."""
    repo_dir = llama_cache_dir(env) / ("models--" + repo.replace("/", "--"))
    refs = repo_dir / "refs"
    commit = ""
    if refs.is_dir():
        named = sorted(p for p in refs.iterdir() if p.is_file())
        for p in sorted(named, key=lambda p: p.name != "main"):   # get_cached_ref: main, else the first
            text = p.read_text().strip()
            if text:
                commit = text
                break
    snap = repo_dir / "snapshots" / commit
    if not commit or not snap.is_dir():
        raise ConfigError(f"hf:{repo}: not in llama.cpp's cache at {repo_dir} (download it with "
                          f"`llama-server -hf {repo}`; the cache is $LLAMA_CACHE, else the Hugging Face hub cache)")
    found: dict[str, Path] = {}
    for f in sorted(snap.rglob("*.gguf")):
        rel = f.relative_to(snap).as_posix()
        if any(c in rel for c in _COMPANIONS):
            continue
        t, index = _split_info(rel)
        if index == 1 and t:
            found.setdefault(t, f)
    if tag:
        if tag not in found:
            raise ConfigError(f"hf:{repo}:{tag}: the cache holds {', '.join(sorted(found)) or 'no GGUF'} of {repo}")
        return found[tag]
    if len(found) != 1:
        raise ConfigError(f"hf:{repo}: give the tag, one of {', '.join(sorted(found)) or '(none cached)'}")
    return next(iter(found.values()))


def resolve_model(text: str | ModelRef, *, base: str | os.PathLike | None = None,
                  env: Mapping[str, str] | None = None) -> str:
    """The path (or URL) to read for a fleet's model reference. Relative paths are relative to
    `base` (the fleet file's folder)."""
    ref = text if isinstance(text, ModelRef) else parse_model_ref(text)
    if ref.kind == "url":
        return ref.text
    if ref.kind == "ollama":
        return str(ollama_blob(ref.name, ref.tag, env))
    if ref.kind == "hf":
        return str(llama_cache_file(ref.name, ref.tag, env))
    p = Path(ref.text).expanduser()
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    if not p.is_file():
        raise ConfigError(f"model {ref.text!r}: no such file ({p})")
    return str(p)
