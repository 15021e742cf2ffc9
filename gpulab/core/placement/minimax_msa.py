"""minimax-m3's sparse attention (MSA) as its graph builds it for a batch, for placement.dense's replay.

llama_model_minimax_m3::graph (src/models/minimax-m3.cpp): with flash attention on and a stream per sequence
(msa_enabled), the layers past the leading dense ones score position blocks with a lightning indexer (its keys
in the indexer cache of llama_kv_cache_msa), keep the top-k blocks per indexer head, expand that block mask to
every cell through the cell -> block map and add the causal mask (an f32 copy of the f16 KQ mask, made once and
read by every sparse layer), then run one flash attention per stream with the (GQA group, stream) folded onto
the channel dimension (build_attn_msa_fa). The graph is reserved with an empty cache: get_n_pos is 256
(llama_kv_cache_msa_context::get_n_pos), so n_ps = pad(256, block) positions. The batch path (more than one
token per stream) is the one a ubatch reserves; ggml_add_inplace and ggml_set_rows return views of their first
operand: here they are ops in place on it.
"""

from __future__ import annotations

from .ggml_replay import Tensor
from .recurrent import _Attn, _Ctx, _row

__all__ = ["Msa"]


class Msa:
    """The MSA inputs (llm_graph_input_msa, the indexer cache's K row indices, the f32 mask) and a sparse layer."""

    def __init__(self, c: _Ctx, attn: _Attn) -> None:
        md, arch, g, T = c.p.metadata, c.p.arch, c.g, c.T
        self.c, self.attn = c, attn
        self.blk = int(md[f"{arch}.attention.indexer.block_size"])
        self.Hd = int(md[f"{arch}.attention.indexer.head_count"])
        self.n_idx = int(md[f"{arch}.attention.indexer.key_length"])
        n_ps = -(-256 // self.blk) * self.blk
        self.n_ps, self.nblk = n_ps, n_ps // self.blk
        self.K = min(int(md[f"{arch}.attention.indexer.top_k"]), self.nblk)
        kv = attn.caches[False]
        self.n_kv, self.ns = kv.n_kv, c.ns
        self.k_idxs_idx = g.inp(8 * T)                           # the indexer cache's build_input_k_idxs
        self.bias = g.inp(4 * self.nblk * T)
        self.pos_mask = g.inp(4 * n_ps * T)
        self.pos_slot = g.inp(4 * n_ps * self.ns)
        self.cell_blk = g.inp(4 * self.n_kv * self.ns)
        self.mask_f32 = g.op(4 * self.n_kv * T, kv.mask)            # ggml_cast(kq_mask, F32)

    def __call__(self, h: Tensor, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, il: int) -> Tensor:
        """The attention output before wo: `h` the attention's norm, q/k/v normed and roped as build_attn gets them."""
        c, g, T, d = self.c, self.c.g, self.c.T, self.c.dev[il]
        layer, cfg = c.p.layers[il], c.config
        Hd, n_idx, nblk, K, n_kv, ns = self.Hd, self.n_idx, self.nblk, self.K, self.n_kv, self.ns
        n_tps = T // ns
        D, HKV, HQ = layer.n_embd_head_k, layer.n_head_kv, layer.n_head
        kv = self.attn.caches[False]
        iq = g.op(4 * Hd * n_idx * T, h, w=d)                             # index_q_proj
        ik = g.op(4 * n_idx * T, h, w=d)                                  # index_k_proj
        iq = g.op(iq.size, c.norm(g.view(iq), il), pos, inplace=True)     # norm of the 3-D reshape, RoPE
        ik = g.op(ik.size, c.norm(g.view(ik), il), pos, inplace=True)
        g.expand(g.set(d, g.view(ik), self.k_idxs_idx))                   # cpy_k into the indexer cache
        ik_kv = g.view(g.ext(d))
        q, k, v = kv.rotate(g, q, k, v)
        g.expand(q)
        g.expand(k)
        g.expand(v)
        g.expand(g.set(d, g.view(k), kv.k_idxs))
        g.expand(g.set(d, g.view(v), kv.v_idxs))
        kc = g.view(g.ext(d), _row(cfg.type_k, D) * HKV * n_kv * self.attn.n_stream)
        vc = g.view(g.ext(d), _row(cfg.type_v, D) * HKV * n_kv * self.attn.n_stream)
        outs = []
        for _ in range(ns):                                                  # one attention per stream
            iq_s = g.view(iq, 4 * n_idx * Hd * n_tps)
            ik_s = g.view(ik_kv, _row(cfg.type_k, n_idx) * n_kv)
            pm_s = g.view(self.pos_mask, 4 * self.n_ps * n_tps)
            bias_s = g.view(self.bias, 4 * nblk * n_tps)
            ikp = g.op(4 * n_idx * self.n_ps, ik_s, g.view(self.pos_slot, 4 * self.n_ps))   # get_rows
            sc = g.op(4 * self.n_ps * Hd * n_tps, ikp, g.view(iq_s))      # block scores (no weight)
            sc = g.op(sc.size, sc, pm_s, inplace=True)                       # add_inplace(pos mask)
            bs = g.op(4 * nblk * Hd * n_tps, g.view(sc))                     # pool_2d max over each block
            bsf = g.op(bs.size, bs, bias_s, inplace=True)                    # + the local-force bias
            idx = g.op(4 * K * Hd * n_tps, bsf)                              # top_k (i32)
            ninf = g.op(2 * nblk * n_tps, g.op(4 * nblk * n_tps, bias_s))    # cast(scale_bias(bias), f16)
            ninf = g.op(2 * nblk * Hd * n_tps, ninf)                         # repeat_4d
            zero = g.op(4 * K * Hd * n_tps, g.op(4 * K * Hd * n_tps, idx), inplace=True)   # scale(cast(idx))
            bm = g.op(ninf.size, ninf, g.view(zero), g.view(idx), inplace=True)            # set_rows: a view
            bm = g.op(bm.size, g.view(g.view(bm)))                           # cont(permute(reshape))
            bm2 = g.op(bm.size, g.view(g.view(bm)))                          # cont(transpose(reshape_2d))
            bmc = g.op(4 * n_tps * Hd * n_kv, bm2, g.view(self.cell_blk, 4 * n_kv))   # get_rows: f32
            bmx = g.op(bmc.size, g.view(bmc))                                # cont(transpose)
            mf_s = g.view(self.mask_f32, 4 * n_kv * n_tps)
            mask4 = g.op(bmx.size, bmx, mf_s, inplace=True)                  # add_inplace(causal mask)
            mask4 = g.op(2 * n_kv * n_tps * Hd, g.view(mask4))               # cast to f16
            qs = g.view(g.view(g.view(q)))                                   # view_3d, reshape_4d, permute
            o = g.op(4 * D * HQ * n_tps, qs, g.view(g.view(kc)), g.view(g.view(vc)), mask4)   # flash_attn_ext
            self.attn.fa_nodes.append((o, d))
            outs.append(g.view(g.op(o.size, g.view(o))))                     # cont(permute), reshape_2d
        out = outs[0]
        for o2 in outs[1:]:
            out = g.op(out.size + o2.size, out, o2)                          # concat
        if kv.v_rot is not None:
            out = g.view(g.op(out.size, kv.v_rot, g.view(out)))
        return out
