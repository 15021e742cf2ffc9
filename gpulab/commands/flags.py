"""The flags every front end speaks, declared once: llama.cpp's settings (built from
gpulab.core.settings), the device flags, llama-bench's test flags, and the model argument.

The CLI (gpulab.cli) and the magics (gpulab.magics) build their parsers from the command modules,
which add these groups; the lab builds its controls from the same settings table.
"""

from __future__ import annotations

import argparse

from ..core.config import SplitConfig
from ..core.policies.apply import ALL_POLICIES
from ..core.settings import SETTINGS, check_settings_cover_config, value_from_text

__all__ = [
    "RULE_SETTINGS",
    "add_bench_flags",
    "add_config_flags",
    "add_device_flags",
    "add_json_flag",
    "add_model_arg",
    "add_process_flags",
    "config_from_args",
    "devices_from_args",
    "model_path",
    "process_argv",
]


RULE_SETTINGS = ("tensor_overrides", "cpu_moe", "n_cpu_moe", "n_cpu_ffn")   # what makes tensor override rules


def add_config_flags(p: argparse.ArgumentParser, *, only: tuple[str, ...] = (), **defaults) -> None:
    """llama.cpp's placement and memory settings, as llama-server spells them. `defaults`
    overrides a setting's default by SplitConfig attribute (bench: n_ctx=None); `only`: just
    these settings (inspect: RULE_SETTINGS)."""
    check_settings_cover_config()
    g = p.add_argument_group("llama.cpp settings (same names as llama-server)")
    for s in SETTINGS:
        if only and s.attr not in only:
            continue
        default = defaults.get(s.attr, s.default)
        kw: dict = {"dest": s.dest, "help": s.help}
        if s.kind == "int":
            kw.update(type=int, default=default)
        elif s.kind == "ngl":   # a number, 'auto' or 'all' (common/arg.cpp)
            kw.update(type=str, default=str(default), metavar=s.metavar)
        elif s.kind == "choice":
            kw.update(choices=list(s.choices), default=default)
        elif s.kind in ("off", "on"):
            kw.update(action="store_true")
        elif s.kind == "rules":   # repeatable, as llama.cpp's -ot (each value also comma-separated)
            kw.update(action="append", default=None, metavar=s.metavar)
        else:   # split, names: text, parsed by config_from_args
            kw.update(default="", metavar=s.metavar)
        g.add_argument(*s.flags, **kw)


def config_from_args(a: argparse.Namespace, *, only: tuple[str, ...] = ()) -> SplitConfig:
    """The SplitConfig of the flags (with `only`: of those settings, the rest default)."""
    values = {}
    for s in SETTINGS:
        if only and s.attr not in only:
            continue
        v = getattr(a, s.dest)
        if s.kind == "off":
            v = not v
        elif s.kind in ("split", "names", "mibs", "ngl"):
            v = value_from_text(s, v if isinstance(v, str) else str(v))
        elif s.kind == "rules":
            v = tuple(item for text in (v or ()) for item in value_from_text(s, text))
        values[s.attr] = v
    return SplitConfig(**values)


def add_process_flags(p: argparse.ArgumentParser) -> None:
    """llama-server's projector and draft-model flags (common/arg.cpp), as gpulab.core.command_line
    reads them in a pasted command: plan then shows the whole process."""
    g = p.add_argument_group("the rest of the llama-server process (projector, draft model)")
    g.add_argument("-mm", "--mmproj", metavar="FILE", default=None, help="the vision/audio projector (clip GGUF)")
    g.add_argument("--no-mmproj-offload", dest="mmproj_offload", action="store_false",
                   help="keep the projector on the CPU")
    g.add_argument("-mmdev", "--mmproj-device", metavar="DEV", default="", help="the projector's device")
    g.add_argument("-md", "--model-draft", metavar="FILE", default=None, help="the draft model (speculative decoding)")
    g.add_argument("-devd", "--device-draft", metavar="DEV,...", default=None, help="the draft's devices "
                   "(default: --device)")
    g.add_argument("-ngld", "--gpu-layers-draft", metavar="N", default=None, help="the draft's -ngl (default: all)")
    g.add_argument("-otd", "--override-tensor-draft", metavar="PATTERN=TYPE,...", action="append", default=None,
                   help="the draft's tensor overrides")
    g.add_argument("-ctkd", "--cache-type-k-draft", metavar="TYPE", default=None, help="the draft's K cache (f16)")
    g.add_argument("-ctvd", "--cache-type-v-draft", metavar="TYPE", default=None, help="the draft's V cache (f16)")
    g.add_argument("--spec-type", metavar="TYPE,...", default=None,
                   help="speculative decoding types (draft-simple, draft-mtp, ...): llama-server reserves logits "
                        "for the drafted tokens")
    g.add_argument("--spec-draft-n-max", metavar="N", type=int, default=None, help="tokens to draft (default 3)")


