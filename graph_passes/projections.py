"""Projections with constant weights, full precision or block-quantized, and their output columns.

Two forms reach the GQA rewrite: ``MatMul(x, W)`` with W of shape [K, N], and ONNX
Runtime's ``com.microsoft.MatMulNBits(x, B, scales[, zero_points, g_idx, bias])``, the
builder's int4 graph, which stores W transposed and packed: B [N, blocks, bytes per block],
scales and zero points per output row and block. An output column of the projection is a
row of every MatMulNBits constant, so keeping some columns keeps those rows and
leaves the quantized values bit for bit as they were.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.initializers import add_initializer

MS_DOMAIN = "com.microsoft"
MATMUL_NBITS = "MatMulNBits"
# MatMulNBits inputs by position (com.microsoft schema).
_A, _B, _SCALES, _ZERO_POINTS, _G_IDX, _BIAS = range(6)


def attribute_values(node: ir.Node) -> dict:
    """A node's attributes as plain Python values."""
    return {key: attr.value for key, attr in node.attributes.items()}


def head_columns(heads, head_dim: int, offset: int = 0) -> np.ndarray:
    """The output columns of ``heads`` (each ``head_dim`` wide, counted from head ``offset``) of a projection, in that order."""
    return np.concatenate([np.arange((offset + h) * head_dim, (offset + h + 1) * head_dim) for h in heads]).astype(np.int64)


def is_matmul_nbits(node: ir.Node) -> bool:
    return node.op_type == MATMUL_NBITS and node.domain == MS_DOMAIN


def is_projection(node: ir.Node) -> bool:
    """A MatMul or MatMulNBits whose weights are constants (row-wise quantized, no g_idx)."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        return node.inputs[1].const_value is not None
    if not is_matmul_nbits(node):
        return False
    inputs = list(node.inputs) + [None] * 6
    if inputs[_G_IDX] is not None:
        return False  # act-order models permute K by g_idx; the builder's RTN graphs have none
    return all(inputs[i] is None or inputs[i].const_value is not None for i in (_B, _SCALES, _ZERO_POINTS, _BIAS))


def projection_width(node: ir.Node) -> int:
    """N, the number of output columns."""
    if is_matmul_nbits(node):
        return node.attributes["N"].as_int()
    return node.inputs[1].const_value.shape[-1]


def _rows(array: np.ndarray, rows: int, columns: np.ndarray) -> np.ndarray:
    """The rows ``columns`` of a per-output-row constant stored [N, ...] or flat [N * m]."""
    kept = array.reshape(rows, -1)[columns]
    shape = (len(columns), *array.shape[1:]) if array.ndim > 1 else (-1,)
    return np.ascontiguousarray(kept.reshape(shape))


def column_select(graph: ir.Graph, before: ir.Node, node: ir.Node, columns: np.ndarray, name: str) -> ir.Value:
    """A new projection, inserted before ``before``, computing the columns ``columns`` of ``node``'s output, in that order."""
    columns = np.asarray(columns, np.int64)
    if not is_matmul_nbits(node):
        weight = node.inputs[1].const_value.numpy()
        narrow = add_initializer(graph, f"{name}.weight", np.ascontiguousarray(weight[..., columns]))
        new = ir.node("MatMul", [node.inputs[0], narrow], name=name)
        graph.insert_before(before, new)
        return new.outputs[0]
    rows = projection_width(node)
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    suffixes = {_B: "weight_Q", _SCALES: "weight_scales", _ZERO_POINTS: "weight_zero_points", _BIAS: "bias"}
    narrow_inputs: list[ir.Value | None] = [inputs[_A]]
    for position in (_B, _SCALES, _ZERO_POINTS, _G_IDX, _BIAS):
        value = inputs[position]
        if value is None:
            narrow_inputs.append(None)
            continue
        narrow_inputs.append(add_initializer(graph, f"{name}.{suffixes[position]}", _rows(value.const_value.numpy(), rows, columns)))
    while narrow_inputs[-1] is None:
        narrow_inputs.pop()
    attributes = {**attribute_values(node), "N": len(columns)}
    new = ir.node(MATMUL_NBITS, narrow_inputs, attributes=attributes, domain=MS_DOMAIN, name=name)
    graph.insert_before(before, new)
    return new.outputs[0]
