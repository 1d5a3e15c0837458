import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graph_passes.narrow_projections import NarrowSlicedProjectionsPass


def _model(with_second_slice: bool):
    rng = np.random.default_rng(0)
    x = ir.val("x", ir.DataType.FLOAT, [2, 3, 8])
    w = ir.Value(name="w", const_value=ir.tensor(rng.standard_normal((8, 12)).astype(np.float32), name="w"))
    b = ir.Value(name="b", const_value=ir.tensor(rng.standard_normal(12).astype(np.float32), name="b"))
    consts = {n: ir.Value(name=n, const_value=ir.tensor(np.array(v, np.int64), name=n)) for n, v in
              (("starts", [8]), ("ends", [np.iinfo(np.int64).max]), ("axes", [2]), ("starts_q", [0]), ("ends_q", [8]))}
    matmul = ir.node("MatMul", [x, w])
    add = ir.node("Add", [matmul.outputs[0], b])
    v = ir.node("Slice", [add.outputs[0], consts["starts"], consts["ends"], consts["axes"]])
    relu = ir.node("Relu", [v.outputs[0]])
    nodes, outputs = [matmul, add, v, relu], [relu.outputs[0]]
    if with_second_slice:
        q = ir.node("Slice", [add.outputs[0], consts["starts_q"], consts["ends_q"], consts["axes"]])
        nodes.append(q)
        outputs.append(q.outputs[0])
    for i, out in enumerate(outputs):
        out.name = f"y{i}"
    graph = ir.Graph([x], outputs, nodes=nodes, initializers=[w, b, *consts.values()], opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def _run(model, x):
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_v_only_slice_narrows_weight_and_bias_with_equal_outputs():
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    model = _model(with_second_slice=False)
    before = _run(model, x)
    assert NarrowSlicedProjectionsPass()(model).modified is True
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    assert not [n for n in model.graph if n.op_type == "Slice"]
    shapes = sorted(tuple(v.const_value.shape) for v in model.graph.initializers.values() if v.name.endswith((".weight", ".bias")))
    assert shapes == [(4,), (8, 4)]
    np.testing.assert_allclose(_run(model, x)[0], before[0], rtol=1e-6)


def test_projection_read_by_several_slices_is_left_alone():
    model = _model(with_second_slice=True)
    assert NarrowSlicedProjectionsPass()(model).modified is False
