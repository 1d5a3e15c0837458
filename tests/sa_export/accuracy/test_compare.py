"""The greedy gate judges decisions: a flip within the precision's error is a near tie, any other fails."""

import numpy as np

from sa_export.accuracy.compare import FP16_TOLERANCE, FP32_TOLERANCE, OutputComparison, ParityReport, greedy_flips


def _rows(margin: float, error: float) -> tuple[np.ndarray, np.ndarray]:
    """Reference prefers token 0 by ``margin``; the runtime lowers it by ``error`` so that token 1 wins."""
    assert error > margin
    expected = np.array([[10.0, 10.0 - margin, 0.0]])
    actual = expected - np.array([[error, 0.0, 0.0]])
    return actual, expected


def _report(flips, tolerance) -> ParityReport:
    logits = OutputComparison.of("c/logits", np.ones(4), np.ones(4), tolerance.logits_atol, tolerance.min_cosine)
    return ParityReport("test", tolerance, (logits,), greedy_matches=67, greedy_total=68, decode_steps=32, cases=("c",), flips=tuple(flips))


def test_fp32_gate_stays_exact():
    matches, flips = greedy_flips("c", *_rows(margin=1e-4, error=2e-4), FP32_TOLERANCE)
    assert matches == 0 and len(flips) == 1 and not flips[0].near_tie
    assert not _report(flips, FP32_TOLERANCE).passed


def test_fp16_near_tie_flip_passes_and_is_reported():
    matches, flips = greedy_flips("c", *_rows(margin=0.05, error=0.06), FP16_TOLERANCE)
    assert matches == 0 and flips[0].near_tie and abs(flips[0].margin - 0.05) < 1e-12
    report = _report(flips, FP16_TOLERANCE)
    assert report.passed and report.greedy_agreement < 1 and report.decision_agreement == 1
    data = report.to_json()
    assert data["near_tie_flips"] == 1 and data["flips"][0]["margin"] == flips[0].margin
    assert "near ties" in report.summary_line()


def test_a_large_error_does_not_explain_a_flip():
    """A broken graph moves logits by whole units: its flips exceed the fp16 budget whatever the error."""
    _, flips = greedy_flips("c", *_rows(margin=0.1, error=4.0), FP16_TOLERANCE)
    assert not flips[0].near_tie and not _report(flips, FP16_TOLERANCE).passed
