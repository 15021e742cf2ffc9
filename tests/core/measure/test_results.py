"""Results in llama-bench's schema: the field list and types against the vendored llama-bench.cpp,
the value formats, the output formats (md parses back), and Run <-> JSON."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
from pathlib import Path

import pytest

from builders import make_run, parse_md
from gpulab.core.config import SplitConfig
from gpulab.core.measure.llama_bench import format_results
from gpulab.core.measure.results import (
    BOOL_FIELDS,
    FLOAT_FIELDS,
    INT_FIELDS,
    LLAMA_BENCH_FIELDS,
    LLAMA_BENCH_SAMPLE_FIELDS,
    format_tensor_split,
    run_from_dict,
    run_to_dict,
    runs_from_records,
    throughput_from_samples,
    to_llama_bench_records,
)
from gpulab.core.run import Run
from llama_tools import NOT_BUILT, tools_bin, vendored_src

MiB = 1024 ** 2


def _vendored_llama_bench() -> Path | None:
    """tools/llama-bench/llama-bench.cpp of the pinned llama-cpp-python sdist, where one is unpacked."""
    src = vendored_src()
    return src / "tools" / "llama-bench" / "llama-bench.cpp" if src is not None else None


def test_fields_match_the_vendored_llama_bench():
    src = _vendored_llama_bench()
    if src is None:
        pytest.skip("no unpacked llama-cpp-python sdist (the checked-in LLAMA_BENCH_FIELDS is used elsewhere)")
    text = src.read_text()
    body = re.search(r"get_fields\(\)\s*\{.*?fields\s*=\s*\{(.*?)\};", text, re.S).group(1)
    assert tuple(re.findall(r'"(\w+)"', body)) == LLAMA_BENCH_FIELDS
    # get_field_type: the INT, BOOL and FLOAT sets
    ftype = re.search(r"static field_type get_field_type\(.*?\n    \}\n", text, re.S).group(0)
    blocks = re.findall(r"if \((.*?)\)\s*\{\s*return (\w+);", ftype, re.S)
    sets = {}
    for cond, kind in blocks:
        sets.setdefault(kind, set()).update(re.findall(r'field == "(\w+)"', cond))
    assert sets["INT"] == set(INT_FIELDS)
    assert sets["BOOL"] - {"f16_kv"} == set(BOOL_FIELDS)
    assert sets["FLOAT"] == set(FLOAT_FIELDS)
    # the JSON printers append the samples
    assert r'\"samples_ns\": [ %s ],' in text and r'\"samples_ts\": [ %s ]' in text


def test_record_fields_types_and_formats():
    recs = to_llama_bench_records(make_run())
    assert len(recs) == 2
    for r in recs:
        assert list(r) == [*LLAMA_BENCH_FIELDS, *LLAMA_BENCH_SAMPLE_FIELDS, "gpulab"]
        for f in LLAMA_BENCH_FIELDS:
            v = r[f]
            if f in BOOL_FIELDS:
                assert isinstance(v, bool), f
            elif f in INT_FIELDS:
                assert isinstance(v, int) and not isinstance(v, bool), f
            elif f in FLOAT_FIELDS:
                assert isinstance(v, float), f
            else:
                assert isinstance(v, str), f
    pp, tg = recs
    assert pp["tensor_split"] == "3.00/1.00" and pp["flash_attn"] == -1 and pp["type_k"] == "f16"
    assert pp["devices"] == "auto" and pp["split_mode"] == "layer" and pp["no_kv_offload"] is False
    assert (pp["n_prompt"], pp["n_gen"], tg["n_prompt"], tg["n_gen"]) == (512, 0, 0, 128)
    assert pp["avg_ns"] == 1_050_000_000 and pp["stddev_ns"] == 70_710_678
    assert pp["samples_ts"] == pytest.approx([512.0, 512 / 1.1])
    assert pp["avg_ts"] == pytest.approx((512 + 512 / 1.1) / 2) and tg["stddev_ts"] == 0.0
    assert pp["test_time"] == "2025-01-02T03:04:05Z" and pp["model_size"] == 123 * MiB
    g = pp["gpulab"]
    assert g["test"] == "pp512" and g["buffers"]["RPC0"] == {"model": 30 * MiB, "kv": 3 * MiB, "compute": 10 * MiB}
    assert g["plan"] == make_run().plan.to_dict() and g["load_seconds"] == 1.5 and "log" not in g["report"]
    json.dumps(recs, allow_nan=False)


@pytest.mark.parametrize("ts,text", [((), "0.00"), ((0, 0), "0.00"), ((1,), "1.00"), ((3, 1), "3.00/1.00"),
                                     ((1, 0, 2, 0), "1.00/0.00/2.00"), ((0.5, 0.25), "0.50/0.25")])
def test_tensor_split_as_llama_bench_writes_it(ts, text):
    assert format_tensor_split(ts) == text


def test_devices_and_flash_attn_strings():
    r = to_llama_bench_records(make_run(config=SplitConfig(devices=("RPC1", "RPC0"), flash_attn="on")))[0]
    assert r["devices"] == "RPC1/RPC0" and r["flash_attn"] == 1
    r = to_llama_bench_records(make_run(config=SplitConfig(devices=("none",), flash_attn="off",
                                                           offload_kqv=False)))[0]
    assert r["devices"] == "none" and r["flash_attn"] == 0 and r["no_kv_offload"] is True


def test_expert_offload_and_overrides_in_llama_bench_fields():
    r = to_llama_bench_records(make_run(config=SplitConfig(
        n_cpu_moe=2, tensor_overrides=(r"blk\.1\.attn_q=CPU", "output=CPU"), op_offload=False, no_host=True,
        use_extra_bufts=False)))[0]
    assert r["n_cpu_moe"] == 2 and r["tensor_buft_overrides"] == r"blk\.1\.attn_q=CPU;output=CPU"
    assert r["no_op_offload"] == 1 and r["no_host"] is True and r["repack"] is False
    plain = to_llama_bench_records(make_run())[0]
    assert plain["tensor_buft_overrides"] == "none" and plain["n_cpu_moe"] == 0
    head, _ = parse_md(format_results([r], "md", default_threads=None))
    assert head[4:6] == ["ngl", "n_cpu_moe"] and head[-6:-2] == ["ot", "nopo", "noh", "rpk"]


def test_markdown_table_parses():
    recs = to_llama_bench_records(make_run())
    text = format_results(recs, "md", default_threads=2)
    head, rows = parse_md(text)
    # RPC backend: ngl shown; threads at the default: hidden; ts differs from the default: shown
    assert head == ["model", "size", "params", "backend", "ngl", "ts", "test", "t/s"]
    assert rows[0]["model"] == "llama 1B Q4_0" and rows[0]["size"] == "123.00 MiB"
    assert rows[0]["params"] == "1.24 B" and rows[0]["ngl"] == "-1" and rows[0]["ts"] == "3.00/1.00"
    assert [r["test"] for r in rows] == ["pp512", "tg128"]
    avg, sd = (float(x) for x in rows[0]["t/s"].split(" ± "))
    assert avg == pytest.approx(recs[0]["avg_ts"], abs=0.005) and sd == pytest.approx(recs[0]["stddev_ts"], abs=0.005)
    assert text.rstrip().endswith("build: llama-cpp-python-0.3.36 (0)")
    # column widths as llama-bench's markdown_printer: model 30 left, t/s 20 right
    first = text.splitlines()[0]
    assert first.startswith("| model                          |       size |")
    head2, _ = parse_md(format_results(to_llama_bench_records(make_run(backends="CPU", n_threads=3)), "md",
                                       default_threads=2))
    assert "ngl" not in head2 and "threads" in head2


def test_json_jsonl_csv_sql():
    recs = to_llama_bench_records(make_run())
    js = json.loads(format_results(recs, "json"))
    assert js == json.loads(json.dumps(recs))
    lite = json.loads(format_results(recs, "json", include_gpulab=False))
    assert all("gpulab" not in r for r in lite) and list(lite[0]) == [*LLAMA_BENCH_FIELDS, *LLAMA_BENCH_SAMPLE_FIELDS]
    lines = format_results(recs, "jsonl").splitlines()
    assert [json.loads(ln)["n_gen"] for ln in lines] == [0, 128]
    rows = list(csv.DictReader(io.StringIO(format_results(recs, "csv"))))
    assert list(rows[0]) == list(LLAMA_BENCH_FIELDS)
    assert rows[0]["tensor_split"] == "3.00/1.00" and rows[0]["no_kv_offload"] == "0" and rows[1]["n_gen"] == "128"
    assert float(rows[0]["avg_ts"]) == pytest.approx(recs[0]["avg_ts"], rel=1e-6)
    db = sqlite3.connect(":memory:")
    db.executescript(format_results(recs, "sql"))
    assert db.execute("select n_prompt, n_gen, tensor_split from llama_bench").fetchall() == [
        (512, 0, "3.00/1.00"), (0, 128, "3.00/1.00")]
    with pytest.raises(ValueError, match="not one of"):
        format_results(recs, "xml")


def test_run_round_trip_and_from_records():
    run = make_run()
    d = json.loads(json.dumps(run_to_dict(run)))
    assert run_from_dict(d) == run
    assert run_from_dict(run_to_dict(run, include_log=False)).report.log == ""
    plain = Run(model_path="m", model_bytes=1, config=SplitConfig(), report=run.report)
    again = run_from_dict(json.loads(json.dumps(run_to_dict(plain))))
    assert type(again) is Run and again == plain
    back = runs_from_records(to_llama_bench_records(run))
    assert len(back) == 1
    b = back[0]
    assert b.pp == run.pp and b.tg == run.tg and b.config == run.config and b.plan == run.plan
    assert b.report.buffers == run.report.buffers and b.model_type == run.model_type and b.run_id == "r1"
    # a plain Run's records carry what they can
    recs = to_llama_bench_records(plain)
    assert recs == []   # no tests measured, no records


def test_throughput_statistics_match_llama_bench():
    t = throughput_from_samples(0, 100, [1_000_000_000, 2_000_000_000, 4_000_000_000])
    assert t.samples_ts == (100.0, 50.0, 25.0)
    assert t.avg_ts == pytest.approx(175 / 3)
    # llama-bench's stdev: sqrt(sum(x^2)/(n-1) - mean^2 * n/(n-1))
    m = 175 / 3
    assert t.stddev_ts == pytest.approx(((100 ** 2 + 50 ** 2 + 25 ** 2) / 2 - m * m * 3 / 2) ** 0.5)
    one = throughput_from_samples(8, 0, [5])
    assert one.stddev_ts == 0.0 and one.name == "pp8"


def _llama_bench_binary() -> Path | None:
    b = tools_bin()
    return b / "llama-bench" if b is not None else None


def test_markdown_and_csv_equal_llama_benchs_own(tmp_path):
    """Where bench/llama_bench_compare.py has built llama-bench: its md and csv for one run (it
    prints md to stdout and jsonl to stderr for the same tests) equal ours from its records."""
    import subprocess
    exe = _llama_bench_binary()
    if exe is None:
        pytest.skip(NOT_BUILT)
    from gpulab.sources.synth import PRESETS, write_model
    model = write_model(tmp_path / "tiny.gguf", PRESETS["tiny"])
    for extra in (["-ts", "3/1"], ["-b", "64", "-fa", "on"],
                  ["-ncmoe", "1", "-ot", r"blk\.0\.attn_q=CPU;output=CPU", "-nopo", "1", "--repack", "0"]):
        p = subprocess.run([str(exe), "-m", str(model), "-p", "8", "-n", "4", "-r", "2", "-t", "1", *extra,
                            "-o", "md", "-oe", "jsonl"], capture_output=True, text=True, timeout=120, check=True)
        recs = [json.loads(ln) for ln in p.stderr.splitlines() if ln.startswith("{")]
        assert len(recs) == 2 and list(recs[0]) == [*LLAMA_BENCH_FIELDS, *LLAMA_BENCH_SAMPLE_FIELDS]
        assert format_results(recs, "md", default_threads=None) == p.stdout
