"""A pasted command planned as llama-server runs it: fit (with the draft as its extra model and the
projector in its targets), then the main model, the draft and the projector per device.

llama-server (tools/server/server-context.cpp load_model), in order:
1. with -fit on and --mmproj: mtmd_get_memory_usage, added to fit_params_target[i] where i is the
   projector device's index in ggml's *registry* (GPU backends, then the CPU, then the RPC servers'
   devices, which --rpc registers last), not in the model's device list (RPC servers first): on
   CUDA-only machines the two agree; with RPC servers the margin lands on another device, or none;
2. common_fit_params with the draft as common_fit_extra_model: the draft measured on its devices
   at the main context, counted only where those are the main model's devices (common/fit.cpp);
3. the main model and context; 4. the draft (common_base_params_to_speculative, n_ctx = the main
   context, -ts as fit left it), or with --spec-type draft-mtp and no draft, the MTP context on the
   main model (gpulab.core.placement.mtp; fit counts it as the extra model with shares_model: its
   KV and compute, not its weights, which the main model loads with load_mtp);
5. the projector (clip_ctx on its device).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..command_line import Command
from ..config import SplitConfig
from ..devices import HOST_NAME, Device
from ..errors import ConfigError
from ..placement.mtp import MtpContext, mtp_config, plan_mtp_context, with_mtp
from ..placement.plan import Plan
from ..placement.planner import plan, select_devices
from ..placement.process import (
    ProcessPlan,
    ProjectorPlacement,
    ProjectorProfile,
    plan_process,
    projector_device,
)
from ..profile import ModelProfile
from ..units import format_bytes
from .server_fit import UINT32_MAX, FitResult, fit_margins, server_fit

__all__ = ["CommandPlan", "around", "plan_command", "registry_index", "with_process"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class CommandPlan:
    command: Command
    process: ProcessPlan
    fit: FitResult | None            # None: the program does not fit (llama-bench) or -fit off
    notes: tuple[str, ...]           # what fit does not count, with the bytes


def registry_index(devices: Sequence[Device], name: str) -> int | None:
    """The device's index in ggml_backend_dev_get's order: GPU backends' devices, the CPU, then
    the RPC servers' devices (ggml_backend_registry ctor, then common/arg.cpp add_rpc_devices)."""
    order = [d.name for d in devices if d.kind in ("gpu", "igpu")] + [HOST_NAME] + \
            [d.name for d in devices if d.kind == "rpc"]
    return order.index(name) if name in order else None


def _check_mtp(profile: ModelProfile) -> None:
    """llama_init_from_model refuses a context of type MTP on a model without nextn layers, and
    llama-server stops ('failed to create MTP context'); archs whose loader never loads them
    (glm4, exaone4, ...) build no MTP graph (src/models/glm4.cpp)."""
    if not profile.n_nextn:
        raise ConfigError(f"--spec-type draft-mtp: {profile.name} has no MTP (nextn) layers "
                          f"({profile.arch}.nextn_predict_layers is 0); llama-server fails to create the MTP "
                          "context: drop --spec-type draft-mtp or give a model with MTP heads")
    if profile.mtp_never_loaded:
        raise ConfigError(f"--spec-type draft-mtp: the vendored llama.cpp never loads {profile.arch}'s MTP layers "
                          "and has no MTP graph for it, so gpulab does not plan one: drop --spec-type draft-mtp")


def _projector_placement(cmd: Command, projector: ProjectorProfile | None, devices: Sequence[Device],
                         config: SplitConfig) -> ProjectorPlacement | None:
    if projector is None or cmd.projector is None:
        return None
    where, why = projector_device(devices, offload=cmd.projector.offload, device=cmd.projector.device,
                                  main_devices=config.devices)
    fa = config.flash_attn != "off"     # mtmd gets params_base.flash_attn_type
    return ProjectorPlacement(where, projector.weights_bytes, projector.compute_bytes(fa), why,
                              host_compute_bytes=projector.host_compute_bytes())


def _draft_plan(cmd: Command, draft: ModelProfile, main_plan: Plan, devices: list[Device],
                host: Device | None) -> Plan:
    """common_speculative_init_result: the draft context holds llama_n_ctx(ctx_tgt) tokens; -ts is
    params.tensor_split as fit left it, read for as many devices as the draft has
    (llama_model_base::load_tensors)."""
    assert cmd.draft is not None
    main, d, given = main_plan.config, cmd.draft.config, cmd.config
    # the draft's own flags over the main model's settings as they are loaded (after fit, or as the
    # fleet planner chose them); -devd and the -sm layer a single -devd forces, where given
    dcfg = main.replace(devices=d.devices if d.devices != given.devices else main.devices,
                        split_mode=d.split_mode if d.split_mode != given.split_mode else main.split_mode,
                        n_gpu_layers=d.n_gpu_layers, tensor_overrides=d.tensor_overrides, cpu_moe=d.cpu_moe,
                        n_cpu_moe=d.n_cpu_moe, n_cpu_ffn=0, type_k=d.type_k, type_v=d.type_v, fit="off",
                        tensor_split=())
    dcfg = dcfg.replace(tensor_split=main.tensor_split[:len(select_devices(devices, dcfg))])
    # common_base_params_to_speculative: n_outputs_max = n_parallel
    return plan(draft, devices, dcfg, host, n_outputs=main.n_seq_max)


