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

import functools
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from ..devices import HOST_NAME

__all__ = ["Graph", "Placed", "Tensor", "buffer_peaks", "per_profile", "schedule", "template"]

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


class _Alloc:
    """ggml_dyn_tallocr of one buffer: free blocks sorted by offset, the last one endless."""

    def __init__(self) -> None:
        self.blocks = [[0, _BIG]]
        self.top = 0

    def alloc(self, size: int) -> int:
        size = (size + _ALIGN - 1) // _ALIGN * _ALIGN
        bl = self.blocks
        best, best_size = -1, _BIG
        for i in range(len(bl) - 1):
            bsize = bl[i][1]
            if size <= bsize <= best_size:
                best, best_size = i, bsize
        block = bl[best]                     # -1: the last block
        off = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del bl[best]
        if off + size > self.top:
            self.top = off + size
        return off

    def free(self, off: int, size: int) -> None:
        size = (size + _ALIGN - 1) // _ALIGN * _ALIGN
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


class _Flat:
    """A graph as index lists (leafs, then nodes in graph order): what scheduling and allocating read, built
    once per graph. Both run over these lists rather than the Tensor objects, so that a graph built once (a
    `replay` template) is scheduled and allocated for many device placements without being touched."""

    __slots__ = ("tensors", "n", "kind", "size", "src", "root", "inplace", "out", "n_leaf", "inputs", "nch", "nvw",
                 "literals", "lab", "gaps", "pick")

    def __init__(self, g: Graph) -> None:
        ts = self.tensors = g.leafs + g.nodes
        n = self.n = len(ts)
        nl = self.n_leaf = len(g.leafs)
        # each tensor's index: expand numbered them (leaf k: -2 - k, node k: k)
        kind = self.kind = [t.kind for t in ts]
        self.size = [t.size for t in ts]
        src = self.src = [tuple([-2 - s.i if s.i < 0 else nl + s.i for s in t.src]) for t in ts]
        root = self.root = [-2 - t.root.i if t.root.i < 0 else nl + t.root.i for t in ts]
        self.inplace = [t.inplace for t in ts]
        self.out = [t.out for t in ts]
        self.inputs = [i for i in range(nl) if kind[i] in ("in", "leaf")]
        # ggml-alloc's counts of children and views, before the split's copies move some reads
        nch, nvw = self.nch, self.nvw = [0] * n, [0] * n
        for i in range(nl, n):
            for s in src[i]:
                nch[s] += 1
            if kind[i] == "view":
                nvw[root[i]] += 1
        # pass 1's backend of each tensor as an index into literals + a placement (Slot k: the k-th entry)
        devs = [t.dev for t in ts]
        literals = self.literals = list(dict.fromkeys(d for d in devs if type(d) is not Slot))
        seen = {d: k for k, d in enumerate(literals)}
        if HOST_NAME not in seen:
            seen[HOST_NAME] = len(literals)
            literals.append(HOST_NAME)
        nlit = len(literals)
        lab = [nlit + int(str.__getitem__(d, slice(1, None))) if type(d) is Slot else seen[d] for d in devs]
        host = seen[HOST_NAME]
        for i in range(nl):
            if devs[i] is None:
                lab[i] = host           # a leaf without a device: the host
        self.lab = lab
        # passes 2 and 4 fill each run of ops without a backend (a gap) from the op before or after it; which
        # ops have none does not depend on the placement, so the gaps are found once: (op before, op after)
        gaps: list[tuple[int, int]] = []
        pick = list(range(n))
        prev, start = -1, -1
        for i in range(nl, n):
            if kind[i] == "view":
                continue
            if devs[i] is None:
                if start < 0:
                    start = i
                pick[i] = n + len(gaps)
            else:
                if start >= 0:
                    gaps.append((prev, i))
                    start = -1
                prev = i
        if start >= 0:
            gaps.append((prev, -1))
        for i in range(nl, n):
            if kind[i] == "view":
                pick[i] = pick[root[i]]       # a view goes with what it views
        self.gaps, self.pick = gaps, pick

    def schedule(self, table: list[str]) -> list[str]:
        """ggml_backend_sched_split_graph passes 1, 2 and 4 for a placement (`table`: the devices a Slot
        stands for): the backend of every tensor. Pass 1 puts an op where its weight or cache is; then a gap
        takes the GPU before it (gpu-down), else the GPU after it (gpu-up), else the backend before it
        (rest-down, the host), else the one after (rest-up), else the host."""
        lut = self.literals + table
        vals: list = list(map(lut.__getitem__, self.lab))
        for p, q in self.gaps:
            a = vals[p] if p >= 0 else None
            if a is None or a == HOST_NAME:
                b = vals[q] if q >= 0 else None
                a = b if b is not None and b != HOST_NAME else a if a is not None else b
            vals.append(a or HOST_NAME)
        return list(map(vals.__getitem__, self.pick))

    def peaks(self, be: list[str], n_copies: int, log: list | None = None) -> dict[str, int]:
        """The split's copies and ggml-alloc over the graph with backends `be` (see buffer_peaks)."""
        kind, size, src, root = self.kind[:], self.size[:], self.src[:], self.root[:]
        out, inplace, be = self.out[:], self.inplace[:], be[:]
        pipe = n_copies > 1
        nch, nvw = self.nch[:], self.nvw[:]
        order: list[int] = []       # graph_copy: per split its input deps and copies, then its nodes
        first = list(self.inputs)
        copies: dict[tuple[int, str], int] = {}
        split_dev = None
        start = n_inputs = 0
        for n in range(self.n_leaf, self.n):
            if kind[n] == "view":
                order.append(n)
                continue
            b = be[n]
            sn = src[n]
            if b != split_dev or (n_inputs and any(kind[s] == "w" and be[s] != b for s in sn)):
                split_dev, start, n_inputs = b, len(order), 0
            for s in sn:
                if be[s] != b:
                    break
            else:
                order.append(n)
                continue
            new: list[int] = []
            for s in sn:
                if be[s] == b:
                    new.append(s)
                    continue
                n_inputs += 1
                nch[s] -= 1                 # read from its copy instead
                c = copies.get((s, b))
                if c is None:
                    dep = len(kind)         # an input_dep node: the original's last user on its backend
                    nch[s] += 1
                    kind.append("dep")
                    size.append(0)
                    src.append((s,))
                    be.append(be[s])
                    c = copies[(s, b)] = dep + 1
                    kind.append("in" if pipe else "op")
                    size.append(_a(size[s]))
                    src.append(())
                    be.append(b)
                    root += [dep, c]
                    out += [False, pipe]
                    inplace += [False, False]
                    nch += [0, 0]
                    nvw += [0, 0]
                    if pipe:
                        first.append(c)
                        order.insert(start, dep)
                        start += 1
                    else:
                        order[start:start] = [dep, c]
                        start += 2
                nch[c] += 1
                new.append(c)
            src[n] = tuple(new)
            order.append(n)

        nt = len(kind)
        addr = [-1] * nt
        # graph outputs and (pipelining) inputs stay; weights and caches were never ours
        freeable = [not o and (k in ("op", "leaf") or not pipe) for k, o in zip(kind, out)]
        is_op = [k == "op" for k in kind]
        is_view = [k == "view" for k in kind]
        allocs: dict[str, _Alloc] = {}
        tensors = self.tensors
        made: dict[int, Tensor] = {}

        def obj(i: int) -> Tensor:          # the Tensor a log entry names (copies and deps made on demand)
            if i < self.n:
                return tensors[i]
            t = made.get(i)
            if t is None:
                t = made[i] = Tensor(kind[i], size[i], tuple(obj(s) for s in src[i]), out=out[i])
                t.be = be[i]
            return t

        def allocate(t: int) -> None:
            a = allocs.get(be[t])
            if a is None:
                a = allocs[be[t]] = _Alloc()
            addr[t] = a.alloc(size[t])
            if log is not None:
                log.append((obj(t), be[t], addr[t], size[t]))

        # the graph inputs (and, pipelining, every copy) first, n_copies of each; the leafs made without an op after
        # them (the scheduler's graph copy lists the split inputs' copies before the original graph's leafs)
        first.sort(key=lambda t: kind[t] == "leaf")
        for t in first:
            for _ in range(n_copies if kind[t] == "in" else 1):
                allocate(t)
        for n in order:
            srcs = src[n]
            if is_op[n] and addr[n] < 0:
                if inplace[n]:
                    sz = size[n]
                    for s in srcs:
                        if addr[s] >= 0 and is_op[s] and not out[s] and size[s] == sz and nch[s] == 1 \
                                and not nvw[s]:
                            addr[n], addr[s] = addr[s], -1
                            if log is not None:          # in place: the parent's range passes to the node
                                log += [(obj(s), be[n], -addr[n] - 1, size[s]), (obj(n), be[n], addr[n], sz)]
                            break
                if addr[n] < 0:
                    a = allocs.get(be[n])
                    if a is None:
                        a = allocs[be[n]] = _Alloc()
                    addr[n] = a.alloc(size[n])
                    if log is not None:
                        log.append((obj(n), be[n], addr[n], size[n]))
            for s in srcs:
                nch[s] -= 1
                if nch[s] or nvw[s]:
                    continue
                if is_view[s]:
                    s = root[s]
                    nvw[s] -= 1
                    if nvw[s] or nch[s]:
                        continue
                if addr[s] >= 0 and freeable[s]:
                    if log is not None:
                        log.append((obj(s), be[s], -addr[s] - 1, size[s]))
                    allocs[be[s]].free(addr[s], size[s])
                    addr[s] = -1
        return {d: a.top for d, a in allocs.items()}


