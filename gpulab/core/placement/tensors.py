"""Which buffer every tensor of a model goes to, and what each device's weights then are.

llama.cpp decides per tensor (src/llama-model-loader.cpp create_tensor, its buft_for_tensor):
1. the first tensor override whose regex finds the name decides (gpulab.core.overrides); a CPU
   target takes the host's buffer list (step 3), any other device's buffer type is taken as is;
2. otherwise the tensor goes with its layer (src/llama-model.cpp load_tensors: the input layer on
   the CPU, each repeating layer and the output layer where -ngl/-ts put them);
3. on the host, make_cpu_buft_list orders the buffer types: the first model device's pinned host
   buffer (CUDA_Host; not with --no-host, and RPC devices have none), then CPU_REPACK (unless
   -nr), then CPU, and select_weight_buft takes the first that supports the tensor's op. With mmap
   a host buffer is replaced by CPU, and every CPU tensor is mapped from the file: one CPU_Mapped
   buffer spanning the first to the last of them (load_tensors, get_mapping_range). CPU_REPACK
   takes 2-D matrix weights and 3-D expert weights whose type the CPU backend repacks
   (ggml-cpu/repack.cpp ggml_repack_get_optimal_repack_type: on x86, Q4_0, Q4_K, IQ4_NL and
   MXFP4 with AVX2, Q2_K with AVX-512) and whose rows are a multiple of 8; never token_embd
   (its op is GET_ROWS). A repacked tensor is a real allocation of its own bytes (padded to 32).
The KV cache of a layer stays on the layer's device whatever the overrides say
(llama_kv_cache ctor: model.dev_layer(il)).

Matching every rule against every tensor name is cached per profile and rule list, so moving a
-ts slider re-plans without running a regex.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

from ..devices import HOST_NAME, Device
from ..errors import ConfigError
from ..overrides import OverrideRule, _compile, llama_buffer_type_name, parse_llama_rpc_buffer_type
from ..profile import ModelProfile, TensorInfo

__all__ = ["TensorPlacement", "RuleMatch", "place_tensors", "rule_matches", "repackable", "resolve_target",
           "compute_sites"]

_ALIGN = 32   # TENSOR_ALIGNMENT of CPU buffers


@dataclass(frozen=True)
class RuleMatch:
    rule: OverrideRule
    device: str                  # where the rule sends its tensors (gpulab's device name)
    tensors: tuple[str, ...]     # the tensors it decides (first match), in file order
    n_bytes: int

    def to_dict(self) -> dict:
        return {"rule": self.rule.text, "source": self.rule.source, "device": self.device,
                "tensors": list(self.tensors), "bytes": self.n_bytes}


@dataclass(frozen=True)
class TensorPlacement:
    weights: dict                # device name -> bytes of weights (the host: see below)
    expert_weights: dict         # device name -> of which expert tensors (for the layer map)
    moved: dict                  # tensor name -> device, for tensors not where their layer is
    matches: tuple[RuleMatch, ...]
    mapped_bytes: int            # host: the CPU_Mapped span llama.cpp logs
    repack_bytes: int            # host: the CPU_REPACK copies
    host_tensor_bytes: int       # host: the bytes of the tensors that live there
    notes: tuple[str, ...]


def repackable(t: TensorInfo, op: str, repack_types: frozenset[str]) -> bool:
    """ggml-cpu/repack.cpp: extra_buffer_type::supports_op for the op weight_buft_supported builds."""
    if t.ggml_type not in repack_types or len(t.shape) < 2 or t.shape[1] % 8:
        return False
    dims = len([d for d in t.shape if d != 1]) if t.shape else 0     # ggml_n_dims drops trailing 1s
    return (op == "mul_mat" and dims == 2) or (op == "mul_mat_id" and dims == 3)


def _op(t: TensorInfo, *, as_output: bool = False) -> str:
    """The op llama.cpp checks a weight's buffer against (llm_tensor_info_for)."""
    if as_output:
        return "mul_mat"
    base = t.name.rsplit(".", 1)[0]
    if t.name.endswith(".bias") or "norm" in base:
        return "other"
    if base in ("token_embd", "position_embd", "token_types", "per_layer_token_embd"):
        return "get_rows"
    if base.endswith(("_exps", "_chexps")):
        return "mul_mat_id"
    return "mul_mat" if len(t.shape) >= 2 else "other"


