"""Drop the Q and K columns of fused QKV projections that only V still reads.

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

from graph_passes.initializers import add_initializer

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
    node.replace_input_with(index, add_initializer(graph, name, array))


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
            prefix = f"{matmul.name or weight.name}.cols{start}_{end}"
            _replace_initializer(graph, matmul, 1, tensor.numpy()[:, start:end], prefix + ".weight")
            if bias_add is not None:
                slot = 1 - [u for u in matmul.outputs[0].uses()][0].idx
                bias_value = bias_add.inputs[slot]
                bias_array = ir.convenience.get_const_tensor(bias_value).numpy()[start:end]
                _replace_initializer(graph, bias_add, slot, bias_array, prefix + ".bias")
            ir.convenience.replace_all_uses_with(slice_node.outputs[0], output)
            modified = True
        return ir.passes.PassResult(model, modified)


def _through_identity(value: ir.Value | None) -> ir.Value | None:
    while value is not None and value.producer() is not None and value.producer().op_type == "Identity":
        value = value.producer().inputs[0]
    return value


def _only_reads_leading_dims(shape_node: ir.Node, axis: int) -> bool:
    """True when every consumer of Shape(x) reads dims before ``axis`` only (Gather with constant indices)."""
    if shape_node.op_type != "Shape" or shape_node.attributes.get("start") is not None or shape_node.attributes.get("end") is not None:
        return False
    for use in shape_node.outputs[0].uses():
        indices = _constant_ints(use.node.inputs[1]) if use.node.op_type == "Gather" and use.idx == 0 else None
        if indices is None or not all(0 <= i < axis for i in indices):
            return False
    return True


class ShapeFromLiveSplitOutputPass(ir.passes.InPlacePass):
    """Read batch/sequence sizes from the live output of a Split instead of a dead one.

    GPT-2 reshapes V with the leading dims of K (``key.shape[:-1]``); all outputs of a
    Split share the dims before its axis, so taking them from V lets K die.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for split in [n for n in model.graph if n.op_type == "Split"]:
            axis = split.attributes.get_int("axis", 0)
            if axis <= 0:
                continue
            live = [o for o in split.outputs if any(u.node.op_type != "Shape" for u in o.uses())]
            if not live:
                continue
            for output in split.outputs:
                uses = list(output.uses())
                if output in live or not uses or not all(_only_reads_leading_dims(u.node, axis) for u in uses):
                    continue
                for use in uses:
                    use.node.replace_input_with(0, live[0])
                modified = True
        return ir.passes.PassResult(model, modified)


