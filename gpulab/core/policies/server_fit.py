"""What llama-server and llama-cli do with the settings you left unset: `common_params_fit`.

With the vendored llama.cpp, `common_params.fit_params` is on by default and `common_init_result`
(common/common.cpp) runs `common_fit_params` (common/fit.cpp, `common_params_fit_impl`) before every
llama-server or llama-cli load. llama-bench and llama-cpp-python do not. It may rewrite only what
the user left at its default: `-c 0`, `-ngl auto` (-1), an all-zero `-ts`, no tensor overrides.
`tools/fit-params` (llama-fit-params) prints the flags it chose. gpulab mirrors it step by step,
with gpulab's planner (`gpulab.core.placement.planner.plan`) in place of llama.cpp's dry runs (`no_alloc`
loads read through `llama_get_memory_breakdown`: per device model + context + compute bytes).

The algorithm (common_params_fit_impl), step by step:

0. Refused: split mode tensor ("not implemented for SPLIT_MODE_TENSOR"). n_streams is 1 with a
   unified KV cache (-kvu), else n_seq_max (llama-server's default -np auto is 4 slots with one
   unified cache: -np 4 -kvu, one stream; llama-fit-params' default is -np 1).
   n_ctx_max = n_ctx_train * n_streams, n_ctx_min_total = fit_ctx * n_streams (`-c 0` given
   explicitly sets fit_ctx to UINT32_MAX: "user has requested full context size").
1. Dry run with the settings as given (-c 0 resolved to n_ctx_max). Per device: projected free =
   free - (model + context + compute). With one device: if free >= margin, no changes. With
   several: no changes if every device meets its own margin. With no device at all the host's
   total memory is the budget.
2. Context: global surplus = sum(projected free) - sum(margins). If negative and -c was 0 and
   n_ctx_max > n_ctx_min_total: sum_used_target = sum(free) - sum(margins); with several devices
   less (nd + 1) * model_per_layer / (2 dense, 6 MoE) (model_per_layer = device model bytes /
   min(ngl, n_layer)) for the waste of whole layers/tensors. Dry run at n_ctx_min_total; if the
   target is above that, interpolate linearly between the two context sizes and round down to a
   multiple of 256 * n_streams (not below the minimum); else keep the minimum. One device: done
   ("entire model can be fit by reducing context"). Several: go on. No device: fail.
3. Checks, each a failure (llama-fit-params prints nothing and exits 1; llama-server loads with
   whatever was changed so far, the context included): ngl set by the user, -ts set by the user
   (several devices), split mode row (several devices), tensor overrides set by the user.
   MoE models: one dry run with every expert tensor on the CPU, giving the "dense-only" surplus.
   targets[id] = free[id] - margin[id]. From the last device to the first, fill layers ("dense"
   layers; for MoE dense-only layers: experts on the CPU, except the last device's first layer)
   by false position: low = what is set, high = every unassigned layer on this device; while the
   two differ by more than one layer, try low + delta * (target - mem_low) / (mem_high - mem_low)
   layers (at least 1, at most delta - 1) and keep it as the new low if it fits, else as the new
   high. A dense model (or a MoE one with no dense-only surplus) is done: -ngl = sum of layers,
   -ts = layers per device, -ot = the experts of the dense-only layers to the CPU.
4. MoE with a surplus: from the first device to the last that holds dense-only layers, convert
   dense-only layers at the back into full layers on this device by the same false position, then
   try one more layer whose FFN partly overflows (to the next device, or the CPU on the last):
   first "attention + up" (UP: gate and down overflow), then "attention + up + gate" (GATE: down
   overflows); if UP does not fit, "attention only" (ATTN). Each must leave this and the next
   device under target (strictly).
The result is -c, -ngl, -ts (layer counts, several devices only) and -ot (per partial layer:
`blk\\.N\\.ffn_(up|down|gate_up|gate)_(ch|)exps=CPU`, the first partial layer of a device with its
overflow pattern and buffer type), printed by llama-fit-params as
`-c N -ngl N [-ts a,b,...] [-ot "PAT=BUFT,..."]`.

Where gpulab's numbers can differ from a dry run: weights and KV bytes are exact (tested against
llama.cpp); compute buffers are closed forms within about 10% (25% with tensor overrides, see
gpulab.core.placement.compute). `FitResult.near_boundary` lists every decision whose projected memory was
closer to its target than that uncertainty: there fit's choice may differ by one layer or one
context step; a dry run on the devices present settles it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache

from ..config import SplitConfig
from ..devices import HOST_NAME, Device
from ..placement.compute import dry_run_extra_bytes
from ..placement.planner import plan, select_devices
from ..profile import ModelProfile

__all__ = [
    "DEFAULT_TARGET_MIB",
    "MOE_ALL_PATTERN",
    "UINT32_MAX",
    "FitResult",
    "fit_flags",
    "fit_margins",
    "overflow_pattern",
    "server_config",
    "server_fit",
    "server_would_fit",
    "user_placement",
]

MiB = 1024 * 1024
DEFAULT_TARGET_MIB = 1024            # common_params.fit_params_target
UINT32_MAX = 2**32 - 1
MOE_ALL_PATTERN = r"blk\.\d+\.ffn_(up|down|gate_up|gate)_(ch|)exps"   # common_params_fit_impl
COMPUTE_UNCERTAINTY = 0.10           # gpulab.core.placement.compute: closed forms within ~10% of the replay
COMPUTE_UNCERTAINTY_OVERRIDES = 0.25  # with tensor overrides (tests/integration/test_overrides_vs_llama.py)

# enum common_layer_fraction_t: which part of a layer a device keeps before the rest overflows
ATTN, UP, GATE, MOE = 1, 2, 3, 4


@lru_cache(maxsize=4096)     # fit writes the same patterns into every dry run
def overflow_pattern(il: int, fraction: int) -> str:
    """get_overflow_pattern: the tensors of layer `il` that leave the device for this fraction."""
    if fraction == ATTN:
        return rf"blk\.{il}\.ffn_(gate|up|gate_up|down).*"
    if fraction == UP:
        return rf"blk\.{il}\.ffn_(gate|gate_up|down).*"
    if fraction == GATE:
        return rf"blk\.{il}\.ffn_down.*"
    if fraction == MOE:
        return rf"blk\.{il}\.ffn_(up|down|gate_up|gate)_(ch|)exps"
    raise ValueError(fraction)


@dataclass
class _Ngl:
    """ngl_t: layers on one device, of which n_part are partial (their experts elsewhere)."""
    n_layer: int = 0
    n_part: int = 0
    overflow: int = MOE

    @property
    def n_full(self) -> int:
        return self.n_layer - self.n_part

    def copy(self) -> _Ngl:
        return _Ngl(self.n_layer, self.n_part, self.overflow)


def _copy(v: list[_Ngl]) -> list[_Ngl]:
    return [x.copy() for x in v]


def _u32(x: int) -> int:
    """A C++ conversion of an int64 to uint32_t (a negative step size wraps around)."""
    return x % (1 << 32)


def _div(a: int, b: int) -> int:
    """C++ integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


