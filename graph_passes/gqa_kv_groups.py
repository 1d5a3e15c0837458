"""Part of a layer shared on the GroupQueryAttention graph: the heads of the KV groups it keeps.

A partly shared layer's own heads keep a GroupQueryAttention node of their own, narrowed
to them: the packed projection's Q columns of those heads and K and V columns of their
groups, and a K and V cache of those groups only (GQA takes K and V of one head count).
The borrowed heads multiply their probabilities by the V of the borrowed groups, which
the layer writes into a cache of its own, ``past_key_values.L.borrowed_value``
(gqa_values). The two contexts are put back in head order before the output projection.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graph_passes.gqa_layers import GQA, PAST_KEY, PAST_VALUE, QK_OUTPUT_SOFTMAX, GqaLayer, NodeBuilder, take_place_of
from graph_passes.gqa_phases import PhasedAnchor, recompute_mapped_attention
from graph_passes.gqa_values import Positions, values_attention
from graph_passes.projections import MS_DOMAIN, attribute_values, column_select, head_columns
from sa_export.core.cache_names import past_name, present_name
from sa_export.core.plan import HeadMap, SharingPlan


def _narrowed(shape: ir.Shape | None, heads: int) -> ir.Shape | None:
    return None if shape is None else ir.Shape([shape[0], heads, shape[2], shape[3]])


def kept_heads_attention(graph: ir.Graph, layer: GqaLayer, kept_groups: list[int], with_probs: bool = False) -> tuple[ir.Value, ir.Value | None]:
    """A GQA node, before the layer's, over the heads of ``kept_groups``: [B, S, kept heads *
    head_dim], and with ``with_probs`` their probabilities, [B, kept heads, S, total length]
    (for later layers' mixtures), else None.

    It takes the layer's K and V caches, narrowed to those groups, and gives their presents
    (the same buffers); the layer's own GQA node is left for the caller to remove."""
    gqa = layer.node
    n, kv, d = layer.num_heads, layer.kv_num_heads, layer.head_dim
    rep = n // kv
    heads = [g * rep + i for g in kept_groups for i in range(rep)]
    columns = np.concatenate([head_columns(heads, d), head_columns(kept_groups, d, n), head_columns(kept_groups, d, n + kv)])
    b = NodeBuilder(graph, gqa, f"sa.layer{layer.layer}")
    packed = column_select(graph, gqa, layer.qkv, columns, f"{b.prefix}.kept_qkv")
    if layer.bias is not None:
        bias = np.ascontiguousarray(layer.bias.inputs[1].const_value.numpy()[..., columns])
        packed = b.op("Add", [packed, b.const("kept_qkv.bias", bias)], "kept_qkv_bias")
    attributes = {**attribute_values(gqa), "num_heads": len(heads), "kv_num_heads": len(kept_groups)}
    if with_probs:
        attributes["qk_output"] = QK_OUTPUT_SOFTMAX
    kept = b.node(GQA, [packed, *list(gqa.inputs)[1:]], "kept_heads_gqa", domain=MS_DOMAIN, num_outputs=4 if with_probs else 3, **attributes)
    for past in (gqa.inputs[PAST_KEY], gqa.inputs[PAST_VALUE]):
        past.shape = _narrowed(past.shape, len(kept_groups))
    for old, new in zip(gqa.outputs[1:3], kept.outputs[1:3]):
        take_place_of(old, new)
        new.shape = _narrowed(new.shape, len(kept_groups))
    kept.outputs[0].dtype = gqa.outputs[0].dtype
    if not with_probs:
        return kept.outputs[0], None
    probs = kept.outputs[3]
    probs.name, probs.dtype = f"sa.layer{layer.layer}.kept_probs", gqa.outputs[0].dtype
    return kept.outputs[0], probs


def borrowed_value_cache(graph: ir.Graph, layer: GqaLayer, groups: int) -> ir.Value:
    """A new cache input for the V of the layer's ``groups`` borrowed KV groups, beside its V cache."""
    past_value = layer.node.inputs[PAST_VALUE]
    past = ir.Value(name=past_name(layer.layer, "borrowed_value"), type=past_value.type, shape=_narrowed(past_value.shape, groups))
    graph.inputs.insert(list(graph.inputs).index(past_value) + 1 if past_value.is_graph_input() else len(graph.inputs), past)
    return past


def in_head_order(b: NodeBuilder, kept: ir.Value, borrowed: ir.Value, kept_groups: list[int], borrowed_groups: list[int], layer: GqaLayer) -> ir.Value:
    """The kept heads' and the borrowed heads' contexts, [B, S, heads * head_dim] in head order."""
    rep, d = layer.num_heads // layer.kv_num_heads, layer.head_dim
    order = [g * rep + i for g in [*kept_groups, *borrowed_groups] for i in range(rep)]
    context = b.op("Concat", [kept, borrowed], "own_and_borrowed", axis=2)
    if order != sorted(order):
        context = b.heads(context, np.argsort(order), layer.num_heads, d, "context_in_head_order")
    context.dtype = kept.dtype
    return context


def partly_shared_layer(graph: ir.Graph, layer: GqaLayer, borrowed_groups: tuple[int, ...], probs: ir.Value | Callable, positions: Positions,
                        recompute: Callable | None = None, head_slots: list[int] | None = None, with_probs: bool = False) -> ir.Value | None:
    """Replace a partly shared layer's attention: its own GQA for the heads of the groups it
    keeps (kept_heads_attention), and for the borrowed heads ``probs`` (grouped by borrowed
    KV group) times the V of the borrowed groups, which a cache of their own holds (the kept
    GQA takes K and V of one head count). ``recompute`` and ``head_slots`` as in
    share_gqa's _shared_layer, for the borrowed heads. Returns the kept heads' probabilities
    with ``with_probs`` (kept_heads_attention), else None."""
    gqa = layer.node
    b = NodeBuilder(graph, gqa, f"sa.layer{layer.layer}")
    kept_groups = [g for g in range(layer.kv_num_heads) if g not in borrowed_groups]
    kept, kept_probs = kept_heads_attention(graph, layer, kept_groups, with_probs)
    past = borrowed_value_cache(graph, layer, len(borrowed_groups))
    borrowed_builder = NodeBuilder(graph, gqa, f"{b.prefix}.borrowed")
    borrowed, present_value = values_attention(borrowed_builder, layer, list(borrowed_groups), past, probs, positions, recompute, head_slots)
    present_value.name = present_name(layer.layer, "borrowed_value")
    present_value.type, present_value.shape = past.type, past.shape  # written in place: the past's buffer
    graph.outputs.append(present_value)
    context = in_head_order(b, kept, borrowed, kept_groups, list(borrowed_groups), layer)
    ir.convenience.replace_all_uses_with(gqa.outputs[0], context)
    graph.remove([gqa, *([layer.bias] if layer.bias is not None else []), layer.qkv], safe=True)
    return kept_probs


def share_part_on_anchor(graph: ir.Graph, layer: GqaLayer, plan: SharingPlan, phased: dict[int, PhasedAnchor], positions: Positions) -> None:
    """A partly shared layer of an identity plan: at a decode step the borrowed groups of its
    anchor's grouped probabilities; at prefill its borrowed heads recomputed from the
    anchor's queries and K cache, one GQA per borrowed group (recompute_mapped_attention)."""
    anchor, groups = plan.anchors[layer.layer], plan.shared_groups[layer.layer]

    def probs(b: NodeBuilder) -> ir.Value:
        return b.op("Gather", [phased[anchor].grouped_probs, b.const("borrowed_groups", np.array(groups, np.int64))], "borrowed_probs", axis=1)

    borrowed = HeadMap.from_anchor_heads(anchor, plan.borrowed_heads(layer.layer))
    recompute = functools.partial(recompute_mapped_attention, head_map=borrowed, sources=phased, past_ends=positions.past_ends, past_end=positions.past_end)
    partly_shared_layer(graph, layer, groups, probs, positions, recompute)


def borrowed_rows(plan: SharingPlan, layer: int, heads: int) -> HeadMap:
    """A partly shared layer's map of its borrowed heads only (its anchor's same heads without a map)."""
    head_map = plan.head_map(layer) or HeadMap.from_anchor_heads(plan.anchors[layer], range(heads))
    rows = plan.borrowed_heads(layer)
    return HeadMap(tuple(head_map.sources[h] for h in rows), tuple(head_map.weights[h] for h in rows))
