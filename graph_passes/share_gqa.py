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
* its K cache input and output, Q/K columns and the GQA node are gone.

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
from graph_passes.projections import MS_DOMAIN, column_slice
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
    return _Positions(write_indices, pads, grouped_shape, is_step, past_ends, past_end)


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
    n, kv, d = layer.num_heads, layer.kv_num_heads, layer.head_dim
    v = column_slice(b.graph, b.before, layer.qkv, (n + kv) * d, (n + 2 * kv) * d, f"{b.prefix}.v_proj")
    if layer.bias is not None:
        v_bias = np.ascontiguousarray(layer.bias.inputs[1].const_value.numpy()[..., (n + kv) * d :])
        v = b.op("Add", [v, b.const("v_proj.bias", v_bias)], "v_proj_bias")
    v_rows = v
    v = b.op("Reshape", [v, b.const("v_heads_shape", np.array([0, 0, kv, d], np.int64))], "v_heads")
    v = b.op("Transpose", [v], "v_bnsd", perm=[0, 2, 1, 3])
    present_value = b.op("TensorScatter", [gqa.inputs[PAST_VALUE], v, positions.write_indices], "write_v_cache", axis=2)
    dtype = gqa.outputs[0].dtype

    def grouped(builder: NodeBuilder) -> ir.Value:
        return probs(builder) if callable(probs) else probs

    if recompute is None:
        context = _probs_times_values(b, layer, grouped(b), present_value, head_slots)
    else:
        def step(branch: NodeBuilder) -> list[ir.Value]:
            context = _probs_times_values(branch, layer, grouped(branch), present_value, head_slots)
            context.dtype = dtype
            return [context]

        context = if_by_phase(b, positions.is_step, "attention_by_phase", step, lambda branch: [recompute(branch, layer, v_rows, present_value)], 1).outputs[0]
        context.dtype = dtype

    output, present_key, old_present_value = gqa.outputs[:3]
    value_name = old_present_value.name
    ir.convenience.replace_all_uses_with(output, context)
    ir.convenience.replace_all_uses_with(old_present_value, present_value, replace_graph_outputs=True)
    old_present_value.name = None
    present_value.name = value_name
    present_value.type = old_present_value.type  # the same buffer: its type and shape are the past's
    present_value.shape = old_present_value.shape
    graph.outputs.remove(present_key)
    past_key = gqa.inputs[PAST_KEY]
    graph.remove([gqa, *([layer.bias] if layer.bias is not None else []), layer.qkv], safe=True)
    if not past_key.uses():
        graph.inputs.remove(past_key)


def _probs_times_values(b: NodeBuilder, layer: GqaLayer, grouped: ir.Value, present_value: ir.Value, head_slots: list[int] | None = None) -> ir.Value:
    """The padded, grouped probabilities times the V buffer: [B, S, heads * head_dim].

    ``head_slots``: ``grouped`` is [B, kv, rows, S, T] with rows < heads / kv, and head h
    takes output row ``head_slots[h]`` (counted over kv * rows)."""
    n, kv, d = layer.num_heads, layer.kv_num_heads, layer.head_dim
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


def _mixed_for_run(b: NodeBuilder, probs: dict[int, ir.Value], head_maps: dict[int, HeadMap], heads: int, pads: ir.Value) -> dict[int, ir.Value]:
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
        matrix = mixture_matrix([head_map], sources, heads, dtype)
        mixed[layer] = b.op("MatMul", [b.const(f"layer{layer}.head_mixture", matrix), flat], f"layer{layer}.mix_heads")
    return mixed  # [B, heads, S * buffer]: the grouping Reshape gives [B, kv, rep, S, buffer]


class ShareGqaPass(ir.passes.InPlacePass):
    """The plan's shared layers reuse their anchors' GQA probabilities; their K caches and Q/K columns go."""

    def __init__(self, plan: SharingPlan):
        super().__init__()
        self.plan = plan

    def requires(self, model: ir.Model) -> None:
        layers = find_gqa_layers(model.graph)
        if sorted(layers) != list(range(self.plan.num_layers)):
            raise PlanError(f"the plan is for {self.plan.num_layers} layers but the graph has GroupQueryAttention for {len(layers)}")

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
            recompute = functools.partial(recompute_attention, anchor=phased[anchor], past_end=positions.past_end)
            _shared_layer(graph, layers[layer], phased[anchor].grouped_probs, positions, recompute)
    elif all(head_map.width == 1 for head_map in head_maps.values()):
        _share_one_source_heads(graph, layers, plan, head_maps, sorted(sources), positions)
    else:
        _share_mixtures(graph, layers, plan, head_maps, sorted(sources), positions)
    model.opset_imports[""] = max(model.opset_imports.get("", 0), TENSOR_SCATTER_OPSET)


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
        run_maps = {layer: head_maps[layer] for layer in run if layer in head_maps}
        padded = _mixed_for_run(b, probs, run_maps, layers[run[0]].num_heads, positions.pads) if run_maps else {}
        anchors = {plan.anchors[layer] for layer in run if layer not in padded}
        by_anchor = {anchor: b.op("Pad", [probs[anchor], positions.pads], f"anchor{anchor}_probs_to_buffer") for anchor in sorted(anchors)}
        layer_sources = {layer: padded[layer] if layer in padded else by_anchor[plan.anchors[layer]] for layer in run}
        grouped = {}  # layers of one run that read the same probabilities share their grouping
        for layer, source in layer_sources.items():
            if source not in grouped:
                grouped[source] = b.op("Reshape", [source, positions.grouped_shape], f"layer{layer}_probs_by_kv_head")
        for layer in run:
            _shared_layer(graph, layers[layer], grouped[layer_sources[layer]], positions)
