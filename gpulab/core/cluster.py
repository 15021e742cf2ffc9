"""Cluster: hosts, their devices, and the link between each host and the head.

The head is the host that runs llama-server (or llama-bench): its own devices are local, every
other host serves its devices with llama.cpp's `rpc-server`, one server per device, and the
head reaches them with `--rpc HOST:PORT,...`. A link is described by what a user can measure
(`gpulab rpc-probe`) or read off a spec sheet: its bandwidth and its round-trip time.

    version = 1
    head = "desk"

    [[hosts]]
    name = "desk"
    devices = [{ spec = "24GiB:936GB/s" }]          # the head's own GPUs (--sim spec items)

    [[hosts]]
    name = "box"
    address = "192.168.1.20"                       # where its rpc-servers listen
    link = { gbit_per_s = 1.0, rtt_ms = 1.0, source = "given" }
    devices = [{ spec = "24GiB:936GB/s", device = "CUDA0", port = 50052 }]

Pure: no I/O (gpulab.storage.cluster_files reads and writes the file).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .devices import Device, parse_sim_spec, split_endpoint
from .errors import ConfigError, DeviceSpecError

__all__ = ["CLUSTER_VERSION", "Link", "HostDevice", "Host", "Cluster", "cluster_from_dict", "cluster_to_dict",
           "LOCAL_LINK"]

CLUSTER_VERSION = 1


@dataclass(frozen=True)
class Link:
    """The network between a host and the head, one way's bandwidth and the round trip."""
    bytes_per_s: float
    rtt_s: float
    source: str = "given"        # 'given' (written by a person) | 'probe' (gpulab rpc-probe)

    @property
    def gbit_per_s(self) -> float:
        return self.bytes_per_s * 8 / 1e9

    def describe(self) -> str:
        return f"{self.gbit_per_s:g} Gbit/s, {self.rtt_s * 1e3:.3g} ms round trip ({self.source})"


# the head to itself: no network (its devices are local)
LOCAL_LINK = Link(bytes_per_s=float("inf"), rtt_s=0.0, source="local")


@dataclass(frozen=True)
class HostDevice:
    spec: str                    # one --sim item: TOTAL[@FREE][:BW/s]
    device: str = ""             # the ggml device its rpc-server serves ('CUDA0', 'CPU'); '' on the head
    port: int = 0                # its rpc-server's port (0 on the head)


@dataclass(frozen=True)
class Host:
    name: str
    devices: tuple[HostDevice, ...]
    address: str = "127.0.0.1"   # the address its rpc-servers bind and the head connects to
    link: Link = LOCAL_LINK
    cache_dir: str = ""          # rpc-server -c: tensors cached by hash, so a reload skips the link

    def endpoints(self) -> list[str]:
        return [f"{self.address}:{d.port}" for d in self.devices]


@dataclass(frozen=True)
class Cluster:
    hosts: tuple[Host, ...]
    head: str
    version: int = CLUSTER_VERSION

    def __post_init__(self) -> None:
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise ConfigError(f"host names must be unique: {', '.join(names)}")
        if self.head not in names:
            raise ConfigError(f"the head {self.head!r} is not one of the hosts ({', '.join(names)})")
        seen: set[str] = set()
        for h in self.hosts:
            if h.name == self.head:
                continue
            for ep in h.endpoints():
                if ep in seen:
                    raise ConfigError(f"two rpc-servers at {ep}: give each device of {h.name} its own port")
                seen.add(ep)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise ConfigError(f"no host {name!r} in the cluster ({', '.join(h.name for h in self.hosts)})")

    @property
    def head_host(self) -> Host:
        return self.host(self.head)

    def remote(self, names: tuple[str, ...] | list[str] | None = None) -> list[Host]:
        """The hosts other than the head (those named, in the cluster's order)."""
        return [h for h in self.hosts if h.name != self.head and (names is None or h.name in names)]

    def devices(self, hosts: tuple[str, ...] | list[str] | None = None) -> tuple[list[Device], dict[str, str]]:
        """(devices in llama.cpp's order, device name -> host name) when the head runs with
        `--rpc` for the given remote hosts (default all): RPC servers first, in --rpc order
        (llama.cpp lists them first, "to minimize network transfers"; ggml-rpc.cpp names a
        server's devices RPC<i>), then the head's own devices."""
        out: list[Device] = []
        host_of: dict[str, str] = {}
        n_rpc = 0
        for h in self.remote(hosts):
            for d in h.devices:
                sim = _one(d.spec, h.name)
                name = f"RPC{n_rpc}"
                n_rpc += 1
                out.append(replace(sim, name=name, kind="rpc", source="sim", endpoint=f"{h.address}:{d.port}",
                                   description=f"{h.name} {d.device or 'device'}", host=h.name))
                host_of[name] = h.name
        head = self.head_host
        for i, d in enumerate(head.devices):
            name = f"SIM{i}"
            out.append(replace(_one(d.spec, head.name), name=name, description=f"{head.name} {d.device or 'GPU'}",
                               host=head.name))
            host_of[name] = head.name
        return out, host_of

    def endpoints(self, hosts: tuple[str, ...] | list[str] | None = None) -> list[str]:
        """The head's --rpc list for these remote hosts (default all), in llama.cpp's device order."""
        return [ep for h in self.remote(hosts) for ep in h.endpoints()]

    def link_of(self, host: str) -> Link:
        return LOCAL_LINK if host == self.head else self.host(host).link

    def with_link(self, host: str, link: Link) -> Cluster:
        return replace(self, hosts=tuple(replace(h, link=link) if h.name == host else h for h in self.hosts))


