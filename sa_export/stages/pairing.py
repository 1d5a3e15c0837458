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


def ratio_interval(t_sa: list[float], t_base: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of the paired ratios sa/base: the k-th
    smallest and k-th largest ratio, with k the largest rank at which the median lies
    between them with at least ``confidence`` (the sign test's order statistics; with
    few pairs that is the whole range, covering less). It covers the noise from one pair
    of steps to the next; a fixed difference between two sessions of one process (where
    each one's memory lies) is outside what pairs can see."""
    from scipy.stats import binom

    ratios = sorted(s / b for s, b in zip(t_sa, t_base))
    n = len(ratios)
    alpha = 1 - confidence
    k = 1
    while k < n / 2 and 2 * binom.cdf(k, n, 0.5) <= alpha:  # rank k + 1 still covers
        k += 1
    return ratios[k - 1], ratios[n - k]


def interval_text(interval) -> str:
    """'0.981-1.012', or '-' for rows measured before intervals were kept."""
    if not interval or any(value != value for value in interval):
        return "-"
    return f"{interval[0]:.3f}-{interval[1]:.3f}"


def verdict_lines(what: str, rows: list[tuple[str, dict]]) -> list[str]:
    """Where SA is slower than the baseline: beyond the step-to-step noise (the whole 95%
    interval above 1), or only in its point estimate, within that noise."""
    slower = [name for name, row in rows if (row.get("time_ratio_ci95") or [0.0])[0] > 1]
    noise = [name for name, row in rows if row["time_ratio_sa_to_base"] > 1 and name not in slower]
    lines = [f"{what}: SA slower than the baseline at: {', '.join(slower)} (95% interval above 1)" if slower
             else f"{what}: SA is not slower than the baseline beyond step-to-step noise at any point"]
    if noise:
        lines.append(f"{what}: SA/base above 1 within step-to-step noise (95% interval holds 1) at: {', '.join(noise)}")
    return lines
