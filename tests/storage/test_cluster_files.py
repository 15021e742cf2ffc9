from gpulab.core.cluster import Cluster, Host, HostDevice, Link
from gpulab.storage.cluster_files import read_cluster, write_cluster


def test_write_then_read(tmp_path):
    c = Cluster(hosts=(Host("head", (HostDevice("8GiB"),)),
                       Host("b", (HostDevice("4GiB", "CPU", 50100),), address="127.0.0.1",
                            link=Link(1.25e8, 1e-3, "probe"))), head="head")
    p = write_cluster(tmp_path / "c.toml", c)
    assert 'source = "probe"' in p.read_text() and "gbit_per_s = 1.0" in p.read_text()
    assert read_cluster(p) == c
