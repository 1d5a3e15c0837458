"""Two models timed side by side: interleaved pairs, the order alternating (`bench` runs
each model in a process of its own, `stages.timing_worker`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

INTERVAL_MAX_PAIRS = 4000  # bounds --interval on a tiny model whose steps take microseconds


def timed_pair(index: int, sa_call: Callable[[], float], base_call: Callable[[], float]) -> tuple[float, float]:
    """One timed call of each model, (sa, base); the order alternates with ``index`` so
    that neither always runs on caches the other just filled."""
    if index % 2:
        t_sa = sa_call()
        return t_sa, base_call()
    t_base = base_call()
    return sa_call(), t_base


def paired_times(
    sa_call: Callable[[], float], base_call: Callable[[], float], repeats: int, min_seconds: float, max_pairs: int,
    half_width: float = 0.0, max_seconds: float = 0.0,
) -> tuple[list[float], list[float]]:
    """Times of both, for at least ``repeats`` pairs, and more until ``min_seconds`` have
    passed (at most ``max_pairs``): short calls are the noisiest and get more samples.

    With ``half_width``, pairs go on until the 95% interval of the ratio (ratio_interval)
    is no wider than the ratio +- ``half_width``, or ``max_seconds`` have passed (at most
    INTERVAL_MAX_PAIRS): a long step's ratio moves by several hundredths over the few
    pairs that ``min_seconds`` holds. The interval is checked each time the pairs have
    grown by a quarter, so the bootstrap costs little next to the steps."""
    t_sa, t_base = [], []
    start = time.perf_counter()
    next_check = 0

    def wanted() -> bool:
        nonlocal next_check
        pairs, elapsed = len(t_sa), time.perf_counter() - start
        if pairs < repeats or (elapsed < min_seconds and pairs < max_pairs):
            return True
        if not half_width or elapsed >= max_seconds or pairs >= INTERVAL_MAX_PAIRS:
            return False
        if pairs < next_check:
            return True
        next_check = pairs + max(1, pairs // 4)
        low, high = ratio_interval(t_sa, t_base)
        return (high - low) / 2 > half_width

    while wanted():
        pair = timed_pair(len(t_sa), sa_call, base_call)
        t_sa.append(pair[0])
        t_base.append(pair[1])
    return t_sa, t_base


def ratio_interval(t_sa: list[float], t_base: list[float], confidence: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """A bootstrap interval for median(sa) / median(base), the ratio the table prints:
    whole pairs are resampled (so that what the two steps of a pair share stays together),
    and the central ``confidence`` of the resampled ratios is kept (seeded: the same times
    give the same interval). It covers the noise from one pair of steps to the next; a fixed
    difference between the two sides is outside what pairs can see, which is why `bench`
    does not run two sessions in one process (the first created was the slower)."""
    return grouped_ratio_interval([(t_sa, t_base)], confidence, resamples)


def grouped_ratio(groups: list[tuple[list[float], list[float]]]) -> float:
    """SA/base over several pairs of processes, each given as (sa times, base times): the
    sum of each process's median over the sum of its partner's, so that each pair of
    processes weighs the same whatever its number of steps."""
    return sum(float(np.median(sa)) for sa, _ in groups) / sum(float(np.median(base)) for _, base in groups)


def grouped_ratio_interval(groups: list[tuple[list[float], list[float]]], confidence: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """A two-level bootstrap interval for grouped_ratio: pairs of processes are resampled,
    then the pairs of steps within each (ratio_interval, for one pair of processes). A
    process runs at a speed of its own, steadily off another's by up to a few percent on this
    CPU (one run of `bench` moved by more than its own intervals from the next), which no
    resampling of one process's steps can see; with several pairs of processes the
    interval covers it. With few pairs it is still somewhat narrow (a bootstrap of n
    values spreads like a sample of n - 1)."""
    rng = np.random.default_rng(0)
    sa_medians, base_medians = [], []
    for t_sa, t_base in groups:
        sa, base = np.asarray(t_sa, float), np.asarray(t_base, float)
        picks = rng.integers(0, len(sa), (resamples, len(sa)))
        sa_medians.append(np.median(sa[picks], axis=1))
        base_medians.append(np.median(base[picks], axis=1))
    sa_bank, base_bank = np.stack(sa_medians), np.stack(base_medians)  # [groups, resamples]
    if len(groups) == 1:
        ratios = sa_bank[0] / base_bank[0]
    else:
        chosen = rng.integers(0, len(groups), (resamples, len(groups)))
        inner = rng.integers(0, resamples, (resamples, len(groups)))  # an independent inner resample per pick
        ratios = sa_bank[chosen, inner].sum(axis=1) / base_bank[chosen, inner].sum(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def interval_text(interval) -> str:
    """'0.981-1.012', or '-' for rows measured before intervals were kept."""
    if not interval or any(value != value for value in interval):
        return "-"
    return f"{interval[0]:.3f}-{interval[1]:.3f}"


def verdict_lines(what: str, rows: list[tuple[str, dict]]) -> list[str]:
    """Where SA is slower than the baseline: beyond the measured noise (the whole 95%
    interval above 1), or only in its point estimate, within that noise."""
    slower = [name for name, row in rows if (row.get("time_ratio_ci95") or [0.0])[0] > 1]
    noise = [name for name, row in rows if row["time_ratio_sa_to_base"] > 1 and name not in slower]
    lines = [f"{what}: SA slower than the baseline at: {', '.join(slower)} (95% interval above 1)" if slower
             else f"{what}: SA is not slower than the baseline beyond the measured noise at any point"]
    if noise:
        lines.append(f"{what}: SA/base above 1 within the measured noise (95% interval holds 1) at: {', '.join(noise)}")
    return lines
