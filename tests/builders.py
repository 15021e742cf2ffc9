"""Hand-built objects for unit tests (importable as `builders`: tests/ is on pythonpath)."""

from __future__ import annotations

from gpulab.core.profile import LayerProfile, ModelProfile, TensorInfo

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


def make_moe_profile(n_layer: int = 48, n_embd: int = 2048, n_expert: int = 128, n_expert_used: int = 8,
                     n_ff_exp: int = 768, n_head: int = 32, n_head_kv: int = 4, head_dim: int = 128,
                     n_vocab: int = 151936, bits_per_weight: float = 4.5, name: str = "moe") -> ModelProfile:
    """A MoE profile shaped like a real one (defaults: Qwen3-30B-A3B at ~4.5 bits per weight):
    per layer attention, norms, a router and three expert stacks of n_expert experts each."""
    def t(name_: str, shape: tuple[int, ...], bpw: float = bits_per_weight) -> TensorInfo:
        n = 1
        for d in shape:
            n *= d
        return TensorInfo(name_, "Q4_K" if bpw < 16 else "F32", shape, int(n * bpw / 8))
    q, kv = n_head * head_dim, n_head_kv * head_dim
    layers = []
    for i in range(n_layer):
        b = f"blk.{i}."
        tensors = (t(b + "attn_norm.weight", (n_embd,), 32), t(b + "attn_q.weight", (n_embd, q)),
                   t(b + "attn_k.weight", (n_embd, kv)), t(b + "attn_v.weight", (n_embd, kv)),
                   t(b + "attn_output.weight", (q, n_embd)), t(b + "ffn_norm.weight", (n_embd,), 32),
                   t(b + "ffn_gate_inp.weight", (n_embd, n_expert), 32),
                   t(b + "ffn_gate_exps.weight", (n_embd, n_ff_exp, n_expert)),
                   t(b + "ffn_up_exps.weight", (n_embd, n_ff_exp, n_expert)),
                   t(b + "ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert)))
        layers.append(LayerProfile(index=i, tensors=tensors, n_head=n_head, n_head_kv=n_head_kv,
                                   n_embd_head_k=head_dim, n_embd_head_v=head_dim))
    emb = (t("token_embd.weight", (n_embd, n_vocab)),)
    out = (t("output_norm.weight", (n_embd,), 32), t("output.weight", (n_embd, n_vocab)))
    placed = iter(_laid_out([*emb, *(x for layer in layers for x in layer.tensors), *out]))
    from dataclasses import replace
    emb = (next(placed),)
    layers = tuple(replace(layer, tensors=tuple(next(placed) for _ in layer.tensors)) for layer in layers)
    out = tuple(next(placed) for _ in out)
    total = sum(x.n_bytes for x in emb + out) + sum(layer.weights_bytes for layer in layers)
    return ModelProfile(path="hand-built", arch="qwen3moe", name=name, file_bytes=total, n_layer=n_layer,
                        n_embd=n_embd, n_ff=n_ff_exp, n_vocab=n_vocab, n_ctx_train=40960, layers=layers,
                        input_tensors=emb, output_tensors=out, tied_output=False, n_expert=n_expert,
                        n_expert_used=n_expert_used)
