"""The names and sizes of cache tensors, as every graph family and runtime spells them."""

from __future__ import annotations

import re

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")
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


def precision_itemsize(precision: str) -> int:
    """Bytes per activation element at a --precision (fp32, fp16)."""
    return itemsize(precision.replace("fp", "float"))
