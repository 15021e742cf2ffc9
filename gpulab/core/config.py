"""SplitConfig: the llama.cpp settings that decide placement and memory, with their flag names."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError
from .ggml_types import KV_CACHE_TYPES

__all__ = ["SplitConfig", "config_to_dict", "config_from_dict", "SPLIT_MODES", "FLASH_ATTN_MODES", "parse_tensor_split",
           "parse_ngl", "parse_mib_list"]

SPLIT_MODES = ("none", "layer", "row", "tensor")   # -sm, enum llama_split_mode 0..3
FLASH_ATTN_MODES = ("auto", "on", "off")      # -fa, enum llama_flash_attn_type


@dataclass(frozen=True)
class SplitConfig:
    # -ngl: -1 'auto' (llama.cpp's default: common_fit_params may choose it), -2 'all'; any negative
    # count offloads every layer when nothing fits it (llama_model::n_gpu_layers)
    n_gpu_layers: int = -1
    split_mode: str = "layer"         # -sm
    main_gpu: int = 0                 # -mg
    tensor_split: tuple[float, ...] = ()   # -ts; empty or all zero: by free memory
    n_ctx: int = 4096                 # -c; 0: the model's training context (llama-server's default)
    n_batch: int = 2048               # -b
    n_ubatch: int = 512               # -ub
    type_k: str = "f16"               # -ctk
    type_v: str = "f16"               # -ctv
    flash_attn: str = "auto"          # -fa
    offload_kqv: bool = True          # -nkvo inverts it
    devices: tuple[str, ...] = field(default=())  # --device: use only these (by llama.cpp name)
    n_seq_max: int = 1                # -np
    # -kvu: one KV cache shared by the -np sequences (llama-server's default with -np auto: 4 slots,
    # tools/server/server.cpp); off: one stream of n_ctx / n_seq_max cells per sequence
    kv_unified: bool = False
    swa_full: bool = False            # --swa-full
    op_offload: bool = True           # --no-op-offload turns it off: host weights' ops stay on the CPU
    # tensor buffer overrides (gpulab.core.overrides): -ot items 'PATTERN=BUFFER_TYPE', then
    # --cpu-moe, --n-cpu-moe N, --n-cpu-ffn N, tried in that order, the first match deciding
    tensor_overrides: tuple[str, ...] = ()   # -ot (each item one PATTERN=BUFFER_TYPE)
    cpu_moe: bool = False             # -cmoe: every layer's experts on the CPU
    n_cpu_moe: int = 0                # -ncmoe N: the experts of layers 0..N-1 on the CPU
    n_cpu_ffn: int = 0                # -ncffn N: the dense FFN of layers 0..N-1 on the CPU
    no_host: bool = False             # --no-host: no pinned GPU host buffer for host weights
    use_extra_bufts: bool = True      # -nr/--no-repack turns it off: no CPU_REPACK copies
    # common_fit_params (common/fit.cpp), which llama-server and llama-cli run before loading:
    # it rewrites the settings left unset (-c 0, -ngl auto, no -ts, no overrides) to fit free memory
    fit: str = "on"                   # -fit on|off (llama-bench and llama-cpp-python never fit)
    fit_target: tuple[int, ...] = ()  # -fitt MiB,...: free memory to leave per device; () = 1024 each
    fit_ctx: int = 4096               # -fitc: the smallest context fit may choose

    def __post_init__(self) -> None:
        ts = self.tensor_split
        if not isinstance(ts, tuple):
            object.__setattr__(self, "tensor_split", tuple(float(x) for x in ts))
        if not isinstance(self.fit_target, tuple):
            object.__setattr__(self, "fit_target", tuple(int(x) for x in self.fit_target))
        if not isinstance(self.devices, tuple):
            object.__setattr__(self, "devices", tuple(self.devices))
        if isinstance(self.tensor_overrides, str):
            object.__setattr__(self, "tensor_overrides", (self.tensor_overrides,))
        elif not isinstance(self.tensor_overrides, tuple):
            object.__setattr__(self, "tensor_overrides", tuple(self.tensor_overrides))
        self._check_values()

    def _check_values(self) -> None:
        if self.split_mode not in SPLIT_MODES:
            raise ConfigError(f"split_mode {self.split_mode!r} is not one of {', '.join(SPLIT_MODES)}")
        if self.flash_attn not in FLASH_ATTN_MODES:
            raise ConfigError(f"flash_attn {self.flash_attn!r} is not one of {', '.join(FLASH_ATTN_MODES)}")
        for name in ("type_k", "type_v"):
            t = getattr(self, name)
            if t not in KV_CACHE_TYPES:
                raise ConfigError(f"{name} {t!r} is not a KV cache type; use one of {', '.join(KV_CACHE_TYPES)}")
        if self.type_v not in ("f32", "f16", "bf16") and self.flash_attn == "off":
            # llama_init_from_model: "V cache quantization requires flash_attn"
            raise ConfigError(f"a quantized V cache (type_v={self.type_v}) needs flash attention; use -fa on or auto")
        if self.split_mode == "tensor" and self.flash_attn == "off":
            # llama_init_from_model (src/llama-context.cpp)
            raise ConfigError("SPLIT_MODE_TENSOR requires flash_attn to be enabled (llama.cpp); use -fa on or auto")
        for x in self.tensor_split:
            if not math.isfinite(x) or x < 0:
                raise ConfigError(f"tensor_split entries must be finite and >= 0, got {list(self.tensor_split)}")
        for name in ("n_batch", "n_ubatch", "n_seq_max", "fit_ctx"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_ctx < 0:
            raise ConfigError(f"n_ctx must be >= 0 (0: the model's training context), got {self.n_ctx}")
        if self.fit not in ("on", "off"):
            raise ConfigError(f"fit {self.fit!r} is not 'on' or 'off'")
        if any(x < 0 for x in self.fit_target):
            raise ConfigError(f"fit targets are MiB to leave free, >= 0; got {list(self.fit_target)}")
        if self.main_gpu < 0:
            raise ConfigError(f"main_gpu must be >= 0, got {self.main_gpu}")
        from .overrides import effective_rules
        effective_rules(self)   # each -ot item parses, each pattern is one gpulab can mirror, N >= 0

    @property
    def has_tensor_overrides(self) -> bool:
        """llama_model ctor: has_tensor_overrides = any rule at all (even one matching nothing)."""
        return bool(self.tensor_overrides or self.cpu_moe or self.n_cpu_moe or self.n_cpu_ffn)

    def check_devices(self, n_devices: int) -> None:
        """Checks that need the number of devices llama.cpp will see (after --device)."""
        if len(self.tensor_split) > n_devices:
            raise ConfigError(
                f"tensor_split has {len(self.tensor_split)} entries but there are only {n_devices} devices; "
                f"give at most {n_devices} values")
        if self.split_mode == "none" and n_devices and self.main_gpu >= n_devices:
            raise ConfigError(f"main_gpu {self.main_gpu} is out of range: there are {n_devices} devices "
                              f"(0..{n_devices - 1})")

    @property
    def n_streams(self) -> int:
        """KV streams (llama_kv_cache ctor: n_stream = unified ? 1 : n_seq_max)."""
        return 1 if self.kv_unified else max(1, self.n_seq_max)

    @property
    def effective_n_ubatch(self) -> int:
        """llama_context ctor: n_batch = min(n_ctx, n_batch) (causal attention, n_ctx before its
        padding to 256), then n_ubatch = min(n_batch, n_ubatch)."""
        return min(self.n_ctx, self.n_batch, self.n_ubatch)

    @property
    def default_split(self) -> bool:
        """llama.cpp splits by free memory when tensor_split is absent or all zero."""
        return not any(self.tensor_split)

    def with_ctx(self, n_ctx_train: int) -> SplitConfig:
        """-c 0 resolved as llama_context does: the model's training context (llama_context ctor)."""
        return self if self.n_ctx else replace(self, n_ctx=n_ctx_train or 4096)

    def replace(self, **changes) -> SplitConfig:
        return replace(self, **changes)


