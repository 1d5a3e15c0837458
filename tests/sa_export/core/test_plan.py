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


def test_kv_groups_share_part_of_a_layer():
    # 9 query heads in 3 KV groups, as SmolLM2: group 1 of layer 26 is its heads 3-5.
    plan = build_plan(["25", "26.1", "26.2", "28.0"], 30, kv_heads=3, num_heads=9)
    assert plan.anchors == {25: 24, 26: 24, 28: 27}
    assert plan.whole_layers == (25,) and plan.shared_groups == {26: (1, 2), 28: (0,)}
    assert plan.borrowed_heads(26) == (3, 4, 5, 6, 7, 8) and plan.borrowed_heads(25) is None
    assert plan.kept_groups(26) == (0,) and plan.kept_groups(28) == (1, 2)
    assert plan.shared_heads == {26: (3, 4, 5, 6, 7, 8), 28: (0, 1, 2)}
    # One K cache of 60 is 1/60 of the KV cache: layer 25's whole, 2/3 and 1/3 of the others'.
    assert plan.kv_fraction_saved == pytest.approx((1 + 2 / 3 + 1 / 3) / 60)
    assert plan.describe() == "layers 25, 26.1+2 <- anchor 24; layers 28.0 <- anchor 27"
    assert SharingPlan.from_json(plan.to_json()) == plan


def test_every_group_of_a_layer_is_the_whole_layer_and_whole_plans_keep_their_json():
    plan = build_plan(["5.0", "5.1", "5.2"], 12, kv_heads=3, num_heads=9)
    assert plan.whole_layers == (5,) and not plan.shared_groups
    assert plan.to_json() == build_plan(["5"], 12).to_json()
    assert "shared_groups" not in plan.to_json()


@pytest.mark.parametrize(
    "spans, kv_heads, message",
    [
        (["5.3"], 3, "has 3 KV groups"),
        (["5.1", "5.1"], 3, "given twice"),
        (["5.1", "4-6"], 3, "overlap"),
        (["5.1"], 0, "KV heads are not known"),
        (["40.1"], 3, "out of range"),
        (["5.x"], 3, "not of the form"),
    ],
)
def test_bad_groups_are_refused_with_a_reason(spans, kv_heads, message):
    with pytest.raises(PlanError, match=message):
        build_plan(spans, 12, kv_heads=kv_heads, num_heads=3 * kv_heads)


def test_groups_take_one_anchor_for_all_or_none():
    assert build_plan(["5.0", "8"], 12, [2], kv_heads=3, num_heads=9).anchors == {5: 2, 8: 2}
    with pytest.raises(PlanError, match="once for all spans"):
        build_plan(["5.0", "8"], 12, [2, 3], kv_heads=3, num_heads=9)