@dataclass(frozen=True)
class Decision:
    """One comparison fit made against a target, for the boundary check."""
    what: str
    device: str
    projected_bytes: int
    target_bytes: int
    uncertainty_bytes: int
    tokens_to_step: int | None = None    # context rounding: tokens from the nearest step of 256 * streams
    bytes_per_token: float = 0.0

    @property
    def slack_bytes(self) -> int:
        return abs(self.target_bytes - self.projected_bytes)

    @property
    def near(self) -> bool:
        return self.slack_bytes < self.uncertainty_bytes


@dataclass(frozen=True)
class FitResult:
    """What common_fit_params leaves llama-server with.

    status: 'success' (llama-fit-params prints `flags`), 'unchanged' (success, nothing needed
    changing), 'failure' (fit gave up: llama-fit-params exits 1, llama-server loads `config`, which
    keeps any context reduction made before giving up), 'error' (a hard error in llama.cpp), 'off'
    (-fit off). config: the settings llama-server loads (with fit off: explicit -fit off, so an
    export freezes them). reasons: fit's log, in its words."""
    status: str
    config: SplitConfig
    given: SplitConfig
    reasons: tuple[str, ...]
    device_names: tuple[str, ...]            # the devices fit saw, llama.cpp's order
    overrides: tuple[tuple[str, str], ...]   # (pattern, device name or 'CPU') fit wrote
    layers_per_device: tuple[int, ...]
    projected_used_bytes: tuple[int, ...]    # per device, with the chosen settings
    targets_bytes: tuple[int, ...]           # free - margin per device
    decisions: tuple[Decision, ...] = ()
    n_dry_runs: int = 0
    changed: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.status in ("success", "unchanged")

    @property
    def near_boundary(self) -> tuple[str, ...]:
        """Decisions closer to their target than gpulab's compute-buffer uncertainty."""
        out = []
        for d in self.decisions:
            if not d.near:
                continue
            if d.tokens_to_step is not None:
                tokens = int(d.uncertainty_bytes / d.bytes_per_token) if d.bytes_per_token else 0
                out.append(f"{d.what}: {d.tokens_to_step} tokens from the next step, but gpulab's compute buffers "
                           f"(uncertain by {d.uncertainty_bytes / MiB:.1f} MiB over the devices, ~{tokens} tokens) "
                           "decide the interpolation: llama.cpp's dry runs may give a context a step or more away")
            else:
                out.append(f"{d.what} on {d.device}: projected {d.projected_bytes / MiB:.1f} MiB vs target "
                           f"{d.target_bytes / MiB:.1f} MiB, within gpulab's compute-buffer uncertainty "
                           f"({d.uncertainty_bytes / MiB:.1f} MiB): fit's dry run may decide the other way")
        return tuple(out)

    @property
    def over_target(self) -> tuple[tuple[str, int], ...]:
        """(device, bytes) where the settings fit chose use more than free - margin. Fit checks each
        device when it fills it; filling the devices before it can still change its compute buffer
        (offloading every layer turns on pipeline parallelism: 4 copies of its inputs)."""
        return tuple((n, u - t) for n, u, t in zip(self.device_names, self.projected_used_bytes, self.targets_bytes)
                     if u > t)

    def flags(self, devices: list[Device] | None = None) -> str:
        """What llama-fit-params prints (tools/fit-params/fit-params.cpp), '' unless fit succeeded.
        `devices`: for RPC devices' buffer type names ('RPC0[127.0.0.1:50052]') in -ot."""
        if not self.ok:
            return ""
        return fit_flags(self.config, self.overrides, devices or [])


