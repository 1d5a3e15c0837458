"""Decoding block-quantized constants exactly as ONNX Runtime's operators do."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from sa_export.accuracy.quantized import dequantize_gather, dequantize_matmul_nbits

K, N, BLOCK = 80, 24, 32  # K not a multiple of the block: the last block is padded
BLOBS = -(-K // BLOCK)


def _run(nodes, inputs, outputs, initializers, feeds):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0], ir.from_proto(model)


@pytest.mark.parametrize("zero_points", [False, True])
def test_matmul_nbits_weight_equals_what_the_operator_computes(zero_points):
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, size=(N, BLOBS, BLOCK // 2), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(N * BLOBS,)).astype(np.float32)
    initializers = [helper.make_tensor("B", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True), onnx.numpy_helper.from_array(scales, "scales")]
    inputs = ["x", "B", "scales"]
    if zero_points:
        zp = rng.integers(0, 256, size=(N * -(-BLOBS // 2),), dtype=np.uint8)
        initializers.append(onnx.numpy_helper.from_array(zp, "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=1)
    x = rng.standard_normal((3, K)).astype(np.float32)
    y, model = _run([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])], initializers, {"x": x})
    weight = dequantize_matmul_nbits(next(iter(model.graph)))
    assert weight.shape == (N, K)
    np.testing.assert_allclose(x @ weight.T, y, rtol=1e-4, atol=1e-4)


def test_gather_block_quantized_table_equals_what_the_operator_gathers():
    rng = np.random.default_rng(1)
    vocab, hidden = 10, 64
    packed = rng.integers(0, 256, size=(vocab, hidden // 2), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(vocab, hidden // BLOCK)).astype(np.float32)
    node = helper.make_node("GatherBlockQuantized", ["data", "ids", "scales"], ["y"], domain="com.microsoft",
                            bits=4, block_size=BLOCK, gather_axis=0, quantize_axis=1)
    ids = np.arange(vocab, dtype=np.int64)[None]
    initializers = [onnx.numpy_helper.from_array(packed, "data"), onnx.numpy_helper.from_array(scales, "scales")]
    y, model = _run([node], [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, vocab])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers, {"ids": ids})
    np.testing.assert_allclose(dequantize_gather(next(iter(model.graph))), y[0], rtol=1e-6, atol=1e-6)
