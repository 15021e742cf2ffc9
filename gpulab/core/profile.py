"""ModelProfile: what the planner needs to know of a GGUF, read without its weights."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

__all__ = ["TensorInfo", "LayerProfile", "ModelProfile"]


@dataclass(frozen=True)
class TensorInfo:
    name: str            # as in the GGUF: 'blk.3.attn_q.weight'
    ggml_type: str       # 'Q4_0', 'F16', ...
    shape: tuple[int, ...]  # ggml order (ne0 first)
    n_bytes: int
    offset: int = 0      # where its data starts in the file (llama_model_loader's weight->offs)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_expert(self) -> bool:
        # MoE expert tensors: ffn_{gate,up,down}_exps (and their fused/bias variants)
        return "_exps" in self.name


@dataclass(frozen=True)
class LayerProfile:
    """One repeating block `blk.N`; its KV geometry follows llama_hparams (per-layer arrays)."""

    index: int
    tensors: tuple[TensorInfo, ...]
    n_head: int
    n_head_kv: int
    n_embd_head_k: int
    n_embd_head_v: int
    is_swa: bool = False     # sliding-window attention layer (smaller KV cache)
    has_kv: bool = True      # False for layers without attention (recurrent, shared KV)
    # MLA (kv_lora_rank): llama.cpp caches the compressed K row only, no V (llama_kv_cache ctor: has_v = !is_mla)
    has_v: bool = True
    # recurrent state per cell (llama_memory_recurrent ctor: r_l and s_l rows, f32): elements of each; 0: none
    n_embd_r: int = 0
    n_embd_s: int = 0
    # a lightning indexer's key cache beside the KV cache (llama_kv_cache_dsa, llama_kv_cache_msa): a second
    # llama_kv_cache with one KV head of indexer_head_size K (and, without MLA, n_embd_head_v V); 0: none
    n_embd_k_idx: int = 0
    # an MTP (nextn) layer: llama.cpp creates its tensors with TENSOR_SKIP unless MTP is on, so they are
    # here, not in `tensors`; the layer still counts in -ngl/-ts placement (n_layer_all)
    is_nextn: bool = False
    mtp_tensors: tuple[TensorInfo, ...] = ()

    @cached_property  # the planner reads this for every layer on every slider move
    def weights_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def expert_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors if t.is_expert)

    @cached_property
    def n_embd_k_gqa(self) -> int:
        return self.n_embd_head_k * self.n_head_kv

    @cached_property
    def n_embd_v_gqa(self) -> int:
        return self.n_embd_head_v * self.n_head_kv

    @property
    def is_recurrent(self) -> bool:
        return self.n_embd_r + self.n_embd_s > 0


@dataclass(frozen=True)
class ModelProfile:
    path: str
    arch: str
    name: str
    file_bytes: int
    n_layer: int
    n_embd: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    layers: tuple[LayerProfile, ...]
    # tensors of llama.cpp's input layer (always on the CPU): token_embd, pos_embd, ...
    input_tensors: tuple[TensorInfo, ...]
    # tensors of the output layer (index n_layer): output_norm, output, ...
    output_tensors: tuple[TensorInfo, ...]
    # no `output.weight` in the file: llama.cpp duplicates token_embd as the output matrix
    tied_output: bool
    n_expert: int = 0
    n_expert_used: int = 0
    n_swa: int = 0           # sliding window size in tokens (0: none)
    file_type: str = ""      # 'Q4_1', 'MOSTLY_Q4_0', ... as the GGUF names it
    other_tensors: tuple[TensorInfo, ...] = ()   # not placed by the planner (e.g. rope_freqs)
    metadata: dict = field(default_factory=dict, compare=False, hash=False)  # scalar KV pairs
    n_nextn: int = 0         # {arch}.nextn_predict_layers: the last n_nextn layers are MTP heads
    # the arch's loader skips its MTP layers even with MTP on (no MTP graph yet in this llama.cpp)
    mtp_never_loaded: bool = False

    @property
    def n_layer_main(self) -> int:
        """llama_hparams::n_layer(): the layers the graph runs (the MTP layers excluded)."""
        return self.n_layer - self.n_nextn

    @property
    def mtp_weights_bytes(self) -> int:
        """Bytes of the MTP layers' tensors, which llama.cpp loads only with MTP on."""
        return sum(t.n_bytes for layer in self.layers for t in layer.mtp_tensors)

    @cached_property
    def trunk(self) -> ModelProfile:
        """This model as the graph sees it with MTP off: the nextn layers dropped (for the compute
        buffers: llm_build_* loops over n_layer(), then the output layer)."""
        if not self.n_nextn:
            return self
        from dataclasses import replace
        return replace(self, n_layer=self.n_layer_main, layers=self.layers[:self.n_layer_main], n_nextn=0)

    @property
    def output_layer(self) -> int:
        """llama.cpp numbers the output layer n_layer: the first to be offloaded."""
        return self.n_layer

    @property
    def token_embd(self) -> TensorInfo | None:
        return next((t for t in self.input_tensors if t.name == "token_embd.weight"), None)

    @property
    def output_weights_bytes(self) -> int:
        """Bytes of the output layer, including the duplicated token_embd when tied."""
        own = sum(t.n_bytes for t in self.output_tensors)
        emb = self.token_embd
        return own + (emb.n_bytes if self.tied_output and emb is not None else 0)

    @property
    def input_weights_bytes(self) -> int:
        return sum(t.n_bytes for t in self.input_tensors)

    @property
    def weights_bytes(self) -> int:
        return sum(layer.weights_bytes for layer in self.layers) + sum(
            t.n_bytes for t in self.input_tensors + self.output_tensors + self.other_tensors)

    @cached_property
    def max_n_embd_v_gqa(self) -> int:
        """The V row llama.cpp pads every layer to when V is transposed (no flash attention)."""
        return max((layer.n_embd_v_gqa for layer in self.layers if layer.has_kv and layer.has_v), default=0)

    @cached_property
    def active_bytes_per_layer(self) -> tuple[int, ...]:
        """Weight bytes one token reads in each layer: all dense tensors, and of the expert
        tensors only the n_expert_used / n_expert share the router picks."""
        share = self.n_expert_used / self.n_expert if self.n_expert else 1.0
        return tuple(int(layer.weights_bytes - layer.expert_bytes + share * layer.expert_bytes)
                     for layer in self.layers)

    @cached_property
    def active_params_per_layer(self) -> tuple[int, ...]:
        """Matrix elements one token multiplies with in each layer (2 FLOPs each)."""
        share = self.n_expert_used / self.n_expert if self.n_expert else 1.0
        return tuple(int(sum((share if t.is_expert else 1.0) * t.n_elements
                                 for t in layer.tensors if len(t.shape) >= 2)) for layer in self.layers)

    @cached_property
    def output_params(self) -> int:
        """Elements of the output matrix (token_embd when tied): n_embd x n_vocab."""
        mats = [t for t in self.output_tensors if len(t.shape) >= 2]
        if not mats and self.tied_output and self.token_embd is not None:
            mats = [self.token_embd]
        return sum(t.n_elements for t in mats)

    @property
    def title(self) -> str:
        """The model's name as its authors write it, for people: general.name, unless that is a slug
        gguf-py made from a repository id ('Smollm2 135M 8k Lc100K Mix1 Ep2'); then the file name
        and its quant ('SmolLM2-135M-Instruct Q4_1')."""
        if self.name and not _is_slug_title(self.name):
            return self.name
        stem = re.split(r"[/\\]", self.path.split("?", 1)[0].rstrip("/"))[-1].removesuffix(".gguf") or self.arch
        quant = self.file_type.removeprefix("MOSTLY_")
        if not quant:
            return stem
        bare = re.sub(rf"[-_. ]{re.escape(quant)}$", "", stem, flags=re.IGNORECASE)
        return f"{bare} {quant}"

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0


def _is_slug_title(name: str) -> bool:
    """True for a name gguf-py's Metadata.id_to_title made from a repository id (gguf/metadata.py):
    hyphens made spaces, every word title-cased from lower case or a version / number kept as it
    was. A name with its authors' casing ('SmolLM2', 'Qwen3-30B-A3B', 'LLaMA') is not one; a plain
    one ('Llama 3.1 8B') may be taken for one, and then shows as its file name, also the authors'."""
    words = name.split()
    kept = re.compile(r"^(v\d+(?:\.\d+)*|\d.*)$")     # id_to_title leaves versions and numbers as they are
    return bool(words) and "-" not in name and all(kept.match(w) or w == w.lower().title() for w in words)
