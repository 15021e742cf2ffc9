"""Compute buffers of the replayed recurrent graphs (mamba2, lfm2, qwen3next) against llama.cpp over random
settings: 1-3 CPU RPC devices (-sm none or a random -ts), random -ngl, -c, -ub, -np, flash attention
auto/on/off, f16 or quantized caches. Prints every run whose worst device is more than 10 KiB off (the
log's rounding), and the count.

    PYTHONPATH=$PWD .venv/bin/python bench/recurrent_sweep.py [--seed 7] [--runs 20] [--archs mamba2,lfm2]

Needs llama-cpp-python built with GGML_RPC (scripts/setup.sh). The servers bind 127.0.0.1.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchkit import loadavg

from gpulab import ConfigError, LoadError, SplitConfig, plan, read_profile
from gpulab.runtime.rpc import start_servers
from gpulab.runtime.worker import Worker
from gpulab.sources.arch_models import write_arch_model
from gpulab.sources.host import host_device

MiB = 1 << 20


def random_config(rng: random.Random, n_layer: int) -> SplitConfig:
    n_dev = rng.choice([1, 2, 3])
    kw: dict = dict(n_ctx=rng.choice([512, 1024, 2048, 3072]), n_ubatch=rng.choice([64, 128, 256, 512]),
                    flash_attn=rng.choice(["auto", "on", "off"]), n_seq_max=rng.choice([1, 1, 2]))
    if rng.random() < 0.4:
        kw["n_gpu_layers"] = rng.randint(0, n_layer + 1)
    if n_dev > 1:
        kw["tensor_split"] = tuple(rng.choice([1, 1, 2, 3]) for _ in range(n_dev))
        kw["devices"] = tuple(f"RPC{i}" for i in range(n_dev))
    else:
        kw["split_mode"], kw["main_gpu"] = "none", rng.randint(0, 2)
    if kw["flash_attn"] != "off" and rng.random() < 0.4:
        kw["type_k"] = kw["type_v"] = rng.choice(["q8_0", "q4_0"])
    elif rng.random() < 0.3:
        kw["type_k"] = "q8_0"
    return SplitConfig(**kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--runs", type=int, default=20, help="settings per architecture")
    ap.add_argument("--archs", default="mamba2,lfm2,qwen3next")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"load average {loadavg()}")
    off = total = 0
    with tempfile.TemporaryDirectory() as tmp, start_servers(3) as cluster, Worker(cluster.endpoints) as w:
        devices = [d for d in w.devices() if d.kind == "rpc"]
        for arch in args.archs.split(","):
            path = write_arch_model(Path(tmp) / f"{arch}.gguf", arch)
            profile = read_profile(path)
            for _ in range(args.runs):
                config = random_config(rng, profile.n_layer)
                try:
                    predicted = plan(profile, devices, config, host_device())
                    report, _ = w.load(path, config, check_fit=False)
                except (ConfigError, LoadError) as e:
                    print(f"{arch} {config}: refused ({str(e).splitlines()[0][:80]})")
                    continue
                errors = {d.name: d.compute_bytes - report.bytes_on(d.name, "compute") for d in predicted.devices}
                total += 1
                if max(abs(v) for v in errors.values()) > 10 * 1024:
                    off += 1
                    print(f"OFF {arch} {config}: " + ", ".join(f"{k} {v / MiB:+.3f}" for k, v in errors.items()))
    print(f"{total - off} of {total} runs within 10 KiB on every device; load average {loadavg()}")


if __name__ == "__main__":
    main()
