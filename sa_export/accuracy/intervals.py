"""How sure a perplexity penalty is on the text it was measured on.

Both models read the same tokens, so the penalty is judged on paired differences of
their next-token losses: text that is hard for both cancels out. Neighbouring tokens
share context, so their differences are not independent; the text is cut into blocks
of consecutive tokens and the standard error is that of the block means (the batch-means
method), with Student's t for so few blocks. Blocks are 512 tokens: on Wikipedia articles
the error still grew from 128- to 512-token blocks (by 35%), and stopped growing
there (``benchmarks.interval_blocks``). It says how far the figure could move on another
text of the same kind and length, not how far another fit (seed) would move it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

BLOCK_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class PenaltyInterval:
    low: float  # relative penalty SA / base - 1 at the interval's ends
    high: float
    blocks: int
    block_tokens: int

    def describe(self) -> str:
        return f"95% interval {100 * self.low:+.1f}% to {100 * self.high:+.1f}% ({self.blocks} blocks of {self.block_tokens} tokens)"

    def brackets(self, joiner: str = " to ") -> str:
        """'[+2.0 to +4.2]': the ends in percent, for a table cell."""
        return f"[{100 * self.low:+.1f}{joiner}{100 * self.high:+.1f}]"

    def to_json(self) -> dict:
        return {"low": self.low, "high": self.high, "confidence": 0.95, "blocks": self.blocks, "block_tokens": self.block_tokens}

    @classmethod
    def from_json(cls, data: dict) -> PenaltyInterval:
        return cls(data["low"], data["high"], data["blocks"], data["block_tokens"])


def describe(interval: PenaltyInterval | None) -> str:
    """The interval in words, or why there is none."""
    return interval.describe() if interval is not None else f"no 95% interval: fewer than two blocks of {BLOCK_TOKENS} tokens"


def block_error(differences, block_tokens: int) -> tuple[int, float]:
    """The number of whole blocks of ``block_tokens``, and the standard error of the mean
    difference from their means (the batch-means method; NaN under two blocks)."""
    differences = np.asarray(differences, dtype=np.float64)
    blocks = differences.size // block_tokens
    if blocks < 2:
        return blocks, math.nan
    means = differences[: blocks * block_tokens].reshape(blocks, block_tokens).mean(axis=1)
    return blocks, float(means.std(ddof=1)) / math.sqrt(blocks)


def half_width(blocks: int, error: float) -> float:
    """The 95% interval's half-width for a mean over ``blocks`` block means: Student's t."""
    return error * float(stats.t.ppf(0.975, blocks - 1))


def penalty_interval(base_nlls, sa_nlls, block_tokens: int = BLOCK_TOKENS) -> PenaltyInterval | None:
    """95% interval of SA perplexity / base perplexity - 1 from the per-token losses of both
    models on the same tokens; None when the text has fewer than two blocks."""
    diff = np.asarray(sa_nlls, dtype=np.float64) - np.asarray(base_nlls, dtype=np.float64)
    blocks, error = block_error(diff, block_tokens)
    if blocks < 2:
        return None
    centre = float(diff.mean())  # the penalty the report gives is exp of this mean, minus 1
    width = half_width(blocks, error)
    return PenaltyInterval(math.expm1(centre - width), math.expm1(centre + width), blocks, block_tokens)
