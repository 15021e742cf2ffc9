"""rpc-probe through a shaping proxy: the link it measures is the one the proxy emulates (loosely:
the 10% figures are bench/hosts.py's, on a machine this loaded a test keeps a wide margin), and
the cluster file gets the measured link."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")

from gpulab.netem import ShapingProxy


@pytest.fixture(scope="module")
def server():
    from gpulab.runtime.rpc import start_servers
    with start_servers(1) as cl:
        yield cl.endpoints[0]


def test_probe_measures_the_emulated_link(server):
    from gpulab.runtime.rpc_probe import probe_link
    host, port = server.split(":")
    with ShapingProxy((host, int(port)), bytes_per_s=5e6, delay_s=5e-3, lifetime_s=60) as px:
        m = probe_link(px.endpoint, sizes=(64 << 10, 256 << 10, 1 << 20), repeats=3, n_rtt=10)
        up = px.bytes_up[0]
    # the proxy delivers a round trip no sooner than its two delays (less the 0.3 ms it may send
    # early per direction to make up for late wake-ups), nor bytes faster than its rate
    assert 9.4e-3 <= m.rtt_s < 20e-3
    assert 3.5e6 < m.bytes_per_s <= 5.5e6
    # every upload crossed the proxy: 3 sizes x 3 repeats of the payload, plus the commands
    assert up >= 3 * ((64 << 10) + (256 << 10) + (1 << 20))


def test_probe_reads_the_configured_link_within_what_the_path_itself_adds(server):
    """The issue's 10%, against a tolerance measured here: the same proxy unshaped first (what the
    proxy's hops and the server add to a round trip, and the path's own rate, on this machine at
    this load), then shaped to 10 ms and 40 Mbit/s. The probe takes the fastest of its samples, so
    a loaded machine's late wake-ups mostly fall out."""
    from gpulab.runtime.rpc_probe import probe_link
    host, port = server.split(":")
    sizes = (64 << 10, 256 << 10, 1 << 20)
    rtt_set, rate_set = 10e-3, 5e6
    with ShapingProxy((host, int(port)), bytes_per_s=None, lifetime_s=120) as px:
        # larger uploads for the bare path: at loopback speed the small ones take less time than a
        # loaded machine's scheduling noise, and the probe rightly refuses to read a rate from them
        bare = probe_link(px.endpoint, sizes=(1 << 20, 4 << 20, 16 << 20), repeats=3, n_rtt=10)
        px.shape(rate_set, rtt_set / 2)
        m = probe_link(px.endpoint, sizes=sizes, repeats=3, n_rtt=20)
    # the proxy may send a chunk up to 0.3 ms early per direction; the path adds bare.rtt_s
    assert rtt_set - 0.6e-3 <= m.rtt_s <= 1.1 * rtt_set + bare.rtt_s
    # the bytes cross the bucket and then the path: n / rate_set + n / bare rate
    expected = 1 / (1 / rate_set + 1 / bare.bytes_per_s)
    assert 0.9 * expected <= m.bytes_per_s <= 1.1 * rate_set


def test_cli_writes_the_link_into_the_cluster(server, tmp_path):
    from gpulab.cli import main
    from gpulab.storage.cluster_files import read_cluster
    host, port = server.split(":")
    with ShapingProxy((host, int(port)), bytes_per_s=5e6, delay_s=5e-3, lifetime_s=60) as px:
        f = tmp_path / "c.toml"
        f.write_text('version = 1\nhead = "me"\n[[hosts]]\nname = "me"\n[[hosts]]\nname = "b"\n'
                     f'address = "127.0.0.1"\nlink = {{ gbit_per_s = 100, rtt_ms = 0 }}\n'
                     f'devices = [{{ spec = "1GiB", port = {px.port} }}]\n')
        assert main(["rpc-probe", "--cluster", str(f), "--repeats", "2"]) == 0
    link = read_cluster(f).host("b").link
    assert link.source == "probe" and 9.4e-3 <= link.rtt_s < 20e-3 and 0.028 < link.gbit_per_s <= 0.044
