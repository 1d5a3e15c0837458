"""The packaged SmolLM2-135M, end to end. Slow (about five minutes); CI runs it."""

import json
import shutil

import onnx
import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_available, tmp_path_factory):
    """SmolLM2 as a user's directory: model and tokenizer written by the installed transformers' save_pretrained."""
    from sa_export.hf.models import materialize_alias

    path = tmp_path_factory.mktemp("saved") / "SmolLM2-135M-Instruct"
    shutil.copytree(materialize_alias("smollm2-135m"), path)
    return path


@pytest.fixture(scope="module")
def smollm2_out(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "smollm2-sa"
    result = run_cli("convert", smollm2_dir, "--span", "23-26", "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity PASSED" in result.output and "sample" in result.output
    assert "exporter genai: the fastest graph ONNX Runtime runs" in result.stderr  # the default on --target cpu
    return out


def test_k_cache_and_qk_paths_of_shared_layers_are_gone(smollm2_out):
    graph = onnx.load(smollm2_out / "model.onnx", load_external_data=False).graph
    keys = [i.name for i in graph.input if i.name.endswith(".key")]
    assert len(keys) == 26 and not {f"past_key_values.{layer}.key" for layer in range(23, 27)} & set(keys)
    # 25 unshared layers' GQA at the top; the anchor's (22) is in its If, with one per shared layer
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == 25
    ifs = [n for n in graph.node if n.op_type == "If"]
    assert len(ifs) == 5 and sum("present.22.key" in n.output for n in ifs) == 1
    manifest = json.loads((smollm2_out / "sa_manifest.json").read_text())
    assert manifest["exporter"] == "genai" and manifest["source"]["accepted_unknown_config_keys"] == []


def test_a_saved_directory_is_the_same_model_as_the_alias(smollm2_dir, tmp_path):
    ppl = {}
    for name, model in (("alias", "smollm2-135m"), ("dir", smollm2_dir)):
        result = run_cli("eval", model, "--span", "23-26", "--max-tokens", "1024", "--other-text", "none", "--json", tmp_path / f"{name}.json")
        assert result.exit_code == 0, result.stderr
        ppl[name] = json.loads((tmp_path / f"{name}.json").read_text())["base_ppl"]
    assert abs(ppl["dir"] / ppl["alias"] - 1) <= 1e-3


def test_check_passes_the_fp32_tolerance(smollm2_out, tmp_path):
    result = run_cli("check", smollm2_out, "--json", tmp_path / "p.json")
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["passed"] and report["would_pass_logits_atol"] <= 1e-3 and report["greedy_agreement"] == 1.0


def test_calibrated_head_map_halves_the_penalty_on_20_28(smollm2_available, tmp_path):
    penalties, other_penalties = {}, {}
    for mode in ("identity", "calibrated"):
        result = run_cli("eval", "smollm2-135m", "--span", "20-28", "--head-map", mode, "--json", tmp_path / f"{mode}.json")
        assert result.exit_code == 0, result.stderr
        data = json.loads((tmp_path / f"{mode}.json").read_text())
        penalties[mode] = data["sa_ppl"] - data["base_ppl"]
        other_penalties[mode] = data["other_domain"]["sa_ppl"] - data["other_domain"]["base_ppl"]
    assert data["calib_tokens"] == 4096 and data["eval_tokens"] == 4096 and data["other_domain"]["tokens"] == 4096
    assert penalties["identity"] > 0 and other_penalties["identity"] > 0
    assert penalties["calibrated"] <= 0.5 * penalties["identity"]
    assert other_penalties["calibrated"] < other_penalties["identity"]  # fitted on news, it still helps on Python source


def test_calibrated_fast_runtime_graph_passes_parity_and_generates(smollm2_available, tmp_path):
    """--exporter genai: onnxruntime-genai's GQA graph with SA and calibrated maps, parity-checked against PyTorch.
    (The decomposed graph's export is checked on the tiny models; on SmolLM2 it adds 80 s of export.)"""
    out = tmp_path / "smollm2-gqa"
    result = run_cli(
        "convert", "smollm2-135m", "--span", "20-28", "--head-map", "calibrated", "--exporter", "genai", "-o", out, "--decode-steps", "16"
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity PASSED" in result.output
    manifest = json.loads((out / "sa_manifest.json").read_text())
    assert (manifest["head_map"]["mode"], manifest["head_map"]["method"]) == ("calibrated", "argmax")
    assert manifest["cache"]["buffer"] == "shared" and manifest["cache"]["savings"]["bytes_per_token_sa"] == 39168
    assert json.loads((out / "parity.json").read_text())["passed"]
    generated = run_cli("generate", out, "--prompt", "The capital of France is", "--max-new-tokens", "8")
    assert generated.exit_code == 0 and generated.output.strip().startswith("The capital of France is")
