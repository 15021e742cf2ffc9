"""Which model of a fleet a process serves, from its command line: how the monitor attributes a
GPU's per-process memory (NVML) to the models of a fleet.

- a llama-server started by the router: `--alias NAME` (server-models.cpp update_args sets
  LLAMA_ARG_ALIAS to the preset's name), and any llama-server given --alias;
- any llama-server (llama-swap's cmd, a hand-started one): `-m PATH` / `--model PATH`;
- Ollama's runner process: `ollama runner --model PATH`, or, in the Ollama of 2026-08
  (llm/llama_server.go), the llama-server it starts with `--model PATH` (the model's blob).
A path matches a fleet model when both name the same file after normalisation (the caller
passes resolved paths: gpulab.sources.model_refs.resolve_model).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

__all__ = ["model_of_process", "memory_by_model"]

_ALIAS = ("-a", "--alias")
_MODEL = ("-m", "--model")


def _norm(path: str) -> str:
    return os.path.normpath(path)


def model_of_process(argv: Sequence[str], models: Mapping[str, str]) -> str | None:
    """The fleet model (name) the process with this argv serves, or None. models: name -> path."""
    args: list[str] = []
    for t in argv:
        args += t.split("=", 1) if t.startswith("--") and "=" in t else [t]
    by_path = {_norm(p): n for n, p in models.items()}
    for i, t in enumerate(args[:-1]):
        value = args[i + 1]
        if t in _ALIAS and value.split(",")[0] in models:
            return value.split(",")[0]
        if t in _MODEL and _norm(value) in by_path:
            return by_path[_norm(value)]
    return None


def memory_by_model(processes: Sequence[tuple[Sequence[str], int | None]], models: Mapping[str, str]) -> dict:
    """{model or None: bytes} over (argv, used bytes) of the processes on one device."""
    out: dict = {}
    for argv, used in processes:
        name = model_of_process(argv, models)
        out[name] = out.get(name, 0) + (used or 0)
    return out
