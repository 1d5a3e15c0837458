"""Sharing part of a layer (one KV group) on the decomposed graph: narrowed Q/K path and K cache, parity."""

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from sa_export.accuracy.parity import run_parity
from sa_export.core.errors import AttentionPatternError, CheckFailed, PlanError
from sa_export.core.manifest import Manifest
from sa_export.core.plan import HeadMap, build_plan
from sa_export.hf.models import load_reference, resolve_model
from sa_export.runtime import SAModel
from sa_export.stages.convert import ConvertRequest, convert
from tests.conftest import build_sharp_llama
from tests.helpers import move_fitted_corrections, run_cli


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    return build_sharp_llama(tmp_path_factory.mktemp("sharp") / "llama")


@pytest.fixture(scope="module")
def group_llama(sharp_llama, tmp_path_factory):
    """Group 0 of layer 3 and the whole of layer 4 (4 heads, 2 KV groups), parity checked by convert."""
    out = tmp_path_factory.mktemp("groups") / "llama-sa"
    convert(ConvertRequest(model=str(sharp_llama), spans=("3.0", "4"), out=out))
    return out


def test_a_partly_shared_layer_keeps_the_k_cache_of_its_other_group(group_llama):
    manifest = Manifest.read(group_llama)
    assert manifest.exporter == "dynamo"  # the model has no tokenizer files, which the builder's graph needs
    layers = {layer.layer: layer for layer in manifest.layout}
    assert layers[3].has_key and layers[3].key_heads == 1 and not layers[4].has_key
    assert manifest.cache.kv_heads_of("past_key_values.3.key") == 1 and manifest.cache.kv_heads_of("past_key_values.3.value") == 2
    # 24 cache tensors of 2 KV heads: layer 4's K cache and half of layer 3's are gone.
    assert manifest.cache.savings.fraction_saved == pytest.approx(1.5 / 12)
    graph = ir.load(group_llama / "model.onnx").graph
    shapes = {v.name: v.shape for v in [*graph.inputs, *graph.outputs]}
    assert shapes["past_key_values.3.key"][1] == 1 and shapes["present.3.key"][1] == 1
    # Layer 3 computes scores for its 2 kept heads only: the Q projection's columns of heads 2-3.
    widths = sorted(v.const_value.shape[1] for v in graph.initializers.values() if v.name.startswith("sa.layer3.") and v.name.endswith("_kept.weight"))
    assert widths == [16, 32]  # K: one group of 16; Q: two heads of 16


def assert_borrows_group_0_of_layer_3(out, sharp_llama, logits: str = "prefill/logits"):
    """OUT passes parity against the reference whose layer 3 borrows group 0, and fails
    against the one that borrows group 1: the ``logits`` outputs, not only the cache, tell them apart."""
    manifest = Manifest.read(out)
    model, tokenizer = load_reference(resolve_model(str(sharp_llama)), allow_pickle=False)
    assert run_parity(SAModel(out), model, manifest.plan, tokenizer, decode_steps=4).passed
    other = run_parity(SAModel(out), model, dataclasses.replace(manifest.plan, shared_groups={3: (1,)}), tokenizer, decode_steps=4)
    assert not other.passed
    assert min(c.max_abs for c in other.comparisons if c.name.endswith(logits)) > 0.01
    return model, tokenizer, manifest


def test_the_graph_matches_the_reference_that_borrows_those_heads_and_no_other(group_llama, sharp_llama):
    model, tokenizer, manifest = assert_borrows_group_0_of_layer_3(group_llama, sharp_llama)
    with pytest.raises(CheckFailed, match="has shape"):  # the whole layer: a cache of another width
        run_parity(SAModel(group_llama), model, dataclasses.replace(manifest.plan, shared_groups={}), tokenizer, decode_steps=4)


@pytest.mark.parametrize("arch, anchors", [("qwen2", ()), ("qwen3", ()), ("gemma2", (1,))])
def test_groups_share_on_other_architectures(tiny_models, tmp_path, arch, anchors):
    # Q/K biases (Qwen2), per-head Q/K norms (Qwen3), softcapped scores and alternating
    # sliding layers (Gemma 2: layer 3 is global, as layer 1); parity is checked by convert.
    result = convert(ConvertRequest(model=str(tiny_models[arch]), spans=("3.1",), anchors=anchors, out=tmp_path / "sa"))
    assert result.parity.passed and result.plan.shared_groups == {3: (1,)}


# Layer 4 reads the heads layer 3 keeps (2 and 3) beside its anchor's: a map may read them.
READS_KEPT_HEADS = {4: HeadMap((((3, 2), (2, 0)), ((3, 3), (2, 1)), ((3, 3), (2, 2)), ((3, 2), (2, 3))), ((0.6, 0.4),) * 4)}


