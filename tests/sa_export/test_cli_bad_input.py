"""Every bad input exits 2 with a one-line message that names the problem, and leaves nothing behind."""

import json

import onnx
import pytest
from onnx import TensorProto, helper

from tests.helpers import leftovers, run_cli


@pytest.fixture(scope="module")
def not_a_decoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "bert"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    return path


@pytest.fixture(scope="module")
def onnx_without_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("nocache") / "model.onnx"
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])
    node = helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)
    onnx.save(helper.make_model(helper.make_graph([node], "lm", [ids], [logits])), path)
    return path


CASES = {
    "span out of range": (["--span", "3-9"], "out of range"),
    "span from layer 0": (["--span", "0-2"], "layer 0"),
    "overlapping spans": (["--span", "2-3", "--span", "3-4"], "overlap"),
    "anchor inside span": (["--span", "2-4", "--anchor", "3"], "inside span"),
    "anchor after span": (["--span", "2-3", "--anchor", "5"], "after span"),
    "malformed span": (["--span", "two-three"], "not of the form"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_plan(case, tiny_llama, tmp_path):
    args, message = CASES[case]
    out = tmp_path / "out"
    result = run_cli("convert", tiny_llama, *args, "-o", out)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert leftovers(out) == []


def test_missing_path(tmp_path):
    result = run_cli("convert", tmp_path / "nope", "--span", "2", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "not found" in result.stderr
    assert leftovers(tmp_path / "out") == []


def test_not_a_decoder_lm(not_a_decoder, tmp_path):
    result = run_cli("convert", not_a_decoder, "--span", "2", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "not a decoder language model" in result.stderr
    assert leftovers(tmp_path / "out") == []


def test_onnx_without_past_key_values(onnx_without_cache, tmp_path):
    result = run_cli("convert", onnx_without_cache, "--span", "2", "-o", tmp_path / "out", "--no-check")
    assert result.exit_code == 2 and "no past_key_values" in result.stderr
    assert leftovers(tmp_path / "out") == []


def test_pickled_weights_need_an_explicit_flag(tiny_llama, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama, pickled)
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    result = run_cli("convert", pickled, "--span", "2", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "--allow-pickle" in result.stderr
    assert leftovers(tmp_path / "out") == []


def test_check_on_something_that_is_not_an_out_dir(tmp_path):
    result = run_cli("check", tmp_path)
    assert result.exit_code == 2 and "sa_manifest.json" in result.stderr


def test_genai_exporter_refuses_a_tensorrt_target(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = run_cli("convert", tiny_llama, "--span", "3-4", "--exporter", "genai", "--target", "jetson-orin", "-o", out)
    assert result.exit_code == 2 and "--target cpu" in result.stderr
    assert not leftovers(out)


def test_genai_exporter_refuses_fp16(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = run_cli("convert", tiny_llama, "--span", "3-4", "--exporter", "genai", "--precision", "fp16", "--target", "cpu", "-o", out, "--no-check")
    assert result.exit_code == 2 and "fp32" in result.stderr
    assert not leftovers(out)


def test_overwrite_never_deletes_the_model_or_a_directory_it_did_not_write(tiny_llama, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    before = sorted(p.name for p in model.iterdir())
    for out in (model, tmp_path):
        result = run_cli("convert", model, "--span", "3-4", "-o", out, "--overwrite", "--no-check")
        assert result.exit_code == 2 and "choose another -o" in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    assert sorted(p.name for p in model.iterdir()) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = run_cli("convert", model, "--span", "3-4", "-o", other, "--overwrite", "--no-check")
    assert result.exit_code == 2 and "did not write" in result.stderr
    assert (other / "notes.txt").read_text() == "mine"


def test_an_unwritable_json_path_is_refused_before_the_work(tiny_llama, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for path in ("/proc/sa-export.json", tmp_path, blocker / "x.json"):
        out = tmp_path / "out"
        result = run_cli("convert", tiny_llama, "--span", "3-4", "-o", out, "--no-check", "--json", path)
        assert result.exit_code == 2 and "--json" in result.stderr, result.stderr
        assert leftovers(out) == []


def test_json_on_stdout_sends_the_report_to_stderr(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = run_cli("convert", tiny_llama, "--span", "3-4", "-o", out, "--no-check", "--json", "-")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["shared_layers"] == [3, 4] and summary["out"] == str(out)
    assert "shared layers" in result.stderr and not (tmp_path / "-").exists()


def test_generate_refuses_an_empty_prompt_and_an_out_without_its_model(converted_tiny_llama, tmp_path):
    import shutil

    result = run_cli("generate", converted_tiny_llama, "--prompt", "")
    assert result.exit_code == 2 and "prompt is empty" in result.stderr
    broken = tmp_path / "broken"
    shutil.copytree(converted_tiny_llama, broken)
    (broken / "model.onnx").unlink()
    for args in (("generate", broken, "--prompt", "hi"), ("bench", broken, "--contexts", "16", "--batches", "1")):
        result = run_cli(*args)
        assert result.exit_code == 2 and "model.onnx listed in the manifest is missing" in result.stderr, result.stderr


@pytest.mark.parametrize("contexts", ["abc", "0,16", "16,,32", ""])
def test_bench_refuses_a_bad_list_as_a_usage_error(converted_tiny_llama, contexts):
    result = run_cli("bench", converted_tiny_llama, "--contexts", contexts)
    assert result.exit_code == 2 and "--contexts" in result.stderr, result.stderr


IGNORED = {
    "calibration text for identity maps": (["convert", "--calib", "{text}"], "--calib sets calibration text"),
    "calibration tokens for identity maps": (["eval", "--calib-tokens", "512"], "--calib-tokens sets calibration text"),
    "fit steps without a fit": (["convert", "--head-map", "mix", "--fit-steps", "4"], "--fit-steps"),
    "a reference for a Hugging Face model": (["convert", "--reference", "{model}"], "--reference"),
}


@pytest.mark.parametrize("case", IGNORED)
def test_an_option_that_would_change_nothing_is_refused(case, tiny_llama, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("some words " * 50)
    args, message = IGNORED[case]
    command, *options = (arg.format(text=text, model=tiny_llama) for arg in args)
    out = tmp_path / "out"
    result = run_cli(command, tiny_llama, "--span", "3-4", *options, *(["-o", out] if command == "convert" else []))
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert leftovers(out) == []


@pytest.mark.parametrize("options", [["--max-penalty", "0.1"], ["--frontier-maps", "bogus"], ["--other-text", "default"]])
def test_analyze_refuses_frontier_options_without_frontier(options, tiny_llama, tmp_path):
    result = run_cli("analyze", tiny_llama, *options, "-o", tmp_path / "analysis")
    assert result.exit_code == 2 and f"{options[0]} is an option of the frontier search" in result.stderr, result.stderr


def test_an_out_under_a_file_and_a_calibration_folder_are_named_for_what_they_are(tiny_llama, tiny_llama_with_tokenizer, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli("convert", tiny_llama, "--span", "3-4", "-o", blocker / "out", "--no-check")
    assert result.exit_code == 2 and f"{blocker} is a file, not a folder" in result.stderr, result.stderr
    result = run_cli("eval", tiny_llama_with_tokenizer, "--span", "3-4", "--head-map", "mix", "--calib", tmp_path)
    assert result.exit_code == 2 and "is a directory" in result.stderr, result.stderr
