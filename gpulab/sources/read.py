"""read_profile: a ModelProfile from a local GGUF or an http(s) URL, without its weights."""

from __future__ import annotations

import os

from ..core.profile import ModelProfile

__all__ = ["read_profile"]


def read_profile(source: str | os.PathLike, **kwargs) -> ModelProfile:
    """A ModelProfile from a local GGUF path or an http(s) URL (header only, by range requests)."""
    if str(source).startswith(("http://", "https://")):
        from .remote import read_remote_profile
        return read_remote_profile(str(source), **kwargs)
    from .gguf_file import read_local_profile
    return read_local_profile(source, **kwargs)
