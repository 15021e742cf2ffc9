"""Sizes of the ggml types a KV cache can hold.

The core may not import `gguf`, so it keeps this small table; tests check it against
`gguf.GGML_QUANT_SIZES` so the two cannot drift. The set is llama.cpp's `kv_cache_types`
(common/arg.cpp): the values `-ctk` / `-ctv` accept.
"""

from __future__ import annotations

__all__ = ["KV_CACHE_TYPES", "row_bytes", "ggml_type_id", "block_size"]

# name -> (elements per block, bytes per block)
KV_CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "iq4_nl": (32, 18),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
}

# enum ggml_type values (ggml/include/ggml.h), for the llama.cpp translation of type_k/type_v
_GGML_TYPE_ID = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
                 "iq4_nl": 20, "bf16": 30}


def row_bytes(type_name: str, n_elements: int) -> int:
    """Bytes of one row of n_elements of a KV cache type (ggml_row_size)."""
    block, size = KV_CACHE_TYPES[type_name]
    if n_elements % block:
        raise ValueError(f"{n_elements} elements is not a whole number of {type_name} blocks of {block}")
    return n_elements // block * size


def ggml_type_id(type_name: str) -> int:
    return _GGML_TYPE_ID[type_name]


# elements per block of every ggml type a weight can have (ggml_blck_size; ggml/src/ggml.c
# type_traits), by the name the GGUF header gives it. Split mode `tensor` cuts quantized tensors
# on block boundaries. Checked against gguf.GGML_QUANT_SIZES by the tests.
_BLOCK_SIZES: dict[str, int] = {
    **dict.fromkeys(("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"), 1),
    **dict.fromkeys(("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "IQ4_NL", "MXFP4"), 32),
    **dict.fromkeys(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS",
                     "IQ1_S", "IQ3_S", "IQ2_S", "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0"), 256),
    "NVFP4": 64, "Q1_0": 128,
}


def block_size(type_name: str) -> int:
    """ggml_blck_size of a weight type ('Q4_K' -> 256); ValueError for a type gpulab does not know."""
    try:
        return _BLOCK_SIZES[type_name.upper()]
    except KeyError:
        raise ValueError(f"unknown ggml type {type_name!r}: its block size is not in gpulab's table") from None
