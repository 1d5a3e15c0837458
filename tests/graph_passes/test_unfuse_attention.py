import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graph_passes.unfuse_attention import UnfuseAttentionPass
from sa_export.core.errors import AttentionPatternError


def _attention_model(**attributes):
    q = ir.val("q", ir.DataType.FLOAT, [1, 2, 3, 4])
    k = ir.val("k", ir.DataType.FLOAT, [1, 2, 5, 4])
    v = ir.val("v", ir.DataType.FLOAT, [1, 2, 5, 4])
    mask = ir.val("mask", ir.DataType.BOOL, [1, 1, 3, 5])
    node = ir.node("Attention", [q, k, v, mask], attributes=attributes or None, name="attn")
    node.outputs[0].name = "y"
    graph = ir.Graph([q, k, v, mask], [node.outputs[0]], nodes=[node], opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def _reference(q, k, v, mask, scale, softcap=0.0):
    scores = q @ k.transpose(0, 1, 3, 2) * scale
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.where(mask, scores, np.finfo(np.float32).min)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_attention_becomes_matmul_softmax_matmul_with_the_same_result(softcap):
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in (("q", (1, 2, 3, 4)), ("k", (1, 2, 5, 4)), ("v", (1, 2, 5, 4)))}
    feeds["mask"] = np.tril(np.ones((3, 5), bool), k=2)[None, None]
    feeds["mask"][..., 0, :] = False  # a fully masked row stays finite
    model = _attention_model(scale=0.5, softcap=softcap)
    assert UnfuseAttentionPass()(model).modified is True
    assert [n.op_type for n in model.graph].count("Softmax") == 1 and not [n for n in model.graph if n.op_type == "Attention"]
    assert UnfuseAttentionPass()(model).modified is False
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, feeds)[0]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, _reference(feeds["q"], feeds["k"], feeds["v"], feeds["mask"], 0.5, softcap), rtol=1e-5, atol=1e-6)


def test_causal_flag_is_refused_with_the_reason():
    with pytest.raises(AttentionPatternError, match="is_causal"):
        UnfuseAttentionPass()(_attention_model(is_causal=1))
