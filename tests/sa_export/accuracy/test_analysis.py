import json

import numpy as np

from sa_export.accuracy.analysis import rank_spans
from sa_export.accuracy.texts import other_domain_text_path
from sa_export.core.manifest import Manifest
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

    other = tmp_path / "other.txt"  # long enough for two blocks of an interval
    other.write_text(" ".join(f"w{(i * 13) % 200 + 3}" for i in range(1200)))
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
        assert set(point["penalty_interval"]) == set(point["penalty"])
        for text, interval in point["penalty_interval"].items():  # how sure each penalty is, on each text
            assert interval["low"] <= point["penalty"][text] <= interval["high"] and interval["blocks"] >= 2
    assert data["recommended"]["kv_fraction_saved"] >= 0.15 and data["search"]["seconds"] > 0
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    command = data["convert_command"]
    assert command in result.output and command.startswith("sa-export convert ")
    assert "its penalty: calib-domain" in result.output and result.output.count("95% interval") == 2
    args = shlex.split(command)[2:]
    # Calibrated maps carry the text they were calibrated on, so that convert builds the maps measured here.
    assert ("--head-map" in args) == (args[-4:] == ["--calib", str(calib), "--calib-tokens", "512"])
    converted = run_cli("convert", *args, "-o", tmp_path / "sa")
    assert converted.exit_code == 0, converted.output + converted.stderr
    # The same plan healed: fitted maps and corrections on the same text, which reads as much as
    # a fit with corrections reads by default (the tiny text has less: the test shortens the fit).
    heal = data["heal_command"]
    assert f"heal it: {heal}" in result.output
    assert heal == f"sa-export convert {shlex.split(command)[2]} {' '.join(f'--span {s}' for s in data['recommended']['spans'])} --head-map fit --lora-rank 8 --calib {calib}"
    healed = run_cli("convert", *shlex.split(heal)[2:], "--calib-tokens", "512", "--fit-steps", "2", "-o", tmp_path / "healed")
    assert healed.exit_code == 0, healed.output + healed.stderr
    assert (tmp_path / "healed" / "corrections.safetensors").is_file()


def test_frontier_searches_on_every_calibration_text_and_reports_on_another_domain(tiny_llama_with_tokenizer, tmp_path):
    first, second, other, third = (tmp_path / f"{name}.txt" for name in ("first", "second", "other", "third"))
    first.write_text(" ".join([*(f"w{(i * 7) % 250 + 3}" for i in range(2100)), *(f"w{(i * 11) % 240 + 5}" for i in range(600))]))
    second.write_text(" ".join(f"w{(i * 17) % 230 + 4}" for i in range(700)))
    other.write_text(" ".join(f"w{(i * 13) % 200 + 3}" for i in range(600)))
    third.write_text(" ".join(f"w{(i * 19) % 210 + 6}" for i in range(600)))
    (tmp_path / "more").mkdir()
    namesake = tmp_path / "more" / "third.txt"  # a file of the same name in another folder keeps its own entry
    namesake.write_text(" ".join(f"w{(i * 23) % 220 + 7}" for i in range(600)))
    out = tmp_path / "analysis"
    result = run_cli("analyze", tiny_llama_with_tokenizer, "-o", out, "--frontier", "--max-shared", "2", "--search-pool", "2",
                     "--frontier-maps", "mix-few", "--calib", first, "--calib", second, "--calib-tokens", "512", "--other-text", other,
                     "--other-text", third, "--other-text", namesake, "--kv-saving", "0.15", "--eval-tokens", "1024")
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads((out / "frontier.json").read_text())
    assert set(data["search"]["texts"]) == {"search:first.txt", "search:second.txt"} and data["search"]["pool"] == 2
    assert [text["tokens"] for text in data["search"]["texts"].values()] == [512, 512]
    assert [point["mode"] for point in data["points"]] == ["mix-few", "mix-few"]
    for point in data["points"]:
        assert set(point["search_penalty"]) == {"search:first.txt", "search:second.txt"}
        assert set(point["penalty"]) == {"calib-domain", "other-domain", "other-domain:third.txt", "other-domain:third.txt (3)"}
        assert point["penalty"]["other-domain:third.txt"] != point["penalty"]["other-domain"]
    judged = data["search"]["judged_texts"]
    assert str(other.resolve()) in judged["other-domain"]["source"] and str(third.resolve()) in judged["other-domain:third.txt"]["source"]
    assert str(namesake.resolve()) in judged["other-domain:third.txt (3)"]["source"]
    assert judged["calib-domain"]["tokens"] == 1024  # --eval-tokens: the held-out head judged
    assert all(point["penalty"]["other-domain:third.txt (3)"] != point["penalty"]["other-domain:third.txt"] for point in data["points"])
    assert "plans on search:first.txt, search:second.txt" in result.output
    assert data["convert_command"].endswith(f" --head-map mix-few --calib {first} --calib {second} --calib-tokens 512")
    refused = run_cli("analyze", tiny_llama_with_tokenizer, "-o", tmp_path / "refused", "--frontier", "--max-shared", "1",
                      "--calib", first, "--calib", second, "--calib-tokens", "512", "--other-text", second)
    assert refused.exit_code == 2 and "also a calibration text" in refused.stderr
    assert leftovers(tmp_path / "refused") == []
    for bad, message in (([tmp_path / "missing.txt"], "not found"), (["none"], "never reads"), ([other, other], "given twice"),
                         (["default", other_domain_text_path()], "given twice (default is that file)")):
        options = [item for name in bad for item in ("--other-text", name)]
        refused = run_cli("analyze", tiny_llama_with_tokenizer, "-o", tmp_path / "refused", "--frontier", *options)
        assert refused.exit_code == 2 and message in refused.stderr and "loading" not in refused.stderr, (bad, refused.stderr)
    for option in (["--other-text", other], ["--eval-tokens", "4096"]):  # both are about the frontier's judged texts
        refused = run_cli("analyze", tiny_llama_with_tokenizer, "-o", tmp_path / "refused", *option)
        assert refused.exit_code == 2 and "give it with --frontier" in refused.stderr and "loading" not in refused.stderr
    refused = run_cli("analyze", tiny_llama_with_tokenizer, "-o", tmp_path / "refused", "--frontier", "--frontier-maps", "identity,fit")
    assert refused.exit_code == 2 and "--frontier-maps identity,fit: choose among" in refused.stderr