def _one(spec: str, host: str) -> Device:
    try:
        devs = parse_sim_spec(spec)
    except DeviceSpecError as e:
        raise ConfigError(f"host {host}: {e}") from None
    if len(devs) != 1:
        raise ConfigError(f"host {host}: device spec {spec!r} names {len(devs)} devices; give one entry per device")
    return devs[0]


# --- the TOML document ----------------------------------------------------------------------------

_HOST_KEYS = ("name", "address", "link", "devices", "cache_dir")
_LINK_KEYS = ("gbit_per_s", "rtt_ms", "source")
_DEVICE_KEYS = ("spec", "device", "port")


def _unknown(where: str, d: dict, known: tuple[str, ...]) -> None:
    extra = [k for k in d if k not in known]
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)} (known: {', '.join(known)})")


def _number(where: str, v, *, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
        raise ConfigError(f"{where} must be a {'positive' if positive else 'non-negative'} number, not {v!r}")
    return float(v)


def _link(where: str, d) -> Link:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: link must be a table such as {{ gbit_per_s = 1.0, rtt_ms = 1.0 }}")
    _unknown(where, d, _LINK_KEYS)
    if "gbit_per_s" not in d or "rtt_ms" not in d:
        raise ConfigError(f"{where}: a link needs gbit_per_s and rtt_ms (measure them: gpulab rpc-probe)")
    return Link(bytes_per_s=_number(f"{where}.gbit_per_s", d["gbit_per_s"], positive=True) * 1e9 / 8,
                rtt_s=_number(f"{where}.rtt_ms", d["rtt_ms"], positive=False) / 1e3,
                source=str(d.get("source", "given")))


def _device(where: str, d, remote: bool) -> HostDevice:
    if isinstance(d, str):
        d = {"spec": d}
    if not isinstance(d, dict) or "spec" not in d:
        raise ConfigError(f"{where}: a device is a table such as {{ spec = \"24GiB:936GB/s\", port = 50052 }}")
    _unknown(where, d, _DEVICE_KEYS)
    port = d.get("port", 0)
    if remote and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise ConfigError(f"{where}: a remote device needs the port of its rpc-server (1..65535), not {port!r}")
    return HostDevice(spec=str(d["spec"]), device=str(d.get("device", "CPU" if remote else "")), port=int(port))


def cluster_from_dict(doc: dict) -> Cluster:
    """The Cluster in a parsed TOML document; ConfigError with what to change for anything wrong."""
    version = doc.get("version", CLUSTER_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= CLUSTER_VERSION:
        raise ConfigError(f"cluster version {version!r} is not one this gpulab reads (1..{CLUSTER_VERSION})")
    _unknown("cluster", doc, ("version", "head", "hosts"))
    raw = doc.get("hosts")
    if not isinstance(raw, list) or not raw:
        raise ConfigError("a cluster needs [[hosts]] entries, the head among them")
    head = doc.get("head", raw[0].get("name") if isinstance(raw[0], dict) else None)
    names = [h.get("name") for h in raw if isinstance(h, dict)]
    if head not in names:
        raise ConfigError(f"the head {head!r} is not one of the hosts ({', '.join(map(str, names))})")
    hosts = []
    for i, h in enumerate(raw):
        where = f"hosts[{i}]"
        if not isinstance(h, dict) or not isinstance(h.get("name"), str) or not h["name"]:
            raise ConfigError(f"{where}: each host needs a name")
        where = f"host {h['name']}"
        _unknown(where, h, _HOST_KEYS)
        remote = h["name"] != head
        devs = h.get("devices", [])
        if not isinstance(devs, list) or (remote and not devs):
            raise ConfigError(f"{where}: devices must be a list (a remote host serves at least one)")
        address = str(h.get("address", "127.0.0.1"))
        if remote:
            try:
                split_endpoint(f"{address}:1")
            except DeviceSpecError:
                raise ConfigError(f"{where}: address {address!r} is not a host name or IPv4 address") from None
            if "link" not in h:
                raise ConfigError(f"{where}: a remote host needs its link to the head "
                                  "(link = { gbit_per_s = 1.0, rtt_ms = 1.0 }, or measure it: gpulab rpc-probe)")
        hosts.append(Host(name=h["name"], address=address,
                          devices=tuple(_device(f"{where} device {j}", d, remote) for j, d in enumerate(devs)),
                          link=_link(where, h["link"]) if remote else LOCAL_LINK,
                          cache_dir=str(h.get("cache_dir", ""))))
    return Cluster(hosts=tuple(hosts), head=str(head), version=version)


def cluster_to_dict(c: Cluster) -> dict:
    hosts = []
    for h in c.hosts:
        remote = h.name != c.head
        d: dict = {"name": h.name}
        if remote:
            d["address"] = h.address
            d["link"] = {"gbit_per_s": round(h.link.gbit_per_s, 6), "rtt_ms": round(h.link.rtt_s * 1e3, 6),
                         "source": h.link.source}
        if h.cache_dir:
            d["cache_dir"] = h.cache_dir
        d["devices"] = [{"spec": x.spec, **({"device": x.device, "port": x.port} if remote else {})}
                        for x in h.devices]
        hosts.append(d)
    return {"version": c.version, "head": c.head, "hosts": hosts}
