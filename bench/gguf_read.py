"""Reading a GGUF's header: gpulab's read_profile against gguf-py's GGUFReader on the same file, in
the same run (was a 1 s assertion in tests/sources/test_gguf_file.py), and how fast a file whose
header lies (an array claiming more elements than the file holds) is turned away.

    .venv/bin/python bench/gguf_read.py [model.gguf]      (default: the demo model, SmolLM2-135M)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's gpulab
import gguf
from benchkit import loadavg

from gpulab import read_profile
from gpulab.core.errors import ModelFormatError
from gpulab.sources.demo import demo_model_path


def median_s(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lying_header(path: Path) -> Path:
    """A GGUF whose first key-value pair is an array claiming 2**40 uint32 elements."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("general.lies", [1, 2, 3])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    n_at = data.index(b"general.lies") + len(b"general.lies") + 4 + 4   # after the key, value type, array type
    data[n_at:n_at + 8] = (1 << 40).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return path


def main() -> None:
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else demo_model_path()
    print(f"load average before {loadavg()}; {model.name}, {model.stat().st_size / 2**20:.0f} MiB")
    t_ours = median_s(lambda: read_profile(model))
    t_ref = median_s(lambda: gguf.GGUFReader(str(model)), repeat=3)
    with tempfile.TemporaryDirectory() as tmp:
        bad = lying_header(Path(tmp) / "lies.gguf")

        def reject() -> None:
            try:
                read_profile(bad)
            except ModelFormatError:
                return
            raise AssertionError("read_profile accepted a lying header")
        t_bad = median_s(reject)
    print("| case | median time | ratio to GGUFReader |")
    print("|---|---:|---:|")
    print(f"| read_profile | {t_ours * 1e3:.1f} ms | {t_ours / t_ref:.3f}x |")
    print(f"| reference: gguf.GGUFReader | {t_ref * 1e3:.1f} ms | 1x |")
    print(f"| read_profile turning away a header that claims 2**40 elements | {t_bad * 1e3:.2f} ms | "
          f"{t_bad / t_ref:.1e}x |")
    print(f"load average after {loadavg()}")


if __name__ == "__main__":
    main()
