"""A whole llama-server process against gpulab's plan of the same pasted command, on CPU RPC devices:
the main model, a draft model on another device (-devd, -ngld) and a projector (--mmproj, written
here with gguf-py: a LLaVA MLP and a Gemma 3 SigLIP with an 896-pixel warm-up image), read back from
llama-server's own log lines. Weights and KV per device within 1% or 1 MiB; compute within 10%
(the projector's compute buffer is an estimate: its error is recorded and bounded more loosely).
And with -fit on: the projector's margin that llama-server adds to fit's target lands on the
device at the projector's *registry* index, which with RPC servers is not the projector's device,
as gpulab predicts."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from builders import close_to_llama
from gpulab.core.command_line import parse_command
from gpulab.core.devices import Device
from gpulab.core.policies.process import plan_command
from gpulab.runtime.logcapture import parse_load_log
from gpulab.sources.projector import read_projector
from gpulab.sources.read import read_profile
from llama_tools import NOT_BUILT, tools_bin
from processes import stop
from projectors import write_projector

MiB = 1024**2
GiB = 1024**3
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
pytestmark = pytest.mark.skipif(tools_bin() is None, reason=NOT_BUILT)
_records: list[dict] = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers():
    from gpulab.runtime.rpc import start_servers
    with start_servers(3) as cluster:
        yield cluster


def _devices(endpoints) -> list[Device]:
    # described, not registered: llama-server must have the servers to itself
    return [Device(f"RPC{i}", 16 * GiB, 16 * GiB, "rpc", kind="rpc", endpoint=e) for i, e in enumerate(endpoints)]


def _serve(argv: list[str], log_path: Path) -> str:
    """Run llama-server until /health says ok, stop it, return its log."""
    port = _free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(tools_bin() / "llama-server"), *argv[1:], "--host", "127.0.0.1", "--port",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                        if json.load(r).get("status") == "ok":
                            break
                except OSError:
                    pass
                time.sleep(1)
            else:
                raise AssertionError("llama-server did not become healthy: " + log_path.read_text()[-3000:])
        finally:
            stop(proc, 30)
    return log_path.read_text()


def _parts(text: str) -> tuple[str, str, str]:
    """(main, draft, clip) parts of one llama-server log, in the order it loads them, without the
    '0.00.367.923 I ' time and level prefix of each line."""
    text = re.sub(r"(?m)^\d+\.\d+\.\d+\.\d+ [A-Z] ", "", text)
    d = text.find("loading draft model")
    c = min((i for i in (text.find("clip_model_loader"), text.find("CLIP using")) if i >= 0), default=len(text))
    main_end = d if d >= 0 else c
    return text[:main_end], (text[d:c] if d >= 0 else ""), text[c:]


def _clip(text: str, devices: list[Device]) -> tuple[str, int, int, int]:
    """(device, model bytes, compute bytes on that device, CPU compute bytes) of clip's log lines
    (tools/mtmd/clip.cpp)."""
    from gpulab.runtime.logcapture import _BufferNames
    names = _BufferNames(devices, [])
    backend = re.search(r"CLIP using (\S+) backend", text).group(1)
    size = re.search(r"model size: +([\d.]+) MiB", text)
    compute: dict[str, int] = {}
    for m in re.finditer(r"reserve_compute_meta: +(\S+) compute buffer size = +([\d.]+) MiB", text):
        compute[names.device_of(m.group(1))] = round(float(m.group(2)) * MiB)   # the last reservation
    device = names.device_of(backend) if backend != "CPU" else "CPU"
    return device, round(float(size.group(1)) * MiB), compute.get(device, 0), compute.get("CPU", 0)


def _check_model(plan, report, who: str, names) -> None:
    for d in plan.devices:
        if d.name not in names:
            continue
        got = {k: report.bytes_on(d.name, k) for k in ("model", "kv", "compute")}
        _records.append({"who": who, "device": d.name, "weights": [d.weights_bytes, got["model"]],
                         "kv": [d.kv_bytes, got["kv"]], "compute": [d.compute_bytes, got["compute"]]})
        assert close_to_llama(d.weights_bytes, got["model"]), f"{who} {d.name} weights {d.weights_bytes} vs {got}"
        assert close_to_llama(d.kv_bytes, got["kv"]), f"{who} {d.name} KV {d.kv_bytes} vs {got}"
        if got["compute"]:
            assert abs(d.compute_bytes - got["compute"]) <= max(MiB, 0.10 * got["compute"]), \
                f"{who} {d.name} compute {d.compute_bytes} vs {got['compute']}"


PROJECTORS = {
    # LLaVA-style CLIP at 336 pixels, 576 patches + a class token, to SmolLM2's n_embd (576)
    "llava-mlp-336": {"projector_type": "mlp", "image_size": 336, "patch_size": 14, "n_embd": 256, "n_ff": 1024,
                      "n_head": 4, "n_layer": 2, "proj_dim": 576},
}


@pytest.mark.parametrize("proj", list(PROJECTORS))
def test_main_draft_and_projector_vs_llama_server(proj, servers, smollm2, tmp_path):
    mmproj = write_projector(tmp_path / "mmproj.gguf", **PROJECTORS[proj])
    devices = _devices(servers.endpoints)
    rpc = ",".join(servers.endpoints)
    # --rpc first: llama-server reads its flags in order, and -dev/-devd need the RPC devices registered
    cmd = (f"llama-server --rpc {rpc} -m {smollm2} --mmproj {mmproj} -md {smollm2} -devd RPC2 -ngld 99 "
           f"-dev RPC0,RPC1 -ts 1,1 -ngl 99 -c 4096 -np 1 -fit off --no-webui -lv 5")
    c = parse_command(shlex.split(cmd))
    cp = plan_command(c, read_profile(smollm2), devices, draft=read_profile(smollm2),
                      projector=read_projector(mmproj))
    log = _serve(shlex.split(cmd), tmp_path / "server.log")
    main_log, draft_log, clip_log = _parts(log)
    main, draft = parse_load_log(main_log, devices), parse_load_log(draft_log, devices)
    assert list(main.layer_devices) == list(cp.process.main.layer_devices)
    assert list(draft.layer_devices) == list(cp.process.draft.layer_devices)
    _check_model(cp.process.main, main, "main", ("RPC0", "RPC1"))
    _check_model(cp.process.draft, draft, "draft", ("RPC2",))
    device, weights, compute, host = _clip(clip_log, devices)
    pr = cp.process.projector
    _records.append({"who": f"projector {proj}", "device": device, "weights": [pr.weights_bytes, weights],
                     "compute": [pr.compute_bytes, compute], "host_compute": [pr.host_compute_bytes, host]})
    assert device == pr.device == "RPC0"            # the first --device (common/arg.cpp)
    assert abs(pr.weights_bytes - weights) <= MiB
    assert abs(pr.compute_bytes - compute) <= max(MiB, 0.10 * compute), (pr.compute_bytes, compute)
    assert abs(pr.host_compute_bytes - host) <= MiB, (pr.host_compute_bytes, host)


def teardown_module(module):
    if _records:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "process_vs_llama_server.json").write_text(json.dumps(_records, indent=1))


def test_gemma3_projector_with_a_large_warmup_image(servers, gemma3, tmp_path):
    """A SigLIP projector (Gemma 3 type) warmed up at 896 x 896 pixels: 4096 patches."""
    mmproj = write_projector(tmp_path / "mmproj-gemma3.gguf", projector_type="gemma3", image_size=896, patch_size=14,
                             n_embd=128, n_ff=512, n_head=2, n_layer=2, proj_dim=640)
    devices = _devices(servers.endpoints)
    cmd = (f"llama-server --rpc {','.join(servers.endpoints)} -m {gemma3} --mmproj {mmproj} -dev RPC1,RPC2 "
           f"-ts 1,1 -ngl 99 -c 4096 -np 1 -fit off --no-webui -lv 5")
    cp = plan_command(parse_command(shlex.split(cmd)), read_profile(gemma3), devices, projector=read_projector(mmproj))
    main_log, _, clip_log = _parts(_serve(shlex.split(cmd), tmp_path / "server.log"))
    _check_model(cp.process.main, parse_load_log(main_log, devices), "main gemma3", ("RPC1", "RPC2"))
    device, weights, compute, host = _clip(clip_log, devices)
    pr = cp.process.projector
    _records.append({"who": "projector gemma3-896", "device": device, "weights": [pr.weights_bytes, weights],
                     "compute": [pr.compute_bytes, compute], "host_compute": [pr.host_compute_bytes, host]})
    assert device == pr.device == "RPC1"
    assert abs(pr.weights_bytes - weights) <= MiB
    assert abs(pr.compute_bytes - compute) <= max(MiB, 0.10 * compute), (pr.compute_bytes, compute)
    assert abs(pr.host_compute_bytes - host) <= MiB, (pr.host_compute_bytes, host)


def test_fit_adds_the_projector_to_another_devices_target(servers, smollm2, tmp_path):
    """-fit on with --mmproj: llama-server adds mtmd_get_memory_usage to fit_params_target by ggml
    registry index (tools/server/server-context.cpp). With RPC servers the CPU is index 0 and RPC0 is
    index 1, so the projector on RPC0 raises the target of the model's second device, RPC1, as gpulab
    says; fit's own trace prints each device's target."""
    mmproj = write_projector(tmp_path / "mmproj.gguf", **PROJECTORS["llava-mlp-336"])
    devices = _devices(servers.endpoints)
    cmd = (f"llama-server --rpc {','.join(servers.endpoints)} -m {smollm2} --mmproj {mmproj} -dev RPC0,RPC1 "
           f"-c 4096 -np 1 --verbose --no-webui")
    cp = plan_command(parse_command(shlex.split(cmd)), read_profile(smollm2), devices, projector=read_projector(mmproj))
    assert any("to the margin of RPC1 (ggml registry index 1), not of RPC0" in n for n in cp.notes)
    log = _serve(shlex.split(cmd), tmp_path / "server.log")
    targets = {m.group(1): int(m.group(2)) for m in
               re.finditer(r"- (RPC\d) \(.*?\): +-?\d+ total, +-?\d+ used, +-?\d+ free vs\. target of +(\d+)", log)}
    pr = cp.process.projector
    proj_mib, host_mib = (pr.weights_bytes + pr.compute_bytes) / MiB, pr.host_compute_bytes / MiB
    _records.append({"who": "fit targets", "targets_mib": targets, "projector_mib_predicted": proj_mib,
                     "host_mib_predicted": host_mib})
    # RPC1 (registry index 1 = RPC0's) gets the projector's weights and compute; RPC0 (index 0 = the
    # CPU's) gets clip's CPU compute buffer; fit prints whole MiB
    assert abs(targets["RPC1"] - (1024 + proj_mib)) <= 1, (targets, proj_mib)
    assert abs(targets["RPC0"] - (1024 + host_mib)) <= 1, (targets, host_mib)
    assert targets["RPC0"] < targets["RPC1"]


# --spec-type draft-mtp on a generated glm4moe (6 layers and one nextn layer, gpulab.sources.arch_models):
# (flags, the nextn layer's device, written-out MiB that llama-server logged: that device's model buffer,
# the MTP context's KV and compute there)
MTP_CASES = {
    # two devices: pipeline parallelism (4 copies of each input)
    "2dev": ("-dev RPC0,RPC1 -ts 1,1 -c 4096 -np 1", "RPC1", 203.26, 8.00, 52.04),
    # one device (1 copy), -ub 256, 2 slots, a q8_0 cache for the draft (so the MTP context)
    "1dev-q8": ("-dev RPC2 -ub 256 -c 4096 -np 2 -ctkd q8_0 -ctvd q8_0", "RPC2", 414.53, 4.25, None),
}


@pytest.mark.parametrize("case", list(MTP_CASES))
def test_mtp_heads_and_context_vs_llama_server(case, servers, tmp_path):
    """With --spec-type draft-mtp llama-server loads the nextn layer's tensors on its device
    (load_mtp) and creates a second context on the main model holding KV for the nextn layer only
    (common_speculative_init_result, llama_model::create_memory). Main model per device: weights and
    KV; the MTP context: its KV and compute, each against llama-server's log lines."""
    from gpulab.sources.arch_models import write_arch_model
    flags, nextn_dev, model_mib, kv_mib, compute_mib = MTP_CASES[case]
    path = write_arch_model(tmp_path / "glm4moe.gguf", "glm4moe")
    profile = read_profile(path)
    assert profile.n_nextn == 1 and round(profile.mtp_weights_bytes / MiB, 2) == 65.09
    devices = _devices(servers.endpoints)
    cmd = (f"llama-server --rpc {','.join(servers.endpoints)} -m {path} {flags} -ngl 99 -fit off "
           f"--spec-type draft-mtp --no-webui -lv 5")
    cp = plan_command(parse_command(shlex.split(cmd)), profile, devices)
    log = re.sub(r"(?m)^\d+\.\d+\.\d+\.\d+ [A-Z] ", "", _serve(shlex.split(cmd), tmp_path / "server.log"))
    at = log.find("creating MTP draft context")
    assert at > 0, log[-3000:]
    main, mtp_log = parse_load_log(log[:at], devices), parse_load_log(log[at:], devices)
    names = [d.name for d in cp.process.main.offload_devices]
    assert list(main.layer_devices) == list(cp.process.main.layer_devices)
    assert cp.process.main.layer_devices[profile.n_layer - 1] == nextn_dev
    for d in cp.process.main.devices:
        got_w, got_kv = main.bytes_on(d.name, "model"), main.bytes_on(d.name, "kv")
        _records.append({"who": f"mtp {case} main", "device": d.name, "weights": [d.weights_bytes, got_w],
                         "kv": [d.kv_bytes, got_kv], "compute": [d.compute_bytes, main.bytes_on(d.name, "compute")]})
        assert close_to_llama(d.weights_bytes, got_w), (d.name, d.weights_bytes, got_w)
        assert close_to_llama(d.kv_bytes, got_kv), (d.name, d.kv_bytes, got_kv)
    # the nextn layer's device holds its 65.09 MiB of MTP tensors (written out: llama-server's figure)
    assert abs(main.bytes_on(nextn_dev, "model") - model_mib * MiB) <= 0.01 * MiB
    ctx = cp.process.mtp
    for name in [*names, "CPU"]:
        got_kv, got_c = mtp_log.bytes_on(name, "kv"), mtp_log.bytes_on(name, "compute")
        _records.append({"who": f"mtp {case} MTP context", "device": name, "kv": [ctx.kv_bytes.get(name, 0), got_kv],
                         "compute": [ctx.compute_bytes.get(name, 0), got_c]})
        assert close_to_llama(ctx.kv_bytes.get(name, 0), got_kv), (name, ctx.kv_bytes, got_kv)
        assert abs(ctx.compute_bytes.get(name, 0) - got_c) <= max(MiB, 0.10 * got_c), (name, ctx.compute_bytes, got_c)
    assert abs(mtp_log.bytes_on(nextn_dev, "kv") - kv_mib * MiB) <= 0.01 * MiB
    if compute_mib is not None:
        assert abs(mtp_log.bytes_on(nextn_dev, "compute") - compute_mib * MiB) <= 0.01 * MiB
    # the process row of the nextn layer's device counts the MTP context beside the main model
    assert cp.process.row(nextn_dev).mtp_bytes == ctx.kv_bytes[nextn_dev] + ctx.compute_bytes[nextn_dev]