def resolve_target(target: str, devices: list[Device], all_devices: list[Device]) -> str:
    """The gpulab device name a rule's buffer type means: 'CPU' (the host), a device's gpulab name,
    or llama.cpp's buffer type name ('CUDA0', 'RPC0[127.0.0.1:50052]'). ConfigError for a name no
    device has, and for a device the model does not use (the scheduler would have no backend to
    run its tensors' ops on)."""
    if target == HOST_NAME:
        return HOST_NAME
    found = next((d for d in all_devices if d.name == target or llama_buffer_type_name(d) == target), None)
    if found is None:
        rpc = parse_llama_rpc_buffer_type(target)
        if rpc is not None:
            found = next((d for d in all_devices if d.kind == "rpc" and d.endpoint == rpc[1]
                          and d.server_index == rpc[0]), None)
    if found is None:
        have = ", ".join(["CPU"] + [f"{d.name} ({llama_buffer_type_name(d)})" if d.kind == "rpc" else d.name
                                    for d in all_devices])
        raise ConfigError(f"tensor override buffer type {target!r} is no device here (llama.cpp: unknown buffer "
                          f"type); available: {have}")
    if found.name not in {d.name for d in devices}:
        raise ConfigError(f"tensor override to {target}: {found.name} is not one of the devices the model uses "
                          f"({', '.join(d.name for d in devices) or 'none'}); add it with --device or drop the rule")
    return found.name


# -- matching, cached ---------------------------------------------------------------------------
_BLK = re.compile(r"blk\.\d+\.")
_CACHE: dict[int, tuple[weakref.ref, dict]] = {}


def _literal_prefix(pattern: str) -> str:
    """A literal every match must contain: the pattern's leading run of plain characters (escaped
    punctuation included), when the pattern has no alternation at its top level. '' otherwise."""
    depth = 0
    for i, ch in enumerate(pattern):
        if ch == "\\":
            continue
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "|" and depth == 0 and (i == 0 or pattern[i - 1] != "\\"):
            return ""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
            out.append(pattern[i + 1])
            i += 2
            continue
        if ch in ".[]()*+?{}|^$\\":
            if ch in "*?{" and out:     # the quantifier makes the last character optional
                out.pop()
            break
        out.append(ch)
        i += 1
    return "".join(out)


def _all_tensors(profile: ModelProfile) -> list[TensorInfo]:
    return [*profile.input_tensors, *(t for layer in profile.layers for t in layer.tensors), *profile.output_tensors]


# sub-caches kept when the table is cleared (see _memo)
_MEMOS = ("pattern-matches", "group", "where", "placed", "by-block", "rules-of", "groups-of")


def _table(profile: ModelProfile) -> dict:
    """This profile's cache (rule matches, tensor groups), dropped with the profile."""
    hit = _CACHE.get(id(profile))
    if hit is None or hit[0]() is not profile:
        pid = id(profile)
        hit = (weakref.ref(profile, lambda _r: _CACHE.pop(pid, None)), {})
        _CACHE[pid] = hit
    if len(hit[1]) > 128:
        keep = {k: hit[1][k] for k in _MEMOS if k in hit[1]}
        hit[1].clear()
        hit[1].update(keep)
    return hit[1]


def _memo(profile: ModelProfile, name: str, limit: int = 20000) -> dict:
    """A sub-cache of this profile's table that survives the table's clearing (fit's dry runs add
    one rule at a time: what one pattern matches, or one layer's group, is asked for again and
    again); bounded on its own."""
    table = _table(profile)
    memo = table.get(name)
    if memo is None or len(memo) > limit:
        memo = table[name] = {}
    return memo


