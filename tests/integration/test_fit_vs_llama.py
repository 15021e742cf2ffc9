"""gpulab's fit (gpulab.core.policies.server_fit) against llama.cpp's own: llama-fit-params on CPU RPC devices.

llama-fit-params (tools/fit-params, built from the vendored source by scripts/llama-tools.sh) runs
common_fit_params with real dry runs and prints the flags it chose: `-c N -ngl N [-ts ..] [-ot ..]`.
gpulab's fit must print the same flags, from the same model, devices and fit targets.

A CPU RPC device reports free = total memory (ggml_backend_cpu_device_get_memory: "assume that all
of it is free"), so a fit target of (total - B) MiB leaves each device a budget of exactly B MiB
(plus the sub-MiB rest of its total) and fit must shrink to it. Budgets are set from gpulab's plain
plan of each model (a fraction of what the plain split uses), then moved, 1 MiB at a time, until no
decision of gpulab's fit lies within its compute-buffer uncertainty of its target (FitResult.
near_boundary): near a boundary the result depends on compute buffers to the MiB, which gpulab
estimates (gpulab.core.placement.compute) rather than replays. Weights and KV are exact, so away from
boundaries the flags must agree exactly.

Models written here: a dense llama (12 layers of 29 MiB, F16, 32k training context, so KV matters)
and a qwen3moe (8 layers, 36 MiB of experts and 5 MiB dense each).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

import pytest

from gpulab import SplitConfig, plan, read_profile
from gpulab.core.policies.server_fit import server_fit
from gpulab.sources.synth import SynthSpec, write_model
from llama_tools import NOT_BUILT, tools_bin

pytestmark = pytest.mark.skipif(tools_bin() is None, reason=NOT_BUILT)

MiB = 1024**2

MODELS = {
    "dense": SynthSpec(arch="llama", n_layer=12, n_embd=1024, n_ff=4096, n_head=16, n_head_kv=4, n_vocab=4096,
                       weight_type="F16", n_ctx_train=32768),
    "moe": SynthSpec(arch="qwen3moe", n_layer=8, n_embd=1024, n_ff=1024, n_head=16, n_head_kv=4, n_vocab=4096,
                     n_expert=8, n_expert_used=2, n_ff_exp=768, weight_type="F16", n_ctx_train=32768),
}


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    n_dev: int
    # budget of device i = scale[i] * what device i uses in the plain split of `base` + add MiB
    scale: tuple[float, ...]
    base: SplitConfig
    add_mib: int = 0
    flags: tuple[str, ...] = ()       # given to both: llama-fit-params and gpulab's SplitConfig
    expect: str = "success"           # gpulab's status; 'failure': llama-fit-params exits 1


CTX = SplitConfig(n_ctx=4096)
CASES = [
    # nothing to change: -c resolves to the training context, -ngl stays auto
    Case("dense-3-unchanged", "dense", 3, (1, 1, 1), SplitConfig(n_ctx=32768), add_mib=40, expect="unchanged"),
    # one device: reducing the context is enough ("entire model can be fit by reducing context")
    Case("dense-1-ctx", "dense", 1, (1,), SplitConfig(n_ctx=16384)),
    # several devices: context reduced, then the layers refilled back to front (-ts)
    Case("dense-3-ctx-ts", "dense", 3, (1.1, 1.1, 1.1), SplitConfig(n_ctx=12288)),
    Case("dense-2-ctx-ts", "dense", 2, (1.0, 1.2), SplitConfig(n_ctx=10240)),
    # too small for every layer at the minimum context: -ngl below all
    Case("dense-3-ngl", "dense", 3, (0.4, 0.4, 0.4), CTX),
    Case("dense-2-unequal-ngl", "dense", 2, (0.3, 0.9), CTX),
    Case("dense-3-last-device-small", "dense", 3, (0.9, 0.8, 0.2), CTX),
    # -c given: fit keeps it and chooses -ngl/-ts
    Case("dense-3-user-ctx", "dense", 3, (0.5, 0.6, 0.7), SplitConfig(n_ctx=8192), flags=("-c", "8192")),
    # -fitc raises the floor of the context reduction
    Case("dense-3-fitc", "dense", 3, (0.7, 0.7, 0.7), SplitConfig(n_ctx=8192), flags=("-fitc", "8192")),
    # quantized KV: a different context per MiB
    Case("dense-3-kv-q8", "dense", 3, (0.8, 0.8, 0.8), SplitConfig(n_ctx=16384),
         flags=("-ctk", "q8_0", "-ctv", "q8_0")),
    # two sequences, KV not unified (llama-fit-params' default): two streams, steps of 512
    Case("dense-3-np2", "dense", 3, (1.1, 1.1, 1.1), SplitConfig(n_ctx=24576, n_seq_max=2), flags=("-np", "2")),
    # an explicit -c 0 asks for the full context: no reduction, layers only
    Case("dense-3-full-ctx", "dense", 3, (0.8, 0.8, 0.8), SplitConfig(n_ctx=32768), flags=("-c", "0")),
    # -ngl given: fit reduces the context, then gives up (llama-fit-params exits 1)
    Case("dense-3-user-ngl", "dense", 3, (0.5, 0.5, 0.5), CTX, flags=("-ngl", "10"), expect="failure"),
    # MoE: the dense-only layers fit with room to spare: full layers front to back, overflow layers
    Case("moe-3-overflow", "moe", 3, (1, 1, 1), SplitConfig(n_ctx=4096, cpu_moe=True), add_mib=60),
    Case("moe-2-overflow", "moe", 2, (1, 1), SplitConfig(n_ctx=4096, cpu_moe=True), add_mib=100),
    Case("moe-1-overflow", "moe", 1, (1,), SplitConfig(n_ctx=4096, cpu_moe=True), add_mib=90),
    # MoE: even the dense-only layers do not all fit: experts on the CPU, -ngl below all
    Case("moe-3-deficit", "moe", 3, (0.5, 0.5, 0.5), SplitConfig(n_ctx=4096, cpu_moe=True)),
]


def _config_of(flags: tuple[str, ...], **kw) -> SplitConfig:
    """The SplitConfig llama-fit-params builds from these flags (only those the cases use)."""
    values = dict(n_ctx=0, **kw)
    it = iter(flags)
    for f in it:
        v = next(it)
        key = {"-c": "n_ctx", "-fitc": "fit_ctx", "-ngl": "n_gpu_layers", "-ctk": "type_k", "-ctv": "type_v",
               "-ub": "n_ubatch", "-b": "n_batch", "-np": "n_seq_max"}[f]
        values[key] = v if key.startswith("type") else int(v)
    return SplitConfig(**values)


@pytest.fixture(scope="module")
def rpc():
    """Three CPU RPC servers, and the devices llama.cpp sees on them (in a worker)."""
    from gpulab.runtime.rpc import start_servers
    from gpulab.runtime.worker import Worker
    with start_servers(3) as cluster:
        with Worker(cluster.endpoints) as w:
            devices = [d for d in w.devices() if d.kind == "rpc"]
        yield cluster.endpoints, devices


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit-models")
    return {name: write_model(root / f"{name}.gguf", spec) for name, spec in MODELS.items()}


def _n_ctx_min(flags):
    """common/arg.cpp: an explicit -c 0 sets fit's minimum context to UINT32_MAX."""
    from gpulab.core.policies.server_fit import UINT32_MAX
    return UINT32_MAX if "-c" in flags and flags[flags.index("-c") + 1] == "0" else None