def _flat(g: Graph) -> _Flat:
    return _Flat(g)


def schedule(g: Graph) -> None:
    """ggml_backend_sched_split_graph passes 1, 2 and 4: sets the backend (`be`) of every tensor."""
    f = _flat(g)
    for t, b in zip(f.tensors, f.schedule([])):
        t.be = b


def buffer_peaks(g: Graph, n_copies: int, log: list | None = None) -> dict[str, int]:
    """The high-water mark of each backend's compute buffer for graph `g`, scheduled (`schedule`, then any
    backend set by hand). `log`: gets (tensor, backend, offset, size) per allocation, (..., -offset - 1, ...)
    per free."""
    f = _flat(g)
    return f.peaks([t.be for t in f.tensors], n_copies, log)


# --- one graph, many placements -----------------------------------------------------------------------------
# A builder's graph depends on where layers run only through the device labels it writes on tensors (a
# weight's, a cache's, a pinned norm's). So it is built once with stand-in labels (Slot: "the k-th entry of
# the placement") and each placement only relabels, schedules and allocates: the same graph, the same bytes.
# A builder that compares or hashes a label (its graph would depend on the placement) is seen doing it and is
# built per placement instead; a template also serves only settings whose attributes the builder read are
# equal to those it was built with (_Reads).

