"""Every llama.cpp setting gpulab knows, declared once: its flags, its help, how it reaches
llama.cpp's structs, and whether the lab gets a generic control for it.

A row here is what a SplitConfig field needs to become a command-line flag (gpulab.commands.flags
builds the CLI's and the magics' parsers from this table), a lab control (gpulab.ui.lab), and a
field of llama_model_params / llama_context_params (gpulab.runtime.params walks this table). How
each *export target* spells the setting is gpulab.core.exports.render.SPELLINGS, the one other table a
new setting needs a row in; both tables are checked to cover SplitConfig (tests/core/test_settings.py,
tests/core/exports/test_render.py).

Flags are llama-server's (common/arg.cpp of the vendored llama.cpp), short spelling first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

from .config import FLASH_ATTN_MODES, SPLIT_MODES, SplitConfig, parse_mib_list, parse_ngl, parse_tensor_split
from .ggml_types import KV_CACHE_TYPES, ggml_type_id

__all__ = ["Setting", "SETTINGS", "setting", "SPLIT_MODE_IDS", "FLASH_ATTN_IDS", "check_settings_cover_config",
           "value_from_text"]

# enum llama_split_mode (include/llama.h)
SPLIT_MODE_IDS = {"none": 0, "layer": 1, "row": 2, "tensor": 3}   # LLAMA_SPLIT_MODE_TENSOR = 3
# enum llama_flash_attn_type (include/llama.h): AUTO = -1, DISABLED = 0, ENABLED = 1
FLASH_ATTN_IDS = {"auto": -1, "off": 0, "on": 1}

# int: a number; choice: one of `choices`; off: a flag that sets the field False (-nkvo);
# on: a flag that sets it True (--swa-full); split: '3,1'; names: 'CUDA0,CUDA1' or 'none';
# rules: -ot, repeatable, each value a comma-separated list of PATTERN=BUFFER_TYPE;
# ngl: a number, 'auto' (-1) or 'all' (-2); mibs: MiB per device '1024' or '512,2048'
Kind = Literal["int", "choice", "off", "on", "split", "names", "rules", "ngl", "mibs"]


@dataclass(frozen=True)
class Setting:
    attr: str                              # SplitConfig field
    flags: tuple[str, ...]                 # as llama-server spells them, short first
    help: str
    kind: Kind
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    struct: Literal["model", "context"] | None = None   # llama_model_params / llama_context_params
    c_field: str | None = None             # None: set by gpulab.runtime.params' own code (arrays)
    to_c: Callable[[Any], Any] = lambda v: v
    lab: bool = True                       # a generic control in the lab (where it has no custom one)

    @property
    def dest(self) -> str:
        """The argparse destination: the long flag's name ('--ctx-size' -> 'ctx_size')."""
        return self.flags[-1].lstrip("-").replace("-", "_")

    @property
    def default(self) -> Any:
        return next(f.default for f in fields(SplitConfig) if f.name == self.attr)


