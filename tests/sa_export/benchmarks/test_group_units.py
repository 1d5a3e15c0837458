import numpy as np

from sa_export.accuracy.calibration import AttentionStatistics
from sa_export.accuracy.intervals import PenaltyInterval
from sa_export.benchmarks.group_units import _penalty_cell, unit_plan


def _stats(maps=None, layers=5, heads=4, group_size=2):
    """Statistics of ``maps`` ([layers * heads, positions]; random by default), as one chunk."""
    maps = np.random.default_rng(0).random((layers * heads, 40)) if maps is None else maps
    gram = maps @ maps.T
    norms = np.sqrt(np.diag(gram))
    return AttentionStatistics(layers, heads, gram, gram / norms[:, None] / norms[None, :], maps.shape[1], 1, group_size)


def test_borrowed_heads_read_only_heads_that_are_not_borrowed():
    stats = _stats()
    plan, heads = unit_plan([(2, 1), (3, None), (4, 0)], stats, "mix", 5, 2)
    assert heads == {2: (2, 3), 3: (0, 1, 2, 3), 4: (0, 1)}
    assert plan.anchors == {2: 1, 3: 2, 4: 3}
    borrowed = {(layer, h) for layer, hs in heads.items() for h in hs}
    for layer, hs in heads.items():
        for head in hs:
            sources = plan.head_maps[layer].sources[head]
            assert all(l < layer and (l, h) not in borrowed for l, h in sources), (layer, head, sources)


def test_a_partly_shared_layer_keeps_serving_its_own_heads_as_sources():
    rng = np.random.default_rng(1)
    maps = rng.random((5 * 4, 40))
    maps[4 * 4 + 0] = maps[2 * 4 + 0]  # head 0 of layer 4 attends exactly as head 0 of layer 2
    stats = _stats(maps)
    plan, _ = unit_plan([(2, 1), (4, 0)], stats, "argmax-any", 5, 2)
    assert plan.head_maps[4].sources[0] == ((2, 0),)  # layer 2 lends group 1 only: head 0 is its own
    plan, _ = unit_plan([(2, 0), (4, 0)], stats, "argmax-any", 5, 2)
    assert plan.head_maps[4].sources[0] != ((2, 0),)  # now borrowed itself


def test_a_layer_of_every_group_is_the_whole_layer():
    stats = _stats()
    groups, _ = unit_plan([(3, 0), (3, 1)], stats, "argmax-any", 5, 2)
    whole, heads = unit_plan([(3, None)], stats, "argmax-any", 5, 2)
    assert heads == {3: (0, 1, 2, 3)}
    assert groups.head_maps[3] == whole.head_maps[3]


def test_a_named_plan_reads_whole_layers_and_kv_groups():
    from sa_export.benchmarks.group_units import _layers_worth, _named_plan

    assert _named_plan("26.1 25 26.0") == ("kv-group", [(25, None), (26, 0), (26, 1)])
    assert _named_plan("27 25") == ("layer", [(25, None), (27, None)])
    assert _layers_worth(_named_plan("25 26.0 26.1")[1], 3) == 1 + 2 / 3


def test_a_penalty_cell_gives_the_interval_when_the_text_has_one():
    assert _penalty_cell(0.031, PenaltyInterval(0.02, 0.042, 32, 128)) == "+3.1% [+2.0,+4.2]"
    assert _penalty_cell(-0.004, None) == "-0.4%"
