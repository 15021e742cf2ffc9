from __future__ import annotations

import gguf
import pytest

from gpulab import DeviceSpecError, parse_sim_spec
from gpulab.core.ggml_types import KV_CACHE_TYPES, block_size, ggml_type_id
from gpulab.core.units import format_bytes, parse_bytes

GiB = 1024**3


def test_parse_and_format_bytes():
    assert parse_bytes("24GiB") == 24 * GiB
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes("512") == 512
    assert format_bytes(4.21 * GiB) == "4.21 GiB"
    with pytest.raises(ValueError, match="not a byte quantity"):
        parse_bytes("lots")


def test_sim_spec_total_free_bandwidth_and_repeat():
    a, b, c = parse_sim_spec("24GiB, 24GiB@20GiB, 12GiB:936GB/s")
    assert (a.name, a.total_bytes, a.free_bytes) == ("SIM0", 24 * GiB, 24 * GiB)
    assert (b.total_bytes, b.free_bytes) == (24 * GiB, 20 * GiB)
    assert c.bandwidth_bytes_per_s == 936e9
    assert [d.name for d in parse_sim_spec("8x80GiB")] == [f"SIM{i}" for i in range(8)]


@pytest.mark.parametrize("spec", ["", "24", "24XB", "10GiB@20GiB", "0x24GiB", "24GiB,,", "@5GiB"])
def test_bad_sim_spec_is_one_clear_error(spec):
    with pytest.raises(DeviceSpecError) as e:
        parse_sim_spec(spec)
    assert "\n" not in str(e.value)


def test_kv_cache_type_table_matches_gguf():
    for name, (block, size) in KV_CACHE_TYPES.items():
        t = gguf.GGMLQuantizationType[name.upper()]
        assert gguf.GGML_QUANT_SIZES[t] == (block, size)
        assert ggml_type_id(name) == int(t)


def test_block_size_table_matches_gguf():
    # every weight type gguf knows a size for (split mode tensor cuts on these blocks)
    for t, (block, _size) in gguf.GGML_QUANT_SIZES.items():
        assert block_size(t.name) == block, t.name
    with pytest.raises(ValueError, match="unknown ggml type"):
        block_size("Q9_9")
