"""What crosses each host's link per generated token and per prompt, and what it costs, when a
model is split over RPC servers on other hosts (gpulab.core.cluster).

How llama.cpp moves data (vendored ggml/src/ggml-rpc/ggml-rpc.cpp and ggml-backend.cpp's
ggml_backend_sched_compute_splits):
- The scheduler runs the graph splits one after another, one split per run of layers on one
  device. Each split's inputs are copied to its device first: the activations from the split
  before (n_embd x tokens, F32; for the first split the token embeddings, computed on the head,
  where token_embd lives) and the graph's inputs (positions, the KQ mask of n_kv x tokens, the KV
  cache's row indices), each a SET_TENSOR over that host's link.
- Between two RPC servers the copy goes through the head: the RPC backend has no
  cpy_tensor_async, and ggml_backend_rpc_buffer_cpy_tensor copies server-side (COPY_TENSOR) only
  when both tensors are on the same server (`src_ctx->dispatcher != dst_ctx->dispatcher` returns
  false otherwise); ggml_backend_tensor_copy then GET_TENSORs the activations to the head and
  SET_TENSORs them to the next server: down one link and up the other, even for two servers
  on one host.
- GRAPH_COMPUTE is one command (GRAPH_RECOMPUTE, 4 bytes, when the graph is the one sent last:
  generation reuses its graph); it has no answer, so the round trip a split costs is the
  GET_TENSOR of its output (activations for the next split, or the logits from the output
  layer's device: n_vocab x 4 bytes per token that asks for them), which waits for the compute.
- -sm tensor: each all-reduce stage gets every member's partial sums to the head and sets them
  to its partner (ggml-backend-meta.cpp's allreduce_fallback through RPC buffers): per member
  and stage one round trip and n_embd x tokens x 4 bytes each way. And the meta device runs
  each layer as several small graphs (about 4 per layer, 16 more around them), a different one
  each time, so each is a full GRAPH_COMPUTE, never a GRAPH_RECOMPUTE; serialize_graph sends
  every tensor a graph's nodes reach through their sources (add_tensor recurses), which reaches
  back through the earlier layers: the graph at layer l carries about 31 x l + 33 tensors of 296
  bytes. Counted on a server's debug log (SmolLM2-135M, two members: 136 graphs and 65552
  tensors per token, 19.4 MB per member): the term grows with the square of the layers and
  dwarfs everything else over a network.
- A split's graph inputs, each its own SET_TENSOR: positions (I32), the K and V cache's row
  indices (I64; llama_kv_cache::build_input_v_idxs gives V one index per element of a row,
  n_embd_v_gqa per token, when V is transposed, i.e. flash attention off: 98 KB for a 64-token
  SmolLM2 prompt, as much as the KQ mask), the KQ mask (n_kv x tokens, F32, F16 with flash
  attention) and, on the output's split, the output ids (I32 per output).
Checked against the byte counters and the command parser of gpulab.netem's proxies
(tests/integration/test_hosts_vs_llama.py, bench/hosts_pp.py): every command's header is
counted from ggml-rpc.cpp's messages (a command byte and a u64 size; SET_TENSOR: rpc_tensor and
a cache flag and an offset (serialize_set_tensor); GET_TENSOR: rpc_tensor, offset and size, its
answer a u64 size; GRAPH_RECOMPUTE: a device id), within 0.1%
per token and per prompt.

Cost of a link per step: round trips x its RTT + bytes / its rate (both directions share the
rate's budget one way each; the data of a step are sent in sequence, so they add). The head's
own devices cost nothing here (their copies are the speed model's hops).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..cluster import Cluster
from ..devices import HOST_NAME
from ..placement.plan import Plan
from .speed import LinkSpeed, SpeedModel, SpeedPrediction, allreduce_stages, predict_speed

__all__ = ["LinkUse", "NetworkCost", "network_cost", "predict_over", "split_inputs_up", "TERMS"]

_RPC_TENSOR_BYTES = 296         # sizeof(rpc_tensor), ggml-rpc.cpp
_CMD_HEADER = 1 + 8             # send_rpc_cmd: the command byte and the u64 request size
SET_TENSOR_HEADER = _CMD_HEADER + _RPC_TENSOR_BYTES + 1 + 8             # + cache flag, offset: 314 bytes
GET_TENSOR_REQUEST = _CMD_HEADER + _RPC_TENSOR_BYTES + 8 + 8            # + offset, size: 321 bytes
GRAPH_RECOMPUTE_REQUEST = _CMD_HEADER + 4                               # the device id: 13 bytes
_ANSWER_HEADER = 8              # a response's u64 size
_KV_PAD = 256                   # llama_kv_cache::get_n_kv pads the cells it reads to 256
TERMS = ("round trips", "activations", "logits", "inputs", "all-reduce", "graphs")
# -sm tensor over RPC, per member and step (measured, see the module docstring): graphs per layer,
# graphs besides, tensors a layer adds to every later graph, tensors of a graph besides
_TP_GRAPHS_PER_LAYER, _TP_GRAPHS_EXTRA, _TP_TENSORS_PER_LAYER, _TP_TENSORS_BASE = 4, 16, 31, 33

@dataclass
class LinkUse:
    """One host's link over one test (tg: per token; pp: the whole prompt)."""
    host: str
    round_trips: float = 0.0
    up: dict = field(default_factory=lambda: dict.fromkeys(TERMS[1:], 0.0))     # head -> host, bytes
    down: dict = field(default_factory=lambda: dict.fromkeys(TERMS[1:], 0.0))   # host -> head, bytes
    seconds: dict = field(default_factory=lambda: dict.fromkeys(TERMS, 0.0))

    @property
    def bytes_up(self) -> float:
        return sum(self.up.values())

    @property
    def bytes_down(self) -> float:
        return sum(self.down.values())

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