def test_frontier_of_kv_groups_has_finer_points_and_its_command_converts(tiny_llama_with_tokenizer, tmp_path):
    """Layers and KV groups side by side: the tiny Llama's 2 KV groups a layer make points of 1/24
    of the cache, half a layer's; the recommended group plan converts (the builder's graph) and passes check."""
    import shlex

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join([*(f"w{(i * 7) % 250 + 3}" for i in range(2100)), *(f"w{(i * 11) % 240 + 5}" for i in range(600))]))
    out = tmp_path / "analysis"
    result = run_cli("analyze", tiny_llama_with_tokenizer, "-o", out, "--frontier", "--max-shared", "1", "--frontier-maps", "identity",
                     "--frontier-unit", "layer,kv-group", "--search-pool", "3", "--kv-saving", "0.04", "--calib", calib, "--calib-tokens", "512")
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads((out / "frontier.json").read_text())
    by_unit = {unit: [p for p in data["points"] if p["unit"] == unit] for unit in ("layer", "kv-group")}
    assert [p["kv_fraction_saved"] for p in by_unit["layer"]] == [1 / 12]
    assert [p["kv_fraction_saved"] for p in by_unit["kv-group"]] == [1 / 24, 2 / 24]  # as many groups as 1 layer holds
    first = by_unit["kv-group"][0]
    assert len(first["spans"]) == 1 and "." in first["spans"][0] and first["kv_bytes_saved_per_token"] == 16 * 4
    assert set(data["search"]["plans"]) == {"identity", "identity, KV groups"} and data["search"]["units"] == ["layer", "kv-group"]
    assert "identity, KV groups" in result.output
    command = data["convert_command"]
    assert command == f"sa-export convert {tiny_llama_with_tokenizer} --span {first['spans'][0]}"  # the least saving of 4% or more
    converted = run_cli("convert", *shlex.split(command)[2:], "-o", tmp_path / "sa")
    assert converted.exit_code == 0 and "parity PASSED" in converted.output, converted.output + converted.stderr
    assert Manifest.read(tmp_path / "sa").exporter == "genai"  # the fastest ONNX Runtime graph shares part of a layer too
    refused = run_cli("analyze", tiny_llama_with_tokenizer, "-o", tmp_path / "refused", "--frontier", "--frontier-unit", "head")
    assert refused.exit_code == 2 and "--frontier-unit head: choose" in refused.stderr and "loading" not in refused.stderr
    refused = run_cli("analyze", tiny_llama_with_tokenizer, "-o", tmp_path / "refused", "--frontier-unit", "kv-group")
    assert refused.exit_code == 2 and "give it with --frontier" in refused.stderr
