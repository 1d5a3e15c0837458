import copy

import numpy as np
import torch

from sa_export.accuracy import distill
from sa_export.accuracy.adapters import LowRankAdapters
from sa_export.accuracy.distill import FIT_CHUNK_TOKENS, fit_maps_and_temperatures
from sa_export.accuracy.reference import shared_attention
from sa_export.core.plan import HeadMap, build_plan
from tests.sa_export.accuracy.test_distill import _peaked_model
from tests.sa_export.accuracy.test_reference import _model


def test_adapters_start_at_nothing_and_fold_into_the_weights():
    model = _model()
    ids = torch.tensor([list(range(40))])
    adapters = LowRankAdapters(model, {3, 4}, rank=2)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with adapters.active():
            assert torch.equal(model(input_ids=ids).logits, plain)  # B is zero
        for parameter in adapters.up.values():
            parameter.normal_()
        with adapters.active():
            corrected = model(input_ids=ids).logits
        assert not torch.allclose(corrected, plain)
        assert torch.equal(model(input_ids=ids).logits, plain)  # hooks are gone outside the block
        folded = copy.deepcopy(model)
        for key, delta in adapters.deltas().items():
            layer, name = key.split("_", 1)
            getattr(folded.model.layers[int(layer)].self_attn, name).weight.add_(delta)
        torch.testing.assert_close(folded(input_ids=ids).logits, corrected, rtol=1e-4, atol=1e-4)
    assert sorted(adapters.targets) == ["3_o_proj", "3_v_proj", "4_o_proj", "4_v_proj"]


def test_scaled_corrections_are_that_multiple_of_the_fitted_ones_and_come_back_whole():
    model = _model()
    adapters = LowRankAdapters(model, {3, 4}, rank=2)
    with torch.no_grad():
        for parameter in adapters.up.values():
            parameter.normal_()
    fitted = adapters.deltas()
    with adapters.scaled(0.5):
        for key, delta in adapters.deltas().items():
            torch.testing.assert_close(delta, 0.5 * fitted[key])
    with adapters.scaled(0.0):
        assert all(not delta.any() for delta in adapters.deltas().values())
    assert all(torch.equal(delta, fitted[key]) for key, delta in adapters.deltas().items())


def test_averaged_corrections_fold_as_the_mean_of_the_fits():
    model = _model()
    fits = [LowRankAdapters(model, {3, 4}, rank=2, seed=seed) for seed in (0, 1)]
    with torch.no_grad():
        for fit in fits:
            for parameter in fit.up.values():
                parameter.normal_()
    soup = LowRankAdapters.averaged(fits)
    assert soup.rank == 4 and sorted(soup.targets) == sorted(fits[0].targets)
    for key, delta in soup.deltas().items():
        torch.testing.assert_close(delta, (fits[0].deltas()[key] + fits[1].deltas()[key]) / 2)
    ids = torch.tensor([list(range(40))])
    with torch.no_grad(), soup.active():
        corrected = model(input_ids=ids).logits
    folded = copy.deepcopy(model)
    soup.fold(folded)
    torch.testing.assert_close(folded(input_ids=ids).logits, corrected, rtol=1e-4, atol=1e-4)


def test_each_layer_may_name_its_own_projections():
    """Layers may have projections of their own corrected (a source layer's Q/K with a
    shared layer's V), and folding adds each correction to its own weight."""
    model = _model()
    adapters = LowRankAdapters(model, [3], rank=2, projections=("v_proj",))
    kept = adapters.down["3_v_proj"]
    adapters.add(model, {2: ("q_proj", "k_proj"), 3: ("v_proj",)})
    assert adapters.down["3_v_proj"] is kept  # what is corrected already keeps its factors
    assert list(adapters.targets) == ["2_k_proj", "2_q_proj", "3_v_proj"]
    with torch.no_grad():
        for parameter in adapters.up.values():
            parameter.normal_()
    folded = copy.deepcopy(model)
    adapters.fold(folded)
    for key, delta in adapters.deltas().items():
        layer, name = key.split("_", 1)
        added = getattr(folded.model.layers[int(layer)].self_attn, name).weight - getattr(model.model.layers[int(layer)].self_attn, name).weight
        torch.testing.assert_close(added, delta)
    assert torch.equal(folded.model.layers[3].self_attn.q_proj.weight, model.model.layers[3].self_attn.q_proj.weight)


def _correction_size(adapters) -> float:
    """How much the corrections would add to the weights: the sum of their B @ A norms."""
    return sum(float(delta.norm()) for delta in adapters.deltas().values())


@torch.no_grad()
def _divergence(model, plan, ids, adapters) -> float:
    teacher = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    with adapters.active(), shared_attention(model, plan):
        student = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())


def test_the_fit_moves_the_adapters_toward_the_base_model(monkeypatch):
    """Layer 3 gets its anchor's Q/K weights, so that sharing alone changes nothing, and its
    adapters start off zero: all of the divergence is theirs, and distillation takes most of
    it away (judged on a chunk no fit reads); the kept state is the fitted one."""
    monkeypatch.setattr(distill, "ADAPTER_LEARNING_RATE", 0.01)  # the tiny model's scale: 20 steps
    model = _peaked_model()
    attention, anchor = model.model.layers[3].self_attn, model.model.layers[2].self_attn
    with torch.no_grad():
        for name in ("q_proj", "k_proj"):
            getattr(attention, name).weight.copy_(getattr(anchor, name).weight)
    plan = build_plan(["3-3"], 6)
    start = {3: HeadMap.from_anchor_heads(2, [0, 1, 2, 3])}
    adapters = LowRankAdapters(model, {3}, rank=2)
    with torch.no_grad():
        for parameter in adapters.up.values():
            parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    held_out = torch.tensor([np.random.default_rng(1).integers(0, 256, FIT_CHUNK_TOKENS).tolist()])
    before = _divergence(model, plan, held_out, adapters)
    size_before = _correction_size(adapters)
    ids = np.random.default_rng(0).integers(0, 256, 4 * FIT_CHUNK_TOKENS).tolist()
    maps, _ = fit_maps_and_temperatures(model, plan, ids, start, steps=20, adapters=adapters)
    after = _divergence(model, plan.with_head_maps(maps), held_out, adapters)
    assert after < 0.5 * before, (before, after)
    size_after = _correction_size(adapters)
    assert size_after < 0.9 * size_before, (size_before, size_after)  # the adapters, not only the maps' gains, undid it
    assert all(parameter.requires_grad for parameter in model.parameters())  # the model is left as it was


def test_weight_decay_keeps_the_corrections_smaller():
    """The same fit, with and without AdamW's decay of the corrections: decayed, they fold
    less into the weights (the maps, which are not decayed, come out of both fits)."""
    plan = build_plan(["3-3"], 6)
    start = {3: HeadMap.from_anchor_heads(2, [0, 1, 2, 3])}
    ids = np.random.default_rng(0).integers(0, 256, 4 * FIT_CHUNK_TOKENS).tolist()
    sizes = {}
    for decay in (0.0, 20.0):
        model = _peaked_model()
        adapters = LowRankAdapters(model, {3}, rank=2)
        maps, _ = fit_maps_and_temperatures(model, plan, ids, start, steps=10, adapters=adapters, adapter_weight_decay=decay)
        assert set(maps) == {3}
        sizes[decay] = _correction_size(adapters)
    assert 0 < sizes[20.0] < 0.5 * sizes[0.0], sizes
