"""Identity-mapped shared layers on GroupQueryAttention graphs, split by phase.

At a decode step (one query row) a shared layer multiplies its anchor's stored
probabilities by its own V cache, so the anchor's K cache is read once for the whole run:
that is SA's decode saving. At prefill the same probabilities are [B, heads, chunk,
buffer], made twice inside the anchor's GQA (its scratch and ``qk_output``), padded once
more to the buffer and held to the run's last layer: several times what the unshared
graph ever holds. So for a step of more than one row each shared layer instead runs GQA
on its anchor's queries and keys (the anchor's K cache) with its own values: the
probabilities live only inside that node, as in the unshared graph, and nothing of their
size crosses layers. Both branches compute the same attention; the split only moves cost.

An ``If`` per anchor and per shared layer picks the branch; head maps of one source head
per head add none (share_gqa).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graph_passes.gqa_layers import GQA, PAST_VALUE, QK_OUTPUT_SOFTMAX, QUERY, GqaLayer, NodeBuilder, replace_gqa_node
from graph_passes.projections import MS_DOMAIN, attribute_values
from sa_export.core.plan import HeadMap


@dataclasses.dataclass(frozen=True)
class PhasedAnchor:
    """What an anchor gives its shared layers in each phase."""

    grouped_probs: ir.Value  # decode: probabilities padded to the buffer, [B, kv, rep, S, buffer] ([B, heads, S, buffer] for head maps); prefill: empty
    packed_qkv: ir.Value  # the anchor's packed Q, K, V projection (before rotary)
    present_key: ir.Value  # the anchor's K cache buffer, this step's rows written
    gqa_inputs: tuple  # the anchor GQA's inputs (sequence lengths, rotary caches)
    attributes: dict  # and attributes (heads, scale, rotary)


def if_by_phase(b: NodeBuilder, is_step: ir.Value, name: str, step: Callable, prefill: Callable, num_outputs: int) -> ir.Node:
    """An If on ``is_step``: ``step(branch)`` and ``prefill(branch)`` build each branch's nodes and return its outputs."""
    branches = {}
    for key, build in (("then_branch", step), ("else_branch", prefill)):
        branch = NodeBuilder(b.graph, None, f"{b.prefix}.{name}.{key.removesuffix('_branch')}")
        outputs = build(branch)
        branches[key] = ir.Graph([], outputs, nodes=branch.nodes, name=branch.prefix)
    return b.node("If", [is_step], name, num_outputs=num_outputs, **branches)


def _typed(values, like):
    for value, reference in zip(values, like):
        value.dtype, value.shape = reference.dtype, reference.shape
    return list(values)


def anchor_by_phase(graph: ir.Graph, layer: GqaLayer, is_step: ir.Value, pads: ir.Value, grouped_shape: ir.Value | None) -> PhasedAnchor:
    """Replace the anchor's GQA with an If: with ``qk_output`` at a decode step, without at prefill.

    Its decode probabilities come padded to the buffer and grouped by KV head, or, with
    ``grouped_shape`` None (head maps, which pick heads first), padded only: [B, heads, S,
    buffer].
    """
    old = layer.node
    attributes = attribute_values(old)
    b = NodeBuilder(graph, old, f"sa.layer{layer.layer}")
    dtype = old.outputs[0].dtype

    def step(branch: NodeBuilder) -> list[ir.Value]:
        gqa = branch.node(GQA, list(old.inputs), "gqa_with_probs", domain=MS_DOMAIN, num_outputs=4, **attributes, qk_output=QK_OUTPUT_SOFTMAX)
        probs = branch.op("Pad", [gqa.outputs[3], pads], "probs_to_buffer")
        if grouped_shape is not None:
            probs = branch.op("Reshape", [probs, grouped_shape], "probs_by_kv_head")
        probs.dtype = dtype
        return [*_typed(gqa.outputs[:3], old.outputs), probs]

    def prefill(branch: NodeBuilder) -> list[ir.Value]:
        gqa = branch.node(GQA, list(old.inputs), "gqa", domain=MS_DOMAIN, num_outputs=3, **attributes)
        no_probs = branch.op("Constant", [], "no_probs", value=ir.tensor(np.zeros((1, 1, 1, 0, 1)[grouped_shape is None :], dtype.numpy())))
        no_probs.dtype = dtype
        return [*_typed(gqa.outputs, old.outputs), no_probs]

    node = if_by_phase(b, is_step, "anchor_by_phase", step, prefill, 4)
    inputs = tuple(old.inputs)
    replace_gqa_node(graph, layer, node)  # outputs 0-2; output 3 is the If's own
    node.outputs[3].dtype = dtype
    return PhasedAnchor(node.outputs[3], inputs[QUERY], node.outputs[1], inputs, attributes)