def _mtp_context(cmd: Command, profile: ModelProfile, main_plan: Plan) -> MtpContext:
    """common_speculative_init_result: a second context on the main model, llama_n_ctx(ctx_tgt) tokens."""
    return plan_mtp_context(profile, main_plan, mtp_config(main_plan.config, *cmd.draft_cache),
                            main_plan.config.n_seq_max)


def around(cmd: Command, main_plan: Plan, devices: list[Device], host: Device | None = None, *,
           draft: ModelProfile | None = None, projector: ProjectorProfile | None = None) -> ProcessPlan:
    """The process around a main model's plan made elsewhere (the fleet planner's, its -ts chosen,
    no fit): the draft on its devices, the MTP context, the projector, per device, as plan_command
    adds them. `main_plan` was planned on with_mtp(profile) where the command runs draft-mtp."""
    mtp = None
    if "draft-mtp" in cmd.spec_types and cmd.draft is None:
        _check_mtp(main_plan.profile)
        mtp = _mtp_context(cmd, main_plan.profile, main_plan)
    draft_plan = _draft_plan(cmd, draft, main_plan, devices, host) if draft is not None and cmd.draft else None
    proj = _projector_placement(cmd, projector, devices, main_plan.config)
    return plan_process(main_plan, draft_plan, proj, devices, mtp)


def with_process(cmd: Command, main_plan: Plan, devices: list[Device], host: Device | None = None, *,
                 draft: ModelProfile | None = None, projector: ProjectorProfile | None = None) -> Plan:
    """`main_plan` with its process's draft, projector and MTP context added to each of its devices
    (DevicePlan.process_bytes): what the fleet planner and the lab count. A part that lands on a
    device outside the plan's is refused in one line."""
    pp = around(cmd, main_plan, devices, host, draft=draft, projector=projector)
    extra = {r.name: r.draft_bytes + r.projector_bytes + r.mtp_bytes for r in pp.rows}
    outside = [n for n, b in extra.items() if b and n not in {d.name for d in main_plan.devices}]
    if outside:
        raise ConfigError(f"its draft or projector goes to {', '.join(outside)}, outside the model's devices: "
                          "give the model those devices too")
    return replace(main_plan, devices=tuple(replace(d, process_bytes=extra.get(d.name, 0))
                                            for d in main_plan.devices))


