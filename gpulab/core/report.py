"""LoadReport: what llama.cpp itself said it did during a load, parsed from its log.

`gpulab.runtime.logcapture.parse_load_log` builds one from the text llama.cpp logs while
`llama_model_load_from_file` + `llama_init_from_model` run. Standard library only, so the
planner side can compare a `Plan` with a `LoadReport` without importing llama.cpp.

Device names are llama.cpp's (`RPC0`, `CUDA1`), and everything in host memory (the buffer
types `CPU`, `CPU_Mapped`, `CPU_REPACK`, `CUDA_Host`, ...) is reported under `"CPU"`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["BufferReport", "LoadReport", "BUFFER_KINDS"]

# 'model': weights (load_tensors ... model buffer size)
# 'kv': the KV cache (llama_kv_cache ... KV buffer size)
# 'state': the recurrent state (llama_memory_recurrent ... RS buffer size)
# 'compute': the scheduler's compute buffers (sched_reserve ... compute buffer size)
# 'output': logits/embeddings output buffer (llama_context ... output buffer size)
BUFFER_KINDS = ("model", "kv", "state", "compute", "output")


@dataclass(frozen=True)
class BufferReport:
    device: str          # llama.cpp device name ('RPC0', 'CUDA0') or 'CPU' for host memory
    buffer_type: str     # the buffer (type) name as logged: 'CPU_Mapped', 'RPC0[127.0.0.1:50052]'
    kind: str            # one of BUFFER_KINDS
    n_bytes: int         # from llama.cpp's 'NNN.NN MiB' (two decimals: +-5 KiB)


@dataclass(frozen=True)
class LoadReport:
    # n_layer + 1 entries from 'load_tensors: layer N assigned to device X'; the last is the
    # output layer. Layers kept on the host read 'CPU'.
    layer_devices: tuple[str, ...]
    buffers: tuple[BufferReport, ...]
    # the offload devices from 'llama_prepare_model_devices: using device X', in llama.cpp's order
    devices: tuple[str, ...]
    log: str = field(default="", repr=False)
    # 'llama_kv_cache: layer N: dev = X' (debug level): the device of each layer's KV cache,
    # '' for a layer that has no KV cache entry (e.g. recurrent layers)
    kv_layer_devices: tuple[str, ...] = ()
    # 'print_info: no_alloc = 1': a dry run. llama.cpp then logs 0.00 MiB for the model and KV
    # buffers (they are dummies), but real sizes for compute buffers and kv_total_bytes.
    dry_run: bool = False
    # sum of 'llama_kv_cache: size = X MiB' over the KV caches (real even in a dry run)
    kv_total_bytes: int = 0
    # (tensor, buffer type) of every tensor a tensor override placed (create_tensor, debug level)
    overridden: tuple[tuple[str, str], ...] = ()

    @property
    def n_layer(self) -> int:
        return len(self.layer_devices) - 1 if self.layer_devices else 0

    def layers_on(self, device: str) -> list[int]:
        """Layer indices (n_layer is the output layer) that llama.cpp assigned to a device."""
        return [i for i, d in enumerate(self.layer_devices) if d == device]

    def bytes_on(self, device: str, kind: str | None = None) -> int:
        """Bytes llama.cpp reported in buffers on a device, of one kind or (kind=None) all."""
        if kind is not None and kind not in BUFFER_KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(BUFFER_KINDS)}")
        return sum(b.n_bytes for b in self.buffers
                   if b.device == device and (kind is None or b.kind == kind))

    def kinds_by_device(self) -> dict[str, dict[str, int]]:
        """{device: {kind: bytes}}: the offload devices in llama.cpp's order, then the rest
        (the host 'CPU' last); only the kinds a device has buffers of."""
        order = list(self.devices)
        for b in self.buffers:
            if b.device not in order and b.device != "CPU":
                order.append(b.device)
        if any(b.device == "CPU" for b in self.buffers):
            order.append("CPU")
        out: dict[str, dict[str, int]] = {d: {} for d in order}
        for b in self.buffers:
            kinds = out[b.device]
            kinds[b.kind] = kinds.get(b.kind, 0) + b.n_bytes
        return out

    def to_dict(self) -> dict:
        """Plain JSON types, for the worker protocol and the results store."""
        return {"layer_devices": list(self.layer_devices), "buffers": [asdict(b) for b in self.buffers],
                "devices": list(self.devices), "log": self.log, "kv_layer_devices": list(self.kv_layer_devices),
                "dry_run": self.dry_run, "kv_total_bytes": self.kv_total_bytes,
                "overridden": [list(x) for x in self.overridden]}

    @classmethod
    def from_dict(cls, d: dict) -> LoadReport:
        return cls(layer_devices=tuple(d["layer_devices"]), buffers=tuple(BufferReport(**b) for b in d["buffers"]),
                   devices=tuple(d["devices"]), log=d.get("log", ""),
                   kv_layer_devices=tuple(d.get("kv_layer_devices", ())), dry_run=d.get("dry_run", False),
                   kv_total_bytes=d.get("kv_total_bytes", 0),
                   overridden=tuple(tuple(x) for x in d.get("overridden", ())))
