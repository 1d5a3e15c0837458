import json

import pytest

from sa_export.accuracy.texts import default_text_path, other_domain_text_path
from tests.helpers import move_fitted_corrections, run_cli


def test_default_text_is_available_offline():
    path = default_text_path()
    assert path.stat().st_size > 100_000


def test_eval_reports_both_perplexities_and_json(tiny_llama_with_tokenizer, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250 + 3}" for i in range(1200)))
    report = tmp_path / "eval.json"
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "2-4", "--text", text, "--context", "128", "--json", report)
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["eval_tokens"] == 1200 and data["calib_tokens"] == 0
    assert data["base_ppl"] > 1 and data["sa_ppl"] > 1 and data["base_ppl"] != data["sa_ppl"]
    assert "base ppl" in result.output and "SA ppl" in result.output
    # and the same on text of another domain (default: Python source)
    other = data["other_domain"]
    assert "module.py" in other["source"] and other["tokens"] > 2
    assert other["base_ppl"] > 1 and other["sa_ppl"] > 1 and other["base_ppl"] != data["base_ppl"]
    assert "other domain" in result.output
    # how sure each penalty is: a 95% interval over blocks of 512 tokens, around the penalty given
    for report in (data, other):
        interval, penalty = report["penalty_interval"], report["sa_ppl"] / report["base_ppl"] - 1
        assert interval["low"] < penalty < interval["high"] and interval["block_tokens"] == 512
    assert data["penalty_interval"]["blocks"] == 1190 // 512 and result.output.count("95% interval") == 2  # 10 windows of 128 score 1,190 tokens


def test_eval_other_domain_can_be_given_or_skipped(tiny_llama_with_tokenizer, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250 + 3}" for i in range(300)))
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"w{(i * 13) % 200 + 3}" for i in range(300)))
    reports = {}
    for name, values in {"given": [other], "both": [other, "default"], "none": ["none"]}.items():
        reports[name] = tmp_path / f"{name}.json"
        options = [item for value in values for item in ("--other-text", value)]
        result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "2-4", "--text", text, "--context", "128", *options, "--json", reports[name])
        assert result.exit_code == 0, result.stderr
        # 300 tokens are less than two blocks: each penalty on them says it has no interval (the default other text is longer)
        assert result.output.count("no 95% interval: fewer than two blocks of 512 tokens") == 1 + values.count(other)
    given, both, none = (json.loads(reports[name].read_text()) for name in ("given", "both", "none"))
    assert given["other_domain"]["source"].startswith(str(other.resolve())) and len(given["other_domains"]) == 1
    # several texts in one run: each as it is alone, in the order given
    assert both["other_domains"][0] == given["other_domain"] and "module.py" in both["other_domains"][1]["source"]
    assert both["other_domains"][1]["sa_ppl"] != both["other_domains"][0]["sa_ppl"]
    assert none["other_domain"] is None and none["other_domains"] == []


def test_eval_refuses_other_texts_before_it_calibrates(tiny_llama_with_tokenizer, tmp_path):
    """A missing file, a text given twice and a calibration text fail in seconds with exit 2, before any fit."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250 + 3}" for i in range(300)))
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 11) % 250 + 3}" for i in range(900)))
    short = tmp_path / "short.txt"
    short.write_text("w5")
    common = ["eval", tiny_llama_with_tokenizer, "--span", "3-4", "--text", text, "--head-map", "fit", "--fit-steps", "1", "--calib", calib]
    for options, message in (
        (["--other-text", tmp_path / "missing.txt"], "not found"),
        (["--other-text", calib], "also a calibration text"),
        (["--other-text", text, "--other-text", text], "given twice"),
        (["--other-text", text, "--other-text", "none"], "give it alone"),
        (["--other-text", "default", "--other-text", other_domain_text_path()], "given twice (default is that file)"),
        (["--other-text", short], "too few to score"),
    ):
        result = run_cli(*common, *options)
        assert result.exit_code == 2 and message in result.stderr, (options, result.stderr)
        assert "fitting" not in result.stderr


def test_eval_int4_evaluates_the_builders_quantized_weights(tiny_llama_with_tokenizer, tmp_path):
    """Both perplexities change when the weights are the int4 graph's, and the report says so."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250 + 3}" for i in range(600)))
    reports = {}
    for precision in ("fp32", "int4"):
        reports[precision] = tmp_path / f"{precision}.json"
        result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "2-4", "--text", text, "--context", "128",
                         "--precision", precision, "--other-text", "none", "--json", reports[precision])
        assert result.exit_code == 0, result.stderr
    fp32, int4 = (json.loads(reports[p].read_text()) for p in ("fp32", "int4"))
    assert int4["precision"] == "int4" and "int4" in result.output
    assert int4["base_ppl"] != fp32["base_ppl"] and int4["sa_ppl"] != fp32["sa_ppl"]
    assert abs(int4["base_ppl"] / fp32["base_ppl"] - 1) < 0.5  # the same model, quantized
    # Part of a layer in int4 too (the builder's graph shares it): the same quantized base model.
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "3.0", "--text", text, "--context", "128",
                     "--precision", "int4", "--other-text", "none", "--json", tmp_path / "group.json")
    assert result.exit_code == 0, result.stderr
    group = json.loads((tmp_path / "group.json").read_text())
    assert group["shared_groups"] == {"3": [0]} and group["base_ppl"] == int4["base_ppl"] and group["sa_ppl"] != int4["base_ppl"]


