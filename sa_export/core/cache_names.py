"""The names and sizes of cache tensors, as every graph family and runtime spells them."""

from __future__ import annotations

import re

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
# ``borrowed_value``: the V cache of the KV groups a partly shared layer borrows, on the
# GroupQueryAttention graph, where the layer's own GQA takes K and V of its kept groups only.
PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value|borrowed_value)$")
PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value|borrowed_value)$")
ITEMSIZE = {"float32": 4, "float16": 2}


def past_name(layer: int, kind: str) -> str:
    return f"{PAST_PREFIX}{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"{PRESENT_PREFIX}{layer}.{kind}"


def is_cache_name(name: str) -> bool:
    return bool(PAST_RE.match(name) or PRESENT_RE.match(name))


def itemsize(dtype: str) -> int:
    """Bytes per element of a cache dtype as the manifest names it (float32, float16)."""
    return ITEMSIZE[dtype]


# The activation (and cache) dtype of each --precision: int4 quantizes weights only.
ACTIVATION_DTYPE = {"fp32": "float32", "fp16": "float16", "int4": "float32"}


def precision_itemsize(precision: str) -> int:
    """Bytes per activation element at a --precision (fp32, fp16, int4)."""
    return itemsize(ACTIVATION_DTYPE[precision])


# Bytes a projection weight takes per parameter at each --precision: int4 is the builder's
# MatMulNBits layout, 4 bits plus an fp32 scale per block of 32 (symmetric: no zero points).
WEIGHT_BYTES_PER_PARAMETER = {"fp32": 4.0, "fp16": 2.0, "int4": 0.5 + 4 / 32}
