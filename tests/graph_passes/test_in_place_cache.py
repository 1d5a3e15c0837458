"""Caches as buffers written in place: the same logits as the concatenating graph, no Concat on a cache."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graph_passes import apply_sharing_plan, writes_caches_in_place
from sa_export.core.plan import build_plan


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    from sa_export.export.dynamo import export_dynamo
    from sa_export.hf.models import ModelSource, load_hf_model

    return export_dynamo(load_hf_model(ModelSource("hf", tiny_llama, "tiny")), tmp_path_factory.mktemp("export"))


def _session(model: ir.Model, path) -> ort.InferenceSession:
    ir.external_data.load_to_model(model)
    ir.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _cache_inputs(session):
    return [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]


def test_in_place_buffers_give_the_logits_of_concatenation(exported, tmp_path):
    plan = build_plan(["3-4"], 6)
    concat, in_place = ir.load(exported), ir.load(exported)
    apply_sharing_plan(concat, plan)
    apply_sharing_plan(in_place, plan, in_place_cache=True)
    assert writes_caches_in_place(in_place.graph) and not writes_caches_in_place(concat.graph)
    a, b = _session(concat, tmp_path / "concat.onnx"), _session(in_place, tmp_path / "in_place.onnx")
    rng = np.random.default_rng(0)
    batch, prompt, capacity = 2, 5, 16
    ids = rng.integers(3, 100, (batch, prompt))
    mask = np.ones((batch, prompt), np.int64)
    mask[1, :2] = 0  # a left-padded row
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    grown = {i.name: np.zeros((batch, 2, 0, 16), np.float32) for i in _cache_inputs(a)}
    buffers = {i.name: np.zeros((batch, 2, capacity, 16), np.float32) for i in _cache_inputs(b)}
    for step in range(3):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        out_a = dict(zip([o.name for o in a.get_outputs()], a.run(None, {**feeds, **grown})))
        out_b = dict(zip([o.name for o in b.get_outputs()], b.run(None, {**feeds, **buffers})))
        np.testing.assert_allclose(out_b["logits"], out_a["logits"], atol=1e-5)
        total = mask.shape[1]
        for name in grown:
            present = name.replace("past_key_values", "present")
            np.testing.assert_allclose(out_b[present][:, :, :total], out_a[present], atol=1e-6)
            grown[name], buffers[name] = out_a[present], out_b[present]
        ids = rng.integers(3, 100, (batch, 1))
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], 1)
        positions = positions[:, -1:] + 1


def test_no_cache_is_concatenated_and_shared_layers_keep_only_v(exported):
    model = ir.load(exported)
    apply_sharing_plan(model, build_plan(["3-4"], 6), in_place_cache=True)
    graph = model.graph
    caches = {v.name for v in graph.inputs if v.name.startswith("past_key_values.")}
    assert not [n for n in graph if n.op_type == "Concat" and {v.name for v in n.inputs if v is not None} & caches]
    writes = [n for n in graph if n.op_type == "TensorScatter"]
    assert len(writes) == len(caches) == 10 and "past_key_values.3.key" not in caches
    assert all(n.attributes["axis"].value == -2 for n in writes)
    assert model.opset_imports[""] >= 24
    for value in graph.inputs:
        if value.name in caches:
            assert value.shape[2] == "max_cache_length"
