import math
import types

import pytest
import torch

from sa_export.accuracy import frontier
from sa_export.accuracy.frontier import FrontierPoint, forward_selection, recommend, search_frontier, spans_of
from sa_export.accuracy.texts import TokenText
from sa_export.core.errors import UsageError


def test_spans_group_consecutive_layers():
    assert spans_of([9, 3, 4, 7, 8]) == ["3-4", "7-9"]


def test_recommend_reads_a_saving_at_a_tenth_of_a_percent_and_a_penalty_on_every_text():
    def point(mode, k, news, code):
        return FrontierPoint(mode, tuple(range(k)), (), k / 60, 0, {"news": news, "code": code}, {"news": 10.0, "code": 5.0})

    points = [point("identity", 4, 11.0, 6.0), point("calibrated", 4, 10.5, 5.5), point("calibrated", 5, 10.2, 5.1), point("calibrated", 6, 10.1, 6.0)]
    assert recommend(points, 0.067, None) is points[1]  # 4 of 60 caches: 6.67%, asked as 6.7%
    assert recommend(points, None, 0.05) is points[2]  # the largest saving within +5% on both texts
    assert recommend(points, 0.2, None) is None and recommend(points, None, 0.001) is None


def test_forward_selection_judges_the_whole_plan_not_each_unit_alone():
    # a and b are the cheapest alone but costly together; c is dearer alone and adds little.
    alone = {"a": 1.0, "b": 1.1, "c": 2.0, "d": 5.0}

    def plan_cost(units):
        return sum(alone[u] for u in units) + (10.0 if {"a", "b"} <= set(units) else 0.0)

    calls = []
    chosen, trail = forward_selection(list(alone), 3, lambda units: calls.append(tuple(units)) or plan_cost(units))
    assert chosen == ["a", "c", "d"] and trail == [1.0, 3.0, 8.0]
    assert len(calls) == 4 + 3 + 2  # every unit left, at each step
    assert sorted(alone, key=alone.get)[:2] == ["a", "b"]  # what the cheapest-alone search would take


# A model of 8 layers whose perplexity is a table: each text's base is 10, and sharing adds
# every layer's own cost on that text, plus extra where two layers are shared together.
ALONE = {"news": {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.9, 5: 0.5, 6: 0.6, 7: 0.7}, "code": {1: 2.0, 2: 0.2, 3: 0.3, 4: 0.9, 5: 0.5, 6: 0.6, 7: 0.7}}
TOGETHER = {frozenset({2, 3}): 5.0}


def _table_perplexity(model, ids, context, plan=None, inputs=None):
    text = "news" if ids[0] == 0 else "code"
    if plan is None:
        return 10.0
    shared = set(plan.shared_layers)
    extra = sum(cost for pair, cost in TOGETHER.items() if pair <= shared)
    return 10.0 + sum(ALONE[text][layer] for layer in shared) + extra


def _table_nlls(model, ids, context, plan=None, inputs=None):
    """Per-token losses whose perplexity is the table's."""
    return torch.full((len(ids) - 1,), math.log(_table_perplexity(model, ids, context, plan)))


@pytest.fixture
def table_model(monkeypatch):
    monkeypatch.setattr(frontier, "token_nlls", _table_nlls)
    monkeypatch.setattr(frontier, "layer_inputs_of", lambda model, ids, context: None)
    config = types.SimpleNamespace(model_type="llama", num_hidden_layers=8, num_key_value_heads=2, head_dim=4, hidden_size=8, num_attention_heads=2)
    return types.SimpleNamespace(parameters=lambda: iter([torch.zeros(1)])), config


def test_the_search_takes_the_worst_text_and_what_layers_cost_together(table_model):
    model, config = table_model
    news, code = TokenText([0] * 8, "news"), TokenText([1] * 8, "code")
    points, report = search_frontier(
        model, config, None, {"news": news, "code": code}, {"news": news, "code": code}, ["identity"], 3, pool=5, search_cost="worst")
    # Layer 1 is the cheapest on news alone but dear on code; 2 and 3 are cheap alone and dear together.
    assert [p.shared_layers for p in points] == [(2,), (2, 5), (2, 5, 6)]
    assert points[1].spans == ("2-2", "5-5") and points[1].search_penalty == pytest.approx({"news": 0.07, "code": 0.07})
    assert report["pool"] == 5 and report["cost"] == "worst" and set(report["texts"]) == {"news", "code"}
    assert [plan["shared_layers"] for plan in report["plans"]["identity"][:2]] == [[2], [3]]  # cheapest first


def test_the_mean_takes_a_layer_dear_on_one_text_that_the_worst_passes_over(table_model, monkeypatch):
    model, config = table_model
    monkeypatch.setitem(ALONE["code"], 4, 0.0)  # layer 4: +9% on news, free on code
    news, code = TokenText([0] * 8, "news"), TokenText([1] * 8, "code")
    texts = {"news": news, "code": code}
    worst, _ = search_frontier(model, config, None, texts, texts, ["identity"], 2, pool=5, search_cost="worst")
    mean, report = search_frontier(model, config, None, texts, texts, ["identity"], 2, pool=5)
    assert [p.shared_layers for p in worst] == [(2,), (2, 5)]  # worst text +7% against 2 and 4's +11%
    assert [p.shared_layers for p in mean] == [(2,), (2, 4)]  # mean +6.5% against 2 and 5's +7%
    assert report["cost"] == "mean"
    with pytest.raises(UsageError, match="--search-cost"):
        search_frontier(model, config, None, texts, texts, ["identity"], 2, search_cost="median")


def test_the_search_tries_only_the_pool_of_cheapest_single_layers(table_model):
    model, config = table_model
    news = TokenText([0] * 8, "news")
    points, report = search_frontier(model, config, None, {"news": news}, {"news": news}, ["identity"], 2, pool=2)
    assert [p.shared_layers for p in points] == [(1,), (1, 2)]  # news alone: 1 and 2 are the pool
    assert report["plans_searched"] == 7 + 1  # every single layer, then the one pair the pool allows
    with pytest.raises(UsageError, match="--search-pool"):
        search_frontier(model, config, None, {"news": news}, {"news": news}, ["identity"], 2, pool=0)
