"""Shared attention on GroupQueryAttention graphs (ONNX Runtime's fused attention).

The graph is the one onnxruntime-genai's model builder makes: per layer a packed QKV
MatMul (MatMulNBits in the builder's int4 graph) feeding com.microsoft GroupQueryAttention
with rotary, past and present cache in one buffer of max_length positions
(``past_present_share_buffer``). The rewrite
keeps that speed:

* an anchor's GQA also emits its post-softmax probabilities (``qk_output=2``, output 3);
* a shared layer keeps only the V columns of its QKV MatMul, writes the new V rows into
  its cache buffer with ``TensorScatter`` (in place when past and present are bound to
  one buffer, as GQA's are), and multiplies the probabilities by the cache grouped by
  KV head (no repeated V heads);
* its K cache input and output, Q/K columns and the GQA node are gone;
* a partly shared layer (``--span L.G``) keeps a GQA over the heads of the groups it keeps
  and does the above for its borrowed heads, with a V cache of the borrowed groups of its
  own (gqa_kv_groups). A head map may not read such a layer's kept heads here: its
  probabilities are not in head order anywhere in this graph.

The probabilities cover ``total_sequence_length`` positions and the V buffer
``max_length``; they are padded with zeros to the buffer, so that V is read in place
rather than sliced (a copy of the whole cache per layer and token).

With identity head maps (the default) and maps of one source head per head (argmax,
which ``calibrated`` is) this holds for decode steps only: a step of several rows
recomputes each shared layer's attention from its sources' queries and K caches, so that
prefill holds about what the unshared graph holds (gqa_phases). Mixtures (mix*, fit)
read stored probabilities at every step: a mixture of k source heads has no
recomputation cheaper than k attentions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graph_passes.gqa_phases import PhasedAnchor, anchor_by_phase, if_by_phase, recompute_attention, recompute_mapped_attention
from graph_passes.gqa_layers import GQA, PAST_KEY, QK_OUTPUT_SOFTMAX, PAST_VALUE, SEQLENS_K, TOTAL_LEN, GqaLayer, NodeBuilder, find_gqa_layers, replace_gqa_node
from graph_passes.gqa_kv_groups import borrowed_value_cache, in_head_order, kept_heads_attention
from graph_passes.projections import MS_DOMAIN, column_select
from sa_export.core.errors import PlanError
from sa_export.core.plan import HeadMap, SharingPlan, consecutive_runs, mixture_matrix

TENSOR_SCATTER_OPSET = 24


def _with_probabilities_output(graph: ir.Graph, layer: GqaLayer) -> ir.Value:
    """Replace the anchor's GQA node with one that also outputs its probabilities."""
    old = layer.node
    attributes = dict(old.attributes)
    attributes["qk_output"] = ir.AttrInt64("qk_output", QK_OUTPUT_SOFTMAX)
    new = ir.Node(MS_DOMAIN, GQA, list(old.inputs), attributes=list(attributes.values()), num_outputs=4, name=old.name)
    graph.insert_before(old, new)
    replace_gqa_node(graph, layer, new)
    probs = new.outputs[3]
    probs.name = f"sa.layer{layer.layer}.probs"
    probs.dtype = new.outputs[0].dtype
    return probs


@dataclasses.dataclass(frozen=True)
class _Positions:
    """Values every shared layer reads, computed once for the graph."""

    write_indices: ir.Value  # where this step's rows go in the cache buffer, as GQA writes them
    pads: ir.Value  # widen probabilities from total_sequence_length to the buffer's max_length
    grouped_shape: ir.Value  # [0, kv, rep, S, -1]: probabilities grouped by the KV head they read
    is_step: ir.Value  # one query row (a decode step): a scalar bool
    past_ends: list[ir.Value]  # per KV head g: [g + 1, total_sequence_length - S], to slice a cache's rows before this step
    past_end: ir.Value  # [total_sequence_length - S]
    query_len: ir.Value  # [S]


