"""JSON shapes gpulab prints (`inspect --json`); `plan --json` is Plan.to_dict()."""

from __future__ import annotations

from .profile import ModelProfile, TensorInfo

__all__ = ["profile_to_dict"]


def _tensor(t: TensorInfo) -> dict:
    return {"name": t.name, "type": t.ggml_type, "shape": list(t.shape), "n_bytes": t.n_bytes}


def profile_to_dict(p: ModelProfile) -> dict:
    return {
        "path": p.path, "arch": p.arch, "name": p.name, "file_type": p.file_type, "size_bytes": p.file_bytes,
        "n_layer": p.n_layer, "n_embd": p.n_embd, "n_ff": p.n_ff, "n_vocab": p.n_vocab,
        "n_ctx_train": p.n_ctx_train, "n_expert": p.n_expert, "n_expert_used": p.n_expert_used,
        "n_swa": p.n_swa, "tied_output": p.tied_output,
        "input_tensors": [_tensor(t) for t in p.input_tensors],
        "output_tensors": [_tensor(t) for t in p.output_tensors],
        "layers": [{
            "index": layer.index, "weights_bytes": layer.weights_bytes, "expert_bytes": layer.expert_bytes,
            "n_head": layer.n_head, "n_head_kv": layer.n_head_kv, "n_embd_head_k": layer.n_embd_head_k,
            "n_embd_head_v": layer.n_embd_head_v, "is_swa": layer.is_swa, "has_kv": layer.has_kv,
            "tensors": [_tensor(t) for t in layer.tensors],
        } for layer in p.layers],
    }
