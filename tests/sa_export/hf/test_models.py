"""Loading never ends in a traceback; Gemma 3 text converts; native KV sharing is refused."""

import json
import shutil

import pytest

from tests.helpers import leftovers, run_cli


@pytest.fixture()
def model_copy(tiny_llama_with_tokenizer, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_llama_with_tokenizer, path)
    return path


def _refused(model, tmp_path, *needles):
    out = tmp_path / "out"
    result = run_cli("convert", model, "--span", "3-4", "-o", out)
    assert result.exit_code == 2, result.output + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr
    assert leftovers(out) == []


def test_unreadable_tokenizer_names_the_file(model_copy, tmp_path):
    (model_copy / "tokenizer.json").write_text("{ not json")
    _refused(model_copy, tmp_path, "tokenizer", "tokenizer.json", "cannot be loaded")


def test_truncated_weights_name_the_file(model_copy, tmp_path):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _refused(model_copy, tmp_path, "model.safetensors", "cannot be loaded")


def test_config_of_the_wrong_type_names_the_file(model_copy, tmp_path):
    raw = json.loads((model_copy / "config.json").read_text())
    raw["hidden_size"] = "wide"
    (model_copy / "config.json").write_text(json.dumps(raw))
    _refused(model_copy, tmp_path, "config.json", "cannot be read")


def test_native_kv_sharing_is_refused(model_copy, tmp_path):
    (model_copy / "config.json").write_text(json.dumps({"model_type": "gemma3n_text", "num_kv_shared_layers": 15}))
    _refused(model_copy, tmp_path, "already shares KV caches", "num_kv_shared_layers")


def test_gemma3_converts_and_passes_check(tiny_models, tmp_path):
    """Layers 0,1 sliding, 2 full, 3,4 sliding, 5 full: layer 4 shares sliding anchor 3."""
    out = tmp_path / "gemma3"
    result = run_cli("convert", tiny_models["gemma3_text"], "--span", "4", "--anchor", "3", "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity PASSED" in result.output
    manifest = json.loads((out / "sa_manifest.json").read_text())
    assert manifest["source"]["model_type"] == "gemma3_text" and manifest["exporter"] == "dynamo"


def test_gemma3_span_across_sliding_and_full_layers_is_refused(tiny_models, tmp_path):
    out = tmp_path / "mixed"
    result = run_cli("convert", tiny_models["gemma3_text"], "--span", "2-3", "-o", out)
    assert result.exit_code == 2 and "differs in kind" in result.stderr
    assert leftovers(out) == []


def test_gemma3_on_the_genai_builder_is_refused_with_its_reason(tiny_models, tmp_path):
    out = tmp_path / "genai"
    result = run_cli("convert", tiny_models["gemma3_text"], "--span", "4", "--anchor", "3", "--exporter", "genai", "-o", out)
    assert result.exit_code == 2 and "rope_type" in result.stderr
    assert leftovers(out) == []


def test_the_removed_optimum_exporter_says_why(tiny_llama, tmp_path):
    result = run_cli("convert", tiny_llama, "--span", "3-4", "--exporter", "optimum", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "transformers<4.58" in result.stderr
