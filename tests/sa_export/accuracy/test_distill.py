import numpy as np
import pytest
import torch

from sa_export.accuracy.calibration import calibrate_head_maps, collect_statistics
from sa_export.accuracy import distill, layer_inputs
from sa_export.accuracy.distill import FIT_CHUNK_TOKENS, fit_head_maps
from sa_export.accuracy.reference import shared_attention
from sa_export.core.plan import HeadMap, build_plan
from tests.sa_export.accuracy.test_reference import _model


@torch.no_grad()
def _divergence(model, plan, ids) -> float:
    """Mean KL from the base model's next-token distribution to the SA model's."""
    teacher = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    with shared_attention(model, plan):
        student = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())


def _peaked_model():
    """The tiny random model with larger Q/K weights: peaked maps that differ from layer to
    layer, so that which map a shared layer reads matters (at init they are almost uniform)."""
    model = _model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def _anchor_copies_started_wrong():
    """Layers 3 and 4 with the anchor's (layer 2's) Q/K weights, and start maps that read a
    wrong permutation of the anchor's heads: model, calibration ids, plan, start."""
    model = _peaked_model()
    with torch.no_grad():
        for layer in (3, 4):
            for name in ("q_proj", "k_proj"):
                getattr(model.model.layers[layer].self_attn, name).weight.copy_(getattr(model.model.layers[2].self_attn, name).weight)
    ids = np.random.default_rng(0).integers(0, 256, 4 * FIT_CHUNK_TOKENS).tolist()
    plan = build_plan(["3-4"], 6)
    start = {layer: HeadMap.from_anchor_heads(2, [(head + 2) % 4 for head in range(4)]) for layer in (3, 4)}
    return model, ids, plan, start


@pytest.mark.parametrize(
    "teacher_kept, hidden_weight", [(True, 0.0), (False, 0.0), (True, 1.0), (False, 1.0)],
    ids=["teacher-kept", "teacher-recomputed", "hidden-kept", "hidden-recomputed"],
)
def test_fit_finds_the_heads_that_a_shared_layer_should_read(teacher_kept, hidden_weight, monkeypatch):
    """Layers 3 and 4 get the anchor's Q/K weights, so each head's own map is close to the
    anchor's same head. Started from a wrong permutation, the fit moves there (with the
    hidden states' distance in the loss, too)."""
    if not teacher_kept:
        monkeypatch.setattr(distill, "TEACHER_CACHE_BYTES", 0)
    model, ids, plan, start = _anchor_copies_started_wrong()
    fitted = distill.fit_maps_and_temperatures(model, plan, ids, start, steps=20, hidden_weight=hidden_weight)[0]
    assert sorted(fitted) == [3, 4]
    for head_map in fitted.values():
        assert head_map.sources[0] == ((2, 0), (2, 1), (2, 2), (2, 3))  # every head of the start's layers
        assert min(min(weights) for weights in head_map.weights) >= 0
        assert [max(range(4), key=weights.__getitem__) for weights in head_map.weights] == [0, 1, 2, 3]
    held_out = torch.tensor([np.random.default_rng(1).integers(0, 256, FIT_CHUNK_TOKENS).tolist()])
    before = _divergence(model, plan.with_head_maps(start), held_out)
    after = _divergence(model, plan.with_head_maps(fitted), held_out)
    assert after < 0.5 * before, (before, after)
    assert all(parameter.requires_grad for parameter in model.parameters())  # the model is left as it was


def test_the_fit_reports_the_held_out_divergence_at_the_start_and_each_validation():
    model, ids, plan, start = _anchor_copies_started_wrong()
    heard = []
    distill.fit_maps_and_temperatures(model, plan, ids, start, steps=20, on_validate=lambda step, kl: heard.append((step, kl)))
    assert [step for step, _ in heard] == [0, 10, 20]
    assert heard[-1][1] < 0.5 * heard[0][1], heard  # the wrong start is far worse than the fit


def test_fit_needs_a_chunk_of_text():
    from sa_export.core.errors import UsageError

    model = _model()
    plan = build_plan(["3"], 6)
    with pytest.raises(UsageError, match="at least"):
        fit_head_maps(model, plan, list(range(10)), {}, steps=1)
    with pytest.raises(UsageError, match="at least 1024 tokens"):  # the chunk the fit is asked to read
        distill.fit_maps_and_temperatures(model, plan, list(range(FIT_CHUNK_TOKENS)), {}, steps=1, chunk_tokens=1024)


