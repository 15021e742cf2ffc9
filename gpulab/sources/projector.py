"""read_projector: a clip projector GGUF (--mmproj) as a ProjectorProfile, its header only.

Keys as tools/mtmd/clip-impl.h names them (clip.projector_type, clip.vision.*, clip.audio.*); the
warm-up size as clip_model_loader sets it: hparams.warmup_image_size = image_size unless the
projector type sets a token count (clip.cpp load_hparams; gpulab knows the common ones below).
"""

from __future__ import annotations

import mmap
import os

from ..core.errors import ModelFormatError
from ..core.placement.process import ProjectorProfile
from .gguf_header import parse_header

__all__ = ["read_projector"]

# clip.cpp load_hparams: projector types whose warm-up is set_warmup_n_tokens(N) rather than the
# full image (the ones the tests write; others warm up at image_size)
WARMUP_TOKENS = {"qwen2vl_merger": 46 * 46, "qwen2.5vl_merger": 46 * 46, "qwen3vl_merger": 46 * 46,
                 "pixtral": 46 * 46, "kimivl": 46 * 46}


def read_projector(path: str | os.PathLike) -> ProjectorProfile:
    src = os.fspath(path)

    def fail(msg: str) -> ModelFormatError:
        return ModelFormatError(f"{src}: {msg}")

    try:
        with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            h = parse_header(mm, len(mm), len(mm), fail)
    except OSError as e:
        raise fail(f"cannot read the projector file ({e.strerror or e})") from None
    kv = h.kv
    ptype = kv.get("clip.projector_type") or kv.get("clip.vision.projector_type") or ""
    if not ptype and "clip.has_vision_encoder" not in kv and "clip.has_audio_encoder" not in kv:
        raise fail("not a projector (no clip.projector_type): give the model with -m and its mmproj with --mmproj")
    vision, audio = bool(kv.get("clip.has_vision_encoder", False)), bool(kv.get("clip.has_audio_encoder", False))

    def v(key: str, kind: str = "vision") -> int:
        x = kv.get(f"clip.{kind}.{key}", 0)
        return int(x) if isinstance(x, (int, float)) else 0

    image, patch = v("image_size"), v("patch_size")
    tokens = WARMUP_TOKENS.get(str(ptype)) or ((image // patch) ** 2 if vision and patch else 0)
    if not vision and audio:
        tokens = 1500 // 2     # whisper-style encoders: 3000 mel frames, stride 2 (clip.cpp warmup_audio_size)
    return ProjectorProfile(path=src, projector_type=str(ptype), weights_bytes=sum(t.n_bytes for t in h.tensors),
                            has_vision=vision, has_audio=audio, image_size=image, patch_size=patch,
                            n_embd=v("embedding_length"), n_ff=v("feed_forward_length"),
                            n_head=v("attention.head_count"), n_layer=v("block_count"),
                            audio_n_embd=v("embedding_length", "audio"), audio_n_ff=v("feed_forward_length", "audio"),
                            audio_n_head=v("attention.head_count", "audio"), warmup_tokens=tokens)