def _cache_positions(graph: ir.Graph, first: GqaLayer) -> _Positions:
    gqa = first.node
    b = NodeBuilder(graph, gqa, "sa.cache")
    seqlens_k, total = gqa.inputs[SEQLENS_K], gqa.inputs[TOTAL_LEN]
    # The sequence length of this step, from the hidden states (the QKV MatMul goes away).
    query_len = b.op("Shape", [first.qkv.inputs[0]], "query_len", start=1, end=2)
    # GQA's past length per row: seqlens_k + 1 - S, and 0 on the first prompt.
    seqlens = b.op("Cast", [seqlens_k], "seqlens_i64", to=ir.DataType.INT64)
    past = b.op("Sub", [b.op("Add", [seqlens, b.const("one", np.int64(1))], "total_per_row"), query_len], "past_per_row")
    write_indices = b.op("Max", [past, b.const("zero", np.zeros(1, np.int64))], "write_indices")
    buffer_len = b.op("Shape", [gqa.inputs[PAST_VALUE]], "buffer_len", start=2, end=3)
    total_1d = b.op("Reshape", [total, b.const("shape1", np.array([1], np.int64))], "total_1d")
    total_i64 = b.op("Cast", [total_1d], "total_i64", to=ir.DataType.INT64)
    pad_tail = b.op("Sub", [buffer_len, total_i64], "pad_tail")
    pads = b.op("Concat", [b.const("pad_head", np.zeros(7, np.int64)), pad_tail], "probs_pads", axis=0)
    kv, rep = first.kv_num_heads, first.num_heads // first.kv_num_heads
    grouped_shape = b.op(
        "Concat", [b.const("grouped_lead", np.array([0, kv, rep], np.int64)), query_len, b.const("minus_one", np.array([-1], np.int64))],
        "grouped_shape", axis=0,
    )
    is_one = b.op("Equal", [query_len, b.const("one_row", np.array([1], np.int64))], "is_one_row")
    is_step = b.op("Reshape", [is_one, b.const("scalar_shape", np.zeros(0, np.int64))], "is_step")
    past_end = b.op("Sub", [total_i64, query_len], "past_end")
    # Unused ones (no cross-group head maps) go with RemoveUnusedNodesPass.
    past_ends = [b.op("Concat", [b.const(f"head{g}_end", np.array([g + 1], np.int64)), past_end], f"kv{g}_past_ends", axis=0) for g in range(kv)]
    return _Positions(write_indices, pads, grouped_shape, is_step, past_ends, past_end, query_len)


def _shared_layer(graph: ir.Graph, layer: GqaLayer, probs: ir.Value | Callable, positions: _Positions, recompute: Callable | None = None,
                  head_slots: list[int] | None = None) -> None:
    """Replace a shared layer's attention: V only, written in place, times the padded probabilities.

    ``probs``: the padded probabilities grouped by KV head, or ``probs(builder)``, which
    makes them where the product with V is made (in the decode branch, with
    ``recompute``). With ``recompute(branch, layer, v_rows, present_value)``, a step of
    several rows computes the attention that way instead (gqa_phases). ``head_slots``: the
    probabilities hold fewer rows per KV head than the layer has query heads, and head h's
    output is row ``head_slots[h]`` of them (_gather_rows).
    """
    gqa = layer.node
    b = NodeBuilder(graph, gqa, f"sa.layer{layer.layer}")
    groups = list(range(layer.kv_num_heads))
    context, present_value = _values_attention(b, layer, groups, gqa.inputs[PAST_VALUE], probs, positions, recompute, head_slots)
    output, present_key, old_present_value = gqa.outputs[:3]
    ir.convenience.replace_all_uses_with(output, context)
    _take_place_of(old_present_value, present_value)
    graph.outputs.remove(present_key)
    past_key = gqa.inputs[PAST_KEY]
    graph.remove([gqa, *([layer.bias] if layer.bias is not None else []), layer.qkv], safe=True)
    if not past_key.uses():
        graph.inputs.remove(past_key)