def fit_flags(config: SplitConfig, overrides, devices: list[Device]) -> str:
    """llama_fit_params' printf: -c, -ngl, -ts of whole layer counts with trailing zero entries
    dropped (none when one is left), -ot in quotes with each rule's buffer type name.

    Mirrored as printed, quirk included: when fit gives every layer to the first device (-ts 5,0,0)
    llama-fit-params prints no -ts, and those flags would spread the layers by free memory instead;
    gpulab's exports of the fitted config write the -ts fit chose."""
    from ..overrides import llama_buffer_type_name
    by_name = {d.name: llama_buffer_type_name(d) for d in devices}
    out = f"-c {config.n_ctx} -ngl {config.n_gpu_layers}"
    ts = [int(x) for x in config.tensor_split]
    while len(ts) > 1 and ts[-1] == 0:
        ts.pop()
    if len(ts) > 1:
        out += " -ts " + ",".join(str(x) for x in ts)
    if overrides:
        out += ' -ot "' + ",".join(f"{p}={by_name.get(t, t)}" for p, t in overrides) + '"'
    return out


def fit_margins(config: SplitConfig, n_devices: int) -> list[int]:
    """-fitt as common/arg.cpp stores it: one value for every device, else one per device (the rest
    keep the 1024 MiB default)."""
    t = config.fit_target
    if len(t) == 1:
        return [t[0] * MiB] * max(n_devices, 1)
    return [(t[i] if i < len(t) else DEFAULT_TARGET_MIB) * MiB for i in range(max(n_devices, 1))]


def server_config(config: SplitConfig, *, ctx_given: bool, parallel_given: bool) -> tuple[SplitConfig, int | None]:
    """(the config llama-server fits, fit's minimum context or None for -fitc) with llama-server's
    defaults for the flags not given (gpulab.core.command_line.program_defaults: -c 0, and -np auto,
    4 slots sharing one unified KV cache). An explicit -c 0 asks for the full context: fit's
    minimum becomes UINT32_MAX (common/arg.cpp)."""
    from ..command_line import program_defaults
    given = {k for k, g in (("n_ctx", ctx_given), ("n_seq_max", parallel_given)) if g}
    server = replace(config, **{k: v for k, v in program_defaults("llama-server", given).items() if k not in given})
    return server, (UINT32_MAX if ctx_given and config.n_ctx == 0 else None)


def user_placement(config: SplitConfig, n_devices: int) -> str | None:
    """Why fit leaves the weights where the user put them (common_params_fit_impl's checks before it
    fills devices, its words), or None when fit may place them: -ngl, -ts (several devices), split
    mode row (several devices), tensor overrides."""
    if config.n_gpu_layers != -1:
        return f"n_gpu_layers already set by user to {config.n_gpu_layers}, abort"
    if n_devices > 1:
        if any(config.tensor_split):
            return "model_params::tensor_split already set by user, abort"
        if config.split_mode == "row":
            return "changing weight allocation for LLAMA_SPLIT_MODE_ROW not implemented, abort"
    if config.has_tensor_overrides:
        return "model_params::tensor_buft_overrides already set by user, abort"
    return None


def server_would_fit(config: SplitConfig, devices: list[Device]) -> bool:
    """llama-server's fit would place the weights itself here: -fit on, a split mode it implements,
    and nothing of the placement set by the user (user_placement)."""
    return (config.fit == "on" and config.split_mode != "tensor"
            and user_placement(config, len(select_devices(devices, config))) is None)


class _Abort(Exception):
    """common_params_fit_exception (status failure) or runtime_error (status error)."""

    def __init__(self, msg: str, status: str = "failure"):
        super().__init__(msg)
        self.status = status