def test_eval_needs_a_tokenizer(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    result = run_cli("eval", tiny_llama, "--span", "2", "--text", text)
    assert result.exit_code == 2 and "no tokenizer" in result.stderr


def test_eval_missing_text_file(tiny_llama_with_tokenizer, tmp_path):
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "2", "--text", tmp_path / "none.txt")
    assert result.exit_code == 2 and "not found" in result.stderr


def test_divergence_is_the_kl_from_the_base_models_predictions():
    import torch
    from transformers import AutoModelForCausalLM

    from sa_export.accuracy.evaluate import base_log_probs, divergence
    from sa_export.accuracy.reference import shared_attention
    from sa_export.core.plan import SharingPlan, build_plan
    from tests.conftest import _tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config("llama"), attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (50,)).tolist()
    base = base_log_probs(model, ids, 32)  # windows of 32 and 18 tokens
    assert [b.shape[0] for b in base] == [32, 18]
    assert abs(divergence(model, ids, 32, base, SharingPlan(6, {}))) < 1e-9  # the base model itself
    plan = build_plan(["2-4"], 6)
    expected = []
    with torch.no_grad(), shared_attention(model, plan):
        for start in (0, 32):
            student = torch.log_softmax(model(torch.tensor([ids[start : start + 32]])).logits[0], -1)
            teacher = base[start // 32]
            expected.append((teacher.exp() * (teacher - student)).sum(-1))
    kl = divergence(model, ids, 32, base, plan)
    assert kl > 1e-7  # small on random weights, but far above the base model's own (< 1e-9)
    assert abs(kl - float(torch.cat(expected).mean())) < 1e-3 * kl


def _eval_without_and_with_corrections(model, tmp_path, *options):
    """`eval --head-map fit` at --lora-rank 0 and 2: both JSON reports, and the last run's result."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250 + 3}" for i in range(600)))
    reports = []
    for rank in ("0", "2"):
        report = tmp_path / f"{rank}.json"
        result = run_cli("eval", model, "--span", "3-4", "--text", text, "--context", "128", "--other-text", "none", "--head-map", "fit",
                         "--fit-steps", "2", "--calib-tokens", "1024", "--lora-rank", rank, *options, "--json", report)
        assert result.exit_code == 0, result.stderr
        reports.append(json.loads(report.read_text()))
    return reports[0], reports[1], result


def test_eval_with_lora_corrections_reports_them_and_keeps_the_base_model(monkeypatch, tiny_llama_with_tokenizer, tmp_path):
    move_fitted_corrections(monkeypatch)
    plain, corrected, result = _eval_without_and_with_corrections(tiny_llama_with_tokenizer, tmp_path)
    assert plain["corrections"] is None
    corrects = corrected["corrections"]["corrects"]
    assert corrected["corrections"]["rank"] == 2 and corrects[-4:] == ["3_o_proj", "3_v_proj", "4_o_proj", "4_v_proj"]
    assert corrects[:-4] and all(int(key.split("_")[0]) < 3 and key.endswith(("_q_proj", "_k_proj")) for key in corrects[:-4])  # the sources' Q/K
    assert corrected["base_ppl"] == plain["base_ppl"]  # the corrections belong to the SA model only
    assert corrected["sa_ppl"] != plain["sa_ppl"]
    assert "corrections   rank 2" in result.output


def test_eval_lora_rank_needs_the_fit(tiny_llama_with_tokenizer, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250 + 3}" for i in range(300)))
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "3-4", "--text", text, "--lora-rank", "2")
    assert result.exit_code == 2 and "--head-map fit" in result.stderr


def test_eval_int4_with_corrections_quantizes_the_corrected_weights(monkeypatch, tiny_llama_with_tokenizer, tmp_path):
    """The base model is the builder's int4 of the user's weights, the SA model its int4 of
    the corrected weights (as convert ships them): not the fp32 corrections on int4 weights."""
    move_fitted_corrections(monkeypatch)
    plain, corrected, _ = _eval_without_and_with_corrections(tiny_llama_with_tokenizer, tmp_path, "--precision", "int4")
    assert corrected["precision"] == "int4" and corrected["corrections"]["rank"] == 2
    assert corrected["base_ppl"] == plain["base_ppl"] and corrected["sa_ppl"] != plain["sa_ppl"]


def test_eval_calibrates_on_every_calib_file(tiny_llama_with_tokenizer, tmp_path):
    text, first, second = (tmp_path / f"{name}.txt" for name in ("text", "first", "second"))
    text.write_text(" ".join(f"w{(i * 7) % 250 + 3}" for i in range(300)))
    first.write_text(" ".join(f"w{(i * 11) % 240 + 3}" for i in range(700)))
    second.write_text(" ".join(f"w{(i * 13) % 230 + 3}" for i in range(700)))
    report = tmp_path / "eval.json"
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "3-4", "--text", text, "--other-text", "none", "--head-map", "argmax",
                     "--calib", first, "--calib", second, "--calib-tokens", "256", "--json", report)
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["calib_tokens"] == 512 and "first.txt" in data["calib_text"] and "second.txt" in data["calib_text"]
    added = tmp_path / "added.json"
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "3-4", "--text", text, "--other-text", "none", "--head-map", "argmax",
                     "--calib", first, "--add-calib", second, "--calib-tokens", "256", "--json", added)
    assert result.exit_code == 0, result.stderr
    assert json.loads(added.read_text())["sa_ppl"] == data["sa_ppl"]  # --calib A --add-calib B reads what two --calib do
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "3-4", "--text", text, "--other-text", "none", "--head-map", "argmax",
                     "--add-calib", second, "--calib-tokens", "256", "--json", added)
    assert result.exit_code == 0, result.stderr
    calib_text = json.loads(added.read_text())["calib_text"]
    assert str(default_text_path().resolve()) in calib_text and "second.txt" in calib_text  # the default text, then the added one
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "3-4", "--text", text, "--head-map", "argmax",
                     "--calib", first, "--add-calib", first)
    assert result.exit_code == 2 and "already reads" in result.stderr
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "3-4", "--text", text, "--add-calib", second)  # identity maps read no calibration
    assert result.exit_code == 2 and "--head-map identity does not read" in result.stderr
    result = run_cli("analyze", tiny_llama_with_tokenizer, "--calib", first, "--calib", second, "-o", tmp_path / "analysis")
    assert result.exit_code == 2 and "one --calib" in result.stderr


def test_eval_with_corrections_calibrates_on_two_domains_and_reports_a_third(monkeypatch, tiny_llama_with_tokenizer, tmp_path):
    """Without --calib, a fit with corrections reads news and Python source, so the other
    domain the report gives is the Wikipedia excerpt, not the Python source it read."""
    from sa_export.accuracy.texts import other_domain_text_path

    move_fitted_corrections(monkeypatch)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250 + 3}" for i in range(300)))
    report = tmp_path / "eval.json"
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "3-4", "--text", text, "--context", "128", "--max-tokens", "256",
                     "--head-map", "fit", "--fit-steps", "1", "--calib-tokens", "512", "--lora-rank", "2", "--json", report)
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert str(default_text_path().resolve()) in data["calib_text"] and str(other_domain_text_path().resolve()) in data["calib_text"]
    assert "enwiki" in data["other_domain"]["source"]


def test_eval_shares_one_kv_group(tiny_llama_with_tokenizer, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250 + 3}" for i in range(1200)))
    reports = {span: tmp_path / f"eval-{span}.json" for span in ("3.0", "3")}
    for span, report in reports.items():
        result = run_cli("eval", tiny_llama_with_tokenizer, "--span", span, "--text", text, "--context", "128", "--other-text", "none", "--json", report)
        assert result.exit_code == 0, result.stderr
    group, whole = (json.loads(reports[span].read_text()) for span in ("3.0", "3"))
    # Half of one layer's K cache of 12 cache tensors; and the other half of the heads still attend.
    assert group["kv_fraction_saved"] == pytest.approx(0.5 / 12) and whole["kv_fraction_saved"] == pytest.approx(1 / 12)
    assert group["base_ppl"] == whole["base_ppl"] and group["sa_ppl"] not in (whole["sa_ppl"], whole["base_ppl"])
    assert group["shared_groups"] == {"3": [0]} and whole["shared_groups"] == {}


def test_eval_says_which_layers_the_maps_read(tiny_llama_with_tokenizer, tmp_path):
    text, calib = tmp_path / "text.txt", tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250 + 3}" for i in range(1200)))
    calib.write_text(" ".join(f"w{(i * 11) % 250 + 3}" for i in range(1200)))
    result = run_cli(
        "eval", tiny_llama_with_tokenizer, "--span", "3.0", "--span", "4", "--head-map", "mix", "--text", text, "--calib", calib,
        "--context", "128", "--max-tokens", "512", "--other-text", "none", "--json", tmp_path / "e.json",
    )
    assert result.exit_code == 0, result.stderr
    sources = json.loads((tmp_path / "e.json").read_text())["map_sources"]
    assert set(sources) == {"3", "4"} and set(sources["3"]) <= {0, 1, 2} and set(sources["4"]) <= {0, 1, 2, 3}
    assert f"4 <- {', '.join(str(l) if l != 3 else '3 (kept heads)' for l in sources['4'])}" in result.output