def _take_place_of(old: ir.Value, new: ir.Value) -> None:
    """``new`` becomes the graph output ``old`` was: its name, uses, type and shape (the same buffer as its past)."""
    name = old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    old.name = None
    new.name = name
    new.type, new.shape = old.type, old.shape


def _partly_shared_layer(graph: ir.Graph, layer: GqaLayer, borrowed_groups: tuple[int, ...], probs: ir.Value | Callable, positions: _Positions,
                         recompute: Callable | None = None, head_slots: list[int] | None = None) -> None:
    """Replace a partly shared layer's attention: its own GQA for the heads of the groups it
    keeps (gqa_kv_groups), and for the borrowed heads ``probs`` (grouped by borrowed KV
    group) times the V of the borrowed groups, which a cache of their own holds (the kept
    GQA takes K and V of one head count). ``recompute`` and ``head_slots`` as in _shared_layer,
    for the borrowed heads."""
    gqa = layer.node
    b = NodeBuilder(graph, gqa, f"sa.layer{layer.layer}")
    kept_groups = [g for g in range(layer.kv_num_heads) if g not in borrowed_groups]
    kept = kept_heads_attention(graph, layer, kept_groups)
    past, present = borrowed_value_cache(graph, layer, len(borrowed_groups))
    borrowed_builder = NodeBuilder(graph, gqa, f"{b.prefix}.borrowed")
    borrowed, present_value = _values_attention(borrowed_builder, layer, list(borrowed_groups), past, probs, positions, recompute, head_slots)
    present_value.name = present.name
    present_value.type, present_value.shape = present.type, present.shape
    graph.outputs.append(present_value)
    context = in_head_order(b, kept, borrowed, kept_groups, list(borrowed_groups), layer)
    ir.convenience.replace_all_uses_with(gqa.outputs[0], context)
    graph.remove([gqa, *([layer.bias] if layer.bias is not None else []), layer.qkv], safe=True)


def _values_attention(b: NodeBuilder, layer: GqaLayer, groups: list[int], past_value: ir.Value, probs: ir.Value | Callable, positions: _Positions,
                      recompute: Callable | None, head_slots: list[int] | None) -> tuple[ir.Value, ir.Value]:
    """The attention of the heads of KV groups ``groups`` on borrowed probabilities: the V
    columns of those groups, written in place into ``past_value``; returns the context
    [B, S, heads of groups * head_dim] and the written V buffer."""
    n, kv, d = layer.num_heads, layer.kv_num_heads, layer.head_dim
    columns = np.concatenate([np.arange((n + kv + g) * d, (n + kv + g + 1) * d) for g in groups])
    v = column_select(b.graph, b.before, layer.qkv, columns, f"{b.prefix}.v_proj")
    if layer.bias is not None:
        v_bias = np.ascontiguousarray(layer.bias.inputs[1].const_value.numpy()[..., columns])
        v = b.op("Add", [v, b.const("v_proj.bias", v_bias)], "v_proj_bias")
    v_rows = v
    v = b.op("Reshape", [v, b.const("v_heads_shape", np.array([0, 0, len(groups), d], np.int64))], "v_heads")
    v = b.op("Transpose", [v], "v_bnsd", perm=[0, 2, 1, 3])
    present_value = b.op("TensorScatter", [past_value, v, positions.write_indices], "write_v_cache", axis=2)
    dtype = layer.node.outputs[0].dtype

    def grouped(builder: NodeBuilder) -> ir.Value:
        return probs(builder) if callable(probs) else probs

    if recompute is None:
        return _probs_times_values(b, layer, grouped(b), present_value, head_slots, len(groups)), present_value

    def step(branch: NodeBuilder) -> list[ir.Value]:
        context = _probs_times_values(branch, layer, grouped(branch), present_value, head_slots, len(groups))
        context.dtype = dtype
        return [context]

    context = if_by_phase(b, positions.is_step, "attention_by_phase", step, lambda branch: [recompute(branch, layer, v_rows, present_value)], 1).outputs[0]
    context.dtype = dtype
    return context, present_value