def _settled(prof, devices, budgets, config_for, n_ctx_min=None):
    """Move budgets 1 MiB at a time until no decision of gpulab's fit is within its uncertainty of
    its target, and an interpolated context is mid-way between two steps of 256 (there the
    uncertainty of the compute buffers, summed over the two dry runs, is always more than half a
    step: what is asserted is that gpulab's context interpolation is llama.cpp's to the step)."""
    budgets = list(budgets)
    names = [d.name for d in devices]
    for _ in range(64):
        r = server_fit(prof, devices, config_for(budgets), n_ctx_min=n_ctx_min)
        near = [d for d in r.decisions if d.near and (d.tokens_to_step is None or d.tokens_to_step < 72)]
        if not near:
            return budgets, r
        for d in near:
            budgets[names.index(d.device) if d.device in names else 0] += 1
    raise AssertionError(f"budgets {budgets} stay near a boundary: {r.near_boundary}")


@pytest.mark.parametrize("case", CASES, ids=[c.values[0].id if hasattr(c, "values") else c.id for c in CASES])
def test_fit_prints_what_llama_fit_params_prints(case, rpc, models):
    endpoints, all_devices = rpc
    devices = all_devices[:case.n_dev]
    path = models[case.model]
    prof = read_profile(path)
    base = plan(prof, devices, case.base)
    start = [max(8, int(s * d.used_bytes / MiB) + case.add_mib) for s, d in zip(case.scale, base.offload_devices)]

    def config_for(budgets):
        return _config_of(case.flags, fit_target=tuple(d.total_bytes // MiB - b for d, b in zip(devices, budgets)))

    budgets, ours = _settled(prof, devices, start, config_for, _n_ctx_min(case.flags))
    assert ours.status == case.expect, ours.reasons
    targets = config_for(budgets).fit_target
    argv = [str(tools_bin() / "llama-fit-params"), "-m", str(path), "--rpc", ",".join(endpoints[:case.n_dev]),
            "-fitt", ",".join(map(str, targets)), *case.flags]
    got = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    printed = [line for line in got.stdout.splitlines() if line.startswith("-c ")]
    why = (f"budgets {budgets} MiB\ngpulab's fit:\n  " + "\n  ".join(ours.reasons) + "\nllama.cpp:\n"
           + got.stderr[-3000:])
    if case.expect == "failure":
        assert got.returncode == 1 and not printed, why
        return
    assert got.returncode == 0 and printed, why
    assert ours.flags(devices) == printed[-1], why


def test_the_largest_context_loads_within_the_margin_and_one_step_more_does_not(rpc, tmp_path):
    """gpulab.core.policies.context.largest_ctx with -ngl/-ts fixed, checked against what llama.cpp allocates
    in real loads on the RPC devices (weights, KV and compute buffers, to the byte) at that context
    and at one step (256) more. The budget is set half a step above gpulab's prediction at a
    context, so that neither side is a coin toss for the compute-buffer estimate."""
    from gpulab.core.policies.context import largest_ctx
    from gpulab.runtime.worker import Worker
    endpoints, devices = rpc
    # wide KV rows (no GQA, 2048 wide): one step of 256 tokens is 6 MiB of KV on each device
    path = write_model(tmp_path / "kv.gguf", SynthSpec(arch="llama", n_layer=9, n_embd=2048, n_ff=2048, n_head=16,
                                                       n_head_kv=16, n_vocab=4096, weight_type="Q8_0",
                                                       n_ctx_train=8192))
    prof = read_profile(path)
    cfg = SplitConfig(n_gpu_layers=10, tensor_split=(1, 1, 1), n_ctx=2048)
    at = plan(prof, devices, cfg).offload_devices
    up = plan(prof, devices, cfg.replace(n_ctx=2048 + 256)).offload_devices
    budgets = [d.used_bytes + (u.used_bytes - d.used_bytes) // 2 for d, u in zip(at, up)]
    n = largest_ctx(prof, devices, cfg, margins_bytes=[d.free_bytes - b for d, b in zip(devices, budgets)])
    assert n == 2048
    with Worker(endpoints) as w:
        def allocated(n_ctx):
            report, _ = w.load(path, cfg.replace(n_ctx=n_ctx, devices=tuple(d.name for d in devices)), check_fit=False)
            kinds = report.kinds_by_device()
            return [sum(kinds.get(d.name, {}).get(k, 0) for k in ("model", "kv", "compute")) for d in devices]
        at_n, above = allocated(n), allocated(n + 256)
    mib = lambda xs: [round(x / MiB, 2) for x in xs]  # noqa: E731
    assert all(u <= b for u, b in zip(at_n, budgets)), f"llama.cpp at -c {n}: {mib(at_n)} MiB vs {mib(budgets)}"
    assert any(u > b for u, b in zip(above, budgets)), f"llama.cpp at -c {n + 256}: {mib(above)} MiB vs {mib(budgets)}"


def _fit_print(path, endpoints, flags) -> list[int]:
    """llama-fit-params -fitp on: llama.cpp's own dry-run memory (model + context + compute, each
    printed in whole MiB, truncated) of every device, for these flags."""
    argv = [str(tools_bin() / "llama-fit-params"), "-m", str(path), "--rpc", ",".join(endpoints), "-fitp", "on",
            *flags]
    got = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    rows = [line.split() for line in got.stdout.splitlines() if line.startswith("RPC")]
    return [int(m) + int(c) + int(k) for _, m, c, k in rows]


def test_fit_overshoots_where_gpulab_says_it_does(rpc, models):
    """llama.cpp's fit fills the last device first, measuring it while the devices ahead hold no
    layers; once every layer is offloaded, pipeline parallelism (4 copies of the compute inputs)
    makes the devices filled early use more than their target. gpulab's FitResult.over_target
    predicts which devices, and llama.cpp's own dry run of the chosen flags (-fitp) agrees."""
    endpoints, devices = rpc
    prof = read_profile(models["dense"])
    budgets = [320, 275, 238]
    targets = tuple(d.total_bytes // MiB - b for d, b in zip(devices, budgets))
    r = server_fit(prof, devices, _config_of((), fit_target=targets))
    assert r.ok and r.over_target, "this case should overshoot"
    flags = [f.strip('"') for f in r.flags(devices).split()]
    used = _fit_print(models["dense"], endpoints, flags)
    checked = 0
    for name, u, t, b, got in zip(r.device_names, r.projected_used_bytes, r.targets_bytes, budgets, used):
        if abs(u - t) > 3 * MiB:        # -fitp prints three truncated MiB numbers per device
            assert (u > t) == (got > b), f"{name}: gpulab {u / MiB:.1f} MiB vs target {t / MiB:.1f}; llama.cpp {got}"
            checked += 1
    assert checked >= 2


# budgets the settling had to move (gpulab alone was within its uncertainty of a boundary there)
@pytest.mark.parametrize("case_id", ["dense-2-unequal-ngl", "moe-3-overflow", "moe-3-deficit"])
def test_fit_on_llama_cpps_own_dry_runs_needs_no_settling(case_id, rpc, models):
    """gpulab's fit with llama.cpp's dry runs as its measure (gpulab.runtime.fit_dry_run): the
    budgets as first computed, near a boundary or not, and the same flags as llama-fit-params."""
    from gpulab.runtime.fit_dry_run import dry_run_measure
    from gpulab.runtime.worker import Worker
    case = next(c for c in CASES if getattr(c, "id", None) == case_id)
    endpoints, all_devices = rpc
    devices = all_devices[:case.n_dev]
    path = models[case.model]
    prof = read_profile(path)
    base = plan(prof, devices, case.base)
    budgets = [max(8, int(s * d.used_bytes / MiB) + case.add_mib) for s, d in zip(case.scale, base.offload_devices)]
    targets = tuple(d.total_bytes // MiB - b for d, b in zip(devices, budgets))
    with Worker(endpoints[:case.n_dev]) as w:
        ours = server_fit(prof, devices, _config_of(case.flags, fit_target=targets),
                   measure=dry_run_measure(w, path, prof, devices))
    argv = [str(tools_bin() / "llama-fit-params"), "-m", str(path), "--rpc", ",".join(endpoints[:case.n_dev]),
            "-fitt", ",".join(map(str, targets)), *case.flags]
    got = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    printed = [line for line in got.stdout.splitlines() if line.startswith("-c ")]
    assert got.returncode == 0 and printed, got.stderr[-2000:]
    assert ours.flags(devices) == printed[-1], "\n".join(ours.reasons)
    assert not ours.near_boundary      # llama.cpp's own numbers: nothing uncertain left
