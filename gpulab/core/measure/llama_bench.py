"""llama-bench's output formats for result records: md (its table), json, jsonl, csv, sql.

    print(format_results(to_llama_bench_records(run), "md"))

Each printer copies the vendored tools/llama-bench/llama-bench.cpp's (markdown_printer,
csv_printer, json_printer, jsonl_printer, sql_printer), so llama-bench's tooling reads the output.
"""

from __future__ import annotations

import json

from .results import BOOL_FIELDS, FLOAT_FIELDS, INT_FIELDS, LLAMA_BENCH_FIELDS, LLAMA_BENCH_SAMPLE_FIELDS

__all__ = ["format_results", "OUTPUT_FORMATS"]

OUTPUT_FORMATS = ("md", "json", "jsonl", "csv", "sql")


def _value_str(field_name: str, v) -> str:
    """A value as llama-bench's get_values() strings it (bools '0'/'1', floats '%f')."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if field_name in FLOAT_FIELDS:
        return f"{float(v):f}"
    return str(v)


def _json_clean(rec: dict, include_gpulab: bool) -> dict:
    out = {k: rec[k] for k in (*LLAMA_BENCH_FIELDS, *LLAMA_BENCH_SAMPLE_FIELDS) if k in rec}
    if include_gpulab and "gpulab" in rec:
        out["gpulab"] = rec["gpulab"]
    return out


# markdown_printer::get_field_width and get_field_display_name
_MD_WIDTH = {"model": -30, "t/s": 20, "size": 10, "params": 10, "n_gpu_layers": 3, "n_threads": 7, "n_batch": 7,
             "n_ubatch": 8, "type_k": 6, "type_v": 6, "split_mode": 6, "load_mode": 10, "flash_attn": 3,
             "devices": -12, "test": 15, "no_op_offload": 4, "no_host": 4, "repack": 3}
_MD_NAME = {"n_gpu_layers": "ngl", "split_mode": "sm", "n_threads": "threads", "no_kv_offload": "nkvo",
            "flash_attn": "fa", "load_mode": "lm", "embeddings": "embd", "no_op_offload": "nopo", "no_host": "noh",
            "repack": "rpk", "devices": "dev", "tensor_split": "ts", "tensor_buft_overrides": "ot",
            "fit_target": "fitt", "fit_min_ctx": "fitc"}
# cmd_params_defaults: a column appears when a value differs from these (or values differ)
_MD_DEFAULTS = {"n_batch": 2048, "n_ubatch": 512, "type_k": "f16", "type_v": "f16", "main_gpu": 0,
                "split_mode": "layer", "no_kv_offload": False, "flash_attn": -1, "devices": "auto",
                "tensor_split": "0.00", "tensor_buft_overrides": "none", "load_mode": "auto",
                "no_op_offload": 0, "no_host": False, "repack": True}
# markdown_printer::print_header's order, after n_threads (n_cpu_moe comes before it)
_MD_OPTIONAL = ("n_batch", "n_ubatch", "type_k", "type_v", "main_gpu", "split_mode", "no_kv_offload",
                "flash_attn", "devices", "tensor_split", "tensor_buft_overrides", "load_mode",
                "no_op_offload", "no_host", "repack")


def _md_width(f: str) -> int:
    if f in _MD_WIDTH:
        return _MD_WIDTH[f]
    w = max(len(f), 10)
    string = f not in INT_FIELDS and f not in BOOL_FIELDS and f not in FLOAT_FIELDS
    return -w if string else w


def _cell(text: str, width: int) -> str:
    return text.ljust(-width) if width < 0 else text.rjust(width)


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.2f} MiB" if n < 1024 ** 3 else f"{n / 1024 ** 3:.2f} GiB"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n < 1000 ** 3 else f"{n / 1e9:.2f} B"


def _md(records: list[dict], default_threads: int | None) -> str:
    cols = ["model", "size", "params", "backend"]
    cpu_backend = any(("CPU" in r["backends"] or "BLAS" in r["backends"]) for r in records)
    if not cpu_backend:
        cols.append("n_gpu_layers")
    if {r["n_cpu_moe"] for r in records} != {0}:
        cols.append("n_cpu_moe")
    threads = {r["n_threads"] for r in records}
    if cpu_backend or len(threads) > 1 or default_threads is None or threads != {default_threads}:
        cols.append("n_threads")
    for f in _MD_OPTIONAL:
        values = {r[f] for r in records}
        if len(values) > 1 or values != {_MD_DEFAULTS[f]}:
            cols.append(f)
    cols += ["test", "t/s"]
    lines = ["|" + "".join(f" {_cell(_MD_NAME.get(c, c), _md_width(c))} |" for c in cols),
             "|" + "".join(f" {'-' * (abs(_md_width(c)) - 1)}{':' if _md_width(c) > 0 else '-'} |" for c in cols)]
    for r in records:
        cells = []
        for c in cols:
            if c == "model":
                v = r["model_type"]
            elif c == "size":
                v = _size(r["model_size"])
            elif c == "params":
                v = _params(r["model_n_params"])
            elif c == "backend":
                v = r["backends"]
            elif c == "test":
                v = (f"pp{r['n_prompt']}" if r["n_prompt"] > 0 and r["n_gen"] == 0 else
                     f"tg{r['n_gen']}" if r["n_gen"] > 0 and r["n_prompt"] == 0 else
                     f"pp{r['n_prompt']}+tg{r['n_gen']}")
            elif c == "t/s":
                v = f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}"
            else:
                v = _value_str(c, r[c])
            cells.append(f" {_cell(v, _md_width(c))} |")
        lines.append("|" + "".join(cells))
    builds = sorted({(r["build_commit"], r["build_number"]) for r in records})
    lines.append("")
    lines += [f"build: {b} ({n})" for b, n in builds]
    return "\n".join(lines) + "\n"


def _csv(records: list[dict]) -> str:
    def esc(s: str) -> str:   # csv_printer::escape_csv: always quoted, quotes doubled
        return '"' + s.replace('"', '""') + '"'
    lines = [",".join(LLAMA_BENCH_FIELDS)]
    lines += [",".join(esc(_value_str(f, r[f])) for f in LLAMA_BENCH_FIELDS) for r in records]
    return "\n".join(lines) + "\n"


def _sql(records: list[dict]) -> str:
    def sql_type(f):
        return "REAL" if f in FLOAT_FIELDS else "INTEGER" if (f in INT_FIELDS or f in BOOL_FIELDS) else "TEXT"
    lines = ["CREATE TABLE IF NOT EXISTS llama_bench ("]
    lines += [f"  {f} {sql_type(f)}{',' if i < len(LLAMA_BENCH_FIELDS) - 1 else ''}"
              for i, f in enumerate(LLAMA_BENCH_FIELDS)]
    lines += [");", ""]
    for r in records:
        vals = ", ".join("'" + _value_str(f, r[f]).replace("'", "''") + "'" for f in LLAMA_BENCH_FIELDS)
        lines.append(f"INSERT INTO llama_bench ({', '.join(LLAMA_BENCH_FIELDS)}) VALUES ({vals});")
    return "\n".join(lines) + "\n"


def format_results(records: list[dict], fmt: str = "md", *, include_gpulab: bool = True,
                   default_threads: int | None = None) -> str:
    """Records as llama-bench prints them: 'md' (its table), 'json' (a list), 'jsonl', 'csv', 'sql'.

    json/jsonl carry the "gpulab" object unless include_gpulab=False; csv, sql and md have
    llama-bench's columns only. default_threads: llama-bench's default -t on this machine (the
    md table then shows 'threads' only where it differs, or on a CPU backend, as llama-bench does).
    """
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    if fmt == "md":
        return _md(records, default_threads) if records else ""
    if fmt == "json":
        return json.dumps([_json_clean(r, include_gpulab) for r in records], indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(_json_clean(r, include_gpulab)) + "\n" for r in records)
    if fmt == "csv":
        return _csv(records)
    return _sql(records)
