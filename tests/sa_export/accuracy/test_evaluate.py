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


def test_eval_needs_a_tokenizer(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    result = run_cli("eval", tiny_llama, "--span", "2", "--text", text)
    assert result.exit_code == 2 and "no tokenizer" in result.stderr


def test_eval_missing_text_file(tiny_llama_with_tokenizer, tmp_path):
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "2", "--text", tmp_path / "none.txt")
    assert result.exit_code == 2 and "not found" in result.stderr
