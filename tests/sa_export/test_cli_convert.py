"""convert and check on tiny Llama, Mistral and Qwen2 models, without tokenizers."""

import json

import onnx
import pytest

from tests.helpers import leftovers, run_cli


def test_every_registered_architecture_has_a_tiny_fixture():
    from sa_export.core.architectures import ARCHITECTURES
    from tests.conftest import TINY_ARCHITECTURES

    assert set(ARCHITECTURES) == set(TINY_ARCHITECTURES)


@pytest.mark.parametrize("arch", ["qwen3", "phi3", "gpt2", "gpt_neox"])
def test_more_architectures_convert_and_pass_check(arch, tiny_models, tmp_path):
    out = tmp_path / f"{arch}-sa"
    result = run_cli("convert", tiny_models[arch], "--span", "3-4", "-o", out, "--json", tmp_path / "summary.json")
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity PASSED" in result.output
    inputs = {i.name for i in onnx.load(out / "model.onnx", load_external_data=False).graph.input}
    assert "past_key_values.3.key" not in inputs and "past_key_values.3.value" in inputs
    removed = json.loads((tmp_path / "summary.json").read_text())["weight_bytes_removed"]
    if arch in ("qwen3", "phi3"):  # separate or Slice-fused Q/K columns leave the file
        assert removed == 2 * (64 * 64 + 64 * 32) * 4
    if arch == "gpt2":  # Split-fused c_attn: Q and K columns (and bias) go, minus a few shape constants
        assert 2 * 64 * 128 * 4 <= removed <= 2 * (64 + 1) * 128 * 4
    if arch in ("gpt2", "gpt_neox"):  # fused projections: 4 layers keep 3 * 64 columns, the 2 shared keep V's 64
        graph = onnx.load(out / "model.onnx").graph
        widths = sorted(
            tuple(i.dims)[1] for i in graph.initializer if len(i.dims) == 2 and i.dims[0] == 64 and i.dims[1] == 192
            and any(n.op_type in ("MatMul", "Gemm") and n.input[1] == i.name for n in graph.node)
        )
        assert widths.count(192) == 4
        narrowed = [tuple(i.dims) for i in graph.initializer if i.name.endswith(".weight") and (".cols" in i.name or ".heads" in i.name)]
        assert narrowed == [(64, 64), (64, 64)]


