"""Slice the Q and K columns out of fused QKV projections that only V still reads.

After sharing, a fused projection (Phi-3's qkv_proj) of a shared layer feeds a single
Slice that takes the V columns. This pass narrows the weight (and bias) to those
columns and drops the Slice, so the file really loses the Q/K bytes. It touches only
projections whose output has exactly that one consumer, so unshared layers (which
slice Q, K and V) are left alone.

Assumption, stated: hidden states in decoder-LM exports are [batch, seq, hidden], so
the projection's columns are axis 2 (or -1) of its output.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_INT64_MAX = np.iinfo(np.int64).max


def _constant_ints(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    array = ir.convenience.get_const_tensor(value)
    return None if array is None else [int(x) for x in array.numpy().reshape(-1)]


def _sliced_columns(node: ir.Node, width: int) -> tuple[int, int] | None:
    """(start, end) when ``node`` is a unit-step Slice on the last axis with constant bounds."""
    if node.op_type != "Slice" or len(node.inputs) < 4:
        return None
    starts, ends, axes = (_constant_ints(node.inputs[i]) for i in (1, 2, 3))
    steps = _constant_ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
    if None in (starts, ends, axes, steps) or len(axes) != 1 or axes[0] not in (2, -1) or steps != [1]:
        return None
    start = starts[0] + width if starts[0] < 0 else starts[0]
    end = width if ends[0] >= _INT64_MAX // 2 else (ends[0] + width if ends[0] < 0 else ends[0])
    start, end = max(0, min(start, width)), max(0, min(end, width))
    return (start, end) if 0 <= start < end <= width and (start, end) != (0, width) else None


def _replace_initializer(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, name: str) -> None:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    node.replace_input_with(index, value)


class NarrowSlicedProjectionsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for matmul in [n for n in graph if n.op_type == "MatMul"]:
            weight = matmul.inputs[1]
            tensor = ir.convenience.get_const_tensor(weight) if weight is not None else None
            if tensor is None or len(tensor.shape) != 2:
                continue
            width = tensor.shape[1]
            output, bias_add = matmul.outputs[0], None
            uses = list(output.uses())
            if len(uses) == 1 and uses[0].node.op_type == "Add":
                add = uses[0].node
                other = add.inputs[1 - uses[0].idx]
                bias = ir.convenience.get_const_tensor(other) if other is not None else None
                if bias is not None and bias.shape == ir.Shape([width]):
                    bias_add, output = add, add.outputs[0]
                    uses = list(output.uses())
            if len(uses) != 1 or uses[0].idx != 0:
                continue
            slice_node = uses[0].node
            columns = _sliced_columns(slice_node, width)
            if columns is None or slice_node.outputs[0].is_graph_output():
                continue
            start, end = columns
            _replace_initializer(graph, matmul, 1, tensor.numpy()[:, start:end], f"{weight.name}.cols{start}_{end}")
            if bias_add is not None:
                slot = 1 - [u for u in matmul.outputs[0].uses()][0].idx
                bias_value = bias_add.inputs[slot]
                bias_array = ir.convenience.get_const_tensor(bias_value).numpy()[start:end]
                _replace_initializer(graph, bias_add, slot, bias_array, f"{bias_value.name}.cols{start}_{end}")
            ir.convenience.replace_all_uses_with(slice_node.outputs[0], output)
            modified = True
        return ir.passes.PassResult(model, modified)
