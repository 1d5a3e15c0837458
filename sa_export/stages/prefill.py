"""Prefill in `bench`: time of each model side by side, and peak memory of each in its own process.

Time is measured in the two timing processes of `bench`, one model each, the prefills
interleaved (as decode steps are). Peak memory needs a fresh process per run: each timing
process has also held the decode caches, so each model runs the same prompt (then up to 4
decode steps, as its positions allow) in a new Python process that reports its own peak.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from sa_export.core.errors import UsageError
from sa_export.stages.pairing import interval_text, paired_times, ratio_interval, verdict_lines
from sa_export.stages.timing_worker import TimedPair

_CHILD = """
import json, sys, time
import numpy as np
from sa_export.runtime import SAModel
from sa_export.runtime.memory import own_peak_rss, own_rss
out, tokens, chunk, memory, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) or None, sys.argv[4], int(sys.argv[5]) or None
model = SAModel(out, threads, spin=False, memory=memory)
loaded_rss = own_rss()
ids = np.random.default_rng(0).integers(0, 100, (1, tokens))
mask = np.ones_like(ids)
steps = max(0, min(4, model.max_length - tokens)) if model.shared_buffer and model.max_length else 4
cache = model.empty_cache(1, tokens + steps)
start = time.perf_counter()
logits, cache, _ = model.prefill(ids, mask, cache, chunk, all_logits=False)
prefill_s = time.perf_counter() - start
for _ in range(steps):
    mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
    logits, cache, _ = model.forward(logits[:, -1:].argmax(-1), mask, cache)
print(json.dumps({"dir": out, "prefill_s": prefill_s, "loaded_rss_bytes": loaded_rss, "peak_rss_bytes": own_peak_rss()}))
"""


def peak_memory(out_dir: str | Path, tokens: int, chunk: int | None, memory: str = "arena", threads: int | None = None) -> dict:
    """Peak RSS and prefill time of ``tokens`` through OUT, in a process of its own (``memory``: its memory mode)."""
    command = [sys.executable, "-c", _CHILD, str(out_dir), str(tokens), str(chunk or 0), memory, str(threads or 0)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"the prefill of {tokens} tokens through {out_dir} failed in its own process: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# A 512-token prefill varies by +-5% from call to call on a 2-core CPU: short prompts get
# more pairs, until this much time has passed (and at most MAX_PAIRS).
MIN_SECONDS = 10.0
MAX_PAIRS = 25


def time_prefill(pair: TimedPair, tokens: int, repeats: int, chunk: int | None) -> dict:
    """Median prefill time of each model, interleaved, both in chunks of ``chunk`` (None: one call);
    at least ``repeats`` pairs, more for short prompts (MIN_SECONDS)."""
    pair.load("prefill", (tokens, chunk, 1), (tokens, chunk, 1))  # the same prompt for both
    t_sa, t_base = paired_times(pair.sa.step, pair.base.step, repeats, MIN_SECONDS, MAX_PAIRS)
    base_ms, sa_ms = 1000 * statistics.median(t_base), 1000 * statistics.median(t_sa)
    return {
        "tokens": tokens, "chunk": chunk, "pairs": len(t_sa), "t_base_ms": base_ms, "t_sa_ms": sa_ms, "time_ratio_sa_to_base": sa_ms / base_ms,
        "time_ratio_ci95": list(ratio_interval(t_sa, t_base)),
    }


def peak_memories(sa_dir: Path, base_dir: Path, tokens: int, chunk: int | None, runs: int, threads: int | None, memory: str = "arena") -> dict:
    """Median peak RSS of each model over ``runs`` processes of its own, in alternating order.

    With two threads one process's peak moves by up to 5% from run to run (the SA graphs'
    more than the builder's); the median of a few is steadier."""
    peaks = {"sa": [], "base": []}
    for run in range(runs):
        for name in ("sa", "base") if run % 2 == 0 else ("base", "sa"):
            peaks[name].append(peak_memory(sa_dir if name == "sa" else base_dir, tokens, chunk, memory, threads)["peak_rss_bytes"])
    return {
        "peak_rss_sa_bytes": statistics.median(peaks["sa"]),
        "peak_rss_base_bytes": statistics.median(peaks["base"]),
        "peak_rss_sa_runs": peaks["sa"],
        "peak_rss_base_runs": peaks["base"],
    }


def prefill_rows(
    pair: TimedPair, lengths, repeats: int, chunk: int | None, memory_runs: int, threads: int | None, memory: str = "arena"
) -> list[dict]:
    """One row per prompt length: interleaved times, and with ``memory_runs`` each model's own peak RSS."""
    rows = []
    for tokens in lengths:
        row = time_prefill(pair, tokens, repeats, chunk)
        if memory_runs:
            row.update(peak_memories(pair.sa.out_dir, pair.base.out_dir, tokens, chunk, memory_runs, threads, memory))
        rows.append(row)
    return rows


def prefill_lines(rows: list[dict]) -> list[str]:
    lines = [f"{'prefill':>8} {'chunk':>6} {'base ms':>10} {'SA ms':>10} {'SA/base':>8} {'95% interval':>13} {'base peak MiB':>13} {'SA peak MiB':>11} {'SA/base':>8}"]
    for row in rows:
        if "peak_rss_sa_bytes" in row:
            sa, base = row["peak_rss_sa_bytes"], row["peak_rss_base_bytes"]
            peaks = f"{base / 2**20:>13.1f} {sa / 2**20:>11.1f} {sa / base:>8.3f}"
        else:
            peaks = f"{'-':>13} {'-':>11} {'-':>8}"
        lines.append(
            f"{row['tokens']:>8} {row['chunk'] or '-':>6} {row['t_base_ms']:>10.1f} {row['t_sa_ms']:>10.1f} {row['time_ratio_sa_to_base']:>8.3f} "
            f"{interval_text(row.get('time_ratio_ci95')):>13} {peaks}"
        )
    if rows:
        lines += verdict_lines("prefill", [(f"{row['tokens']} tokens", row) for row in rows])
    return lines