_SLOT_SEEN = [False]


class Slot(str):
    """A stand-in device label while a template is built: "\\x00<k>", the k-th device of the placement."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        _SLOT_SEEN[0] = True
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        _SLOT_SEEN[0] = True
        return str.__ne__(self, other)

    def __hash__(self) -> int:
        _SLOT_SEEN[0] = True
        return str.__hash__(self)


class _Reads:
    """Stands for a settings object while a template is built and records every attribute the builder reads."""

    def __init__(self, obj: object) -> None:
        self._obj = obj
        self._read: dict[str, object] = {}

    def __getattr__(self, name: str) -> object:
        v = getattr(self._obj, name)
        self._read[name] = v
        return v


class _Template:
    """A built graph (_Flat, without its Tensor objects) and, as indices with the placement entry their label
    stands for, the nodes whose backend the entry point checks (by name: flash attention, a fused op) and the
    views pinned to a device."""

    __slots__ = ("flat", "checks", "pinned", "read")

    def __init__(self, g: Graph, checks: dict[str, list], pinned: list, read: dict[str, object]) -> None:
        f = self.flat = _Flat(g)
        ix = {id(t): i for i, t in enumerate(f.tensors)}
        self.checks = {name: [(ix[id(t)], _slot(d), d) for t, d in nodes if t is not None]
                       for name, nodes in checks.items()}
        self.pinned = [(ix[id(t)], _slot(d), d) for t, d in pinned]
        self.read = read
        f.tensors = []              # a template is never logged: its Tensor objects are not kept

    def place(self, layer_devices: list[str], ffn_devices: list[str] | None) -> Placed:
        """The graph scheduled for a placement (`schedule`), its pinned views on their devices."""
        table = list(layer_devices) + list(ffn_devices or ())
        be = self.flat.schedule(table)
        for i, k, d in self.pinned:
            be[i] = d if k < 0 else table[k]    # a pinned view: its readers elsewhere copy it
        return Placed(self, table, be)


class Placed:
    """A template scheduled for one placement: `be` the backend of every tensor."""

    __slots__ = ("tpl", "table", "be")

    def __init__(self, tpl: _Template, table: list[str], be: list[str]) -> None:
        self.tpl, self.table, self.be = tpl, table, be

    def moved(self, name: str) -> bool:
        """Whether the scheduler put any node of the checked list `name` on another backend than its layer's
        device (llama_context::resolve_fused_ops then turns that fused op off)."""
        be, table = self.be, self.table
        return any(be[i] != (d if k < 0 else table[k]) for i, k, d in self.tpl.checks.get(name, ()))

    def moved_checks(self) -> set[str]:
        """The names of the checked lists with a node moved (see `moved`)."""
        return {name for name in self.tpl.checks if self.moved(name)}

    def peaks(self, n_copies: int) -> dict[str, int]:
        """The high-water mark of each backend's compute buffer (see buffer_peaks)."""
        return self.tpl.flat.peaks(self.be, n_copies)