def test_the_fit_keeps_the_start_where_it_is_better_on_held_out_text():
    """At init the tiny model's maps are almost uniform: the start is as good as it gets, and
    steps of the learning rate's size only add noise; the held-out chunk keeps the start."""
    model = _model()
    ids = np.random.default_rng(0).integers(0, 256, 4 * FIT_CHUNK_TOKENS).tolist()
    plan = build_plan(["3-4"], 6)
    start = calibrate_head_maps(collect_statistics(model, ids, chunk_tokens=64), plan, "mix-few")
    assert fit_head_maps(model, plan, ids, start, steps=10) == start


def test_temperature_fit_finds_the_sharper_maps_of_a_scaled_query():
    """Layer 3 gets the anchor's K weights and twice its Q weights: its maps are close to the
    anchor's squared and renormalized (a temperature of 2), as far as its input is still the
    anchor's (the residual stream of the tiny model changes little from layer to layer)."""
    from sa_export.accuracy.distill import fit_maps_and_temperatures

    model = _peaked_model()
    with torch.no_grad():
        for layer in (3,):
            attention, anchor = model.model.layers[layer].self_attn, model.model.layers[2].self_attn
            attention.k_proj.weight.copy_(anchor.k_proj.weight)
            attention.q_proj.weight.copy_(2 * anchor.q_proj.weight)
    ids = np.random.default_rng(0).integers(0, 256, 4 * FIT_CHUNK_TOKENS).tolist()
    plan = build_plan(["3-3"], 6)
    start = {3: HeadMap.from_anchor_heads(2, [0, 1, 2, 3])}
    maps, log_temperatures = fit_maps_and_temperatures(model, plan, ids, start, steps=30, temperature=True)
    assert sorted(log_temperatures) == [3]
    temperatures = torch.exp(log_temperatures[3])
    assert torch.all(temperatures > 1.1), temperatures  # sharper than the anchor's
    without, none = fit_maps_and_temperatures(model, plan, ids, start, steps=30)
    assert none is None
    held_out = torch.tensor([np.random.default_rng(1).integers(0, 256, FIT_CHUNK_TOKENS).tolist()])
    teacher = torch.log_softmax(model(input_ids=held_out).logits.float(), -1)

    def divergence(plan, temperatures=None):
        with torch.no_grad(), shared_attention(model, plan, log_temperatures=temperatures):
            student = torch.log_softmax(model(input_ids=held_out).logits.float(), -1)
        return float((teacher.exp() * (teacher - student)).sum(-1).mean())

    assert divergence(plan.with_head_maps(maps), log_temperatures) < divergence(plan.with_head_maps(without))


@pytest.mark.parametrize("teacher_kept", [True, False], ids=["kept", "recomputed"])
def test_the_teacher_gives_the_hidden_states_from_the_first_shared_layer_on(teacher_kept, monkeypatch):
    if not teacher_kept:
        monkeypatch.setattr(distill, "TEACHER_CACHE_BYTES", 0)
    model, ids, plan, _ = _anchor_copies_started_wrong()
    teacher = distill._Teacher(model, [ids[:FIT_CHUNK_TOKENS]], hidden_from=3)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids[:FIT_CHUNK_TOKENS]]), output_hidden_states=True).hidden_states
    hidden = teacher.base_and_hidden(0)[1]
    assert hidden.shape == (3, FIT_CHUNK_TOKENS, model.config.hidden_size)  # outputs of layers 3, 4 and 5
    torch.testing.assert_close(hidden, torch.stack([h[0] for h in expected[4:]]), rtol=1e-2, atol=1e-2)  # kept in fp16
    assert float(distill._standardized_distance(hidden, hidden)) == 0.0
    with torch.no_grad(), shared_attention(model, plan):
        _, shared = teacher.log_probs_and_hidden(0)
    assert float(distill._standardized_distance(hidden, shared)) > 0.0


def test_a_fit_with_corrections_takes_more_steps_unless_told():
    assert distill.default_fit_steps(False) == distill.FIT_STEPS
    assert distill.default_fit_steps(True) == distill.FIT_STEPS_WITH_CORRECTIONS > distill.FIT_STEPS