def _columns(branch: NodeBuilder, packed: ir.Value, start: int, end: int, axis: ir.Value, name: str) -> ir.Value:
    """Columns [start, end) of a packed QKV projection's output (``axis``: the constant 2)."""
    bounds = [branch.const(f"{name}_{edge}", np.array([value], np.int64)) for edge, value in (("start", start), ("end", end))]
    return branch.op("Slice", [packed, *bounds, axis], name)


def recompute_attention(
    branch: NodeBuilder, layer: GqaLayer, v_rows: ir.Value, present_value: ir.Value, anchor: PhasedAnchor, query_heads=None, *,
    past_end: ir.Value,
) -> ir.Value:
    """GQA on the anchor's queries and keys with this layer's values: [B, S, heads * head_dim].

    Its K and V cache inputs are the anchor's K buffer and this layer's V buffer, with
    ``past_end`` ([total_sequence_length - S]) cut to the rows before this step; GQA writes
    the step's rows in its own present outputs, which are dropped. Cut, GQA's presents and
    scratch are as long as the context rather than the buffer: the fp32 demo model's
    512-token prefill peaked 34 MiB lower (`benchmarks.prefill_memory`), at the cost of
    copying the past rows (at 8192 tokens the peak is then 13 MiB higher, still 36 MiB
    below the unshared graph's). ``query_heads[h]``: the anchor head whose query head h takes,
    one of its own KV group (argmax-group maps).
    """
    n, kv, d = layer.num_heads, layer.kv_num_heads, layer.head_dim
    # Sliced here, in each layer, not once at the anchor: held through the run, the anchor's
    # Q and K raised peak memory (an 8000-token prompt in one call: 2.53 against 2.49 GiB).
    axis = branch.const("last_axis", np.array([2], np.int64))
    q = _columns(branch, anchor.packed_qkv, 0, n * d, axis, "anchor_q")
    if query_heads is not None:
        q = branch.heads(q, query_heads, n, d, "mapped_q")
    k = _columns(branch, anchor.packed_qkv, n * d, (n + kv) * d, axis, "anchor_k")
    starts, rows_axis = branch.const("past_starts", np.array([0], np.int64)), branch.const("rows_axis", np.array([2], np.int64))
    past_key = branch.op("Slice", [anchor.present_key, starts, past_end, rows_axis], "anchor_past_keys")
    past_value = branch.op("Slice", [layer.node.inputs[PAST_VALUE], starts, past_end, rows_axis], "past_values")
    inputs = [q, k, v_rows, past_key, past_value, *anchor.gqa_inputs[PAST_VALUE + 1 :]]
    gqa = branch.node(GQA, inputs, "gqa_on_anchor_qk", domain=MS_DOMAIN, num_outputs=3, **anchor.attributes)
    gqa.outputs[0].dtype = layer.node.outputs[0].dtype
    return gqa.outputs[0]


