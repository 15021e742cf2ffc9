"""`gpulab plan -- <pasted command>`: the whole llama-server process from a command line copied from
llama.cpp's own docs gives the same per-device bytes as the same settings given as gpulab flags;
llama-swap's cmd and llama-bench's command line go the same way."""

from __future__ import annotations

import json

import pytest

from gpulab.cli import main
from projectors import write_projector


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _devices(d: dict) -> list[tuple]:
    return [(x["name"], x["main_bytes"], x["draft_bytes"], x["projector_bytes"], x["overhead_bytes"])
            for x in d["process"]["devices"]]


def _main(d: dict) -> tuple:
    """The main model's loaded plan: a process's, or plain `gpulab plan`'s fitted one (llama-server's)."""
    p = d["plan"] if "process" in d else d["fit"]["plan"] if "fit" in d else d
    return [(x["name"], x["weights_bytes"], x["kv_bytes"], x["compute_bytes"]) for x in p["devices"]], p["layers"]


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory):
    return write_projector(tmp_path_factory.mktemp("paste") / "mmproj.gguf", image_size=448, patch_size=14)


# the commands as llama.cpp's docs print them, the model paths replaced by the real models here
DOC_COMMANDS = {
    # tools/server/README.md, "Quick Start"
    "server README": ("./llama-server -m {main} -c 2048", ["-c", "2048"]),
    # docs/speculative.md, EAGLE-3 (a plain draft model in place of the EAGLE-3 head)
    "speculative": ("llama-server -m {main} -md {draft} --spec-type draft-eagle3",
                    ["-md", "{draft}", "--spec-type", "draft-eagle3"]),
    # docs/multimodal.md, llama-server with a local projector
    "multimodal": ("llama-server -m {main} --mmproj {mmproj}", ["--mmproj", "{mmproj}"]),
}


@pytest.mark.parametrize("which", list(DOC_COMMANDS))
def test_doc_commands_match_gpulab_flags(capsys, which, gemma3, smollm2, mmproj):
    pasted, flags = DOC_COMMANDS[which]
    names = {"main": gemma3, "draft": smollm2, "mmproj": mmproj}
    argv = pasted.format(**names).split()
    code, out, err = run(capsys, "plan", "--sim", "2GiB,1GiB", "--json", "--", *argv)
    assert code in (0, 1), err
    a = json.loads(out)
    code, out, err = run(capsys, "plan", gemma3, "--sim", "2GiB,1GiB", "--json", *[f.format(**names) for f in flags])
    assert code in (0, 1), err
    b = json.loads(out)
    assert _main(a) == _main(b)
    if "process" in b:
        assert _devices(a) == _devices(b)
    if which == "multimodal":     # clip on the first GPU in the registry, every tensor of the file
        assert a["process"]["projector"]["device"] == "SIM0"
        assert a["process"]["projector"]["weights_bytes"] == 2 * 128 * 3 * 14 * 14 + 128 * 4 + 2 * 1024 * 128 + \
            2 * (4 * (2 * 128 * 128 + 4 * 128) + 4 * 4 * 128 + (2 * 512 * 128 + 4 * 512) + (2 * 128 * 512 + 4 * 128)) \
            + 2 * 4 * 128 + 4 * 128 + 2 * 576 * 128
    if which == "speculative":
        assert sum(x[2] for x in _devices(a)) > 0


def test_pasted_process_text_and_notes(capsys, smollm2, mmproj):
    code, out, err = run(capsys, "plan", "--sim", "2GiB,1GiB", "--", "llama-server", "-m", smollm2, "-md", smollm2,
                         "-devd", "SIM1", "--mmproj", mmproj, "-ngl", "99", "-ts", "3,1", "-c", "8192", "-np", "4",
                         "--port", "8080", "--temp", "0.7", "--lora", "x.gguf")
    assert code == 0, err
    assert "projector on SIM0 (the first GPU in ggml's registry (SIM0))" in out and "(estimate)" in out
    assert out.splitlines()[-1] == "fits"
    assert "gpulab: ignored (no effect on memory): --port 8080" in err
    assert "gpulab: not modelled: --lora x.gguf: LoRA adapters' weights are not planned" in err
    code, _, err = run(capsys, "plan", "--sim", "2GiB", "--", "llama-server", "-m", smollm2, "--frob")
    assert code == 2
    assert err.strip() == "gpulab: error: --frob: not a flag of the vendored llama-server (common/arg.cpp)"


def test_llama_swap_cmd_is_the_same_process(capsys, tmp_path, smollm2):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("macros:\n  M: " + str(smollm2) + "\nmodels:\n  small:\n    cmd: llama-server --port ${PORT} "
                   "-m ${M} -c 4096 -np 2 -ngl 99\n")
    code, out, err = run(capsys, "plan", "small", "--llama-swap", cfg, "--sim", "2GiB,1GiB", "--json")
    assert code == 0, err
    a = json.loads(out)
    code, out, err = run(capsys, "plan", "--sim", "2GiB,1GiB", "--json", "--", "llama-server", "-m", smollm2, "-c",
                         "4096", "-np", "2", "-ngl", "99")
    assert _devices(a) == _devices(json.loads(out))
    code, _, err = run(capsys, "plan", "big", "--llama-swap", cfg, "--sim", "2GiB")
    assert code == 2 and "has no model 'big'; its models: small" in err


def test_llama_bench_command(capsys, smollm2):
    code, out, err = run(capsys, "plan", "--sim", "2GiB,1GiB", "--json", "--", "llama-bench", "-m", smollm2, "-p",
                         "1024", "-n", "64", "-ts", "3/1", "-r", "2")
    assert code == 0, err
    a = json.loads(out)
    code, out, err = run(capsys, "plan", smollm2, "--sim", "2GiB,1GiB", "--json", "-c", "1024", "-ts", "3,1")
    b = json.loads(out)
    assert _main(a) == _main({"plan": b, "process": None}) and "fit" not in a   # llama-bench never fits
