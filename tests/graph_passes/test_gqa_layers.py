import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graph_passes.gqa_layers import NodeBuilder


@pytest.mark.parametrize("heads, op", [((1, 2), "Slice"), ((2, 0), "Gather"), ((3, 3, 1), "Gather")])
def test_heads_picks_whole_heads_in_order(heads, op):
    total, head_dim = 4, 3
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2, total * head_dim]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="g")
    builder = NodeBuilder(graph, None, "t")
    picked = builder.heads(x, heads, total, head_dim, "picked")
    picked.dtype = ir.DataType.FLOAT
    graph.outputs.append(picked)
    for node in builder.nodes:
        graph.append(node)
    assert op in [node.op_type for node in graph]
    session = ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString(), providers=["CPUExecutionProvider"])
    data = np.arange(2 * total * head_dim, dtype=np.float32).reshape(1, 2, total * head_dim)
    expected = data.reshape(1, 2, total, head_dim)[:, :, list(heads)].reshape(1, 2, -1)
    np.testing.assert_array_equal(session.run(None, {"x": data})[0], expected)
