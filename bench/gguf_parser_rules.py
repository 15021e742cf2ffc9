"""gguf-parser-go's llama.cpp estimate (what GPUStack runs), its published rules reproduced in Python,
against llama.cpp's own buffers and gpulab's plan, on the two real models.

    .venv/bin/python bench/gguf_parser_rules.py [test-artifacts/real_models_vs_llama.json]

The rules are those of gguf-parser-go's file_estimate__llamacpp.go (EstimateLLaMACppRun,
estimateLLaMACppRunInModel, snapshot 8dc7a62) for a dense model fully offloaded over -ts fractions
with the KV cache offloaded, as its CLI runs with --rpc (no x4 pipeline copies of the inputs):
- layer i goes to upper_bound(fractions, i / (n_layer + 1)); the output layer to the last block's device;
- weights: the block's tensors; the output device also gets output_norm + output (or, tied, token_embd
  again); the CPU the input layer (not compared here);
- KV: n_ctx padded to 256 (flash attention) or 32 cells, K and V rows of type_k/type_v per layer; with
  sliding-window attention a window of min(n_kv, pad(n_swa x n_seq + n_batch)) for layers with
  i % pattern != 0;
- compute (Input + Compute + Output; Footprint is bookkeeping outside the buffers): inputs
  4 (n_embd + 1 + n_kv) n_tokens; max(attention, FFN) of the last block's tensors; on the output
  device 4 (n_embd + n_vocab) n_tokens, where n_tokens = min(n_ctx, n_ubatch).
The llama.cpp figures are those tests/integration/test_real_models_vs_llama.py records.
"""

from __future__ import annotations

import bisect
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's gpulab
from gpulab import SplitConfig, read_profile
from gpulab.core.ggml_types import row_bytes
from gpulab.sources.demo import demo_model_path, gemma3_path

MiB = 2**20
CASES = {   # the configs of test_real_models_vs_llama.py this reproduction covers (full offload, -ts)
    "3dev-ts-1-1-1": SplitConfig(tensor_split=(1, 1, 1), n_ctx=4096),
    "3dev-ts-3-1-1": SplitConfig(tensor_split=(3, 1, 1), n_ctx=4096),
    "2dev-ts-1-2": SplitConfig(tensor_split=(1, 2), n_ctx=4096, devices=("RPC1", "RPC2")),
    "2dev-q8-kv": SplitConfig(tensor_split=(1, 1), n_ctx=8192, type_k="q8_0", type_v="q8_0", flash_attn="on",
                              devices=("RPC0", "RPC1")),
}


def _pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


def estimate(prof, cfg: SplitConfig, fa: bool = True, swa_pattern: int = 0) -> dict[int, dict[str, int]]:
    """{device index: {weights, kv, compute}} by gguf-parser-go's rules (offload devices only)."""
    ts = list(cfg.tensor_split)
    cum = [sum(ts[:i + 1]) / sum(ts) for i in range(len(ts))]
    n_layer = prof.n_layer
    n_actual = n_layer + 1
    devs = {j: {"weights": 0, "kv": 0, "compute": 0, "layers": 0, "swa": 0} for j in range(len(ts))}
    out_dev = 0
    using_swa = bool(prof.n_swa) and not cfg.swa_full
    for i in range(n_layer):
        j = bisect.bisect_right(cum, i / n_actual)
        devs[j]["layers"] += 1
        devs[j]["weights"] += sum(t.n_bytes for t in prof.layers[i].tensors)
        if using_swa and (swa_pattern == 0 or i % swa_pattern != 0):
            devs[j]["swa"] += 1
        if i == n_layer - 1:
            out_dev = j
    out_w = sum(t.n_bytes for t in prof.output_tensors)
    if prof.tied_output:
        out_w += sum(t.n_bytes for t in prof.input_tensors)
    devs[out_dev]["weights"] += out_w
    align = 256 if fa else 32
    n_ctx = _pad(cfg.n_ctx, align)
    n_tokens = min(n_ctx, cfg.n_ubatch)
    n_kv, n_seq = n_ctx, cfg.n_seq_max
    last = prof.layers[-1]
    kg, vg = last.n_embd_k_gqa, last.n_embd_v_gqa
    krs, vrs = row_bytes(cfg.type_k, kg * n_kv), row_bytes(cfg.type_v, vg * n_kv)
    swas = min(n_kv, _pad(prof.n_swa * n_seq + cfg.n_batch, align)) if using_swa else n_kv
    skrs, svrs = row_bytes(cfg.type_k, kg * swas), row_bytes(cfg.type_v, vg * swas)
    for d in devs.values():
        d["kv"] = (skrs + svrs) * d["swa"] + (krs + vrs) * (d["layers"] - d["swa"])
    # computation: inputs, then max(attention, FFN) of the last block, then the output on its device
    inp = 4 * prof.n_embd * n_tokens + 4 * n_tokens + 4 * n_kv * n_tokens
    names = {t.name.split(".", 2)[2]: t for t in last.tensors}
    if fa:
        attn = 2 * n_kv * n_tokens
        attn += 4 * prof.n_embd * n_tokens if "attn_norm.weight" in names else 0
        attn += names["attn_q.weight"].n_bytes if "attn_q.weight" in names else 0
        attn += row_bytes(cfg.type_k, kg * n_kv) + row_bytes(cfg.type_v, vg * n_kv)
    else:
        q = names.get("attn_q.weight")
        attn = 4 * prof.n_embd * n_tokens + (2 * 4 * q.shape[0] * n_tokens + 4 * n_kv * n_tokens * last.n_head
                                               if q is not None else 0)
    ffn = 0
    for key in ("attn_norm.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight"):
        t = names.get(key)
        if t is not None:
            ffn += 4 * t.shape[-1] * n_tokens
    for d in devs.values():
        d["compute"] = inp + max(attn, ffn)
    devs[out_dev]["compute"] += 4 * (prof.n_embd + prof.n_vocab) * n_tokens
    return devs


def main(argv: list[str]) -> int:
    src = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "test-artifacts" / \
        "real_models_vs_llama.json"
    cases = json.loads(src.read_text())
    paths = {"gemma3": gemma3_path(), "smollm2": demo_model_path()}
    print("| model | config | device | weights: llama.cpp / gguf-parser | KV: llama.cpp / gguf-parser | "
          "compute: llama.cpp / gguf-parser / gpulab |")
    print("|---|---|---|---|---|---|")
    for model, path in paths.items():
        prof = read_profile(path)
        pattern = 6 if prof.arch == "gemma3" else 0      # gemma3.attention.sliding_window_pattern
        for name, cfg in CASES.items():
            est = estimate(prof, cfg, fa=cfg.flash_attn != "off", swa_pattern=pattern)
            used = list(cfg.devices) or ["RPC0", "RPC1", "RPC2"]
            for j, dev in enumerate(used):
                row = next((c for c in cases if c["model"] == model and c["config"] == name and c["device"] == dev),
                           None)
                if row is None:
                    continue
                e = est[j]

                def cell(got: int, pred: int) -> str:
                    rel = f" ({(pred - got) / got * 100:+.0f}%)" if got else ""
                    return f"{got / MiB:.2f} / {pred / MiB:.2f}{rel}"
                gp = row["compute"][0]
                print(f"| {model} | {name} | {dev} | {cell(row['weights'][1], e['weights'])} | "
                      f"{cell(row['kv'][1], e['kv'])} | {cell(row['compute'][1], e['compute'])} / {gp / MiB:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
