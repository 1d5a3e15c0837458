import math

import numpy as np
import pytest

from sa_export.accuracy.intervals import PenaltyInterval, block_error, penalty_interval


def test_the_interval_is_the_batch_means_t_interval():
    base = np.zeros(8)
    sa = np.array([0.1, 0.1, 0.3, 0.3, 0.1, 0.1, 0.3, 0.3])  # block means 0.1, 0.3, 0.1, 0.3
    interval = penalty_interval(base, sa, block_tokens=2)
    error = math.sqrt(4 * 0.1**2 / 3) / 2  # sample deviation of the block means over sqrt(4 blocks)
    assert interval.blocks == 4 and interval.block_tokens == 2
    assert interval.low == pytest.approx(math.expm1(0.2 - 3.18244630528 * error))  # Student's t, 3 degrees of freedom
    assert interval.high == pytest.approx(math.expm1(0.2 + 3.18244630528 * error))
    assert PenaltyInterval.from_json(interval.to_json()) == interval


def test_the_interval_holds_the_penalty_and_pairs_the_two_models():
    rng = np.random.default_rng(0)
    hard = rng.gamma(2.0, 1.5, size=4096)  # what both models find hard moves both losses
    base, sa = hard, hard + 0.03 + 0.05 * rng.standard_normal(4096)
    interval = penalty_interval(base, sa)
    penalty = math.exp(sa.mean() - base.mean()) - 1
    assert interval.blocks == 8 and interval.block_tokens == 512 and interval.low < penalty < interval.high
    assert interval.high - interval.low < 0.01  # paired: the text's own difficulty cancels
    assert penalty_interval(base, base).low == penalty_interval(base, base).high == 0.0
    assert penalty_interval(base[:1000], sa[:1000]) is None  # fewer than two blocks of 512


def test_blocks_widen_the_interval_where_neighbouring_tokens_move_together():
    rng = np.random.default_rng(1)
    drift = np.repeat(0.2 * rng.standard_normal(32), 512)  # a passage the SA model finds harder moves all its tokens
    sa = drift + 0.2 * rng.standard_normal(16384)
    blocked = penalty_interval(np.zeros(16384), sa)
    shuffled = penalty_interval(np.zeros(16384), rng.permutation(sa))
    assert blocked.high - blocked.low > 2 * (shuffled.high - shuffled.low)


def test_blocks_shorter_than_the_passages_would_understate_the_error():
    """Passages of 512 tokens that move together: 128-token blocks count each passage four
    times as if it were four, and give half the error the default blocks give."""
    rng = np.random.default_rng(2)
    sa = np.repeat(0.2 * rng.standard_normal(64), 512) + 0.05 * rng.standard_normal(64 * 512)
    short = penalty_interval(np.zeros(sa.size), sa, block_tokens=128)
    default = penalty_interval(np.zeros(sa.size), sa)
    assert default.block_tokens == 512 and (default.high - default.low) > 1.6 * (short.high - short.low)


def test_the_error_of_blocks_is_the_deviation_of_their_means_over_the_root_of_their_number():
    differences = np.array([0.1, 0.1, 0.3, 0.3, 0.1, 0.1, 0.3, 0.3, 0.5])  # the ninth is left over
    blocks, error = block_error(differences, 2)
    assert blocks == 4 and error == pytest.approx(math.sqrt(4 * 0.1**2 / 3) / 2)
    assert block_error(differences, 4) == (2, pytest.approx(0.0))  # 0.2 and 0.2
    assert PenaltyInterval(0.02, 0.042, 2, 4).brackets() == "[+2.0 to +4.2]"
