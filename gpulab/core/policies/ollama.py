"""The `ollama` policy: what today's Ollama makes llama-server load.

Read from Ollama v0.33.0-rc2 (commit fb30760996871fa9460115c753afd2c60d4ab0f7, 2026-08-21; the
placement code is the same in the last stable release v0.32.15, and has been since v0.30.0, where
commit 9db4bdbad "runner: Remove CGO engines, use llama-server exclusively for GGML models" made
Ollama launch upstream llama-server, LLAMA_CPP_VERSION b10488). For Ollama <= 0.12 see the
`ollama-spread` policy (gpulab.core.policies.apply).

Ollama no longer splits layers itself. It chooses which GPUs llama-server may see, passes a
context, a batch and (only when the user set them) -ngl and a main GPU, and leaves the rest to
llama-server, whose `common_params_fit` (-fit on, the default; gpulab.core.policies.server_fit) then chooses -ngl,
-ts and the MoE -ot rules with its default 1024 MiB margin per device. Step by step:

1. Context (server/routes.go `Serve`, `modelOptionsWithEmbeddingBatchDefault`, `usesAutomaticNumCtx`;
   api/types.go `DefaultOptions`): num_ctx from the request or Modelfile, else OLLAMA_CONTEXT_LENGTH,
   else a tier of the total VRAM of all discovered GPUs (sum of TotalMemory - OLLAMA_GPU_OVERHEAD):
   >= 47 GiB 262144, >= 23 GiB 32768, else 4096. server/sched.go `getRunner` raises it to at least
   4; llm/server.go `NewLlamaServer` caps it at the model's training context. llm/llama_server.go
   `startLlamaServer` passes `-c num_ctx*num_parallel -np num_parallel` (OLLAMA_NUM_PARALLEL,
   default 1): an explicit context, so fit never shrinks it.
2. A size guess (llm/llama_server.go `PredictServerVRAM`): the model file's size plus an f16 KV cache
   2 * block_count * head_count_kv(min) * (embedding_length / head_count(max)) * ctx * 2 bytes, ctx =
   the capped context * num_parallel (server/sched.go `effectiveLlamaServerContext`).
3. GPUs (server/sched.go `selectLlamaServerPlacement`), from the discovered GPUs in discovery order,
   grouped by library (ml/device.go `ByLibrary`); num_gpu 0 means no GPUs at all (sched.go
   `processPending`) and `-ngl 0`:
   - one GPU or none: used as they are;
   - main_gpu set: `bestExplicitMainGPU`, the main_gpu-th GPU of each library group, the best of
     them by `betterPlacementGPU` (discrete before integrated, then more free memory); if no group
     has that index, the best group is used and main_gpu is passed through (llama.cpp then refuses
     it: "invalid value for main_gpu");
   - else, unless OLLAMA_SCHED_SPREAD: `bestSingleGPUFit`, the GPU with the most free memory (same
     order, the first one wins a tie) among those where the guess is at most 80% of its free memory
     (`predicted > available*80/100` skips it);
   - else `bestGPUGroupByAvailableMemory`: the library group with the most free memory in total
     (a group with a discrete GPU before one without).
   A single chosen GPU is launched alone (ml/device.go `GetDevicesEnv` sets CUDA_VISIBLE_DEVICES and
   friends to it) with `--split-mode none --main-gpu 0` (`singleLlamaServerGPUPlacement`,
   llm/llama_server.go `appendMainGPUArgs`); a group is launched with only its GPUs visible.
4. Flags that change memory (llm/llama_server.go `startLlamaServer`): `-ngl N` only when num_gpu was
   set (N > 0; 0 is `-ngl 0`), never -ts or -ot; `--cache-type-k/-v` from OLLAMA_KV_CACHE_TYPE;
   `--flash-attn on|off|auto` (`LlamaServerFlashAttention`: OLLAMA_FLASH_ATTENTION, else auto where
   ml/device.go `FlashAttentionSupported`); `-b N -ub N` (`appendBatchArgs`), N = num_batch, or
   automatically (server/sched.go `automaticGenerationBatch`): 2048 above 32768 tokens, 1024 above
   4096, else 512, stepped down while `generationBatchFits` fails (guess + 2 GiB / 768 MiB surcharge
   within 80% of the chosen GPUs' free memory, and the guess within 60% / 75% of it); with flash
   attention off on CUDA: 512, or 256 above 4096 tokens on a CUDA GPU with <= 8 GiB.
5. A vision projector (since v0.31.2; llm/llama_server.go `appendMMProjArgs`,
   `shouldDisableMMProjOffload`, `extraEnvsForStart`): offloaded unless num_gpu is 0, -ngl is a partial
   offload or a chosen GPU has less than projector + 1 GiB; when offloaded, LLAMA_ARG_FIT_TARGET
   (fit's margin, -fitt) becomes ceil((projector + 1 GiB) / MiB) unless the user's environment already sets it.

What gpulab assumes where it cannot know: devices of kind gpu, igpu and rpc are Ollama's GPUs (rpc
so the policy can be tried on RPC test devices; Ollama itself never passes --rpc), their library is
their name less the index (CUDA0 -> CUDA, SIM0 -> SIM); every GPU supports flash attention
(compute capability is not in gpulab's device model); the model file's size is the profile's
file_bytes, or its weight bytes for a hand-built profile; the host's free memory does not limit
integrated GPUs (`availableMemoryForGPU`). Not modelled: other loaded models (eviction, `updateFreeSpace`),
the retry with a smaller automatic context after a crash (`reduceAutoNumCtxForLoadOOM`), embedding
models (-ub = -b = num_batch capped at the context), MLX models, and the projector's own bytes in
the plan (only its effect on the fit margin).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import SplitConfig
from ..devices import Device
from ..errors import ConfigError
from ..profile import ModelProfile
from ..units import GiB, MiB
from .server_fit import FitResult, server_fit

__all__ = ["OllamaSettings", "OllamaLaunch", "ollama", "default_num_ctx", "predict_server_vram",
           "select_placement", "automatic_batch"]

# server/routes.go Serve: VRAM tiers (47/23 GiB "to account for small differences")
_CTX_TIERS = ((47 * GiB, 262144), (23 * GiB, 32768))
_CTX_SMALL = 4096
# server/sched.go: llamaServerGenerationBatch*
_BATCH_DEFAULT, _BATCH_CONSTRAINED, _BATCH_MEDIUM, _BATCH_LARGE = 512, 256, 1024, 2048
_MMPROJ_HEADROOM = GiB   # llm/llama_server.go mmprojOffloadHeadroom
_GPU_KINDS = ("gpu", "igpu", "rpc")


@dataclass(frozen=True)
class OllamaSettings:
    """What an Ollama user can set that changes placement (request/Modelfile options, OLLAMA_* env)."""
    num_ctx: int | None = None           # option num_ctx; None: automatic (OLLAMA_CONTEXT_LENGTH or VRAM tier)
    num_gpu: int = -1                    # option num_gpu: -1 let llama-server fit, 0 CPU only, N: -ngl N
    main_gpu: int | None = None          # option main_gpu: one GPU, --split-mode none
    num_batch: int | None = None         # option num_batch; None: automatic
    num_parallel: int = 1                # OLLAMA_NUM_PARALLEL
    sched_spread: bool = False           # OLLAMA_SCHED_SPREAD: never a single GPU
    context_length: int = 0              # OLLAMA_CONTEXT_LENGTH (0: the VRAM tier)
    gpu_overhead: int = 0                # OLLAMA_GPU_OVERHEAD, bytes per GPU (only in the VRAM tier)
    kv_cache_type: str = ""              # OLLAMA_KV_CACHE_TYPE ('' f16)
    flash_attention: bool | None = None  # OLLAMA_FLASH_ATTENTION; None: auto
    fit_target_mib: int | None = None    # LLAMA_ARG_FIT_TARGET inherited from Ollama's environment
    mmproj_bytes: int = 0                # a vision projector's memory (0: none)

    def __post_init__(self) -> None:
        if self.num_parallel < 1:
            raise ConfigError(f"OLLAMA_NUM_PARALLEL must be at least 1, got {self.num_parallel}")
        if self.num_gpu < -1:
            raise ConfigError(f"num_gpu must be -1 (automatic), 0 or a layer count, got {self.num_gpu}")
        if self.num_ctx is not None and self.num_ctx < 0:
            raise ConfigError(f"num_ctx must be >= 0, got {self.num_ctx}")
        if self.num_batch is not None and self.num_batch < 1:
            raise ConfigError(f"num_batch must be at least 1, got {self.num_batch}")
        if min(self.context_length, self.gpu_overhead, self.mmproj_bytes, self.fit_target_mib or 0) < 0:
            raise ConfigError("OLLAMA_CONTEXT_LENGTH, OLLAMA_GPU_OVERHEAD, LLAMA_ARG_FIT_TARGET and the "
                              "projector size must be >= 0")


@dataclass(frozen=True)
class OllamaLaunch:
    """What Ollama starts: `launch` is the llama-server command line as gpulab settings, `config`
    what llama-server loads after its fit (the policy's answer)."""
    config: SplitConfig
    launch: SplitConfig
    fit: FitResult
    gpus: tuple[str, ...]            # the GPUs Ollama lets llama-server see, in order
    args: tuple[str, ...]            # Ollama's placement flags, as it passes them
    env: tuple[tuple[str, str], ...]  # environment Ollama sets that matters here (LLAMA_ARG_FIT_TARGET)
    predicted_bytes: int             # PredictServerVRAM's guess
    reasons: tuple[str, ...]


def library(device: Device) -> str:
    """The GPU library Ollama groups by (ml/device.go ByLibrary), from llama.cpp's device name."""
    lib = re.sub(r"\d+$", "", device.name)
    return "Metal" if lib == "MTL" else lib


def _by_library(gpus: list[Device]) -> list[list[Device]]:
    # ml/device.go ByLibrary: groups in order of each library's first GPU, GPUs in discovery order
    groups: dict[str, list[Device]] = {}
    for d in gpus:
        groups.setdefault(library(d), []).append(d)
    return list(groups.values())


def default_num_ctx(gpus: list[Device], gpu_overhead: int = 0) -> int:
    """server/routes.go Serve: the VRAM-based default context over every discovered GPU."""
    total = sum(max(d.total_bytes - gpu_overhead, 0) for d in gpus)
    return next((ctx for floor, ctx in _CTX_TIERS if total >= floor), _CTX_SMALL)


def predict_server_vram(profile: ModelProfile, n_ctx: int) -> int:
    """llm/llama_server.go PredictServerVRAM: file size + an f16 KV cache, nothing for compute."""
    weights = profile.file_bytes or profile.weights_bytes
    kv_heads = min((layer.n_head_kv for layer in profile.layers), default=0) or 1   # HeadCountKVMin
    heads = max((layer.n_head for layer in profile.layers), default=0)               # HeadCountMax
    head_dim = profile.n_embd // heads if heads > 0 else 0
    return weights + 2 * profile.n_layer * kv_heads * head_dim * n_ctx * 2


def _better_gpu(cand: Device, cand_free: int, cur: Device, cur_free: int) -> bool:
    # server/sched.go betterPlacementGPU
    if (cand.kind == "igpu") != (cur.kind == "igpu"):
        return cand.kind != "igpu"
    return cand_free > cur_free


def _best_group(groups: list[list[Device]]) -> list[Device]:
    # server/sched.go bestGPUGroupByAvailableMemory / betterPlacementGroup / availableMemoryForLoad
    best: list[Device] = []
    best_free = 0
    for group in groups:
        free = sum(d.free_bytes for d in group)
        discrete, best_discrete = any(d.kind != "igpu" for d in group), any(d.kind != "igpu" for d in best)
        if not best or (discrete != best_discrete and discrete) or (discrete == best_discrete and free > best_free):
            best, best_free = group, free
    return best


def select_placement(gpus: list[Device], predicted: int, settings: OllamaSettings
                     ) -> tuple[list[Device], int | None, str]:
    """server/sched.go selectLlamaServerPlacement: (the GPUs llama-server sees, the --main-gpu
    Ollama passes with --split-mode none or None, why)."""
    if len(gpus) <= 1 or settings.num_gpu == 0:
        return list(gpus), settings.main_gpu, "one GPU or none: used as it is"
    groups = _by_library(gpus)
    if settings.main_gpu is not None:
        # bestExplicitMainGPU
        best = None
        if settings.main_gpu >= 0:
            for group in groups:
                if settings.main_gpu < len(group):
                    cand = group[settings.main_gpu]
                    if best is None or _better_gpu(cand, cand.free_bytes, best, best.free_bytes):
                        best = cand
        if best is None:
            return _best_group(groups), settings.main_gpu, (
                f"main_gpu {settings.main_gpu} is outside every GPU group: the group with the most free "
                "memory, main_gpu passed through")
        return [best], 0, f"main_gpu {settings.main_gpu}: {best.name} alone (bestExplicitMainGPU)"
    if not settings.sched_spread and predicted > 0:
        # bestSingleGPUFit: the guess within 80% of one GPU's free memory
        best = None
        for group in groups:
            for cand in group:
                if predicted > cand.free_bytes * 80 // 100:
                    continue
                if best is None or _better_gpu(cand, cand.free_bytes, best, best.free_bytes):
                    best = cand
        if best is not None:
            return [best], 0, (f"bestSingleGPUFit: {best.name} alone, the guess {predicted / MiB:.0f} MiB is "
                               f"within 80% of its {best.free_bytes / MiB:.0f} MiB free")
    why = "OLLAMA_SCHED_SPREAD" if settings.sched_spread else "no single GPU holds the guess in 80% of its free memory"
    group = _best_group(groups)
    return group, None, f"{why}: every {library(group[0])} GPU (bestGPUGroupByAvailableMemory)"


def automatic_batch(effective_ctx: int, predicted: int, available: int, flash_attn: str, gpus: list[Device]) -> int:
    """server/sched.go automaticGenerationBatch: -b and -ub for a completion model."""
    if flash_attn == "off" and any(library(d) == "CUDA" for d in gpus):
        # constrainedCUDAWithoutFlashAttention
        small = any(library(d) == "CUDA" and 0 < min(d.free_bytes or d.total_bytes, d.total_bytes) <= 8 * GiB
                    for d in gpus)
        return _BATCH_CONSTRAINED if effective_ctx > 4096 and small else _BATCH_DEFAULT
    batch = _BATCH_LARGE if effective_ctx > 32768 else _BATCH_MEDIUM if effective_ctx > 4096 else _BATCH_DEFAULT
    while batch > _BATCH_DEFAULT and not _batch_fits(batch, predicted, available):
        batch = _BATCH_MEDIUM if batch > _BATCH_MEDIUM else _BATCH_DEFAULT   # nextLowerGenerationBatch
    return batch


def _batch_fits(batch: int, predicted: int, available: int) -> bool:
    # server/sched.go generationBatchFits, generationBatchHasHeadroom, generationBatchSurcharge
    if predicted == 0 or available == 0:
        return True
    threshold = available * 80 // 100
    if predicted > threshold:
        return False
    headroom = 60 if batch >= _BATCH_LARGE else 75 if batch >= _BATCH_MEDIUM else 100
    if predicted > available * headroom // 100:
        return False
    surcharge = 2 * GiB if batch >= _BATCH_LARGE else 768 * MiB if batch >= _BATCH_MEDIUM else 0
    return surcharge <= threshold - predicted


def _mmproj_offloaded(s: OllamaSettings, profile: ModelProfile, gpus: list[Device]) -> bool:
    # llm/llama_server.go shouldDisableMMProjOffload (modelLayers = block_count + 1)
    if s.num_gpu == 0 or (s.num_gpu > 0 and s.num_gpu < profile.n_layer + 1):
        return False
    need = s.mmproj_bytes + _MMPROJ_HEADROOM
    for d in gpus:
        memory = d.total_bytes if d.free_bytes == 0 or d.total_bytes < d.free_bytes else d.free_bytes
        if 0 < memory < need:
            return False
    return True


def ollama(profile: ModelProfile, devices: list[Device], settings: OllamaSettings | None = None,
           host: Device | None = None) -> OllamaLaunch:
    """What Ollama (v0.30 to v0.33) launches for a first model on `devices`, and what llama-server's
    fit then loads. Other llama.cpp settings are llama-server's defaults: Ollama passes no others."""
    s = settings or OllamaSettings()
    gpus = [] if s.num_gpu == 0 else [d for d in devices if d.kind in _GPU_KINDS]   # sched.go processPending
    reasons = []
    num_ctx = s.num_ctx if s.num_ctx is not None else s.context_length or default_num_ctx(
        [d for d in devices if d.kind in _GPU_KINDS], s.gpu_overhead)
    num_ctx = max(num_ctx, 4)                                          # sched.go getRunner
    if profile.n_ctx_train > 0 and num_ctx > profile.n_ctx_train:      # llm/server.go NewLlamaServer
        reasons.append(f"NewLlamaServer: num_ctx {num_ctx} capped at the training context {profile.n_ctx_train}")
        num_ctx = profile.n_ctx_train
    n_ctx = num_ctx * s.num_parallel                         # startLlamaServer -c, effectiveLlamaServerContext
    predicted = predict_server_vram(profile, n_ctx)

    chosen, main_gpu, why = select_placement(gpus, predicted, s)
    reasons.append(f"selectLlamaServerPlacement: {why}")
    if main_gpu is not None and not 0 <= main_gpu < len(chosen):
        raise ConfigError(f"main_gpu {main_gpu}: Ollama passes it through to llama-server, which has "
                          f"{len(chosen)} GPU(s) visible and refuses it (invalid value for main_gpu)")

    if s.flash_attention is not None:                                  # LlamaServerFlashAttention
        flash_attn = "on" if s.flash_attention else "off"
    else:
        flash_attn = "auto"
    if s.num_batch is not None:
        batch = s.num_batch
    else:
        placed = [chosen[main_gpu]] if main_gpu is not None else chosen   # availableMemoryForPlacement
        batch = automatic_batch(n_ctx, predicted, sum(d.free_bytes for d in placed), flash_attn, chosen)

    env: list[tuple[str, str]] = []
    fit_target: tuple[int, ...] = ()
    if s.mmproj_bytes and _mmproj_offloaded(s, profile, chosen):       # extraEnvsForStart
        pad = -(-(s.mmproj_bytes + _MMPROJ_HEADROOM) // MiB)
        fit_target = (s.fit_target_mib if s.fit_target_mib is not None else pad,)
        reasons.append(f"projector offloaded: fit margin {fit_target[0]} MiB per device")
    elif s.fit_target_mib is not None:
        fit_target = (s.fit_target_mib,)
    if fit_target:
        env.append(("LLAMA_ARG_FIT_TARGET", str(fit_target[0])))

    kv = s.kv_cache_type.lower() or "f16"
    args = ["-c", str(n_ctx), "-np", str(s.num_parallel)]
    if s.kv_cache_type:
        args += ["--cache-type-k", kv, "--cache-type-v", kv]
    args += ["--flash-attn", flash_attn, "-b", str(batch), "-ub", str(batch)]
    if s.num_gpu >= 0:
        args += ["-ngl", str(s.num_gpu)]
    if main_gpu is not None:
        args += ["--split-mode", "none", "--main-gpu", str(main_gpu)]

    launch = SplitConfig(
        n_ctx=n_ctx, n_seq_max=s.num_parallel, n_batch=batch, n_ubatch=batch, type_k=kv, type_v=kv,
        flash_attn=flash_attn, n_gpu_layers=s.num_gpu if s.num_gpu >= 0 else -1,
        split_mode="none" if main_gpu is not None else "layer", main_gpu=main_gpu or 0,
        devices=tuple(d.name for d in chosen), fit_target=fit_target)
    fitted = server_fit(profile, devices, launch, host)
    reasons.extend(f"llama-server fit: {r}" for r in fitted.reasons)
    return OllamaLaunch(config=fitted.config, launch=launch, fit=fitted, gpus=tuple(d.name for d in chosen),
                        args=tuple(args), env=tuple(env), predicted_bytes=predicted, reasons=tuple(reasons))