def _matches(profile: ModelProfile, pattern: str, memo: dict | None = None) -> tuple[str, ...]:
    """Every tensor name `pattern` finds (std::regex_search), in the model's order."""
    memo = _memo(profile, "pattern-matches") if memo is None else memo
    got = memo.get(pattern)
    if got is not None:
        return got
    lit = _literal_prefix(pattern)
    blk = _BLK.search(lit)
    if blk:
        pool = _by_block(profile).get(blk.group(0), [])
    else:
        pool = [t.name for t in _all_tensors(profile)]
    rx = _compile(pattern)
    got = memo[pattern] = tuple(n for n in pool if (not lit or lit in n) and rx.search(n))
    return got


def _by_block(profile: ModelProfile) -> dict[str, list[str]]:
    """'blk.N.' -> every tensor name holding that block token, in the model's order (cached per
    profile): the names a pattern with a literal block number can match."""
    table = _table(profile)
    got = table.get("by-block")
    if got is None:
        got = table["by-block"] = {}
        for t in _all_tensors(profile):
            for tok in dict.fromkeys(m.group(0) for m in _BLK.finditer(t.name)):
                got.setdefault(tok, []).append(t.name)
    return got


def _rule_of(profile: ModelProfile, rules: tuple[OverrideRule, ...]) -> dict[str, int]:
    """tensor name -> index of the rule that decides it (first match), for matched tensors only."""
    table = _memo(profile, "rules-of", 2048)       # kept across fits: its rule lists recur at another -c
    key = tuple(r.pattern for r in rules)
    got = table.get(key)
    if got is not None:
        return got
    decided: dict[str, int] = {}
    memo = _memo(profile, "pattern-matches")
    for i, r in enumerate(rules):
        for n in _matches(profile, r.pattern, memo):
            if n not in decided:
                decided[n] = i
    table[key] = decided
    return decided


@dataclass(frozen=True)
class _Group:
    """Tensors that go together unless a rule moves them (a layer's, the input's, the output's),
    less those a rule decides, summarised for the host's buffers."""
    n_bytes: int
    expert_bytes: int
    repack_bytes: int          # padded CPU_REPACK copies, where repacking applies
    mapped_span: tuple[int, int] | None     # (first offset, last end) of what is mapped otherwise
    all_span: tuple[int, int] | None        # ... of all of them (no repacking)
    # the tensors rules decide, by rule (in order of first use): (the rule's pattern, tensors, their
    # names, bytes, expert bytes, file span), so placing them costs one step per rule, not per
    # tensor. The pattern, not the rule's index: fit adds one rule at a time, which shifts the
    # indices of the rules after it but leaves what each pattern decides in a group alone
    decided: tuple[tuple[str, tuple[TensorInfo, ...], tuple[str, ...], int, int, tuple[int, int]], ...]


def _span(ts) -> tuple[int, int] | None:
    ts = list(ts)
    return (min(t.offset for t in ts), max(t.offset + t.n_bytes for t in ts)) if ts else None


