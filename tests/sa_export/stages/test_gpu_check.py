"""gpu-check: refuses cleanly without a GPU; with one, proves the TensorRT path on a tiny model."""

import json

import pytest

from sa_export.stages.convert import ConvertRequest, convert
from tests.helpers import leftovers, run_cli


def test_without_tensorrt_it_exits_3_in_one_line_and_writes_nothing(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = tmp_path / "gc"
    result = run_cli("gpu-check", "-o", out)
    assert result.exit_code == 3 and "TensorRT" in result.stderr and result.stderr.count("\n") == 1
    assert leftovers(out) == []


def test_the_unshared_baseline_converts_through_the_same_pipeline(tiny_llama_with_tokenizer, tmp_path):
    result = convert(ConvertRequest(model=str(tiny_llama_with_tokenizer), spans=(), out=tmp_path / "base", target="jetson-orin", unshared=True))
    assert result.parity.passed and result.plan.anchors == {}
    layers = json.loads((tmp_path / "base" / "sa_manifest.json").read_text())["cache"]["layers"]
    assert all(layer["k_cache"] and layer["v_cache"] for layer in layers)


@pytest.mark.gpu
def test_gpu_check_builds_checks_and_times_both_engines(tiny_llama_with_tokenizer, tmp_path):
    out = tmp_path / "gc"
    result = run_cli("gpu-check", "--model", tiny_llama_with_tokenizer, "--span", "3-4", "--contexts", "64,128", "--steps", "5", "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] and [row["context"] for row in report["decode"]] == [64, 128]
