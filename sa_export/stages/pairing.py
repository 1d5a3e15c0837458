"""Two models timed side by side in one process: interleaved pairs, the order alternating."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed_pair(index: int, sa_call: Callable[[], float], base_call: Callable[[], float]) -> tuple[float, float]:
    """One timed call of each model, (sa, base); the order alternates with ``index`` so
    that neither always runs on caches the other just filled."""
    if index % 2:
        t_sa = sa_call()
        return t_sa, base_call()
    t_base = base_call()
    return sa_call(), t_base


def paired_times(
    sa_call: Callable[[], float], base_call: Callable[[], float], repeats: int, min_seconds: float, max_pairs: int
) -> tuple[list[float], list[float]]:
    """Times of both, for at least ``repeats`` pairs, and more until ``min_seconds`` have
    passed (at most ``max_pairs``): short calls are the noisiest and get more samples."""
    t_sa, t_base = [], []
    start = time.perf_counter()
    while len(t_sa) < repeats or (time.perf_counter() - start < min_seconds and len(t_sa) < max_pairs):
        pair = timed_pair(len(t_sa), sa_call, base_call)
        t_sa.append(pair[0])
        t_base.append(pair[1])
    return t_sa, t_base