def recompute_mapped_attention(
    branch: NodeBuilder, layer: GqaLayer, v_rows: ir.Value, present_value: ir.Value, head_map: HeadMap, sources: dict[int, PhasedAnchor],
    past_ends: list[ir.Value], past_end: ir.Value,
) -> ir.Value:
    """Attention of a layer whose head h reads one head of a source layer: [B, S, heads * head_dim].
    A map of fewer heads than the layer's (a partly shared layer's borrowed heads) gives theirs,
    its head h in KV group h // heads-per-group of ``v_rows`` and ``present_value``.

    When every head reads a head of its own KV group in one layer (argmax-group), that is
    the identity recompute with the queries permuted. Otherwise query heads of one KV group
    may read keys of different groups, which one grouped GQA cannot express: one GQA per
    (source layer, key group, value group) pair, with one KV head (that key group of the
    source's K cache, that value group of this layer's V cache, each copied as [B, 1, past,
    head_dim]) and as query heads the source heads read through it.
    Copies of one group per node are what keeps the peak near the unshared graph's: with
    each head's K and V gathered in multi-head form, an 8000-token prefill of SmolLM2 in
    chunks of 512 (int4, `benchmarks.prefill_memory`) peaked at 0.85 GiB against the
    baseline's 0.80. Columns of the packed projections are gathered or sliced as they are,
    and ``past_ends[g]`` ([g + 1, total_sequence_length - S], made once for the graph) ends
    the slice of KV group g's rows before this step. Pairs run by value group, and each
    slice of the layer's values, of the source's key columns and each gather of its query
    columns is made once per layer (a loaded session holds several KB per node); the
    slice of the source's K cache rows, [B, 1, past, head_dim], is made per pair, so that
    no more than one is held at a time.
    """
    n, kv, d = layer.num_heads, layer.kv_num_heads, layer.head_dim
    rep = n // kv
    dtype = layer.node.outputs[0].dtype
    gains = np.array([w[0] for w in head_map.weights], dtype.numpy())
    read = [pairs[0] for pairs in head_map.sources]
    if len(read) == n and len(head_map.layers) == 1 and all(j // rep == h // rep for h, (_, j) in enumerate(read)):
        # Every head reads a head of its own KV group: the anchor's K cache serves as it is.
        context = recompute_attention(branch, layer, v_rows, present_value, sources[read[0][0]], [j for _, j in read], past_end=past_end)
        return _with_gains(branch, context, gains, d, dtype)
    columns, cache_axes = branch.const("columns_axis", np.array([2], np.int64)), branch.const("cache_axes", np.array([1, 2], np.int64))

    made: dict[str, ir.Value] = {}

    def once(name: str, make: Callable[[], ir.Value]) -> ir.Value:
        if name not in made:
            made[name] = make()
        return made[name]

    def slice_columns(value, head, name):
        def make():
            bounds = [branch.const(f"{name}_{edge}", np.array([edge_head * d], np.int64)) for edge, edge_head in (("start", head), ("end", head + 1))]
            return branch.op("Slice", [value, *bounds, columns], name)
        return once(name, make)

    def past_rows(cache, group, name):
        # Only the rows before this step: GQA's scratch is [heads, S, cache length], and a
        # cache of total_sequence_length - S rows makes it [heads, S, total] instead of
        # [heads, S, buffer], smaller than any unshared layer's (which the arena reuses).
        return once(name, lambda: branch.op(
            "Slice", [cache, branch.const(f"{name}_starts", np.array([group, 0], np.int64)), past_ends[group], cache_axes], name))

    # Heads of one KV group that read the same source head have the same output: each
    # (source head, own KV group) is computed once.
    slots = list(dict.fromkeys((source, j, h // rep) for h, (source, j) in enumerate(read)))
    pairs: dict[tuple[int, int, int], list] = {}
    for slot in slots:
        source, j, value_group = slot
        pairs.setdefault((source, j // rep, value_group), []).append(slot)
    outputs, order = [], []
    for (source, key_group, value_group), piece in pairs.items():
        tag = f"from{source}.k{key_group}v{value_group}"
        packed = sources[source].packed_qkv
        heads = [j for _, j, _ in piece]
        queries = f"from{source}.q{'_'.join(map(str, heads))}"
        inputs = [
            once(queries, lambda: branch.heads(packed, heads, n + 2 * kv, d, queries)),
            slice_columns(packed, n + key_group, f"from{source}.k{key_group}.k"),
            slice_columns(v_rows, value_group, f"v{value_group}.v"),
            past_rows(sources[source].present_key, key_group, f"{tag}.key_cache"),  # one per pair: not held across value groups
            past_rows(present_value, value_group, f"v{value_group}.value_cache"),
            *sources[source].gqa_inputs[PAST_VALUE + 1 :],
        ]
        attributes = {**sources[source].attributes, "num_heads": len(piece), "kv_num_heads": 1}
        gqa = branch.node(GQA, inputs, f"{tag}.gqa", domain=MS_DOMAIN, num_outputs=3, **attributes)
        gqa.outputs[0].dtype = dtype
        outputs.append(gqa.outputs[0])
        order += piece
    context = branch.op("Concat", outputs, "sources_context", axis=2) if len(outputs) > 1 else outputs[0]
    head_slots = [order.index((source, j, h // rep)) for h, (source, j) in enumerate(read)]
    if head_slots != list(range(n)):
        context = branch.heads(context, head_slots, len(order), d, "context_by_head")
    return _with_gains(branch, context, gains, d, dtype)


def _with_gains(branch: NodeBuilder, context: ir.Value, gains: np.ndarray, head_dim: int, dtype: ir.DataType) -> ir.Value:
    if not np.all(gains == 1.0):
        context = branch.op("Mul", [context, branch.const("head_gains", np.repeat(gains, head_dim))], "context_gains")
    context.dtype = dtype
    return context
