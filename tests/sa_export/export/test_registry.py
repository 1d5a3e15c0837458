"""Exporters as data: what each declares, and what callers are refused by asking it."""

import pytest

from sa_export.core.errors import UsageError
from sa_export.export import DECOMPOSED, DEFAULT_EXPORTER, EXPORTERS, GROUP_QUERY_ATTENTION, exporter_of_manifest, get_exporter
from targets.profiles import get_target


def test_each_exporter_declares_its_family_precisions_and_targets():
    dynamo, genai = EXPORTERS["dynamo"], EXPORTERS["genai"]
    assert (dynamo.graph_family, dynamo.serves_tensorrt, dynamo.has_position_ids) == (DECOMPOSED, True, True)
    assert (genai.graph_family, genai.serves_tensorrt, genai.has_position_ids) == (GROUP_QUERY_ATTENTION, False, False)
    assert "fp16" in dynamo.precisions and genai.precisions == ("fp32", "int4")
    assert DEFAULT_EXPORTER in EXPORTERS


def test_opsets_are_the_exporters_to_choose():
    assert get_exporter("dynamo").resolve_opset(None) == 18 and get_exporter("dynamo").resolve_opset(23) == 23
    assert get_exporter("dynamo").attention(23) == "sdpa" and get_exporter("dynamo").attention(18) == "eager"
    with pytest.raises(UsageError, match="--opset applies to --exporter dynamo"):
        get_exporter("genai").resolve_opset(23)


def test_removed_and_unknown_exporters_are_refused_with_the_reason():
    with pytest.raises(UsageError, match="transformers<4.58"):
        get_exporter("optimum")
    with pytest.raises(UsageError, match="unknown exporter"):
        get_exporter("tflite")


def test_manifests_of_a_removed_exporter_map_to_the_same_family():
    assert exporter_of_manifest("optimum").graph_family == DECOMPOSED
    assert exporter_of_manifest(None).name == DEFAULT_EXPORTER  # before the exporter was recorded
    assert exporter_of_manifest("genai").name == "genai"


def test_the_builder_refuses_tensorrt_targets_and_onnx_inputs():
    genai = get_exporter("genai")
    with pytest.raises(UsageError, match="--target cpu"):
        genai.refuse(None, get_target("jetson-orin"), "hf")
    with pytest.raises(UsageError, match="--target cpu"):
        genai.refuse(None, get_target("cpu"), "onnx")
    get_exporter("dynamo").refuse(None, get_target("jetson-orin"), "onnx")  # takes both


def test_auto_picks_the_builders_graph_where_it_serves_and_says_why(tiny_models, tiny_llama_with_tokenizer):
    from sa_export.export import choose_exporter
    from sa_export.hf.models import load_config, resolve_model

    def choice(path, target="cpu", precision="fp32"):
        source = resolve_model(str(path))
        exporter, why = choose_exporter(load_config(source), get_target(target), source, precision)
        return exporter.name, why

    assert choice(tiny_llama_with_tokenizer) == ("genai", "the fastest graph ONNX Runtime runs (GroupQueryAttention, cache written in place)")
    assert choice(tiny_llama_with_tokenizer, "jetson-orin")[0] == "dynamo"
    assert choice(tiny_llama_with_tokenizer, precision="fp16") == ("dynamo", "the builder's CPU graph is fp32/int4; --precision fp16 takes the decomposed graph")
    assert choice(tiny_llama_with_tokenizer, precision="int4")[0] == "genai"
    with pytest.raises(UsageError, match="--precision int4 is onnxruntime-genai's builder graph.*packed QKV"):
        choice(tiny_models["gpt2"], precision="int4")
    name, why = choice(tiny_models["llama"])  # no tokenizer files
    assert name == "dynamo" and "tokenizer" in why
    name, why = choice(tiny_models["mistral"])
    assert name == "dynamo" and "sliding window" in why
    name, why = choice(tiny_models["gpt2"])
    assert name == "dynamo" and "packed QKV" in why
