"""Hand-built objects for unit tests (importable as `builders`: tests/ is on pythonpath)."""

from __future__ import annotations

from gpulab.core.profile import LayerProfile, ModelProfile, TensorInfo
from gpulab.sources.synth import moe_profile as make_moe_profile  # noqa: F401 (a MoE shaped like a real one)

MiB = 1024**2


def _laid_out(tensors):
    """The tensors with file offsets, one after the other (the host's mapped span needs them)."""
    from dataclasses import replace
    out, at = [], 1 << 20
    for t in tensors:
        out.append(replace(t, offset=at))
        at += t.n_bytes
    return out


def make_profile(n_layer: int = 30, layer_bytes: int = 60 * MiB, n_head: int = 32, n_head_kv: int = 8,
                 head_dim: int = 128, embd_bytes: int = 300 * MiB, out_bytes: int = 400 * MiB,
                 tied: bool = False, swa_layers: tuple[int, ...] = (), n_swa: int = 0,
                 n_vocab: int = 128256, n_embd: int = 4096) -> ModelProfile:
    """A hand-built profile for planner rules; its shape, not its file, matters."""
    layers = tuple(
        LayerProfile(index=i, tensors=(TensorInfo(f"blk.{i}.ffn_down.weight", "Q4_0", (n_embd, n_embd), layer_bytes),),
                     n_head=n_head, n_head_kv=n_head_kv, n_embd_head_k=head_dim, n_embd_head_v=head_dim,
                     is_swa=i in swa_layers)
        for i in range(n_layer))
    out = (TensorInfo("output_norm.weight", "F32", (n_embd,), 4 * n_embd),)
    if not tied:
        out += (TensorInfo("output.weight", "Q6_K", (n_embd, n_vocab), out_bytes),)
    emb = (TensorInfo("token_embd.weight", "Q4_0", (n_embd, n_vocab), embd_bytes),)
    placed = iter(_laid_out([*emb, *(t for layer in layers for t in layer.tensors), *out]))
    emb = (next(placed),)
    from dataclasses import replace
    layers = tuple(replace(layer, tensors=tuple(next(placed) for _ in layer.tensors)) for layer in layers)
    out = tuple(next(placed) for _ in out)
    return ModelProfile(path="hand-built", arch="llama", name="hand-built", file_bytes=0, n_layer=n_layer,
                        n_embd=n_embd, n_ff=4 * n_embd, n_vocab=n_vocab, n_ctx_train=8192, layers=layers,
                        input_tensors=emb, output_tensors=out, tied_output=tied, n_swa=n_swa)