def process_argv(a: argparse.Namespace) -> list[str]:
    """The process flags given, spelled as llama-server spells them (for gpulab.core.command_line)."""
    out: list[str] = []
    if getattr(a, "mmproj", None):
        out += ["--mmproj", a.mmproj]
        if not a.mmproj_offload:
            out.append("--no-mmproj-offload")
        if a.mmproj_device:
            out += ["-mmdev", a.mmproj_device]
    if getattr(a, "spec_type", None):
        out += ["--spec-type", a.spec_type]
    if getattr(a, "spec_draft_n_max", None) is not None:
        out += ["--spec-draft-n-max", str(a.spec_draft_n_max)]
    if getattr(a, "model_draft", None):
        out += ["-md", a.model_draft]
        for flag, v in (("-devd", a.device_draft), ("-ngld", a.gpu_layers_draft), ("-ctkd", a.cache_type_k_draft),
                        ("-ctvd", a.cache_type_v_draft)):
            if v is not None:
                out += [flag, str(v)]
        for rule in a.override_tensor_draft or ():
            out += ["-otd", rule]
    return out


def add_device_flags(p: argparse.ArgumentParser, *, sim: bool = True, virtual: bool = False) -> None:
    g = p.add_argument_group("devices (default: the GPUs NVML sees)")
    if sim:
        g.add_argument("--sim", metavar="SPEC",
                       help="simulated devices instead, e.g. 24GiB,24GiB,12GiB@10GiB or 8x80GiB")
    g.add_argument("--rpc", metavar="HOST:PORT,...", help="llama.cpp RPC servers to add (listed before GPUs)")
    g.add_argument("--llama-devices", action="store_true",
                   help="take the GPUs from llama.cpp (in a worker process) instead of NVML")
    if virtual:
        g.add_argument("--virtual", type=int, default=None, metavar="N",
                       help="N virtual devices (llama.cpp RPC servers on this machine's CPU)")


def devices_from_args(a: argparse.Namespace, session, *, for_load: bool = False, virtual_if_no_gpu: bool = False):
    """The DeviceChoice the device flags describe (gpulab.runtime.session.Session.devices)."""
    return session.devices(sim=getattr(a, "sim", None), rpc=a.rpc, llama_devices=a.llama_devices,
                           virtual=getattr(a, "virtual", None), for_load=for_load,
                           virtual_if_no_gpu=virtual_if_no_gpu)


def add_bench_flags(p: argparse.ArgumentParser, *, n_prompt: int = 512, n_gen: int = 128,
                    repetitions: int = 5) -> None:
    g = p.add_argument_group("tests (llama-bench's)")
    g.add_argument("-p", "--n-prompt", type=int, default=n_prompt, help="prompt tokens (0: no pp test)")
    g.add_argument("-n", "--n-gen", type=int, default=n_gen, help="generated tokens (0: no tg test)")
    g.add_argument("-r", "--repetitions", type=int, default=repetitions)
    g.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: llama-bench's)")


def add_model_arg(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    p.add_argument("model", nargs="?" if optional else None, default="demo" if optional else None,
                   help="path or http(s) URL of a .gguf, or 'demo' (SmolLM2-135M)")


def model_path(name: str) -> str:
    """'demo' is the bundled demo model; anything else is a path or URL as given."""
    if name == "demo":
        from ..sources.demo import demo_model_path
        return str(demo_model_path())
    return str(name)


def add_json_flag(p: argparse.ArgumentParser, frontend: str, help: str = "print the result as JSON") -> None:
    """--json, on the command line only: in a notebook the Result itself is the data."""
    if frontend == "cli":
        p.add_argument("--json", action="store_true", help=help)


POLICY_HELP = ("choose the settings by a policy: -ts (llama, ollama-spread, pack, balanced); moe-balance: -ts and "
               "-ot rules for a MoE model; fit: llama-server's own -fit, which may also choose -c, -ngl and -ot "
               "(write -c 0 for its default context); ollama: the GPUs and flags today's Ollama launches "
               "llama-server with, then its -fit, from Ollama's defaults rather than the flags given")


def add_policy_flag(p: argparse.ArgumentParser) -> None:
    """--policy, as plan, export and bench take it (gpulab.core.policies.apply)."""
    p.add_argument("--policy", choices=ALL_POLICIES, help=POLICY_HELP)