def _slot(d: Any) -> int:
    return int(str.__getitem__(d, slice(1, None))) if type(d) is Slot else -1


# build(layer devices, FFN devices, settings, *variant) -> (graph, {name: [(node, its layer's device)]}, pinned views)
Builder = Callable[..., tuple[Graph, dict[str, list], list]]
_TEMPLATES: dict[tuple, list[tuple[weakref.ref, _Template]]] = {}
_PER_PLACEMENT: set[tuple] = set()      # builders seen comparing labels


def template(build: Builder, owner: object, key: tuple, config: Any, layer_devices: list[str],
             ffn_devices: list[str] | None, *variant: object, keep: bool = True) -> _Template:
    """The graph build(layer devices, FFN devices, settings, *variant) makes, for any placement with as many
    layers (and FFN devices): built once per `owner` (the profile), `key` (what else the graph depends on),
    `variant` and the settings the builder reads, with stand-in labels. `.place(...)` schedules it. keep=False:
    a graph for this placement alone (a variant seldom seen twice), built with its devices and not kept."""
    tkey = (id(owner), key, len(layer_devices), len(ffn_devices or ()), variant)
    if not keep or tkey in _PER_PLACEMENT:
        g, checks, pinned = build(layer_devices, ffn_devices, config, *variant)
        return _Template(g, checks, pinned, {})
    entries = _TEMPLATES.setdefault(tkey, [])
    for ref, tpl in entries:
        if ref() is owner and all(getattr(config, a) == v for a, v in tpl.read.items()):
            return tpl
    n = len(layer_devices)
    reads = _Reads(config)
    _SLOT_SEEN[0] = False
    g, checks, pinned = build([Slot(f"\x00{k}") for k in range(n)],
                              [Slot(f"\x00{n + k}") for k in range(len(ffn_devices))] if ffn_devices else None,
                              reads, *variant)
    if _SLOT_SEEN[0]:
        _PER_PLACEMENT.add(tkey)
        return template(build, owner, key, config, layer_devices, ffn_devices, *variant)
    tpl = _Template(g, checks, pinned, reads._read)
    if sum(len(e) for e in _TEMPLATES.values()) >= 16:      # 5.5 MiB each for a 128-layer Qwen3-Next
        _TEMPLATES.clear()
        entries = _TEMPLATES[tkey] = []
    entries.insert(0, (weakref.ref(owner), tpl))
    return tpl


_R = TypeVar("_R")


def per_profile(fn: Callable[[Any], _R]) -> Callable[[Any], _R]:
    """fn(profile), remembered per profile object (a profile is not changed once read): what a plan asks of
    the profile alone (is its graph replayed here?) is not worked out again on every slider move."""
    memo: dict[int, tuple[weakref.ref, _R]] = {}

    @functools.wraps(fn)
    def once(profile: Any) -> _R:
        hit = memo.get(id(profile))
        if hit is not None and hit[0]() is profile:
            return hit[1]
        value = fn(profile)
        if len(memo) > 64:
            memo.clear()
        memo[id(profile)] = (weakref.ref(profile), value)
        return value
    return once
