"""A ggml graph as llama.cpp builds it, its split across backends and ggml-alloc's layout: the high-water
mark of every compute buffer, for graphs whose layers leave the buffer unlike each other (recurrent ones:
placement.recurrent builds them). Only sizes, sources and devices are kept, one object per ggml tensor.

  graph      ggml_build_forward_expand: a depth-first walk of the sources, left to right, each node once
             (ggml_visit_parents_graph, ggml/src/ggml.c)
  scheduler  ggml_backend_sched_split_graph (ggml/src/ggml-backend.cpp): an op runs where its weight, or
             the cache it writes, is; graph inputs on the host; the others take their neighbours' backend
             (gpu-down, gpu-up, rest-down, rest-up; the host is skipped in the first two); views go with
             what they view. A tensor read on another backend is copied there once, at the start of the
             split that first reads it (after an input_dep node, the original's last user there); when
             pipelining every copy and graph input exists GGML_SCHED_MAX_COPIES times, allocated first and
             never freed
  allocator  ggml_gallocr_alloc_graph_impl and ggml_dyn_tallocr (ggml/src/ggml-alloc.c): inputs first;
             in place where the op allows it and the parent, same layout, has no other user; otherwise best
             fit among the free blocks but the last, else the last; freed after the last user (a view's
             source after its last view), merged with free neighbours
"""

from __future__ import annotations

from ..devices import HOST_NAME

__all__ = ["Graph", "Tensor", "buffer_peaks", "schedule"]

_ALIGN = 32                      # TENSOR_ALIGNMENT of CPU and RPC buffers
_BIG = 1 << 62                   # the last free block of a chunk (SIZE_MAX / 2)