@dataclass(frozen=True)
class NetworkCost:
    tg: dict            # host -> LinkUse per generated token
    pp: dict            # host -> LinkUse for the whole prompt
    n_prompt: int
    n_gen: int

    @property
    def tg_seconds(self) -> float:
        return sum(u.total_seconds for u in self.tg.values())

    @property
    def pp_seconds(self) -> float:
        return sum(u.total_seconds for u in self.pp.values())

    def dominant(self, kind: str = "tg") -> str:
        """The term ('round trips', 'logits', ...) that costs most over all links."""
        uses = (self.tg if kind == "tg" else self.pp).values()
        by_term = {t: sum(u.seconds[t] for u in uses) for t in TERMS}
        return max(by_term, key=lambda t: by_term[t]) if any(by_term.values()) else "none"


def _splits(plan: Plan) -> list[str]:
    """The devices of the scheduler's splits in order: runs of consecutive layers on one device
    (the output layer last)."""
    out: list[str] = []
    for d in plan.layer_devices:
        if not out or out[-1] != d:
            out.append(d)
    return out


def _n_kv(cells_used: int, kv_cells: int) -> int:
    return min(kv_cells, max(_KV_PAD, -(-cells_used // _KV_PAD) * _KV_PAD))


def _step(plan: Plan, cluster: Cluster, host_of: dict, endpoint_of: dict, uses: dict, *, tokens: int,
          n_out: int, n_kv: int, times: float) -> None:
    """Add `times` steps of `tokens` tokens (n_out of them asking for logits) to uses."""
    prof = plan.profile
    act = 4.0 * prof.n_embd * tokens
    splits = _splits(plan)
    ts = plan.tensor_parallel
    for i, split_dev in enumerate(splits):
        # -sm tensor: the meta device's split runs on every member; the first member returns its output
        members = list(ts.devices) if ts is not None and split_dev == ts.meta_name else [split_dev]
        for j, dev in enumerate(members):
            host = host_of.get(dev, cluster.head)
            if host == cluster.head or dev == HOST_NAME:
                continue
            u = uses[host]
            prev = splits[i - 1] if i else None
            same_server = prev is not None and endpoint_of.get(prev) == endpoint_of.get(dev)
            if same_server:
                u.round_trips += times          # COPY_TENSOR on the server, answered
            else:
                u.up["activations"] += times * act
            last = i == len(splits) - 1
            u.up["inputs"] += times * split_inputs_up(plan, tokens=tokens, n_kv=n_kv, n_out=n_out if last else 0,
                                                      activations=not same_server, answer=not last or n_out > 0)
            if j == 0 and last:
                u.down["logits"] += times * (4.0 * prof.n_vocab * n_out + _ANSWER_HEADER * (n_out > 0))
            elif j == 0 and endpoint_of.get(splits[i + 1]) != endpoint_of.get(dev):
                u.down["activations"] += times * (act + _ANSWER_HEADER)
            if not last or n_out:
                u.round_trips += times          # the GET_TENSOR that waits for this split's compute
    if ts is not None:
        n_layers = sum(1 for d in plan.layer_devices[:prof.n_layer] if d == ts.meta_name)
        stages = allreduce_stages(len(ts.devices)) * 2 * n_layers
        tensors = (_TP_GRAPHS_PER_LAYER * sum(_TP_TENSORS_PER_LAYER * il + _TP_TENSORS_BASE for il in range(n_layers))
                   + _TP_GRAPHS_EXTRA * (_TP_TENSORS_PER_LAYER * (n_layers // 2) + _TP_TENSORS_BASE))
        for member in ts.devices:
            host = host_of.get(member, cluster.head)
            if host == cluster.head:
                continue
            u = uses[host]
            u.round_trips += times * stages
            u.up["all-reduce"] += times * stages * act
            u.down["all-reduce"] += times * stages * act
            u.up["graphs"] += times * tensors * _RPC_TENSOR_BYTES


def split_inputs_up(plan: Plan, *, tokens: int, n_kv: int, n_out: int, activations: bool = True,
                    answer: bool = True) -> int:
    """Bytes one split sends up per step besides its activations' data: its graph inputs with
    their SET_TENSOR headers, the activations' header (activations: they come by SET_TENSOR, not
    by a COPY_TENSOR on the same server, counted as a round trip), the GET_TENSOR request (answer:
    something is read back) and GRAPH_RECOMPUTE. n_out: outputs asked of this split (its output
    ids; 0 for a split without the output layer)."""
    prof = plan.profile
    fa = plan.config.flash_attn != "off"        # 'auto' resolves to on for CPU, CUDA and RPC
    v_row = 1 if fa else prof.max_n_embd_v_gqa  # build_input_v_idxs: one index per V element when transposed
    data = [4 * tokens, 8 * tokens, 8 * tokens * v_row, (2 if fa else 4) * n_kv * tokens]
    if n_out:
        data.append(4 * n_out)
    return (sum(data) + (len(data) + activations) * SET_TENSOR_HEADER
            + answer * GET_TENSOR_REQUEST + GRAPH_RECOMPUTE_REQUEST)


def _price(cluster: Cluster, uses: dict) -> None:
    for host, u in uses.items():
        link = cluster.link_of(host)
        u.seconds["round trips"] = u.round_trips * link.rtt_s
        for t in TERMS[1:]:
            u.seconds[t] = (u.up[t] + u.down[t]) / link.bytes_per_s


def network_cost(plan: Plan, cluster: Cluster, host_of: dict, endpoint_of: dict, *, n_prompt: int = 512,
                 n_gen: int = 128, n_past: int | None = None) -> NetworkCost:
    """Per link: what a tg{n_gen} token (at depth n_past, default n_gen // 2) and a pp{n_prompt}
    prompt (decoded in n_batch calls of n_ubatch steps, logits for the last token of each call,
    as llama-bench asks) send and cost. host_of / endpoint_of: device name -> host / RPC endpoint
    (Cluster.devices gives them)."""
    remote = {h for d, h in host_of.items() if h != cluster.head}
    tg = {h: LinkUse(h) for h in sorted(remote)}
    pp = {h: LinkUse(h) for h in sorted(remote)}
    past = n_gen // 2 if n_past is None else n_past
    _step(plan, cluster, host_of, endpoint_of, tg, tokens=1, n_out=1, n_kv=_n_kv(past + 1, plan.kv_cells), times=1)
    cfg = plan.config
    nb = max(1, min(cfg.n_batch, cfg.n_ctx))
    ub = cfg.effective_n_ubatch
    done = 0
    while done < n_prompt:                      # each llama_decode call
        call = min(nb, n_prompt - done)
        k = 0
        while k < call:                         # its ubatches
            t = min(ub, call - k)
            _step(plan, cluster, host_of, endpoint_of, pp, tokens=t, n_out=1 if k + t == call else 0,
                  n_kv=_n_kv(done + k + t, plan.kv_cells), times=1)
            k += t
        done += call
    _price(cluster, tg)
    _price(cluster, pp)
    return NetworkCost(tg=tg, pp=pp, n_prompt=n_prompt, n_gen=n_gen)


def predict_over(plan: Plan, cluster: Cluster, host_of: dict, endpoint_of: dict, model: SpeedModel | None = None,
                 *, n_prompt: int = 512, n_gen: int = 128, n_past: int | None = None,
                 bandwidth_hints: dict | None = None) -> tuple[SpeedPrediction, NetworkCost]:
    """predict_speed for a plan whose devices sit on the cluster's hosts: the devices' own times
    as predict_speed has them, hops between the head's own devices at the model's link, and every
    link to another host at its cost (network_cost) instead of a loopback hop. The prediction's
    hop_*_seconds hold the network's part."""
    model = model or SpeedModel()
    net = network_cost(plan, cluster, host_of, endpoint_of, n_prompt=n_prompt, n_gen=n_gen, n_past=n_past)
    on_remote = any(host_of.get(d, cluster.head) != cluster.head for d in plan.layer_devices)
    if not on_remote:   # the head alone: the plain prediction, hops at the model's link
        return predict_speed(plan, model, n_prompt=n_prompt, n_gen=n_gen, n_past=n_past,
                             bandwidth_hints=bandwidth_hints), net
    base = predict_speed(plan, _free_links(model), n_prompt=n_prompt, n_gen=n_gen, n_past=n_past,
                         bandwidth_hints=bandwidth_hints)
    tg_s = (1.0 / base.tg_tokens_per_s if base.tg_tokens_per_s else 0.0) + net.tg_seconds
    pp_s = (n_prompt / base.pp_tokens_per_s if base.pp_tokens_per_s else 0.0) + net.pp_seconds
    return replace(base, tg_tokens_per_s=1.0 / tg_s if tg_s else 0.0,
                   pp_tokens_per_s=n_prompt / pp_s if pp_s and n_prompt else 0.0,
                   hop_tg_seconds=base.hop_tg_seconds + net.tg_seconds,
                   hop_pp_seconds=base.hop_pp_seconds + net.pp_seconds), net


def _free_links(model: SpeedModel) -> SpeedModel:
    """The model with hops that cost nothing: the links are priced by network_cost. (Hops between
    two of the head's own GPUs are then free too: microseconds against a network's milliseconds.)"""
    return replace(model, link=LinkSpeed(latency_s=0.0, bytes_per_s=float("inf"), source=model.link.source,
                                         allreduce_latency_s=0.0))
