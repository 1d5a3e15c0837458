"""Detection and rewrite on a tiny dynamo export, plus the passes' contracts."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graph_passes import DropKCachePass, ShareProbabilitiesPass, apply_sharing_plan, find_attention_blocks
from sa_export.core.errors import AttentionPatternError, PlanError
from sa_export.core.plan import HeadMap, SharingPlan, build_plan


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    from sa_export.hf.models import ModelSource, load_hf_model
    from sa_export.export.dynamo import export_dynamo as _export

    out = tmp_path_factory.mktemp("export")
    return _export(load_hf_model(ModelSource("hf", tiny_llama, "tiny")), out)


def test_one_block_per_layer_with_its_cache_names(exported):
    blocks = find_attention_blocks(ir.load(exported).graph)
    assert [b.layer for b in blocks] == list(range(6))
    for block in blocks:
        assert block.softmax.op_type == "Softmax"
        assert block.scores_matmul.op_type == block.context_matmul.op_type == "MatMul"
        assert block.past_key == f"past_key_values.{block.layer}.key"
        assert block.present_value == f"present.{block.layer}.value"


def test_share_pass_reports_modification_and_drop_pass_removes_k_cache(exported):
    model = ir.load(exported)
    plan = build_plan(["3-4"], 6)
    assert ShareProbabilitiesPass(plan)(model).modified is True
    assert DropKCachePass(plan)(model).modified is True
    assert DropKCachePass(plan)(model).modified is False  # nothing left to drop
    names = {v.name for v in model.graph.inputs}
    assert "past_key_values.3.key" not in names and "past_key_values.3.value" in names
    assert [b.layer for b in find_attention_blocks(model.graph)] == [0, 1, 2, 5]


def test_same_plan_twice_changes_nothing_and_another_plan_is_refused(exported):
    model = ir.load(exported)
    plan = build_plan(["3-4"], 6)
    first = apply_sharing_plan(model, plan)
    assert first.modified and first.weight_bytes_removed == 2 * (64 * 64 + 64 * 32) * 4
    assert apply_sharing_plan(model, plan).modified is False
    with pytest.raises(PlanError, match="already converted"):
        apply_sharing_plan(model, build_plan(["2"], 6))


def test_share_pass_names_the_layer_it_cannot_find(exported):
    model = ir.load(exported)
    apply_sharing_plan(model, build_plan(["3"], 6))
    with pytest.raises(AttentionPatternError, match="layer 3"):
        ShareProbabilitiesPass(build_plan(["3"], 6))(model)


def test_graph_without_attention_has_no_blocks():
    x = ir.val("x", ir.DataType.FLOAT, [2, 3])
    node = ir.node("Softmax", [x])
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 18})
    assert find_attention_blocks(graph) == []


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})))


def _graph_and_reference_logits(exported, tiny_llama, tmp_path, plan: SharingPlan):
    """Logits of the rewritten graph (ONNX Runtime) and of the PyTorch reference, on one prompt."""
    import torch

    from sa_export.hf.models import ModelSource, load_hf_model
    from sa_export.accuracy.reference import shared_attention

    model = ir.load(exported)
    apply_sharing_plan(model, plan)
    ir.save(model, tmp_path / "m.onnx", external_data="m.onnx.data")
    ids = np.random.default_rng(0).integers(0, 256, (1, 10))
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(10)[None],
        **{f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 16), np.float32) for i in range(6) for k in ("key", "value")},
    }
    hf = load_hf_model(ModelSource("hf", tiny_llama, "tiny"))
    with torch.no_grad(), shared_attention(hf, plan):
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    with torch.no_grad(), shared_attention(hf, SharingPlan(6, dict(plan.anchors))):
        identity = hf(torch.from_numpy(ids)).logits.numpy()
    return model, _run(tmp_path / "m.onnx", feeds)["logits"], ref, identity


def test_head_map_becomes_one_gather_and_matches_the_reference(exported, tiny_llama, tmp_path):
    """The graph and the PyTorch reference apply the same head map."""
    plan = SharingPlan(6, {3: 2, 4: 2}, {3: HeadMap.from_anchor_heads(2, (1, 0, 3, 2))})
    model, onnx_logits, ref, identity = _graph_and_reference_logits(exported, tiny_llama, tmp_path, plan)
    gathers = [n for n in model.graph if n.op_type == "Gather" and n.name.startswith("sa.")]
    assert len(gathers) == 1 and gathers[0].attributes["axis"].value == 1
    assert np.abs(onnx_logits - ref).max() < 1e-4
    assert np.abs(identity - ref).max() > 1e-3  # the map matters


def test_a_fitted_head_map_with_gains_matches_the_reference(exported, tiny_llama, tmp_path):
    """``fit``'s maps read every head of their layers, with weights that need not sum to 1."""
    rng = np.random.default_rng(2)
    sources = tuple((layer, head) for layer in (1, 2) for head in range(4))
    weights = tuple(tuple(float(w) for w in rng.uniform(0.0, 0.3, len(sources))) for _ in range(4))
    assert any(abs(sum(row) - 1) > 0.1 for row in weights)
    plan = SharingPlan(6, {3: 2, 4: 2}, {3: HeadMap((sources,) * 4, weights)})
    _, onnx_logits, ref, identity = _graph_and_reference_logits(exported, tiny_llama, tmp_path, plan)
    assert np.abs(onnx_logits - ref).max() < 1e-4
    assert np.abs(identity - ref).max() > 1e-3


