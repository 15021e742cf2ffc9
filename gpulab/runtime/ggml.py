"""The one way gpulab reads ggml's C answers: C strings as str, and the registered devices and
backends as lists.

Every function takes the loaded libggml (gpulab.runtime.llama_lib.ggml(), which opens the
libraries and sets the signatures); nothing here opens a library or calls llama.cpp itself, so
llama_lib can use it too.
"""

from __future__ import annotations

__all__ = ["text", "device_handles", "device_names", "reg_handles", "dev_name", "dev_description", "buft_name",
           "reg_name"]


def text(value: bytes | str | None) -> str:
    """A C string (char *, c_char_p: bytes or None) as str; bytes that are not UTF-8 are replaced,
    never raised on: a device description is not worth a crash."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return value.decode("utf-8", "replace")


def device_handles(g) -> list[int]:
    """Every registered device (ggml_backend_dev_t), in registration order."""
    return [g.ggml_backend_dev_get(i) for i in range(g.ggml_backend_dev_count())]


def reg_handles(g) -> list[int]:
    """Every registered backend (ggml_backend_reg_t), in registration order."""
    return [g.ggml_backend_reg_get(i) for i in range(g.ggml_backend_reg_count())]


def dev_name(g, dev) -> str:
    return text(g.ggml_backend_dev_name(dev))


def dev_description(g, dev) -> str:
    return text(g.ggml_backend_dev_description(dev))


def buft_name(g, buft) -> str:
    return text(g.ggml_backend_buft_name(buft)) if buft else ""


def reg_name(g, reg) -> str:
    return text(g.ggml_backend_reg_name(reg)) if reg else ""


def device_names(g) -> list[str]:
    """llama.cpp's names of every registered device ('CUDA0', 'RPC0', 'CPU', ...)."""
    return [dev_name(g, d) for d in device_handles(g)]
