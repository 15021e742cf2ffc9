"""`gpulab rpc-probe HOST:PORT,... [--cluster FILE]`: measure the link to each RPC server through
llama.cpp's RPC protocol (round trips of a small command, uploads of a few sizes) and, with
--cluster, write each host's measured link into the cluster description."""

from __future__ import annotations

from .result import Result

__all__ = ["register", "run"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("rpc-probe", help="measure round trip and bandwidth to llama.cpp RPC servers")
    p.add_argument("endpoints", metavar="HOST:PORT,...", nargs="?", default=None,
                   help="the servers to probe (default: every remote host's servers in --cluster)")
    p.add_argument("--cluster", metavar="FILE", help="cluster description (TOML) to write the measured links into")
    p.add_argument("--sizes", default="64KiB,256KiB,1MiB", help="upload sizes (default 64KiB,256KiB,1MiB)")
    p.add_argument("--repeats", type=int, default=5, help="uploads per size (the fastest counts)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.set_defaults(run=run)


def run(a, session) -> Result:
    from ..core.cluster import Link
    from ..core.devices import parse_endpoints
    from ..core.errors import ConfigError
    from ..core.units import parse_bytes
    from ..runtime.rpc_probe import probe_link
    from ..storage.cluster_files import read_cluster, write_cluster
    cluster = read_cluster(a.cluster) if a.cluster else None
    if a.endpoints:
        endpoints = list(parse_endpoints(a.endpoints))
    elif cluster is not None:
        endpoints = [h.endpoints()[0] for h in cluster.remote() if h.devices]
    else:
        raise ConfigError("give the servers to probe (HOST:PORT,...) or --cluster FILE")
    try:
        sizes = tuple(parse_bytes(x) for x in a.sizes.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--sizes {a.sizes!r}: give sizes such as 64KiB,256KiB,1MiB") from None
    found = [probe_link(ep, sizes=sizes, repeats=a.repeats) for ep in endpoints]
    notes = []
    if cluster is not None:
        by_ep = {ep: h.name for h in cluster.remote() for ep in h.endpoints()}
        for m in found:
            host = by_ep.get(m.endpoint)
            if host is None:
                notes.append(f"{m.endpoint} is no host's server in {a.cluster}: measured, not written")
                continue
            cluster = cluster.with_link(host, Link(m.bytes_per_s, m.rtt_s, "probe"))
        write_cluster(a.cluster, cluster)
        notes.append(f"wrote the measured links into {a.cluster}")
    rows = [{"endpoint": m.endpoint, "rtt_ms": m.rtt_s * 1e3, "mbit_per_s": m.bytes_per_s * 8 / 1e6,
             "samples": [{"bytes": n, "ms": t * 1e3} for n, t in m.samples]} for m in found]
    return Result(text="\n".join(m.describe() for m in found), data=rows, rows=rows, notes=notes)