def _free_mib(endpoints) -> dict[str, int]:
    """What each RPC device reports free (host memory), as llama-server lists it."""
    out = subprocess.run([str(tools_bin() / "llama-server"), "--rpc", ",".join(endpoints), "--list-devices"],
                         capture_output=True, text=True, timeout=60).stdout
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"(RPC\d+): .*?, (\d+) MiB free", out)}


def test_a_load_fit_accepts_and_the_projector_breaks(servers, smollm2, tmp_path):
    """Two small GPUs emulated on RPC devices: llama-server's -fitt is set so that fit's budget on
    each is what a GPU with 122 and 120 MiB free and a 16 MiB margin would give. The projector
    (46.56 MiB on RPC0, the first --device) is added to fit's target at its ggml registry index,
    which is RPC1's; so fit fills RPC0 up to its margin, and clip then puts the projector there.
    gpulab predicts the failure with the bytes; llama-server's log confirms fit's RPC0 target left
    the projector out and RPC0's total after the load is past the budget by the projector's bytes."""
    mmproj = write_projector(tmp_path / "mmproj.gguf", projector_type="mlp", image_size=336, patch_size=14,
                             n_embd=512, n_ff=2048, n_head=8, n_layer=6, proj_dim=576)
    free = _free_mib(servers.endpoints)
    emulated = {"RPC0": 122, "RPC1": 120, "RPC2": 120}     # MiB free on the GPUs gpulab is told about
    margin = 16
    real_fitt = [free[n] - emulated[n] + margin for n in ("RPC0", "RPC1")]
    base = (f"llama-server --rpc {','.join(servers.endpoints)} -m {smollm2} --mmproj {mmproj} -dev RPC0,RPC1 "
            f"-c 4096 -np 1 --verbose --no-webui")
    gpus = [Device(n, emulated[n] * MiB, emulated[n] * MiB, "rpc", kind="rpc", endpoint=e)
            for n, e in zip(("RPC0", "RPC1", "RPC2"), servers.endpoints)]
    cp = plan_command(parse_command(shlex.split(base + f" -fitt {margin}")), read_profile(smollm2), gpus,
                      projector=read_projector(mmproj))
    # fit: 3 layers on RPC1 (its target carries the projector), 17 and the output on RPC0
    assert cp.process.main.layer_devices.count("RPC0") == 17 and cp.process.main.layer_devices.count("RPC1") == 3
    row = cp.process.row("RPC0")
    assert abs(row.main_bytes - 102.19 * MiB) <= 0.01 * MiB          # 35.93 weights + 51 KV + 15.26 compute
    assert abs(row.projector_bytes - 46.37 * MiB) <= 0.01 * MiB      # 38.50 weights + 7.87 compute (estimate)
    assert "fit leaves 19.81 MiB free on RPC0; the projector takes 46.37 MiB: this load will fail there" in cp.notes, \
        cp.notes
    assert not cp.process.fits and not row.fits

    log = _serve(shlex.split(base + " -fitt " + ",".join(map(str, real_fitt))), tmp_path / "server.log")
    targets = {m.group(1): int(m.group(2)) for m in
               re.finditer(r"- (RPC\d) \(.*?\): +-?\d+ total, +-?\d+ used, +-?\d+ free vs\. target of +(\d+)", log)}
    # RPC0's target: the margin and clip's 1.30 MiB CPU buffer (registry index 0 is the CPU), not the projector
    assert targets["RPC0"] - real_fitt[0] == 1, (targets, real_fitt)
    assert targets["RPC1"] - real_fitt[1] == 46, (targets, real_fitt)     # the projector's 46.56 MiB
    main_log, _, clip_log = _parts(log)
    report = parse_load_log(main_log, gpus)
    loaded = sum(report.bytes_on("RPC0", k) for k in ("model", "kv", "compute"))
    device, weights, compute, _ = _clip(clip_log, gpus)
    assert device == "RPC0"
    assert abs(loaded - 102.19 * MiB) <= 0.01 * MiB and abs(loaded - row.main_bytes) <= 0.01 * MiB
    assert abs(weights + compute - 46.56 * MiB) <= 0.01 * MiB
    total, budget = loaded + weights + compute, (emulated["RPC0"] - margin) * MiB
    _records.append({"who": "fit and the projector", "device": "RPC0", "loaded_mib": loaded / MiB,
                     "projector_mib": (weights + compute) / MiB, "budget_mib": budget / MiB,
                     "targets_mib": targets, "predicted_notes": list(cp.notes)})
    # 148.75 MiB on a device with 122 free: past the budget fit kept (106 MiB) by 42.75 MiB and past
    # the device's free memory by 26.75 MiB; without the projector it is 3.81 MiB under the budget
    assert abs(total - 148.75 * MiB) <= 0.02 * MiB
    assert total - budget > 0 and loaded <= budget
    assert total > emulated["RPC0"] * MiB
