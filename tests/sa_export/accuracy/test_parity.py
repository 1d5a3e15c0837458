"""The parity check must fail when the model and the reference disagree."""

import pytest

from sa_export.accuracy.compare import FP32_TOLERANCE, OutputComparison
from sa_export.hf.models import ModelSource, load_hf_model
from sa_export.accuracy.parity import run_parity
from sa_export.core.plan import SharingPlan
from sa_export.runtime import SAModel


def test_comparison_reports_errors_and_verdict():
    import numpy as np

    c = OutputComparison.of("x", np.array([1.0, 2.0]), np.array([1.0, 2.5]), atol=0.1)
    assert c.max_abs == pytest.approx(0.5) and c.mean_abs == pytest.approx(0.25) and not c.passed
    assert c.max_rel == pytest.approx(0.2, rel=1e-4)


def test_parity_fails_against_a_different_plan(converted_tiny_llama, tiny_llama_with_tokenizer):
    hf = load_hf_model(ModelSource("hf", tiny_llama_with_tokenizer, "tiny"))
    sa_model = SAModel(converted_tiny_llama)
    good = run_parity(sa_model, hf, SharingPlan(6, {3: 2, 4: 2}), decode_steps=4)
    assert good.passed
    wrong = run_parity(sa_model, hf, SharingPlan(6, {3: 1, 4: 1}), decode_steps=4)
    assert not wrong.passed
    assert wrong.logits_max_abs > FP32_TOLERANCE.logits_atol
    assert "FAILED" in wrong.summary_line()
    assert wrong.to_json()["failing_outputs"]
