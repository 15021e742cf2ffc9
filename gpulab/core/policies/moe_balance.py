"""The moe-balance policy: -ts and -ot rules that fill every offload device evenly with a MoE model.

The problem it solves (llama.cpp#15136, #15263): with --n-cpu-moe N the experts of layers 0..N-1
go to the CPU, counted from layer 0 whatever device those layers are on. Those layers sit on the
first cards, so the first cards empty while the experts of the later layers all stay where their
layers are and pile up on the last card, which runs out of memory first.

What this policy does instead, in whole tensors:
1. -ts in proportion to what each device can hold (free memory less learned overhead), so the
   dense part of the layers (attention, norms, router, shared experts) and the KV cache, which
   stay with their layer whatever a rule says (llama_kv_cache ctor: model.dev_layer(il)), spread
   evenly; where that leaves too few experts on the devices to even them out (unequal cards with
   room to spare), a second try splits by what each should end up using;
2. the planner (the oracle throughout) plans every movable expert tensor on the CPU; what each
   device then has left is the room experts may take;
3. the expert bytes that fit go to the devices water-filled to one common headroom (all of them
   when they fit, else every device filled to its free memory and the rest to the CPU). Each
   device keeps the experts of its own last layers (its first layers' experts are the ones that
   leave, as -ncmoe would pick them); what it cannot keep goes to the device with the most room
   left, or to the CPU;
4. one -ot rule per destination and set of tensor kinds, e.g. blk\\.(3|4)\\.ffn_(gate|up)_exps=RPC2,
   which llama.cpp applies in create_tensor's buft_for_tensor (first match wins; the layer does
   not move, only those tensors, and the FFN op runs where they are);
5. the plan of those rules is checked against the assumption (compute buffers follow the FFN)
   and the room corrected, a few rounds, keeping the best: fits, then least on the CPU, then
   the smallest spread.

Movable experts are those of layers on an offload device; -ngl still decides which layers are
on the CPU (and with them their experts). The policy writes every expert rule itself, so a
config that already has -ot, -cmoe or -ncmoe is refused rather than silently rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SplitConfig
from ..devices import HOST_NAME, Device
from ..errors import ConfigError
from ..overrides import FFN_EXPS_REGEX
from ..placement.plan import Plan
from ..placement.planner import plan, select_devices
from ..profile import ModelProfile

__all__ = ["MoeBalance", "moe_balance", "spread_bytes", "expert_bytes_on"]

_ROUNDS = 5


@dataclass(frozen=True)
class MoeBalance:
    config: SplitConfig          # the input config with -ts and the -ot rules written
    plan: Plan                   # its plan
    cpu_expert_bytes: int        # expert bytes the rules send to the CPU
    spread_bytes: int            # fullest minus emptiest offload device (free memory left)


@dataclass(frozen=True)
class _Unit:
    """One expert tensor kind of one layer (its weight and bias together): what moves."""
    layer: int
    kind: str                    # 'ffn_gate_exps', 'ffn_down_exps', ...
    n_bytes: int
    home: str                    # the device its layer is on


def spread_bytes(p: Plan) -> int:
    """Fullest minus emptiest offload device, as free memory left after the plan (on equal
    devices: the most used minus the least used)."""
    left = [d.free_bytes - d.used_bytes for d in p.offload_devices]
    return max(left) - min(left) if left else 0


def expert_bytes_on(p: Plan, device: str) -> int:
    return next((d.expert_bytes for d in p.devices if d.name == device), 0)


def _units(profile: ModelProfile, layer_devices: tuple[str, ...]) -> list[_Unit]:
    out: list[_Unit] = []
    for layer in profile.layers:
        home = layer_devices[layer.index]
        if home == HOST_NAME:
            continue
        kinds: dict[str, int] = {}
        for t in layer.tensors:
            if t.is_expert:
                kind = t.name.split(".")[2]          # blk.<i>.<kind>.weight|bias
                kinds[kind] = kinds.get(kind, 0) + t.n_bytes
        out.extend(_Unit(layer.index, k, n, home) for k, n in kinds.items())
    return out


def _water_fill(room: dict[str, int], amount: int) -> dict[str, float]:
    """Targets that take `amount` in all and leave every device the same headroom (a device with
    less room than that takes nothing)."""
    active = [d for d in room if room[d] > 0]
    while active:
        c = (sum(room[d] for d in active) - amount) / len(active)
        if all(room[d] - c > 0 for d in active):
            return {d: (room[d] - c if d in active else 0.0) for d in room}
        active = [d for d in active if room[d] - c > 0]
    return dict.fromkeys(room, 0.0)


def _assign(units: list[_Unit], room: dict[str, int], cpu_at_least: int) -> dict[_Unit, str]:
    """Each unit's device: targets by water-filling, never over a device's room (whole tensors)."""
    total = sum(u.n_bytes for u in units)
    on_gpus = max(0, min(total - cpu_at_least, sum(max(r, 0) for r in room.values())))
    target = _water_fill(room, on_gpus)
    fill = dict.fromkeys(room, 0)
    where: dict[_Unit, str] = {}

    def takes(dev: str, u: _Unit) -> bool:
        # within the device's room, and closer to its target with the unit than without
        after = fill[dev] + u.n_bytes
        return after <= room[dev] and abs(after - target[dev]) < abs(fill[dev] - target[dev])

    spilled: list[_Unit] = []
    for dev in room:
        mine = [u for u in units if u.home == dev]
        for u in reversed(mine):                 # the device's last layers keep their experts
            if takes(dev, u):
                where[u] = dev
                fill[dev] += u.n_bytes
            else:
                spilled.append(u)
    spilled.sort(key=lambda u: (u.layer, u.kind))
    owed_cpu = total - on_gpus          # what must go to the CPU (whole tensors: about that much)
    for u in spilled:
        dev = max(room, key=lambda d: target[d] - fill[d])
        if owed_cpu > 0 and not takes(dev, u):
            where[u] = HOST_NAME
            owed_cpu -= u.n_bytes
            continue
        fits = [d for d in room if fill[d] + u.n_bytes <= room[d]]
        if fits:
            dev = dev if dev in fits else max(fits, key=lambda d: target[d] - fill[d])
            where[u] = dev
            fill[dev] += u.n_bytes
        else:
            where[u] = HOST_NAME
            owed_cpu -= u.n_bytes
    return where


def _rules(where: dict[_Unit, str]) -> tuple[str, ...]:
    """-ot items for the units not at home: one per (destination, kinds of a layer), layers merged."""
    moved: dict[tuple[str, int], list[str]] = {}
    for u, dev in where.items():
        if dev != u.home:
            moved.setdefault((dev, u.layer), []).append(u.kind)
    groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for (dev, layer), kinds in sorted(moved.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        groups.setdefault((dev, tuple(sorted(kinds))), []).append(layer)
    items = []
    for (dev, group_kinds), layers in groups.items():
        blk = str(layers[0]) if len(layers) == 1 else "(" + "|".join(map(str, layers)) + ")"
        kind = group_kinds[0] if len(group_kinds) == 1 else "(" + "|".join(group_kinds) + ")"
        # '\.' after the kind: ffn_up_exps must not take ffn_up_exps_b... of another kind
        items.append(rf"blk\.{blk}\.{kind}\.={dev}")
    return tuple(items)


def moe_balance(profile: ModelProfile, devices: list[Device], config: SplitConfig | None = None,
                host: Device | None = None, *, cpu_expert_bytes_at_least: int = 0) -> MoeBalance:
    """-ts and -ot rules that place a MoE model's experts so every offload device is equally full.

    cpu_expert_bytes_at_least: keep at least this many expert bytes on the CPU (to compare with
    --n-cpu-moe at the same CPU share); by default only what does not fit goes there."""
    config = config or SplitConfig()
    if not profile.is_moe:
        raise ConfigError(f"moe-balance places expert tensors, and {profile.name or profile.arch} has none; "
                          "use --policy balanced")
    if config.tensor_overrides or config.cpu_moe or config.n_cpu_moe:
        raise ConfigError("moe-balance writes the expert rules itself; drop -ot, -cmoe and -ncmoe "
                          "(or plan them without --policy)")
    if config.split_mode != "layer":
        raise ConfigError(f"moe-balance balances a layer split; -sm {config.split_mode} places no layers by -ts")
    used = select_devices(devices, config.replace(tensor_split=()))
    if not used:
        raise ConfigError("moe-balance needs at least one offload device")
    capacity: list[float] = [max(d.free_bytes - d.overhead_bytes, 1) for d in used]
    best = _balance_for_split(profile, devices, config, host, capacity, cpu_expert_bytes_at_least)
    # -ts by capacity spreads the dense part (and KV) as the memory; when the experts left on the
    # devices are too few to even out what that leaves, split by what each device should end up
    # using instead (capacity less the common headroom the first try left)
    unit = max((u.n_bytes for u in _units(profile, best.plan.layer_devices)), default=0)
    tried = best
    for _ in range(3):
        left = [d.free_bytes - d.used_bytes for d in tried.plan.offload_devices]
        headroom = sum(left) / len(left)
        if headroom <= 0 or best.spread_bytes <= unit:
            break
        weights = [max(c - headroom + (x - headroom), 1) for c, x in zip(capacity, left)]
        tried = _balance_for_split(profile, devices, config, host, weights, cpu_expert_bytes_at_least)
        if _better(tried, best):
            best = tried
    return best


def _balance_for_split(profile: ModelProfile, devices: list[Device], config: SplitConfig, host: Device | None,
                       weights: list[float], cpu_expert_bytes_at_least: int) -> MoeBalance:
    """The best placement of the experts with -ts in proportion to `weights`."""
    top = max(weights)
    base = config.replace(tensor_split=tuple(round(x / top, 4) for x in weights))
    all_cpu = plan(profile, devices, base.replace(tensor_overrides=(rf"{FFN_EXPS_REGEX}=CPU",)), host)
    units = _units(profile, all_cpu.layer_devices)
    left0 = {d.name: d.free_bytes - d.used_bytes for d in all_cpu.offload_devices}
    room = dict(left0)

    best: MoeBalance | None = None
    for _ in range(_ROUNDS):
        where = _assign(units, room, cpu_expert_bytes_at_least)
        cfg = base.replace(tensor_overrides=_rules(where))
        p = plan(profile, devices, cfg, host)
        on_cpu = sum(u.n_bytes for u, dev in where.items() if dev == HOST_NAME)
        got = MoeBalance(cfg, p, on_cpu, spread_bytes(p))
        if best is None or _better(got, best):
            best = got
        # what the plan uses beyond the assumption (compute buffers grow where an FFN runs): less
        # room, learned from a round where the device held experts (one where it held none says nothing)
        fill = {d: sum(u.n_bytes for u, w in where.items() if w == d) for d in room}
        new_room = dict(room)
        for d in p.offload_devices:
            if fill[d.name]:
                new_room[d.name] = left0[d.name] - ((left0[d.name] - fill[d.name]) - (d.free_bytes - d.used_bytes))
        if new_room == room:
            break
        room = new_room
    assert best is not None   # _ROUNDS >= 1: the first round sets it
    return best


def _better(a: MoeBalance, b: MoeBalance) -> bool:
    return (not a.plan.fits, a.cpu_expert_bytes, a.spread_bytes) < (not b.plan.fits, b.cpu_expert_bytes,
                                                                    b.spread_bytes)
