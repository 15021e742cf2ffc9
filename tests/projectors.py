"""clip projector GGUFs written with gguf-py, as tools/mtmd/clip.cpp loads them (clip.* keys,
v.blk.N.* tensors), for tests of --mmproj (importable as `projectors`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_projector(path: Path, *, projector_type: str = "gemma3", image_size: int = 224, patch_size: int = 14,
                    n_embd: int = 128, n_ff: int = 512, n_head: int = 4, n_layer: int = 2,
                    proj_dim: int = 576, weights: bool = True) -> Path:
    """A vision encoder: patch embedding, position embedding, n_layer ViT blocks, the projection.
    projector_type 'gemma3' (SigLIP, pooled 4x4, clip_graph_siglip) or 'mlp' (LLaVA, clip_graph_llava);
    proj_dim must be the text model's n_embd (mtmd checks it)."""
    import gguf
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_string("clip.projector_type", projector_type)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_audio_encoder", False)
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch_size)
    w.add_uint32("clip.vision.embedding_length", n_embd)
    w.add_uint32("clip.vision.feed_forward_length", n_ff)
    w.add_uint32("clip.vision.projection_dim", proj_dim)
    w.add_uint32("clip.vision.attention.head_count", n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_uint32("clip.vision.block_count", n_layer)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.add_bool("clip.use_gelu", True)
    n_pos = (image_size // patch_size) ** 2
    rng = np.random.default_rng(0)

    def t(name: str, *shape: int, dtype=np.float32) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(dtype))

    llava = projector_type == "mlp"      # CLIP with a class token, a pre-norm and a 2-layer MLP (LLaVA)
    t("v.patch_embd.weight", n_embd, 3, patch_size, patch_size, dtype=np.float16)
    t("v.patch_embd.bias", n_embd)
    t("v.position_embd.weight", n_pos + llava, n_embd, dtype=np.float16)
    if llava:
        t("v.class_embd", n_embd)
        t("v.pre_ln.weight", n_embd)
        t("v.pre_ln.bias", n_embd)
    for i in range(n_layer):
        for x in ("q", "k", "v"):
            t(f"v.blk.{i}.attn_{x}.weight", n_embd, n_embd, dtype=np.float16)
            t(f"v.blk.{i}.attn_{x}.bias", n_embd)
        t(f"v.blk.{i}.attn_out.weight", n_embd, n_embd, dtype=np.float16)
        t(f"v.blk.{i}.attn_out.bias", n_embd)
        for x in ("ln1", "ln2"):
            t(f"v.blk.{i}.{x}.weight", n_embd)
            t(f"v.blk.{i}.{x}.bias", n_embd)
        t(f"v.blk.{i}.ffn_up.weight", n_ff, n_embd, dtype=np.float16)
        t(f"v.blk.{i}.ffn_up.bias", n_ff)
        t(f"v.blk.{i}.ffn_down.weight", n_embd, n_ff, dtype=np.float16)
        t(f"v.blk.{i}.ffn_down.bias", n_embd)
    if llava:       # mm.0: vision -> hidden, GELU, mm.2: hidden -> the text model's n_embd (= proj_dim)
        t("mm.0.weight", proj_dim, n_embd, dtype=np.float16)
        t("mm.0.bias", proj_dim)
        t("mm.2.weight", proj_dim, proj_dim, dtype=np.float16)
        t("mm.2.bias", proj_dim)
    else:           # gemma3: post-norm, soft-embedding norm, projection to the text model's n_embd
        t("v.post_ln.weight", n_embd)
        t("v.post_ln.bias", n_embd)
        t("mm.soft_emb_norm.weight", n_embd)
        t("mm.input_projection.weight", n_embd, proj_dim, dtype=np.float16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