def server_fit(profile: ModelProfile, devices: list[Device], config: SplitConfig | None = None,
        host: Device | None = None, *, n_ctx_min: int | None = None,
        measure: Callable[[SplitConfig], list[int]] | None = None,
        extra: Callable[[SplitConfig], list[int]] | None = None, n_outputs: int | None = None,
        margins: list[int] | None = None) -> FitResult:
    """common_params_fit for `config` on `devices` (their free memory as llama.cpp would see it):
    llama-server's -fit, which changes the settings left unset until they fit. Whether a given
    plan fits in memory is Plan.fits.

    config.fit_target / fit_ctx are -fitt / -fitc; n_ctx_min overrides fit_ctx (UINT32_MAX: what an
    explicit `-c 0` sets). `measure(config)` returns the bytes (model + context + compute) of each
    device the config uses; default: gpulab's planner. The result's config is what llama-server
    loads. `extra(config)`: the bytes a second model (the draft) adds to each device the config uses,
    measured at config's context, as common_fit_extra_model's add_extra_memory adds them to every
    dry run (common/fit.cpp). `n_outputs`: the context's n_outputs_max as the program sets it
    (llama-server does, llama-fit-params does not: gpulab.core.placement.compute). `margins`: bytes
    to leave free per device where they are not whole MiB (llama-server adds the projector's bytes
    to fit_params_target); default: fit_margins of config.fit_target."""
    config = config or SplitConfig()
    if config.fit == "off":
        return FitResult("off", config, config, ("-fit off: llama.cpp uses the settings as given",), (), (), (),
                         (), ())
    used = select_devices(devices, config)
    run = _Fit(profile, list(devices), used, config, host, measure,
               config.fit_ctx if n_ctx_min is None else n_ctx_min)
    run.extra_fn = extra
    run.n_outputs = n_outputs
    run.margins = margins
    try:
        run.go()
    except _Abort as e:
        run.log(("failed to fit params to free device memory: " if e.status == "failure" else
                 "encountered an error while trying to fit params to free device memory: ") + str(e))
        run.status = e.status
    return run.result()


