"""The KV cache's graph inputs and build_attn's ops for graphs replayed op by op (placement.hrm, placement.gemma4).

llm_graph_input_attn_kv (src/llama-graph.cpp build_attn_inp_kv*_impl): K and V row indices, the KQ mask (f16 with
flash attention), a quantized cache's Hadamard rotations; build_attn / build_attn_mha and llama_kv_cache's cpy_k,
cpy_v, get_k, get_v (src/llama-kv-cache.cpp). One KvInputs per cache (the sliding-window cache has its own).
"""

from __future__ import annotations

from ..config import SplitConfig
from .ggml_replay import Graph, Tensor
from .recurrent import _QUANT_FREE, _row  # a cache row's bytes by type: one table for every replay

__all__ = ["KvInputs", "attention"]


class KvInputs:
    """The inputs of one KV cache of `n_kv` cells per stream (created lazily: an input no op reads is not in the
    graph), for heads of `hd` values and V rows of `v_gqa` values."""

    def __init__(self, g: Graph, config: SplitConfig, T: int, n_kv: int, hd: int, v_gqa: int, fa: bool) -> None:
        self.config, self.n_kv, self.fa = config, n_kv, fa
        self.k_idxs = g.inp(8 * T)
        self.v_idxs = g.inp(8 * T * (1 if fa else v_gqa))
        self.mask = g.inp(n_kv * T * (2 if fa else 4))
        nrot = 64
        while hd % (nrot * 2) == 0:
            nrot *= 2
        self.k_rot = g.inp(4 * nrot * nrot) if config.type_k not in _QUANT_FREE and hd % 64 == 0 else None
        self.v_rot = g.inp(4 * 64 * 64) if config.type_v not in _QUANT_FREE and hd % 64 == 0 else None


def attention(g: Graph, kv: KvInputs, q: Tensor, k: Tensor, v: Tensor, *, cache_dev: str, T: int, hd: int,
              n_head: int, n_head_kv: int) -> Tensor:
    """build_attn from the RoPE'd Q and K and the V of one layer to the attention output ([n_head * hd, T], before
    the output projection): the rotations of a quantized cache, K and V stored in the cache on `cache_dev`, flash
    attention or KQ, softmax and KQV."""
    cfg = kv.config
    if kv.k_rot is not None:
        q = g.view(g.op(q.size, kv.k_rot, g.view(q)))
        k = g.view(g.op(k.size, kv.k_rot, g.view(k)))
    if kv.v_rot is not None:
        v = g.view(g.op(v.size, kv.v_rot, g.view(v)))
    g.expand(q)
    g.expand(v)
    g.expand(k)
    g.expand(g.set(cache_dev, g.view(k), kv.k_idxs))
    g.expand(g.set(cache_dev, g.view(v), kv.v_idxs))
    n_kv_all = kv.n_kv * cfg.n_streams                                   # the views span every stream
    kc = g.view(g.view(g.ext(cache_dev)), _row(cfg.type_k, hd) * n_head_kv * n_kv_all)
    vc = g.view(g.view(g.ext(cache_dev)), _row(cfg.type_v, hd) * n_head_kv * n_kv_all)
    qp = g.view(g.view(q))
    q_size = 4 * hd * n_head * T
    if kv.fa:
        out = g.view(g.op(q_size, qp, kc, vc, kv.mask))
    else:
        kq = g.op(4 * kv.n_kv * T * n_head, kc, qp)
        kq = g.op(kq.size, kq, kv.mask, inplace=True)                    # soft_max_ext
        out = g.op(q_size, g.view(g.op(q_size, vc, kq)))                 # cont(permute(kqv))
    g.expand(out)
    if kv.v_rot is not None:
        out = g.view(g.op(out.size, kv.v_rot, g.view(out)))
    return out
