"""The split optimiser: find the fastest configuration of a grid with few loads.

    tuner = Tuner(profile, devices, grid.configs(base), objective="tg", host=host)
    while (c := tuner.suggest()) is not None and tuner.loads < budget:
        run = measure(c)                                  # one load of the model
        tuner.observe(c, pp_ts=run.pp.avg_ts, tg_ts=run.tg.avg_ts)
    tuner.best()                                          # (config, measured tokens/s)

1. Prune with the planner: configs that do not fit are dropped, and configs llama.cpp would
   place identically (same device for every layer, same other settings: -ts 1,1 and 2,2, or
   any -ts with -ngl 0) are measured once.
2. Model speed. In layer split the devices work one after the other, so the time per token is
   a sum over devices: t = sum_d a_d * load_d + sum_d h_d * [d holds layers] + c, with load_d
   what gpulab.core.measure.speed counts for device d under this placement (bytes read per generated
   token; FLOPs per prompt token), a_d the device's seconds per byte (1 / bandwidth) or per
   FLOP, h_d a per-device cost (RPC round trips, launches) and c the rest. Settings that do not
   move layers (-fa, -ub, -ctk...) scale the time: a term e_v * t_placement(config) per value,
   t_placement being the model's current estimate of the sum above. Separate models for pp
   (seconds per prompt token) and tg.
3. Refine with measurements: the coefficients are a Bayesian linear regression whose prior
   means are gpulab.core.measure.speed's device speeds (a calibrated SpeedModel where given, else its
   defaults and the devices' bandwidths); each measurement updates it, and the next config to
   load is the one with the lowest optimistic time (mean - kappa * sd) among those not
   measured, until no unmeasured config can plausibly beat the best measured one by more than
   `tolerance`, or the budget is spent.
The answer is always a measured config: the measured one the posterior rates fastest.

Pure numpy and the planner: the measuring is the caller's (gpulab.commands.tune).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..config import SplitConfig
from ..devices import HOST_NAME, Device
from ..errors import ConfigError, GpulabError
from ..placement.planner import plan
from ..profile import ModelProfile
from .speed import DEFAULT_HOST, SpeedModel, per_device_load

__all__ = ["Tuner", "Candidate", "OBJECTIVES", "objective_value", "run_tuner", "default_grid_args"]

OBJECTIVES = ("tg", "pp", "mixed")
_PLACEMENT = ("n_gpu_layers", "tensor_split", "devices", "main_gpu", "split_mode")   # decided by the plan

def objective_value(objective: str, pp_ts: float | None, tg_ts: float | None, n_prompt: int, n_gen: int) -> float:
    """Tokens/s to maximise: tg, pp, or 'mixed': (n_prompt + n_gen) tokens over the time to
    read a prompt of n_prompt and generate n_gen."""
    if objective == "tg":
        return float(tg_ts or 0.0)
    if objective == "pp":
        return float(pp_ts or 0.0)
    if not pp_ts or not tg_ts:
        return 0.0
    return (n_prompt + n_gen) / (n_prompt / pp_ts + n_gen / tg_ts)


@dataclass
class Candidate:
    config: SplitConfig
    signature: tuple                       # equal signatures: llama.cpp does the same thing
    load: dict                             # 'tg': device -> bytes read per token; 'pp': device -> FLOPs per token
    twins: list = field(default_factory=list)   # other configs of the grid with this signature
    pp_ts: float | None = None
    tg_ts: float | None = None
    measured: bool = False


class _Model:
    """Bayesian linear regression of seconds per token on candidate features.

    Features: bytes per device, a device-used indicator per device, an intercept (the
    placement part, `n_base` columns), then per setting value an indicator times the
    placement time of the candidate. That last product uses the model's own current estimate
    of the placement time, so the fit alternates: fit, update those columns, fit again."""

    def __init__(self, base: np.ndarray, indicators: np.ndarray, t_place0: np.ndarray, m0: np.ndarray,
                 sd0: np.ndarray, noise_rel: float):
        self.base, self.ind, self.n_base = base, indicators, base.shape[1]
        self.t_place0 = t_place0
        self.X = self._design(t_place0)
        self.m0, self.P0 = m0, np.diag(1.0 / np.maximum(sd0, 1e-30) ** 2)
        self.noise_rel = noise_rel
        self.obs: list[tuple[int, float]] = []
        self.m, self.S = m0.copy(), np.diag(sd0 ** 2)

    def _design(self, t_place: np.ndarray) -> np.ndarray:
        return np.hstack([self.base, self.ind * t_place[:, None]])

    def _fit(self) -> None:
        idx = [i for i, _ in self.obs]
        X, y = self.X[idx], np.array([y for _, y in self.obs])
        lam = 1.0 / (self.noise_rel * y) ** 2
        A = self.P0 + (X.T * lam) @ X
        self.S = np.linalg.inv(A)
        self.m = self.S @ (self.P0 @ self.m0 + (X.T * lam) @ y)

    def observe(self, i: int, y: float) -> None:
        self.obs.append((i, y))
        for _ in range(3):
            self._fit()
            if not self.ind.shape[1]:
                break
            t_place = self.base @ self.m[:self.n_base]
            self.X = self._design(np.maximum(t_place, 0.1 * self.t_place0))

    def predict(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.X @ self.m
        var = np.einsum("ij,jk,ik->i", self.X, self.S, self.X)
        return mu, np.sqrt(np.maximum(var, 0.0))


class Tuner:
    """Chooses which configs of a grid to load; see the module docstring."""

    def __init__(self, profile: ModelProfile, devices: Sequence[Device], configs: Sequence[SplitConfig], *,
                 objective: str = "tg", host: Device | None = None, n_prompt: int = 512, n_gen: int = 128,
                 kappa: float = 2.0, tolerance: float = 0.01, noise: float = 0.10, prior_spread: float = 1.0,
                 speed_model: SpeedModel | None = None, fits=None):
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
        self.objective, self.n_prompt, self.n_gen = objective, n_prompt, n_gen
        self.kappa, self.tolerance, self.prior_spread = kappa, tolerance, prior_spread
        self.speed_model = speed_model or SpeedModel()
        self.pruned: list[tuple[SplitConfig, str]] = []
        self.candidates: list[Candidate] = []
        self.loads = 0
        by_sig: dict[tuple, Candidate] = {}
        for c in configs:
            try:
                p = plan(profile, list(devices), c, host)
            except GpulabError as e:
                self.pruned.append((c, str(e)))
                continue
            why = "" if p.fits else "does not fit: " + "; ".join(p.deficits())
            if not why and fits is not None:
                why = fits(c)     # e.g. a llama.cpp dry run
            if why:
                self.pruned.append((c, why))
                continue
            others = tuple((a, getattr(c, a)) for a in c.__dataclass_fields__ if a not in _PLACEMENT)
            # -sm tensor: every -ts puts the layers on Meta(); what differs is each member's slices
            cut = (p.tensor_parallel.weights, p.tensor_parallel.kv) if p.tensor_parallel is not None else None
            sig = (p.layer_devices, others, p.config.offload_kqv, cut)
            if sig in by_sig:
                by_sig[sig].twins.append(c)
                continue
            # what each device does per token, as gpulab.core.measure.speed counts it (the token embeddings
            # are looked up a row at a time, the output layer is read for every token)
            weights, flops, kv = per_device_load(p, max(1, n_gen // 2))
            load = {"tg": {n: weights[n] + kv[n] for n in weights}, "pp": dict(flops)}
            by_sig[sig] = cand = Candidate(c, sig, load)
            self.candidates.append(cand)
        if not self.candidates:
            raise ConfigError("no configuration of the grid fits: " +
                              "; ".join(f"{why}" for _, why in self.pruned[:3]))
        kinds = {d.name: d for d in devices}
        self._names = sorted({n for c in self.candidates for n, v in c.load["tg"].items() if v})
        if HOST_NAME in self._names:   # the host last, as in plans
            self._names = [n for n in self._names if n != HOST_NAME] + [HOST_NAME]
        host_dev = host or Device(HOST_NAME, 0, 0, "host", "cpu")
        self._devs = [kinds.get(n, host_dev) if n != HOST_NAME else host_dev for n in self._names]
        self._effects = self._effect_keys()
        self._models = {kind: self._model(kind, noise) for kind in ("pp", "tg")}

    # -- features ---------------------------------------------------------------------------------
    def _effect_keys(self) -> list[tuple[str, object]]:
        values: dict[str, set] = {}
        for cand in self.candidates:
            for a, v in cand.signature[1]:
                values.setdefault(a, set()).add(v)
        # one indicator per value beyond the first, for settings the grid varies
        return [(a, v) for a, vs in sorted(values.items()) if len(vs) > 1
                for v in sorted(vs, key=repr)[1:]]

    def _speed(self, d: Device):
        """The prior speed of a device: gpulab.core.measure.speed's model (calibrated where the caller
        passes a calibrated SpeedModel), from the device's bandwidth where known. An RPC server
        that says nothing is taken for a host CPU (what gpulab's own RPC servers serve)."""
        sm = self.speed_model
        if d.name in sm.devices or d.name == HOST_NAME or d.bandwidth_bytes_per_s:
            return sm.of(d.name, d.bandwidth_bytes_per_s)
        return DEFAULT_HOST if d.kind == "rpc" else sm.of(d.name)

    def _seconds_per_unit(self, kind: str) -> np.ndarray:
        """Seconds per byte read (tg: memory-bound) or per FLOP (pp: compute-bound), per device."""
        sp = [self._speed(d) for d in self._devs]
        return np.array([1.0 / (x.bandwidth_bytes_per_s if kind == "tg" else x.flops_per_s) for x in sp])

    def _model(self, kind: str, noise: float) -> _Model:
        scale = 1e9 if kind == "tg" else 1e12          # GB, TFLOP: coefficients of order 1
        a0 = self._seconds_per_unit(kind) * scale
        n = len(self._names)
        base: list[np.ndarray] = []
        ind: list[list[float]] = []
        times: list[float] = []
        for cand in self.candidates:
            b = np.array([cand.load[kind].get(nm, 0) for nm in self._names], dtype=float) / scale
            used = np.array([cand.load["tg"].get(nm, 0) > 0 for nm in self._names], dtype=float)
            times.append(float(a0 @ b))
            # hops and intercept in ms
            base.append(np.concatenate([b, used * 1e-3, [1e-3]]))
            vals = dict(cand.signature[1])
            ind.append([1.0 if vals.get(a) == v else 0.0 for a, v in self._effects])
        t0 = np.array(times)
        t_ms = max(float(np.median(t0)), 1e-9) / 1e-3
        m0 = np.concatenate([a0, np.zeros(n), [0.0], np.zeros(len(self._effects))])
        sd = np.concatenate([a0 * self.prior_spread,            # speed: off by ~this factor
                             np.full(n, 0.25 * t_ms),           # a hop: a fraction of a token's time
                             [0.25 * t_ms],
                             np.full(len(self._effects), 0.25)])  # a setting may change time by ~25%
        return _Model(np.array(base), np.array(ind).reshape(len(base), len(self._effects)), t0, m0, sd, noise)

    # -- the loop -----------------------------------------------------------------------------------
    def _objective_time(self) -> tuple[np.ndarray, np.ndarray]:
        """Predicted seconds for the objective's workload per candidate (mean, sd)."""
        mp, sp = self._models["pp"].predict()
        mg, sg = self._models["tg"].predict()
        wp, wg = {"tg": (0.0, 1.0), "pp": (1.0, 0.0), "mixed": (self.n_prompt, self.n_gen)}[self.objective]
        return wp * mp + wg * mg, np.sqrt((wp * sp) ** 2 + (wg * sg) ** 2)

    def _measured_time(self, cand: Candidate) -> float:
        v = objective_value(self.objective, cand.pp_ts, cand.tg_ts, self.n_prompt, self.n_gen)
        if v <= 0:
            return math.inf
        return {"tg": 1.0, "pp": 1.0, "mixed": self.n_prompt + self.n_gen}[self.objective] / v

    def predictions(self) -> list[tuple[SplitConfig, float, float]]:
        """(config, predicted objective tokens/s, optimistic tokens/s) for every candidate."""
        mu, sd = self._objective_time()
        scale = {"tg": 1.0, "pp": 1.0, "mixed": self.n_prompt + self.n_gen}[self.objective]
        return [(c.config, scale / max(m, 1e-12), scale / max(m - self.kappa * s, 1e-12))
                for c, m, s in zip(self.candidates, mu, sd)]

    def suggest(self) -> SplitConfig | None:
        """The next config to load, or None when none can plausibly beat the best measured."""
        open_ = [i for i, c in enumerate(self.candidates) if not c.measured]
        if not open_:
            return None
        mu, sd = self._objective_time()
        lcb = mu - self.kappa * sd
        i = min(open_, key=lambda k: lcb[k])
        best = self.best_time()
        if best < math.inf and lcb[i] >= best * (1.0 - self.tolerance):
            return None
        return self.candidates[i].config

    def _find(self, config: SplitConfig) -> Candidate:
        for c in self.candidates:
            if c.config == config or config in c.twins:
                return c
        raise ConfigError(f"{config} is not one of the tuner's candidates")

    def observe(self, config: SplitConfig, *, pp_ts: float | None, tg_ts: float | None, load: bool = True) -> None:
        """A measurement of `config` (tokens/s); load=False when it came from the store."""
        cand = self._find(config)
        i = self.candidates.index(cand)
        cand.pp_ts, cand.tg_ts, cand.measured = pp_ts, tg_ts, True
        self.loads += int(load)
        if pp_ts:
            self._models["pp"].observe(i, 1.0 / pp_ts)
        if tg_ts:
            self._models["tg"].observe(i, 1.0 / tg_ts)

    def best_time(self) -> float:
        return min((self._measured_time(c) for c in self.candidates if c.measured), default=math.inf)

    def best(self) -> tuple[SplitConfig, float] | None:
        """(config, measured objective tokens/s) of the best measured candidate.

        "Best" by the model's posterior mean, which weighs each measurement against all the
        others: two configs a few percent apart trade places from one run to the next, and the
        posterior is less fooled by one lucky run than the raw maximum is."""
        done = [i for i, c in enumerate(self.candidates) if c.measured and self._measured_time(c) < math.inf]
        if not done:
            return None
        mu, _ = self._objective_time()
        c = self.candidates[min(done, key=lambda i: mu[i])]
        return c.config, objective_value(self.objective, c.pp_ts, c.tg_ts, self.n_prompt, self.n_gen)


def run_tuner(tuner: Tuner, measure, budget: int, *, on_step=None) -> tuple[SplitConfig, float] | None:
    """The loop: suggest, measure(config) -> (pp_ts, tg_ts, loaded: bool), observe; at most
    `budget` loads (measurements found in a store cost none)."""
    while tuner.loads < budget:
        c = tuner.suggest()
        if c is None:
            break
        pp_ts, tg_ts, loaded = measure(c)
        tuner.observe(c, pp_ts=pp_ts, tg_ts=tg_ts, load=loaded)
        if on_step is not None:
            on_step(c, pp_ts, tg_ts, loaded)
    return tuner.best()


def default_grid_args(profile: ModelProfile, devices: Sequence[Device]) -> list[str]:
    """llama-bench style grid flags for when `gpulab tune` is given none: every layer offloaded
    or three quarters, half, a quarter, none; the split by free memory, even, each device alone
    and, for two devices, 3:1 and 1:3."""
    n = profile.n_layer + 1
    ngl = sorted({-1, 3 * n // 4, n // 2, n // 4, 0}, key=lambda x: -x if x >= 0 else -10**9)
    args = ["-ngl", ",".join(map(str, ngl))]
    k = len([d for d in devices if d.is_offload])
    if k >= 2:
        splits = ["0", "/".join(["1"] * k)]
        splits += ["/".join("1" if j == i else "0" for j in range(k)) for i in range(k)]
        if k == 2:
            splits += ["3/1", "1/3"]
        args += ["-ts", ",".join(splits)]
    return args