def parse_ngl(text: str | int) -> int:
    """-ngl as common/arg.cpp reads it: 'auto' -1, 'all' -2, else a number."""
    if isinstance(text, int):
        return text
    t = str(text).strip()
    if t == "auto":
        return -1
    if t == "all":
        return -2
    try:
        return int(t)
    except ValueError:
        raise ConfigError(f"-ngl {text!r}: expected a number, 'auto' or 'all'") from None


def parse_mib_list(text: str) -> tuple[int, ...]:
    """-fitt '1024' or '512,2048' (split on ',' and '/', as common/arg.cpp does) -> MiB per device."""
    items = [x for x in re.split(r"[,/]+", text or "") if x.strip()]
    try:
        values = tuple(int(x) for x in items)
    except ValueError:
        raise ConfigError(f"cannot parse {text!r}: expected MiB per device like '1024' or '512,2048'") from None
    if any(v < 0 for v in values):
        raise ConfigError(f"{text!r}: MiB must be >= 0")
    return values


def parse_tensor_split(text: str) -> tuple[float, ...]:
    """'3,1' or '3/1' (llama-bench) -> (3.0, 1.0)."""
    sep = "/" if "/" in text else ","
    try:
        values = tuple(float(x) for x in text.split(sep) if x.strip() != "")
    except ValueError:
        raise ConfigError(f"cannot parse tensor split {text!r}: expected numbers like '3,1' or '3/1'") from None
    for x in values:
        if not math.isfinite(x) or x < 0:
            raise ConfigError(f"tensor split {text!r}: entries must be finite and >= 0")
    return values


def config_to_dict(c: SplitConfig) -> dict:
    """The one plain form of a SplitConfig (JSON, TOML, the worker's pipe, stored runs): field names
    as keys, tuples as lists, -ts entries as floats."""
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(c).items()}
    d["tensor_split"] = [float(x) for x in c.tensor_split]
    return d


def config_from_dict(d: dict) -> SplitConfig:
    """Inverse of config_to_dict. Keys that are not SplitConfig fields (a newer or older writer's)
    are ignored; missing ones take the defaults."""
    known = {f.name for f in fields(SplitConfig)}
    kw: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
    return SplitConfig(**kw)