def plan_command(cmd: Command, profile: ModelProfile, devices: list[Device], host: Device | None = None, *,
                 draft: ModelProfile | None = None, projector: ProjectorProfile | None = None) -> CommandPlan:
    config = cmd.config
    n_out, n_out_draft = cmd.n_outputs()
    notes: list[str] = []
    mtp_on = "draft-mtp" in cmd.spec_types and cmd.draft is None
    if mtp_on:
        _check_mtp(profile)
        # common_model_params_to_llama: mparams.load_mtp loads the nextn layers' tensors
        profile = with_mtp(profile)
    main_names = [d.name for d in select_devices(devices, config)]
    proj_place = _projector_placement(cmd, projector, devices, config)
    fitted = None
    extra = None
    if cmd.program != "llama-bench" and config.fit == "on":
        fit_margin_bytes: list[int] | None = None
        if proj_place is not None and proj_place.device != HOST_NAME:
            # server-context.cpp: fit_params_target[registry index] += the projector's bytes
            margins = fit_margins(config, max(len(main_names), 1))
            i = registry_index(devices, proj_place.device)
            size = proj_place.weights_bytes + proj_place.compute_bytes
            # mtmd_get_memory_usage counts clip's CPU compute buffer too, at the CPU's registry index
            widened = False
            for j, b in ((i, size), (registry_index(devices, HOST_NAME), proj_place.host_compute_bytes)):
                if j is not None and j < len(margins) and b:
                    margins[j] += b
                    widened = True
            if widened:
                # in bytes, as fit_params_target holds them (whole MiB would move fit's boundary)
                fit_margin_bytes = margins
                target = main_names[i] if i is not None and i < len(main_names) else f"device #{i}"
                if i is not None and target != proj_place.device:
                    notes.append(f"fit adds the projector's {format_bytes(size)} to the margin of {target} "
                                 f"(ggml registry index {i}), not of {proj_place.device}, where clip puts it")
        if draft is not None and cmd.draft is not None:
            d0 = cmd.draft.config.replace(tensor_split=())
            d0 = d0.replace(tensor_split=cmd.config.tensor_split[:len(select_devices(devices, d0))])

            def extra(cfg, _d=d0):
                p = plan(draft, devices, _d.replace(n_ctx=cfg.n_ctx, fit="off"), host, n_outputs=n_out_draft)
                by = {x.name: x.buffer_bytes for x in p.offload_devices}
                return [by.get(n, 0) for n in main_names]
        if mtp_on:
            # common_init_result: the MTP context as common_fit_extra_model (shares_model: no weights),
            # measured with the parameters given (mparams_dft is taken before fit changes mparams)
            given, n_mtp = config, n_out_draft or config.n_seq_max

            def extra(cfg, _g=given, _n=n_mtp):
                p = plan(profile, devices, _g.replace(n_ctx=cfg.n_ctx, fit="off"), host, n_outputs=n_out)
                m = plan_mtp_context(profile, p, mtp_config(p.config, *cmd.draft_cache), _n)
                return [m.bytes_on(n) for n in main_names]
        n_ctx_min = UINT32_MAX if "n_ctx" in cmd.given and config.n_ctx == 0 else None
        fitted = server_fit(profile, devices, config, host, n_ctx_min=n_ctx_min, extra=extra, n_outputs=n_out,
                            margins=fit_margin_bytes)
        config = fitted.config.replace(fit_target=config.fit_target)
    main_plan = plan(profile, devices, config, host, n_outputs=n_out)
    draft_plan = None
    if draft is not None and cmd.draft is not None:
        draft_plan = _draft_plan(cmd, draft, main_plan, devices, host)
        if fitted is not None and extra is not None:
            # fit measured the draft with the -ts given; it loads with the -ts fit wrote: the gap
            counted = dict(zip(main_names, extra(main_plan.config)))
            for d in draft_plan.offload_devices:
                real = d.buffer_bytes
                if d.name in counted and abs(real - counted[d.name]) > MiB:
                    notes.append(f"fit counted {format_bytes(counted[d.name])} of the draft on {d.name}; llama-server "
                                 f"allocates {format_bytes(real)} there (the draft loads with the -ts fit wrote)")
        def _bytes(name: str) -> int:
            d = draft_plan.device(name)
            return d.buffer_bytes

        off_main = [d.name for d in draft_plan.offload_devices if d.name not in main_names and
                    d.buffer_bytes]
        if fitted is not None and off_main:
            notes.append("fit counts the draft only on the main model's devices (common_fit_extra_model): its "
                         + ", ".join(f"{format_bytes(_bytes(n))} on {n}" for n in off_main) + " are not in fit's sums")
    mtp: MtpContext | None = None
    if mtp_on:
        # common_speculative_init_result: a second context on the main model, llama_n_ctx(ctx_tgt) tokens
        mtp = _mtp_context(cmd, profile, main_plan)
        if fitted is not None and extra is not None:
            # fit measured the MTP context on the placement given; it runs on the one fit wrote
            counted = dict(zip(main_names, extra(main_plan.config)))
            for name in main_names:
                real = mtp.bytes_on(name)
                if abs(real - counted[name]) > MiB:
                    notes.append(f"fit counted {format_bytes(counted[name])} of the MTP context on {name}; "
                                 f"llama-server allocates {format_bytes(real)} there (fit measures the MTP context "
                                 "once per context size, on the -ngl/-ts given, not on those it writes)")
    pp = plan_process(main_plan, draft_plan, proj_place, devices, mtp)
    if fitted is not None and proj_place is not None:
        row = next((r for r in pp.rows if r.name == proj_place.device), None)
        if row is not None and not row.is_host:
            left = row.free_bytes - (row.used_bytes - row.projector_bytes)
            size = proj_place.weights_bytes + proj_place.compute_bytes
            asked = fit_margins(cmd.config, max(len(main_names), 1))
            margin = asked[main_names.index(row.name)] if row.name in main_names else 0
            if size > left:
                notes.append(f"fit leaves {format_bytes(max(left, 0))} free on {row.name}; the projector takes "
                             f"{format_bytes(size)}: this load will fail there")
            elif size > left - margin:
                # fit kept the -fitt margin without the projector: clip's buffers come out of it
                above = left - margin
                notes.append(f"fit leaves {format_bytes(max(above, 0))} free on {row.name} above its -fitt margin of "
                             f"{format_bytes(margin)}; the projector takes {format_bytes(size)}: the load ends "
                             f"{format_bytes(size - above)} inside that margin there")
    for r in pp.rows:
        if r.overhead_is_default:
            notes.append(f"{r.name}: base cost {format_bytes(r.overhead_bytes)} is gpulab's default for a CUDA "
                         "device (nothing learned on it yet); a run with NVML replaces it")
    return CommandPlan(command=cmd, process=pp, fit=fitted, notes=tuple(notes))