class _Fit:
    def __init__(self, profile: ModelProfile, devices: list[Device], used: list[Device], config: SplitConfig,
                 host: Device | None, measure, n_ctx_min: int):
        self.profile, self.devices, self.used, self.given, self.host = profile, devices, used, config, host
        self.measure_fn = measure
        self.extra_fn: Callable[[SplitConfig], list[int]] | None = None
        self.n_outputs: int | None = None
        self.margins: list[int] | None = None
        self.compute: dict[SplitConfig, list[int]] = {}   # the planner's compute buffers per dry run
        self.n_ctx_min = n_ctx_min
        self.cfg = config                  # cparams/mparams as fit changes them
        self.reasons: list[str] = []
        self.decisions: list[Decision] = []
        self.status = "success"
        self.n_dry_runs = 0
        self.overrides: tuple[tuple[str, str], ...] = ()
        self.layers: list[int] = []
        self.mem: list[int] = []
        self.targets: list[int] = []
        self.nd = len(used)
        self.names = [d.name for d in used]

    def log(self, text: str) -> None:
        self.reasons.append(text)

    # -- dry runs ------------------------------------------------------------------------------
    def measure(self, cfg: SplitConfig) -> list[int]:
        """One dry run (common_get_device_memory_data): model + context + compute per device."""
        self.n_dry_runs += 1
        added = self.extra_fn(cfg) if self.extra_fn is not None else [0] * self.nd
        if self.measure_fn is not None:
            return [m + a for m, a in zip(self.measure_fn(cfg), added)]
        p = plan(self.profile, self.devices, cfg, self.host, n_outputs=self.n_outputs)
        # a dry run's breakdown is not quite a real load's (gpulab.core.placement.compute.dry_run_extra_bytes)
        extra = dry_run_extra_bytes(self.profile, p.config, list(p.layer_devices), [d.name for d in p.devices])
        compute = [d.compute_bytes + extra.get(d.name, 0) for d in p.offload_devices]
        self.compute[cfg] = compute
        return [d.weights_bytes + d.kv_bytes + d.state_bytes + c + a
                for d, c, a in zip(p.offload_devices, compute, added)]

    def _uncertainty(self, cfg: SplitConfig, dev: int) -> int:
        """How far gpulab's compute buffer (gpulab.core.placement.compute) may be from llama.cpp's, plus the
        rounding of what llama.cpp allocates; 0 where the dry run was not gpulab's."""
        compute = self.compute.get(cfg)
        if compute is None:
            return 0
        rel = COMPUTE_UNCERTAINTY_OVERRIDES if cfg.has_tensor_overrides else COMPUTE_UNCERTAINTY
        return int(rel * compute[dev]) + MiB // 2

    def decide(self, what: str, cfg: SplitConfig, dev: int, projected: int, target: int) -> None:
        unc = self._uncertainty(cfg, dev)
        self.decisions.append(Decision(what, self.names[dev] if dev < self.nd else HOST_NAME, projected, target, unc))

    # -- the algorithm -----------------------------------------------------------------------
    def go(self) -> None:
        cfg, prof = self.given, self.profile
        if cfg.split_mode == "tensor":
            raise _Abort("llama_params_fit is not implemented for SPLIT_MODE_TENSOR, abort")
        n_streams = cfg.n_streams   # 1 with a unified KV cache, else n_seq_max
        n_ctx_auto = cfg.n_ctx == 0
        # common/fit.cpp: hp_ngl = llama_model_n_layer (hparams.n_layer(): MTP layers not counted unless
        # load_mtp), so a model with nextn layers is fitted as if it had n_layer_main layers
        hp_ngl, hp_nct, hp_nex = prof.n_layer_main, prof.n_ctx_train or 4096, prof.n_expert
        n_ctx_max = min(hp_nct * n_streams, UINT32_MAX)
        n_ctx_min_total = min(self.n_ctx_min * n_streams, UINT32_MAX)
        nd = self.nd

        # step 1
        if n_ctx_auto:
            self.cfg = cfg = replace(cfg, n_ctx=n_ctx_max)
            if n_streams > 1:
                self.log(f"context size unset and KV cache not unified -> using {n_ctx_max} for {n_streams} sequences")
        full = self.measure(cfg)
        margins = self.margins[:nd] if self.margins is not None else fit_margins(cfg, nd)
        free = [d.free_bytes for d in self.used]
        sum_free = sum(free)
        if nd == 0:
            host_plan = plan(prof, [], cfg, self.host, n_outputs=self.n_outputs)
            sum_used = (host_plan.host.weights_bytes + host_plan.host.kv_bytes + host_plan.host.state_bytes
                        + host_plan.host.compute_bytes)
            sum_free = self.host.total_bytes if self.host is not None else 0
            sum_projected_free = sum_free - sum_used
            self.log(f"projected to use {sum_used // MiB} MiB of host memory vs. {sum_free // MiB} MiB of total "
                     "host memory")
            if sum_projected_free >= margins[0]:
                self.log(f"will leave {sum_projected_free // MiB} >= {margins[0] // MiB} MiB of system memory, "
                         "no changes needed")
                self.status = "unchanged"
                return
            sum_projected_model = 0
        else:
            proj_free = [free[i] - full[i] for i in range(nd)]
            sum_used = sum(full)
            sum_projected_free = sum(proj_free)
            sum_projected_model = self._model_bytes(cfg)
            if nd > 1:
                for i in range(nd):
                    self.log(f"  - {self.names[i]}: {self.used[i].total_bytes // MiB} total, {full[i] // MiB} used, "
                             f"{_div(proj_free[i], MiB)} free vs. target of {margins[i] // MiB}")
            self.log(f"projected to use {sum_used // MiB} MiB of device memory vs. {sum_free // MiB} MiB of free "
                     "device memory")
            for i in range(nd):
                self.decide("initial settings", cfg, i, full[i], free[i] - margins[i])
            if nd == 1 and proj_free[0] >= margins[0]:
                self.log(f"will leave {_div(proj_free[0], MiB)} >= {margins[0] // MiB} MiB of free device memory, "
                         "no changes needed")
                self.status = "unchanged"
                self.mem = full
                return
            if nd > 1 and all(proj_free[i] >= margins[i] for i in range(nd)):
                self.log("targets for free memory can be met on all devices, no changes needed")
                self.status = "unchanged"
                self.mem = full
                return

        # step 2
        global_surplus = sum_projected_free - sum(margins)
        if global_surplus < 0:
            if nd <= 1:
                self.log(f"cannot meet free memory target of {margins[0] // MiB} MiB, need to reduce device memory "
                         f"by {_div(-global_surplus, MiB)} MiB")
            else:
                self.log(f"cannot meet free memory targets on all devices, need to use {_div(-global_surplus, MiB)} "
                         "MiB less in total")
            if n_ctx_auto:
                if n_ctx_max > n_ctx_min_total:
                    sum_used_target = sum_free - sum(margins)
                    if nd > 1:
                        ngl = cfg.n_gpu_layers
                        denom = min(_u32(ngl), hp_ngl)
                        if denom == 0:
                            raise _Abort("n_gpu_layers 0 with several devices: llama.cpp divides by zero here",
                                         "error")
                        model_per_layer = sum_projected_model // denom
                        sum_used_target -= (nd + 1) * model_per_layer // (2 if hp_nex == 0 else 6)
                    cfg_min = self.cfg = replace(cfg, n_ctx=n_ctx_min_total)
                    if nd == 0:
                        hp = plan(prof, [], cfg_min, self.host, n_outputs=self.n_outputs).host
                        used_min = hp.weights_bytes + hp.kv_bytes + hp.state_bytes + hp.compute_bytes
                    else:
                        used_min = sum(self.measure(cfg_min))
                    if sum_used_target > used_min:
                        n_ctx = n_ctx_min_total + _div((n_ctx_max - n_ctx_min_total) * (sum_used_target - used_min),
                                                       sum_used - used_min)
                        align = 256 * n_streams
                        self._rounding(n_ctx, align, n_ctx_min_total, n_ctx_max, sum_used, used_min, cfg, cfg_min)
                        n_ctx = max(n_ctx - n_ctx % align, n_ctx_min_total)
                        self.cfg = cfg = replace(cfg, n_ctx=n_ctx)
                        bytes_per_ctx = _div(sum_used - used_min, n_ctx_max - n_ctx_min_total)
                        self.log(f"context size reduced from {n_ctx_max} to {n_ctx} -> need "
                                 f"{_div((n_ctx_max - n_ctx) * bytes_per_ctx, MiB)} MiB less memory in total")
                        if nd <= 1:
                            self.log("entire model can be fit by reducing context")
                            self.mem = self.measure(cfg) if nd else []
                            return
                        self.log("entire model should be fit across devices by reducing context")
                    else:
                        cfg = cfg_min
                        self.log(f"context size reduced from {n_ctx_max} to {cfg.n_ctx} -> need "
                                 f"{_div(sum_used - used_min, MiB)} MiB less memory in total")
                else:
                    if self.n_ctx_min == UINT32_MAX:
                        self.log(f"user has requested full context size of {n_ctx_max} -> no change")
                    else:
                        self.log(f"default model context size is {n_ctx_max} which is <= the min. context size of "
                                 f"{n_ctx_min_total} -> no change")
            else:
                self.log(f"context size set by user to {cfg.n_ctx} -> no change")
        if nd == 0:
            raise _Abort("was unable to fit model into system memory by reducing context, abort")

        # step 3: the checks
        why = user_placement(cfg, nd)
        if why:
            raise _Abort(why)
        self._fill(cfg, hp_ngl, hp_nex, free, margins)

    def _rounding(self, raw: int, align: int, lo: int, hi: int, used_max: int, used_min: int,
                  cfg_max: SplitConfig, cfg_min: SplitConfig) -> None:
        """The interpolated context is rounded down to a step of `align`: how far (in bytes of the
        sum over devices) it was from the next step either way, against gpulab's uncertainty."""
        if raw <= lo or used_max <= used_min:
            return
        bytes_per_token = (used_max - used_min) / max(hi - lo, 1)
        to_step = min(raw % align, align - raw % align)
        self.decisions.append(Decision(
            f"context {raw} rounded to a step of {align}", "all devices", 0, int(to_step * bytes_per_token),
            self._sum_uncertainty(cfg_max) + self._sum_uncertainty(cfg_min), tokens_to_step=to_step,
            bytes_per_token=bytes_per_token))

    def _sum_uncertainty(self, cfg: SplitConfig) -> int:
        return sum(self._uncertainty(cfg, i) for i in range(self.nd))

    def _model_bytes(self, cfg: SplitConfig) -> int:
        p = plan(self.profile, self.devices, cfg, self.host, n_outputs=self.n_outputs)
        return sum(d.weights_bytes for d in p.offload_devices)

    # -- steps 3 and 4 -----------------------------------------------------------------------
    def _config_for(self, ngl: list[_Ngl], bufts: list[str]) -> tuple[SplitConfig, tuple[tuple[str, str], ...]]:
        """set_ngl_tensor_split_tbo: -ngl, -ts (layer counts) and the overflow overrides."""
        nd, hp_ngl = self.nd, self.profile.n_layer_main
        n_gpu_layers = sum(x.n_layer for x in ngl)
        ts = tuple(float(x.n_layer) for x in ngl) if nd > 1 else ()
        il0 = hp_ngl + 1 - n_gpu_layers
        rules: list[tuple[str, str]] = []
        for i in range(nd):
            il0 += ngl[i].n_full
            for il in range(il0, il0 + ngl[i].n_part):
                first = il == il0
                rules.append((overflow_pattern(il, ngl[i].overflow if first else MOE),
                              bufts[i] if first else HOST_NAME))
            il0 += ngl[i].n_part
        cfg = replace(self.cfg, n_gpu_layers=n_gpu_layers, tensor_split=ts,
                      tensor_overrides=tuple(f"{p}={t}" for p, t in rules))
        return cfg, tuple(rules)

    def _mem(self, ngl: list[_Ngl], bufts: list[str]) -> list[int]:
        cfg, _ = self._config_for(ngl, bufts)
        self._last = cfg
        return self.measure(cfg)

    def _check(self, what: str, ngl: list[_Ngl], bufts: list[str], dev: int, mem: list[int],
               strict: bool = False) -> bool:
        """Compare the last dry run (of `ngl`) on device `dev` with its target."""
        self.decide(what, self._last, dev, mem[dev], self.targets[dev])
        return mem[dev] < self.targets[dev] if strict else mem[dev] <= self.targets[dev]

    def _fill(self, cfg: SplitConfig, hp_ngl: int, hp_nex: int, free: list[int], margins: list[int]) -> None:
        nd = self.nd
        surplus_cpu_moe = 0
        if hp_nex > 0:
            cpu_moe = replace(cfg, tensor_overrides=(f"{MOE_ALL_PATTERN}={HOST_NAME}",))
            m = self.measure(cpu_moe)
            surplus_cpu_moe = sum(free[i] - m[i] - margins[i] for i in range(nd))
            if surplus_cpu_moe > 0:
                self.log(f"with only dense weights in device memory there is a total surplus of "
                         f"{_div(surplus_cpu_moe, MiB)} MiB")
            else:
                self.log(f"with only dense weights in device memory there is still a total deficit of "
                         f"{_div(-surplus_cpu_moe, MiB)} MiB")
        self.targets = targets = [free[i] - margins[i] for i in range(nd)]
        bufts = [HOST_NAME] * nd
        ngl = [_Ngl() for _ in range(nd)]
        mem = self._mem(ngl, bufts)
        self.log("filling dense layers back-to-front:" if hp_nex == 0 else
                 "filling dense-only layers back-to-front:")
        for id_ in range(nd - 1, -1, -1):
            n_unassigned = hp_ngl + 1 - sum(ngl[j].n_layer for j in range(id_ + 1, nd))
            high = _copy(ngl)
            high[id_].n_layer = n_unassigned
            if hp_nex > 0:
                high[id_].n_part = high[id_].n_layer if id_ < nd - 1 else high[id_].n_layer - 1
            if high[id_].n_layer > 0:
                mem_high = self._mem(high, bufts)
                if not self._check(f"{high[id_].n_layer} layers", high, bufts, id_, mem_high):
                    delta = high[id_].n_layer - ngl[id_].n_layer
                    while delta > 1:
                        step = _u32(_div(delta * (targets[id_] - mem[id_]), mem_high[id_] - mem[id_]))
                        step = min(max(step, 1), delta - 1)
                        test = _copy(ngl)
                        test[id_].n_layer += step
                        if hp_nex:
                            test[id_].n_part += step - 1 if (id_ == nd - 1 and test[id_].n_part == 0) else step
                        mem_test = self._mem(test, bufts)
                        if self._check(f"{test[id_].n_layer} layers", test, bufts, id_, mem_test):
                            ngl, mem = test, mem_test
                        else:
                            high, mem_high = test, mem_test
                        delta = high[id_].n_layer - ngl[id_].n_layer
                else:
                    ngl, mem = high, mem_high
            self.log(f"  - {self.names[id_]}: {ngl[id_].n_layer:2d} layers, {mem[id_] // MiB:6d} MiB used, "
                     f"{_div(free[id_] - mem[id_], MiB):6d} MiB free")
        if hp_nex == 0 or surplus_cpu_moe <= 0:
            self._finish(ngl, bufts, mem)
            return

        # step 4
        id_dense_start = nd
        for id_ in range(nd - 1, -1, -1):
            if ngl[id_].n_layer > 0:
                id_dense_start = id_
                continue
            break
        self.log("converting dense-only layers to full layers and filling them front-to-back with overflow to "
                 "next device/system memory:")
        id_ = 0
        while id_ <= id_dense_start < nd:
            high = _copy(ngl)
            for jd in range(id_dense_start, nd):
                n_move = high[jd].n_layer if jd < nd - 1 else high[jd].n_layer - 1
                high[id_].n_layer += n_move
                high[jd].n_layer -= n_move
                high[jd].n_part = 0
            id_dense_start_high = nd - 1
            mem_high = self._mem(high, bufts)
            if not self._check(f"{high[id_].n_layer} full layers", high, bufts, id_, mem_high):
                delta = high[id_].n_full - ngl[id_].n_full
                while delta > 1:
                    step = _u32(_div(delta * (targets[id_] - mem[id_]), mem_high[id_] - mem[id_]))
                    step = min(max(step, 1), delta - 1)
                    test = _copy(ngl)
                    ids_test = id_dense_start
                    converted = 0
                    while ids_test < nd:
                        n_conv = min(step - converted, test[ids_test].n_part)
                        test[ids_test].n_layer -= n_conv
                        test[ids_test].n_part -= n_conv
                        test[id_].n_layer += n_conv
                        converted += n_conv
                        if test[ids_test].n_part > 0:
                            break
                        ids_test += 1
                    mem_test = self._mem(test, bufts)
                    if self._check(f"{test[id_].n_layer} layers", test, bufts, id_, mem_test):
                        ngl, mem, id_dense_start = test, mem_test, ids_test
                    else:
                        high, mem_high, id_dense_start_high = test, mem_test, ids_test
                    delta = high[id_].n_full - ngl[id_].n_full
            else:
                ngl, mem, id_dense_start = high, mem_high, id_dense_start_high

            # try to fit at least part of one more layer (llama.cpp reads ngl_per_device[nd] when
            # every dense-only layer was converted: past the end, so nothing to try)
            if id_dense_start < nd and ngl[id_dense_start].n_layer > (0 if id_ < nd - 1 else 1):
                test = _copy(ngl)
                ids_test = id_dense_start
                test[ids_test].n_layer -= 1
                test[ids_test].n_part -= 1
                test[id_].n_layer += 1
                test[id_].n_part += 1
                if test[ids_test].n_part == 0:
                    ids_test += 1
                test[id_].overflow = UP
                bufts_test = list(bufts)
                if id_ < nd - 1:
                    bufts_test[id_] = self.names[id_ + 1]
                self.log("trying to fit one extra layer with overflow_type=LAYER_FRACTION_UP")
                mem_test = self._mem(test, bufts_test)
                if self._fits_pair("one extra layer (UP)", test, bufts_test, id_, mem_test):
                    ngl, bufts, mem, id_dense_start = _copy(test), bufts_test, mem_test, ids_test
                    test[id_].overflow = GATE
                    self.log("trying to fit one extra layer with overflow_type=LAYER_FRACTION_GATE")
                    mem_test = self._mem(test, bufts_test)
                    if self._fits_pair("one extra layer (GATE)", test, bufts_test, id_, mem_test):
                        ngl, bufts, mem, id_dense_start = _copy(test), bufts_test, mem_test, ids_test
                else:
                    test[id_].overflow = ATTN
                    self.log("trying to fit one extra layer with overflow_type=LAYER_FRACTION_ATTN")
                    mem_test = self._mem(test, bufts_test)
                    if self._fits_pair("one extra layer (ATTN)", test, bufts_test, id_, mem_test):
                        ngl, bufts, mem, id_dense_start = _copy(test), bufts_test, mem_test, ids_test
            self.log(f"  - {self.names[id_]}: {ngl[id_].n_layer:2d} layers ({ngl[id_].n_part:2d} overflowing), "
                     f"{mem[id_] // MiB:6d} MiB used, {_div(free[id_] - mem[id_], MiB):6d} MiB free")
            id_ += 1
        for j in range(id_dense_start + 1, nd):
            self.log(f"  - {self.names[j]}: {ngl[j].n_layer:2d} layers ({ngl[j].n_part:2d} overflowing), "
                     f"{mem[j] // MiB:6d} MiB used, {_div(free[j] - mem[j], MiB):6d} MiB free")
        self._finish(ngl, bufts, mem)

    def _fits_pair(self, what: str, ngl: list[_Ngl], bufts: list[str], id_: int, mem: list[int]) -> bool:
        ok = self._check(what, ngl, bufts, id_, mem, strict=True)
        if id_ + 1 < self.nd:
            ok = self._check(what + " (next device)", ngl, bufts, id_ + 1, mem, strict=True) and ok
        return ok

    def _finish(self, ngl: list[_Ngl], bufts: list[str], mem: list[int]) -> None:
        self.cfg, self.overrides = self._config_for(ngl, bufts)
        self.layers = [x.n_layer for x in ngl]
        self.mem = mem

    def result(self) -> FitResult:
        given, cfg = self.given, self.cfg
        final = replace(cfg, fit="off") if self.status in ("success", "unchanged", "failure") else given
        changed = tuple(a for a in ("n_ctx", "n_gpu_layers", "tensor_split", "tensor_overrides")
                        if getattr(final, a) != getattr(given, a))
        status = self.status
        if status in ("success", "unchanged"):   # common_fit_params logs it either way
            self.log("successfully fit params to free device memory")
        return FitResult(status=status, config=final, given=given, reasons=tuple(self.reasons),
                         device_names=tuple(self.names), overrides=self.overrides,
                         layers_per_device=tuple(self.layers), projected_used_bytes=tuple(self.mem),
                         targets_bytes=tuple(self.targets), decisions=tuple(self.decisions),
                         n_dry_runs=self.n_dry_runs, changed=changed)