def test_gemma_span_across_sliding_and_global_layers_is_refused_and_same_kind_passes(tiny_models, tmp_path):
    result = run_cli("convert", tiny_models["gemma2"], "--span", "3-4", "-o", tmp_path / "mixed")
    assert result.exit_code == 2 and "differs in kind" in result.stderr and "--force" in result.stderr
    assert leftovers(tmp_path / "mixed") == []
    result = run_cli("convert", tiny_models["gemma2"], "--span", "4", "--anchor", "2", "-o", tmp_path / "same")
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity PASSED" in result.output


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_convert_then_check_passes_on_tiny_models(arch, tiny_models, tmp_path):
    out = tmp_path / f"{arch}-sa"
    result = run_cli("convert", tiny_models[arch], "--span", "3-4", "-o", out, "--json", tmp_path / "summary.json")
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity PASSED" in result.output

    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    assert sum(n.endswith(".key") for n in inputs) == 4
    assert sum(n.endswith(".value") for n in inputs) == 6
    for layer in (3, 4):
        assert f"past_key_values.{layer}.key" not in inputs and f"present.{layer}.key" not in outputs
        assert f"past_key_values.{layer}.value" in inputs and f"present.{layer}.value" in outputs
        assert not [n.name for n in graph.node if f"layers.{layer}/self_attn/q_proj" in n.name or f"layers.{layer}/self_attn/k_proj" in n.name]
    assert sum(n.op_type == "Softmax" for n in graph.node) == 4

    manifest = json.loads((out / "sa_manifest.json").read_text())
    layer3 = manifest["cache"]["layers"][3]
    assert layer3["k_cache"] is False and layer3["v_cache"] is True
    assert manifest["parity"]["passed"] is True
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] is True and parity["decode_steps"] == 32
    assert {"max_abs", "mean_abs", "max_rel", "mean_rel", "atol", "passed"} <= set(parity["outputs"][0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kv_cache"]["bytes_per_token_saved"] == 2 * 2 * 16 * 4

    check = run_cli("check", out, "--json", tmp_path / "parity.json")
    assert check.exit_code == 0, check.output + check.stderr
    assert json.loads((tmp_path / "parity.json").read_text())["passed"] is True


def test_generate_without_tokenizer_exits_2(tiny_llama, tmp_path):
    out = tmp_path / "sa"
    assert run_cli("convert", tiny_llama, "--span", "2", "-o", out, "--no-check").exit_code == 0
    result = run_cli("generate", out, "--prompt", "hello")
    assert result.exit_code == 2
    assert "no tokenizer.json" in result.stderr


def test_generate_streams_text(converted_tiny_llama):
    result = run_cli("generate", converted_tiny_llama, "--prompt", "w5 w6 w7", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.stderr
    words = result.output.split()
    assert words[:3] == ["w5", "w6", "w7"] and len(words) > 3


def test_check_refuses_a_tampered_model(converted_tiny_llama, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(converted_tiny_llama, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    result = run_cli("check", copy)
    assert result.exit_code == 2 and "sha256" in result.stderr


def test_converting_to_an_existing_out_is_refused_and_overwrite_replaces_it(tiny_llama, tmp_path):
    out = tmp_path / "sa"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("convert", tiny_llama, "--span", "2", "-o", out, "--no-check")
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only an earlier output (one with a manifest).
    result = run_cli("convert", tiny_llama, "--span", "2", "-o", out, "--overwrite", "--no-check")
    assert result.exit_code == 2 and "did not write" in result.stderr and (out / "keep.txt").exists()
    (out / "sa_manifest.json").write_text("{}")
    # A failing overwrite keeps the old OUT intact.
    result = run_cli("convert", tiny_llama, "--span", "2-9", "-o", out, "--overwrite", "--no-check")
    assert result.exit_code == 2 and (out / "keep.txt").exists()
    result = run_cli("convert", tiny_llama, "--span", "2", "-o", out, "--overwrite", "--no-check")
    assert result.exit_code == 0 and not (out / "keep.txt").exists() and (out / "model.onnx").exists()
    assert leftovers(out) == [out]


def test_an_onnx_export_converts_and_checks_against_its_reference(tiny_llama, tmp_path):
    from sa_export.hf.models import ModelSource, load_hf_model
    from sa_export.export.dynamo import export_dynamo as _export

    exported = _export(load_hf_model(ModelSource("hf", tiny_llama, "tiny")), tmp_path / "export")
    out = tmp_path / "sa"
    result = run_cli("convert", exported.parent, "--span", "3-4", "--reference", tiny_llama, "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity PASSED" in result.output
    assert run_cli("check", out).exit_code == 0  # the manifest remembers the reference
    missing = run_cli("convert", exported, "--span", "3-4", "-o", tmp_path / "noref")
    assert missing.exit_code == 2 and "--reference" in missing.stderr


@pytest.mark.parametrize("opset", ["18", "23"])
def test_dynamo_exports_convert_and_check(opset, tiny_models, tmp_path):
    """Flat node names (node_Softmax_195) at opset 18; the ONNX Attention op at opset 23."""
    out = tmp_path / f"dynamo{opset}"
    result = run_cli("convert", tiny_models["llama"], "--span", "3-4", "--exporter", "dynamo", "--opset", opset, "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity PASSED" in result.output
    graph = onnx.load(out / "model.onnx").graph
    assert not [n for n in graph.node if n.op_type == "Attention"]
    assert sum(i.name.endswith(".key") for i in graph.input) == 4
    assert json.loads((out / "sa_manifest.json").read_text())["opset"] == int(opset)