def _a(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class Tensor:
    """kind: 'in' a graph input (a host leaf, allocated first), 'leaf' a tensor made without an op (allocated
    first, once, freed after its last reader), 'ext' a tensor of a weights or cache buffer
    (never allocated here), 'op' an op's result, 'view' a view ('root': what it views, never a view),
    'set' an op whose result is a view of a cache (ggml_cpy, ggml_set_rows into it: scheduled, not allocated).
    `size`: bytes (a view's ggml_nbytes: what a copy of it takes). `dev`: pass 1's backend (its weight's, its
    cache's, a pinned norm's)."""

    __slots__ = ("kind", "size", "src", "root", "dev", "inplace", "out", "i", "be", "nch", "nvw", "addr")

    def __init__(self, kind: str, size: int, src: tuple[Tensor, ...] = (), dev: str | None = None,
                 inplace: bool = False, out: bool = False, root: Tensor | None = None) -> None:
        self.kind, self.size, self.src, self.dev = kind, size, src, dev
        self.inplace, self.out, self.i = inplace, out, -1     # i: -1 until in the graph
        self.root: Tensor = root if root is not None else self
        # set by the replay: the backend, ggml-alloc's counts of children and views, the offset (-1: none)
        self.be: str = HOST_NAME
        self.nch = self.nvw = 0
        self.addr = -1


class Graph:
    def __init__(self) -> None:
        self.nodes: list[Tensor] = []
        self.leafs: list[Tensor] = []

    def inp(self, size: int) -> Tensor:
        return Tensor("in", size, dev=HOST_NAME)

    def ext(self, dev: str, size: int = 0) -> Tensor:
        return Tensor("ext", size, dev=dev)

    def weight(self, dev: str, size: int) -> Tensor:
        """A weight an op reads as a source where no rule puts the op with it (ROPE's frequency factors: pass 1
        skips ROPE, ggml_backend_sched_backend_id_from_cur): read on another backend, it is copied there and
        starts a new split once the split has inputs (ggml_backend_sched_split_graph, need_new_split)."""
        return Tensor("w", size, dev=dev)

    def leaf(self, dev: str, size: int) -> Tensor:
        """A tensor the graph makes without an op (ggml_new_tensor, e.g. what ggml_fill fills): allocated with
        the leafs before any node, once (ggml_gallocr_alloc_graph_impl's leaf loop), freed after its last reader
        like a node."""
        return Tensor("leaf", size, dev=dev)

    def op(self, size: int, *src: Tensor, w: str | None = None, inplace: bool = False, out: bool = False) -> Tensor:
        return Tensor("op", size, src, w, inplace, out)

    def view(self, t: Tensor, size: int | None = None) -> Tensor:
        """A view of t (`size`: its ggml_nbytes where it is not t's)."""
        return Tensor("view", t.size if size is None else size, (t,), root=t.root)

    def set(self, dev: str, *src: Tensor) -> Tensor:
        return Tensor("set", 0, src, dev)

    def expand(self, t: Tensor) -> Tensor:
        """ggml_build_forward_expand: t and what it needs that is not in the graph yet, sources first."""
        stack = [(t, 0)]
        while stack:
            x, k = stack.pop()
            if k == 0 and x.i != -1:
                continue
            if k < len(x.src):
                stack.append((x, k + 1))
                if x.src[k].i == -1:
                    stack.append((x.src[k], 0))
                continue
            if x.i != -1:
                continue
            if x.kind in ("in", "ext", "w", "leaf"):
                x.i = -2 - len(self.leafs)
                self.leafs.append(x)
            else:
                x.i = len(self.nodes)
                self.nodes.append(x)
        return t


def schedule(g: Graph) -> None:
    """ggml_backend_sched_split_graph passes 1, 2 and 4: sets the backend (`be`) of every tensor."""
    ops = [n for n in g.nodes if n.kind != "view"]
    be: dict[Tensor, str | None] = {n: n.dev for n in ops}
    for gpu_only in (True, False):
        for seq in (ops, ops[::-1]):
            cur = None
            for n in seq:
                b = be[n]
                if b is not None:
                    cur = None if gpu_only and b == HOST_NAME else b
                elif cur is not None:
                    be[n] = cur
    for t in g.leafs:
        t.be = t.dev or HOST_NAME
    for n in ops:
        n.be = be[n] or HOST_NAME
    for n in g.nodes:
        if n.kind == "view":
            n.be = n.root.be


class _Alloc:
    """ggml_dyn_tallocr of one buffer: free blocks sorted by offset, the last one endless."""

    def __init__(self) -> None:
        self.blocks = [[0, _BIG]]
        self.top = 0

    def alloc(self, size: int) -> int:
        size = _a(size)
        best, best_size = -1, _BIG
        for i, (_, bsize) in enumerate(self.blocks[:-1]):
            if size <= bsize <= best_size:
                best, best_size = i, bsize
        block = self.blocks[best]            # -1: the last block
        off = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del self.blocks[best]
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


def buffer_peaks(g: Graph, n_copies: int, log: list | None = None) -> dict[str, int]:
    """The high-water mark of each backend's compute buffer for graph `g`, scheduled (`schedule`)."""
    copies: dict[tuple[Tensor, str], Tensor] = {}
    src_of: dict[Tensor, tuple[Tensor, ...]] = {}
    order: list[Tensor] = []               # graph_copy: per split its input deps and copies, then its nodes
    first: list[Tensor] = [t for t in g.leafs if t.kind in ("in", "leaf")]
    split_dev = None
    start = n_inputs = 0
    for n in g.nodes:
        if n.kind == "view":
            order.append(n)
            continue
        b = n.be
        if b != split_dev or (n_inputs and any(s.kind == "w" and s.be != b for s in n.src)):
            split_dev, start, n_inputs = b, len(order), 0
        if all(s.be == b for s in n.src):
            order.append(n)
            continue
        new: list[Tensor] = []
        for s in n.src:
            if s.be == b:
                new.append(s)
                continue
            n_inputs += 1
            c = copies.get((s, b))
            if c is None:
                dep = Tensor("dep", 0, (s,))
                dep.be = s.be
                c = copies[(s, b)] = Tensor("in" if n_copies > 1 else "op", _a(s.size), out=n_copies > 1)
                c.be = b
                if n_copies > 1:
                    first.append(c)
                    order[start:start] = [dep]
                    start += 1
                else:
                    order[start:start] = [dep, c]
                    start += 2
            new.append(c)
        src_of[n] = tuple(new)
        order.append(n)

    for n in order:
        if n.kind == "view":
            n.root.nvw += 1
        for s in src_of.get(n, n.src):
            s.nch += 1
    allocs: dict[str, _Alloc] = {}

    def allocate(t: Tensor) -> None:
        a = allocs.get(t.be)
        if a is None:
            a = allocs[t.be] = _Alloc()
        t.addr = a.alloc(t.size)
        if log is not None:
            log.append((t, t.be, t.addr, t.size))

    def free(t: Tensor) -> None:
        # graph outputs and (pipelining) inputs stay; weights and caches were never ours
        if t.addr < 0 or t.out or not (t.kind in ("op", "leaf") or n_copies == 1):
            return
        if log is not None:
            log.append((t, t.be, -t.addr - 1, t.size))
        allocs[t.be].free(t.addr, t.size)
        t.addr = -1

    # the graph inputs (and, pipelining, every copy) first, n_copies of each; the leafs made without an op after
    # them (the scheduler's graph copy lists the split inputs' copies before the original graph's leafs)
    first.sort(key=lambda t: t.kind == "leaf")
    for t in first:
        for _ in range(n_copies if t.kind == "in" else 1):
            allocate(t)
    for n in order:
        srcs = src_of.get(n, n.src)
        if n.kind == "op" and n.addr < 0:
            for s in srcs if n.inplace else ():
                if s.addr >= 0 and s.kind == "op" and not s.out and s.size == n.size and s.nch == 1 and not s.nvw:
                    n.addr, s.addr = s.addr, -1
                    if log is not None:          # in place: the parent's range passes to the node
                        log += [(s, n.be, -n.addr - 1, s.size), (n, n.be, n.addr, n.size)]
                    break
            else:
                allocate(n)
        for s in srcs:
            s.nch -= 1
            if s.nch or s.nvw:
                continue
            if s.kind == "view":
                r = s.root
                r.nvw -= 1
                if not r.nvw and not r.nch:
                    free(r)
            else:
                free(s)
    return {d: a.top for d, a in allocs.items()}
