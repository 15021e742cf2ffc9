"""Processes attributed to fleet models by their command lines: llama-server from llama-swap or
the router, and Ollama's runner."""

from __future__ import annotations

from gpulab.core.fleet.processes import memory_by_model, model_of_process

MODELS = {"chat": "/srv/models/chat.gguf", "coder": "/home/u/.ollama/models/blobs/sha256-" + "a" * 64}


def test_llama_swap_cmd_by_model_path():
    argv = ["llama-server", "--port", "5800", "-m", "/srv/models/./chat.gguf", "--device", "CUDA0,CUDA1"]
    assert model_of_process(argv, MODELS) == "chat"
    assert model_of_process(["llama-server", "--model=/srv/models/chat.gguf"], MODELS) == "chat"


def test_router_child_by_alias():
    # server-models.cpp update_args: --host, --port, --alias NAME for each child
    argv = ["/usr/bin/llama-server", "--host", "127.0.0.1", "--port", "41234", "--alias", "coder", "-m", "/x.gguf"]
    assert model_of_process(argv, MODELS) == "coder"


def test_ollama_runner_by_blob():
    argv = ["/usr/bin/ollama", "runner", "--model", MODELS["coder"], "--port", "39111"]
    assert model_of_process(argv, MODELS) == "coder"


def test_unknown_processes_are_none_and_summed_apart():
    assert model_of_process(["python", "train.py", "-m", "/other.gguf"], MODELS) is None
    assert model_of_process([], MODELS) is None
    procs = [(["llama-server", "-m", MODELS["chat"]], 10), (["llama-server", "--alias", "chat"], 5),
             (["Xorg"], 3), (["ollama", "runner", "--model", MODELS["coder"]], None)]
    assert memory_by_model(procs, MODELS) == {"chat": 15, None: 3, "coder": 0}
