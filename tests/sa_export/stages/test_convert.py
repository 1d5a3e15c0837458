"""`convert --head-map fit --lora-rank R`: the corrections reach the graph and `check` rebuilds them."""

import pytest
from safetensors.torch import load_file

from sa_export.accuracy.adapters import CORRECTIONS_NAME
from sa_export.hf.models import load_reference, resolve_model
from sa_export.stages.check import check, check_directory
from sa_export.stages.convert import ConvertRequest, convert
from tests.helpers import leftovers, move_fitted_corrections, run_cli


@pytest.mark.parametrize("exporter, precision", [("dynamo", "fp32"), ("genai", "int4")])
def test_lora_corrections_are_folded_into_the_graph(monkeypatch, tiny_llama_with_tokenizer, tmp_path, exporter, precision):
    """What follows the fit (test_adapters.py shows the fit moving corrections)."""
    move_fitted_corrections(monkeypatch)
    out = tmp_path / "out"
    request = ConvertRequest(
        model=str(tiny_llama_with_tokenizer), spans=("3-4",), out=out, head_map="fit", fit_steps=2, lora_rank=2,
        calib_tokens=2048, exporter=exporter, precision=precision, decode_steps=4,
    )
    result = convert(request)
    assert result.parity.passed, result.parity.summary_line()
    record = result.manifest.head_map["corrections"]
    assert record["file"] == CORRECTIONS_NAME and record["rank"] == 2
    calibrated_on = result.manifest.head_map["calibration"]["source"]  # no --calib: news and Python source (texts.calib_files_for)
    assert "lee_background.cor" in calibrated_on and "module.py" in calibrated_on
    sources = result.manifest.plan.anchor_layers  # the shared layers' V/O, and Q/K of every layer they read
    assert record["corrects"] == [f"{s}_{p}" for s in sources for p in ("k_proj", "q_proj")] + ["3_o_proj", "3_v_proj", "4_o_proj", "4_v_proj"]
    assert CORRECTIONS_NAME in result.manifest.files and not (out / "corrected").exists()
    assert result.summary_json()["corrections"] == record and any(line.strip().startswith("corrections") for line in result.lines())
    factors = load_file(out / CORRECTIONS_NAME)
    assert all(float(factors[f"{key}.up"].norm()) > 0 for key in record["corrects"])
    assert check(out, decode_steps=4).passed  # the reference rebuilt from the user's checkpoint and the saved factors
    if precision == "fp32":  # (int4 parity takes the graph's own weights, corrected or not)
        plain, tokenizer = load_reference(resolve_model(str(tiny_llama_with_tokenizer)))
        report, _ = check_directory(out, plain, tokenizer, 4)
        assert not report.passed  # the graph is not the uncorrected model


def test_lora_rank_needs_the_fit_and_a_hugging_face_model(tiny_llama_with_tokenizer, converted_tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = run_cli("convert", tiny_llama_with_tokenizer, "--span", "3-4", "--lora-rank", "2", "-o", out)
    assert result.exit_code == 2 and "--head-map fit" in result.stderr
    result = run_cli("convert", converted_tiny_llama / "model.onnx", "--span", "3-4", "--head-map", "fit", "--lora-rank", "2",
                     "--reference", tiny_llama_with_tokenizer, "-o", out)
    assert result.exit_code == 2 and "Hugging Face model" in result.stderr
    assert leftovers(out) == []
