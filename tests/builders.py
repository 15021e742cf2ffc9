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