@pytest.mark.parametrize(
    "spans, head_maps",
    [
        (["3.0"], {3: HeadMap.from_anchor_heads(2, (3, 1, 0, 2))}),  # one source per head: a Gather of the borrowed rows
        (["3.0"], {3: HeadMap(tuple(((2, j),) for j in (1, 1, 0, 2)), ((0.5,), (1.5,), (1.0,), (1.0,)))}),  # the same with gains
        (["3.0"], {3: HeadMap((((2, 3), (1, 0)), ((2, 1), (1, 2)), ((2, 0), (1, 1)), ((2, 2), (1, 3))), ((0.7, 0.3),) * 4)}),  # a mixture
        (["3.0", "4"], {3: HeadMap.from_anchor_heads(2, (3, 1, 0, 2)), **READS_KEPT_HEADS}),
    ],
)
def test_head_maps_reach_the_borrowed_heads_in_head_order(sharp_llama, tmp_path, spans, head_maps):
    """Group 0 of layer 3 borrows (heads 0 and 1, in front of the kept 2 and 3): any slip in
    which rows of the map it takes or where they go back among the kept heads moves the logits,
    and so does any slip in which of layer 3's heads a later layer's map reads."""
    import onnxruntime as ort
    import torch

    from graph_passes import apply_sharing_plan
    from sa_export.accuracy.reference import shared_attention
    from sa_export.export.dynamo import export_dynamo
    from sa_export.export.onnx_io import save_onnx
    from sa_export.hf.models import ModelSource, load_hf_model

    hf = load_hf_model(ModelSource("hf", sharp_llama, "tiny"))
    plan = build_plan(spans, 6, kv_heads=2, num_heads=4).with_head_maps(head_maps)
    model = ir.load(export_dynamo(hf, tmp_path / "export"))
    apply_sharing_plan(model, plan)
    (tmp_path / "sa").mkdir()
    save_onnx(model, tmp_path / "sa")
    session = ort.InferenceSession(str(tmp_path / "sa" / "model.onnx"))
    ids = np.arange(3, 13, dtype=np.int64)[None]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(10, dtype=np.int64)[None]}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            feeds[value.name] = np.zeros((1, value.shape[1], 0, value.shape[3]), np.float32)
    logits = session.run(["logits"], feeds)[0]
    with torch.no_grad(), shared_attention(hf, plan):
        expected = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    with torch.no_grad():
        base = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - expected).max() < 1e-4
    assert np.abs(base - expected).max() > 0.01  # the heads borrowed change the model


def test_a_map_cannot_read_the_heads_a_partly_shared_layer_borrows():
    plan = build_plan(["3.0", "4"], 6, kv_heads=2, num_heads=4)
    assert plan.with_head_maps(READS_KEPT_HEADS).sources_of(4) == (2, 3)
    reads_borrowed = HeadMap((((3, 1), (2, 0)),) * 4, ((0.5, 0.5),) * 4)
    with pytest.raises(PlanError, match="reads head 1 of layer 3, which borrows it"):
        plan.with_head_maps({4: reads_borrowed})
    with pytest.raises(PlanError, match="not an earlier layer that computes its attention"):
        build_plan(["3", "4"], 6, kv_heads=2, num_heads=4).with_head_maps({4: READS_KEPT_HEADS[4]})


def test_fused_qkv_projections_cannot_share_part_of_a_layer(tiny_models, tmp_path):
    with pytest.raises(AttentionPatternError, match="separate Q and K projections"):
        convert(ConvertRequest(model=str(tiny_models["phi3"]), spans=("3.1",), out=tmp_path / "sa"))
    assert not (tmp_path / "sa").exists()


def test_a_group_the_model_does_not_have_is_refused_in_a_line(tiny_llama_with_tokenizer, tmp_path):
    result = run_cli("convert", tiny_llama_with_tokenizer, "--span", "3.2", "-o", tmp_path / "sa")
    assert result.exit_code == 2 and "has 2 KV groups (0-1)" in result.output + result.stderr
    assert not (tmp_path / "sa").exists()


def test_the_tensorrt_graph_shares_a_group_in_fp16_with_caches_written_in_place(sharp_llama, tmp_path):
    # jetson-orin: fp16 with fp32 scores and Softmax, TensorScatter cache writes; parity on ONNX Runtime.
    result = convert(ConvertRequest(model=str(sharp_llama), spans=("3.1", "4"), out=tmp_path / "sa", target="jetson-orin"))
    assert result.parity.passed and result.manifest.cache.buffer == "shared"
    script = (tmp_path / "sa" / "bundle" / "build_engine.sh").read_text()
    assert "past_key_values.3.key:1x1x" in script and "past_key_values.2.key:1x2x" in script  # the engine's profiles


def test_bench_says_what_a_partly_shared_graph_runs(group_llama):
    from sa_export.stages.bench import graph_description

    assert "partly shared layers (KV groups)" in graph_description(Manifest.read(group_llama))


def test_the_attention_op_of_opset_23_is_unfused_then_shared_in_part(sharp_llama, tmp_path):
    # The ONNX Attention op repeats K itself; unfused, its repeat is narrowed like the export's.
    result = convert(ConvertRequest(model=str(sharp_llama), spans=("3.0", "4"), out=tmp_path / "sa", opset=23))
    assert result.parity.passed and result.manifest.cache.kv_heads_of("past_key_values.3.key") == 1


def test_fitted_maps_and_corrections_reach_a_partly_shared_layer(monkeypatch, tiny_llama_with_tokenizer, tmp_path):
    # --head-map fit: mixtures over the sources' heads, of which the graph takes the borrowed rows;
    # the corrections fold into V/O of layers 3 and 4 and Q/K of the sources.
    move_fitted_corrections(monkeypatch)
    request = ConvertRequest(
        model=str(tiny_llama_with_tokenizer), spans=("3.0", "4"), out=tmp_path / "sa", head_map="fit", fit_steps=2, lora_rank=2,
        calib_tokens=2048, decode_steps=4,
    )
    result = convert(request)
    assert result.parity.passed and result.plan.shared_groups == {3: (0,)}
    assert any(m.width > 1 for m in result.plan.head_maps.values())  # mixtures, not one head each
    assert "3_v_proj" in result.manifest.head_map["corrections"]["corrects"]