def _pad32(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _group(tensors, decided: dict[str, str], repack_types: frozenset[str], *, output: bool) -> _Group:
    """decided: tensor name -> the pattern of the rule that decides it."""
    rest = [t for t in tensors if t.name not in decided]
    rep = [t for t in rest if repackable(t, _op(t, as_output=output), repack_types)]
    rep_names = {t.name for t in rep}
    return _Group(n_bytes=sum(t.n_bytes for t in rest), expert_bytes=sum(t.n_bytes for t in rest if t.is_expert),
                  repack_bytes=sum(_pad32(t.n_bytes) for t in rep),
                  mapped_span=_span(t for t in rest if t.name not in rep_names), all_span=_span(rest),
                  decided=_by_rule([(t, decided[t.name]) for t in tensors if t.name in decided]))


def _by_rule(pairs):
    out: dict[str, list[TensorInfo]] = {}
    for t, i in pairs:
        out.setdefault(i, []).append(t)
    return tuple((i, tuple(ts), tuple(t.name for t in ts), sum(t.n_bytes for t in ts),
                  sum(t.n_bytes for t in ts if t.is_expert), _span(ts)) for i, ts in out.items())


def _groups(profile: ModelProfile, rules: tuple[OverrideRule, ...], repack_types: frozenset[str]):
    """(input group, layer groups, output group), cached per profile, rules and repack types."""
    table = _memo(profile, "groups-of", 2048)
    key = (tuple(r.pattern for r in rules), repack_types)
    got = table.get(key)
    if got is None:
        index = _rule_of(profile, rules) if rules else {}
        pats = [r.pattern for r in rules]
        decided: dict[str, str] = {n: pats[i] for n, i in index.items()}
        memo = _memo(profile, "group")

        def group(where, tensors, output: bool) -> _Group:
            # a group depends only on which of its own tensors rules decide, and by which pattern
            sig = (where, tuple((t.name, decided[t.name]) for t in tensors if t.name in decided), repack_types, "all")
            g = memo.get(sig)
            if g is None:
                g = memo[sig] = _group(tensors, decided, repack_types, output=output)
            return g

        # a layer group's signature from the decided tensors alone (fit's rules name one layer
        # each: most groups have none); its pairs come in rule order, then the model's order, so
        # the same decided set always gives the same signature
        where = _where(profile)
        by_group: dict[object, list[tuple[str, str]]] | None = None
        if where is not None:
            by_group = {}
            for n, pat in decided.items():
                by_group.setdefault(where[n], []).append((n, pat))

        def layer_group(i: int, tensors) -> _Group:
            if by_group is None:
                return group(i, tensors, False)
            pairs = by_group.get(i, ())
            sig = (i, tuple(pairs), repack_types)
            g = memo.get(sig)
            if g is None:
                g = memo[sig] = _group(tensors, dict(pairs), repack_types, output=False)
            return g

        got = table[key] = (
            group("input", profile.input_tensors, False),
            tuple(layer_group(i, layer.tensors) for i, layer in enumerate(profile.layers)),
            group("output", profile.output_tensors, True))
    return got


def _where(profile: ModelProfile) -> dict[str, str | int] | None:
    """tensor name -> its group ('input', the layer index, 'output'), cached per profile; None when
    a name is in two groups (then every group is read tensor by tensor)."""
    table = _table(profile)
    if "where" not in table:
        out: dict[str, str | int] = {}
        pairs: list[tuple[str | int, TensorInfo]] = [
            *(("input", t) for t in profile.input_tensors),
            *((i, t) for i, layer in enumerate(profile.layers) for t in layer.tensors),
            *(("output", t) for t in profile.output_tensors)]
        for w, t in pairs:
            out[t.name] = w
        table["where"] = out if len(out) == len(pairs) else None
    return table["where"]


def place_tensors(profile: ModelProfile, rules: tuple[OverrideRule, ...], layer_devices: list[str],
                  devices: list[Device], all_devices: list[Device], *, host_buffer: bool, use_extra_bufts: bool,
                  repack_types: frozenset[str]) -> TensorPlacement:
    """Every tensor's device, and the host's buffers as llama.cpp allocates them.

    layer_devices: the layer split (n_layer + 1 entries, the last the output layer); devices: the
    model's offload devices; all_devices: every device llama.cpp sees (a rule may name any);
    host_buffer: the first model device has a pinned host buffer type (a GPU, not an RPC server).
    O(layers + decided tensors) per call: the per-tensor work is cached per profile and rules."""
    by_name: dict[str, str] = {}        # many rules, few targets (fit writes one rule per layer)
    for r in rules:
        if r.target not in by_name:
            by_name[r.target] = resolve_target(r.target, devices, all_devices)
    targets = {i: by_name[r.target] for i, r in enumerate(rules)}
    first_rule: dict[str, int] = {}   # pattern -> the first rule with it (a later twin decides nothing)
    for k, r in enumerate(rules):
        first_rule.setdefault(r.pattern, k)
    repacking = use_extra_bufts and not host_buffer
    g_in, g_layers, g_out = _groups(profile, rules, repack_types if repacking else frozenset())
    weights: dict[str, int] = {}
    experts: dict[str, int] = {}
    moved: dict[str, str] = {}
    per_rule: dict[int, list[tuple[tuple[str, ...], int]]] = {}    # (names, bytes) per group, in order
    spans: list[tuple[int, int]] = []
    repack = 0
    host_bytes = 0

    def add(dev: str, n: int, e: int) -> None:
        weights[dev] = weights.get(dev, 0) + n
        if e:
            experts[dev] = experts.get(dev, 0) + e

    def host_tensor(t: TensorInfo, output: bool) -> None:
        nonlocal repack, host_bytes
        host_bytes += t.n_bytes
        if t.is_expert:
            experts[HOST_NAME] = experts.get(HOST_NAME, 0) + t.n_bytes
        if repacking and repackable(t, _op(t, as_output=output), repack_types):
            repack += _pad32(t.n_bytes)
        else:
            spans.append((t.offset, t.offset + t.n_bytes))

    def place(g: _Group, home: str, *, output: bool = False) -> None:
        nonlocal repack, host_bytes
        if not g.decided and home != HOST_NAME:      # most layers: their whole group on their device
            weights[home] = weights.get(home, 0) + g.n_bytes
            if g.expert_bytes:
                experts[home] = experts.get(home, 0) + g.expert_bytes
            return
        if home == HOST_NAME:
            host_bytes += g.n_bytes
            if g.expert_bytes:
                experts[HOST_NAME] = experts.get(HOST_NAME, 0) + g.expert_bytes
            repack += g.repack_bytes
            span = g.mapped_span if repacking else g.all_span
            if span:
                spans.append(span)
        else:
            add(home, g.n_bytes, g.expert_bytes)
        for pat, ts, names, n_bytes, e_bytes, span in g.decided:
            i = first_rule[pat]
            dev = targets[i]
            per_rule.setdefault(i, []).append((names, n_bytes))
            if dev != home:
                moved.update(dict.fromkeys(names, dev))
            if dev != HOST_NAME:
                add(dev, n_bytes, e_bytes)
            elif repacking:
                for t in ts:
                    host_tensor(t, output)
            else:
                host_bytes += n_bytes
                if e_bytes:
                    experts[HOST_NAME] = experts.get(HOST_NAME, 0) + e_bytes
                spans.append(span)

    place(g_in, HOST_NAME)
    for layer, g in zip(profile.layers, g_layers):
        place(g, layer_devices[layer.index])
    out_dev = layer_devices[profile.n_layer]
    place(g_out, out_dev, output=True)
    emb = profile.token_embd
    if profile.tied_output and emb is not None:
        # TENSOR_DUPLICATED: token_embd again, as the output matrix, in the output layer's list;
        # the same override decides it (the name is the same). Where that buffer is the input
        # copy's, llama.cpp reuses the tensor (create_tensor) instead of making a second copy.
        decided = _rule_of(profile, rules) if rules else {}
        i = decided.get(emb.name)
        dev = targets[i] if i is not None else out_dev
        first = moved.get(emb.name, HOST_NAME)
        if dev != HOST_NAME and dev != first:
            add(dev, emb.n_bytes, 0)
        elif dev == HOST_NAME and repacking and repackable(emb, "mul_mat", repack_types):
            repack += _pad32(emb.n_bytes)     # the output copy is repacked; the GET_ROWS original stays mapped
    span = (max(b for _, b in spans) - min(a for a, _ in spans)) if spans else 0
    weights[HOST_NAME] = span + repack

    matches, notes = [], []
    for i, r in enumerate(rules):
        got = per_rule.get(i, [])
        names = got[0][0] if len(got) == 1 else tuple(n for chunk, _ in got for n in chunk)
        matches.append(RuleMatch(r, targets[i], names, sum(b for _, b in got)))
        if not got and r.source == "-ot":
            notes.append(f"tensor override {r.text!r} matches no tensor of this model (or earlier rules take "
                         "them all); llama.cpp ignores it, but it still turns pipeline parallelism off")
    return TensorPlacement(weights=weights, expert_weights=experts, moved=moved, matches=tuple(matches),
                           mapped_bytes=span, repack_bytes=repack, host_tensor_bytes=host_bytes, notes=tuple(notes))


def place_layers(profile: ModelProfile, rules: tuple[OverrideRule, ...], layer_devices: list[str],
                 devices: list[Device], all_devices: list[Device], *, host_buffer: bool, use_extra_bufts: bool,
                 repack_types: frozenset[str]):
    """(place_tensors, compute_sites) of one layer split, cached per profile: neither depends on the
    context, the batch or the KV types, so fit's dry runs at another -c (its context step, or the
    lab's next -c) and its repeated splits are looked up, not placed again. The placement is
    shared between the plans that ask for it: read it, never change it."""
    memo = _memo(profile, "placed")
    key = (tuple(rules), tuple(layer_devices), _names(devices), _names(all_devices), host_buffer, use_extra_bufts,
           repack_types)
    got = memo.get(key)
    if got is None:
        if len(memo) >= 512:
            memo.clear()
        tp = place_tensors(profile, rules, layer_devices, devices, all_devices, host_buffer=host_buffer,
                           use_extra_bufts=use_extra_bufts, repack_types=repack_types)
        # the FFN sites of the graph, which runs the trunk only (MTP off: nextn layers are placed, not run)
        trunk = profile.trunk
        graph_devices = list(layer_devices[:trunk.n_layer]) + [layer_devices[-1]]
        got = memo[key] = (tp, compute_sites(trunk, graph_devices, tp.moved))
    tp, (ffn, stray, partial, split) = got
    return tp, (list(ffn), stray, dict(partial), split)


def _names(devices: list[Device]) -> tuple:
    """What of the devices placing tensors reads (resolve_target: names, RPC endpoints)."""
    return tuple((d.name, d.kind, d.endpoint, d.server_index) for d in devices)


def rule_matches(profile: ModelProfile, rules: tuple[OverrideRule, ...]) -> tuple[RuleMatch, ...]:
    """What each rule decides in this model (first match wins), without devices: the target is
    the rule's buffer type as written (`gpulab inspect -ot`)."""
    decided = _rule_of(profile, tuple(rules)) if rules else {}
    per_rule: dict[int, list[TensorInfo]] = {}
    for t in _all_tensors(profile):
        i = decided.get(t.name)
        if i is not None:
            per_rule.setdefault(i, []).append(t)
    return tuple(RuleMatch(r, r.target, tuple(t.name for t in per_rule.get(i, ())),
                           sum(t.n_bytes for t in per_rule.get(i, ()))) for i, r in enumerate(rules))


def _is_ffn(t: TensorInfo) -> bool:
    base = t.name.split(".", 2)[-1]
    return t.is_expert or base.startswith(("ffn_up.", "ffn_gate.", "ffn_down."))


def _layer_kinds(profile: ModelProfile) -> tuple[tuple[tuple[tuple[str, int, str], ...], tuple[str, ...]], ...]:
    """Per layer, ((name, bytes, FFN product) of its FFN tensors, names of its other tensors but norms),
    cached per profile: compute_sites runs once per plan, fit plans ~45 times."""
    table = _table(profile)
    got = table.get("kinds")
    if got is None:
        got = table["kinds"] = tuple(
            (tuple((t.name, t.n_bytes, _ffn_part(t.name)) for t in layer.tensors if _is_ffn(t)),
             tuple(t.name for t in layer.tensors if not _is_ffn(t) and "norm" not in t.name))
            for layer in profile.layers)
    return got


def _ffn_part(name: str) -> str:
    """'gate', 'up' or 'down': which of the FFN's products a weight (or its bias) belongs to."""
    base = name.split(".", 2)[-1].split(".")[0]      # ffn_gate_exps, ffn_up, ffn_down_chexps, ...
    part = base[len("ffn_"):].split("_")[0]
    return "gate" if part == "gate" and "gate_up" not in base else ("up" if "up" in base else part)


FfnMoved = tuple[tuple[int, str, str], ...]


def compute_sites(profile: ModelProfile, layer_devices: list[str],
                  moved: dict) -> tuple[list[str], frozenset[str], dict[str, frozenset[str]], FfnMoved | None]:
    """(the device each layer's FFN runs on, the devices that run other ops of layers not theirs,
    the devices that run only some of a layer's FFN products: device -> the largest set of them,
    'gate', 'up', 'down', and each FFN weight away from its layer as (layer, name, device), name as
    'ffn_up_exps', 'ffn_gate_inp', 'ffn_down_shexp', 'exp_probs_b': None where a weight outside the FFN
    left its layer): an op runs where its weight is (ggml_backend_sched_backend_id_from_cur), so moving a
    layer's experts (or dense FFN) moves its FFN, moving one of its three expert tensors moves that product
    alone, and moving one attention matrix moves that product. fit's overflow patterns move FFN weights
    only, the router and the shared expert's among them (common/fit.cpp get_overflow_pattern)."""
    ffn = list(layer_devices[:profile.n_layer])
    stray = set()
    partial: dict[str, frozenset[str]] = {}
    ffn_moved: list[tuple[int, str, str]] | None = []
    if not moved:
        return ffn, frozenset(), partial, ()
    get = moved.get
    kinds = _layer_kinds(profile)
    # only layers with a moved tensor can run anything away from home ('blk.<il>.' names)
    group_of = _where(profile)
    if group_of is not None:
        touched = sorted({w for w in map(group_of.get, moved) if isinstance(w, int)})
    else:
        touched = sorted({int(n.split(".", 2)[1]) for n in moved if n.startswith("blk.")})
    for il in touched:
        if il >= len(kinds):
            continue
        ffn_tensors, others = kinds[il]
        home = layer_devices[il]
        for name in others:
            dev = get(name)
            if dev is not None and dev != home:
                stray.add(dev)
                base, kind = name.split(".", 2)[-1].rsplit(".", 1)
                if not base.startswith(("ffn_", "exp_probs_b")):
                    ffn_moved = None
                elif ffn_moved is not None and (kind == "weight" or base == "exp_probs_b"):
                    ffn_moved.append((il, base, dev))
        for name, _n_bytes, _part in ffn_tensors:
            dev = get(name, home)
            if dev != home and ffn_moved is not None and name.endswith(".weight"):
                ffn_moved.append((il, name.split(".", 2)[-1].rsplit(".", 1)[0], dev))
        if not ffn_tensors:
            continue
        where: dict[str, int] = {}
        for name, n_bytes, _part in ffn_tensors:
            dev = get(name, home)
            where[dev] = where.get(dev, 0) + n_bytes
        if len(where) == 1:
            ffn[il] = next(iter(where))
            continue
        site = ffn[il] = max(where, key=lambda d: where[d])
        parts: dict[str, set[str]] = {}      # a layer split over devices: which products run where
        for name, _n_bytes, part in ffn_tensors:
            parts.setdefault(get(name, home), set()).add(part)
        for dev, ps in parts.items():
            if dev != site and len(ps) > len(partial.get(dev, ())):
                partial[dev] = frozenset(ps)
    return ffn, frozenset(stray), partial, None if ffn_moved is None else tuple(ffn_moved)
