import pytest

from sa_export.core.errors import PlanError
from sa_export.core.plan import HeadMap, SharingPlan, Span, build_plan


def test_span_shares_every_layer_and_anchors_on_the_layer_before():
    plan = build_plan(["23-26"], 30)
    assert plan.shared_layers == (23, 24, 25, 26)
    assert set(plan.anchors.values()) == {22}


def test_single_layer_span_and_several_spans():
    plan = build_plan(["5", "10-11"], 12)
    assert plan.anchors == {5: 4, 10: 9, 11: 9}


def test_adjacent_spans_take_the_last_unshared_layer_as_anchor():
    plan = build_plan(["5-6", "7-8"], 12)
    assert plan.anchors[7] == 4 and plan.anchors[5] == 4


def test_explicit_anchor_once_for_all_spans_and_once_per_span():
    assert set(build_plan(["5-6", "8-9"], 12, [2]).anchors.values()) == {2}
    assert build_plan(["5-6", "8-9"], 12, [2, 7]).anchors == {5: 2, 6: 2, 8: 7, 9: 7}


@pytest.mark.parametrize(
    "spans, anchors, message",
    [
        (["3-40"], [], "out of range"),
        (["0-2"], [], "starts at layer 0"),
        (["2-4", "4-5"], [], "overlap"),
        (["2-4"], [3], "inside span"),
        (["2-4"], [5], "after span"),
        (["2-4", "6-7"], [1, 3], "itself shared"),
        (["2-4", "6-7"], [1, 1, 1], "--anchor values"),
        (["a-b"], [], "not of the form"),
        (["5-3"], [], "ends before it starts"),
        ([], [], "no --span"),
    ],
)
def test_bad_plans_are_refused_with_a_reason(spans, anchors, message):
    with pytest.raises(PlanError, match=message):
        build_plan(spans, 12, anchors)


def test_layers_of_different_kinds_cannot_share_unless_forced():
    kinds = ["sliding_attention", "full_attention"] * 3
    with pytest.raises(PlanError, match="differs in kind"):
        build_plan(["2"], 6, layer_kinds=kinds)
    assert build_plan(["2"], 6, layer_kinds=kinds, force=True).anchors == {2: 1}
    assert build_plan(["3"], 6, [1], layer_kinds=kinds).anchors == {3: 1}


def test_plan_round_trips_through_json():
    plan = SharingPlan(10, {4: 3, 5: 3}, {5: HeadMap.from_anchor_heads(3, (1, 1, 0, 2))})
    assert SharingPlan.from_json(plan.to_json()) == plan
    assert Span.parse(" 3 - 5 ") == Span(3, 5)