SETTINGS: tuple[Setting, ...] = (
    Setting("n_gpu_layers", ("-ngl", "--n-gpu-layers"),
            "layers to offload: a number, 'auto' (-1, llama-server's default: -fit chooses) or 'all' (-2); "
            "without fit both offload every layer", "ngl", metavar="N|auto|all",
            struct="model", c_field="n_gpu_layers", to_c=int),
    Setting("split_mode", ("-sm", "--split-mode"),
            "how to split the model across devices: layer (pipeline), tensor (every layer cut across the devices; "
            "needs flash attention), none (one device), row (refused by this llama.cpp)", "choice",
            choices=SPLIT_MODES, struct="model", c_field="split_mode", to_c=SPLIT_MODE_IDS.__getitem__),
    Setting("main_gpu", ("-mg", "--main-gpu"), "the device for -sm none (index among the devices used)", "int",
            struct="model", c_field="main_gpu", to_c=int),
    Setting("tensor_split", ("-ts", "--tensor-split"),
            "proportions, e.g. 3,1 (default: free memory; -sm tensor: equal shares)", "split",
            metavar="N,N,...", struct="model"),
    Setting("devices", ("-dev", "--device"), "use only these devices, e.g. CUDA0,CUDA2 (none: the CPU only)",
            "names", metavar="NAME,...", struct="model"),
    Setting("n_ctx", ("-c", "--ctx-size"), "context size in tokens (0: the model's training context, "
            "llama-server's default, which -fit may shrink)", "int",
            struct="context", c_field="n_ctx", to_c=int),
    Setting("n_batch", ("-b", "--batch-size"), "logical batch size", "int",
            struct="context", c_field="n_batch", to_c=int),
    Setting("n_ubatch", ("-ub", "--ubatch-size"), "physical batch size", "int",
            struct="context", c_field="n_ubatch", to_c=int),
    Setting("type_k", ("-ctk", "--cache-type-k"), "KV cache type of K", "choice", choices=tuple(KV_CACHE_TYPES),
            struct="context", c_field="type_k", to_c=ggml_type_id),
    Setting("type_v", ("-ctv", "--cache-type-v"), "KV cache type of V", "choice", choices=tuple(KV_CACHE_TYPES),
            struct="context", c_field="type_v", to_c=ggml_type_id),
    Setting("flash_attn", ("-fa", "--flash-attn"), "flash attention", "choice", choices=FLASH_ATTN_MODES,
            struct="context", c_field="flash_attn_type", to_c=FLASH_ATTN_IDS.__getitem__),
    Setting("offload_kqv", ("-nkvo", "--no-kv-offload"), "keep the KV cache on the CPU", "off",
            struct="context", c_field="offload_kqv", to_c=bool),
    Setting("n_seq_max", ("-np", "--parallel"), "sequences (KV streams)", "int",
            struct="context", c_field="n_seq_max", to_c=int),
    Setting("kv_unified", ("-kvu", "--kv-unified"), "one KV cache shared by the -np sequences (llama-server's "
            "default with -np auto: 4 slots)", "on", struct="context", c_field="kv_unified", to_c=bool),
    Setting("swa_full", ("--swa-full",), "full-size KV cache for sliding-window layers", "on",
            struct="context", c_field="swa_full", to_c=bool),
    Setting("op_offload", ("--no-op-offload",), "do not let the GPU run ops of weights kept on the host", "off",
            struct="context", c_field="op_offload", to_c=bool),
    Setting("tensor_overrides", ("-ot", "--override-tensor"),
            "PATTERN=BUFFER_TYPE,...: tensors whose name the regex finds go to that device (CPU, CUDA0, RPC1...); "
            "repeatable, the first matching rule wins", "rules", metavar="PATTERN=TYPE,...", struct="model"),
    Setting("cpu_moe", ("-cmoe", "--cpu-moe"), "keep every layer's MoE experts on the CPU", "on", struct="model"),
    Setting("n_cpu_moe", ("-ncmoe", "--n-cpu-moe"), "keep the MoE experts of the first N layers on the CPU", "int",
            struct="model"),
    Setting("n_cpu_ffn", ("-ncffn", "--n-cpu-ffn"), "keep the dense FFN of the first N layers on the CPU", "int",
            struct="model"),
    Setting("no_host", ("--no-host",), "no pinned GPU host buffer for weights on the host (lets CPU_REPACK work)",
            "on", struct="model", c_field="no_host", to_c=bool),
    Setting("use_extra_bufts", ("-nr", "--no-repack"), "no CPU_REPACK copies of host weights", "off",
            struct="model", c_field="use_extra_bufts", to_c=bool),
    # common_params, not llama.cpp structs: what llama-server's common_fit_params does before loading
    # (common/fit.cpp, gpulab.core.policies.server_fit); an in-process load (llama-cpp-python) never fits
    Setting("fit", ("-fit", "--fit"), "llama-server/llama-cli: fit the settings left unset (-c 0, -ngl auto, "
            "no -ts, no -ot) to free memory; llama-bench and llama-cpp-python do not", "choice",
            choices=("on", "off")),
    Setting("fit_target", ("-fitt", "--fit-target"), "MiB to leave free per device for -fit (one value: every "
            "device; default 1024)", "mibs", metavar="MiB,..."),
    Setting("fit_ctx", ("-fitc", "--fit-ctx"), "the smallest context -fit may choose (default 4096)", "int"),
)

_BY_ATTR = {s.attr: s for s in SETTINGS}


def setting(attr: str) -> Setting:
    return _BY_ATTR[attr]


def check_settings_cover_config() -> None:
    """A new SplitConfig field must be declared here before it can be used anywhere."""
    missing = {f.name for f in fields(SplitConfig)} - set(_BY_ATTR)
    if missing:
        raise RuntimeError(f"gpulab.core.settings.SETTINGS does not declare SplitConfig.{sorted(missing)}")


def value_from_text(s: Setting, text: str) -> Any:
    """The SplitConfig value of a flag's text (for 'int', 'choice', 'split', 'names')."""
    if s.kind == "int":
        return int(text)
    if s.kind == "ngl":
        return parse_ngl(text)
    if s.kind == "mibs":
        return parse_mib_list(text)
    if s.kind == "split":
        return parse_tensor_split(text) if text else ()
    if s.kind == "names":
        return tuple(x.strip() for x in text.split(",") if x.strip())
    if s.kind == "rules":   # one -ot value may list several rules: kept item by item, in order
        return tuple(item for item in text.split(",")) if text else ()
    return text