def test_the_teacher_keeps_at_most_half_the_memory_the_host_has_free(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        8000000 kB\nMemFree:          100000 kB\nMemAvailable:    4194304 kB\n")
    monkeypatch.setattr(layer_inputs, "MEMINFO", str(meminfo))
    assert distill.teacher_cache_budget(torch.device("cpu")) == 2 << 30
    meminfo.write_text("MemAvailable:  100000000 kB\n")
    assert distill.teacher_cache_budget(torch.device("cpu")) == distill.TEACHER_CACHE_BYTES
    monkeypatch.setattr(layer_inputs, "MEMINFO", str(tmp_path / "absent"))
    assert distill.teacher_cache_budget(torch.device("cpu")) == distill.TEACHER_CACHE_BYTES


def test_soft_targets_weigh_the_tail_of_the_teachers_distribution():
    """At a temperature T the divergence is T^2 times that of both distributions flattened:
    zero where they agree, and a student that misses only the teacher's unlikely tokens pays
    more of its divergence than at 1."""
    teacher = torch.log_softmax(torch.tensor([[6.0, 2.0, 0.0, 0.0]]), -1)
    assert distill._kl(teacher, teacher, 2.0) == 0
    tail_wrong = torch.log_softmax(torch.tensor([[6.0, 0.0, 2.0, 0.0]]), -1)
    flattened = [torch.log_softmax(t / 2.0, -1) for t in (teacher, tail_wrong)]
    torch.testing.assert_close(distill._kl(teacher, tail_wrong, 2.0), 4 * distill._kl(*flattened))
    assert distill._kl(teacher, tail_wrong, 2.0) > 2 * distill._kl(teacher, tail_wrong)


def test_a_fit_of_part_of_each_layer_moves_only_the_heads_that_borrow():
    """With ``shared_heads``, heads 2 and 3 of layers 3 and 4 keep their own attention: the fit
    moves heads 0 and 1 to the anchor heads they should read, and leaves the others' weights
    where they started (they have no gradient)."""
    model, ids, plan, start = _anchor_copies_started_wrong()
    borrowed = {3: (0, 1), 4: (0, 1)}
    fitted = distill.fit_maps_and_temperatures(model, plan, ids, start, steps=20, shared_heads=borrowed)[0]
    for layer, head_map in fitted.items():
        picks = [max(range(4), key=weights.__getitem__) for weights in head_map.weights]
        assert picks[:2] == [0, 1], (layer, picks)
        assert picks[2:] == [0, 1], (layer, picks)  # the start's wrong picks, (h + 2) % 4, untouched


def test_a_map_may_read_the_heads_that_a_partly_shared_layer_keeps():
    """Heads 2 and 3 of layer 3 keep their own attention, so layer 4's borrowed heads may read
    them (a plan of whole layers refuses that); the fit keeps those sources and does no worse."""
    model, ids, plan, start = _anchor_copies_started_wrong()
    borrowed = {3: (0, 1), 4: (0, 1)}
    start = {3: start[3], 4: HeadMap((((3, 2),),) * 4, ((1.0,),) * 4)}
    seen = []
    fitted = distill.fit_maps_and_temperatures(model, plan, ids, start, steps=10, shared_heads=borrowed,
                                               on_validate=lambda step, divergence: seen.append(divergence))[0]
    assert fitted[4].layers == (3,) and seen[-1] <= seen[0]


@pytest.mark.parametrize("hidden_weight", [0.0, 1.0], ids=["divergence", "hidden"])
def test_the_fit_from_the_first_changed_layer_is_the_fit_of_the_whole_model(hidden_weight, monkeypatch):
    """The student runs from the lowest layer the fit changes, here layer 1, whose V
    projection a correction takes; run whole, the fit takes the same steps."""
    from sa_export.accuracy.adapters import LowRankAdapters

    def fit(model, ids, plan, start):
        adapters = LowRankAdapters(model, [3, 4], rank=2)
        adapters.add(model, {1: ("v_proj",)})
        calls, heard = [], []
        model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
        maps = distill.fit_maps_and_temperatures(
            model, plan, ids, start, steps=4, adapters=adapters, hidden_weight=hidden_weight, on_validate=lambda step, kl: heard.append(kl))[0]
        return maps, heard, len(calls)

    maps, heard, calls = fit(*_anchor_copies_started_wrong())
    monkeypatch.setattr(layer_inputs.LayerInputs, "start_for", lambda self, first: 0)
    whole_maps, whole_heard, whole_calls = fit(*_anchor_copies_started_wrong())
    assert heard == pytest.approx(whole_heard, rel=1e-4)  # the held-out divergence at the start and after the steps
    for layer, head_map in whole_maps.items():
        np.testing.assert_allclose(maps[layer].weights, head_map.weights, rtol=1e-4, atol=1e-6)
    assert calls < whole_calls / 2  # layer 0 ran for the teacher only


def test_a_fitted_map_never_reads_a_head_its_source_layer_borrows():
    from sa_export.accuracy.distill import _FittedMaps

    # Layer 4 starts from layer 3 (which lends heads 0 and 1) and layer 2; every head of those it may read.
    start = {4: HeadMap((((3, 2), (2, 0)),) * 4, ((0.5, 0.5),) * 4)}
    fitted = _FittedMaps(start, 4, borrowed={3: (0, 1)})
    assert fitted.sources[4] == ((2, 0), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3))
    assert all(h not in (0, 1) for l, h in fitted.head_maps()[4].sources[0] if l == 3)