class NarrowSplitProjectionsPass(ir.passes.InPlacePass):
    """Gemm(x, W, b) -> Reshape(.., [.., width]) -> Split(last axis) with one live output:
    compute only that output's columns (GPT-2's c_attn in a shared layer)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for split in [n for n in graph if n.op_type == "Split"]:
            live = [i for i, o in enumerate(split.outputs) if o.uses() or o.is_graph_output()]
            reshape = split.inputs[0].producer()
            if len(live) != 1 or reshape is None or reshape.op_type != "Reshape":
                continue
            gemm = reshape.inputs[0].producer()
            concat = reshape.inputs[1].producer()
            if gemm is None or gemm.op_type != "Gemm" or concat is None or concat.op_type != "Concat":
                continue
            if any(gemm.attributes.get_int(a, 0) for a in ("transA", "transB")) or gemm.attributes.get_float("alpha", 1.0) != 1.0:
                continue
            weight = ir.convenience.get_const_tensor(gemm.inputs[1])
            bias_value = _through_identity(gemm.inputs[2]) if len(gemm.inputs) > 2 else None
            bias = ir.convenience.get_const_tensor(bias_value) if bias_value is not None else None
            width = _constant_ints(concat.inputs[-1])
            sizes = _split_sizes(split, weight.shape[1]) if weight is not None else None
            if weight is None or sizes is None or width != [weight.shape[1]] or sum(sizes) != weight.shape[1] or split.attributes.get_int("axis", 0) != len(concat.inputs) - 1:
                continue
            start = sum(sizes[: live[0]])
            end = start + sizes[live[0]]
            prefix = f"{gemm.name or 'gemm'}.cols{start}_{end}"
            inputs = [gemm.inputs[0], add_initializer(graph, prefix + ".weight", weight.numpy()[:, start:end])]
            if bias is not None:
                inputs.append(add_initializer(graph, prefix + ".bias", bias.numpy()[start:end]))
            narrow = ir.node("Gemm", inputs, attributes={"alpha": 1.0, "beta": gemm.attributes.get_float("beta", 1.0)}, name=prefix)
            shape = ir.node("Concat", [*concat.inputs[:-1], add_initializer(graph, prefix + ".width", np.array([end - start], np.int64))], attributes={"axis": 0}, name=prefix + ".shape")
            reshaped = ir.node("Reshape", [narrow.outputs[0], shape.outputs[0]], name=prefix + ".reshape")
            graph.insert_before(split, [narrow, shape, reshaped])
            ir.convenience.replace_all_uses_with(split.outputs[live[0]], reshaped.outputs[0])
            modified = True
        return ir.passes.PassResult(model, modified)



def _split_sizes(split: ir.Node, width: int) -> list[int] | None:
    """Output widths of a Split: its sizes input, or opset 18's num_outputs (equal chunks, the last one smaller)."""
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        return _constant_ints(split.inputs[1])
    count = split.attributes.get_int("num_outputs", 0)
    if count <= 0:
        return None
    chunk = -(-width // count)
    return [min(chunk, width - i * chunk) for i in range(count)]


def _single_non_shape_use(value: ir.Value) -> ir.Usage | None:
    uses = [u for u in value.uses() if u.node.op_type != "Shape"]
    return uses[0] if len(uses) == 1 else None


class NarrowInterleavedProjectionsPass(ir.passes.InPlacePass):
    """GPT-NeoX's query_key_value: MatMul (+ bias) -> Reshape [.., heads, 3 * head_dim] ->
    Transpose -> Slice of the V part of every head. In a shared layer only that Slice
    is left, so keep only V's columns of each head.

    The Slice bounds are computed from Shape(...) in the export; onnxscript's constant
    folder turns them into constants once the per-head width is annotated on the
    Reshape and Transpose outputs (it is the Reshape's constant last dimension).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.optimizer import fold_constants

        candidates = [m for m in (self._match(n) for n in model.graph if n.op_type == "MatMul") if m is not None]
        if not candidates:
            return ir.passes.PassResult(model, False)
        for _, _, reshape, transpose, _, width in candidates:
            for value in (reshape.outputs[0], transpose.outputs[0]):
                rank = len(value.shape) if value.shape is not None else 4
                value.shape = ir.Shape([*(value.shape or [None] * rank)[:-1], width]) if rank else value.shape
        # Fold only small shape arithmetic; large tensors stay as they are.
        fold_constants(model, input_size_limit=64, output_size_limit=64)
        modified = False
        for matmul, bias_add, reshape, transpose, slice_node, width in candidates:
            if slice_node.graph is None:
                continue
            if slice_node.op_type == "Split":
                bounds = _live_split_columns(slice_node, width)
            else:
                columns = _sliced_columns(slice_node, width)
                bounds = (*columns, slice_node.outputs[0]) if columns is not None else None
            if bounds is None:
                continue
            start, end, live_output = bounds
            graph = model.graph
            weight = ir.convenience.get_const_tensor(matmul.inputs[1]).numpy()
            heads = weight.shape[1] // width
            columns = np.concatenate([np.arange(h * width + start, h * width + end) for h in range(heads)])
            prefix = f"{matmul.name or matmul.inputs[1].name}.heads{start}_{end}"
            _replace_initializer(graph, matmul, 1, weight[:, columns], prefix + ".weight")
            if bias_add is not None:
                slot = next(i for i, v in enumerate(bias_add.inputs) if v is not matmul.outputs[0])
                bias = ir.convenience.get_const_tensor(_through_identity(bias_add.inputs[slot])).numpy()
                _replace_initializer(graph, bias_add, slot, bias[columns], prefix + ".bias")
            shape = reshape.inputs[1].producer()
            new_width = add_initializer(graph, f"{prefix}.width", np.array([end - start], np.int64))
            concat = ir.node("Concat", [*shape.inputs[:-1], new_width], attributes={"axis": 0}, name=f"{prefix}.shape")
            graph.insert_before(reshape, concat)
            reshape.replace_input_with(1, concat.outputs[0])
            ir.convenience.replace_all_uses_with(live_output, transpose.outputs[0])
            for value in (reshape.outputs[0], transpose.outputs[0]):  # the per-head width is V's alone now
                if value.shape is not None and len(value.shape):
                    value.shape = ir.Shape([*value.shape[:-1], end - start])
            modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _match(matmul: ir.Node):
        tensor = ir.convenience.get_const_tensor(matmul.inputs[1]) if matmul.inputs[1] is not None else None
        if tensor is None or len(tensor.shape) != 2:
            return None
        value, bias_add = matmul.outputs[0], None
        use = _single_non_shape_use(value)
        if use is not None and use.node.op_type == "Add":
            bias_add, value = use.node, use.node.outputs[0]
            use = _single_non_shape_use(value)
        if use is None or use.node.op_type != "Reshape" or use.idx != 0:
            return None
        reshape = use.node
        shape = reshape.inputs[1].producer()
        width = _constant_ints(shape.inputs[-1]) if shape is not None and shape.op_type == "Concat" else None
        if not width or width[0] <= 0 or tensor.shape[1] % width[0] or tensor.shape[1] == width[0]:
            return None
        use = _single_non_shape_use(reshape.outputs[0])
        if use is None or use.node.op_type != "Transpose":
            return None
        transpose = use.node
        perm = transpose.attributes.get_ints("perm", None)
        if not perm or perm[-1] != len(perm) - 1:
            return None
        use = _single_non_shape_use(transpose.outputs[0])
        # The optimum export slices V out of each head; the dynamo export splits Q, K and V.
        if use is None or use.node.op_type not in ("Slice", "Split") or use.idx != 0:
            return None
        return matmul, bias_add, reshape, transpose, use.node, width[0]


def _live_split_columns(split: ir.Node, width: int) -> tuple[int, int, ir.Value] | None:
    """(start, end, output) of the one live output of a Split on the last axis of a [.., width] tensor."""
    rank = len(split.inputs[0].shape) if split.inputs[0].shape is not None else None
    axis = split.attributes.get_int("axis", 0)
    if rank is None or axis not in (-1, rank - 1):
        return None
    live = [i for i, o in enumerate(split.outputs) if o.uses() or o.is_graph_output()]
    sizes = _split_sizes(split, width)
    if len(live) != 1 or sizes is None or sum(sizes) != width:
        return None
    start = sum(sizes[: live[0]])
    return start, start + sizes[live[0]], split.outputs[live[0]]
