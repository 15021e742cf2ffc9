"""The local results store: every measured test appended as one JSON line, durably.

    store = ResultsStore()                      # <data dir>/results.jsonl (gpulab.storage.paths)
    store.append_run(run)                       # one llama-bench record per test, fsync'd each
    store.records(model_fingerprint=run.model_fingerprint)    # read back, filtered
    store.runs(config=cfg)                      # as Runs again

Lines are llama-bench JSONL records (its fields, plus the "gpulab" object), so `jq` and
llama-bench tooling read the file directly. Each line is written with one write() on an
O_APPEND descriptor, then fsync: a crash loses at most the line being written, and a line cut
short by a crash or a full disk is skipped on reading (and trimmed away before the next append,
when it is the last line). A store that cannot be written raises StoreError, a GpulabError
naming the file and the cause; the records already there stay as they were.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from ..core.config import SplitConfig, config_to_dict
from ..core.errors import StoreError
from ..core.measure.results import runs_from_records, stored_fingerprint, to_llama_bench_records
from ..core.run import Run
from .paths import data_dir

__all__ = ["ResultsStore", "default_store_path"]


def default_store_path() -> Path:
    return data_dir() / "results.jsonl"


def _why(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "the disk is full"
    if e.errno == errno.EDQUOT:
        return "the disk quota is exceeded"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.EROFS:
        return "the file system is read-only"
    return e.strerror or str(e)


class ResultsStore:
    """Append-only JSONL of llama-bench records. `path` default: <data dir>/results.jsonl."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_store_path()
        self.skipped_lines = 0     # unreadable lines seen by the last read

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"

    # -- writing ------------------------------------------------------------------------------
    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot write the results store {self.path}: {_why(e)}; set GPULAB_DATA_DIR "
                             "to a writable folder") from None

    def append(self, record: dict) -> None:
        """Append one record as a line: one write, flushed and fsync'd before returning."""
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        fd = self._open()
        try:
            size = os.fstat(fd).st_size
            if size:
                # a line cut short by an earlier crash: drop it (it was never a whole record)
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        size = self._trim_partial(fd, size)
            try:
                n = os.write(fd, line)
                if n != len(line):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
            except OSError as e:
                try:   # leave no half line behind: the file is exactly its earlier records
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                except OSError:
                    pass
                raise StoreError(f"cannot write the results store {self.path}: {_why(e)}; the records "
                                 "already there are kept. Free some space or set GPULAB_DATA_DIR") from None
        finally:
            os.close(fd)

    def _trim_partial(self, fd: int, size: int) -> int:
        with open(self.path, "rb") as f:
            data = f.read()
        keep = data.rfind(b"\n") + 1
        try:
            os.ftruncate(fd, keep)
        except OSError as e:
            raise StoreError(f"cannot write the results store {self.path}: {_why(e)}") from None
        return keep

    def append_run(self, run: Run) -> list[dict]:
        """Append a run's llama-bench records (pp, tg), each durably; returns them."""
        records = to_llama_bench_records(run)
        for r in records:
            self.append(r)
        return records

    # -- reading ------------------------------------------------------------------------------
    def records(self, *, model_fingerprint: str | None = None, config: SplitConfig | dict | None = None,
                model_path: str | None = None, test: str | None = None) -> list[dict]:
        """Stored records, oldest first, filtered by model fingerprint, config (all of
        SplitConfig's fields equal), model path, or test name ('pp512', 'tg128')."""
        if not self.path.exists():
            return []
        want = config_to_dict(config) if isinstance(config, SplitConfig) else config
        out = []
        self.skipped_lines = 0
        try:
            with open(self.path, "rb") as f:
                for raw in f:
                    if not raw.strip():
                        continue
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        self.skipped_lines += 1
                        continue
                    g = rec.get("gpulab") or {}
                    if model_fingerprint is not None and stored_fingerprint(g) != model_fingerprint:
                        continue
                    if model_path is not None and rec.get("model_filename") != model_path:
                        continue
                    if want is not None and g.get("config") != want:
                        continue
                    if test is not None and g.get("test") != test:
                        continue
                    out.append(rec)
        except OSError as e:
            raise StoreError(f"cannot read the results store {self.path}: {_why(e)}") from None
        return out

    def runs(self, **filters) -> list[Run]:
        """The stored runs (pp and tg of one run together), filtered as `records`."""
        return runs_from_records(self.records(**filters))