def _probs_times_values(b: NodeBuilder, layer: GqaLayer, grouped: ir.Value, present_value: ir.Value, head_slots: list[int] | None = None,
                        kv: int | None = None) -> ir.Value:
    """The padded, grouped probabilities times the V buffer: [B, S, heads * head_dim].

    ``head_slots``: ``grouped`` is [B, kv, rows, S, T] with rows < heads / kv, and head h
    takes output row ``head_slots[h]`` (counted over kv * rows). ``kv``: the KV groups
    the V buffer holds (default all the layer's), each with its heads."""
    kv = kv or layer.kv_num_heads
    n, d = kv * (layer.num_heads // layer.kv_num_heads), layer.head_dim
    # [B, kv, rep, S, T] @ [B, kv, 1, T, D]: each query head reads its KV head's cache by
    # broadcasting (no repeated V). One row per product lets decode (S = 1) take MLAS's GEMV
    # path, which reads V as it is; [B, kv, rep * S, T] @ [B, kv, T, D] packs V on every call.
    v_grouped = b.op("Reshape", [present_value, b.const("v_grouped_shape", np.array([0, kv, 1, -1, d], np.int64))], "v_by_kv_head")
    context = b.op("MatMul", [grouped, v_grouped], "probs_v")
    context = b.op("Transpose", [context], "context_bskrd", perm=[0, 3, 1, 2, 4])
    if head_slots is not None:
        context = b.op("Reshape", [context, b.const("rows_shape", np.array([0, 0, -1, d], np.int64))], "context_by_row")
        context = b.op("Gather", [context, b.const("head_slots", np.array(head_slots, np.int64))], "context_by_head", axis=2)
    context = b.op("Reshape", [context, b.const("hidden_shape", np.array([0, 0, n * d], np.int64))], "context")
    return context


def _mixed_for_run(b: NodeBuilder, probs: dict[int, ir.Value], head_maps: dict[int, HeadMap], heads: int, pads: ir.Value,
                   rows: dict[int, tuple[int, ...]]) -> dict[int, ir.Value]:
    """Padded probabilities of every mapped layer of one run of shared layers.

    The sources' probabilities are stacked and padded to the buffer once for the run (the
    sources are fewer than the run's layers); each layer multiplies them by its [heads,
    sources * heads] mixture, whose output is already in the layer's shape: nothing of the
    size of the probabilities is split or padded per layer.
    """
    sources = sorted({source for head_map in head_maps.values() for source in head_map.layers})
    stacked = b.op("Concat", [probs[s] for s in sources], "stack_sources", axis=1) if len(sources) > 1 else probs[sources[0]]
    dtype = probs[sources[0]].dtype.numpy() if probs[sources[0]].dtype is not None else np.float32
    padded = b.op("Pad", [stacked, pads], "sources_to_buffer")
    flat = b.op("Reshape", [padded, b.const("flat_shape", np.array([0, len(sources) * heads, -1], np.int64))], "flatten_sources")
    mixed = {}
    for layer, head_map in head_maps.items():
        matrix = mixture_matrix([head_map], sources, heads, dtype)[list(rows.get(layer, range(heads)))]
        mixed[layer] = b.op("MatMul", [b.const(f"layer{layer}.head_mixture", matrix), flat], f"layer{layer}.mix_heads")
    return mixed  # [B, heads, S * buffer] ([B, borrowed heads, ...] for ``rows``): the grouping Reshape gives [B, kv, rep, S, buffer]


class ShareGqaPass(ir.passes.InPlacePass):
    """The plan's shared layers reuse their anchors' GQA probabilities; their K caches and Q/K columns go."""

    def __init__(self, plan: SharingPlan):
        super().__init__()
        self.plan = plan

    def requires(self, model: ir.Model) -> None:
        layers = find_gqa_layers(model.graph)
        if sorted(layers) != list(range(self.plan.num_layers)):
            raise PlanError(f"the plan is for {self.plan.num_layers} layers but the graph has GroupQueryAttention for {len(layers)}")
        if self.plan.reads_kept_heads:
            partly = min(source for layer in self.plan.anchors for source in self.plan.sources_of(layer) if self.plan.is_partly_shared(source))
            raise PlanError(
                f"a head map reads the heads layer {partly} keeps, which the GroupQueryAttention graph cannot give: convert with --exporter dynamo"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.plan.anchors:
            return ir.passes.PassResult(model, False)
        _share_gqa_layers(model, self.plan)
        return ir.passes.PassResult(model, True)


def _share_gqa_layers(model: ir.Model, plan: SharingPlan) -> None:
    graph = model.graph
    layers = find_gqa_layers(graph)
    if len({(layer.num_heads, layer.kv_num_heads) for layer in layers.values()}) > 1:
        raise PlanError("the GroupQueryAttention layers differ in head counts; convert with the default exporter")
    sources = {source for layer in plan.anchors for source in plan.sources_of(layer)}
    positions = _cache_positions(graph, layers[min(sources)])
    head_maps = {layer: plan.head_map(layer) for layer in plan.anchors if plan.head_map(layer) is not None}
    if not head_maps:
        # Identity maps: probabilities stored at decode, recomputed at prefill (gqa_phases).
        phased = {source: anchor_by_phase(graph, layers[source], positions.is_step, positions.pads, positions.grouped_shape) for source in sorted(sources)}
        for layer, anchor in plan.anchors.items():
            if plan.is_partly_shared(layer):
                _share_part_on_anchor(graph, layers[layer], plan, phased, positions)
                continue
            recompute = functools.partial(recompute_attention, anchor=phased[anchor], past_end=positions.past_end)
            _shared_layer(graph, layers[layer], phased[anchor].grouped_probs, positions, recompute)
    elif all(head_map.width == 1 for head_map in head_maps.values()):
        _share_one_source_heads(graph, layers, plan, head_maps, sorted(sources), positions)
    else:
        _share_mixtures(graph, layers, plan, head_maps, sorted(sources), positions)
    model.opset_imports[""] = max(model.opset_imports.get("", 0), TENSOR_SCATTER_OPSET)


def _share_part_on_anchor(graph: ir.Graph, layer: GqaLayer, plan: SharingPlan, phased: dict[int, PhasedAnchor], positions: _Positions) -> None:
    """A partly shared layer of an identity plan: at a decode step the borrowed groups of its
    anchor's grouped probabilities; at prefill its borrowed heads recomputed from the
    anchor's queries and K cache, one GQA per borrowed group (recompute_mapped_attention)."""
    anchor, groups = plan.anchors[layer.layer], plan.shared_groups[layer.layer]

    def probs(b: NodeBuilder) -> ir.Value:
        return b.op("Gather", [phased[anchor].grouped_probs, b.const("borrowed_groups", np.array(groups, np.int64))], "borrowed_probs", axis=1)

    borrowed = HeadMap.from_anchor_heads(anchor, plan.borrowed_heads(layer.layer))
    recompute = functools.partial(recompute_mapped_attention, head_map=borrowed, sources=phased, past_ends=positions.past_ends, past_end=positions.past_end)
    _partly_shared_layer(graph, layer, groups, probs, positions, recompute)


def _borrowed_rows(plan: SharingPlan, layer: int, heads: int) -> HeadMap:
    """A partly shared layer's map of its borrowed heads only (its anchor's same heads without a map)."""
    head_map = plan.head_map(layer) or HeadMap.from_anchor_heads(plan.anchors[layer], range(heads))
    rows = plan.borrowed_heads(layer)
    return HeadMap(tuple(head_map.sources[h] for h in rows), tuple(head_map.weights[h] for h in rows))


def _share_one_source_heads(graph: ir.Graph, layers: dict[int, GqaLayer], plan: SharingPlan, head_maps: dict[int, HeadMap],
                            sources: list[int], positions: _Positions) -> None:
    """Head maps of one source head each (argmax modes): split by phase like identity maps.

    At a decode step each source's If pads its probabilities to the buffer, and each mapped
    layer gathers its heads from them in its own If's decode branch, so that a step runs
    no more Ifs than an identity plan's and no gathered copy outlives its layer. At prefill
    each layer recomputes its heads from their source layers' queries and K caches
    (gqa_phases.recompute_mapped_attention).
    """
    phased = {source: anchor_by_phase(graph, layers[source], positions.is_step, positions.pads, None) for source in sources}
    heads, kv_heads = layers[sources[0]].num_heads, layers[sources[0]].kv_num_heads
    for layer, anchor in plan.anchors.items():
        gqa = layers[layer]
        if plan.is_partly_shared(layer):
            borrowed = _borrowed_rows(plan, layer, heads)
            groups = plan.shared_groups[layer]
            indices, head_slots = _gather_rows(borrowed, heads, len(groups))
            probs = functools.partial(_gathered_heads, head_map=borrowed, sources=phased, indices=indices)
            recompute = functools.partial(recompute_mapped_attention, head_map=borrowed, sources=phased, past_ends=positions.past_ends, past_end=positions.past_end)
            _partly_shared_layer(graph, gqa, groups, probs, positions, recompute, head_slots)
            continue
        if layer in head_maps:
            head_map = head_maps[layer]
            indices, head_slots = _gather_rows(head_map, heads, kv_heads)
            probs = functools.partial(_gathered_heads, head_map=head_map, sources=phased, indices=indices)
            recompute = functools.partial(recompute_mapped_attention, head_map=head_map, sources=phased, past_ends=positions.past_ends, past_end=positions.past_end)
        else:
            head_slots = None
            probs = functools.partial(_grouped_anchor, anchor=phased[anchor], grouped_shape=positions.grouped_shape)
            recompute = functools.partial(recompute_attention, anchor=phased[anchor], past_end=positions.past_end)
        _shared_layer(graph, gqa, probs, positions, recompute, head_slots)


def _grouped_anchor(b: NodeBuilder, anchor: PhasedAnchor, grouped_shape: ir.Value) -> ir.Value:
    """An unmapped layer's decode probabilities: its anchor's, grouped by KV head (a Reshape, no copy)."""
    return b.op("Reshape", [anchor.grouped_probs, grouped_shape], "probs_by_kv_head")


def _gathered_heads(b: NodeBuilder, head_map: HeadMap, sources: dict[int, PhasedAnchor], indices: np.ndarray) -> ir.Value:
    """A mapped layer's decode probabilities, [B, kv, rows, S, buffer]: its heads gathered from
    its sources' padded probabilities (stacked first when it reads several layers), which
    copies only [heads, buffer] values per step, where a mixing MatMul would read every
    stacked head. ``indices``: [kv, rows] (_gather_rows), so the Gather's output is already
    grouped by KV head."""
    padded = [sources[s].grouped_probs for s in head_map.layers]
    stacked = padded[0] if len(padded) == 1 else b.op("Concat", padded, "stack_sources", axis=1)
    probs = b.op("Gather", [stacked, b.const("head_sources", indices)], "heads", axis=1)
    gains = np.array([w[0] for w in head_map.weights], np.float32)
    if not np.all(gains == 1.0):  # then every head is a row of its own (_gather_rows)
        gains = gains.reshape(1, *indices.shape, 1, 1).astype(sources[head_map.layers[0]].grouped_probs.dtype.numpy())
        probs = b.op("Mul", [probs, b.const("head_gains", gains)], "gains")
    return probs


def _gather_rows(head_map: HeadMap, heads: int, kv_heads: int) -> tuple[np.ndarray, list[int] | None]:
    """A mapped layer's decode step: which heads of its sources, stacked in ``head_map.layers``
    order, it gathers, as [kv, rows], and the row each head takes (None: row h is head h).
    Without gains, only its distinct rows (_distinct_rows); with them, one row per head."""
    indices = np.array([head_map.layers.index(pairs[0][0]) * heads + pairs[0][1] for pairs in head_map.sources], np.int64)
    if any(weights[0] != 1.0 for weights in head_map.weights):
        return indices.reshape(kv_heads, -1), None
    return _distinct_rows(indices, kv_heads)


def _distinct_rows(sources: np.ndarray, kv_heads: int) -> tuple[np.ndarray, list[int] | None]:
    """The source heads a decode step multiplies by each KV group's V, as [kv, rows], and each head's row.

    Heads of one KV group that read the same source head have the same output, so each
    (source head, KV group) is one row of P·V; a group with fewer distinct sources than the
    most repeats its first (one MatMul needs as many rows in each). Calibrated maps often
    send several heads of a group to one anchor head. Rows None: every head is a row of its own.
    """
    by_group = [list(dict.fromkeys(group.tolist())) for group in sources.reshape(kv_heads, -1)]
    rows = max(map(len, by_group))
    if rows * kv_heads == sources.size:
        return sources.reshape(kv_heads, -1), None
    padded = np.array([group + group[:1] * (rows - len(group)) for group in by_group], np.int64)
    slots = [g * rows + by_group[g].index(source) for g, group in enumerate(sources.reshape(kv_heads, -1).tolist()) for source in group]
    return padded, slots


def _share_mixtures(graph: ir.Graph, layers: dict[int, GqaLayer], plan: SharingPlan, head_maps: dict[int, HeadMap],
                    sources: list[int], positions: _Positions) -> None:
    """Mixtures of several source heads: stored probabilities at every step."""
    probs = {source: _with_probabilities_output(graph, layers[source]) for source in sources}
    # Per run of consecutive shared layers (every source of the run precedes it): each
    # source's probabilities are padded once for the run, and each mapped layer mixes them.
    for run in consecutive_runs(list(plan.anchors)):
        b = NodeBuilder(graph, layers[run[0]].node, f"sa.layers{run[0]}-{run[-1]}")
        heads = layers[run[0]].num_heads
        # A partly shared layer mixes only its borrowed heads' rows; without a map, its anchor's same heads.
        run_maps = {layer: head_maps.get(layer) or HeadMap.from_anchor_heads(plan.anchors[layer], range(heads))
                    for layer in run if layer in head_maps or plan.is_partly_shared(layer)}
        rows = {layer: plan.borrowed_heads(layer) for layer in run if plan.is_partly_shared(layer)}
        padded = _mixed_for_run(b, probs, run_maps, heads, positions.pads, rows) if run_maps else {}
        anchors = {plan.anchors[layer] for layer in run if layer not in padded}
        by_anchor = {anchor: b.op("Pad", [probs[anchor], positions.pads], f"anchor{anchor}_probs_to_buffer") for anchor in sorted(anchors)}
        layer_sources = {layer: padded[layer] if layer in padded else by_anchor[plan.anchors[layer]] for layer in run}
        grouped = {}  # layers of one run that read the same probabilities share their grouping
        for layer, source in layer_sources.items():
            if source not in grouped:
                shape = positions.grouped_shape if layer not in rows else _grouped_shape(b, positions, layers[layer], len(plan.shared_groups[layer]), f"layer{layer}")
                grouped[source] = b.op("Reshape", [source, shape], f"layer{layer}_probs_by_kv_head")
        for layer in run:
            if layer in rows:
                _partly_shared_layer(graph, layers[layer], plan.shared_groups[layer], grouped[layer_sources[layer]], positions)
            else:
                _shared_layer(graph, layers[layer], grouped[layer_sources[layer]], positions)


def _grouped_shape(b: NodeBuilder, positions: _Positions, layer: GqaLayer, groups: int, name: str) -> ir.Value:
    """[0, groups, rep, S, -1]: probabilities of ``groups`` KV groups' heads grouped by KV group."""
    lead = b.const(f"{name}_grouped_lead", np.array([0, groups, layer.num_heads // layer.kv_num_heads], np.int64))
    return b.op("Concat", [lead, positions.query_len, b.const(f"{name}_minus_one", np.array([-1], np.int64))], f"{name}_grouped_shape", axis=0)
