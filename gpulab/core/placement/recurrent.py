"""Compute buffers of recurrent graphs (Mamba-2): the graph, llama.cpp's scheduler and ggml-alloc, replayed.

The closed forms of gpulab.core.placement.compute hold because attention layers leave ggml-alloc's
buffer the same from one layer to the next. A Mamba-2 layer does not: its ssm_in product, the
convolution's concat and the scan's output (y and the last states) are of unlike sizes, so the holes
they leave move from layer to layer (the peak of a device is reached at its second layer, not its
first), and the scheduler runs the last layer's cont(z) on the next device, which copies the z view
(nearly the whole ssm_in product) over and the result back. So the graph is replayed, one node per
ggml op, in llama.cpp's order:

  graph      llm_build_mamba_base::build_mamba2_layer (src/models/mamba-base.cpp), the layer loop of
             llama_model_mamba::graph (src/models/mamba.cpp), build_rs / build_inp_s_copy and
             build_inp_out_ids (src/llama-graph.cpp); a norm named "norm" is pinned to its layer's
             device under full offload or small ubatches (llama_context::graph_get_cb)
  scheduler  ggml_backend_sched_split_graph (ggml/src/ggml-backend.cpp): ops on their weights'
             device, the gpu-down/up and rest-down/up expansions, views on their source's device, one
             copy of each tensor a backend reads from another, GGML_SCHED_MAX_COPIES of each when
             pipelining (inputs and outputs then: allocated first, never freed); a tensor copied away
             is freed there once copied (the input_dep node, its last user, opens the split)
  allocator  ggml_gallocr_alloc_graph_impl and ggml_dyn_tallocr (ggml/src/ggml-alloc.c): best fit
             among the free blocks but the last, else the last; in place where the op allows it and
             the parent has no other user; freed after the last user, merged with its neighbours

About 40 nodes per layer: a few milliseconds for a 64-layer model. Checked on CPU RPC devices against
the buffers llama.cpp logs (tests/integration/test_arch_matrix_vs_llama.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile

__all__ = ["RECURRENT_GRAPHS", "recurrent_compute_bytes"]

RECURRENT_GRAPHS = frozenset({"mamba2"})
_ALIGN = 32                      # TENSOR_ALIGNMENT of CPU and RPC buffers
_BIG = 1 << 62                   # the last free block of a chunk (SIZE_MAX / 2)


def _a(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class _Node:
    size: int                    # bytes it allocates (for a view: its ggml_nbytes, what a copy of it takes)
    src: list[int]               # the graph's own tensors it reads (weights and caches are left out)
    dev: str | None = None       # pass 1: the device of its weight, cache or input; a pinned norm
    view: int = -1               # a view: the tensor it views (ggml's view_src, always the root)
    alloc: bool = True           # False: writes into a cache (ggml_cpy into the state), nothing to allocate
    inplace: bool = False        # ggml_op_can_inplace
    out: bool = False            # GGML_TENSOR_FLAG_OUTPUT: never freed, never reused
    leaf: bool = False           # a graph input (llm_graph_input_*): on the host, allocated first


@dataclass
class _Graph:
    nodes: list[_Node] = field(default_factory=list)

    def add(self, size: int, src: list[int], **kw) -> int:
        self.nodes.append(_Node(size, src, **kw))
        return len(self.nodes) - 1

    def view(self, of: int, nbytes: int = 0) -> int:
        root = self.nodes[of].view if self.nodes[of].view >= 0 else of
        return self.add(nbytes, [of], view=root, alloc=False)


def _mamba2_graph(profile: ModelProfile, layer_devices: list[str], T: int, ns: int, T_out: int,
                  pin_norm: bool) -> _Graph:
    md, arch = profile.metadata, profile.arch
    d_conv = int(md[f"{arch}.ssm.conv_kernel"])
    d_inner = int(md[f"{arch}.ssm.inner_size"])
    d_state = int(md[f"{arch}.ssm.state_size"])
    n_head = int(md[f"{arch}.ssm.time_step_rank"])
    n_group = int(md.get(f"{arch}.ssm.group_count", 1))
    E, n_layer = profile.n_embd, profile.n_layer
    conv_dim = d_inner + 2 * n_group * d_state
    d_in_proj = 2 * d_inner + 2 * n_group * d_state + n_head
    e = 4 * E * T
    g = _Graph()
    host = HOST_NAME
    # graph inputs: inp_tokens, inp_embd (never read by a text batch, never freed), the state copy ids, out_ids
    tokens = g.add(4 * T, [], dev=host, leaf=True)
    g.add(e, [], dev=host, leaf=True)
    s_copy = g.add(4 * ns, [], dev=host, leaf=True)
    out_ids = g.add(4 * T_out, [], dev=host, leaf=True)
    s_main = g.view(s_copy, 4 * ns)                       # build_inp_s_copy: s_copy_main
    inp = g.add(e, [tokens], dev=host)                    # embd = get_rows(token_embd, tokens)
    zx_prev = ys_prev = silu_prev = -1

    def tail(il: int, resid: int, zx: int, silu: int, ys: int, dev_next: str | None) -> int:
        d = layer_devices[il]
        z = g.view(zx, 4 * d_inner + 4 * d_in_proj * (T - 1))
        zc = g.add(4 * d_inner * T, [z])                  # ggml_cont(z): goes where the op before it runs
        y = g.view(ys, 4 * d_inner * T)
        xd = g.add(4 * d_inner * T, [g.view(silu)], dev=d)            # x * ssm_d
        ya = g.add(4 * d_inner * T, [y, xd], inplace=True)            # mamba2_y_add_d
        sw = g.add(4 * d_inner * T, [zc, ya])                         # swiglu_split
        nrm = g.add(4 * d_inner * T, [g.view(sw)], inplace=True, dev=d if pin_norm else None)
        nw = g.add(4 * d_inner * T, [nrm], dev=d, inplace=True)       # * ssm_norm
        cur = g.add(e, [g.view(nw)], dev=d)                           # ssm_out
        if il == n_layer - 1:                                         # build_inp_out_ids: keep the outputs
            cur = g.add(4 * E * T_out, [cur, out_ids])
            resid = g.add(4 * E * T_out, [resid, out_ids])
        return g.add(4 * E * T_out if il == n_layer - 1 else e, [cur, resid], inplace=True)   # l_out

    resid = inp
    for il in range(n_layer):
        d = layer_devices[il]
        # build_rs(conv states): an in-place scale of the cache, the rows of this ubatch's sequences, the
        # rows of the others (none here) copied back
        g.add(0, [], dev=d, alloc=False)
        conv = g.add(_a(4 * (d_conv - 1) * conv_dim * ns), [s_main])
        g.add(0, [], dev=d, alloc=False)
        if il > 0:
            resid = tail(il - 1, resid, zx_prev, silu_prev, ys_prev, d)
        n0 = g.add(e, [resid], inplace=True, dev=d if pin_norm else None)   # "norm"
        n1 = g.add(e, [n0], dev=d, inplace=True)                            # attn_norm
        zx = g.add(4 * d_in_proj * T, [n1], dev=d)                          # ssm_in
        zr = g.view(zx)
        xbc_t = g.view(g.view(zr))
        cx = g.add(4 * (d_conv - 1 + T // ns) * conv_dim * ns, [g.view(conv), xbc_t])   # concat
        g.add(0, [g.view(cx)], dev=d, alloc=False)                           # last conv rows -> cache
        xc = g.add(4 * conv_dim * T, [cx], dev=d)                            # ssm_conv
        xc = g.add(4 * conv_dim * T, [xc], dev=d, inplace=True)              # + conv bias
        silu = g.add(4 * conv_dim * T, [xc], inplace=True)
        x = g.view(silu)
        dt = g.add(4 * n_head * T, [g.view(zr)])                             # cont(dt)
        dt = g.add(4 * n_head * T, [dt], dev=d, inplace=True)                # + dt bias
        ys = g.add(4 * (d_inner * T + d_state * d_inner * ns), [x, dt, g.view(silu), g.view(silu), s_main],
                   dev=d)                                                    # ssm_scan
        g.add(0, [], dev=d, alloc=False)                                     # other rows' states
        g.add(0, [g.view(ys)], dev=d, alloc=False)                           # last states -> cache
        zx_prev, silu_prev, ys_prev = zx, silu, ys
    resid = tail(n_layer - 1, resid, zx_prev, silu_prev, ys_prev, None) if n_layer else inp
    out_dev = layer_devices[n_layer]
    nrm = g.add(4 * E * T_out, [resid], inplace=True)                         # output norm (il -1: not pinned)
    nrm = g.add(4 * E * T_out, [nrm], dev=out_dev, inplace=True)
    g.add(4 * profile.n_vocab * T_out, [nrm], dev=out_dev, out=True)          # result_output
    return g


def _schedule(g: _Graph) -> list[str]:
    """ggml_backend_sched_split_graph passes 1, 2 and 4: the backend of every node."""
    be = [n.dev for n in g.nodes]
    ops = [i for i, n in enumerate(g.nodes) if n.view < 0 and not n.leaf]
    for gpu_only in (True, False):
        for seq in (ops, ops[::-1]):
            cur = None
            for i in seq:
                if be[i] is not None:
                    cur = None if gpu_only and be[i] == HOST_NAME else be[i]
                elif cur is not None:
                    be[i] = cur
    for i, n in enumerate(g.nodes):
        if n.view >= 0:
            be[i] = be[n.view]
    return [b if b is not None else HOST_NAME for b in be]


class _Alloc:
    """ggml_dyn_tallocr of one buffer: free blocks sorted by offset, the last one endless."""

    def __init__(self) -> None:
        self.blocks = [[0, _BIG]]
        self.top = 0

    def alloc(self, size: int) -> int:
        size = _a(size)
        best, best_size = -1, None
        for i, (_, bsize) in enumerate(self.blocks[:-1]):
            if bsize >= size and (best_size is None or bsize <= best_size):
                best, best_size = i, bsize
        block = self.blocks[best]            # -1: the last block
        off = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            self.blocks.remove(block)
        self.top = max(self.top, off + size)
        return off

    def free(self, off: int, size: int) -> None:
        size = _a(size)
        bl = self.blocks
        for i, b in enumerate(bl):
            if b[0] + b[1] == off:
                b[1] += size
                if i + 1 < len(bl) and b[0] + b[1] == bl[i + 1][0]:
                    b[1] += bl[i + 1][1]
                    del bl[i + 1]
                return
            if off + size == b[0]:
                b[0] = off
                b[1] += size
                if i > 0 and bl[i - 1][0] + bl[i - 1][1] == b[0]:
                    bl[i - 1][1] += b[1]
                    del bl[i]
                return
        k = 0
        while k < len(bl) and bl[k][0] < off:
            k += 1
        bl.insert(k, [off, size])


def _replay(g: _Graph, be: list[str], n_copies: int, log: list | None = None) -> dict[str, int]:
    """Split the graph (pass 5: a copy of each tensor a backend reads from another, made at the start of
    the split that first reads it), then run ggml-alloc over graph_copy; the high-water mark of each
    backend's buffer."""
    nodes = list(g.nodes)
    be = list(be)
    copies: dict[tuple[int, str], int] = {}
    order: list[int] = []          # graph_copy: per split, the input deps and copies, then the split's nodes
    pinned_leaves: list[int] = [i for i, n in enumerate(nodes) if n.leaf]
    first_copies: list[int] = []
    split_dev = None
    split_start = len(order)
    for i, n in enumerate(g.nodes):
        if n.leaf:
            continue
        if n.view >= 0:
            order.append(i)
            continue
        b = be[i]
        if b != split_dev:
            split_dev, split_start = b, len(order)
        new_src = []
        for s in n.src:
            if be[s] == b:
                new_src.append(s)
                continue
            key = (s, b)
            if key not in copies:
                # the input_dep node (a view with op NONE: one more child of s, none of its views) and the copy
                nodes.append(_Node(0, [s], alloc=False))
                be.append(be[s])
                nodes.append(_Node(_a(nodes[s].size), [], out=n_copies > 1, leaf=n_copies > 1))
                be.append(b)
                c = len(nodes) - 1
                copies[key] = c
                if n_copies > 1:
                    first_copies.append(c)
                order[split_start:split_start] = [c - 1] if n_copies > 1 else [c - 1, c]
                split_start += 1 if n_copies > 1 else 2
            new_src.append(copies[key])
        nodes[i] = _Node(n.size, new_src, n.dev, n.view, n.alloc, n.inplace, n.out, n.leaf)
        order.append(i)

    allocs: dict[str, _Alloc] = {}
    addr: dict[int, int] = {}
    children = [0] * len(nodes)
    views = [0] * len(nodes)
    for i in order:
        n = nodes[i]
        if n.view >= 0:
            views[n.view] += 1
        for s in n.src:
            children[s] += 1

    def allocate(i: int) -> None:
        allocs.setdefault(be[i], _Alloc())
        addr[i] = allocs[be[i]].alloc(nodes[i].size)
        if log is not None:
            log.append((i, be[i], addr[i], nodes[i].size))

    def free(i: int) -> None:
        if log is not None:
            log.append((i, be[i], -addr[i] - 1, nodes[i].size))
        allocs[be[i]].free(addr.pop(i), nodes[i].size)

    # leaves first: the graph inputs, and (pipelining) GGML_SCHED_MAX_COPIES of every input and copy
    for i in pinned_leaves:
        for _ in range(n_copies):
            allocate(i)
    for c in first_copies:
        for _ in range(n_copies):
            allocate(c)
    for i in order:
        n = nodes[i]
        if n.view < 0 and n.alloc and i not in addr:
            done = False
            if n.inplace:
                for s in n.src:
                    p = nodes[s]
                    if s not in addr or p.out or p.leaf or p.size != n.size:
                        continue
                    if children[s] == 1 and views[s] == 0:
                        addr[i] = addr.pop(s)
                        done = True
                        break
            if not done:
                allocate(i)
        for s in n.src:
            children[s] -= 1
            if children[s] or views[s]:
                continue
            p = nodes[s]
            if p.view >= 0:
                r = p.view
                views[r] -= 1
                if views[r] == 0 and children[r] == 0 and r in addr and not nodes[r].out and not nodes[r].leaf:
                    free(r)
            elif s in addr and not p.out and not (p.leaf and n_copies > 1):
                free(s)
    return {d: a.top for d, a in allocs.items()}


def recurrent_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str],
                            names: list[str], *, T: int, n_seqs: int, T_out: int, n_copies: int,
                            pin_norm: bool) -> dict[str, int]:
    """Compute buffer bytes of every backend in `names` for a graph of RECURRENT_GRAPHS."""
    g = _mamba2_graph(profile, layer_devices, T, n_seqs, T_out, pin_norm)
    tops = _replay(g, _schedule(g), n_copies)
    return {name: tops.get(name, 0) for name in names}
