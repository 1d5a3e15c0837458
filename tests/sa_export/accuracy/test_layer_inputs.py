import numpy as np
import pytest
import torch

from sa_export.accuracy import layer_inputs
from sa_export.accuracy.evaluate import layer_inputs_of, perplexity
from sa_export.accuracy.layer_inputs import first_changed_layer
from sa_export.core.plan import HeadMap, build_plan
from tests.conftest import _tiny_config
from tests.sa_export.accuracy.test_reference import _model

CONTEXT = 64


def _ids(count: int = 3 * CONTEXT + 10) -> list[int]:
    return np.random.default_rng(0).integers(0, 256, count).tolist()


def _calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_a_plan_runs_from_its_first_layer_and_measures_what_the_whole_model_does():
    model, ids = _model(), _ids()
    inputs = layer_inputs_of(model, ids, CONTEXT)
    assert inputs.verified and inputs.layers == [1, 2, 3, 4, 5]
    plan = build_plan(["4-5"], 6).with_head_maps({layer: HeadMap.from_anchor_heads(2, [1, 0, 3, 2]) for layer in (4, 5)})
    assert first_changed_layer(plan) == 2  # the maps read layer 2, below the anchor 3
    below = _calls(model.model.layers[1])
    assert perplexity(model, ids, CONTEXT, plan, inputs=inputs) == pytest.approx(perplexity(model, ids, CONTEXT, plan), rel=1e-6)
    assert len(below) == 4  # the whole run's 4 windows; the run from layer 2 skipped it
    base = perplexity(model, ids, CONTEXT, None, inputs=inputs)
    assert len(below) == 4  # the base model changes nothing: it runs from the last kept layer
    assert base == pytest.approx(perplexity(model, ids, CONTEXT), rel=1e-6)


def test_a_model_that_adds_to_its_input_embeddings_runs_whole():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config("gpt2")).eval()  # adds its position embeddings to inputs_embeds
    ids = _ids()
    inputs = layer_inputs_of(model, ids, CONTEXT)
    assert inputs.verified is False and inputs.start_for(4) == 0
    plan = build_plan(["4-5"], 6)
    assert perplexity(model, ids, CONTEXT, plan, inputs=inputs) == pytest.approx(perplexity(model, ids, CONTEXT, plan), rel=1e-6)


def test_layer_inputs_thin_out_to_the_memory_they_may_take(monkeypatch):
    model, ids = _model(), _ids()
    per_layer = len(ids) * model.config.hidden_size * 4
    monkeypatch.setattr(layer_inputs, "free_bytes", lambda device: int(2 * per_layer / layer_inputs.KEEP_SHARE))
    inputs = layer_inputs_of(model, ids, CONTEXT)
    assert inputs.layers == [1, 4]  # two of the five, evenly
    assert [inputs.start_for(layer) for layer in (0, 1, 3, 5)] == [0, 1, 1, 4]
    plan = build_plan(["4-5"], 6)
    assert perplexity(model, ids, CONTEXT, plan, inputs=inputs) == pytest.approx(perplexity(model, ids, CONTEXT, plan), rel=1e-6)


def test_a_partly_shared_plan_moves_the_distribution_as_much_from_its_first_layer():
    from sa_export.accuracy.evaluate import base_log_probs, divergence

    model, ids = _model(), _ids()
    inputs, base = layer_inputs_of(model, ids, CONTEXT), base_log_probs(model, ids, CONTEXT)
    plan, heads = build_plan(["4-5"], 6), {4: (0, 1), 5: (2, 3)}
    whole = divergence(model, ids, CONTEXT, base, plan, heads)
    assert whole > 0 and divergence(model, ids, CONTEXT, base, plan, heads, inputs) == pytest.approx(whole, rel=1e-5)
