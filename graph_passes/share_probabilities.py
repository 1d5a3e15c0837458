"""Make each shared layer consume its anchor's post-softmax probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graph_passes.attention_blocks import find_attention_blocks
from graph_passes.initializers import add_initializer
from sa_export.core.errors import AttentionPatternError
from sa_export.core.plan import HeadMap, SharingPlan, mixture_matrix


class ShareProbabilitiesPass(ir.passes.InPlacePass):
    """Rewire probs @ V of every shared layer to read the anchor's probabilities.

    A head map becomes one Gather on the head axis of the anchor's probabilities.
    The shared layer's own Q/K/softmax path is left dangling for dead-code removal.
    """

    def __init__(self, plan: SharingPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks = {block.layer: block for block in find_attention_blocks(model.graph)}
        modified = False
        for layer in self.plan.whole_layers:  # partly shared layers: share_kv_groups, which runs first
            if layer not in blocks:
                raise AttentionPatternError(layer, "no attention block found for this shared layer")
            context = blocks[layer].context_matmul
            context.replace_input_with(0, borrowed_probs(model.graph, blocks, self.plan, layer, context))
            modified = True
        return ir.passes.PassResult(model, modified)


def head_order_name(layer: int) -> str:
    """The node that gives a partly shared layer's probabilities, its own and borrowed, in head order (share_kv_groups)."""
    return f"sa.layer{layer}.head_order"


def _source_probs(graph: ir.Graph, blocks: dict, plan: SharingPlan, layer: int) -> dict[int, ir.Value]:
    """The probabilities of every layer ``layer`` reads, [batch, heads, S, T] in head order.
    A partly shared source gives its probs @ V's input, where its kept heads are its own
    (a map reads only those: ``SharingPlan.with_head_maps``); it is shared first."""
    found = {}
    for source in plan.sources_of(layer):
        if plan.is_partly_shared(source):
            node = next((n for n in graph if n.name == head_order_name(source)), None)
            if node is None:
                raise AttentionPatternError(source, f"layer {layer} reads the heads this partly shared layer keeps, which is not shared yet")
            found[source] = node.outputs[0]
        elif source in blocks:
            found[source] = blocks[source].probs
        else:
            raise AttentionPatternError(source, f"layer {layer} reads this layer's probabilities, but it has no attention block (is it shared itself?)")
    return found


def borrowed_probs(graph: ir.Graph, blocks: dict, plan: SharingPlan, layer: int, before: ir.Node, rows: Sequence[int] | None = None) -> ir.Value:
    """The probabilities shared ``layer`` borrows, inserted before ``before``: the anchor's, or
    its head map's; ``rows``: only those heads' (a partly shared layer's borrowed heads)."""
    head_map = plan.head_map(layer)
    probs = _source_probs(graph, blocks, plan, layer)
    if head_map is None and rows is None:
        return probs[plan.anchors[layer]]
    if head_map is None:  # the same heads of the anchor (rows are only given for a partly shared layer)
        head_map = HeadMap.from_anchor_heads(plan.anchors[layer], range(plan.kv_heads * plan.heads_per_group))
    return _mixed_probs(graph, probs, layer, head_map, before, rows)


def _mixed_probs(graph: ir.Graph, probs: dict[int, ir.Value], layer: int, head_map: HeadMap, before: ir.Node, rows: Sequence[int] | None = None) -> ir.Value:
    """Probabilities for a shared layer under a head map (of its heads ``rows``, default all).

    Concat of the source layers' probabilities on the head axis (when more than one),
    then a Gather with [heads] indices (one source per head) or a MatMul by the
    [heads, sources] mixture matrix (a convex mixture).
    """
    rows = list(range(head_map.num_heads)) if rows is None else list(rows)
    layers = head_map.layers
    first = probs[layers[0]]
    heads = head_map.num_heads
    shape = first.shape
    if shape is not None and len(shape) == 4 and isinstance(shape[1], int) and shape[1] != heads:
        raise AttentionPatternError(layer, f"head map has {heads} heads but the source layers have {shape[1]}")
    nodes = []
    prefix = f"sa.layer{layer}"
    if len(layers) > 1:
        concat = ir.node("Concat", [probs[l] for l in layers], attributes={"axis": 1}, name=f"{prefix}.concat_sources")
        nodes.append(concat)
        stacked = concat.outputs[0]
    else:
        stacked = first
    if head_map.width == 1:
        index = np.asarray([layers.index(l) * heads + h for ((l, h),) in (head_map.sources[r] for r in rows)], dtype=np.int64)
        gather = ir.node("Gather", [stacked, add_initializer(graph, f"{prefix}.head_sources", index)], attributes={"axis": 1}, name=f"{prefix}.gather_heads")
        nodes.append(gather)
        result = gather.outputs[0]
        gains = np.asarray([head_map.weights[r][0] for r in rows])
        if not np.all(gains == 1.0):  # a gain on a head's one source, as the GQA graph applies it
            dtype = first.dtype.numpy() if first.dtype is not None else np.float32
            scale = ir.node("Mul", [result, add_initializer(graph, f"{prefix}.head_gains", gains.reshape(1, -1, 1, 1).astype(dtype))], name=f"{prefix}.gains")
            nodes.append(scale)
            result = scale.outputs[0]
    else:
        # A convex mixture is a [heads, sources] matrix applied on the head axis: one MatMul
        # over [batch, sources, S*T], with no [heads, k, S, T] intermediate.
        dtype = first.dtype.numpy() if first.dtype is not None else np.float32
        matrix = mixture_matrix([head_map], layers, heads, dtype)[rows]
        flat_shape = add_initializer(graph, f"{prefix}.flat_shape", np.asarray([0, len(layers) * heads, -1], dtype=np.int64))
        flat = ir.node("Reshape", [stacked, flat_shape], name=f"{prefix}.flatten_sources")
        mix = ir.node("MatMul", [add_initializer(graph, f"{prefix}.head_mixture", matrix), flat.outputs[0]], name=f"{prefix}.mix_sources")
        if len(rows) == heads:
            shape = ir.node("Shape", [first], name=f"{prefix}.probs_shape")
            nodes.append(shape)
        else:  # [batch, rows, S, T]: the sources' shape with the rows' head count
            batch = ir.node("Shape", [first], attributes={"start": 0, "end": 1}, name=f"{prefix}.probs_batch")
            tail = ir.node("Shape", [first], attributes={"start": 2}, name=f"{prefix}.probs_tail")
            count = add_initializer(graph, f"{prefix}.rows", np.asarray([len(rows)], dtype=np.int64))
            shape = ir.node("Concat", [batch.outputs[0], count, tail.outputs[0]], attributes={"axis": 0}, name=f"{prefix}.probs_shape")
            nodes += [batch, tail, shape]
        unflat = ir.node("Reshape", [mix.outputs[0], shape.outputs[0]], name=f"{prefix}.unflatten")
        nodes += [flat, mix, unflat]
        result = unflat.outputs[0]
    result.name = f"{prefix}.probs"
    if first.type is not None:
        result.type = first.type
    graph.insert_before(before, nodes)
    return result
