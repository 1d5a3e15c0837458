import json

import numpy as np

from sa_export.accuracy.analysis import rank_spans
from tests.helpers import leftovers, run_cli


def test_ranking_prefers_spans_similar_to_their_anchor():
    sim = np.eye(6)
    sim[2, 3] = sim[2, 4] = 0.9
    ranking = rank_spans(sim, 2)
    assert str(ranking[0].span) == "3-4" and ranking[0].anchor == 2
    assert ranking[0].similarity == 0.9 and len(ranking) == 4


def test_analyze_writes_heatmap_json_and_recommends_a_span(tiny_llama_with_tokenizer, tmp_path):
    out = tmp_path / "analysis"
    result = run_cli("analyze", tiny_llama_with_tokenizer, "-o", out, "--share", "2", "--candidates", "2", "--calib-tokens", "512")
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads((out / "similarity.json").read_text())
    assert np.array(data["layer_similarity"]).shape == (6, 6)
    assert data["calibration"]["tokens"] == 512
    assert len(data["search"]["results"]) == 2 and data["search"]["results"][0]["ppl"] > 1
    assert (out / "similarity.png").read_bytes()[:4] == b"\x89PNG"
    assert "apply the best: sa-export convert" in result.output


def test_analyze_refuses_an_impossible_saving(tiny_llama_with_tokenizer, tmp_path):
    result = run_cli("analyze", tiny_llama_with_tokenizer, "-o", tmp_path / "a", "--kv-saving", "0.7")
    assert result.exit_code == 2 and "at most half" in result.stderr
    assert leftovers(tmp_path / "a") == []


def test_frontier_writes_plot_and_points_and_its_command_converts(tiny_llama_with_tokenizer, tmp_path):
    """Plans of 1..2 shared layers per mode, on both texts; --kv-saving picks one whose command converts and passes check."""
    import shlex

    from sa_export.accuracy.frontier import spans_of

    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"w{(i * 13) % 200 + 3}" for i in range(600)))
    calib = tmp_path / "calib.txt"  # held-out head (evaluation) and tail (calibration) share no passage
    calib.write_text(" ".join([*(f"w{(i * 7) % 250 + 3}" for i in range(2100)), *(f"w{(i * 11) % 240 + 5}" for i in range(600))]))
    out = tmp_path / "analysis"
    result = run_cli("analyze", tiny_llama_with_tokenizer, "-o", out, "--frontier", "--max-shared", "2", "--kv-saving", "0.15",
                     "--calib", calib, "--calib-tokens", "512", "--other-text", other)
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads((out / "frontier.json").read_text())
    points = data["points"]
    assert [(p["mode"], len(p["shared_layers"])) for p in points] == [("identity", 1), ("identity", 2), ("mix-few", 1), ("mix-few", 2)]
    for point in points:
        assert set(point["penalty"]) == {"calib-domain", "other-domain"} and point["spans"] == spans_of(point["shared_layers"])
        assert point["kv_fraction_saved"] == len(point["shared_layers"]) / 12
    assert data["recommended"]["kv_fraction_saved"] >= 0.15 and data["timing"]["seconds"] > 0
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    command = data["convert_command"]
    assert command in result.output and command.startswith("sa-export convert ")
    args = shlex.split(command)[2:]
    converted = run_cli("convert", *args, "-o", tmp_path / "sa", "--calib", calib, "--calib-tokens", "512")
    assert converted.exit_code == 0, converted.output + converted.stderr


def test_spans_group_consecutive_layers():
    from sa_export.accuracy.frontier import spans_of

    assert spans_of([9, 3, 4, 7, 8]) == ["3-4", "7-9"]


def test_recommend_reads_a_saving_at_a_tenth_of_a_percent_and_a_penalty_on_every_text():
    from sa_export.accuracy.frontier import FrontierPoint, recommend

    def point(mode, k, news, code):
        return FrontierPoint(mode, tuple(range(k)), (), k / 60, 0, {"news": news, "code": code}, {"news": 10.0, "code": 5.0})

    points = [point("identity", 4, 11.0, 6.0), point("calibrated", 4, 10.5, 5.5), point("calibrated", 5, 10.2, 5.1), point("calibrated", 6, 10.1, 6.0)]
    assert recommend(points, 0.067, None) is points[1]  # 4 of 60 caches: 6.67%, asked as 6.7%
    assert recommend(points, None, 0.05) is points[2]  # the largest saving within +5% on both texts
    assert recommend(points, 0.2, None) is None and recommend(points, None, 0.001) is None
