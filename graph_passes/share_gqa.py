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
  own (gqa_kv_groups). Maps that read the heads such a layer keeps take them from its
  kept GQA's probabilities, stored at every step as mixtures' are.

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

import functools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graph_passes.gqa_kv_groups import borrowed_rows, partly_shared_layer, share_part_on_anchor
from graph_passes.gqa_layers import GQA, PAST_KEY, QK_OUTPUT_SOFTMAX, PAST_VALUE, GqaLayer, NodeBuilder, find_gqa_layers, replace_gqa_node, take_place_of
from graph_passes.gqa_phases import PhasedAnchor, anchor_by_phase, recompute_attention, recompute_mapped_attention
from graph_passes.gqa_values import Positions, cache_positions, grouped_shape, values_attention
from graph_passes.projections import MS_DOMAIN
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


def _shared_layer(graph: ir.Graph, layer: GqaLayer, probs: ir.Value | Callable, positions: Positions, recompute: Callable | None = None,
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
    context, present_value = values_attention(b, layer, groups, gqa.inputs[PAST_VALUE], probs, positions, recompute, head_slots)
    output, present_key, old_present_value = gqa.outputs[:3]
    ir.convenience.replace_all_uses_with(output, context)
    take_place_of(old_present_value, present_value)  # the same buffer: the past's type and shape
    graph.outputs.remove(present_key)
    past_key = gqa.inputs[PAST_KEY]
    graph.remove([gqa, *([layer.bias] if layer.bias is not None else []), layer.qkv], safe=True)
    if not past_key.uses():
        graph.inputs.remove(past_key)


def _mixed_for_run(b: NodeBuilder, probs: dict[int, ir.Value], head_maps: dict[int, HeadMap], heads: int, pads: ir.Value,
                   rows: dict[int, tuple[int, ...]], kept: dict[int, tuple[int, ...]]) -> dict[int, ir.Value]:
    """Padded probabilities of every mapped layer of one run of shared layers.

    The sources' probabilities are stacked and padded to the buffer once for the run (the
    sources are fewer than the run's layers); each layer multiplies them by its [heads,
    sources * heads] mixture, whose output is already in the layer's shape: nothing of the
    size of the probabilities is split or padded per layer. A partly shared source (``kept``)
    stacks only the heads it keeps, the mixture's columns of those heads.
    """
    sources = sorted({source for head_map in head_maps.values() for source in head_map.layers})
    stacked = b.op("Concat", [probs[s] for s in sources], "stack_sources", axis=1) if len(sources) > 1 else probs[sources[0]]
    dtype = probs[sources[0]].dtype.numpy() if probs[sources[0]].dtype is not None else np.float32
    columns = [i * heads + h for i, s in enumerate(sources) for h in kept.get(s, range(heads))]
    padded = b.op("Pad", [stacked, pads], "sources_to_buffer")
    flat = b.op("Reshape", [padded, b.const("flat_shape", np.array([0, len(columns), -1], np.int64))], "flatten_sources")
    mixed = {}
    for layer, head_map in head_maps.items():
        matrix = mixture_matrix([head_map], sources, heads, dtype)[np.ix_(list(rows.get(layer, range(heads))), columns)]
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
    positions = cache_positions(graph, layers[min(sources)])
    head_maps = {layer: plan.head_map(layer) for layer in plan.anchors if plan.head_map(layer) is not None}
    if not head_maps:
        # Identity maps: probabilities stored at decode, recomputed at prefill (gqa_phases).
        phased = {source: anchor_by_phase(graph, layers[source], positions.is_step, positions.pads, positions.grouped_shape) for source in sorted(sources)}
        for layer, anchor in plan.anchors.items():
            if plan.is_partly_shared(layer):
                share_part_on_anchor(graph, layers[layer], plan, phased, positions)
                continue
            recompute = functools.partial(recompute_attention, anchor=phased[anchor], past_end=positions.past_end)
            _shared_layer(graph, layers[layer], phased[anchor].grouped_probs, positions, recompute)
    elif all(head_map.width == 1 for head_map in head_maps.values()) and not plan.reads_kept_heads:
        # (The heads a partly shared layer keeps have no K cache of the full layer's shape to
        # recompute from at prefill: maps that read them store probabilities, as mixtures do.)
        _share_one_source_heads(graph, layers, plan, head_maps, sorted(sources), positions)
    else:
        _share_mixtures(graph, layers, plan, head_maps, sorted(sources), positions)
    model.opset_imports[""] = max(model.opset_imports.get("", 0), TENSOR_SCATTER_OPSET)


def _share_one_source_heads(graph: ir.Graph, layers: dict[int, GqaLayer], plan: SharingPlan, head_maps: dict[int, HeadMap],
                            sources: list[int], positions: Positions) -> None:
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
        partly = plan.is_partly_shared(layer)
        if partly or layer in head_maps:
            # A partly shared layer: the rows of its borrowed heads, grouped by its borrowed groups.
            head_map = borrowed_rows(plan, layer, heads) if partly else head_maps[layer]
            indices, head_slots = _gather_rows(head_map, heads, len(plan.shared_groups[layer]) if partly else kv_heads)
            probs = functools.partial(_gathered_heads, head_map=head_map, sources=phased, indices=indices)
            recompute = functools.partial(recompute_mapped_attention, head_map=head_map, sources=phased, past_ends=positions.past_ends, past_end=positions.past_end)
        else:
            head_slots = None
            probs = functools.partial(_grouped_anchor, anchor=phased[anchor], grouped_shape=positions.grouped_shape)
            recompute = functools.partial(recompute_attention, anchor=phased[anchor], past_end=positions.past_end)
        if partly:
            partly_shared_layer(graph, layers[layer], plan.shared_groups[layer], probs, positions, recompute, head_slots)
        else:
            _shared_layer(graph, layers[layer], probs, positions, recompute, head_slots)


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
                    sources: list[int], positions: Positions) -> None:
    """Mixtures of several source heads: stored probabilities at every step.

    A partly shared source gives the probabilities of the heads it keeps (its kept GQA's),
    made when that layer is rewritten: a layer that reads them starts a run of its own."""
    probs = {source: _with_probabilities_output(graph, layers[source]) for source in sources if not plan.is_partly_shared(source)}
    kept = {source: plan.kept_heads(source) for source in sources if source not in probs}
    # Per run of consecutive shared layers (every source of the run precedes it): each
    # source's probabilities are padded once for the run, and each mapped layer mixes them.
    for run in _runs_after_their_sources(plan):
        b = NodeBuilder(graph, layers[run[0]].node, f"sa.layers{run[0]}-{run[-1]}")
        heads = layers[run[0]].num_heads
        # A partly shared layer mixes only its borrowed heads' rows; without a map, its anchor's same heads.
        run_maps = {layer: head_maps.get(layer) or HeadMap.from_anchor_heads(plan.anchors[layer], range(heads))
                    for layer in run if layer in head_maps or plan.is_partly_shared(layer)}
        rows = {layer: plan.borrowed_heads(layer) for layer in run if plan.is_partly_shared(layer)}
        padded = _mixed_for_run(b, probs, run_maps, heads, positions.pads, rows, kept) if run_maps else {}
        anchors = {plan.anchors[layer] for layer in run if layer not in padded}
        by_anchor = {anchor: b.op("Pad", [probs[anchor], positions.pads], f"anchor{anchor}_probs_to_buffer") for anchor in sorted(anchors)}
        layer_sources = {layer: padded[layer] if layer in padded else by_anchor[plan.anchors[layer]] for layer in run}
        grouped = {}  # layers of one run that read the same probabilities share their grouping
        for layer, source in layer_sources.items():
            if source not in grouped:
                shape = positions.grouped_shape if layer not in rows else grouped_shape(b, positions, layers[layer], len(plan.shared_groups[layer]), f"layer{layer}")
                grouped[source] = b.op("Reshape", [source, shape], f"layer{layer}_probs_by_kv_head")
        for layer in run:
            if layer in rows:
                made = partly_shared_layer(graph, layers[layer], plan.shared_groups[layer], grouped[layer_sources[layer]], positions, with_probs=layer in kept)
                if made is not None:
                    probs[layer] = made
            else:
                _shared_layer(graph, layers[layer], grouped[layer_sources[layer]], positions)


def _runs_after_their_sources(plan: SharingPlan) -> list[list[int]]:
    """Runs of consecutive shared layers, each split before a layer whose map reads a
    partly shared layer of the same run (whose probabilities exist only once it is rewritten)."""
    runs = []
    for run in consecutive_runs(list(plan.anchors)):
        piece: list[int] = []
        for layer in run:
            if any(source in piece and plan.is_partly_shared(source) for source in plan.sources_of(layer)):
                runs.append(piece)
                piece = []
            piece.append(layer)
        runs.append(piece)
    return runs
