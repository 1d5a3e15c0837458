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
