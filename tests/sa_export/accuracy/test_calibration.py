import numpy as np
import pytest

from sa_export.accuracy.calibration import calibrate_head_maps, collect_statistics
from sa_export.hf.models import ModelSource, load_hf_model
from sa_export.core.plan import build_plan


@pytest.fixture(scope="module")
def stats(tiny_llama):
    model = load_hf_model(ModelSource("hf", tiny_llama, "tiny"))
    ids = np.random.default_rng(0).integers(0, 256, 4 * 64).tolist()
    return collect_statistics(model, ids, chunk_tokens=64)


def test_similarity_matrix_is_symmetric_with_a_unit_diagonal(stats):
    sim = stats.layer_similarity()
    assert sim.shape == (6, 6) and stats.chunks == 4 and stats.tokens == 256
    assert np.allclose(np.diag(sim), 1.0) and np.allclose(sim, sim.T)
    assert stats.adjacent_head_similarity().shape == (5, 4)


def _residual(stats, target, head_map_sources, weights):
    idx = [stats.index(l, h) for l, h in head_map_sources]
    w = np.asarray(weights)
    g = stats.gram
    return w @ g[np.ix_(idx, idx)] @ w - 2 * w @ g[target, idx] + g[target, target]


def test_head_map_modes_respect_their_source_rules(stats):
    plan = build_plan(["3-4"], 6)
    argmax = calibrate_head_maps(stats, plan, "argmax")
    assert all(src[0][0] == 2 for src in argmax[4].sources)
    # mix-anchor reads the anchor only; mix-few the anchor and one more layer, the same for every shared layer
    assert {l for hm in calibrate_head_maps(stats, plan, "mix-anchor").values() for src in hm.sources for l, _ in src} == {2}
    few = {l for hm in calibrate_head_maps(stats, plan, "mix-few").values() for src in hm.sources for l, _ in src}
    assert len(few) <= 2 and few <= {0, 1, 2}
    later = build_plan(["4-5"], 6)  # anchor 3; the free mixture may read 0-3
    for extra in (0, 1, 2):
        read = {l for hm in calibrate_head_maps(stats, later, "mix-few", extra_source_layers=extra).values() for src in hm.sources for l, _ in src}
        assert len(read - {3}) <= extra and read <= {0, 1, 2, 3}
    anywhere = calibrate_head_maps(stats, plan, "argmax-any")
    assert all(src[0][0] in (0, 1, 2) for src in anywhere[4].sources)
    # calibrated is argmax: one anchor head per head, which prefill can recompute (graph_passes.gqa_phases)
    assert calibrate_head_maps(stats, plan, "calibrated") == argmax
    mix = calibrate_head_maps(stats, plan, "mix")
    for layer in (3, 4):
        head_map = mix[layer]
        assert head_map.width == 4
        for head, (sources, weights) in enumerate(zip(head_map.sources, head_map.weights)):
            assert all(l in (0, 1, 2) for l, _ in sources)
            assert min(weights) >= 0 and sum(weights) == pytest.approx(1.0)
            # The fitted mixture is never worse than its best single source (a vertex of the simplex).
            target = stats.index(layer, head)
            single = anywhere[layer].sources[head]
            assert _residual(stats, target, sources, weights) <= _residual(stats, target, single, (1.0,)) + 1e-9
    assert calibrate_head_maps(stats, plan, "identity") == {}


def test_maps_may_read_the_heads_a_partly_shared_layer_keeps_and_no_other(stats):
    """Layer 3 lends group 0 (heads 0 and 1) and keeps heads 2 and 3; layer 4 is shared whole.
    Statistics where layer 4's heads look most like layer 3's borrowed heads, then its kept ones."""
    import dataclasses

    cosine, gram = stats.cosine.copy(), stats.gram.copy()
    for head in range(4):
        target = stats.index(4, head)
        cosine[target, : stats.index(4, 0)] = cosine[: stats.index(4, 0), target] = 0.5  # random tiny heads all look alike
        for source, similarity in (((3, 0), 0.99), ((3, 1), 0.98), ((3, 2), 0.97), ((3, 3), 0.96)):
            cosine[target, stats.index(*source)] = cosine[stats.index(*source), target] = similarity
    alike = dataclasses.replace(stats, cosine=cosine, gram=gram)
    plan = build_plan(["3.0", "4"], 6, kv_heads=2, num_heads=4)
    anywhere = calibrate_head_maps(alike, plan, "argmax-any")
    assert {src[0] for src in anywhere[4].sources} == {(3, 2)}  # the most alike head layer 3 computes itself
    plan.with_head_maps(anywhere)  # which the plan takes
    mix = calibrate_head_maps(alike, plan, "mix")
    assert not {(l, h) for src in mix[4].sources for l, h in src} & {(3, 0), (3, 1)}
    assert {(3, 2), (3, 3)} <= {(l, h) for src in mix[4].sources for l, h in src}


@pytest.mark.parametrize("mode", ["mix", "fit"])
def test_convert_with_a_mixture_head_map_passes_check(mode, tiny_llama_with_tokenizer, tmp_path):
    import json

    from tests.helpers import run_cli

    out = tmp_path / mode
    result = run_cli("convert", tiny_llama_with_tokenizer, "--span", "3-4", "--head-map", mode, "--calib-tokens", "512", "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity PASSED" in result.output
    manifest = json.loads((out / "sa_manifest.json").read_text())
    assert manifest["head_map"]["mode"] == mode and manifest["head_map"]["calibration"]["tokens"] == 512
    assert len(manifest["plan"]["head_maps"]["3"]["sources"][0]) % 4 == 0


def test_fit_is_refused_where_only_statistics_are_at_hand(stats):
    from sa_export.core.errors import UsageError

    with pytest.raises(UsageError, match="fitted through the model"):
        calibrate_head_maps(stats, build_plan(["3-4"], 6), "fit")


def test_head_maps_need_a_tokenizer(tiny_llama, tmp_path):
    from tests.helpers import leftovers, run_cli

    result = run_cli("convert", tiny_llama, "--span", "3", "--head-map", "calibrated", "-o", tmp_path / "o", "--no-check")
    assert result.exit_code == 2 and "no tokenizer" in result.stderr
    assert leftovers(tmp_path / "o") == []
