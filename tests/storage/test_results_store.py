"""The results store: where it lives, append + fsync per record, reading back and filtering, and
failures (full disk, read-only store) that raise a clear error and keep every earlier record."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import pytest

from builders import make_run
from gpulab.core.config import SplitConfig
from gpulab.core.errors import GpulabError, StoreError
from gpulab.sources.fingerprint import model_fingerprint
from gpulab.storage import results as store_mod
from gpulab.storage.paths import data_dir
from gpulab.storage.results import ResultsStore, default_store_path


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("GPULAB_DATA_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "x"))
    assert data_dir() == tmp_path / "a" and default_store_path() == tmp_path / "a" / "results.jsonl"
    monkeypatch.delenv("GPULAB_DATA_DIR")
    assert data_dir() == tmp_path / "x" / "gpulab"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home" / ".local" / "share" / "gpulab"


def test_append_read_filter(monkeypatch, tmp_path):
    monkeypatch.setenv("GPULAB_DATA_DIR", str(tmp_path / "data"))
    s = ResultsStore()
    assert s.path == tmp_path / "data" / "results.jsonl" and s.records() == []
    a = make_run(run_id="a", model_fingerprint="h1")
    b = make_run(run_id="b", model_fingerprint="h2", config=SplitConfig(tensor_split=(1, 1), n_ctx=640))
    s.append_run(a)
    s.append_run(b)
    lines = s.path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(ln)["build_commit"] for ln in lines)   # llama-bench JSONL
    assert len(s.records()) == 4
    assert [r["gpulab"]["run_id"] for r in s.records(model_fingerprint="h2")] == ["b", "b"]
    assert len(s.records(config=a.config)) == 2 and len(s.records(config=SplitConfig())) == 0
    assert [r["n_gen"] for r in s.records(test="tg128")] == [128, 128]
    runs = s.runs()
    assert [r.run_id for r in runs] == ["a", "b"] and runs[1].config == b.config and runs[0].pp == a.pp


def test_records_stored_before_the_fingerprint_rename_are_still_found(tmp_path):
    s = ResultsStore(tmp_path / "r.jsonl")
    s.append_run(make_run(run_id="old", model_fingerprint="h1"))
    old = [json.loads(ln) for ln in s.path.read_text().splitlines()]
    for r in old:   # what gpulab wrote before: the same value under "model_hash"
        r["gpulab"]["model_hash"] = r["gpulab"].pop("model_fingerprint")
    s.path.write_text("".join(json.dumps(r) + "\n" for r in old))
    assert len(s.records(model_fingerprint="h1")) == 2
    assert [r.model_fingerprint for r in s.runs()] == ["h1"]


def test_fsync_per_record(monkeypatch, tmp_path):
    synced = []
    real = os.fsync
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    ResultsStore(tmp_path / "r.jsonl").append_run(make_run())
    assert len(synced) == 2


def test_a_line_cut_by_a_crash_is_skipped_and_trimmed(tmp_path):
    s = ResultsStore(tmp_path / "r.jsonl")
    s.append_run(make_run(run_id="a"))
    with open(s.path, "ab") as f:
        f.write(b'{"build_commit": "half a rec')          # the crash
    assert len(s.records()) == 2 and s.skipped_lines == 1
    s.append_run(make_run(run_id="b"))
    assert [r["gpulab"]["run_id"] for r in s.records()] == ["a", "a", "b", "b"] and s.skipped_lines == 0


def test_full_disk_keeps_earlier_records(monkeypatch, tmp_path):
    s = ResultsStore(tmp_path / "r.jsonl")
    s.append_run(make_run(run_id="a"))
    before = s.path.read_bytes()
    real_write = os.write

    def full(fd, data):       # the disk fills up halfway through the line
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "write", full)
    with pytest.raises(StoreError, match="disk is full.*records already there are kept") as e:
        s.append_run(make_run(run_id="b"))
    assert isinstance(e.value, GpulabError)
    assert s.path.read_bytes() == before                 # no half line left behind
    monkeypatch.setattr(store_mod.os, "write", real_write)
    s.append_run(make_run(run_id="c"))
    assert [r["gpulab"]["run_id"] for r in s.records()] == ["a", "a", "c", "c"]


def test_read_only_store_raises_clearly_and_keeps_records(tmp_path):
    d = tmp_path / "ro"
    s = ResultsStore(d / "results.jsonl")
    s.append_run(make_run(run_id="a"))
    before = s.path.read_bytes()
    if os.geteuid() == 0:
        # root writes through permission bits: make the file immutable instead
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(s.path)],
                                                        capture_output=True).returncode:
            pytest.skip("running as root without chattr +i: cannot make a read-only store")
        undo = ["chattr", "-i", str(s.path)]
    else:
        os.chmod(s.path, 0o444)
        os.chmod(d, 0o555)
        undo = None
    try:
        with pytest.raises(StoreError, match=r"cannot write the results store .*results.jsonl: "
                                             r"(permission denied|the file system is read-only)"):
            s.append_run(make_run(run_id="b"))
        assert s.path.read_bytes() == before and len(s.records()) == 2
    finally:
        if undo:
            subprocess.run(undo, check=True)
        else:
            os.chmod(d, 0o755)
            os.chmod(s.path, 0o644)
    # a store under a path that is a file: a clear error too
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match="cannot write the results store"):
        ResultsStore(tmp_path / "afile" / "results.jsonl").append_run(make_run())


def test_fingerprint(tmp_path):
    a = tmp_path / "a.gguf"
    a.write_bytes(b"GGUF" + bytes(3 << 20))
    h = model_fingerprint(a)
    assert len(h) == 16 and h == model_fingerprint(a)
    with open(a, "r+b") as f:       # a change at the end (the weights) changes it
        f.seek(-1, 2)
        f.write(b"\x01")
    assert model_fingerprint(a) != h
