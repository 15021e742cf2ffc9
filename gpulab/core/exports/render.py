"""Exports: one SplitConfig rendered for llama-server/llama-cli, llama-bench, llama-cpp-python,
Ollama and KoboldCpp.

One table, `SPELLINGS`, has a row per SplitConfig field and a column per target; `render` walks
it and each target's assembler only lays out what the column returned. A setting a target
cannot express comes back as a `Gap` that says so, and ends up in `Export.gaps` (or, with
strict=True, in a ConfigError) instead of being dropped silently. The llama-cpp-python column is
also what `gpulab.runtime.params.llama_kwargs` returns, so the kwargs used in-process and the ones
exported cannot drift either.

Where each spelling comes from (the sources of the versions gpulab pins or cites):
- llama-server / llama-cli: llama.cpp common/arg.cpp (common_arg definitions);
- llama-bench: llama.cpp tools/llama-bench/llama-bench.cpp (parse_cmd_params): ',' separates
  values to sweep, so the devices of one -ts or -dev value are separated by '/';
- llama-cpp-python: llama_cpp.Llama.__init__ keywords (llama_cpp/llama.py);
- Ollama: api/types.go (Runner options, which Modelfile PARAMETER accepts), envconfig/config.go
  (server-wide OLLAMA_* variables), llama/llama.go NewContextParams (how num_ctx and num_batch
  reach llama.cpp);
- KoboldCpp: koboldcpp.py (argparse destinations; a .kcpps is `json.dumps(vars(args))`, read
  back by load_config_cli).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..config import SplitConfig
from ..devices import Device
from ..errors import ConfigError
from ..ggml_types import ggml_type_id
from ..settings import SPLIT_MODE_IDS

__all__ = ["TARGETS", "Export", "Gap", "Spelling", "SPELLINGS", "render", "render_all",
           "python_kwargs", "python_gaps", "cuda_visible_devices"]

TARGETS = ("llama-server", "llama-cli", "llama-bench", "python", "ollama", "koboldcpp")



class Gap:
    """A value a target cannot express; `why` says what the target does instead."""

    def __init__(self, why: str):
        self.why = why

    def __repr__(self) -> str:
        return f"Gap({self.why!r})"


@dataclass(frozen=True)
class _Ctx:
    config: SplitConfig
    n_layer: int | None                 # for "all layers" where a target has no word for it
    devices: tuple[Device, ...]         # offload devices llama.cpp sees (may be empty: unknown)

    def all_layers(self) -> int:
        # llama.cpp clamps n_gpu_layers to n_layer + 1 (llama_model_base::load_tensors), so any
        # larger count also means "all"; 999 is what KoboldCpp and Ollama users conventionally write
        return self.n_layer + 1 if self.n_layer is not None else 999

    def selected(self) -> list[Device] | None:
        """The devices llama.cpp will use, in its order (llama_prepare_model_devices, as the
        planner mirrors it); None when unknown."""
        if not self.devices and not self.config.devices:
            return None
        if self.config.devices == ("none",):
            return []
        if not self.devices:   # named with --device but not described: names only
            return [Device(n, 0, 0, "named", "gpu") for n in self.config.devices]
        from ..placement.planner import select_devices
        cfg = self.config
        if cfg.split_mode == "row":   # same devices, same order; whether row split works is the planner's call
            cfg = cfg.replace(split_mode="layer")
        return select_devices(list(self.devices), cfg)

    def used(self) -> list[Device] | None:
        """selected() less the devices a tensor_split gives no share: those that hold layers."""
        chosen = self.selected()
        ts = self.config.tensor_split
        if chosen is None or self.config.split_mode in ("none", "tensor") or not any(ts):
            return chosen       # -sm tensor: a member with no share is still one of the meta device's
        return [d for i, d in enumerate(chosen) if i < len(ts) and ts[i] > 0]


def _num(x: float) -> str:
    """3.0 -> '3', 0.4375 -> '0.4375': the shortest text std::stof reads back exactly."""
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


# -- the cells ------------------------------------------------------------------------------------
# A cell is (value, ctx) -> what the target needs, None (nothing to write), or a Gap.
Cell = Callable[[Any, _Ctx], Any]


def _flag(name: str, fmt: Callable[[Any], str] = str) -> Cell:
    return lambda v, _c: [name, fmt(v)]


def _none(_v, _c):
    return None


# llama-server / llama-cli (common/arg.cpp) ----------------------------------------------------
def _server_ngl(v, _c):
    # "-ngl auto" (-1) lets common_fit_params choose; "all" (-2) offloads everything, as
    # llama_model::n_gpu_layers reads any negative count
    return ["-ngl", "all" if v < 0 else str(v)]


def _server_ts(v, _c):
    return ["-ts", ",".join(_num(x) for x in v)] if any(v) else None


def _process_names(v, c) -> list[str]:
    """--device names as the exported process will see them. RPC devices are named RPC<n> by a
    counter over the servers in the order they are registered (ggml_backend_rpc_add_server in
    ggml-rpc.cpp), and the process gets --rpc with only the servers it uses: a device that is
    RPC1 where gpulab planned may be RPC0 there."""
    if not v or v == ("none",) or not c.devices:
        return list(v)
    by_name = {d.name: d for d in c.devices}
    order = _rpc_servers(c)
    per_server = {ep: sum(1 for d in c.devices if d.kind == "rpc" and d.endpoint == ep) for ep in order}
    out = []
    for name in v:
        d = by_name.get(name)
        if d is not None and d.kind == "rpc" and d.endpoint in per_server:
            before = sum(per_server[ep] for ep in order[:order.index(d.endpoint)])
            out.append(f"RPC{before + d.server_index}")
        else:
            out.append(name)
    return out


def _server_devices(v, c):
    return ["--device", ",".join(_process_names(v, c))] if v else None   # 'none': parse_device_list's "no offload"


# llama-bench (tools/llama-bench/llama-bench.cpp) -------------------------------------------------
def _bench_ts(v, _c):
    return ["-ts", "/".join(_num(x) for x in v)] if any(v) else None


def _bench_devices(v, c):
    return ["-dev", "/".join(_process_names(v, c))] if v else None   # parse_devices_arg: 'dev0/dev1', or 'none'


def _bench_ctx(v, _c):
    # cmd_params_instance::to_llama_cparams: n_ctx = n_prompt + n_gen + n_depth
    return Gap(f"-c {v}: llama-bench has no -c; it sizes the context to n_prompt + n_gen + n_depth "
               "(-p, -n, -d), so its KV cache is smaller than this config's")


def _bench_seq(v, _c):
    return Gap(f"-np {v}: llama-bench decodes one sequence") if v != 1 else None


def _bench_swa(v, _c):
    return Gap("--swa-full: llama-bench always uses the sliding-window KV cache (swa_full = false)") if v else None


# llama-cpp-python (llama_cpp.Llama keywords) ------------------------------------------------
def _py(kwarg: str, fmt: Callable[[Any], Any] = lambda v: v) -> Cell:
    return lambda v, _c: (kwarg, fmt(v))


def _py_ts(v, _c):
    return ("tensor_split", list(v)) if v else None


def _py_fa(v, _c):
    # Llama(flash_attn: bool) sets LLAMA_FLASH_ATTN_TYPE_ENABLED or _DISABLED: no 'auto'
    if v == "auto":
        return Gap("flash_attn='auto' (-fa auto): Llama() takes flash_attn as a bool, on or off; "
                   "without it Llama() turns flash attention off")
    return ("flash_attn", v == "on")


def _py_devices(v, _c):
    if v:
        return Gap(f"devices={list(v)} (--device): Llama() has no keyword for it and uses "
                   "every device llama.cpp finds")
    return None


def _py_seq(v, _c):
    return Gap(f"n_seq_max={v} (-np): Llama() has no keyword for it and uses 1") if v != 1 else None


# Ollama ---------------------------------------------------------------------------------------
# ("param", key, value): a Modelfile PARAMETER (api/types.go Runner); ("env", key, value): a
# variable of `ollama serve` (envconfig/config.go), which applies to every model it serves.
_OLLAMA_KV_TYPES = ("f16", "q8_0", "q4_0")   # docs/faq.md: the values OLLAMA_KV_CACHE_TYPE takes


def _ollama_ngl(v, c):
    # num_gpu = layers to offload (-1, its default, lets Ollama's scheduler decide)
    return ("param", "num_gpu", v if v >= 0 else c.all_layers())


def _ollama_sm(v, _c):
    if v == "row":
        return Gap("-sm row: Ollama has no row split; it always splits by layer")
    if v == "tensor":
        return Gap("-sm tensor: Ollama has no tensor parallelism (llama.cpp's meta device); it always splits by layer")
    return None   # 'none' is expressed by making only the main GPU visible (see _ollama_devices)


def _ollama_mg(v, c):
    # main_gpu indexes the GPUs Ollama sees, i.e. those left in CUDA_VISIBLE_DEVICES
    chosen, used = c.selected(), c.used()
    if chosen is None:
        return ("param", "main_gpu", v)
    if c.config.split_mode == "none":
        return ("param", "main_gpu", 0)    # the main GPU is the only one visible
    main = chosen[v] if v < len(chosen) else None
    return ("param", "main_gpu", used.index(main) if main in used else 0)


def _ollama_ts(v, c):
    used = c.used()
    if any(v) and c.config.split_mode != "none" and (used is None or len(used) > 1):
        return Gap(f"-ts {','.join(_num(x) for x in v)}: Ollama has no tensor_split; its scheduler "
                   "splits layers by free memory among the visible GPUs")
    return None


def _ollama_devices(_v, c):
    used = c.used()
    if used is None:
        return None   # every GPU stays visible, as llama.cpp would use every GPU
    line, bad = cuda_visible_devices(used)
    if bad:
        return Gap(f"{', '.join(bad)}: not CUDA devices, so CUDA_VISIBLE_DEVICES cannot select them "
                   "for Ollama")
    return ("env", "CUDA_VISIBLE_DEVICES", line)


def _ollama_ctx(v, c):
    # server/sched.go multiplies num_ctx by the number of parallel requests: num_ctx is per sequence
    n = c.config.n_seq_max
    if v % n:
        return Gap(f"-c {v} with -np {n}: Ollama's num_ctx is per sequence and {v} is not a multiple of {n}")
    return ("param", "num_ctx", v // n)


def _ollama_batch(v, c):
    # llama/llama.go NewContextParams: n_ubatch = num_batch, n_batch = num_batch * n_seq_max
    if v != c.config.n_ubatch * c.config.n_seq_max:
        return Gap(f"-b {v}: Ollama sets the logical batch to num_batch x parallel "
                   f"({c.config.n_ubatch} x {c.config.n_seq_max}); it cannot be set apart")
    return None


def _ollama_ubatch(v, _c):
    return ("param", "num_batch", v)


def _ollama_kv(which: str) -> Cell:
    def cell(v, c):
        k, vv = c.config.type_k, c.config.type_v
        if which == "type_v":
            return None   # one variable for both, written once (by the type_k cell)
        if k != vv:
            return Gap(f"-ctk {k} -ctv {vv}: Ollama's OLLAMA_KV_CACHE_TYPE sets K and V to one type")
        if k not in _OLLAMA_KV_TYPES:
            return Gap(f"-ctk/-ctv {k}: OLLAMA_KV_CACHE_TYPE takes only {', '.join(_OLLAMA_KV_TYPES)}")
        return ("env", "OLLAMA_KV_CACHE_TYPE", k) if k != "f16" else None
    return cell


def _ollama_fa(v, _c):
    # OLLAMA_FLASH_ATTENTION is a boolean; unset, recent Ollama turns it on where supported ('auto')
    return None if v == "auto" else ("env", "OLLAMA_FLASH_ATTENTION", "1" if v == "on" else "0")


def _ollama_kqv(v, _c):
    return None if v else Gap("-nkvo: Ollama always offloads the KV cache with the layers")


def _ollama_seq(v, _c):
    return ("env", "OLLAMA_NUM_PARALLEL", str(v))


def _ollama_swa(v, _c):
    return Gap("--swa-full: Ollama has no setting for a full-size sliding-window cache") if v else None


# KoboldCpp (koboldcpp.py argparse destinations) ------------------------------------------------
_KOBOLD_BATCH = (-1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)   # --batchsize choices
_KOBOLD_QUANTKV = {"f16": 0, "q8_0": 1, "q4_0": 2}                   # --quantkv 0/1/2


def _kobold_order(devs: Sequence[Device]) -> list[Device]:
    # koboldcpp.py sets CUDA_DEVICE_ORDER=PCI_BUS_ID, so its GPU i is the i-th by PCI bus id
    if devs and all(d.pci_bus_id for d in devs):
        return sorted(devs, key=lambda d: d.pci_bus_id.lower())
    return list(devs)


def _kobold_ngl(v, c):
    return {"gpulayers": v if v >= 0 else c.all_layers()}   # KoboldCpp's -1 means "autodetect"


def _kobold_sm(v, _c):
    # --usecuda takes 'rowsplit' for llama.cpp's row split; 'none' is one visible GPU (below)
    if v == "tensor":
        return Gap("-sm tensor: KoboldCpp's --usecuda knows normal (layer split) and rowsplit, not llama.cpp's "
                   "split mode tensor; written as a layer split")
    return {"usecuda": ["normal", "rowsplit"] if v == "row" else ["normal"]}


def _kobold_mg(v, _c):
    return {"maingpu": v}


def _kobold_ts(_v, c):
    cfg = c.config
    if not c.devices:
        if cfg.devices:
            return Gap(f"--device {','.join(cfg.devices)}: without the device list KoboldCpp's GPU "
                       "numbers cannot be worked out")
        return {"tensor_split": [float(x) for x in cfg.tensor_split] if any(cfg.tensor_split) else None}
    chosen, used = c.selected() or [], c.used() or []
    rpc = [d.name for d in chosen if d.kind == "rpc"]
    if rpc:
        return Gap(f"{', '.join(rpc)}: KoboldCpp has no RPC devices")
    if not used:
        return {"gpulayers": 0}
    gpus = _kobold_order([d for d in c.devices if d.kind not in ("rpc", "cpu")])
    if len(used) == 1:
        i = gpus.index(used[0])
        # '--usecuda normal 2' makes only GPU 2 visible (set_backend_props); it knows 0..3 only
        if i > 3:
            return Gap(f"{used[0].name}: KoboldCpp selects a single GPU by index 0-3 only")
        return {"usecuda": ["normal", str(i)], "maingpu": 0, "tensor_split": None}
    # several GPUs: always an explicit split (without one KoboldCpp divides its own way), zero
    # for the GPUs not used; llama.cpp's default split is by free memory, so that is written down
    ts = cfg.tensor_split
    if any(ts):
        return {"tensor_split": [float(ts[chosen.index(d)]) if d in used else 0.0 for d in gpus]}
    top = max(d.free_bytes for d in used)
    return {"tensor_split": [round(d.free_bytes / top, 4) if d in used else 0.0 for d in gpus]}


def _kobold_ctx(v, _c):
    if not 256 <= v <= 262144:   # --contextsize check_range(int, 256, 262144)
        return Gap(f"-c {v}: KoboldCpp takes a context size from 256 to 262144")
    return {"contextsize": v}


def _kobold_batch(v, _c):
    if v not in _KOBOLD_BATCH:
        return Gap(f"-b {v}: KoboldCpp's --batchsize is one of {', '.join(map(str, _KOBOLD_BATCH))}")
    return {"batchsize": v}


def _kobold_ubatch(v, _c):
    return Gap(f"-ub {v}: KoboldCpp has no physical batch size setting") if v != 512 else None


def _kobold_kv(which: str) -> Cell:
    def cell(_v, c):
        if which == "type_v":
            return None
        k, vv = c.config.type_k, c.config.type_v
        # load_model: quant_k = quant_v = quantkv with flash attention; without it only K
        if k != vv and not (vv == "f16" and c.config.flash_attn == "off"):
            return Gap(f"-ctk {k} -ctv {vv}: KoboldCpp's --quantkv sets K and V to one type")
        if k not in _KOBOLD_QUANTKV:
            return Gap(f"-ctk {k}: KoboldCpp's --quantkv takes f16, q8_0 or q4_0 (0, 1, 2)")
        return {"quantkv": _KOBOLD_QUANTKV[k]}
    return cell


def _kobold_fa(v, _c):
    if v == "auto":
        return Gap("-fa auto: KoboldCpp's --flashattention is on or off; written as on, what llama.cpp's "
                   "auto resolves to on CUDA and CPU devices")
    return {"flashattention": v == "on"}


def _kobold_fa_value(v) -> bool:
    return v != "off"


def _kobold_kqv(v, _c):
    return {"lowvram": not v}   # --lowvram is -nkvo ("do not offload KV to GPU")


def _kobold_seq(v, _c):
    return Gap(f"-np {v}: KoboldCpp decodes one sequence (--multiuser queues requests)") if v != 1 else None


def _kobold_swa(v, _c):
    return {"useswa": not v}    # --useswa: the sliding-window KV cache; off means full size


# tensor overrides (common/arg.cpp -ot -cmoe -ncmoe -ncffn --no-host -nr; llama-bench -ot -ncmoe
# --no-host --repack) --------------------------------------------------------------------------
def _buft_name(target: str, c: _Ctx) -> str:
    """A rule's target as llama.cpp's buffer type name: RPC devices as 'RPC<i>[endpoint]'."""
    from ..overrides import llama_buffer_type_name
    d = next((d for d in c.devices if d.name == target), None)
    return llama_buffer_type_name(d) if d is not None else target


def _ot_items(v, c: _Ctx) -> list[str]:
    from ..overrides import parse_override_text
    return [f"{r.pattern}={_buft_name(r.target, c)}" for item in v for r in parse_override_text(item)]


def _server_ot(v, c):
    return ["-ot", ",".join(_ot_items(v, c))] if v else None


def _bench_ot(_v, c):
    # llama-bench has no -cmoe or -ncffn: their rules join the -ot entries (';' apart, one variant),
    # which llama-bench applies before its -ncmoe rules, as gpulab orders them too
    from ..overrides import FFN_DENSE_REGEX, cpu_moe_rule, n_cpu_ffn_rules
    cfg = c.config
    items = _ot_items(cfg.tensor_overrides, c)
    if cfg.cpu_moe:
        items.append(cpu_moe_rule().text)
    items += [r.text for r in n_cpu_ffn_rules(cfg.n_cpu_ffn, FFN_DENSE_REGEX, "-ncffn")]
    return ["-ot", ";".join(items)] if items else None


def _no_rules(flag: str, who: str):
    def cell(v, _c):
        return Gap(f"{flag}: {who} cannot place single tensors; use llama-server or gpulab.load") if v else None
    return cell


def _py_rules(flag: str):
    def cell(v, _c):
        if not v:
            return None
        return Gap(f"{flag}: llama_cpp.Llama() cannot pass tensor overrides (its tensor_buft_overrides is unused); "
                   "load with gpulab.load(model, config), which can")
    return cell


@dataclass(frozen=True)
class Spelling:
    attr: str            # SplitConfig field
    server: Cell         # llama-server / llama-cli argv tokens (common/arg.cpp)
    bench: Cell          # llama-bench argv tokens (llama-bench.cpp)
    python: Cell         # (keyword, value) of llama_cpp.Llama
    ollama: Cell         # ('param' | 'env', key, value)
    kobold: Cell         # {kcpps key: value}


SPELLINGS: tuple[Spelling, ...] = (
    Spelling("n_gpu_layers", _server_ngl, _flag("-ngl"), _py("n_gpu_layers", int), _ollama_ngl, _kobold_ngl),
    Spelling("split_mode", _flag("-sm"), _flag("-sm"), _py("split_mode", SPLIT_MODE_IDS.__getitem__),
             _ollama_sm, _kobold_sm),
    Spelling("main_gpu", _flag("-mg"), _flag("-mg"), _py("main_gpu", int), _ollama_mg, _kobold_mg),
    Spelling("tensor_split", _server_ts, _bench_ts, _py_ts, _ollama_ts, _kobold_ts),
    Spelling("devices", _server_devices, _bench_devices, _py_devices, _ollama_devices, _none),
    Spelling("n_ctx", _flag("-c"), _bench_ctx, _py("n_ctx", int), _ollama_ctx, _kobold_ctx),
    Spelling("n_batch", _flag("-b"), _flag("-b"), _py("n_batch", int), _ollama_batch, _kobold_batch),
    Spelling("n_ubatch", _flag("-ub"), _flag("-ub"), _py("n_ubatch", int), _ollama_ubatch, _kobold_ubatch),
    Spelling("type_k", _flag("-ctk"), _flag("-ctk"), _py("type_k", ggml_type_id), _ollama_kv("type_k"),
             _kobold_kv("type_k")),
    Spelling("type_v", _flag("-ctv"), _flag("-ctv"), _py("type_v", ggml_type_id), _ollama_kv("type_v"),
             _kobold_kv("type_v")),
    Spelling("flash_attn", _flag("-fa"), _flag("-fa"), _py_fa, _ollama_fa, _kobold_fa),
    Spelling("offload_kqv", lambda v, _c: None if v else ["-nkvo"],
             lambda v, _c: None if v else ["-nkvo", "1"], _py("offload_kqv", bool), _ollama_kqv, _kobold_kqv),
    # llama-server's default -np is -1: 4 slots sharing one unified KV cache (tools/server/server.cpp),
    # a different KV layout from the planned one, so -np is always written
    Spelling("n_seq_max", _flag("-np"), _bench_seq, _py_seq, _ollama_seq, _kobold_seq),
    # -kvu: llama-server/llama-cli; llama-bench has no flag (one sequence); Llama() always sets it
    # (llama_cpp/llama.py: context_params.kv_unified = True) and has one sequence
    Spelling("kv_unified", lambda v, _c: ["-kvu"] if v else None,
             lambda v, c: Gap("-kvu: llama-bench has no flag for it") if v and c.config.n_seq_max > 1 else None,
             _none,   # Llama() decodes one sequence (the -np cell says so), with a unified cache
             lambda v, c: Gap("-kvu: Ollama has no setting for it") if v and c.config.n_seq_max > 1 else None,
             lambda v, c: Gap("-kvu: KoboldCpp has no setting for it") if v and c.config.n_seq_max > 1 else None),
    Spelling("swa_full", lambda v, _c: ["--swa-full"] if v else None, _bench_swa, _py("swa_full", bool),
             _ollama_swa, _kobold_swa),
    # common/arg.cpp --op-offload/--no-op-offload; llama-bench -nopo 0|1; Llama(op_offload=)
    Spelling("op_offload", lambda v, _c: None if v else ["--no-op-offload"],
             lambda v, _c: None if v else ["-nopo", "1"], lambda v, _c: None if v else ("op_offload", False),
             lambda v, _c: None if v else Gap("--no-op-offload: Ollama has no setting for it"),
             lambda v, _c: None if v else Gap("--no-op-offload: KoboldCpp has no setting for it")),
    Spelling("tensor_overrides", _server_ot, _bench_ot, _py_rules("-ot"), _no_rules("-ot", "Ollama"),
             _no_rules("-ot", "KoboldCpp")),
    Spelling("cpu_moe", lambda v, _c: ["-cmoe"] if v else None, _none, _py_rules("-cmoe"),
             _no_rules("-cmoe", "Ollama"), _no_rules("-cmoe", "KoboldCpp")),
    Spelling("n_cpu_moe", lambda v, _c: ["-ncmoe", str(v)] if v else None,
             lambda v, _c: ["-ncmoe", str(v)] if v else None, _py_rules("-ncmoe"),
             _no_rules("-ncmoe", "Ollama"), _no_rules("-ncmoe", "KoboldCpp")),
    Spelling("n_cpu_ffn", lambda v, _c: ["-ncffn", str(v)] if v else None, _none, _py_rules("-ncffn"),
             _no_rules("-ncffn", "Ollama"), _no_rules("-ncffn", "KoboldCpp")),
    Spelling("no_host", lambda v, _c: ["--no-host"] if v else None, lambda v, _c: ["--no-host", "1"] if v else None,
             lambda v, _c: Gap("--no-host: Llama() has no keyword for it") if v else None,
             lambda v, _c: Gap("--no-host: Ollama has no setting for it") if v else None,
             lambda v, _c: Gap("--no-host: KoboldCpp has no setting for it") if v else None),
    Spelling("use_extra_bufts", lambda v, _c: None if v else ["-nr"], lambda v, _c: None if v else ["--repack", "0"],
             lambda v, _c: None if v else Gap("-nr: Llama() has no keyword for it"),
             lambda v, _c: None if v else Gap("-nr: Ollama has no setting for it"),
             lambda v, _c: None if v else Gap("-nr: KoboldCpp has no setting for it")),
    # -fit, -fitt, -fitc: llama-server/llama-cli's common_fit_params. An export is the planned
    # placement, so the llama-server and llama-cli commands always end in "-fit off" (see render),
    # and a fitted plan is exported with fit's choices written out (gpulab.core.policies.server_fit). llama-bench
    # and llama-cpp-python never fit; Ollama and KoboldCpp do their own fitting.
    Spelling("fit", _none, _none, _none, _none, _none),
    Spelling("fit_target", _none, _none, _none, _none, _none),
    Spelling("fit_ctx", _none, _none, _none, _none, _none),
)


def _check_spellings_cover_config() -> None:
    missing = {f.name for f in fields(SplitConfig)} - {s.attr for s in SPELLINGS}
    if missing:   # a new SplitConfig setting must be spelled for every target before it is used
        raise RuntimeError(f"gpulab.core.exports.render.SPELLINGS does not spell SplitConfig.{sorted(missing)}")


_COLUMN = {"llama-server": "server", "llama-cli": "server", "llama-bench": "bench", "python": "python",
           "ollama": "ollama", "koboldcpp": "kobold"}


@dataclass(frozen=True)
class Export:
    target: str
    text: str                 # what to paste: a command line, env + Modelfile, a .kcpps document
    data: Any                 # argv list, kwargs dict, {'env': {}, 'parameters': {}}, kcpps dict
    gaps: tuple[str, ...]     # what the target cannot express, one line each

    def __str__(self) -> str:
        return self.text


def _cells(config: SplitConfig, target: str, ctx: _Ctx):
    _check_spellings_cover_config()
    if target not in _COLUMN:
        raise ConfigError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    column = _COLUMN[target]
    for s in SPELLINGS:
        yield s, getattr(s, column)(getattr(config, s.attr), ctx)


def render(config: SplitConfig, target: str, *, model_path: str = "model.gguf", n_layer: int | None = None,
           devices: Sequence[Device] = (), strict: bool = False) -> Export:
    """`config` for one target of TARGETS.

    model_path: written into the command line, Modelfile or .kcpps. n_layer: the model's layer
    count, for targets with no word for "all layers" (Ollama, KoboldCpp; otherwise 999).
    devices: the offload devices llama.cpp sees (gpulab's Device list), for what depends on
    them: CUDA_VISIBLE_DEVICES, KoboldCpp's positional tensor_split. strict: raise ConfigError
    when the target cannot express everything, instead of listing it in `gaps`.
    """
    ctx = _Ctx(config, n_layer, tuple(devices))
    parts, gaps = [], []
    for _cell, out in _cells(config, target, ctx):
        if isinstance(out, Gap):
            gaps.append(out.why)
        elif out is not None:
            parts.append(out)
    rpc = _rpc_servers(ctx)
    if rpc and target == "python":
        gaps.append(f"RPC servers {','.join(rpc)}: llama_cpp.Llama() cannot add them; load with "
                    "gpulab.load(model, rpc=[...]) instead")
    if strict and gaps:
        who = "llama_cpp.Llama()" if target == "python" else target
        raise ConfigError(f"{who} cannot express " + "; ".join(gaps))
    model_path = str(model_path)
    if target in ("llama-server", "llama-cli"):
        # -fit off: llama-server/llama-cli default to -fit on, where common_fit_params re-chooses
        # settings left unset (-ngl, -ts, -c) to fit free memory: the placement would not be this one
        argv = ([target, "-m", model_path] + (["--rpc", ",".join(rpc)] if rpc else []) + [t for p in parts for t in p]
                + ["-fit", "off"])
        return Export(target, shlex.join(argv), argv, tuple(gaps))
    if target == "llama-bench":
        argv = ["llama-bench", "-m", model_path, *(["-rpc", ",".join(rpc)] if rpc else []),
                *(t for p in parts for t in p)]
        return Export(target, shlex.join(argv), argv, tuple(gaps))
    if target == "python":
        kwargs = dict(parts)
        args = ", ".join([f"model_path={model_path!r}"] + [f"{k}={v!r}" for k, v in kwargs.items()])
        return Export(target, f"llama_cpp.Llama({args})", kwargs, tuple(gaps))
    if target == "ollama":
        return _assemble_ollama(parts, model_path, gaps)
    return _assemble_kobold(parts, model_path, config, gaps)


def _rpc_servers(ctx: _Ctx) -> list[str]:
    """The endpoints of the RPC servers whose devices the config uses: llama.cpp must be told
    them (--rpc) before it can see those devices at all."""
    chosen = ctx.selected() or []
    return list(dict.fromkeys(d.endpoint for d in chosen if d.kind == "rpc" and d.endpoint))


def _assemble_ollama(parts, model_path: str, gaps: list[str]) -> Export:
    env = {k: str(v) for kind, k, v in parts if kind == "env"}
    params = {k: v for kind, k, v in parts if kind == "param"}
    lines = ["# environment of `ollama serve` (applies to every model it serves)"]
    lines += [f"{k}={shlex.quote(v)}" for k, v in env.items()] or ["# (nothing to set)"]
    lines += ["", "# Modelfile", f"FROM {model_path}"]
    lines += [f"PARAMETER {k} {v}" for k, v in params.items()]
    return Export("ollama", "\n".join(lines) + "\n", {"env": env, "parameters": params}, tuple(gaps))


def _assemble_kobold(parts, model_path: str, config: SplitConfig, gaps: list[str]) -> Export:
    doc: dict[str, Any] = {"model_param": model_path}
    for p in parts:
        for k, v in p.items():
            if k == "usecuda" and "usecuda" in doc:
                # the device cell ('normal', '2') and the split-mode cell ('rowsplit') both speak here
                v = list(dict.fromkeys(doc["usecuda"] + v))
            doc[k] = v
    doc.setdefault("usecuda", ["normal"])   # -sm tensor, a gap: the layer split KoboldCpp can do
    if "flashattention" not in doc:   # 'auto': recorded as a gap, written as llama.cpp resolves it
        doc["flashattention"] = _kobold_fa_value(config.flash_attn)
    return Export("koboldcpp", json.dumps(doc, indent=2) + "\n", doc, tuple(gaps))


def render_all(config: SplitConfig, **kwargs) -> dict[str, Export]:
    """Every target of TARGETS, same arguments as `render`."""
    return {t: render(config, t, **kwargs) for t in TARGETS}


def python_kwargs(config: SplitConfig, *, strict: bool = False) -> dict:
    """Keyword arguments of `llama_cpp.Llama(model_path, **kwargs)` that reproduce `config`
    (what `gpulab.runtime.params.llama_kwargs` returns)."""
    return render(config, "python", strict=strict).data


def python_gaps(config: SplitConfig) -> list[str]:
    return list(render(config, "python").gaps)


_CUDA_NAME = re.compile(r"^CUDA(\d+)$")


def cuda_visible_devices(devices: Sequence[Device]) -> tuple[str, list[str]]:
    """(value of CUDA_VISIBLE_DEVICES selecting `devices`, names of those that are not CUDA devices).

    UUIDs where NVML gave one: CUDA numbers GPUs FASTEST_FIRST unless CUDA_DEVICE_ORDER=PCI_BUS_ID,
    and the numbers shift under an existing CUDA_VISIBLE_DEVICES, while a UUID names one GPU in
    every process (Ollama's docs/gpu.md recommends UUIDs for the same reason). Otherwise the
    index in llama.cpp's name CUDA<n>.
    """
    out, bad = [], []
    for d in devices:
        m = _CUDA_NAME.match(d.name)
        if d.uuid and (m or d.source == "nvml"):
            out.append(d.uuid)
        elif m:
            out.append(m.group(1))
        else:
            bad.append(d.name)
    return ",".join(out), bad
