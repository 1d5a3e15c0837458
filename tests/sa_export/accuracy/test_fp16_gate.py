"""The fp16 gate judges decisions, and a broken fp16 graph still fails it."""

import shutil

import onnx_ir as ir
import pytest

from sa_export.benchmarks.fp16_defects import scale_present
from sa_export.core.manifest import Manifest
from sa_export.hf.models import ModelSource, load_reference
from sa_export.stages.check import check_directory
from sa_export.stages.convert import ConvertRequest, convert


@pytest.fixture(scope="module")
def fp16_out(tiny_llama_with_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "sa"
    result = convert(ConvertRequest(model=str(tiny_llama_with_tokenizer), spans=("3-4",), out=out, target="jetson-orin-jp6", precision="fp16"))
    assert result.parity.passed
    return out


def _broken_copy(out, tmp_path, edit):
    broken = tmp_path / "broken"
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns("bundle"))
    model = ir.load(broken / "model.onnx")
    edit(model.graph)
    ir.save(model, broken / "model.onnx")
    Manifest.read(broken).with_files(broken, ["model.onnx"]).write(broken)
    return broken


@pytest.mark.parametrize("factor", [0.5, 0.0])
def test_a_corrupted_cache_fails_the_fp16_gate(factor, fp16_out, tiny_llama_with_tokenizer, tmp_path):
    broken = _broken_copy(fp16_out, tmp_path, lambda graph: scale_present(graph, "present.2.value", factor))
    hf_model, tokenizer = load_reference(ModelSource("hf", tiny_llama_with_tokenizer, "tiny"))
    report, _ = check_directory(broken, hf_model, tokenizer, 16)
    assert not report.passed and report.tolerance.name == "fp16"
    assert min(c.cosine for c in report.comparisons if c.name.endswith("logits")) < report.tolerance.min_cosine


def test_the_intact_fp16_graph_passes_the_same_check(fp16_out, tiny_llama_with_tokenizer, tmp_path):
    same = _broken_copy(fp16_out, tmp_path, lambda graph: None)
    hf_model, tokenizer = load_reference(ModelSource("hf", tiny_llama_with_tokenizer, "tiny"))
    report, _ = check_directory(same, hf_model, tokenizer, 16)
    assert report.passed
