"""Share part of a layer: the query heads of some KV groups borrow, the others keep their own attention.

In a decomposed graph (the dynamo export) a partly shared layer keeps its Q K^T and
Softmax, narrowed to the heads it keeps: the Q projection's columns of those heads, the
K projection's columns of their KV groups, the K cache of those groups only, and the
repeat of K over each group's heads sized for them. The borrowed heads' probabilities
come from the anchor (or the head map's sources) as a whole shared layer's do; both are
put back in head order before probs @ V, which keeps every head's V.

Assumptions, stated: Q and K are projected by a MatMul with a constant [hidden, heads *
head_dim] weight (and an optional bias Add), reshaped to [batch, seq, -1, head_dim]
(the head count is inferred, so narrower columns give fewer heads), and the K cache is
repeated over the heads of its group by Unsqueeze -> Expand -> Reshape (none where every
head has its own KV head). Fused QKV projections (Phi-3, GPT-2, GPT-NeoX) are refused.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.attention_blocks import AttentionBlock, find_attention_blocks
from graph_passes.initializers import add_initializer
from graph_passes.projections import head_columns
from graph_passes.share_probabilities import borrowed_probs, head_order_name
from sa_export.core.cache_names import past_name, present_name
from sa_export.core.errors import AttentionPatternError
from sa_export.core.plan import SharingPlan

_MAX_SEARCH = 16


class SharePartOfLayerPass(ir.passes.InPlacePass):
    """For every partly shared layer of the plan: narrow its Q/K path and K cache to the
    KV groups it keeps, and give probs @ V its own and the borrowed probabilities in head order."""

    def __init__(self, plan: SharingPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers = [layer for layer in self.plan.shared_layers if self.plan.is_partly_shared(layer)]
        if not layers:
            return ir.passes.PassResult(model, False)
        blocks = {block.layer: block for block in find_attention_blocks(graph)}
        inputs = {v.name: v for v in graph.inputs}
        outputs = {v.name: v for v in graph.outputs}
        for layer in layers:
            if layer not in blocks:
                raise AttentionPatternError(layer, "no attention block found for this partly shared layer")
            self._share_part(graph, blocks, layer, inputs, outputs)
        return ir.passes.PassResult(model, True)

    def _share_part(self, graph: ir.Graph, blocks: dict[int, AttentionBlock], layer: int, inputs: dict, outputs: dict) -> None:
        plan, block = self.plan, blocks[layer]
        heads = plan.kv_heads * plan.heads_per_group
        borrowed = plan.borrowed_heads(layer)
        kept = plan.kept_heads(layer)
        groups = plan.kept_groups(layer)
        past = inputs.get(past_name(layer, "key"))
        if past is None or past.shape is None or len(past.shape) != 4 or past.shape[1] != plan.kv_heads:
            raise AttentionPatternError(layer, f"expected a K cache input of {plan.kv_heads} KV heads to narrow")
        head_dim = past.shape[3]
        if not isinstance(head_dim, int):
            raise AttentionPatternError(layer, "the K cache's head size is not fixed in the graph")
        q_proj = _projection(block.scores_matmul.inputs[0], heads * head_dim, layer, "Q")
        k_proj = _projection(block.scores_matmul.inputs[1], plan.kv_heads * head_dim, layer, "K")
        _narrow_columns(graph, q_proj, kept, head_dim, f"sa.layer{layer}.q_kept")
        _narrow_columns(graph, k_proj, groups, head_dim, f"sa.layer{layer}.k_kept")
        _narrow_cache(past, outputs.get(present_name(layer, "key")), len(groups))
        _resize_repeat(graph, past, len(groups), plan.heads_per_group, layer)
        _forget_head_counts(q_proj, k_proj, block.probs)

        own = block.probs
        other = borrowed_probs(graph, blocks, plan, layer, block.context_matmul, rows=borrowed)
        prefix = f"sa.layer{layer}"
        concat = ir.node("Concat", [own, other], attributes={"axis": 1}, name=f"{prefix}.own_and_borrowed")
        order = np.argsort(np.asarray([*kept, *borrowed])).astype(np.int64)  # back to head order
        gather = ir.node("Gather", [concat.outputs[0], add_initializer(graph, f"{prefix}.head_order", order)], attributes={"axis": 1}, name=head_order_name(layer))
        graph.insert_before(block.context_matmul, [concat, gather])
        gather.outputs[0].name = f"{prefix}.probs_in_head_order"
        dtype = own.dtype or other.dtype or block.context_matmul.inputs[1].dtype  # the unfused Attention op's probs carry none
        if dtype is not None:
            gather.outputs[0].dtype = dtype
        block.context_matmul.replace_input_with(0, gather.outputs[0])


def _weight(node: ir.Node) -> np.ndarray | None:
    if node.op_type != "MatMul" or node.inputs[1] is None:
        return None
    tensor = ir.convenience.get_const_tensor(node.inputs[1])
    return tensor.numpy() if tensor is not None and len(tensor.shape) == 2 else None


def _projection(start: ir.Value, width: int, layer: int, what: str) -> ir.Node:
    """The MatMul with a constant [hidden, width] weight nearest ``start`` upstream (breadth first)."""
    frontier, seen = [start], set()
    for _ in range(_MAX_SEARCH):
        following = []
        for value in frontier:
            node = value.producer() if value is not None else None
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            weight = _weight(node)
            if weight is not None and weight.shape[1] == width:
                return node
            if weight is None:
                following += [v for v in node.inputs if v is not None and v.const_value is None]
        frontier = following
    raise AttentionPatternError(layer, f"no {what} projection of {width} columns found; sharing part of a layer needs separate Q and K projections")


def _narrow_columns(graph: ir.Graph, matmul: ir.Node, heads, head_dim: int, name: str) -> None:
    """Keep the columns of ``heads`` (each ``head_dim`` wide) of the projection, and of its bias."""
    columns = head_columns(heads, head_dim)
    matmul.replace_input_with(1, add_initializer(graph, f"{name}.weight", _weight(matmul)[:, columns]))
    for use in list(matmul.outputs[0].uses()):
        add = use.node
        other = add.inputs[1 - use.idx] if add.op_type == "Add" and len(add.inputs) == 2 else None
        bias = ir.convenience.get_const_tensor(other) if other is not None else None
        if bias is not None and len(bias.shape) == 1 and bias.shape[0] > len(columns):  # Qwen2's Q/K biases
            add.replace_input_with(1 - use.idx, add_initializer(graph, f"{name}.bias", bias.numpy()[columns]))


def _narrow_cache(past: ir.Value, present: ir.Value | None, kv_heads: int) -> None:
    for value in (past, present):
        if value is not None and value.shape is not None:
            value.shape = ir.Shape([value.shape[0], kv_heads, value.shape[2], value.shape[3]])


def _resize_repeat(graph: ir.Graph, past: ir.Value, kv_heads: int, per_group: int, layer: int) -> None:
    """Size the repeat of K over each group's heads (Unsqueeze -> Expand -> Reshape) for the kept groups.

    The export's target shapes hold the model's KV-head and head counts as constants, so
    they are rebuilt from the narrowed cache's own shape."""
    concat = next((u.node for u in past.uses() if u.node.op_type == "Concat"), None)
    if concat is None:
        raise AttentionPatternError(layer, f"{past.name} is not concatenated with the new keys")
    for use in list(concat.outputs[0].uses()):
        unsqueeze = use.node
        if unsqueeze.op_type != "Unsqueeze":
            continue
        expand = next((u.node for u in unsqueeze.outputs[0].uses() if u.node.op_type == "Expand"), None)
        reshape = next((u.node for u in expand.outputs[0].uses() if u.node.op_type == "Reshape"), None) if expand else None
        if expand is None or reshape is None:
            raise AttentionPatternError(layer, "the K cache's repeat over each group's heads is not Unsqueeze -> Expand -> Reshape")
        prefix = f"sa.layer{layer}.repeat_k"
        keys = concat.outputs[0]
        lead = ir.node("Shape", [keys], attributes={"start": 0, "end": 2}, name=f"{prefix}.lead")
        tail = ir.node("Shape", [keys], attributes={"start": 2}, name=f"{prefix}.tail")
        batch = ir.node("Shape", [keys], attributes={"start": 0, "end": 1}, name=f"{prefix}.batch")
        repeat = add_initializer(graph, f"{prefix}.per_group", np.asarray([per_group], np.int64))
        heads = add_initializer(graph, f"{prefix}.heads", np.asarray([kv_heads * per_group], np.int64))
        expanded = ir.node("Concat", [lead.outputs[0], repeat, tail.outputs[0]], attributes={"axis": 0}, name=f"{prefix}.expand_shape")
        merged = ir.node("Concat", [batch.outputs[0], heads, tail.outputs[0]], attributes={"axis": 0}, name=f"{prefix}.merged_shape")
        graph.insert_before(expand, [lead, tail, batch, expanded, merged])
        expand.replace_input_with(1, expanded.outputs[0])
        reshape.replace_input_with(1, merged.outputs[0])


def _forget_head_counts(q_proj: ir.Node, k_proj: ir.Node, probs: ir.Value) -> None:
    """Drop the shapes recorded on the narrowed path (they name the old head counts; ONNX
    Runtime would refuse a graph whose recorded shapes disagree with what it infers).
    Shape reads are not followed: they read batch and length, which do not change."""
    stack = [q_proj.outputs[0], k_proj.outputs[0]]
    seen = set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if not value.is_graph_output():  # the present K cache has its narrowed shape already
            value.shape = None
        if value is probs:
            continue
        for use in value.uses():
            if use.node.op_type != "Shape":
                stack.extend(use.node.outputs)
