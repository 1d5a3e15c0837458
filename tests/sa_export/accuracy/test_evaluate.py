import json

from sa_export.accuracy.texts import default_text_path
from tests.helpers import run_cli


def test_default_text_is_available_offline():
    path = default_text_path()
    assert path.stat().st_size > 100_000


def test_eval_reports_both_perplexities_and_json(tiny_llama_with_tokenizer, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250 + 3}" for i in range(600)))
    report = tmp_path / "eval.json"
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "2-4", "--text", text, "--context", "128", "--json", report)
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["eval_tokens"] == 600 and data["calib_tokens"] == 0
    assert data["base_ppl"] > 1 and data["sa_ppl"] > 1 and data["base_ppl"] != data["sa_ppl"]
    assert "base ppl" in result.output and "SA ppl" in result.output
    # and the same on text of another domain (default: Python source)
    other = data["other_domain"]
    assert "module.py" in other["source"] and other["tokens"] > 2
    assert other["base_ppl"] > 1 and other["sa_ppl"] > 1 and other["base_ppl"] != data["base_ppl"]
    assert "other domain" in result.output


def test_eval_other_domain_can_be_given_or_skipped(tiny_llama_with_tokenizer, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250 + 3}" for i in range(300)))
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"w{(i * 13) % 200 + 3}" for i in range(300)))
    reports = {}
    for name in ("given", "none"):
        reports[name] = tmp_path / f"{name}.json"
        value = other if name == "given" else "none"
        result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "2-4", "--text", text, "--context", "128",
                         "--other-text", value, "--json", reports[name])
        assert result.exit_code == 0, result.stderr
    assert json.loads(reports["given"].read_text())["other_domain"]["source"].startswith(str(other.resolve()))
    assert json.loads(reports["none"].read_text())["other_domain"] is None


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


def test_eval_needs_a_tokenizer(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    result = run_cli("eval", tiny_llama, "--span", "2", "--text", text)
    assert result.exit_code == 2 and "no tokenizer" in result.stderr


def test_eval_missing_text_file(tiny_llama_with_tokenizer, tmp_path):
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "2", "--text", tmp_path / "none.txt")
    assert result.exit_code == 2 and "not found" in result.stderr