def make_hand_moe_profile(n_layer: int = 8, expert_bytes: int = 40 * MiB, dense_bytes: int = 4 * MiB, n_expert: int = 8,
                     n_embd: int = 1024, n_vocab: int = 32000) -> ModelProfile:
    """A small hand-built MoE (sizes in bytes, not shapes): each layer an attention matrix, the router and
    three expert stacks. For a MoE shaped like a real one, make_moe_profile (gpulab.sources.synth)."""
    from dataclasses import replace
    base = make_profile(n_layer=n_layer, layer_bytes=dense_bytes, n_embd=n_embd, n_vocab=n_vocab,
                        embd_bytes=20 * MiB, out_bytes=20 * MiB)
    layers = []
    for layer in base.layers:
        i = layer.index
        ts = (TensorInfo(f"blk.{i}.attn_q.weight", "Q8_0", (n_embd, n_embd), dense_bytes),
              TensorInfo(f"blk.{i}.ffn_gate_inp.weight", "F32", (n_embd, n_expert), 4 * n_embd * n_expert),
              *(TensorInfo(f"blk.{i}.ffn_{k}_exps.weight", "Q8_0", (n_embd, 512, n_expert), expert_bytes // 3)
                for k in ("gate", "up", "down")))
        layers.append(replace(layer, tensors=ts))
    return replace(base, layers=tuple(layers), n_expert=n_expert, n_expert_used=2)
_BYTES_PER_BLOCK = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_K": (256, 144)}


def _tensor(name: str, shape: tuple[int, ...], gtype: str) -> TensorInfo:
    block, size = _BYTES_PER_BLOCK[gtype]
    n = 1
    for d in shape:
        n *= d
    return TensorInfo(name, gtype, shape, n // block * size)


def make_llama_profile(n_layer: int = 4, n_embd: int = 512, n_ff: int = 1536, n_head: int = 8, n_head_kv: int = 2,
                       n_vocab: int = 4096, weight_type: str = "F16", n_expert: int = 0, n_ff_exp: int = 0,
                       tied: bool = False, arch: str = "llama", swa_layers: tuple[int, ...] = ()) -> ModelProfile:
    """Every tensor of a llama-shaped model (or a qwen3moe-shaped one with n_expert), with the
    names and shapes llama.cpp gives them: for rules that cut tensors (split mode tensor)."""
    hd = n_embd // n_head
    wt = weight_type
    layers = []
    for i in range(n_layer):
        b = f"blk.{i}."
        ts = [_tensor(b + "attn_norm.weight", (n_embd,), "F32"),
              _tensor(b + "attn_q.weight", (n_embd, n_head * hd), wt),
              _tensor(b + "attn_k.weight", (n_embd, n_head_kv * hd), wt),
              _tensor(b + "attn_v.weight", (n_embd, n_head_kv * hd), wt),
              _tensor(b + "attn_output.weight", (n_head * hd, n_embd), wt),
              _tensor(b + "ffn_norm.weight", (n_embd,), "F32")]
        if n_expert:
            ts += [_tensor(b + "ffn_gate_inp.weight", (n_embd, n_expert), "F32"),
                   _tensor(b + "ffn_gate_exps.weight", (n_embd, n_ff_exp, n_expert), wt),
                   _tensor(b + "ffn_up_exps.weight", (n_embd, n_ff_exp, n_expert), wt),
                   _tensor(b + "ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert), wt)]
        else:
            ts += [_tensor(b + "ffn_gate.weight", (n_embd, n_ff), wt),
                   _tensor(b + "ffn_up.weight", (n_embd, n_ff), wt),
                   _tensor(b + "ffn_down.weight", (n_ff, n_embd), wt)]
        layers.append(LayerProfile(index=i, tensors=tuple(ts), n_head=n_head, n_head_kv=n_head_kv, n_embd_head_k=hd,
                                   n_embd_head_v=hd, is_swa=i in swa_layers))
    emb = (_tensor("token_embd.weight", (n_embd, n_vocab), wt),)
    out = (_tensor("output_norm.weight", (n_embd,), "F32"),)
    if not tied:
        out += (_tensor("output.weight", (n_embd, n_vocab), wt),)
    placed = iter(_laid_out([*emb, *(t for layer in layers for t in layer.tensors), *out]))
    from dataclasses import replace
    emb = (next(placed),)
    layers = [replace(layer, tensors=tuple(next(placed) for _ in layer.tensors)) for layer in layers]
    out = tuple(next(placed) for _ in out)
    return ModelProfile(path="hand-built", arch=arch, name=f"hand-built {arch}", file_bytes=0, n_layer=n_layer,
                        n_embd=n_embd, n_ff=n_ff, n_vocab=n_vocab, n_ctx_train=4096, layers=tuple(layers),
                        input_tensors=emb, output_tensors=out, tied_output=tied, n_expert=n_expert,
                        n_expert_used=2 if n_expert else 0, n_swa=256 if swa_layers else 0)


def close_to_llama(predicted: int, actual: int) -> bool:
    """The bar for weights and KV against llama.cpp's log (printed to 0.01 MiB): 1% or 1 MiB."""
    return abs(predicted - actual) <= max(0.01 * actual, 1 * MiB)