def test_group_query_attention_without_packed_qkv_is_refused_naming_the_layer():
    x = ir.val("input_ids", ir.DataType.INT64, [1, 4])
    past_k = ir.val("past_key_values.7.key", ir.DataType.FLOAT, [1, 2, 0, 16])
    past_v = ir.val("past_key_values.7.value", ir.DataType.FLOAT, [1, 2, 0, 16])
    gqa = ir.node("GroupQueryAttention", [x, None, None, past_k, past_v], domain="com.microsoft", name="gqa7", num_outputs=3)
    graph = ir.Graph([x, past_k, past_v], gqa.outputs, nodes=[gqa], opset_imports={"": 18, "com.microsoft": 1})
    with pytest.raises(AttentionPatternError, match=r"layer 7: com.microsoft GroupQueryAttention 'gqa7' is not fed by a packed QKV MatMul.*default exporter"):
        apply_sharing_plan(ir.Model(graph, ir_version=10), build_plan(["8"], 12))


def test_shape_reads_of_a_dropped_k_cache_move_to_its_v_cache(exported):
    """The dynamo export reads batch and past length from one layer's K cache; sharing that layer keeps them."""
    model = ir.load(exported)
    shape_sources = {n.inputs[0].name for n in model.graph if n.op_type == "Shape" and n.inputs[0].name.endswith(".key")}
    assert shape_sources  # the export does read a K cache's shape
    apply_sharing_plan(model, build_plan(["1-5"], 6))
    names = {v.name for v in model.graph.inputs}
    assert not any(name.endswith(".key") for name in names if name != "past_key_values.0.key")
    assert all(v.name.startswith("past_key_values") or v.name in ("input_ids", "attention_mask", "position_ids") for v in model.graph.inputs)


def test_a_rewrite_that_loses_an_output_shape_fails_its_postcondition(exported):
    from graph_passes.contracts import ensure_full_io_types, io_types

    model = ir.load(exported)
    before = io_types(model)
    model.graph.outputs[1].shape = None
    with pytest.raises(AttentionPatternError, match="present.0.key.*lost its shape"):
        ensure_full_io_types(model, before)


def test_the_decomposed_sa_graph_passes_onnx_full_check(converted_tiny_llama):
    import onnx

    onnx.checker.check_model(str(converted_tiny_llama / "model.onnx"), full_check=True)


def test_the_baseline_runs_the_same_sequence_and_reports_honestly(exported):
    """An empty plan on an opset-18 fp32 export has nothing to unfuse, share or narrow."""
    model = ir.load(exported)
    report = apply_sharing_plan(model, SharingPlan(6, {}))
    assert report.modified is False and report.nodes_before == report.nodes_after
    assert report.weight_bytes_removed == 0
